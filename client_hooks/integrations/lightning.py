"""Lightning adapter: ``Trainer(callbacks=[GradsentryCallback(project="demo")])``.

Watches the LightningModule and ``trainer.optimizers[0]`` (automatic optimization) and logs once
per optimizer step, also with ``accumulate_grad_batches``: the accumulated gradient's pre-clip
norms (Lightning clips after ``on_before_optimizer_step``; the hooks measure before that) and
the mean loss of the step's micro-batches, kept on the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("client_hooks.integrations.lightning needs Lightning: "
                      "pip install gradsentry[lightning]") from exc

import client_hooks
from client_hooks.monitor import Monitor


class GradsentryCallback(pl.Callback):
    """Streams gradient telemetry of a Lightning run; keyword arguments go to ``watch()``.

    ``batch_size`` (a ``watch()`` argument) should count the samples of one optimizer step.
    """

    def __init__(self, **watch_kwargs: Any) -> None:
        self.watch_kwargs = watch_kwargs
        self.monitor: Monitor | None = None
        self._loss: torch.Tensor | None = None
        self._step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()
        self.monitor = client_hooks.watch(pl_module, trainer.optimizers[0], **self.watch_kwargs)
        self._step, self._loss = trainer.global_step, None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            # Lightning divides each micro-batch loss by accumulate_grad_batches, so their sum
            # over a step is the step's mean loss. Stays on the device: no sync.
            self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
        if trainer.global_step > self._step:  # this batch ended with an optimizer step
            self._step = trainer.global_step
            # Lightning's count, not the monitor's: a run resumed from a checkpoint goes on.
            self.monitor.log(loss=self._loss, step=trainer.global_step - 1)
            self._loss = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.close()

    def close(self) -> None:
        """Close the monitor (flushes, bounded); idempotent."""
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
