"""Every K-th step carries per-layer weight and update norms equal to brute force; lrs per group.

Each test runs with everything on the training thread and again with the K-th step work on the
norm worker's parameter thread (``norm_thread`` fixture, client_hooks/param_overlap.py).
The references are computed by the test from its own copies of the weights, in float64.
Weight norms are checked to 1e-5 relative like the gradient norms. Update norms too: the client
subtracts in float32, which is exact where an entry moved by at most half its value (Sterbenz's
lemma; an Adam step of lr <= 1e-2 on weights of order 0.1-1 moves far less than that, and even
where it does not the difference is correctly rounded, 6e-8 relative), then sums squares in
float64 like the gradient norms: the only other error is the float32 norm of each tensor and
the float32 wire value, ~1e-7 relative each.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import client_hooks
from client_hooks import param_overlap
from client_hooks.norms import LayerNorms
from tests.client import models
from tests.client.receiver import Receiver

RTOL = 1e-5
PARAM_FIELDS = ("layer_param_norms", "layer_update_norms")


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """float64 copies of every weight, by every name it has (tied ones twice)."""
    return {name: p.detach().double().clone()
            for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def layer_vector(ref: dict[str, float]) -> list[float]:
    return [ref[layer] for layer in models.LAYERS]


def assert_close_vec(got: Any, want: list[float], what: str) -> None:
    assert isinstance(got, list) and len(got) == len(want), f"{what}: {got!r}"
    for layer, g, w in zip(models.LAYERS, got, want, strict=True):
        assert isinstance(g, float), f"{what} {layer}: {g!r} is not a finite wire float"
        assert abs(g - w) <= RTOL * abs(w), f"{what} {layer}: got {g}, want {w}"


def two_group_adam(model: models.TinyLM) -> torch.optim.Optimizer:
    fc = [p for n, p in model.named_parameters() if n.startswith(("fc1.", "fc2."))]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("fc1.", "fc2."))]
    return torch.optim.Adam([{"params": rest, "lr": 1e-2}, {"params": fc, "lr": 3e-3}])


def assert_thread_did_the_work(mon: client_hooks.Monitor, norm_thread: str) -> None:
    po = mon._param_overlap
    if norm_thread == "0":
        assert po is None
        return
    assert po is not None
    by_thread, by_caller = po.tasks
    assert by_thread > 0 and by_caller == 0


def test_every_kth_step_reports_weight_and_update_norms(receiver: Receiver,
                                                        norm_thread: str) -> None:
    torch.manual_seed(0)
    model = models.TinyLM()
    opt = two_group_adam(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 ** i)
    refs: list[tuple[dict[str, float], dict[str, float], dict[str, float]]] = []
    lrs: list[list[float]] = []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60,
                            param_every=2) as mon:
        for i in range(5):
            models.loss_of(model, seed=i).backward()
            before = weights(model)
            lrs.append([g["lr"] for g in opt.param_groups])
            opt.step()
            opt.zero_grad()
            sched.step()  # moves both lrs before log(): the record keeps the step's
            after = weights(model)
            delta = {n: after[n] - before[n] for n in after}
            refs.append((models.reference_norms(model, after),
                         models.reference_norms(model, delta),
                         models.reference_norms(model, before)))
            assert mon.log(loss=0.0) == i
        assert mon.flush(timeout=5)
        assert mon.stats["errors"] == 0
        assert_thread_did_the_work(mon, norm_thread)
        if mon._param_overlap is not None:  # steps 2 and 4 were reduced after log()
            assert mon._param_overlap.update_async is True

    records = receiver.steps
    assert [r["step"] for r in records] == list(range(5))
    for rec, (w_after, update, w_before), lr in zip(records, refs, lrs, strict=True):
        step = rec["step"]
        assert rec["lrs"] == lr and rec["lr"] == lr[0], step
        assert lr[0] != lr[1]
        if step % 2:
            assert not set(PARAM_FIELDS) & set(rec), f"step {step} is not a K-th step"
            continue
        assert_close_vec(rec["layer_param_norms"], layer_vector(w_after), f"step {step} |w|")
        assert_close_vec(rec["layer_update_norms"], layer_vector(update), f"step {step} |dw|")
        assert all(u > 0 for u in rec["layer_update_norms"])
        # The weights measured are those after the step: the ones before would not pass.
        assert any(abs(got - want) > RTOL * want for got, want in
                   zip(rec["layer_param_norms"], layer_vector(w_before), strict=True))
        # Keys of a K-th step record, in wire order (layer vectors before lrs and scalars).
        assert list(rec)[-3:] == ["layer_param_norms", "layer_update_norms", "lrs"]


def test_tensor_learning_rates_of_every_group(receiver: Receiver, norm_thread: str) -> None:
    torch.manual_seed(1)
    model = models.TinyLM()
    fc = [p for n, p in model.named_parameters() if n.startswith("fc")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("fc")]
    lr0 = torch.tensor(0.25)
    opt = torch.optim.SGD([{"params": rest, "lr": lr0}, {"params": fc, "lr": 0.125}],
                          momentum=0.9)
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60,
                            param_every=1) as mon:
        for i in range(3):
            before = weights(model)
            models.loss_of(model, seed=i).backward()
            opt.step()
            opt.zero_grad()
            lr0.mul_(0.5)  # in place, before log(): the record keeps the step's value
            opt.param_groups[1]["lr"] /= 2
            update = {n: w - before[n] for n, w in weights(model).items()}
            mon.log()
            assert_close_vec(_last_update(mon, receiver),
                             layer_vector(models.reference_norms(model, update)), f"step {i}")
        assert_thread_did_the_work(mon, norm_thread)
    assert [r["lrs"] for r in receiver.steps] == [[0.25, 0.125], [0.125, 0.0625],
                                                  [0.0625, 0.03125]]
    assert [r["lr"] for r in receiver.steps] == [0.25, 0.125, 0.0625]


def _last_update(mon: client_hooks.Monitor, receiver: Receiver) -> Any:
    assert mon.flush(timeout=5)
    return receiver.steps[-1]["layer_update_norms"]


@pytest.mark.parametrize(("every", "copies"), [(0, 0), (3, 3)])
def test_weights_are_copied_only_on_kth_steps(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, every: int, copies: int,
    norm_thread: str,
) -> None:
    calls: list[int] = []
    original = LayerNorms.snapshot

    def counting(self: LayerNorms) -> list[torch.Tensor]:
        calls.append(1)
        return original(self)

    class CountedCopy(param_overlap._Copy):  # the thread's copies
        def __init__(self, *args: Any) -> None:
            calls.append(2)
            super().__init__(*args)

    monkeypatch.setattr(LayerNorms, "snapshot", counting)
    monkeypatch.setattr(param_overlap, "_Copy", CountedCopy)
    model, opt = models.make(seed=3)  # one param group: no lrs
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60,
                            param_every=every) as mon:
        for i in range(7):
            models.loss_of(model, seed=i).backward()
            opt.step()
            opt.zero_grad()
            mon.log()
        assert mon.flush(timeout=5)
    assert len(calls) == copies
    assert set(calls) <= {1 if norm_thread == "0" else 2}  # the thread copied on its path
    with_params = [r["step"] for r in receiver.steps if "layer_param_norms" in r]
    assert with_params == ([0, 3, 6] if every else [])
    assert all("lrs" not in r for r in receiver.steps)
    for rec in receiver.steps:
        if "layer_param_norms" in rec:
            assert all(math.isfinite(v) and v > 0 for v in rec["layer_param_norms"])


def test_param_every_must_be_a_non_negative_int() -> None:
    model, opt = models.make()
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="param_every"):
            client_hooks.watch(model, opt, server=None, param_every=bad)  # type: ignore[arg-type]
