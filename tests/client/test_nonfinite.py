"""NaN and Inf are data: they reach the collector as wire strings, counted per layer."""

from __future__ import annotations

import math

import torch

import client_hooks
from client_hooks import wire
from tests.client import models
from tests.client.receiver import Receiver


def test_nan_and_inf_arrive_as_wire_strings_with_layer_counts(receiver: Receiver) -> None:
    model, opt = models.make(seed=3)
    bad_entry: dict[str, float] = {}

    def inject(name: str, grad: torch.Tensor) -> torch.Tensor:
        if name not in bad_entry:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = bad_entry.pop(name)
        return grad

    model.fc1.weight.register_hook(lambda g: inject("fc1", g))
    model.fc2.bias.register_hook(lambda g: inject("fc2", g))
    refs = []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        for step, (layer, value) in enumerate([(None, 0.0), ("fc1", math.nan),
                                               ("fc2", -math.inf)]):
            if layer:
                bad_entry[layer] = value
            loss = models.loss_of(model, seed=step)
            loss.backward()
            refs.append(models.reference_norms(model, models.snapshot(model)))
            for p in model.parameters():  # a "skip non-finite" guard keeps the weights finite
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            opt.step()
            opt.zero_grad()
            mon.log(loss=loss if step != 1 else loss + math.inf)
        assert mon.flush(timeout=5)

    ok, nan_step, inf_step = receiver.steps  # raw JSON, as the collector reads it
    assert ok["nonfinite"] == 0 and isinstance(ok["loss"], float)

    fc1, fc2 = models.LAYERS.index("fc1"), models.LAYERS.index("fc2")
    assert nan_step["loss"] == "Infinity"
    assert nan_step["grad_norm"] == "NaN"
    assert nan_step["layer_grad_norms"][fc1] == "NaN"
    assert nan_step["nonfinite"] == 1
    assert nan_step["layer_nonfinite"] == [int(i == fc1) for i in range(len(models.LAYERS))]

    assert inf_step["grad_norm"] == "Infinity"  # |-inf| : norms are never negative
    assert inf_step["layer_grad_norms"][fc2] == "Infinity"
    assert inf_step["layer_nonfinite"] == [int(i == fc2) for i in range(len(models.LAYERS))]

    for rec, ref, bad in ((nan_step, refs[1], fc1), (inf_step, refs[2], fc2)):
        for i, layer in enumerate(models.LAYERS):
            if i != bad:  # the other layers are still measured exactly
                got = wire.decode_float(rec["layer_grad_norms"][i])
                assert got is not None and abs(got - ref[layer]) <= 1e-5 * ref[layer]
