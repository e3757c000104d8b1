"""clip_coef = post-clip / pre-clip total norm, and micro_batches counts accumulated backwards."""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint

import client_hooks
from tests.client import models
from tests.client.receiver import Receiver
from tests.client.test_norms import assert_close, assert_norms


def test_clip_coef_is_post_over_pre_clip_total(receiver: Receiver) -> None:
    model, opt = models.make(seed=5)
    max_norms = [0.05, 1e9, 0.2, 1e9]  # clipped, not clipped, clipped, not clipped
    refs, coefs = [], []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        for i, max_norm in enumerate(max_norms):
            models.loss_of(model, seed=i).backward()
            refs.append(models.reference_norms(model, models.snapshot(model)))
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            post = models.reference_norms(model, models.snapshot(model))[""]
            coefs.append(post / refs[-1][""])
            opt.step()
            opt.zero_grad()
            mon.log()
        assert mon.flush(timeout=5)
    records = receiver.steps
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for rec, ref, coef, max_norm in zip(records, refs, coefs, max_norms, strict=True):
        assert_norms(rec, ref)  # still the pre-clip gradient
        assert rec["micro_batches"] == 1
        if max_norm > 1e6:
            assert rec["clip_coef"] == 1.0  # exactly: same kernels on the same gradient
        else:
            assert_close(rec["clip_coef"], coef, f"step {rec['step']} clip_coef")
            # and it is the factor clip_grad_norm_ itself applied
            assert_close(rec["clip_coef"], max_norm / (ref[""] + 1e-6), "vs clip formula")
            assert rec["clip_coef"] < 0.9


def test_micro_batches_counts_accumulated_backward_passes(receiver: Receiver) -> None:
    model, opt = models.make(seed=6)
    plan = [3, 1, 2]
    refs = []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        for step, micro in enumerate(plan):
            for k in range(micro):
                (models.loss_of(model, seed=10 * step + k) / micro).backward()
            refs.append(models.reference_norms(model, models.snapshot(model)))
            opt.step()
            opt.zero_grad()
            mon.log()
        assert mon.flush(timeout=5)
    records = receiver.steps
    assert [r["micro_batches"] for r in records] == plan
    for rec, ref in zip(records, refs, strict=True):
        assert_norms(rec, ref)
        assert rec["clip_coef"] == 1.0 and "overflow" not in rec and "loss_scale" not in rec


class _Checkpointed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.utils.checkpoint.checkpoint(self.a, x, use_reentrant=True)
        x = self.b(x)
        x = torch.utils.checkpoint.checkpoint(self.c, x, use_reentrant=True)
        return x.square().sum()


def test_reentrant_checkpoint_backward_is_not_a_micro_batch(receiver: Receiver) -> None:
    # A reentrant checkpoint runs an inner backward from inside the outer one, before and
    # after hooks of the outer pass have fired: still one pass, measured once, at its end.
    torch.manual_seed(13)
    model = _Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        for _ in range(2):
            model(torch.randn(3, 4, requires_grad=True)).backward()
        want = math.sqrt(sum(float(p.grad.double().square().sum())  # type: ignore[union-attr]
                             for p in model.parameters()))
        opt.step()
        mon.log()
        assert mon.flush(timeout=5)
    (rec,) = receiver.steps
    assert rec["micro_batches"] == 2
    assert_close(rec["grad_norm"], want, "total")


def test_clip_coef_without_clipping_and_with_manual_scaling(receiver: Receiver) -> None:
    """No clipping call: 1.0 without a second read of the gradients; an in-place rescale of
    the gradients by the user is still seen (it bumps their version counters)."""
    model, opt = models.make(seed=9)
    reads: list[int] = []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        total = mon._norms.total

        def counting_total(*args: object, **kwargs: object) -> torch.Tensor:
            reads.append(1)
            return total(*args, **kwargs)  # type: ignore[arg-type]

        mon._norms.total = counting_total  # type: ignore[method-assign]
        for i, factor in enumerate([None, 0.5, None]):
            models.loss_of(model, seed=i).backward()
            if factor is not None:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(factor)
            opt.step()
            opt.zero_grad()
            mon.log()
        assert mon.flush(timeout=5)
    coefs = [r["clip_coef"] for r in receiver.steps]
    assert coefs[0] == 1.0 and coefs[2] == 1.0
    assert math.isclose(coefs[1], 0.5, rel_tol=1e-6)
    assert len(reads) == 1  # only the step whose gradients changed was read again


def test_clip_coef_with_a_closure_that_clips_inside_step(receiver: Receiver) -> None:
    # step(closure) runs backward and clipping inside the step, after the step pre-hook
    # (Lightning does this): the coefficient must still be post-clip / pre-clip.
    model, opt = models.make(seed=9)
    refs, posts = [], []
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        for i, max_norm in enumerate([0.05, 1e9]):
            def closure(i: int = i, max_norm: float = max_norm) -> torch.Tensor:
                opt.zero_grad()
                loss = models.loss_of(model, seed=i)
                loss.backward()
                refs.append(models.reference_norms(model, models.snapshot(model)))
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                posts.append(models.reference_norms(model, models.snapshot(model))[""])
                return loss

            opt.step(closure)
            mon.log()
        assert mon.flush(timeout=5)
    clipped, unclipped = receiver.steps
    assert_norms(clipped, refs[0])
    assert_close(clipped["clip_coef"], posts[0] / refs[0][""], "clipped step")
    assert clipped["clip_coef"] < 0.9
    assert_norms(unclipped, refs[1])
    assert unclipped["clip_coef"] == 1.0
