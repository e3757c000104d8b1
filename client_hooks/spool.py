"""The disk spool: wire batches kept on disk while the collector is unreachable, and ``sync``.

Standard library only (no torch): the ``gradsentry sync`` command of the collector imports it.

Layout of one run's spool directory (``<root>/<run_id>/``, the root being ``watch(spool_dir=)``,
``$GRADSENTRY_SPOOL_DIR`` or ``~/.cache/gradsentry/spool``)::

    run.json              the run spec (the body of POST /api/v1/runs): self-describing
    seg-00000001.jsonl    append-only segments; one line = one wire batch body
    seg-00000002.jsonl    ({"wire_version": 1, "steps": [...]}, uncompressed)
    .lock                 held (flock) by the one process that uses the spool
    closed                present when the process that wrote the spool closed its monitor
                          normally: once everything is uploaded, ``sync`` marks the run
                          finished (no marker: the run crashed or goes on, so it stays open)

Lines are appended and flushed to the OS (they survive the process being killed); a segment
is fsynced when it is rotated and when the spool closes. Batches are read back oldest first
and a segment is deleted once all its lines were acknowledged with a 2xx. A batch sent again
after a crash is harmless: the collector upserts on (run, step). The spool holds at most
``max_bytes``; beyond that the oldest segments are deleted and their steps counted as dropped.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

from . import wire

try:
    import fcntl
except ImportError:  # Windows: no advisory lock, one process per spool is up to the user
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("client_hooks")

DEFAULT_MAX_BYTES = 1 << 30
RUN_FILE = "run.json"
CLOSED_FILE = "closed"
_SEG_PREFIX, _SEG_SUFFIX = "seg-", ".jsonl"
_RETRY_STATUS = frozenset((408, 429))
AUTH_STATUS = frozenset((401, 403))  # the token is missing, wrong, revoked or not allowed
RETRY_AFTER_CAP = 300.0  # seconds: a Retry-After longer than this is not waited out in full


def default_root() -> Path:
    """``$GRADSENTRY_SPOOL_DIR``, else ``$XDG_CACHE_HOME/gradsentry/spool`` (``~/.cache``)."""
    if env := os.environ.get("GRADSENTRY_SPOOL_DIR"):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "gradsentry" / "spool"


class SpoolBusy(OSError):
    """Another process holds this spool's lock."""


class Spool:
    """One run's spool directory. Not thread-safe: one thread (the sender's) uses it.

    Construction does no I/O; :meth:`open` does. :attr:`pending` counts the steps on disk not
    yet acknowledged, :attr:`dropped` the steps deleted to stay under ``max_bytes``.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
                 segment_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(4096, min(64 << 20, max_bytes // 8))
        self.pending = 0
        self.dropped = 0
        self.corrupt = 0  # unreadable lines skipped (e.g. a torn write)
        self._sizes: dict[Path, int] = {}  # segments, oldest first -> bytes
        self._steps: dict[Path, int] = {}  # segments -> steps not yet acknowledged
        self._head_off = 0  # byte offset of the next unread line of the oldest segment
        self._peeked: tuple[int, int] | None = None  # (offset after it, steps) of peek()
        self._writer: IO[bytes] | None = None
        self._write_seg: Path | None = None
        self._lock: IO[bytes] | None = None

    @property
    def is_open(self) -> bool:
        return self._lock is not None

    def open(self) -> int:
        """Create the directory, take the lock, scan what is there; returns the steps found.

        Raises :class:`SpoolBusy` when another process holds the lock.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = open(self.directory / ".lock", "ab")  # noqa: SIM115 (held until close)
        if fcntl is not None:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                lock.close()
                raise SpoolBusy(f"spool {self.directory} is in use by another process") from err
        self._lock = lock
        for seg in sorted(self.directory.glob(f"{_SEG_PREFIX}*{_SEG_SUFFIX}")):
            steps = sum(n for _, n in _lines(seg.read_bytes()))
            self._sizes[seg] = seg.stat().st_size
            self._steps[seg] = steps
        self.pending = sum(self._steps.values())
        return self.pending

    def write_run(self, spec: dict[str, Any]) -> None:
        """Write ``run.json`` atomically (temporary file, fsync, rename)."""
        tmp = self.directory / f".{RUN_FILE}.tmp"
        with open(tmp, "wb") as f:
            f.write(wire.dumps(spec))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / RUN_FILE)

    @property
    def closed(self) -> bool:
        """The writing process closed normally (see the module docstring)."""
        return (self.directory / CLOSED_FILE).exists()

    def mark_closed(self, closed: bool = True) -> None:
        """Set or clear the ``closed`` marker (a resumed run clears it)."""
        marker = self.directory / CLOSED_FILE
        if closed:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    def read_run(self) -> dict[str, Any] | None:
        try:
            spec: dict[str, Any] = json.loads((self.directory / RUN_FILE).read_bytes())
        except FileNotFoundError:
            return None
        return spec

    def append(self, body: bytes, steps: int) -> int:
        """Append one wire batch body of ``steps`` steps; returns the steps dropped to fit."""
        line = body.rstrip(b"\n") + b"\n"
        if len(line) > self.max_bytes:
            self.dropped += steps
            return steps
        before = self.dropped
        while self._sizes and sum(self._sizes.values()) + len(line) > self.max_bytes:
            self._drop_oldest()
        if (self._writer is None or self._write_seg is None
                or self._sizes[self._write_seg] >= self.segment_bytes):
            self._rotate()
        assert self._writer is not None and self._write_seg is not None
        self._writer.write(line)
        self._writer.flush()  # to the OS: survives the process being killed
        self._sizes[self._write_seg] += len(line)
        self._steps[self._write_seg] += steps
        self.pending += steps
        return self.dropped - before

    def peek(self) -> tuple[bytes, int] | None:
        """The oldest batch not yet acknowledged, as (body, steps), or None when empty."""
        while self._sizes:
            seg = next(iter(self._sizes))
            try:
                with open(seg, "rb") as f:
                    f.seek(self._head_off)
                    line = f.readline()
            except FileNotFoundError:  # deleted behind our back: its steps are gone
                self._drop_oldest()
                continue
            if not line.endswith(b"\n"):  # end of segment (or a torn last line of a crash)
                if seg == self._write_seg:
                    return None
                self._delete(seg)
                continue
            try:
                steps = len(json.loads(line)["steps"])
            except (ValueError, KeyError, TypeError):
                self.corrupt += 1
                self._head_off += len(line)
                continue
            self._peeked = (self._head_off + len(line), steps)
            return line[:-1], steps
        return None

    def pop(self) -> None:
        """Forget the batch :meth:`peek` returned (acknowledged, or rejected for good)."""
        if self._peeked is None:
            return
        seg = next(iter(self._sizes))
        self._head_off, steps = self._peeked
        self._peeked = None
        self._steps[seg] -= steps
        self.pending -= steps
        if self._head_off >= self._sizes[seg]:
            self._delete(seg)

    def close(self, *, remove_if_empty: bool = False) -> None:
        """Fsync and close; with ``remove_if_empty``, delete the directory if nothing is left."""
        self._close_writer()
        if remove_if_empty and not self._sizes and self._lock is not None:
            for name in (RUN_FILE, CLOSED_FILE, ".lock"):
                (self.directory / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # something else lives there: leave it
                self.directory.rmdir()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- internals ------------------------------------------------------------------------

    def _rotate(self) -> None:
        self._close_writer()
        existing = self.directory.glob(f"{_SEG_PREFIX}*{_SEG_SUFFIX}")
        seqs = (p.name[len(_SEG_PREFIX):-len(_SEG_SUFFIX)] for p in existing)
        last = max((int(s) for s in seqs if s.isdigit()), default=0)
        seg = self.directory / f"{_SEG_PREFIX}{last + 1:08d}{_SEG_SUFFIX}"
        self._writer = open(seg, "ab")  # noqa: SIM115 (kept open across appends)
        self._write_seg = seg
        self._sizes[seg] = 0
        self._steps[seg] = 0

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            os.fsync(self._writer.fileno())
            self._writer.close()
            self._writer = None
            if self._write_seg is not None and self._write_seg in self._sizes:
                _fsync_dir(self.directory)
            self._write_seg = None

    def _drop_oldest(self) -> None:
        seg = next(iter(self._sizes))
        self.dropped += self._steps[seg]
        self.pending -= self._steps[seg]
        self._delete(seg)

    def _delete(self, seg: Path) -> None:
        if seg == self._write_seg:
            self._close_writer()
        seg.unlink(missing_ok=True)
        del self._sizes[seg]
        del self._steps[seg]
        self._head_off = 0
        self._peeked = None


def _lines(data: bytes) -> list[tuple[bytes, int]]:
    """Complete, readable lines of a segment with their step counts."""
    out = []
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is torn or empty
        try:
            out.append((line, len(json.loads(line)["steps"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported here (Windows)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class Reply(NamedTuple):
    status: int | None  # None: unreachable
    body: bytes
    error: str  # the transport error when unreachable
    retry_after: float | None  # seconds, from a Retry-After header (429, 503)


def send(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Reply:
    """POST once."""
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(int(response.status), response.read(), "", None)
    except urllib.error.HTTPError as err:
        with err:
            return Reply(err.code, err.read(), "", retry_after(err.headers.get("Retry-After")))
    except (OSError, http.client.HTTPException) as err:  # refused, reset, timeout, DNS
        return Reply(None, b"", str(err), None)


def post(url: str, body: bytes, headers: dict[str, str],
         timeout: float) -> tuple[int | None, bytes, str]:
    """POST once: (status, answer body, error text); status None when unreachable."""
    reply = send(url, body, headers, timeout)
    return reply.status, reply.body, reply.error


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value) if value.isdigit() else (
            parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, seconds), RETRY_AFTER_CAP)


def retryable(status: int | None) -> bool:
    """Worth retrying later: unreachable, 5xx, 408, 429."""
    return status is None or status >= 500 or status in _RETRY_STATUS


def describe_error(status: int | None, body: bytes, error: str = "") -> str:
    """The collector's ``{"error", "detail"}`` answer (or the transport error) in one line."""
    if status is None:
        return f"unreachable ({error})"
    try:
        answer = json.loads(body)
        message = f"{answer.get('error')}: {answer.get('detail')}"
    except (ValueError, AttributeError):
        message = body[:300].decode("utf-8", "replace")
    return f"HTTP {status}: {message}"


def run_dirs(directory: str | os.PathLike[str]) -> list[Path]:
    """``directory`` itself if it holds a ``run.json``, else its subdirectories that do."""
    path = Path(directory)
    if (path / RUN_FILE).is_file():
        return [path]
    return sorted(p for p in path.iterdir() if (p / RUN_FILE).is_file()) if path.is_dir() else []


def sync(directory: str | os.PathLike[str], server: str, *, token: str | None = None,
         out: Callable[[str], None] = print, attempts: int = 5, timeout: float = 60.0) -> int:
    """Upload a spool or offline run directory (or a root of several) to ``server``.

    Creates or resumes each run from its ``run.json``, posts its batches oldest first and
    deletes each segment once all of its batches were acknowledged. Idempotent: the collector
    upserts on (run, step), and what was delivered is gone from disk. Unreachable/5xx/408/429
    are retried ``attempts`` times with backoff. Returns an exit code: 0 when everything was
    delivered (or there was nothing to do), 1 otherwise.
    """
    dirs = run_dirs(directory)
    if not dirs:
        out(f"no spooled run (no {RUN_FILE}) in {directory}")
        return 1
    headers = {"User-Agent": f"gradsentry-sync/wire-{wire.WIRE_VERSION}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    base = server.rstrip("/") + "/api/v1/runs"
    total_steps = total_batches = 0
    failures = 0
    for run_dir in dirs:
        spool = Spool(run_dir)
        try:
            on_disk = spool.open()
        except SpoolBusy as err:
            out(f"skipped: {err}")
            failures += 1
            continue
        try:
            steps, batches, error = _sync_run(spool, on_disk, base, headers, out, attempts,
                                              timeout)
        finally:
            spool.close()
        total_steps += steps
        total_batches += batches
        if error:
            out(f"run in {run_dir}: stopped: {error}; {spool.pending} steps left on disk")
            failures += 1
    out(f"synced {total_steps} steps in {total_batches} batches from {len(dirs)} run(s) to "
        f"{server}" + (f"; {failures} run(s) incomplete" if failures else ""))
    return 1 if failures else 0


def _sync_run(spool: Spool, on_disk: int, base: str, headers: dict[str, str],
              out: Callable[[str], None], attempts: int,
              timeout: float) -> tuple[int, int, str]:
    spec = spool.read_run()
    if spec is None or "id" not in spec:
        return 0, 0, f"{RUN_FILE} is missing or has no id"
    run_id = str(spec["id"])
    if on_disk == 0 and spool.peek() is None:
        out(f"run {run_id}: nothing to upload")
        return 0, 0, _finish(spool, base, run_id, headers, out, timeout)
    out(f"run {run_id}: {on_disk} steps to upload")

    def deliver(url: str, body: bytes, extra: dict[str, str]) -> tuple[int | None, bytes, str]:
        for attempt in range(attempts):
            status, answer, error, wait = send(url, body, {**headers, **extra}, timeout)
            if not retryable(status) or attempt == attempts - 1:
                return status, answer, error
            time.sleep(max(min(10.0, 0.5 * 2**attempt), wait or 0.0))  # honour Retry-After
        raise AssertionError("unreachable")

    json_headers = {"Content-Type": wire.CONTENT_TYPE}
    status, answer, error = deliver(base, wire.dumps(spec), json_headers)
    if status is None or not 200 <= status < 300:
        return 0, 0, f"creating the run: {describe_error(status, answer, error)}"
    steps_url = f"{base}/{urllib.parse.quote(run_id, safe='')}/steps"
    sent = batches = 0
    reported = time.monotonic()
    while (item := spool.peek()) is not None:
        body, n = item
        status, answer, error = deliver(steps_url, gzip.compress(body, compresslevel=5),
                                        {**json_headers, "Content-Encoding": "gzip"})
        if status is None or not 200 <= status < 300:
            return sent, batches, describe_error(status, answer, error)
        spool.pop()
        sent += n
        batches += 1
        if time.monotonic() - reported > 2.0:
            reported = time.monotonic()
            out(f"run {run_id}: {sent}/{on_disk} steps")
    out(f"run {run_id}: uploaded {sent} steps in {batches} batches")
    return sent, batches, _finish(spool, base, run_id, headers, out, timeout)


def _finish(spool: Spool, base: str, run_id: str, headers: dict[str, str],
            out: Callable[[str], None], timeout: float) -> str:
    """All of a run is uploaded: if its process had closed normally, mark the run finished
    (as ``close()`` does online) and drop the marker; returns an error or ``""``."""
    if not spool.closed:
        return ""
    url = f"{base}/{urllib.parse.quote(run_id, safe='')}/finish"
    status, answer, error, _ = send(url, b"{}", {**headers, "Content-Type": wire.CONTENT_TYPE},
                                    timeout)
    if status is None or not 200 <= status < 300:
        return f"marking the run finished: {describe_error(status, answer, error)}"
    spool.mark_closed(False)
    out(f"run {run_id}: marked finished (its process had closed normally)")
    return ""
