"""CPU training: per-tensor gradient norms taken on a second thread while backward still runs.

On a GPU the reduction is a few asynchronous kernels and the training thread only launches
them. On a CPU the kernels run on the training thread itself: reading every gradient once
costs about as much as a plain ``sum`` of all of them, after the backward pass. When torch
leaves a core idle (``torch.get_num_threads()`` below the cores this process may use), that
read can overlap the backward pass instead:

* a post-accumulate-grad hook on each large parameter hands its gradient to a worker
  thread as soon as autograd has accumulated it (one ``SimpleQueue.put``, a few µs);
* the worker computes its 2-norm (``torch._foreach_norm``; the kernel releases the GIL) and
  records which tensor and which in-place version it read;
* at the end of the pass (callback B, :meth:`NormWorker.collect`) the training thread takes
  back the gradients the worker has not started, waits for the batch it is on (at most
  ``WAIT_S``; then it reduces that batch too), and keeps a result only if the gradient is
  still the very tensor the worker read (``is``) at the same ``_version``. Anything else (a
  gradient not started yet, accumulated again in the same pass, replaced, modified in place
  by another hook, or a small tensor without a hook) is reduced on the training thread, as
  without the worker.

So the norms are those of the final gradient of the pass, bit-equal to the ones the
training thread would compute, and nothing is read after callback B (clipping, unscaling and
the optimizer come later). The worker only reads gradients. Its CPU time is real: it uses
the idle core; with every core busy (the default torch thread count) it is not started. If
another process takes that core, the training thread does the work it would have done
without the worker, plus a wait of at most ``WAIT_S`` per pass.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence

import torch

from .norms import Ready, _foreach_norm

logger = logging.getLogger("client_hooks")

ENV = "GRADSENTRY_NORM_THREAD"
# Smaller tensors are reduced at the end of the pass: a hook (~3 µs) would cost more than
# their norm.
MIN_NUMEL = 16384
# At the end of a pass, the longest wait for the batch the worker is on (normally well under
# a millisecond); past it the training thread reduces that batch itself.
WAIT_S = 0.002
# After this many passes in a row with the worker stuck in one batch and nothing delivered,
# stop using it.
MAX_MISSES = 50
# The most gradients the worker takes at once: what a pass may end up waiting for.
MAX_BATCH = 8
_LOW_PRECISION = (torch.float16, torch.bfloat16)

# One result: (the gradient read, its _version when read, its 2-norm as a 0-d tensor).
Result = Ready


def wanted(params: Sequence[torch.Tensor], setting: str | None = None) -> bool:
    """Whether to start a norm worker for these parameters (all on the CPU, plain tensors).

    ``setting`` (default ``$GRADSENTRY_NORM_THREAD``): ``"1"`` on, ``"0"`` off, unset or
    ``"auto"``: on when torch's intra-op thread count leaves a core idle.
    """
    setting = (os.environ.get(ENV, "auto") if setting is None else setting).strip().lower()
    if setting in ("0", "off", "false", "no"):
        return False
    if not params or any(p.device.type != "cpu" or type(p) not in (torch.Tensor, torch.nn.Parameter)
                         for p in params):
        return False
    if not any(p.numel() >= MIN_NUMEL for p in params):
        return False
    if setting in ("1", "on", "true", "yes"):
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() < cores


class NormWorker:
    """The worker thread and the hooks that feed it (see the module docstring)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.positions = [i for i, p in enumerate(params) if p.numel() >= MIN_NUMEL]
        self._queue: queue.SimpleQueue[tuple[int, torch.Tensor | None, int] | None] = (
            queue.SimpleQueue())
        self._results: dict[int, Result] = {}
        self._lock = threading.Lock()  # guards _results and _generation
        self._busy = threading.Lock()  # held by the worker while it reduces a batch
        self._generation = 0  # bumped by collect(): later results belong to the next pass
        self._misses = 0  # passes in a row that found the worker stuck and got nothing
        self.failed = False
        self.handles = [params[i].register_post_accumulate_grad_hook(self._hook(i))  # type: ignore[no-untyped-call]
                        for i in self.positions]
        self._thread = threading.Thread(target=self._run, name="gradsentry-norms", daemon=True)
        self._thread.start()

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        put = self._queue.put

        def hook(param: torch.Tensor) -> None:
            put((i, param.grad, self._generation))

        return hook

    def collect(self) -> dict[int, Result]:
        """The norms the worker has finished since the last call.

        Gradients still queued (the worker had not started them) are taken back: the caller
        reduces them itself rather than wait, since with no idle core the worker may be slow
        to get one. The batch the worker is on is waited for up to ``WAIT_S``, then left to
        the caller too. Returns ``{position: (grad, version, norm)}``; the caller keeps a
        result only if the parameter's gradient is still ``grad`` at ``version``.
        """
        if self.failed:
            return {}
        while True:  # take back what the worker has not started
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:  # closing
                self._queue.put(None)
                break
        finished = self._busy.acquire(timeout=WAIT_S)  # the batch it is reducing
        if finished:
            self._busy.release()
        with self._lock:
            self._generation += 1  # what the worker finishes from now on is dropped
            results, self._results = self._results, {}
        self._misses = 0 if finished or results else self._misses + 1
        if self._misses >= MAX_MISSES:
            self.failed = True
            logger.warning("gradsentry: the norm worker thread finished nothing in %d backward "
                           "passes; norms are computed on the training thread from now on",
                           self._misses)
            self.close(wait=False)  # it is stuck: the monitor's close() waits for it
        return results

    def discard(self) -> None:
        """Drop results held (they reference gradients)."""
        with self._lock:
            self._generation += 1
            self._results = {}

    def close(self, wait: bool = True) -> None:
        """Remove the hooks and stop the thread; ``wait``: until it has ended."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._queue.put(None)
        # Let it end before the interpreter may: a daemon thread still inside a torch kernel
        # at interpreter shutdown can abort the process ("terminate called without an
        # active exception"). A batch takes milliseconds; the bound only guards a stuck one.
        if wait and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        torch.set_grad_enabled(False)  # thread-local: a create_graph=True gradient records nothing
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            item = get()
            with self._busy:
                batch = [item]
                while item is not None and len(batch) < MAX_BATCH:
                    try:
                        item = get_nowait()
                    except queue.Empty:
                        break
                    batch.append(item)
                closing = None in batch
                self._reduce([t for t in batch if t is not None and t[1] is not None])
            if closing:
                return

    def _reduce(self, work: list[tuple[int, torch.Tensor | None, int]]) -> None:
        if not work:
            return
        try:
            grads: list[torch.Tensor] = [g for _, g, _ in work]  # type: ignore[misc]
            versions = [g._version for g in grads]
            low = [j for j, g in enumerate(grads) if g.dtype in _LOW_PRECISION]
            if low:  # as LayerNorms reduces them: into float32
                norms = [torch.linalg.vector_norm(g) for g in grads]
                for j, norm in zip(low, _foreach_norm([grads[j] for j in low], torch.float32),
                                   strict=True):
                    norms[j] = norm
            else:
                norms = list(torch._foreach_norm(grads))
            with self._lock:
                for (i, g, gen), v, n in zip(work, versions, norms, strict=True):
                    if gen == self._generation:
                        self._results[i] = (g, v, n)  # type: ignore[assignment]
        except Exception:  # the training thread reduces what has no result
            logger.debug("gradsentry: norm worker failed on a batch", exc_info=True)
