"""The K-th step weight copy and weight/update norms on the norm worker's parameter thread
(client_hooks/param_overlap.py): the same values as on the training thread, bit for bit, in
the loops that change weights outside ``optimizer.step()`` too, and no read of the weights
outside a forward pass."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import client_hooks
from client_hooks import param_overlap
from client_hooks.norms import LayerNorms
from client_hooks.param_overlap import Late, ParamOverlap
from tests.client import models
from tests.client.conftest import thread_idle, use_norm_thread
from tests.client.receiver import Receiver
from tests.client.test_params import (
    PARAM_FIELDS,
    assert_close_vec,
    layer_vector,
    two_group_adam,
    weights,
)

Hook = Callable[[nn.Module, int], None]


def train(receiver: Receiver, monkeypatch: pytest.MonkeyPatch, setting: str, *,
          steps: int = 6, every: int = 1, micro: int = 2, before_step: Hook | None = None,
          after_step: Hook | None = None) -> tuple[list[dict[str, Any]], list[Any], Any]:
    """Records, brute-force (weights after the step, update) per step, and the parameter
    thread's state, of a two-group Adam run with gradient accumulation and an evaluation
    forward pass before each step. ``before_step`` runs after the backward passes,
    ``after_step`` right after ``optimizer.step()`` (both may change the weights)."""
    use_norm_thread(monkeypatch, setting)
    torch.manual_seed(0)
    model = models.TinyLM()
    opt = two_group_adam(model)
    first = len(receiver.steps)
    refs = []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60,
                            param_every=every) as mon:
        assert (mon._param_overlap is not None) == (setting == "1")
        for i in range(steps):
            for k in range(micro):
                (models.loss_of(model, seed=10 * i + k) / micro).backward()
            with torch.no_grad():
                models.loss_of(model, seed=99)  # evaluation: a forward pass, no backward
            if before_step is not None:
                before_step(model, i)
            before = weights(model)
            opt.step()
            after = weights(model)
            opt.zero_grad()
            if after_step is not None:
                after_step(model, i)
            mon.log()
            refs.append((models.reference_norms(model, after), models.reference_norms(
                model, {n: w - before[n] for n, w in after.items()})))
        assert mon.flush(timeout=5)
        assert mon.stats["errors"] == 0
        po = mon._param_overlap
        state = None if po is None else (po.update_async, po.copy_async, po.tasks)
    return receiver.steps[first:], refs, state


def assert_params(records: list[dict[str, Any]], refs: list[Any], every: int,
                  missing: tuple[int, ...] = ()) -> None:
    assert [r["step"] for r in records] == list(range(len(refs)))
    for rec, (w, u) in zip(records, refs, strict=True):
        step = rec["step"]
        if step % every or step in missing:
            assert not set(PARAM_FIELDS) & set(rec), step
            continue
        assert_close_vec(rec["layer_param_norms"], layer_vector(w), f"step {step} |w|")
        assert_close_vec(rec["layer_update_norms"], layer_vector(u), f"step {step} |dw|")


def assert_same_params(a: list[dict[str, Any]], b: list[dict[str, Any]],
                       skip: tuple[int, ...] = ()) -> None:
    for x, y in zip(a, b, strict=True):
        if x["step"] not in skip:
            assert [x.get(f) for f in PARAM_FIELDS] == [y.get(f) for f in PARAM_FIELDS], x["step"]


@pytest.mark.parametrize("every", [1, 2])
def test_thread_values_equal_training_thread_values(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch, every: int) -> None:
    threaded, refs, state = train(receiver, monkeypatch, "1", every=every)
    plain, refs_plain, _ = train(receiver, monkeypatch, "0", every=every)
    assert refs == refs_plain
    assert_params(threaded, refs, every)
    assert_same_params(threaded, plain)  # bit-equal on the wire
    update_async, copy_async, (by_thread, by_caller) = state
    assert update_async is True and copy_async is True
    assert by_thread > 0 and by_caller == 0


def test_thread_path_is_bit_equal_on_large_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tensors past the kernels' parallel grain, several per chunk, and a bf16 group (norms
    # taken in float32), straight against LayerNorms' own copy and reduction.
    monkeypatch.setattr(param_overlap, "CHUNK_BYTES", 3 << 20)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512),
                          nn.LayerNorm(512), nn.Linear(256, 256).to(torch.bfloat16))
    norms = LayerNorms(model.named_parameters())
    po = ParamOverlap(norms)
    po.update_async = True  # as after a probe that found no change after the step
    try:
        assert len(po._chunks_of()) < len(norms.params) - 1
        mine = norms.snapshot()
        po.forward_pre(0, want_copy=True)
        thread_idle(po)
        po.forward_end()
        theirs = po.take_copy(0)
        assert theirs is not None and all(
            torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
        with torch.no_grad():  # the optimizer step
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        want = norms.param_update_norms(mine).tolist()
        late = po.after_step(theirs)
        assert isinstance(late, Late) and not late.done  # nothing read before a forward
        po.forward_pre(1, want_copy=False)
        thread_idle(po)
        po.forward_end()
        assert late.done and late.result() == want
        assert po.tasks[0] > 0 and po.tasks[1] == 0
    finally:
        po.close()


def test_thread_never_reads_weights_outside_a_forward_pass(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    # After each step the loop fills the weights with garbage through .data (no version
    # bump, so nothing can see it) for a while, then puts them back exactly. A thread that
    # read the weights then would report the garbage.
    def garbage_then_restore(model: nn.Module, step: int) -> None:
        params = list(model.parameters())
        saved = [p.detach().clone() for p in params]
        for p in params:
            p.data.fill_(1e3)
        time.sleep(0.05)
        for p, s in zip(params, saved, strict=True):
            p.data.copy_(s)

    threaded, refs, state = train(receiver, monkeypatch, "1", steps=4,
                                  after_step=garbage_then_restore)
    assert state[0] is True  # the probe saw no version change: steps 1-3 went to the thread
    assert_params(threaded, refs, 1)


def test_weights_changed_in_place_after_every_step(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # A max-norm constraint after each step: the first K-th step (reduced on the training
    # thread) shows it, and the run keeps the training-thread path: nothing lost or changed.
    def clamp(model: nn.Module, step: int) -> None:
        with torch.no_grad():
            model.fc1.weight.clamp_(-0.05, 0.05)

    caplog.set_level(logging.INFO, logger="client_hooks")
    threaded, refs, state = train(receiver, monkeypatch, "1", after_step=clamp)
    plain, _, _ = train(receiver, monkeypatch, "0", after_step=clamp)
    assert state[0] is False
    assert_params(threaded, refs, 1)  # the weights right after the step, before the clamp
    assert_same_params(threaded, plain)
    assert any("changes weights after optimizer.step()" in r.getMessage()
               for r in caplog.records)


def test_weights_changed_once_after_a_later_step(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    # The probe saw an ordinary loop; at step 3 it changes weights (a load_state_dict, say)
    # before the thread could read them: that step goes without param norms, never with
    # wrong ones, and the later steps are taken on the training thread.
    def reload_at_3(model: nn.Module, step: int) -> None:
        if step == 3:
            with torch.no_grad():
                model.fc2.bias.zero_()

    threaded, refs, state = train(receiver, monkeypatch, "1", after_step=reload_at_3)
    plain, _, _ = train(receiver, monkeypatch, "0", after_step=reload_at_3)
    assert state[0] is False
    assert_params(threaded, refs, 1, missing=(3,))
    assert_same_params(threaded, plain, skip=(3,))
    assert "layer_param_norms" in plain[3]


def test_weights_changed_in_place_before_the_step(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    # A hand-written weight decay between backward and step: the thread's copy (taken in the
    # forward pass) is stale for those tensors; they are copied again at the step.
    def decay(model: nn.Module, step: int) -> None:
        with torch.no_grad():
            for p in (model.fc1.weight, model.emb.weight):
                p.mul_(0.9)

    threaded, refs, state = train(receiver, monkeypatch, "1", before_step=decay)
    plain, _, _ = train(receiver, monkeypatch, "0", before_step=decay)
    update_async, copy_async, _ = state
    assert update_async is True and copy_async is False
    assert_params(threaded, refs, 1)  # the update of the step alone, not the decay
    assert_same_params(threaded, plain)


def test_a_skipped_amp_step_then_the_next_kth_step(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(setting: str) -> tuple[list[dict[str, Any]], list[Any], Any]:
        use_norm_thread(monkeypatch, setting)
        model, opt = models.make(seed=8)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

        def inject(grad: torch.Tensor) -> torch.Tensor:
            return torch.full_like(grad, math.inf) if step == 2 else grad

        model.fc1.weight.register_hook(inject)
        first = len(receiver.steps)
        refs = []
        with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60,
                                scaler=scaler, param_every=2) as mon:
            for step in range(6):
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = models.loss_of(model, seed=step)
                scaler.scale(loss).backward()
                before = weights(model)
                scaler.step(opt)  # skipped at step 2: no optimizer hook runs
                scaler.update()
                after = weights(model)
                opt.zero_grad()
                mon.log()
                refs.append((models.reference_norms(model, after), models.reference_norms(
                    model, {n: w - before[n] for n, w in after.items()})))
            assert mon.flush(timeout=5)
            assert mon.stats["overflow"] == 1 and mon.stats["errors"] == 0
        return receiver.steps[first:], refs, mon._param_overlap

    threaded, refs, po = run("1")
    plain, _, _ = run("0")
    assert threaded[2]["overflow"] is True
    assert_params(threaded, refs, 2, missing=(2,))
    assert_same_params(threaded, plain)
    assert po is not None and po.update_async is True and po.tasks[0] > 0


def test_step_with_a_closure(receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
                             norm_thread: str) -> None:
    # step(closure) (Lightning's way) runs the forward pass inside the step, after the
    # pre-hook, so no forward pass comes between a step and the next pre-hook: the copy and
    # the norms are both taken on the training thread there, and stay exact.
    model, opt = models.make(seed=4)
    refs = []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60,
                            param_every=1) as mon:
        for i in range(4):
            def closure(i: int = i) -> torch.Tensor:
                opt.zero_grad()
                loss = models.loss_of(model, seed=i)
                loss.backward()
                return loss

            before = weights(model)
            opt.step(closure)
            after = weights(model)
            mon.log()
            refs.append((models.reference_norms(model, after), models.reference_norms(
                model, {n: w - before[n] for n, w in after.items()})))
        assert mon.flush(timeout=5)
        assert mon.stats["errors"] == 0
        if norm_thread == "1":
            assert mon._param_overlap is not None and mon._param_overlap.tasks == (0, 0)
    assert_params(receiver.steps, refs, 1)


@pytest.mark.parametrize("end", ["close", "flush"])
def test_norms_of_the_last_step_without_a_forward_pass(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch, end: str) -> None:
    use_norm_thread(monkeypatch, "1")
    model, opt = models.make(seed=9)
    mon = client_hooks.watch(model, opt, server=receiver.url, flush_interval=60, param_every=1)
    for i in range(3):
        models.loss_of(model, seed=i).backward()
        before = weights(model)
        opt.step()
        after = weights(model)
        opt.zero_grad()
        mon.log()
    # step 2's norms wait for a forward pass that never comes
    assert mon._param_overlap is not None and mon._param_overlap._update is not None
    if end == "flush":
        assert mon.flush(timeout=5)
    mon.close()
    update = {n: w - before[n] for n, w in after.items()}
    assert [r["step"] for r in receiver.steps] == [0, 1, 2]
    last = receiver.steps[2]
    assert_close_vec(last["layer_param_norms"],
                     layer_vector(models.reference_norms(model, after)), "|w|")
    assert_close_vec(last["layer_update_norms"],
                     layer_vector(models.reference_norms(model, update)), "|dw|")


def test_close_between_forward_and_step(receiver: Receiver,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    use_norm_thread(monkeypatch, "1")
    model, opt = models.make(seed=10)
    mon = client_hooks.watch(model, opt, server=receiver.url, flush_interval=60, param_every=1)
    po = mon._param_overlap
    assert po is not None
    models.loss_of(model, seed=0).backward()  # the thread copied the weights
    assert po._copy is not None and po.tasks[0] > 0
    mon.close()
    po.thread.join(timeout=5)
    assert not po.thread.is_alive() and po._copy is None
    opt.step()  # training may go on without the monitor
    assert mon.log() is None


def test_a_copy_of_the_watched_model_does_not_drive_the_thread(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    use_norm_thread(monkeypatch, "1")
    model, opt = models.make(seed=11)
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60,
                            param_every=1) as mon:
        twin = copy.deepcopy(model)  # an EMA copy, say: its hooks are inert
        models.loss_of(twin, seed=0).backward()
        assert mon._param_overlap is not None and mon._param_overlap._copy is None
        models.loss_of(model, seed=0).backward()
        assert mon._param_overlap._copy is not None


def test_late_result_is_waited_for_within_a_bound(caplog: pytest.LogCaptureFixture) -> None:
    late = Late()
    start = time.monotonic()
    assert late.result(timeout=0.05) is None
    assert time.monotonic() - start < 1
    assert any("not computed" in r.getMessage() for r in caplog.records)
    late.set(torch.tensor([1.5, 2.0]))
    assert late.result(timeout=0) == [1.5, 2.0]
    withheld = Late()
    withheld.set(None)
    assert withheld.result(timeout=0) is None
