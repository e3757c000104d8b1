"""``watch()`` and :class:`Monitor`: gradient telemetry hooks for one model and optimizer.

Where the measurement sits (DESIGN.md, "Measurement semantics"): every trainable parameter gets
a post-accumulate-grad hook; the first one to fire in a backward pass queues an autograd
engine callback A. The watched module's outputs also get a gradient hook in each forward
(one Python call per pass instead of one per parameter); once they have announced
``PROBE_PASSES`` backward passes in a row, the per-parameter hooks are removed, and if a pass
comes that they missed (a loop that calls submodules directly), the output hook goes
instead. (FSDP2 models use the output hook only; ``torch.compile`` wrappers the parameter
hooks only.) A runs when the backward pass ends and queues a second callback B, which
the engine runs after every callback queued during the pass, in particular after
DistributedDataParallel's reducer has finished its all-reduce (DDP queues its finalizer when
the last bucket is ready, after A). So A sees this rank's local gradient (kept as
``local_grad_norm`` when the world size is > 1) and B the gradient the optimizer will see:
accumulated, all-reduced, not yet clipped. B reduces all gradients to per-layer norms on the
device (:mod:`client_hooks.norms`), divided by the AMP loss scale when a ``GradScaler`` is
declared, and keeps the result as the *stash*; each backward replaces it, so with gradient
accumulation the stash at ``optimizer.step()`` is the accumulated gradient's. (CPU training
with a core torch leaves idle: most per-tensor norms are taken during the pass by a worker
thread, :mod:`client_hooks.overlap`; B keeps those whose gradient did not change since.)

The optimizer step pre-hook runs after clipping (and after the scaler's unscale): one more
batched norm there gives ``clip_coef`` = post-clip total / pre-clip total (with
``step(closure)``, as Lightning calls it, backward and clipping run inside the step, so the
post-hook takes that norm instead). The step post-hook
freezes the stash for the step (with every param group's learning rate), and
:meth:`Monitor.log` packs it with the loss into one device tensor, starts a non-blocking copy
to the host and queues it for the sender thread. A step the scaler skipped (inf/NaN
gradients) fires no optimizer hook: ``log()`` then sends an ``overflow`` record without norms.
A fused optimizer is stepped even then and skips on the device; its ``found_inf`` flag travels
packed and the sender thread drops the norms. Nothing here reads a device value, so the
training thread never waits for the GPU.

Every ``param_every`` steps (step index % K == 0) the pre-hook also copies the trainable
weights (one batched ``_foreach_mul``) and the post-hook reduces the
weights after the step and the difference to that copy to per-layer norms on the device, then
frees the copy: the record of that step carries ``layer_param_norms`` and
``layer_update_norms``. The cost is one extra copy of the weights during those steps only.
(CPU training with the norm worker on: the copy and these norms are taken by a thread of their
own during the forward passes around the step, :mod:`client_hooks.param_overlap`.)
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import numbers
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from . import overlap, param_overlap, wire
from . import spool as spool_mod
from .gns import NoiseScale
from .gns import parse_mode as parse_gns_mode
from .norms import LayerNorms
from .record import PendingStep
from .sender import Sender
from .window import Window

logger = logging.getLogger("client_hooks")

# Backward passes the root module's outputs must announce before the per-parameter hooks go.
PROBE_PASSES = 3
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def watch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, project: str = "default",
          run: str | None = None, server: str | None = "http://127.0.0.1:8000",
          token: str | None = None, name: str | None = None,
          config: Mapping[str, Any] | None = None, tags: Iterable[str] | None = None,
          batch_size: int | None = None, flush_interval: float = 1.0, max_queue: int = 10000,
          enabled: bool = True, scaler: torch.amp.GradScaler | None = None,
          rank: int | None = None, all_ranks: bool = False, offline: bool = False,
          spool_dir: str | os.PathLike[str] | None = None, spool: bool = True,
          spool_max_bytes: int = spool_mod.DEFAULT_MAX_BYTES, param_every: int = 10,
          log_every: int = 1, noise_scale: str | None = None,
          dataset_size: int | None = None) -> Monitor:
    """Start streaming gradient telemetry of ``model`` trained by ``optimizer``.

    Call ``mon.log(loss=..., batch_size=...)`` once per optimizer step, after
    ``optimizer.step()``; ``mon.close()`` at the end (also runs at interpreter exit).

    Args:
        project: groups runs on the collector.
        run: the run id (``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``); reusing one resumes the run.
            Default: ``f"{project}-{YYYYmmdd-HHMMSS}-{6 hex}"`` (UTC).
        server: the collector's base URL. ``token``: an API token (``gs_…``) sent as
            ``Authorization: Bearer``; default ``$GRADSENTRY_TOKEN``. Needed when the collector
            requires tokens (scope ``ingest`` for ``project``); a refused token never stops
            training: the steps are spooled and the log says why.
        name, config, tags: run metadata (``config`` values that are not JSON become strings).
        batch_size: the run's batch size, and the default of ``log(batch_size=)``.
        flush_interval: seconds between deliveries when fewer than a batch are queued.
        max_queue: steps kept while the collector is slow or down; beyond, the oldest drop.
        enabled: ``False`` returns a monitor that registers nothing and sends nothing.
        scaler: the AMP ``GradScaler`` scaling the loss: norms are reported unscaled, with
            ``loss_scale``; steps it skips are sent as ``overflow`` records without norms and
            counted in ``stats["overflow"]``. Step indices then count skipped steps too.
        rank: this process's data-parallel rank; default: ``torch.distributed``'s, or 0.
            Only rank 0 sends, unless ``all_ranks`` (rank ``r > 0`` then sends to run
            ``f"{run}-rank{r}"``). The world size goes into the run's semantics.
        offline: write records only to the spool (also when ``server`` is None); upload
            later with ``gradsentry sync DIR``.
        spool_dir: root of the disk spool (default ``$GRADSENTRY_SPOOL_DIR`` or
            ``~/.cache/gradsentry/spool``); records go there while the collector is
            unreachable and are replayed in order when it returns. ``spool=False`` keeps
            everything in memory only. ``spool_max_bytes`` caps its size (oldest dropped).
        param_every: every this many optimizer steps (step indices 0, K, 2K, ...), report the
            per-layer weight norms after the step and the norms of that step's update
            (``layer_param_norms``, ``layer_update_norms``; the collector derives the
            update-to-weight ratio). Costs one extra copy of the trainable weights in device
            memory during those steps. 0 disables.
        log_every: send one record per this many ``log()`` calls (at step indices N-1,
            2N-1, ...; :meth:`Monitor.close` sends a partial last window). Every call still
            measures: the record carries a ``window`` with the max, min, mean and non-finite
            count of the grad norm, each layer's grad norm, the loss and the extra scalars over
            all the window's steps, so a spike between records is kept. Calling ``log()`` only
            every N steps does the same for the norms of the steps it skipped.
        noise_scale: measure the small-batch squared gradient norms the collector turns into
            the gradient noise scale (:mod:`client_hooks.gns`): ``"micro"`` (micro-batches of
            gradient accumulation vs the accumulated gradient), ``"ddp"`` (each rank's local
            gradient vs the all-reduced one; pass the DDP model), ``"per_example"`` (per-example
            norms of Linear/Embedding/LayerNorm/RMSNorm layers; ``"per_example:norm"`` for the
            normalisation layers only), or None (off).
        dataset_size: the number of examples sampled *without replacement* (an epoch); the
            collector then applies the finite-population correction.

    Raises:
        ValueError: a malformed run id, server URL or queue setting (setup errors, not
            training ones: this is the only place the client raises).
    """
    return Monitor(model, optimizer, project=project, run=run, server=server, token=token,
                   name=name, config=config, tags=tags, batch_size=batch_size,
                   flush_interval=flush_interval, max_queue=max_queue, enabled=enabled,
                   scaler=scaler, rank=rank, all_ranks=all_ranks, offline=offline,
                   spool_dir=spool_dir, spool=spool, spool_max_bytes=spool_max_bytes,
                   param_every=param_every, log_every=log_every, noise_scale=noise_scale,
                   dataset_size=dataset_size)


def new_run_id(project: str) -> str:
    """``{project}-{YYYYmmdd-HHMMSS}-{6 hex}`` (UTC), the project sanitised to the id alphabet."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", project).lstrip("._-")[:100] or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


@dataclass
class _Measured:
    """What one backward pass measured: device tensors, None where not taken."""

    norms: torch.Tensor | None  # LayerNorms.compute(), unscaled
    local: torch.Tensor | None = None  # this rank's total before the all-reduce, unscaled
    scale: torch.Tensor | None = None  # the loss scale the backward ran with
    micro_batches: int = 1
    signature: tuple[tuple[int, int], ...] = ()  # LayerNorms.signature() when measured


@dataclass
class _Frozen:
    """The measurements of one optimizer step, frozen by its post-hook."""

    measured: _Measured | None
    clip_coef: torch.Tensor | None
    index: int
    lrs: list[float | torch.Tensor]  # one per param group
    found_inf: torch.Tensor | None = None  # a fused optimizer's skip flag, set by the scaler
    # LayerNorms.param_update_norms(), every K steps; Late when a thread computes it
    params: torch.Tensor | param_overlap.Late | None = None
    step_time: float | None = None  # seconds since the previous optimizer step ended


class Monitor:
    """Hooks on one model/optimizer pair and the sender that ships their records.

    Use :func:`watch` to create one. Attributes: ``run_id``, ``layers`` (layer names in wire
    order). Usable as a context manager (closes on exit).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 project: str = "default", run: str | None = None,
                 server: str | None = "http://127.0.0.1:8000", token: str | None = None,
                 name: str | None = None, config: Mapping[str, Any] | None = None,
                 tags: Iterable[str] | None = None, batch_size: int | None = None,
                 flush_interval: float = 1.0, max_queue: int = 10000,
                 enabled: bool = True, scaler: torch.amp.GradScaler | None = None,
                 rank: int | None = None, all_ranks: bool = False, offline: bool = False,
                 spool_dir: str | os.PathLike[str] | None = None, spool: bool = True,
                 spool_max_bytes: int = spool_mod.DEFAULT_MAX_BYTES,
                 param_every: int = 10, log_every: int = 1, noise_scale: str | None = None,
                 dataset_size: int | None = None) -> None:
        self.world_size, self.rank = _world(rank)
        self.run_id = new_run_id(project) if run is None else run
        if self.rank > 0 and all_ranks:
            self.run_id = f"{self.run_id[:120]}-rank{self.rank}"
        if not RUN_ID_RE.match(self.run_id):
            raise ValueError(f"run id {self.run_id!r} does not match {RUN_ID_RE.pattern}")
        offline = offline or server is None
        if offline and not spool:
            raise ValueError("offline=True needs the spool (spool=True)")
        if server is not None and not server.startswith(("http://", "https://")):
            raise ValueError(f"server must be an http(s) URL, got {server!r}")
        if flush_interval <= 0 or max_queue < 1:
            raise ValueError("flush_interval must be > 0 and max_queue >= 1")
        if not isinstance(param_every, int) or param_every < 0:
            raise ValueError(f"param_every must be an int >= 0, got {param_every!r}")
        if not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be an int >= 1, got {log_every!r}")
        self.project = project
        self._optimizer = optimizer
        self._scaler = scaler
        wrapped = model  # noise scale (ddp mode) hooks the DDP wrapper
        model, bucket_view, compiled = _unwrap(model)
        # With gradient_as_bucket_view the local gradient is all-reduced in place while
        # callback A runs: no clean local norm to take.
        self._norms = LayerNorms(model.named_parameters())
        self._measure_local = (self.world_size > 1 and not bucket_view
                               and not self._norms.sharding.active)
        self.layers: list[str] = list(self._norms.layers)
        self._batch_size = batch_size
        self._samples = 0
        self._steps = 0  # completed optimizer.step() calls
        self._stash: _Measured | None = None
        self._frozen: _Frozen | None = None
        self._clip_coef: torch.Tensor | None = None
        self._found_inf: torch.Tensor | None = None
        self._closure = False  # the running step() was given a closure
        self._step_ended: float | None = None  # perf_counter() when the last step() ended
        self._local: torch.Tensor | None = None
        self._param_every = param_every
        self._log_every = log_every
        self._window = Window()  # steps measured since the last record sent
        self._held: PendingStep | None = None  # the newest measured step not sent yet
        self._before: list[torch.Tensor] | None = None  # weights before a K-th step
        self._micro = 0  # backward passes since the last optimizer step
        self._queued_tasks: set[int] = set()
        self._errors = 0
        self._overflows = 0
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._handles: list[RemovableHandle] = []
        self._closed = False
        self._enabled = enabled
        self._sender: Sender | None = None
        self._noise: NoiseScale | None = None  # noise scale: small-batch norms (gns.py)
        self._worker: overlap.NormWorker | None = None  # CPU: norms during backward
        self._param_overlap: param_overlap.ParamOverlap | None = None  # CPU: K-th step work
        self._param_exit: _AtExit | None = None
        if noise_scale is not None:
            parse_gns_mode(noise_scale)  # raises ValueError on an unknown mode
        if dataset_size is not None and (not isinstance(dataset_size, int) or dataset_size < 2):
            raise ValueError(f"dataset_size must be an int >= 2, got {dataset_size!r}")
        if not enabled:
            return
        semantics = {**wire.DEFAULT_SEMANTICS, "world_size": self.world_size}
        if self.world_size > 1:
            semantics["rank"] = self.rank
        if noise_scale is not None:  # noise scale: how the small batch is measured
            semantics["noise_scale"] = noise_scale
        if dataset_size is not None:  # noise scale: finite-population correction
            semantics["dataset_size"] = dataset_size
        spec = {"id": self.run_id, "project": project, "name": name or self.run_id,
                "config": _jsonable(dict(config or {})), "tags": [str(t) for t in tags or ()],
                "batch_size": batch_size, "world_size": self.world_size, "layers": self.layers,
                "semantics": semantics}
        if self.rank == 0 or all_ranks:
            root = spool_dir if spool_dir is not None else (
                spool_mod.default_root() if spool else None)
            token = token or os.environ.get("GRADSENTRY_TOKEN") or None
            self._sender = Sender(server, self.run_id, spec, token=token,
                                  flush_interval=flush_interval, max_queue=max_queue,
                                  spool_dir=root, offline=offline,
                                  spool_max_bytes=spool_max_bytes)
        # How a backward pass is detected (module docstring): from the root module's outputs
        # (one Python hook per pass) once a few passes proved that they announce every pass,
        # else from a hook on every parameter. FSDP2 assigns the sharded gradients itself (no
        # AccumulateGrad on the sharded parameters): outputs only. torch.compile: parameters
        # only (a hook registered inside the compiled forward would break the graph).
        self._trigger = "output" if self._norms.sharding.active else (
            "params" if compiled else "probe")
        self._by_output: set[int] = set()  # graph tasks the root's outputs announced
        self._confirmed = 0
        self._forward_handle: RemovableHandle | None = None
        self._param_handles: list[RemovableHandle] = []
        if self._trigger != "params":
            self._forward_handle = model.register_forward_hook(_RootHook(self))
            self._handles.append(self._forward_handle)
        if self._trigger != "output":
            for param in self._norms.params:
                handle = param.register_post_accumulate_grad_hook(self._on_grad)  # type: ignore[no-untyped-call]
                self._param_handles.append(handle)
                self._handles.append(handle)
        # CPU training with an idle core: per-tensor norms taken during the backward pass
        # (client_hooks/overlap.py). Not with several ranks: the all-reduce rewrites the
        # gradients after their hooks, so the worker's norms would all be discarded.
        if (self.world_size == 1 and not self._norms.sharding.active
                and overlap.wanted(self._norms.params)):
            self._worker = overlap.NormWorker(self._norms.params)
        # With it, the K-th steps' weight copy and norms run on a thread during the forward
        # passes around the step (client_hooks/param_overlap.py); the root module's forward
        # hooks bound the time that thread may read the weights.
        if (self._worker is not None and param_every > 0 and self._sender is not None
                and self._trigger != "params" and self._norms.params):
            self._param_overlap = param_overlap.ParamOverlap(self._norms)
            self._handles.append(model.register_forward_pre_hook(
                _RootHook(self, "_on_forward_pre")))
            self._handles.append(model.register_forward_hook(
                _RootHook(self, "_on_forward_end"), always_call=True))
            # A step's norms may wait for a forward pass that never comes: settle them at exit
            # (registered after the sender's, so it runs first).
            self._param_exit = _AtExit(self._param_overlap)
            atexit.register(self._param_exit)
        self._handles.append(optimizer.register_step_pre_hook(self._on_step_pre))
        self._handles.append(optimizer.register_step_post_hook(self._on_step))
        if noise_scale is not None:  # noise scale: self-contained hooks (client_hooks/gns.py)
            self._noise = NoiseScale(noise_scale, wrapped, model, self.layers, optimizer,
                                     scaler)

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

        The record also carries ``micro_batches`` (backward passes since the previous step),
        ``clip_coef`` (post-clip / pre-clip total norm), and with a ``scaler`` ``loss_scale``
        and ``overflow``, with a world size > 1 ``local_grad_norm``, with several param groups
        ``lrs`` (every group's learning rate), and on every ``param_every``-th step
        ``layer_param_norms`` and ``layer_update_norms`` (see :mod:`client_hooks.wire`).

        ``step`` overrides the counted step index (number of ``optimizer.step()`` calls before
        the logged one, from 0, plus skipped AMP steps when a ``scaler`` is declared).
        ``batch_size`` defaults to ``watch(batch_size=)``; ``samples`` defaults to the running
        sum of batch sizes (an explicit value resets that sum).

        With a ``scaler`` declared, a backward pass that no optimizer step followed is a step
        the scaler skipped (it found inf/NaN): its record has ``overflow: true``,
        ``loss_scale`` and no norms, and it takes a step index of its own. This needs one
        ``log()`` per iteration, after ``scaler.step()``. Without a scaler, if no optimizer
        step ran since the previous ``log()`` (``log()`` before ``step()``), the newest
        gradient norms are sent under the current step count, which the next step will
        reuse: the collector keeps the later record.

        Returns the step index queued (on a rank that does not send: the index it would have),
        or None when disabled, closed or on an internal error (logged once as a warning on the
        ``client_hooks`` logger).
        """
        if not self._enabled or self._closed:
            return None
        try:
            item = self._pending(loss, step, batch_size, samples, tokens, scalars)
        except Exception:
            self._warn("log", "gradsentry: log() failed; this step is not recorded")
            return None
        if self._sender is not None and item is not self._held:
            self._sender.put(item)
        return item.step

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` s until all logged steps are delivered or given up on."""
        self._settle_params()
        return True if self._sender is None else self._sender.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Remove all hooks, flush (bounded by ``timeout``) and stop the sender. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._param_overlap is not None:
            try:
                self._param_overlap.close()
            except Exception:
                self._warn("param-norms", "gradsentry: parameter norm thread failed at close")
            if self._param_exit is not None:
                atexit.unregister(self._param_exit)
        self._send_held()
        self._before = None  # a weight copy left by a step that raised
        if self._worker is not None:
            self._worker.close()
            self._worker.discard()
        if self._noise is not None:  # noise scale
            self._noise.close()
        if self._sender is not None:
            self._sender.close(timeout)

    @property
    def stats(self) -> dict[str, int]:
        """Step counts: enqueued, sent, dropped, failed_steps, failed_batches, pending; errors
        (internal failures that were logged and swallowed); overflow (steps the scaler
        skipped)."""
        base = self._sender.stats if self._sender is not None else {}
        return {**base, "errors": self._errors, "overflow": self._overflows}

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- hooks (run inside autograd and the optimizer: must never raise) -------------------

    def _on_grad(self, param: torch.Tensor) -> None:
        try:
            # One callback per backward pass. Keying on the graph task (not a flag reset by the
            # callback) survives a backward that raised before its callbacks ran. A reentrant
            # (checkpointed) inner backward runs between the outer pass's hooks: a set, not
            # the last id, keeps the outer pass from being queued twice.
            task = torch._C._current_graph_task_id()
            if task not in self._queued_tasks:
                self._queued_tasks.add(task)
                torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        except Exception:
            self._warn("grad-hook", "gradsentry: gradient hook failed")

    def _on_root_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        """Sharded models: a backward pass through any output of the root module triggers."""
        try:
            if torch.is_grad_enabled():
                for t in _tensors(output):
                    if t.requires_grad:
                        t.register_hook(self._on_output_grad)  # type: ignore[no-untyped-call]
        except Exception:
            self._warn("forward-hook", "gradsentry: forward hook failed")

    def _on_forward_pre(self, module: torch.nn.Module, args: Any) -> None:
        """The K-th step work's thread may read the weights during this forward pass."""
        try:
            assert self._param_overlap is not None
            self._param_overlap.forward_pre(self._steps, self._before is None
                                            and self._steps % self._param_every == 0)
        except Exception:
            self._warn("param-norms", "gradsentry: parameter norm thread failed")

    def _on_forward_end(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        try:
            assert self._param_overlap is not None
            self._param_overlap.forward_end()
        except Exception:
            self._warn("param-norms", "gradsentry: parameter norm thread failed")

    def _on_output_grad(self, grad: torch.Tensor) -> None:
        try:
            self._by_output.add(torch._C._current_graph_task_id())
        except Exception:
            self._warn("grad-hook", "gradsentry: gradient hook failed")
        self._on_grad(grad)

    def _settle_trigger(self, task: int) -> None:
        """While probing: keep the output trigger once it announced PROBE_PASSES passes in a
        row (then drop the per-parameter hooks), drop it at the first pass it missed."""
        announced = task in self._by_output
        self._by_output.discard(task)
        if self._trigger != "probe":
            return
        if not announced:  # the loop computes its loss without calling the watched module
            self._trigger = "params"
            if self._forward_handle is not None:
                self._forward_handle.remove()
            return
        self._confirmed += 1
        if self._confirmed >= PROBE_PASSES:
            self._trigger = "output"
            for handle in self._param_handles:
                handle.remove()
            self._param_handles.clear()

    def _on_backward_end(self) -> None:
        """Callback A: the backward pass is over; DDP's all-reduce may still be pending."""
        try:
            task = torch._C._current_graph_task_id()
            self._queued_tasks.discard(task)
            if torch._C._current_autograd_node() is not None:
                return  # a backward run by a node of another (reentrant checkpoint): not a pass
            self._settle_trigger(task)
            self._micro += 1
            scale = self._scale()
            self._local = self._norms.total(scale) if self._measure_local else None
            # Runs after every callback queued so far, DDP's finalizer included.
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: self._on_reduced(scale))
        except Exception:
            self._warn("reduce", "gradsentry: gradient norm reduction failed")

    def _on_reduced(self, scale: torch.Tensor | None) -> None:
        """Callback B: the gradient as the optimizer will see it, before clipping."""
        try:
            ready = self._worker.collect() if self._worker is not None else None
            norms = self._norms.compute(scale, ready) if self._norms.params else None
            kept = None if scale is None else scale.detach().clone()  # update() changes it
            self._stash = _Measured(norms, self._local, kept, self._micro,
                                    self._norms.signature())
        except Exception:
            self._warn("reduce", "gradsentry: gradient norm reduction failed")

    def _on_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._snapshot_params()
        try:
            self._clip_coef = None
            # GradScaler with a fused optimizer (``_step_supports_amp_scaling``) always calls
            # step(): the optimizer unscales and skips on the device, reading these two.
            found_inf = getattr(optimizer, "found_inf", None)
            self._found_inf = found_inf if isinstance(found_inf, torch.Tensor) else None
            # step(closure) (Lightning, LBFGS) runs backward and clipping inside the step,
            # after this hook: the post-hook measures the clip coefficient instead.
            # (``args`` starts with the optimizer itself: the hooks get step()'s own args.)
            closure = args[1] if len(args) > 1 else kwargs.get("closure")
            self._closure = closure is not None
            if not self._closure:
                self._clip_coef = self._measure_clip(optimizer)
        except Exception:
            self._warn("step-pre-hook", "gradsentry: optimizer step pre-hook failed")

    def _measure_clip(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Post-clip total / pre-clip total of the gradients as the optimizer sees them now
        (clipped, and unscaled unless a fused optimizer unscales them itself)."""
        stash = self._stash
        if stash is None or stash.norms is None or self._micro == 0:
            return None
        pre = stash.norms[:1]
        grad_scale = getattr(optimizer, "grad_scale", None)
        # In-place ops on DTensors bump no version counter: sharded gradients are re-read.
        unchanged = not self._norms.sharding.active and self._norms.signature() == stash.signature
        if grad_scale is None and unchanged:
            # Nothing clipped or unscaled the gradients since they were measured: skip a
            # second read of every gradient (the benchmark's largest per-step cost).
            return torch.ones_like(pre)
        post = self._norms.total(grad_scale if isinstance(grad_scale, torch.Tensor) else None)
        return torch.where(pre > 0, post / pre, torch.ones_like(pre))

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            if self._closure:
                # The closure's backward and clipping ran inside step(); the optimizer does
                # not change the gradients, so they still read as it saw them.
                self._clip_coef = self._measure_clip(optimizer)
                self._closure = False
            params = self._measure_params()
            if self._frozen is not None:  # the previous step was never logged: keep its norms
                self._fold_norms(self._frozen.index, self._frozen.measured)
            now = time.perf_counter()
            step_time = None if self._step_ended is None else now - self._step_ended
            self._step_ended = now
            self._frozen = _Frozen(self._stash, self._clip_coef, self._steps, self._lrs(),
                                   self._found_inf, params, step_time)
            self._clip_coef = self._found_inf = None
            self._micro = 0
            self._queued_tasks.clear()  # ids of passes that raised before their callbacks ran
            self._steps += 1
        except Exception:
            self._warn("step-hook", "gradsentry: optimizer step hook failed")

    def _snapshot_params(self) -> None:
        """On a K-th step, copy the weights the optimizer is about to change."""
        try:
            self._before = None  # a step that raised must not leave its copy for the next
            if self._param_overlap is not None:
                self._param_overlap.settle()  # nothing reads the weights while they change
            k = self._param_every
            if k > 0 and self._sender is not None and self._norms.params and self._steps % k == 0:
                copy = (None if self._param_overlap is None
                        else self._param_overlap.take_copy(self._steps))
                self._before = self._norms.snapshot() if copy is None else copy
        except Exception:
            self._warn("param-snapshot", "gradsentry: parameter snapshot failed")

    def _measure_params(self) -> torch.Tensor | param_overlap.Late | None:
        """Per-layer weight and update norms of the step that just ran; frees the copy."""
        before, self._before = self._before, None
        if before is None:
            return None
        try:
            if self._param_overlap is not None:
                return self._param_overlap.after_step(before)
            return self._norms.param_update_norms(before)
        except Exception:
            self._warn("param-norms", "gradsentry: parameter norm reduction failed")
            return None

    def _settle_params(self) -> None:
        """Finish the K-th step work still waiting for a forward pass (flush, close)."""
        try:
            if self._param_overlap is not None:
                self._param_overlap.settle()
        except Exception:
            self._warn("param-norms", "gradsentry: parameter norm thread failed")

    # -- internals ------------------------------------------------------------------------

    def _count_overflow(self) -> None:
        """Count a skipped step (training thread, or sender thread for a fused optimizer)."""
        with self._lock:
            self._overflows += 1

    def _scale(self) -> torch.Tensor | None:
        """The scaler's current scale tensor, read without a sync (``get_scale()`` syncs)."""
        scaler = self._scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)
        return scale if isinstance(scale, torch.Tensor) else None

    def _lrs(self) -> list[float | torch.Tensor]:
        """The learning rate of every param group, as the step runs with it."""
        out: list[float | torch.Tensor] = []
        for group in self._optimizer.param_groups:
            lr = group["lr"]
            # A tensor lr is updated in place by schedulers: keep this step's value (device copy).
            out.append(lr.detach().clone() if isinstance(lr, torch.Tensor) else float(lr))
        return out

    def _pending(self, loss: Any, step: int | None, batch_size: int | None,
                 samples: int | None, tokens: Any, scalars: dict[str, Any]) -> PendingStep:
        overflow: bool | None = None if self._scaler is None else False
        clip_coef: torch.Tensor | None = None
        found_inf: torch.Tensor | None = None  # decided by the sender thread (record.py)
        params: torch.Tensor | param_overlap.Late | None = None
        step_time: float | None = None
        frozen, self._frozen = self._frozen, None
        if frozen is not None:
            measured, clip_coef, index, lrs = (frozen.measured, frozen.clip_coef, frozen.index,
                                               frozen.lrs)
            found_inf, params = frozen.found_inf, frozen.params
            step_time = frozen.step_time
        elif self._scaler is not None and self._micro > 0:
            # Backward ran but no optimizer step: the scaler found inf/NaN and skipped it.
            overflow = True
            self._count_overflow()
            measured, index, lrs = self._stash, self._steps, self._lrs()
            self._steps += 1
            self._micro = 0
        else:
            measured, index, lrs = self._stash, self._steps, self._lrs()
        norms = None if measured is None or overflow else measured.norms
        batch_size = self._batch_size if batch_size is None else batch_size
        if samples is not None:
            self._samples = samples
        elif batch_size is not None:
            self._samples += batch_size
            samples = self._samples
        item = PendingStep(step=index if step is None else int(step), wall_time=time.time(),
                           on_overflow=self._count_overflow)
        parts: list[torch.Tensor] = []
        if norms is not None:
            item.n_layers = len(self.layers)
            parts.append(norms)
        if params is not None:
            item.param_layers = len(self.layers)
            if isinstance(params, param_overlap.Late):
                item.late_params = params  # the sender thread waits for it
            else:
                parts.append(params)
        # Noise scale: small-batch squared norms and the same layers' big-batch ones (the
        # squared pre-clip norms above); the sender unpacks them into the "gns" field.
        sample = self._noise.take() if self._noise is not None else None
        sizes = sample.sizes(self._batch_size if batch_size is None else batch_size
                             ) if sample is not None else None
        if sample is not None and sizes is not None and norms is not None:
            big = norms[[1 + i for i in sample.layer_ids]].double().square()
            parts.append(torch.cat([sample.small_sq, big]).to(norms.device, torch.float32))
            item.gns = {"mode": sample.mode, "b_small": sizes[0], "b_big": sizes[1],
                        "layers": sample.layer_ids}
        values: dict[str, Any] = {"loss": loss, "lr": lrs[0] if lrs else None,
                                  "step_time": step_time,
                                  "batch_size": batch_size, "samples": samples, "tokens": tokens,
                                  "overflow": overflow if found_inf is None else found_inf}
        if measured is not None:
            values.update(clip_coef=clip_coef, loss_scale=measured.scale,
                          micro_batches=measured.micro_batches)
            if not overflow:
                values["local_grad_norm"] = measured.local
        entries: list[tuple[str, str | None, Any]] = [(k, None, v) for k, v in values.items()]
        entries += [("scalars", k, v) for k, v in scalars.items()]
        if len(lrs) > 1:  # a single group's lr is "lr" already
            item.fields["lrs"] = [None] * len(lrs)  # filled below, or from the host copy
            entries += [("lrs", str(i), v) for i, v in enumerate(lrs)]
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
            elif isinstance(value, bool) and sub is None:
                item.fields[field] = value
            elif isinstance(value, numbers.Real):
                number = int(value) if isinstance(value, numbers.Integral) else float(value)
                if sub is None:
                    item.fields[field] = number
                elif field == "lrs":
                    item.fields["lrs"][int(sub)] = number
                else:
                    item.scalars[sub] = number
            else:
                self._warn(f"type-{sub or field}", f"gradsentry: {sub or field} is a "
                           f"{type(value).__name__}, not a number; not recorded", exc_info=False)
        if self._log_every > 1 or self._window.steps:
            self._fold_norms(item.step, None if overflow else measured)
            self._fold_values(loss, scalars)
            if self._log_every == 1 or (item.step + 1) % self._log_every == 0:
                layout, packed = self._window.pack()
                if packed is not None:
                    parts.append(packed.to(parts[0].device) if parts else packed)
                item.window = (layout, self._window.steps, self._window_first(item.step))
                self._window.reset()
                self._held = None
            else:
                self._held = item
        if parts:
            # cat copies: later in-place updates of the caller's tensors cannot leak in.
            item.host, item.event = _to_host(torch.cat(parts))
        return item

    def _window_first(self, default: int) -> int:
        first = self._window.first
        return default if first is None else first

    def _fold_norms(self, index: int, measured: _Measured | None) -> None:
        """Count step ``index`` into the window, with its grad norms when measured."""
        self._window.add_step(index)
        norms = None if measured is None else measured.norms
        if norms is not None:
            n = len(self.layers)
            self._window.add("grad_norm", norms[:1])
            self._window.add("grad_norm", norms[1:1 + n], vector=True)

    def _fold_values(self, loss: Any, scalars: Mapping[str, Any]) -> None:
        """Fold the loss and the extra scalars given to ``log()`` into the window."""
        for name, value in (("loss", loss), *scalars.items()):
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                self._window.add(name, value)
            elif isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._window.add(name, torch.tensor([float(value)]))

    def _send_held(self) -> None:
        """At close: send the newest step of an unfinished ``log_every`` window with it."""
        item, self._held = self._held, None
        if item is None or self._sender is None or not self._window.steps:
            return
        try:
            layout, packed = self._window.pack()
            item.window = (layout, self._window.steps, self._window_first(item.step))
            item.window_values = [] if packed is None else packed.cpu().tolist()
            self._window.reset()
            self._sender.put(item)
        except Exception:
            self._warn("window", "gradsentry: the last logging window could not be sent")

    def _warn(self, key: str, message: str, exc_info: bool = True) -> None:
        """Warn once per kind of failure (then DEBUG), so a hook failing every step cannot
        flood the training log."""
        self._errors += 1
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        logger.log(level, message, exc_info=exc_info)


class _RootHook:
    """A forward (pre-)hook on the watched module, calling ``monitor.<method>``. A deep copy or
    a pickle of the module (an EMA copy, ``torch.save(model)``) gets an inert hook instead of
    this monitor."""

    def __init__(self, monitor: Monitor, method: str = "_on_root_forward") -> None:
        self.monitor = monitor
        self.method = method

    def __call__(self, *args: Any) -> None:
        getattr(self.monitor, self.method)(*args)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _inert_hook

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _inert_hook_factory, ()


def _inert_hook(*args: Any) -> None:
    return None


def _inert_hook_factory() -> Any:
    return _inert_hook


class _AtExit:
    """Settles a :class:`param_overlap.ParamOverlap` at interpreter exit, holding it weakly."""

    def __init__(self, target: param_overlap.ParamOverlap) -> None:
        self._target = weakref.ref(target)

    def __call__(self) -> None:
        target = self._target()
        if target is not None:
            with contextlib.suppress(Exception):
                target.settle()


def _world(rank: int | None) -> tuple[int, int]:
    """(world size, rank) from ``torch.distributed`` when it is initialised, else (1, 0)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank() if rank is None else rank
    return 1, 0 if rank is None else rank


def _unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, bool, bool]:
    """The user's module inside DDP / ``torch.compile`` wrappers (same parameter objects, names
    without ``module.`` / ``_orig_mod.``), whether DDP's grads are bucket views, and whether a
    ``torch.compile`` wrapper was found."""
    bucket_view = compiled = False
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            bucket_view = bool(model.gradient_as_bucket_view)
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), torch.nn.Module):
            model, compiled = inner, True  # torch._dynamo's OptimizedModule
        else:
            return model, bucket_view, compiled


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a module output: a tensor, or nested tuples, lists and mappings."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


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
