"""Logging every N steps keeps each window's max, min, mean and non-finite counts (no spike
between two records is lost), checked against norms the test computes itself."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import client_hooks
from tests.client import models
from tests.client.receiver import Receiver
from tests.client.test_norms import assert_close, assert_norms

LAYERS = models.LAYERS


def _train(mon: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int,
           spikes: dict[int, float], log: Any) -> tuple[list[dict[str, float]], list[float]]:
    """``steps`` optimizer steps; at step i the loss is multiplied by ``spikes.get(i, 1)``
    (a bad batch: its gradient scales with it). Returns the reference norms and losses."""
    refs, losses = [], []
    for i in range(steps):
        loss = models.loss_of(model, seed=i) * spikes.get(i, 1.0)
        loss.backward()
        refs.append(models.reference_norms(model, models.snapshot(model)))
        losses.append(float(loss.detach()))
        opt.step()
        opt.zero_grad()
        log(i, loss)
    return refs, losses


def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if math.isfinite(x)]


def assert_window(rec: dict[str, Any], refs: list[dict[str, float]], losses: list[float],
                  first: int) -> None:
    """``rec``'s window covers steps first..rec["step"]; compare with the references."""
    last = rec["step"]
    window = rec["window"]
    assert window["steps"] == last - first + 1
    assert window["first_step"] == first
    span = refs[first:last + 1]
    totals = [r[""] for r in span]
    stats = window["series"]["grad_norm"]
    assert stats["count"] == len(span)
    assert stats["nonfinite"] == len(span) - len(_finite(totals))
    assert_close(stats["max"], max(_finite(totals)), f"window ending {last}: max")
    assert_close(stats["min"], min(_finite(totals)), f"window ending {last}: min")
    mean = sum(_finite(totals)) / len(_finite(totals))
    assert_close(stats["mean"], mean, f"window ending {last}: mean")
    layers = window["layers"]["grad_norm"]
    for j, layer in enumerate(LAYERS):
        values = [r[layer] for r in span]
        assert_close(layers["max"][j], max(values), f"window ending {last}: {layer} max")
        assert_close(layers["min"][j], min(values), f"window ending {last}: {layer} min")
        assert layers["nonfinite"][j] == 0
    loss = window["series"]["loss"]
    assert_close(loss["max"], max(losses[first:last + 1]), f"window ending {last}: loss max")


def test_log_every_keeps_the_spike_between_records(receiver: Receiver) -> None:
    model, opt = models.make(seed=11)
    spikes = {7: 1000.0}  # a step that is not sent on its own
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60,
                            log_every=5) as mon:
        refs, losses = _train(mon, model, opt, 12, spikes, lambda i, loss: mon.log(loss=loss))
        assert mon.flush(timeout=5)
    records = receiver.steps
    # Records at steps 4 and 9, and the partial window's newest step at close.
    assert [r["step"] for r in records] == [4, 9, 11]
    for rec, first in zip(records, [0, 5, 10], strict=True):
        assert_norms(rec, refs[rec["step"]])  # the record's own values: its last step
        assert_window(rec, refs, losses, first)
    spike = records[1]["window"]["series"]["grad_norm"]["max"]
    assert spike > 100 * records[0]["window"]["series"]["grad_norm"]["max"]


def test_sparse_log_calls_keep_the_norms_of_skipped_steps(receiver: Receiver) -> None:
    model, opt = models.make(seed=12)

    def log(i: int, loss: torch.Tensor) -> None:
        if i % 4 == 3:  # a loop that logs every 4th step without telling the client
            mon.log(loss=loss)

    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        refs, _ = _train(mon, model, opt, 8, {5: 300.0}, log)
        assert mon.flush(timeout=5)
    records = receiver.steps
    assert [r["step"] for r in records] == [3, 7]
    for rec, first in zip(records, [0, 4], strict=True):
        assert_norms(rec, refs[rec["step"]])
        window = rec["window"]
        assert window["steps"] == 4 and window["first_step"] == first
        totals = [r[""] for r in refs[first:first + 4]]
        assert_close(window["series"]["grad_norm"]["max"], max(totals), "max")
        assert_close(window["series"]["grad_norm"]["min"], min(totals), "min")
        # the loss was only given at the logged step
        assert window["series"]["loss"]["count"] == 1


class NoUpdate(torch.optim.Optimizer):
    """Steps that change nothing, so a NaN gradient does not poison the weights."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.0})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


def test_window_counts_nonfinite_steps_without_letting_them_in(receiver: Receiver) -> None:
    model, _ = models.make(seed=13)
    opt = NoUpdate(model.parameters())
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60,
                            log_every=4) as mon:
        for i in range(4):
            loss = models.loss_of(model, seed=i)
            if i == 1:
                loss = loss * float("nan")
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.log(loss=loss, attn=float("inf") if i == 2 else float(i))
        assert mon.flush(timeout=5)
    (rec,) = receiver.steps
    window = rec["window"]
    assert window["steps"] == 4
    total = window["series"]["grad_norm"]
    assert total["nonfinite"] == 1 and total["count"] == 4
    assert math.isfinite(total["max"]) and math.isfinite(total["mean"])
    assert window["layers"]["grad_norm"]["nonfinite"] == [1] * len(LAYERS)
    assert window["series"]["loss"]["nonfinite"] == 1
    attn = window["series"]["attn"]
    # float32 on the wire, like every packed value
    assert attn == {"count": 4, "nonfinite": 1, "max": 3.0, "min": 0.0,
                    "mean": pytest.approx(4 / 3, rel=1e-6)}


def test_log_every_must_be_a_positive_int() -> None:
    model, opt = models.make()
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="log_every"):
            client_hooks.watch(model, opt, server=None, log_every=bad)  # type: ignore[arg-type]
