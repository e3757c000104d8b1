"""CPU training: the ``param_every`` weight copy and weight/update norms on a second thread.

Every ``param_every`` (K) steps the monitor copies the weights before ``optimizer.step()`` and
reduces the weights and the update ``w_new - w_old`` after it (:mod:`client_hooks.monitor`).
On a CPU that is a copy and three more reads of every weight on the training thread (10-55
ms per K-th step under load, bench/RESULTS.md run E). When the gradient-norm worker runs
(:mod:`client_hooks.overlap`: CPU, one rank, unsharded, a core idle), this module moves that
work to a thread of its own, which touches the weights **only while the training thread runs
the watched module's forward pass**, the one time a working training loop is sure not to change
them (autograd refuses to backpropagate through a saved weight changed in place):

* The root module's forward pre-hook opens the *reads*, its forward hook (``always_call``:
  also when the forward raises) closes them: it waits for the chunk the thread is on (about
  ``CHUNK_BYTES`` of weights) and runs the chunks not started on the training thread. So the
  training thread waits for the thread only if the forward pass was shorter than the work.
* The copy is taken in the first forward pass before a K-th step; the training thread notes
  every parameter's ``data_ptr()`` and ``_version`` (which every in-place op bumps) then. The
  step's pre-hook copies again, there, any parameter whose pointer or version moved since:
  the copy is of the weights the step starts from, as on the training thread.
* The norms: the step's post-hook notes pointers and versions and leaves the job to the next
  forward pass, in which the thread takes the 2-norms of the weights and of ``copy - weights``
  (in place in the copy), chunk by chunk with the kernels :meth:`LayerNorms.param_update_norms`
  uses, then reduces them to layers as it does (:meth:`LayerNorms.layer_param_update_norms`):
  the values are bit-equal. ``log()`` has queued that step's record before then, with a
  :class:`Late` result that the sender thread waits for. Without a forward pass first, the
  next step's pre-hook, ``flush()``, ``close()`` or interpreter exit reduce on the calling
  thread (the training thread; ``flush`` and ``close`` should be called from it).

Weights changed outside ``optimizer.step()``:

* between the forward pass and ``step()``, in place (a hand-written weight decay under
  ``no_grad``): the version shows it, those tensors are copied again at the pre-hook (exact),
  and the copy is taken at the pre-hook from then on;
* between ``step()`` and the next forward pass (a clamp, ``load_state_dict``): the weights
  after the step are gone before the thread may read them. So the first K-th step is reduced on
  the training thread and the versions are compared at the next forward pass: a loop that
  changes weights there keeps the training-thread path for the whole run. If it first happens
  later, that step's record carries no ``layer_param_norms``/``layer_update_norms`` (nothing
  wrong is sent) and the training-thread path is used from then on;
* through ``.data`` (which bumps no version): not seen. A change made between the forward pass
  and ``step()`` then counts into the reported update; one made between ``step()`` and the
  next forward pass into the reported weights and update.
  ``GRADSENTRY_NORM_THREAD=0`` keeps everything on the training thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator

import torch

from .norms import LayerNorms, _foreach_norm, _Group

logger = logging.getLogger("client_hooks")

# The most weight bytes one task reads: what closing the reads may wait for (~1 ms).
CHUNK_BYTES = 2 << 20
# How long the sender thread waits for a late result before sending the record without it.
LATE_WAIT_S = 60.0

Task = Callable[[], None]
# (data_ptr(), _version) of every parameter, in LayerNorms order.
Signature = list[tuple[int, int]]


class Late:
    """A tensor computed after the record that carries it was queued."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: torch.Tensor | None = None

    def set(self, value: torch.Tensor | None) -> None:
        """The result, or None: the record goes without it."""
        self._value = value
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float = LATE_WAIT_S) -> list[float] | None:
        """The values (sender thread), None when withheld or not there after ``timeout`` s."""
        if not self._done.wait(timeout):
            logger.warning("gradsentry: parameter norms not computed within %.0f s (no forward "
                           "pass, flush() or close() since the step); sent without them",
                           timeout)
            return None
        return None if self._value is None else self._value.tolist()


class _Reader:
    """A thread that runs queued tasks only while the training thread allows reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _tasks, _open, _closing
        self._busy = threading.Lock()  # held by the thread while it runs a task
        self._wake = threading.Event()
        self._tasks: deque[Task] = deque()
        self._open = False
        self._closing = False
        self.by_thread = 0  # tasks run by the thread
        self.by_caller = 0  # tasks left to the training thread
        self.thread = threading.Thread(target=self._run, name="gradsentry-params", daemon=True)
        self.thread.start()

    def open(self, tasks: list[Task]) -> None:
        with self._lock:
            self._tasks.extend(tasks)
            self._open = True
            self._wake.set()

    def close(self) -> None:
        """From here on the thread reads nothing; what it had not started runs here."""
        with self._lock:
            self._open = False
            rest = list(self._tasks)
            self._tasks.clear()
        with self._busy:  # the task the thread is on, if any
            pass
        if rest:
            with _plain():
                for task in rest:
                    task()
            self.by_caller += len(rest)

    def stop(self) -> None:
        with self._lock:
            self._closing = True
            self._wake.set()

    def _run(self) -> None:
        torch.set_grad_enabled(False)  # thread-local
        while True:
            self._wake.wait()
            with self._busy:
                with self._lock:
                    if self._closing:
                        return
                    if not (self._open and self._tasks):
                        self._wake.clear()  # under _lock: open() cannot slip in between
                        continue
                    task = self._tasks.popleft()
                task()
                self.by_thread += 1


@contextlib.contextmanager
def _plain() -> Iterator[None]:
    """Tasks run on the training thread inside a forward pass: no autograd recording, no
    inference tensors, no autocast."""
    with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
        yield


class _Copy:
    """A copy of the weights taken for step ``index``."""

    def __init__(self, index: int, signature: Signature, size: int) -> None:
        self.index = index
        self.signature = signature
        self.copies: list[torch.Tensor | None] = [None] * size
        self.failed = False


class _Update:
    """The norms of one K-th step, waiting for a forward pass."""

    def __init__(self, signature: Signature, tasks: list[Task], late: Late) -> None:
        self.signature = signature
        self.tasks = tasks
        self.late = late


class ParamOverlap:
    """The copy and the norms of :mod:`client_hooks.monitor`'s K-th steps, on a thread
    (module docstring). Every method runs on the training thread."""

    def __init__(self, norms: LayerNorms) -> None:
        self._norms = norms
        self._params = norms.params
        self._reader = _Reader()
        self._reading = False
        self._copy: _Copy | None = None  # taken or being taken for a coming K-th step
        self._update: _Update | None = None  # a step's norms, not handed to the thread yet
        self._probe: Signature | None = None  # after the first K-th step (training thread)
        self.update_async: bool | None = None  # None: not probed yet
        self.copy_async = True
        self._plan: list[_Group] | None = None
        self._chunks: list[tuple[list[int], torch.dtype | None]] = []

    @property
    def thread(self) -> threading.Thread:
        return self._reader.thread

    @property
    def tasks(self) -> tuple[int, int]:
        """Tasks run so far (by the thread, by the training thread)."""
        return self._reader.by_thread, self._reader.by_caller

    def signature(self) -> Signature:
        return [(p.data_ptr(), p._version) for p in self._params]

    def forward_pre(self, index: int, want_copy: bool) -> None:
        """The root module's forward begins; ``index``: the next step's, ``want_copy``: it is
        a K-th step and no copy is held for it."""
        tasks: list[Task] = []
        sig: Signature | None = None
        update, self._update = self._update, None
        if update is not None:
            sig = self.signature()
            if sig == update.signature:
                tasks += update.tasks
            else:
                update.late.set(None)
                self._give_up_update("after optimizer.step() and before the next forward "
                                     "pass; that step is sent without parameter norms")
        if self._probe is not None:
            sig = sig or self.signature()
            if sig == self._probe:
                self.update_async = True
            else:
                self._give_up_update("after optimizer.step() and before the next forward pass")
            self._probe = None
        copy = self._copy
        if not want_copy or (copy is not None and copy.index != index):
            self._copy = copy = None  # a step the scaler skipped, say
        if want_copy and self.copy_async and copy is None:
            copy = self._copy = _Copy(index, sig or self.signature(), len(self._params))
            tasks += [self._copy_task(copy, positions) for positions, _ in self._chunks_of()]
        if tasks:
            self._reader.open(tasks)
            self._reading = True

    def forward_end(self) -> None:
        """The forward pass ended (or raised): the thread stops reading weights."""
        if self._reading:
            self._reading = False
            self._reader.close()

    def settle(self) -> None:
        """Before anything may change the weights (a step, ``flush``, ``close``, exit): no
        read in flight, and a step's norms still waiting for a forward pass taken here."""
        self.forward_end()
        update, self._update = self._update, None
        if update is None:
            return
        if self.signature() != update.signature:
            update.late.set(None)
            self._give_up_update("after optimizer.step(); that step is sent without parameter "
                                 "norms")
            return
        with _plain():
            for task in update.tasks:
                task()

    def take_copy(self, index: int) -> list[torch.Tensor] | None:
        """At a K-th step's pre-hook (after :meth:`settle`): the copy of the weights the step
        starts from, or None (the caller copies)."""
        copy, self._copy = self._copy, None
        if copy is None or copy.index != index or copy.failed:
            return None
        stale = [i for i, (now, then) in enumerate(zip(self.signature(), copy.signature,
                                                       strict=True)) if now != then]
        if stale:
            self.copy_async = False
            logger.info("gradsentry: weights changed in place between the forward pass and "
                        "optimizer.step(); the parameter copy is taken at the step from now on")
            with _plain():
                fresh = torch._foreach_mul([self._params[i] for i in stale], 1.0)
            for i, t in zip(stale, fresh, strict=True):
                copy.copies[i] = t
        return copy.copies  # type: ignore[return-value]

    def after_step(self, before: list[torch.Tensor]) -> torch.Tensor | Late:
        """At a K-th step's post-hook: its ``[w_1..w_L, u_1..u_L]``, now or :class:`Late`."""
        if not self.update_async:  # probing, or the loop changes weights after the step
            out = self._norms.param_update_norms(before)
            if self.update_async is None:
                self._probe = self.signature()
            return out
        self.settle()  # defensive: a step without a pre-hook left one pending
        chunks = self._chunks_of()
        plan = self._plan
        assert plan is not None
        n = len(self._params)
        weights: list[torch.Tensor | None] = [None] * n
        updates: list[torch.Tensor | None] = [None] * n
        late = Late()
        failed: list[bool] = []
        tasks = [self._norm_task(before, positions, dtype, weights, updates, failed)
                 for positions, dtype in chunks]

        def finish() -> None:
            try:
                late.set(None if failed else self._norms.layer_param_update_norms(
                    plan, weights, updates))  # type: ignore[arg-type]
            except Exception:
                logger.debug("gradsentry: parameter norm reduction failed", exc_info=True)
                late.set(None)

        self._update = _Update(self.signature(), [*tasks, finish], late)
        return late

    def close(self) -> None:
        """Finish what is pending (see :meth:`settle`) and stop the thread."""
        try:
            self.settle()
        finally:
            self._copy = None
            self._reader.stop()
            # Let it end before the interpreter may: a daemon thread woken during
            # finalization can abort the process ("terminate called without an active
            # exception"), as a script seen here did, 2 exits in 4, without this join.
            self._reader.thread.join(timeout=1.0)

    def _give_up_update(self, where: str) -> None:
        if self.update_async is not False:
            logger.info("gradsentry: this loop changes weights %s; parameter norms are taken on "
                        "the training thread from now on", where)
        self.update_async = False

    def _chunks_of(self) -> list[tuple[list[int], torch.dtype | None]]:
        """Parameter positions in runs of at most ``CHUNK_BYTES`` within one reduction group,
        with that group's norm dtype."""
        plan = self._norms.plan_of(list(self._params))
        if plan is not self._plan:
            chunks: list[tuple[list[int], torch.dtype | None]] = []
            for group in plan:
                run: list[int] = []
                size = 0
                for i in group.positions:
                    p = self._params[i]
                    if run and size + p.numel() * p.element_size() > CHUNK_BYTES:
                        chunks.append((run, group.norm_dtype))
                        run, size = [], 0
                    run.append(i)
                    size += p.numel() * p.element_size()
                if run:
                    chunks.append((run, group.norm_dtype))
            self._plan, self._chunks = plan, chunks
        return self._chunks

    def _copy_task(self, copy: _Copy, positions: list[int]) -> Task:
        params = self._params

        def task() -> None:
            try:
                # As LayerNorms.snapshot copies: one _foreach_mul by 1.0.
                for i, t in zip(positions, torch._foreach_mul([params[i] for i in positions],
                                                              1.0), strict=True):
                    copy.copies[i] = t
            except Exception:
                copy.failed = True
                logger.debug("gradsentry: parameter copy failed", exc_info=True)

        return task

    def _norm_task(self, before: list[torch.Tensor], positions: list[int],
                   dtype: torch.dtype | None, weights: list[torch.Tensor | None],
                   updates: list[torch.Tensor | None], failed: list[bool]) -> Task:
        params = self._params

        def task() -> None:
            try:
                now = [params[i] for i in positions]
                diff = [before[i] for i in positions]
                w = _foreach_norm(now, dtype)
                torch._foreach_sub_(diff, now)  # in place in the copy, as param_update_norms
                u = _foreach_norm(diff, dtype)
                for i, wn, un in zip(positions, w, u, strict=True):
                    weights[i], updates[i] = wn, un
            except Exception:
                failed.append(True)
                logger.debug("gradsentry: parameter norms failed", exc_info=True)

        return task
