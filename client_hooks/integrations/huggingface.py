"""Hugging Face adapter: ``Trainer(..., callbacks=[GradsentryCallback(project="demo")])``.

Watches the model and optimizer handed to ``on_train_begin`` and logs once per optimizer step
(``on_step_end``): pre-clip norms (the Trainer clips after backward, before ``step()``), the
learning rate, and ``batch_size`` = per-device batch x accumulation steps x world size.
Callbacks are not given the per-step loss: it is taken from ``on_log``, so records carry
``loss`` only at logging steps, where it is the Trainer's mean over the steps since the last
log (every step with ``logging_steps=1``).
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("client_hooks.integrations.huggingface needs transformers: "
                      "pip install gradsentry[huggingface]") from exc

import client_hooks
from client_hooks.monitor import Monitor


class GradsentryCallback(TrainerCallback):
    """Streams gradient telemetry of a ``transformers.Trainer`` run; keyword arguments go to
    ``watch()``."""

    def __init__(self, **watch_kwargs: Any) -> None:
        self.watch_kwargs = watch_kwargs
        self.monitor: Monitor | None = None
        self._pending: int | None = None  # a logging step waiting for on_log's loss

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        self.close()
        optimizer = kwargs["optimizer"]
        # accelerate's AcceleratedOptimizer steps the wrapped one, which carries the hooks.
        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        options = {"batch_size": per_step * args.world_size, **self.watch_kwargs}
        self.monitor = client_hooks.watch(kwargs["model"], optimizer, **options)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        self._send_pending()  # before the next optimizer step replaces the measurement

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        self._send_pending()
        # The Trainer's count, not the monitor's: a run resumed from a checkpoint goes on.
        if control.should_log:  # set by DefaultFlowCallback, which runs first
            self._pending = state.global_step - 1
        else:
            self.monitor.log(step=state.global_step - 1)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self._pending is not None and self.monitor is not None and logs and "loss" in logs:
            self.monitor.log(loss=logs["loss"], step=self._pending)
            self._pending = None

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        self.close()

    def _send_pending(self) -> None:
        if self._pending is not None and self.monitor is not None:
            self.monitor.log(step=self._pending)
        self._pending = None

    def close(self) -> None:
        """Send a step still waiting for its loss, then close the monitor; idempotent."""
        self._send_pending()
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
