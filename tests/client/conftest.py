"""Fixtures for the client tests: a real local HTTP receiver standing in for the collector."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from client_hooks import overlap, param_overlap
from tests.client.receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.close()


def thread_idle(po: param_overlap.ParamOverlap, timeout: float = 10.0) -> None:
    """Wait until the K-th step thread has run every task it was given."""
    reader = po._reader
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with reader._lock:
            if not reader._tasks and not reader._busy.locked():
                return
        time.sleep(0.001)


def use_norm_thread(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    """``GRADSENTRY_NORM_THREAD=setting``; with "1", the K-th step work is done by the norm
    worker's parameter thread (client_hooks/param_overlap.py): every tensor of the small test
    model is handed over, one task per tensor, and each forward pass waits at its end until
    the thread has done all it was given (on a loaded machine it might otherwise not get a
    core in time, and the training thread would do the work, which would prove nothing about
    the thread)."""
    monkeypatch.setenv(overlap.ENV, setting)
    if setting == "1":
        monkeypatch.setattr(overlap, "MIN_NUMEL", 1)
        monkeypatch.setattr(param_overlap, "CHUNK_BYTES", 1)
        if not hasattr(param_overlap.ParamOverlap.forward_end, "patient"):
            forward_end = param_overlap.ParamOverlap.forward_end

            def patient(self: param_overlap.ParamOverlap) -> None:
                if self._reading:
                    thread_idle(self)
                forward_end(self)

            patient.patient = True  # type: ignore[attr-defined]
            monkeypatch.setattr(param_overlap.ParamOverlap, "forward_end", patient)


@pytest.fixture(params=["0", "1"], ids=["training-thread", "param-thread"])
def norm_thread(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test runs twice: the CPU norm worker off (everything on the training thread), and
    forced on with the K-th step work on its parameter thread (:func:`use_norm_thread`)."""
    setting = str(request.param)
    use_norm_thread(monkeypatch, setting)
    return setting
