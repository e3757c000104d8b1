"""A small MLP with LayerNorm on a finite dataset: truth from every per-example gradient
(torch.func), estimate from the per-example mode, with and without replacement."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

import client_hooks
from tests.client.receiver import Receiver
from tests.noise import linreg

N, D_IN, HIDDEN, BATCH, STEPS = 96, 8, 16, 64, 600


def _problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, D_IN, generator=gen)
    y = torch.sin(x @ torch.randn(D_IN, generator=gen)) + 0.3 * torch.randn(N, generator=gen)
    torch.manual_seed(7)
    model = torch.nn.Sequential(
        torch.nn.Linear(D_IN, HIDDEN),
        torch.nn.LayerNorm(HIDDEN),
        torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, 1),
    )
    with torch.no_grad():  # a non-trivial LayerNorm affine
        model[1].weight.add_(0.3 * torch.randn(HIDDEN))
        model[1].bias.add_(0.3 * torch.randn(HIDDEN))
    return model, x, y


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(x).squeeze(-1) - y).square().mean()


def _truth(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """tr Σ / |G|² over the whole dataset from all N per-example gradients (float64)."""
    m64 = model.double()
    params = {k: v.detach() for k, v in m64.named_parameters()}

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(m64, p, (xi.unsqueeze(0),))
        return 0.5 * (out.squeeze() - yi).square()

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, x.double(), y.double())
    flat = torch.cat([g.reshape(N, -1) for g in per.values()], dim=1)
    mean = flat.mean(0)
    trace = float((flat - mean).square().sum(1).mean())  # population covariance (divisor N)
    model.float()
    return trace / float(mean.square().sum())


def _run(replace: bool, dataset_size: int | None) -> list[dict[str, object]]:
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rec = Receiver()
    try:
        mon = client_hooks.watch(
            model,
            opt,
            run=f"mlp-{replace}",
            server=rec.url,
            noise_scale="per_example",
            dataset_size=dataset_size,
            flush_interval=0.2,
            param_every=0,
        )
        gen = torch.Generator().manual_seed(1 if replace else 2)
        for _ in range(STEPS):
            idx = (
                torch.randint(0, N, (BATCH,), generator=gen)
                if replace
                else torch.randperm(N, generator=gen)[:BATCH]
            )
            _loss(model, x[idx], y[idx]).backward()
            opt.step()
            opt.zero_grad()
            mon.log(batch_size=BATCH)
        assert mon.flush(timeout=30)
        mon.close()
        assert rec.runs[0]["semantics"].get("dataset_size") == dataset_size
        return rec.steps
    finally:
        rec.close()


def test_with_replacement_within_5_percent() -> None:
    model, x, y = _problem()
    truth = _truth(model, x, y)
    records = _run(replace=True, dataset_size=None)
    assert len(records) == STEPS
    assert len(records[0]["gns"]["layers"]) == 3  # both Linears and the LayerNorm
    est = linreg.estimate(records)
    assert est == pytest.approx(truth, rel=0.05)


def test_without_replacement_needs_the_correction() -> None:
    model, x, y = _problem()
    truth = _truth(model, x, y)
    records = _run(replace=False, dataset_size=N)
    corrected = linreg.estimate(records, dataset_size=N)
    naive = linreg.estimate(records)  # 1/B instead of (N−B)/(B(N−1))
    assert corrected == pytest.approx(truth, rel=0.05)
    assert abs(naive / truth - 1) > 0.15  # bias ≈ B_simple/N: the naive reading is off
