"""The norms a Monitor reports equal brute-force pre-clip norms, step by step."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import client_hooks
from client_hooks import wire
from tests.client import models
from tests.client.receiver import Receiver

RTOL = 1e-5


def assert_close(got: Any, want: float, what: str) -> None:
    assert isinstance(got, float), f"{what}: {got!r} is not a finite wire float"
    assert abs(got - want) <= RTOL * abs(want), f"{what}: got {got}, want {want}"


def assert_norms(record: dict[str, Any], ref: dict[str, float]) -> None:
    step = record["step"]
    assert_close(record["grad_norm"], ref[""], f"step {step} total")
    assert len(record["layer_grad_norms"]) == len(models.LAYERS)
    for layer, got in zip(models.LAYERS, record["layer_grad_norms"], strict=True):
        assert_close(got, ref[layer], f"step {step} layer {layer}")


def test_pre_clip_norms_per_layer_and_total(receiver: Receiver) -> None:
    model, opt = models.make()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    max_norm = 0.05
    refs, losses, lrs, clip_totals = [], [], [], []
    with client_hooks.watch(model, opt, project="tests", run="norms-1", server=receiver.url,
                            token="s3cret", config={"lr": 0.1, "dtype": torch.float32},
                            tags=["unit"], batch_size=4, flush_interval=60) as mon:
        assert mon.layers == models.LAYERS
        for i in range(5):
            loss = models.loss_of(model, seed=i)
            loss.backward()
            grads = models.snapshot(model)
            refs.append(models.reference_norms(model, grads))
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            assert total > 4 * max_norm  # the clip really changes the gradient
            clip_totals.append(float(total))
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            opt.zero_grad()
            sched.step()  # moves the lr before log(): the record must keep the step's lr
            losses.append(loss.item())
            assert mon.log(loss=loss, tokens=4 * models.SEQ, attn_max=loss * 2, epoch=0) == i
        assert mon.flush(timeout=5)
        assert mon.stats == {"enqueued": 5, "sent": 5, "dropped": 0, "failed_batches": 0,
                             "failed_steps": 0, "pending": 0, "errors": 0, "overflow": 0,
                             "spooled": 0, "recovered": 0}

    (run,) = receiver.runs
    assert run == {"id": "norms-1", "project": "tests", "name": "norms-1",
                   "config": {"lr": 0.1, "dtype": "torch.float32"}, "tags": ["unit"],
                   "batch_size": 4, "world_size": 1, "layers": models.LAYERS,
                   "semantics": wire.DEFAULT_SEMANTICS}
    assert {h["Authorization"] for h in receiver.headers} == {"Bearer s3cret"}
    assert [b["wire_version"] for b in receiver.batches] == [wire.WIRE_VERSION]
    records = receiver.steps
    assert [r["step"] for r in records] == list(range(5))
    for rec, ref, loss, lr, clip_total in zip(records, refs, losses, lrs, clip_totals,
                                              strict=True):
        assert_norms(rec, ref)
        assert_close(rec["grad_norm"], clip_total, "total vs clip_grad_norm_")
        assert rec["loss"] == loss  # float32 loss, exactly
        assert rec["lr"] == lr
        assert (rec["batch_size"], rec["samples"]) == (4, 4 * (rec["step"] + 1))
        assert rec["tokens"] == 4 * models.SEQ and isinstance(rec["tokens"], int)
        assert rec["nonfinite"] == 0 and rec["layer_nonfinite"] == [0] * len(models.LAYERS)
        assert rec["scalars"] == {"attn_max": 2 * loss, "epoch": 0}
        # Weight and update norms every param_every (default 10) steps: here step 0 only.
        params = {"layer_param_norms", "layer_update_norms"} if rec["step"] == 0 else set()
        # step_time: from the end of the previous step, so not on the first.
        timed = {"step_time"} if rec["step"] > 0 else set()
        assert 0 < rec.get("step_time", 1) < 60
        assert set(rec) == {*timed, "step", "wall_time", "loss", "lr", "grad_norm", "batch_size",
                            "samples", "tokens", "nonfinite", "layer_grad_norms",
                            "layer_nonfinite", "clip_coef", "micro_batches", "scalars",
                            *params}


def test_tied_weight_counted_once(receiver: Receiver) -> None:
    model, opt = models.make(seed=1)
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        models.loss_of(model, seed=7).backward()
        grads = models.snapshot(model)
        opt.step()
        mon.log()
        assert mon.flush(timeout=5)
    (rec,) = receiver.steps
    ref = models.reference_norms(model, grads)
    assert_norms(rec, ref)
    # Counting emb.weight again as head.weight would give a different total and "head" norm.
    twice = math.sqrt(ref[""] ** 2 + float(torch.linalg.vector_norm(grads["head.weight"])) ** 2)
    assert abs(rec["grad_norm"] - twice) > 1e-3 * twice
    head_bias = float(torch.linalg.vector_norm(grads["head.bias"]))
    assert_close(rec["layer_grad_norms"][models.LAYERS.index("head")], head_bias, "head")


def test_gradient_accumulation_reports_accumulated_gradient(receiver: Receiver) -> None:
    model, opt = models.make(seed=2)
    micro = 4
    refs, last_only = [], []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        for step in range(2):
            for k in range(micro):
                before = models.snapshot(model)
                (models.loss_of(model, seed=10 * step + k) / micro).backward()
            after = models.snapshot(model)
            refs.append(models.reference_norms(model, after))
            delta = {n: g - before.get(n, torch.zeros_like(g)) for n, g in after.items()}
            last_only.append(models.reference_norms(model, delta))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            opt.step()
            opt.zero_grad()
            mon.log(batch_size=micro * 4)
        assert mon.flush(timeout=5)
    records = receiver.steps
    assert [r["step"] for r in records] == [0, 1]
    assert [r["samples"] for r in records] == [16, 32]
    for rec, ref, last in zip(records, refs, last_only, strict=True):
        assert_norms(rec, ref)
        assert abs(rec["grad_norm"] - last[""]) > 1e-2 * last[""]  # not the last micro-batch


def test_log_without_a_step_sends_the_newest_gradient(receiver: Receiver) -> None:
    torch.manual_seed(4)
    model = models.TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.25))  # a tensor lr is packed
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        models.loss_of(model, seed=1).backward()
        opt.step()
        assert mon.log() == 0
        opt.zero_grad()
        models.loss_of(model, seed=2).backward()  # e.g. an AMP-skipped step: no opt.step()
        ref = models.reference_norms(model, models.snapshot(model))
        assert mon.log() == 1  # the current step count, which the next step will reuse
        assert mon.log(step=99) == 99
        assert mon.flush(timeout=5)
    first, second, third = receiver.steps
    assert first["lr"] == second["lr"] == 0.25
    assert_norms(second, ref)
    assert third["step"] == 99 and third["layer_grad_norms"] == second["layer_grad_norms"]


def test_a_watched_model_can_be_deep_copied_and_saved(receiver: Receiver, tmp_path: Any) -> None:
    # EMA copies and torch.save(model) must keep working; the copy must not report.
    import copy

    model, opt = models.make(seed=21)
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        twin = copy.deepcopy(model)
        torch.save(model, tmp_path / "model.pt")
        models.loss_of(twin, seed=0).backward()  # the copy's pass: not ours
        models.loss_of(model, seed=1).backward()
        ref = models.reference_norms(model, models.snapshot(model))
        opt.step()
        opt.zero_grad()
        mon.log()
        assert mon.flush(timeout=5)
    (rec,) = receiver.steps
    assert_norms(rec, ref)
    assert rec["micro_batches"] == 1
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    models.loss_of(loaded, seed=2).backward()  # runs with the inert hook


def test_output_trigger_replaces_the_parameter_hooks(receiver: Receiver) -> None:
    model, opt = models.make(seed=22)
    refs = []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        for step in range(6):
            for k in range(2):  # accumulation: every pass must still be counted
                (models.loss_of(model, seed=10 * step + k) / 2).backward()
            refs.append(models.reference_norms(model, models.snapshot(model)))
            opt.step()
            opt.zero_grad()
            mon.log()
        assert mon._trigger == "output" and not mon._param_handles  # noqa: SLF001
        assert mon.flush(timeout=5)
    records = receiver.steps
    assert [r["micro_batches"] for r in records] == [2] * 6
    for rec, ref in zip(records, refs, strict=True):
        assert_norms(rec, ref)


def test_loop_that_bypasses_the_watched_module_keeps_parameter_hooks(
    receiver: Receiver,
) -> None:
    model, opt = models.make(seed=23)
    wrapper = torch.nn.ModuleDict({"lm": model})  # watched, but never called itself
    refs = []
    with client_hooks.watch(wrapper, opt, server=receiver.url, flush_interval=60) as mon:
        for step in range(5):
            models.loss_of(wrapper["lm"], seed=step).backward()
            refs.append(models.reference_norms(model, models.snapshot(model)))
            opt.step()
            opt.zero_grad()
            mon.log()
        assert mon._trigger == "params"  # noqa: SLF001
        assert mon.flush(timeout=5)
    records = receiver.steps
    assert len(records) == 5
    for rec, ref in zip(records, refs, strict=True):
        assert rec["grad_norm"] == pytest.approx(ref[""], rel=1e-5)
        assert rec["micro_batches"] == 1
