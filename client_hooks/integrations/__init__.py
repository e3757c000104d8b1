"""Framework adapters, each import-guarded and never imported by ``client_hooks`` itself.

``client_hooks.integrations.lightning.GradsentryCallback`` (``pip install gradsentry[lightning]``)
and ``client_hooks.integrations.huggingface.GradsentryCallback``
(``pip install gradsentry[huggingface]``) call :func:`client_hooks.watch` on the trainer's model
and optimizer and ``Monitor.log`` once per optimizer step.
"""
