"""Background delivery of step records to the collector; never blocks, never raises.

The training thread only appends to a bounded deque (:meth:`Sender.put`). A daemon thread
announces the run once, then drains the deque in batches of up to ``max_batch`` steps, each one
gzip-compressed ``POST {server}/api/v1/runs/{run}/steps``. Connection errors, 5xx, 408 and 429
are retried with exponential backoff (0.5 s doubling to 30 s, jittered; a ``Retry-After`` is
waited out instead) while new data keeps arriving in the deque, whose oldest entries are
dropped (and counted) when it is full. 401 and 403 (a missing, wrong, revoked or
insufficient token) are treated the same way, with one clear error in the log: the data is
kept (spooled) for a later run or ``gradsentry sync --token`` rather than thrown away. Any
other 4xx drops that batch with a warning carrying the collector's message.

With a spool (``spool_dir``, see :mod:`client_hooks.spool`) nothing needs to be dropped while
the collector is away. Spill policy: once the collector has been failing for ``spool_after``
seconds, or the deque is half full, or the sender is closing, the failed batch and everything
in the deque are written to the spool, and from then on each wake-up (``flush_interval``)
moves the deque to disk while the backoff schedule probes the collector with the oldest spooled
batch. Once that succeeds, the spool is replayed oldest first before anything newer in memory
(the deque is only appended to the spool's tail if it fills up meanwhile), and each spooled
batch is forgotten only after a 2xx. Offline (``offline=True`` or ``server=None``) everything
goes to the spool, for ``gradsentry sync``. All disk I/O happens in the sender thread.
"""

from __future__ import annotations

import atexit
import gzip
import logging
import os
import random
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from . import spool as spool_mod
from . import wire

logger = logging.getLogger("client_hooks")

BACKOFF_START = 0.5
BACKOFF_CAP = 30.0
_EXIT_TIMEOUT = 5.0
_SPILL_RESERVE = 3.0  # close() waits this much longer for memory to reach the spool


class Item(Protocol):
    """Anything that becomes one wire step record (see :class:`client_hooks.record.PendingStep`)."""

    def to_record(self) -> dict[str, Any]: ...


@dataclass
class _Batch:
    body: bytes  # uncompressed wire JSON
    steps: int
    spooled: bool  # read from the spool (pop it once resolved) or held in memory


class Sender:
    """A bounded queue of steps and the daemon thread that delivers them.

    ``run_spec`` is the JSON body of ``POST /api/v1/runs``. :attr:`stats` counts steps:
    ``enqueued + recovered == sent + dropped + failed_steps + spooled + pending`` at all times
    (``spooled`` and ``recovered``, steps found in the spool at start, only with a spool).
    """

    def __init__(self, server: str | None, run_id: str, run_spec: dict[str, Any], *,
                 token: str | None = None, flush_interval: float = 1.0, max_queue: int = 10000,
                 max_batch: int = 1000, http_timeout: float = 10.0,
                 spool_dir: str | os.PathLike[str] | None = None, offline: bool = False,
                 spool_max_bytes: int = spool_mod.DEFAULT_MAX_BYTES,
                 spool_after: float = 5.0) -> None:
        self._offline = offline or server is None
        base = (server or "").rstrip("/") + "/api/v1/runs"
        self._runs_url = base
        self._steps_url = f"{base}/{urllib.parse.quote(run_id, safe='')}/steps"
        self._run_spec = run_spec
        self._headers = {"User-Agent": f"gradsentry-client/wire-{wire.WIRE_VERSION}"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._interval = flush_interval
        self._max_batch = max_batch
        self._wake_at = min(max_batch, max_queue)
        self._spill_at = max(1, max_queue // 2)
        self._http_timeout = http_timeout
        self._queue: deque[Item] = deque(maxlen=max_queue)
        if self._offline and spool_dir is None:
            spool_dir = spool_mod.default_root()
        self._spool = (None if spool_dir is None else
                       spool_mod.Spool(os.path.join(spool_dir, run_id), max_bytes=spool_max_bytes))
        self._spool_after = spool_after
        self._spool_dropped = 0  # spool.dropped already counted in stats
        self._held: _Batch | None = None  # the batch being delivered
        self._down_since: float | None = None  # first failure of the current outage
        self._attempt = 0
        self._retry_at = 0.0
        self._retry_after: float | None = None  # the last answer's Retry-After
        self._seen_gen = 0
        self._inflight = 0
        self._run_created = False
        self._stopping = False
        self._closed = False
        self._flush_gen = 0
        self._flush_waiters = 0
        self._warned: set[str] = set()
        self._counts = dict.fromkeys(("enqueued", "sent", "dropped", "failed_batches",
                                      "failed_steps"), 0)
        if self._spool is not None:
            self._counts.update(spooled=0, recovered=0)
        self._pid = -1
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._ensure_thread()
        atexit.register(self._at_exit)

    @property
    def stats(self) -> dict[str, int]:
        """Step counts: enqueued, sent, dropped (queue full or spool over its limit), failed
        (rejected), pending (in memory); with a spool also spooled (on disk, undelivered) and
        recovered (found on disk at start, left by an earlier process)."""
        with self._cond:
            return {**self._counts, "pending": len(self._queue) + self._inflight}

    @property
    def spool_dir(self) -> str | None:
        """This run's spool directory, if spooling is on."""
        return None if self._spool is None else str(self._spool.directory)

    def put(self, item: Item) -> None:
        """Queue one step; when the queue is full the oldest step is dropped and counted."""
        try:
            self._ensure_thread()
            with self._cond:
                if self._closed:
                    return
                if len(self._queue) == self._queue.maxlen:
                    self._counts["dropped"] += 1
                self._queue.append(item)
                self._counts["enqueued"] += 1
                if len(self._queue) >= self._wake_at:
                    self._cond.notify_all()
        except Exception:  # a telemetry bug must not stop training
            self._warn("put", "gradsentry: could not queue a step", exc_info=True)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every step queued before this call is delivered or given up on
        (offline: written to the spool).

        Returns False if some were still pending after ``timeout`` seconds. Cuts a running
        retry backoff short once, so a collector that came back is reached at once.
        """
        with self._cond:
            enqueued = self._counts["enqueued"]

            def done() -> bool:
                # "recovered" is read live: the sender thread may open the spool (and find
                # an earlier process's steps) only after this call.
                return self._resolved() >= enqueued + self._counts.get("recovered", 0)

            if self._closed:
                return done()
            self._flush_gen += 1
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(done, timeout)
            finally:
                self._flush_waiters -= 1

    def close(self, timeout: float = 10.0) -> None:
        """Flush (bounded by ``timeout``), stop the thread and log a summary at INFO.

        With a spool, whatever is still in memory is then written to it (this may take up to
        a few seconds more) for a later run or ``gradsentry sync`` to deliver.
        """
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with self._cond:
            self._closed = self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            reserve = _SPILL_RESERVE if self._spool is not None else 0.05
            self._thread.join(max(reserve, deadline - time.monotonic()))
        atexit.unregister(self._at_exit)
        self._finish()
        s = self.stats
        logger.info("gradsentry: sent %d steps, dropped %d (queue full%s), failed %d in %d "
                    "rejected batches, %d pending lost", s["sent"], s["dropped"],
                    " or spool limit" if self._spool is not None else "", s["failed_steps"],
                    s["failed_batches"], s["pending"])
        if s.get("spooled"):
            logger.warning("gradsentry: %d steps are spooled in %s; upload them with "
                           "`gradsentry sync %s`%s", s["spooled"], self.spool_dir,
                           self.spool_dir, "" if self._offline else
                           " (or resume the run with the same id)")

    def _finish(self) -> None:
        """Tell the collector the run is over (no stalled-run alert, no live gauges), once
        every step was delivered; a failure is only logged at DEBUG: the next step resumes
        the run anyway."""
        s = self.stats
        if self._offline or not self._run_created or s["pending"] or s.get("spooled"):
            return
        url = self._steps_url.rsplit("/", 1)[0] + "/finish"
        status, _, error = spool_mod.post(url, b"{}", {**self._headers,
                                                      "Content-Type": wire.CONTENT_TYPE}, 2.0)
        if status is None or not 200 <= status < 300:
            logger.debug("gradsentry: could not mark the run finished (%s)", error or status)

    # -- thread ---------------------------------------------------------------------------

    def _at_exit(self) -> None:
        self.close(_EXIT_TIMEOUT)

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():
            return
        # First call, or we are a forked child: the parent's thread (and possibly a lock it
        # held at fork time) did not come along, so start afresh.
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._inflight = 0
        self._held = None
        if self._spool is not None and self._spool.is_open:
            self._spool = None  # the parent's: its lock and files are not ours
        self._thread = threading.Thread(target=self._loop, name="gradsentry-sender", daemon=True)
        self._thread.start()

    def _resolved(self) -> int:
        c = self._counts
        return (c["sent"] + c["dropped"] + c["failed_steps"]
                + (c.get("spooled", 0) if self._offline else 0))

    def _waiting(self) -> bool:
        """The collector failed and the next attempt is not due yet."""
        return self._down_since is not None and time.monotonic() < self._retry_at

    def _ready(self) -> bool:
        if self._stopping or self._flush_gen != self._seen_gen:
            return True
        if self._waiting() or self._offline:
            return (bool(self._queue) and self._should_spill()
                    and (self._flush_waiters > 0 or len(self._queue) >= self._wake_at))
        return bool(self._queue) and (self._flush_waiters > 0
                                      or len(self._queue) >= self._wake_at)

    def _loop(self) -> None:
        self._open_spool(create=self._offline)
        while True:
            with self._cond:
                timeout = self._interval
                if self._down_since is not None:
                    timeout = min(timeout, max(0.0, self._retry_at - time.monotonic()))
                self._cond.wait_for(self._ready, timeout)
                stopping = self._stopping
            try:
                if stopping:
                    self._shutdown()
                    return
                self._drain()
            except Exception:
                self._warn("loop", "gradsentry: sender error", exc_info=True)
                if stopping:
                    return

    def _drain(self) -> None:
        if self._flush_gen != self._seen_gen:
            self._seen_gen = self._flush_gen
            self._retry_at = 0.0  # a flush() cuts the backoff short
        while not self._stopping:
            if self._offline or self._waiting():
                if self._should_spill():
                    self._spill()
                return
            if self._spool is not None and self._spool.pending and (
                    len(self._queue) >= self._spill_at):
                self._spill()  # replaying a long spool: keep memory bounded, order intact
            if self._held is None and not self._queue and not (
                    self._spool is not None and self._spool.pending):
                return
            status = self._create_run() if not self._run_created else 200
            batch = None
            if status is not None and 200 <= status < 300:
                batch = self._next_batch()
                if batch is None:
                    return
                status = self._deliver(batch)
            if _hold(status):
                self._failed()
                return
            assert status is not None
            if self._down_since is not None:
                logger.info("gradsentry: collector reachable again after %.1f s",
                            time.monotonic() - self._down_since)
            self._down_since, self._attempt = None, 0
            if batch is None:  # the run was rejected: so is the batch that waits for it
                batch = self._next_batch()
                if batch is None:
                    return
            self._resolve(batch, sent=200 <= status < 300)

    def _failed(self) -> None:
        """The collector is unreachable or overloaded: back off, maybe move data to disk."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        delay = min(BACKOFF_CAP, BACKOFF_START * 2.0**self._attempt)
        wait = delay / 2 + random.uniform(0, delay / 2)  # jitter
        if self._retry_after is not None:  # the collector said when (429): believe it
            wait = self._retry_after + random.uniform(0, min(1.0, 0.1 * self._retry_after))
        self._retry_at = now + wait
        self._attempt += 1
        if self._should_spill():
            self._spill()

    def _next_batch(self) -> _Batch | None:
        """The oldest undelivered batch: held in memory, else the spool's head, else the deque."""
        if self._held is not None:
            return self._held
        if self._spool is not None and self._spool.pending:
            head = self._spool.peek()
            self._count_spool()  # peek() may have found segments gone from disk
            if head is not None:
                return _Batch(head[0], head[1], spooled=True)
        self._held = self._take()
        return self._held

    def _take(self) -> _Batch | None:
        """Up to ``max_batch`` steps from the deque, encoded (None when it is empty)."""
        while True:
            with self._cond:
                n = min(self._max_batch, len(self._queue))
                if n == 0:
                    return None
                items = [self._queue.popleft() for _ in range(n)]
                self._inflight += n
            records = []
            for item in items:
                try:
                    records.append(item.to_record())
                except Exception:
                    self._warn("record", "gradsentry: could not read a step", exc_info=True)
                    self._count(inflight=-1, failed_steps=1)
            if records:
                body, _ = wire.encode_batch(records, compress=False)
                return _Batch(body, len(records), spooled=False)

    def _resolve(self, batch: _Batch, *, sent: bool) -> None:
        outcome = {"sent": batch.steps} if sent else {"failed_steps": batch.steps,
                                                      "failed_batches": 1}
        if batch.spooled:
            assert self._spool is not None
            self._spool.pop()
            self._count_spool(**outcome)
        else:
            self._held = None
            self._count(inflight=-batch.steps, **outcome)

    def _count_spool(self, inflight: int = 0, dropped: int = 0, **deltas: int) -> None:
        """Count ``deltas`` and bring ``spooled``/``dropped`` in line with the spool's own."""
        assert self._spool is not None
        dropped += self._spool.dropped - self._spool_dropped
        self._spool_dropped = self._spool.dropped
        self._count(inflight, dropped=dropped, **deltas,
                    spooled=self._spool.pending - self._counts["spooled"])

    def _count(self, inflight: int = 0, **deltas: int) -> None:
        with self._cond:
            self._inflight += inflight
            for key, delta in deltas.items():
                self._counts[key] += delta
            self._cond.notify_all()

    # -- network --------------------------------------------------------------------------

    def _deliver(self, batch: _Batch) -> int | None:
        """One attempt to deliver ``batch``: the status that decides its fate, None when the
        collector was unreachable."""
        body, headers = _gzip(batch.body)
        status, answer = self._post(self._steps_url, body, headers)
        if status == 404:
            # The collector lost the run (e.g. a fresh embedded database): announce it again.
            self._run_created = False
            created = self._create_run()
            if created is None or not 200 <= created < 300:
                return created
            status, answer = self._post(self._steps_url, body, headers)
        if status is not None and not 200 <= status < 300 and not _hold(status):
            self._reject(f"sending {batch.steps} steps", status, answer)
        return status

    def _create_run(self) -> int | None:
        status, body = self._post(self._runs_url, wire.dumps(self._run_spec),
                                  {"Content-Type": wire.CONTENT_TYPE})
        if status is not None and 200 <= status < 300:
            self._run_created = True
            logger.info("gradsentry: run %s %s at %s", self._run_spec.get("id"),
                        "resumed" if status == 200 else "created", self._runs_url)
        elif not _hold(status):
            self._reject("creating the run", status, body)
        return status

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, bytes]:
        status, answer, error, self._retry_after = spool_mod.send(
            url, body, {**self._headers, **headers}, self._http_timeout)
        if status is None:
            self._warn("connect", f"gradsentry: collector unreachable ({error}); retrying")
        elif status in spool_mod.AUTH_STATUS:
            where = (f"spooled to {self.spool_dir}" if self._spool is not None
                     else "held in memory")
            self._warn(f"auth-{status}", "gradsentry: the collector refused this run's token "
                       f"({spool_mod.describe_error(status, answer)}); steps are kept ({where}) "
                       "and retried with backoff. Pass watch(token=...) or set "
                       "$GRADSENTRY_TOKEN to a token with the 'ingest' scope for project "
                       f"{self._run_spec.get('project')!r}.")
        return status, answer

    # -- spool ----------------------------------------------------------------------------

    def _open_spool(self, create: bool) -> bool:
        """Open the spool if it exists (a previous process left batches) or ``create``."""
        spool = self._spool
        if spool is None:
            return False
        if spool.is_open:
            return True
        if not create and not spool.directory.exists():
            return False
        try:
            found = spool.open()
            spool.write_run(self._run_spec)
            spool.mark_closed(False)  # this process goes on with the run
        except OSError as err:
            self._warn("spool-open", f"gradsentry: spool {spool.directory} unusable ({err}); "
                       "continuing without it")
            self._spool = None
            with self._cond:
                self._counts.pop("spooled", None)
                self._counts.pop("recovered", None)
            return False
        self._spool_dropped = spool.dropped
        if found:
            logger.info("gradsentry: %d steps found in spool %s; replaying them first", found,
                        spool.directory)
            self._count_spool(recovered=found)
        return True

    def _should_spill(self) -> bool:
        if self._spool is None:
            return False
        if self._offline or self._stopping or len(self._queue) >= self._spill_at:
            return True
        return (self._down_since is not None
                and time.monotonic() - self._down_since >= self._spool_after)

    def _spill(self) -> None:
        """Move the held batch, then the whole deque, to the spool's tail (in that order)."""
        if not self._open_spool(create=True):
            return
        assert self._spool is not None
        if self._held is not None:
            self._to_spool(self._held)
            self._held = None
        while (batch := self._take()) is not None:
            self._to_spool(batch)

    def _to_spool(self, batch: _Batch) -> None:
        assert self._spool is not None
        before = self._spool.dropped
        try:
            self._spool.append(batch.body, batch.steps)
        except OSError as err:  # disk full, permissions: this batch is lost, say so
            self._warn("spool-write", f"gradsentry: could not write to the spool ({err}); "
                       f"{batch.steps} steps dropped")
            self._count_spool(inflight=-batch.steps, dropped=batch.steps)
            return
        if self._spool.dropped > before:
            self._warn("spool-full", f"gradsentry: spool over {self._spool.max_bytes} bytes; "
                       "dropping its oldest steps")
        self._count_spool(inflight=-batch.steps)

    def _shutdown(self) -> None:
        """Closing: keep what could not be delivered on disk, if there is a spool."""
        if self._spool is None:
            return
        if self._held is not None or self._queue:
            self._spill()
        if self._spool.is_open:
            if self._spool.pending:  # `gradsentry sync` marks the run finished after upload
                self._spool.mark_closed()
            self._spool.close(remove_if_empty=not self._offline)

    def _reject(self, what: str, status: int | None, body: bytes) -> None:
        self._warn(f"reject-{status}", f"gradsentry: collector rejected {what} "
                   f"({spool_mod.describe_error(status, body)}); dropped")

    def _warn(self, key: str, message: str, exc_info: bool = False) -> None:
        """Warn once per kind of problem, then at DEBUG: a long run must not flood its log."""
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        logger.log(level, message, exc_info=exc_info)


def _hold(status: int | None) -> bool:
    """Keep the data and try again later: the collector is away or busy, or it refused the
    token (fixable without losing steps: a new token, then a resume or ``gradsentry sync``)."""
    return spool_mod.retryable(status) or status in spool_mod.AUTH_STATUS


def _gzip(body: bytes) -> tuple[bytes, dict[str, str]]:
    return gzip.compress(body, compresslevel=5), {"Content-Type": wire.CONTENT_TYPE,
                                                  "Content-Encoding": "gzip"}
