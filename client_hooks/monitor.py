"""``watch()`` and :class:`Monitor`: gradient telemetry hooks for one model and optimizer.

Where the measurement sits (DESIGN.md, "Measurement semantics"): every trainable parameter gets
a post-accumulate-grad hook; the first one to fire in a backward pass queues an autograd
engine callback that runs when that backward pass ends, i.e. after accumulation and before
anything the training loop does next (clipping, the optimizer step). The callback reduces all
gradients to per-layer norms on the device (:mod:`client_hooks.norms`) and keeps the result as
the *stash*; each backward replaces it, so with gradient accumulation the stash at
``optimizer.step()`` is the accumulated gradient's. An optimizer step post-hook freezes that
stash for the step, and :meth:`Monitor.log` packs it with the loss into one device tensor,
starts a non-blocking copy to the host and queues it for the sender thread. Nothing here reads
a device value, so the training thread never waits for the GPU.
"""

from __future__ import annotations

import logging
import numbers
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from . import wire
from .norms import LayerNorms
from .record import PendingStep
from .sender import Sender

logger = logging.getLogger("client_hooks")

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def watch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, project: str = "default",
          run: str | None = None, server: str = "http://127.0.0.1:8000",
          token: str | None = None, name: str | None = None,
          config: Mapping[str, Any] | None = None, tags: Iterable[str] | None = None,
          batch_size: int | None = None, flush_interval: float = 1.0, max_queue: int = 10000,
          enabled: bool = True) -> Monitor:
    """Start streaming gradient telemetry of ``model`` trained by ``optimizer``.

    Call ``mon.log(loss=..., batch_size=...)`` once per optimizer step, after
    ``optimizer.step()``; ``mon.close()`` at the end (also runs at interpreter exit).

    Args:
        project: groups runs on the collector.
        run: the run id (``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``); reusing one resumes the run.
            Default: ``f"{project}-{YYYYmmdd-HHMMSS}-{6 hex}"`` (UTC).
        server: the collector's base URL. ``token``: sent as ``Authorization: Bearer``.
        name, config, tags: run metadata (``config`` values that are not JSON become strings).
        batch_size: the run's batch size, and the default of ``log(batch_size=)``.
        flush_interval: seconds between deliveries when fewer than a batch are queued.
        max_queue: steps kept while the collector is slow or down; beyond, the oldest drop.
        enabled: ``False`` returns a monitor that registers nothing and sends nothing.

    Raises:
        ValueError: a malformed run id, server URL or queue setting (setup errors, not
            training ones: this is the only place the client raises).
    """
    return Monitor(model, optimizer, project=project, run=run, server=server, token=token,
                   name=name, config=config, tags=tags, batch_size=batch_size,
                   flush_interval=flush_interval, max_queue=max_queue, enabled=enabled)


def new_run_id(project: str) -> str:
    """``{project}-{YYYYmmdd-HHMMSS}-{6 hex}`` (UTC), the project sanitised to the id alphabet."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", project).lstrip("._-")[:100] or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


class Monitor:
    """Hooks on one model/optimizer pair and the sender that ships their records.

    Use :func:`watch` to create one. Attributes: ``run_id``, ``layers`` (layer names in wire
    order). Usable as a context manager (closes on exit).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 project: str = "default", run: str | None = None,
                 server: str = "http://127.0.0.1:8000", token: str | None = None,
                 name: str | None = None, config: Mapping[str, Any] | None = None,
                 tags: Iterable[str] | None = None, batch_size: int | None = None,
                 flush_interval: float = 1.0, max_queue: int = 10000,
                 enabled: bool = True) -> None:
        self.run_id = new_run_id(project) if run is None else run
        if not RUN_ID_RE.match(self.run_id):
            raise ValueError(f"run id {self.run_id!r} does not match {RUN_ID_RE.pattern}")
        if not server.startswith(("http://", "https://")):
            raise ValueError(f"server must be an http(s) URL, got {server!r}")
        if flush_interval <= 0 or max_queue < 1:
            raise ValueError("flush_interval must be > 0 and max_queue >= 1")
        self.project = project
        self._optimizer = optimizer
        self._norms = LayerNorms(model.named_parameters())
        self.layers: list[str] = list(self._norms.layers)
        self._batch_size = batch_size
        self._samples = 0
        self._steps = 0  # completed optimizer.step() calls
        self._stash: torch.Tensor | None = None
        self._frozen: tuple[torch.Tensor | None, int, float | torch.Tensor] | None = None
        self._queued_task: int | None = None
        self._errors = 0
        self._warned: set[str] = set()
        self._handles: list[RemovableHandle] = []
        self._closed = False
        self._sender: Sender | None = None
        if not enabled:
            return
        spec = {"id": self.run_id, "project": project, "name": name or self.run_id,
                "config": _jsonable(dict(config or {})), "tags": [str(t) for t in tags or ()],
                "batch_size": batch_size, "world_size": 1, "layers": self.layers,
                "semantics": dict(wire.DEFAULT_SEMANTICS)}
        self._sender = Sender(server, self.run_id, spec, token=token,
                              flush_interval=flush_interval, max_queue=max_queue)
        for param in self._norms.params:
            handle = param.register_post_accumulate_grad_hook(self._on_grad)  # type: ignore[no-untyped-call]
            self._handles.append(handle)
        self._handles.append(optimizer.register_step_post_hook(self._on_step))

    # -- public API -----------------------------------------------------------------------

    def log(self, loss: float | torch.Tensor | None = None, *, step: int | None = None,
            batch_size: int | None = None, samples: int | None = None,
            tokens: int | torch.Tensor | None = None,
            **scalars: float | torch.Tensor) -> int | None:
        """Queue the record of the latest optimizer step; never blocks, never raises.

        Call after ``optimizer.step()``. The record carries the gradient norms frozen at that
        step, its learning rate (read when the step ran, before a scheduler moves it),
        ``loss``, and the extra named ``scalars``. Tensors (``loss``, ``tokens``, scalars, a
        tensor ``lr``) are detached and packed on the device; Python numbers stay Python.

        ``step`` overrides the counted step index (number of ``optimizer.step()`` calls before
        the logged one, from 0). ``batch_size`` defaults to ``watch(batch_size=)``;
        ``samples`` defaults to the running sum of batch sizes (an explicit value resets that
        sum). If no optimizer step ran since the previous ``log()`` (an AMP-skipped step, or
        ``log()`` before ``step()``), the newest gradient norms are sent under the current
        step count, which the next step will reuse: the collector keeps the later record.

        Returns the step index queued, or None when disabled, closed or on an internal error
        (logged once as a warning on the ``client_hooks`` logger).
        """
        if self._sender is None or self._closed:
            return None
        try:
            item = self._pending(loss, step, batch_size, samples, tokens, scalars)
        except Exception:
            self._warn("log", "gradsentry: log() failed; this step is not recorded")
            return None
        self._sender.put(item)
        return item.step

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` s until all logged steps are delivered or given up on."""
        return True if self._sender is None else self._sender.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Remove all hooks, flush (bounded by ``timeout``) and stop the sender. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._sender is not None:
            self._sender.close(timeout)

    @property
    def stats(self) -> dict[str, int]:
        """Step counts: enqueued, sent, dropped, failed_steps, failed_batches, pending; and
        errors (internal failures that were logged and swallowed)."""
        base = self._sender.stats if self._sender is not None else {}
        return {**base, "errors": self._errors}

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- hooks (run inside autograd and the optimizer: must never raise) -------------------

    def _on_grad(self, param: torch.Tensor) -> None:
        try:
            # One callback per backward pass. Keying on the graph task (not a flag reset by the
            # callback) survives a backward that raised before its callbacks ran; a reentrant
            # (checkpointed) inner backward gets its own callback, overwritten by the outer one.
            task = torch._C._current_graph_task_id()
            if task != self._queued_task:
                self._queued_task = task
                torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        except Exception:
            self._warn("grad-hook", "gradsentry: gradient hook failed")

    def _on_backward_end(self) -> None:
        try:
            self._stash = self._norms.compute() if self._norms.params else None
        except Exception:
            self._warn("reduce", "gradsentry: gradient norm reduction failed")

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            self._frozen = (self._stash, self._steps, self._lr())
            self._steps += 1
        except Exception:
            self._warn("step-hook", "gradsentry: optimizer step hook failed")

    # -- internals ------------------------------------------------------------------------

    def _lr(self) -> float | torch.Tensor:
        lr = self._optimizer.param_groups[0]["lr"]
        # A tensor lr is updated in place by schedulers: keep this step's value (device copy).
        return lr.detach().clone() if isinstance(lr, torch.Tensor) else float(lr)

    def _pending(self, loss: Any, step: int | None, batch_size: int | None,
                 samples: int | None, tokens: Any, scalars: dict[str, Any]) -> PendingStep:
        if self._frozen is not None:
            norms, index, lr = self._frozen
            self._frozen = None
        else:
            norms, index, lr = self._stash, self._steps, self._lr()
        batch_size = self._batch_size if batch_size is None else batch_size
        if samples is not None:
            self._samples = samples
        elif batch_size is not None:
            self._samples += batch_size
            samples = self._samples
        item = PendingStep(step=index if step is None else int(step), wall_time=time.time())
        parts: list[torch.Tensor] = []
        if norms is not None:
            item.n_layers = len(self.layers)
            parts.append(norms)
        values = {"loss": loss, "lr": lr, "batch_size": batch_size, "samples": samples,
                  "tokens": tokens}
        entries: list[tuple[str, str | None, Any]] = [(k, None, v) for k, v in values.items()]
        entries += [("scalars", k, v) for k, v in scalars.items()]
        for field, sub, value in entries:
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    self._warn(f"shape-{sub or field}",
                               f"gradsentry: {sub or field} has {value.numel()} elements, "
                               "not 1; not recorded", exc_info=False)
                    continue
                device = parts[0].device if parts else value.device
                parts.append(value.detach().reshape(1).to(device, torch.float32,
                                                          non_blocking=True))
                item.packed.append((field, sub))
            elif isinstance(value, numbers.Real):
                number = int(value) if isinstance(value, numbers.Integral) else float(value)
                if sub is None:
                    item.fields[field] = number
                else:
                    item.scalars[sub] = number
            else:
                self._warn(f"type-{sub or field}", f"gradsentry: {sub or field} is a "
                           f"{type(value).__name__}, not a number; not recorded", exc_info=False)
        if parts:
            # cat copies: later in-place updates of the caller's tensors cannot leak in.
            item.host, item.event = _to_host(torch.cat(parts))
        return item

    def _warn(self, key: str, message: str, exc_info: bool = True) -> None:
        """Warn once per kind of failure (then DEBUG), so a hook failing every step cannot
        flood the training log."""
        self._errors += 1
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        logger.log(level, message, exc_info=exc_info)


def _to_host(packed: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying ``packed`` to host memory; returns the host tensor and an event to wait on."""
    if packed.device.type == "cuda":
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(packed.device))
        return host, event
    if packed.device.type == "cpu":
        return packed, None
    # Other accelerators (MPS, XPU, ...) have no pinned/event path here yet: this copy waits.
    return packed.to("cpu"), None


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold turned into its ``str``."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return str(value)
