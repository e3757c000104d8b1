"""Background delivery of step records to the collector; never blocks, never raises.

The training thread only appends to a bounded deque (:meth:`Sender.put`). A daemon thread
announces the run once, then drains the deque in batches of up to ``max_batch`` steps, each one
gzip-compressed ``POST {server}/api/v1/runs/{run}/steps``. Connection errors, 5xx, 408 and 429
are retried with exponential backoff (0.5 s doubling to 30 s, jittered) while new data keeps
arriving in the deque, whose oldest entries are dropped (and counted) when it is full. Any
other 4xx drops that batch with a warning carrying the collector's message.
"""

from __future__ import annotations

import atexit
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from typing import Any, Protocol

from . import wire

logger = logging.getLogger("client_hooks")

BACKOFF_START = 0.5
BACKOFF_CAP = 30.0
_RETRY_STATUS = frozenset((408, 429))
_EXIT_TIMEOUT = 5.0


class Item(Protocol):
    """Anything that becomes one wire step record (see :class:`client_hooks.record.PendingStep`)."""

    def to_record(self) -> dict[str, Any]: ...


class Sender:
    """A bounded queue of steps and the daemon thread that delivers them.

    ``run_spec`` is the JSON body of ``POST /api/v1/runs``. :attr:`stats` counts steps:
    ``enqueued == sent + dropped + failed_steps + pending`` at all times.
    """

    def __init__(self, server: str, run_id: str, run_spec: dict[str, Any], *,
                 token: str | None = None, flush_interval: float = 1.0, max_queue: int = 10000,
                 max_batch: int = 1000, http_timeout: float = 10.0) -> None:
        base = server.rstrip("/") + "/api/v1/runs"
        self._runs_url = base
        self._steps_url = f"{base}/{urllib.parse.quote(run_id, safe='')}/steps"
        self._run_spec = run_spec
        self._headers = {"User-Agent": f"gradsentry-client/wire-{wire.WIRE_VERSION}"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._interval = flush_interval
        self._max_batch = max_batch
        self._wake_at = min(max_batch, max_queue)
        self._http_timeout = http_timeout
        self._queue: deque[Item] = deque(maxlen=max_queue)
        self._inflight = 0
        self._run_created = False
        self._stopping = False
        self._closed = False
        self._flush_gen = 0
        self._flush_waiters = 0
        self._warned: set[str] = set()
        self._counts = dict.fromkeys(("enqueued", "sent", "dropped", "failed_batches",
                                      "failed_steps"), 0)
        self._pid = -1
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._ensure_thread()
        atexit.register(self._at_exit)

    @property
    def stats(self) -> dict[str, int]:
        """Step counts: enqueued, sent, dropped (queue full), failed (rejected), pending."""
        with self._cond:
            return {**self._counts, "pending": len(self._queue) + self._inflight}

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
        """Wait until every step queued before this call is delivered or given up on.

        Returns False if some were still pending after ``timeout`` seconds. Cuts a running
        retry backoff short once, so a collector that came back is reached at once.
        """
        with self._cond:
            target = self._counts["enqueued"]
            if self._closed:
                return self._resolved() >= target
            self._flush_gen += 1
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._resolved() >= target, timeout)
            finally:
                self._flush_waiters -= 1

    def close(self, timeout: float = 10.0) -> None:
        """Flush (bounded by ``timeout``), stop the thread and log a summary at INFO."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with self._cond:
            self._closed = self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(0.05, deadline - time.monotonic()))
        atexit.unregister(self._at_exit)
        s = self.stats
        logger.info("gradsentry: sent %d steps, dropped %d (queue full), failed %d in %d "
                    "rejected batches, %d pending lost", s["sent"], s["dropped"],
                    s["failed_steps"], s["failed_batches"], s["pending"])

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
        self._thread = threading.Thread(target=self._loop, name="gradsentry-sender", daemon=True)
        self._thread.start()

    def _resolved(self) -> int:
        c = self._counts
        return c["sent"] + c["dropped"] + c["failed_steps"]

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stopping or (bool(self._queue) and (
                        self._flush_waiters > 0 or len(self._queue) >= self._wake_at)),
                    self._interval)
                if self._stopping:
                    return
            try:
                self._drain()
            except Exception:
                self._warn("loop", "gradsentry: sender error", exc_info=True)

    def _drain(self) -> None:
        while self._queue and not self._stopping:
            created = self._ensure_run()
            if created is None:
                return  # stopping
            with self._cond:
                n = min(self._max_batch, len(self._queue))
                items = [self._queue.popleft() for _ in range(n)]
                self._inflight = n
            records = []
            for item in items:
                try:
                    records.append(item.to_record())
                except Exception:
                    self._warn("record", "gradsentry: could not read a step", exc_info=True)
                    self._finish(1, sent=False)
            if not records:
                continue
            try:
                if created:
                    self._send_batch(records)
                else:
                    self._finish(len(records), sent=False, batch=True)
            except Exception:  # keep the counts whole: an unexpected bug fails the batch
                self._warn("send", "gradsentry: could not send a batch", exc_info=True)
                self._finish(len(records), sent=False, batch=True)

    def _finish(self, n: int, *, sent: bool, batch: bool = False) -> None:
        """Resolve ``n`` in-flight steps as sent or failed (``batch``: a rejected request)."""
        with self._cond:
            self._inflight -= n
            self._counts["sent" if sent else "failed_steps"] += n
            self._counts["failed_batches"] += int(batch)
            self._cond.notify_all()

    def _ensure_run(self) -> bool | None:
        """True once the run exists, False if the collector rejected it, None when stopping."""
        attempt = 0
        while not self._run_created:
            status, body = self._post(self._runs_url, wire.dumps(self._run_spec),
                                      {"Content-Type": wire.CONTENT_TYPE})
            if status is not None and 200 <= status < 300:
                self._run_created = True
                logger.info("gradsentry: run %s %s at %s", self._run_spec.get("id"),
                            "resumed" if status == 200 else "created", self._runs_url)
            elif _retryable(status):
                if not self._backoff(attempt):
                    return None
                attempt += 1
            else:
                self._reject("creating the run", status, body)
                return False
        return True

    def _send_batch(self, records: list[dict[str, Any]]) -> None:
        body, headers = wire.encode_batch(records)
        attempt = 0
        recreated = False
        while True:
            status, answer = self._post(self._steps_url, body, headers)
            if status is not None and 200 <= status < 300:
                self._finish(len(records), sent=True)
                return
            if status == 404 and not recreated:
                # The collector lost the run (e.g. a fresh embedded database): announce it again.
                recreated = True
                self._run_created = False
                created = self._ensure_run()
                if created is None:
                    return  # stopping: the batch stays pending and close() reports it lost
                if not created:
                    self._finish(len(records), sent=False, batch=True)
                    return
                continue
            if not _retryable(status):
                self._reject(f"sending {len(records)} steps", status, answer)
                self._finish(len(records), sent=False, batch=True)
                return
            if not self._backoff(attempt):
                return  # stopping: as above
            attempt += 1

    def _backoff(self, attempt: int) -> bool:
        """Sleep before retry ``attempt`` (0-based); False when asked to stop."""
        delay = min(BACKOFF_CAP, BACKOFF_START * 2.0**attempt)
        delay = delay / 2 + random.uniform(0, delay / 2)  # jitter: spread reconnecting clients
        with self._cond:
            gen = self._flush_gen
            self._cond.wait_for(lambda: self._stopping or self._flush_gen != gen, delay)
            return not self._stopping

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, bytes]:
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={**self._headers, **headers})
        try:
            with urllib.request.urlopen(request, timeout=self._http_timeout) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read()
        except (OSError, http.client.HTTPException) as err:  # refused, reset, timeout, DNS
            self._warn("connect", f"gradsentry: collector unreachable ({err}); retrying")
            return None, b""

    def _reject(self, what: str, status: int | None, body: bytes) -> None:
        try:
            answer = json.loads(body)
            message = f"{answer.get('error')}: {answer.get('detail')}"
        except (ValueError, AttributeError):
            message = body[:300].decode("utf-8", "replace")
        self._warn(f"reject-{status}",
                   f"gradsentry: collector rejected {what} (HTTP {status}): {message}; dropped")

    def _warn(self, key: str, message: str, exc_info: bool = False) -> None:
        """Warn once per kind of problem, then at DEBUG: a long run must not flood its log."""
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        logger.log(level, message, exc_info=exc_info)


def _retryable(status: int | None) -> bool:
    return status is None or status >= 500 or status in _RETRY_STATUS
