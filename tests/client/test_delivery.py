"""The sender never blocks training, bounds its memory, retries what is worth retrying."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import pytest
import torch

import client_hooks
from client_hooks.monitor import Monitor
from client_hooks.sender import Sender
from tests.client import models
from tests.client.receiver import Receiver


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connection refused


def train(mon: Monitor, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for i in range(steps):
        loss = models.loss_of(model, seed=i)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.log(loss=loss, batch_size=4)


def test_unreachable_collector_never_blocks_training(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="client_hooks")
    model, opt = models.make()
    # spool=False: this is the memory-only path (tests/client/test_spool.py covers the disk).
    mon = client_hooks.watch(model, opt, server=closed_port_url(), flush_interval=0.01,
                             spool=False)
    train(mon, model, opt, 5)
    loss = models.loss_of(model)
    start = time.perf_counter()
    for _ in range(200):
        mon.log(loss=loss, extra=loss)
    assert time.perf_counter() - start < 1.0
    start = time.perf_counter()
    mon.close(timeout=1)
    assert time.perf_counter() - start < 2.0
    stats = mon.stats
    assert stats["sent"] == 0 and stats["enqueued"] == 205 and stats["errors"] == 0
    assert stats["pending"] + stats["dropped"] == 205 and stats["pending"] > 0
    assert any("unreachable" in r.getMessage() for r in caplog.records)
    assert any("pending lost" in r.getMessage() and "205 pending" in r.getMessage()
               for r in caplog.records)
    assert mon.log(loss=loss) is None  # closed: a no-op, still no exception


def test_full_queue_drops_oldest_and_counts(receiver: Receiver,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # On a loaded machine 50 steps can outlast the 10 s HTTP timeout or the 5 s spool delay,
    # which would move steps to the disk spool instead of the queue this test is about.
    defaults = {**(Sender.__init__.__kwdefaults__ or {}), "http_timeout": 300.0,
                "spool_after": 300.0}
    monkeypatch.setattr(Sender.__init__, "__kwdefaults__", defaults)
    receiver.release_runs.clear()  # the collector hangs: nothing leaves the queue
    model, opt = models.make()
    with client_hooks.watch(model, opt, server=receiver.url, max_queue=10,
                            flush_interval=0.01) as mon:
        train(mon, model, opt, 50)
        stats = mon.stats
        assert (stats["dropped"], stats["pending"], stats["sent"]) == (40, 10, 0)
        receiver.release_runs.set()
        assert mon.flush(timeout=5)
        assert (mon.stats["sent"], mon.stats["pending"]) == (10, 0)
    assert [r["step"] for r in receiver.steps] == list(range(40, 50))
    assert [r["samples"] for r in receiver.steps] == [4 * (i + 1) for i in range(40, 50)]


def test_client_error_drops_batch_and_warns(receiver: Receiver,
                                            caplog: pytest.LogCaptureFixture) -> None:
    receiver.step_answers.append((422, {"error": "ValidationError", "detail": "loss: bad"}))
    model, opt = models.make()
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        train(mon, model, opt, 3)
        with caplog.at_level(logging.WARNING, logger="client_hooks"):
            assert mon.flush(timeout=5)  # given up on counts as resolved
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("422" in m and "ValidationError: loss: bad" in m for m in warnings)
        stats = mon.stats
        assert (stats["failed_batches"], stats["failed_steps"], stats["sent"]) == (1, 3, 0)
        train(mon, model, opt, 2)
        assert mon.flush(timeout=5)
    assert [r["step"] for r in receiver.steps] == [3, 4]
    assert [s for _, s in receiver.log] == [201, 422, 200]


def test_server_errors_are_retried_and_delivered_once(receiver: Receiver) -> None:
    receiver.run_answers.append((503, {"error": "Unavailable", "detail": "starting"}))
    receiver.step_answers.extend([(503, {"error": "Unavailable", "detail": "db"}),
                                  (429, {"error": "TooManyRequests", "detail": "slow down"})])
    model, opt = models.make()
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        train(mon, model, opt, 6)
        assert mon.flush(timeout=10)
        assert mon.stats["sent"] == 6 and mon.stats["failed_steps"] == 0
    assert [s for _, s in receiver.log] == [503, 201, 503, 429, 200]
    assert [r["step"] for r in receiver.steps] == list(range(6))  # each exactly once


def test_run_lost_by_collector_is_announced_again(receiver: Receiver) -> None:
    model, opt = models.make()
    with client_hooks.watch(model, opt, run="lost-1", server=receiver.url,
                            flush_interval=60) as mon:
        train(mon, model, opt, 2)
        assert mon.flush(timeout=5)
        receiver.runs.clear()  # e.g. a collector restarted on a fresh database
        train(mon, model, opt, 2)
        assert mon.flush(timeout=5)
    assert [s for _, s in receiver.log] == [201, 200, 404, 201, 200]
    assert [r["step"] for r in receiver.steps] == [0, 1, 2, 3]


def test_close_marks_the_run_finished_once_everything_is_delivered(receiver: Receiver) -> None:
    model, opt = models.make(seed=31)
    with client_hooks.watch(model, opt, run="finish-1", server=receiver.url,
                            flush_interval=60) as mon:
        models.loss_of(model, seed=0).backward()
        opt.step()
        mon.log()
        assert receiver.finished == []  # not before close
    assert receiver.finished == ["finish-1"]
    assert len(receiver.steps) == 1


def test_close_with_undelivered_steps_does_not_mark_the_run_finished(
    receiver: Receiver, tmp_path: Any
) -> None:
    model, opt = models.make(seed=32)
    receiver.step_answers.extend([(503, {"error": "down"})] * 50)
    mon = client_hooks.watch(model, opt, run="finish-2", server=receiver.url,
                             flush_interval=0.05, spool_dir=tmp_path)
    models.loss_of(model, seed=0).backward()
    opt.step()
    mon.log()
    mon.close(timeout=1)
    assert mon.stats["spooled"] + mon.stats["pending"] >= 1
    assert receiver.finished == []
