"""AMP with torch.amp.GradScaler: norms reported unscaled, overflowed steps flagged, not normed."""

from __future__ import annotations

import math

import torch

import client_hooks
from tests.client import models
from tests.client.receiver import Receiver
from tests.client.test_norms import assert_close, assert_norms

INIT_SCALE = 2.0**10


def test_grad_scaler_unscaled_norms_loss_scale_and_overflow(receiver: Receiver) -> None:
    # fp16 autocast on CPU: activations in half precision, gradients of the float32 weights in
    # float32. The reference is the scaler's own unscale_ (multiply by 1/scale, a power of two:
    # exact), so the float32 tolerance 1e-5 holds.
    model, opt = models.make(seed=8)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    poison = {2}  # step whose gradient gets an Inf: the scaler must skip it

    def inject(grad: torch.Tensor) -> torch.Tensor:
        if step in poison:
            grad = grad.clone()
            grad.view(-1)[0] = math.inf
        return grad

    model.fc1.weight.register_hook(inject)
    refs: list[dict[str, float] | None] = []
    coefs, scales = [], []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60,
                            scaler=scaler) as mon:
        for step in range(5):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = models.loss_of(model, seed=step)
            scaler.scale(loss).backward()
            scales.append(float(scaler._scale))  # type: ignore[arg-type]
            scaler.unscale_(opt)
            ref = models.reference_norms(model, models.snapshot(model))
            refs.append(None if step in poison else ref)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            coefs.append(models.reference_norms(model, models.snapshot(model))[""] / ref[""])
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            assert mon.log(loss=loss) == step
        assert mon.flush(timeout=5)
        assert mon.stats["overflow"] == 1 and mon.stats["errors"] == 0
    assert scales == [INIT_SCALE] * 3 + [INIT_SCALE / 2] * 2  # the skip backed the scale off
    records = receiver.steps
    assert [r["step"] for r in records] == list(range(5))
    for rec, ref, coef, scale in zip(records, refs, coefs, scales, strict=True):
        assert rec["loss_scale"] == scale
        assert rec["micro_batches"] == 1 and isinstance(rec["loss"], float)
        if ref is None:
            assert rec["overflow"] is True
            assert not {"grad_norm", "layer_grad_norms", "clip_coef"} & set(rec)
            continue
        assert rec["overflow"] is False
        assert_norms(rec, ref)
        assert rec["grad_norm"] < 1e3  # scaled norms would be ~1000x larger
        assert_close(rec["clip_coef"], coef, f"step {rec['step']} clip_coef")


def test_scaler_without_unscale_call(receiver: Receiver) -> None:
    # No explicit unscale_: scaler.step() unscales; norms are still unscaled, no clip → 1.0.
    model, opt = models.make(seed=9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60,
                            scaler=scaler) as mon:
        scaler.scale(models.loss_of(model, seed=1)).backward()
        grads = models.snapshot(model)
        ref = models.reference_norms(model, {k: g / 2.0**16 for k, g in grads.items()})
        scaler.step(opt)
        scaler.update()
        mon.log()
        assert mon.flush(timeout=5)
    (rec,) = receiver.steps
    assert_norms(rec, ref)
    assert rec["clip_coef"] == 1.0 and rec["loss_scale"] == 2.0**16 and rec["overflow"] is False


def test_fused_optimizer_overflow_decided_on_the_device(receiver: Receiver) -> None:
    # A fused optimizer (_step_supports_amp_scaling) is always stepped by the scaler, which
    # hands it grad_scale/found_inf device tensors and lets it skip inside the kernel: the
    # optimizer hooks fire, so the overflow is read from found_inf by the sender thread.
    torch.manual_seed(10)
    model = models.TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    assert getattr(opt, "_step_supports_amp_scaling", False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    poison = 1

    def inject(grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf if step == poison else grad

    model.fc2.weight.register_hook(inject)
    refs = []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60,
                            scaler=scaler) as mon:
        for step in range(3):
            scaler.scale(models.loss_of(model, seed=step)).backward()
            scale = float(scaler._scale)  # type: ignore[arg-type]
            refs.append(models.reference_norms(
                model, {k: g / scale for k, g in models.snapshot(model).items()}))
            scaler.step(opt)  # no unscale_ call: the fused kernel unscales
            scaler.update()
            opt.zero_grad()
            mon.log()
        assert mon.flush(timeout=5)
        assert mon.stats["overflow"] == 1
    ok0, bad, ok2 = receiver.steps
    assert [r["step"] for r in (ok0, bad, ok2)] == [0, 1, 2]
    assert bad["overflow"] is True and bad["loss_scale"] == 2.0**6
    assert not {"grad_norm", "layer_grad_norms", "clip_coef"} & set(bad)
    for rec, ref in ((ok0, refs[0]), (ok2, refs[2])):
        assert rec["overflow"] is False
        assert_norms(rec, ref)
        assert rec["clip_coef"] == 1.0  # post total divided by the optimizer's grad_scale
    assert ok2["loss_scale"] == 2.0**5
