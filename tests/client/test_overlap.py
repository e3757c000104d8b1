"""CPU norm worker (client_hooks/overlap.py): norms taken during backward equal the ones the
training thread takes at backward end, bit for bit, and are dropped whenever the gradient
changed after the worker read it."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any

import pytest
import torch

import client_hooks
from client_hooks import overlap
from tests.client import models
from tests.client.receiver import Receiver
from tests.client.test_norms import assert_norms


@pytest.fixture(autouse=True)
def every_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test model's tensors are tiny: hand every one of them to the worker."""
    monkeypatch.setattr(overlap, "MIN_NUMEL", 1)


def settle_before_embedding(model: torch.nn.Module, worker: overlap.NormWorker) -> Any:
    """In every backward pass, once the gradient reaches the embedding's output (every other
    parameter's gradient is accumulated by then), wait until the worker has reduced all it
    was handed: on a loaded machine it might otherwise not get a core before the pass ends
    (its norms are then taken on the training thread, and a test of reuse would prove
    nothing)."""

    def wait(grad: torch.Tensor) -> None:
        idle, deadline = 0, time.monotonic() + 10
        while idle < 3 and time.monotonic() < deadline:
            idle = idle + 1 if worker._queue.empty() and not worker._busy.locked() else 0
            time.sleep(0.001)

    def forward_hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(wait)

    return model.emb.register_forward_hook(forward_hook)


def train(receiver: Receiver, monkeypatch: pytest.MonkeyPatch, setting: str, *,
          steps: int = 3, micro: int = 2,
          after_backward: Any = None) -> tuple[list[dict[str, Any]], list[dict[str, float]], int]:
    """Records, brute-force references and reused-norm count of a clipped, accumulated run."""
    monkeypatch.setenv(overlap.ENV, setting)
    model, opt = models.make(seed=5)
    first = len(receiver.steps)
    refs = []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        assert (mon._worker is not None) == (setting == "1")
        if mon._worker is not None:
            settle_before_embedding(model, mon._worker)
        if after_backward is not None:
            after_backward(model)
        for step in range(steps):
            for k in range(micro):
                (models.loss_of(model, seed=10 * step + k) / micro).backward()
            refs.append(models.reference_norms(model, models.snapshot(model)))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)  # in place, after B
            opt.step()
            opt.zero_grad()
            mon.log()
        assert mon.flush(timeout=5)
        assert mon.stats["errors"] == 0
        reused = mon._norms.reused
    return receiver.steps[first:], refs, reused


def test_worker_norms_equal_training_thread_norms(receiver: Receiver,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with_worker, refs, reused = train(receiver, monkeypatch, "1")
    without, refs_sync, reused_sync = train(receiver, monkeypatch, "0")
    assert reused_sync == 0
    # 6 backward passes x 6 tensors; all but the embedding's are reduced by the worker
    # before the pass ends (settle_before_embedding).
    assert reused >= 6 * 5
    assert len(with_worker) == len(without) == 3
    for a, b, ref in zip(with_worker, without, refs, strict=True):
        assert_norms(a, ref)  # the accumulated, pre-clip gradient (tied weight once)
        for key in ("grad_norm", "layer_grad_norms", "layer_nonfinite", "clip_coef"):
            assert a[key] == b[key], key  # bit-equal on the wire
    assert refs == refs_sync


def slow_in_place(factor: float) -> Any:
    """A user hook registered after watch(): waits until the worker has surely read the
    gradient, then changes it in place (as an optimizer-in-backward hook might)."""

    def register(model: torch.nn.Module) -> None:
        def hook(param: torch.Tensor) -> None:
            time.sleep(0.02)
            assert param.grad is not None
            param.grad.mul_(factor)

        model.fc1.weight.register_post_accumulate_grad_hook(hook)

    return register


def test_gradient_changed_after_the_worker_read_it_is_reduced_again(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    records, refs, reused = train(receiver, monkeypatch, "1", micro=1,
                                  after_backward=slow_in_place(3.0))
    fc1 = models.LAYERS.index("fc1")
    for rec, ref in zip(records, refs, strict=True):
        assert_norms(rec, ref)  # ref: the gradient after the user's hook tripled fc1's
    assert reused > 0  # the other tensors' norms came from the worker
    # the tripled layer is far from what the worker read first
    plain, _, _ = train(receiver, monkeypatch, "1", micro=1)
    for rec, untouched in zip(records, plain, strict=True):
        got, before = rec["layer_grad_norms"][fc1], untouched["layer_grad_norms"][fc1]
        assert got > 2 * before


def test_replaced_gradient_is_reduced_again(receiver: Receiver,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def register(model: torch.nn.Module) -> None:
        def hook(param: torch.Tensor) -> None:
            time.sleep(0.02)
            assert param.grad is not None
            param.grad = param.grad * 0.5  # a new tensor, version 0 like a fresh gradient

        model.fc2.weight.register_post_accumulate_grad_hook(hook)

    records, refs, _ = train(receiver, monkeypatch, "1", micro=1, after_backward=register)
    for rec, ref in zip(records, refs, strict=True):
        assert_norms(rec, ref)


def test_nonfinite_gradients_through_the_worker(receiver: Receiver,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(overlap.ENV, "1")
    model, opt = models.make(seed=3)
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        assert mon._worker is not None
        for value in (math.nan, math.inf):
            models.loss_of(model, seed=1).backward()
            time.sleep(0.05)  # let the worker read everything; the nan below comes after
            opt.zero_grad()
            poisoned = models.loss_of(model, seed=1)
            handle = model.fc1.weight.register_hook(
                lambda g, v=value: torch.full_like(g, v))  # a whole non-finite gradient
            poisoned.backward()
            handle.remove()
            opt.zero_grad()
            mon.log()
        assert mon.flush(timeout=5)
    fc1 = models.LAYERS.index("fc1")
    nan_step, inf_step = receiver.steps
    assert nan_step["grad_norm"] == "NaN" and nan_step["layer_grad_norms"][fc1] == "NaN"
    assert inf_step["grad_norm"] == "Infinity"
    for rec in (nan_step, inf_step):
        assert rec["layer_nonfinite"] == [int(i == fc1) for i in range(len(models.LAYERS))]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_create_graph_backward_through_the_worker(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(overlap.ENV, "1")
    model, opt = models.make(seed=6)
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        assert mon._worker is not None
        settle_before_embedding(model, mon._worker)
        models.loss_of(model, seed=2).backward(create_graph=True)
        grads = models.snapshot(model)
        opt.step()
        mon.log()
        assert mon.flush(timeout=5)
        assert mon.stats["errors"] == 0 and mon._norms.reused > 0
        opt.zero_grad(set_to_none=True)
    (rec,) = receiver.steps
    assert_norms(rec, models.reference_norms(model, grads))


def test_a_stuck_worker_is_not_waited_for_and_is_given_up(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(overlap.ENV, "1")
    monkeypatch.setattr(overlap, "MAX_MISSES", 2)
    model, opt = models.make(seed=7)
    refs = []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        worker = mon._worker
        assert worker is not None
        settling = settle_before_embedding(model, worker)
        for step in range(5):
            if step == 1:  # the worker is stuck in a batch (descheduled, say) for two passes
                settling.remove()
                worker._busy.acquire()
            loss = models.loss_of(model, seed=step)
            start = time.perf_counter()
            loss.backward()
            assert time.perf_counter() - start < 1  # not waited for (2 ms per pass)
            if step == 1:
                assert not worker.failed and worker.handles
            if step == 2:
                worker._busy.release()
                assert worker.failed and not worker.handles
            refs.append(models.reference_norms(model, models.snapshot(model)))
            opt.step()
            opt.zero_grad()
            mon.log()
        assert mon.flush(timeout=5)
        assert mon._norms.reused > 0  # step 0, before it got stuck
    assert any("norm worker" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    for rec, ref in zip(receiver.steps, refs, strict=True):
        assert_norms(rec, ref)


def test_worker_thread_stops_at_close(receiver: Receiver,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(overlap.ENV, "1")
    model, opt = models.make()
    mon = client_hooks.watch(model, opt, server=receiver.url, flush_interval=60)
    worker = mon._worker
    assert worker is not None and worker._thread.is_alive()
    models.loss_of(model).backward()
    mon.close()
    worker._thread.join(timeout=5)
    assert not worker._thread.is_alive()
    assert not any(t.name == "gradsentry-norms" and t is worker._thread
                   for t in threading.enumerate())


def test_when_the_worker_is_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overlap, "MIN_NUMEL", 16384)
    small = [torch.nn.Parameter(torch.zeros(100))]
    big = [torch.nn.Parameter(torch.zeros(16384)), *small]
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        assert not overlap.wanted(big, "auto")  # every core busy with torch
        assert overlap.wanted(big, "1")  # forced
        if cores > 1:
            torch.set_num_threads(cores - 1)
            assert overlap.wanted(big, "auto")
            assert not overlap.wanted(big, "0")
            assert not overlap.wanted(small, "auto")  # nothing large enough to overlap
    finally:
        torch.set_num_threads(threads)
