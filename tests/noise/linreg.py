"""Gaussian linear regression with a closed-form noise scale (issue 4).

Per-example loss ½(xᵀw − y)², x ~ N(0, C), y = xᵀw* + ε, ε ~ N(0, s²), δ = w − w*:
the per-example gradient is x(xᵀδ − ε), so G = Cδ and (Isserlis)
tr Σ = E|g|² − |G|² = |Cδ|² + (δᵀCδ + s²)·tr C. Parameters are held fixed (SGD, lr 0) and
every step draws a fresh i.i.d. batch, so B_simple = tr Σ / |G|² is the truth at every step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

import client_hooks
from server.analysis import gns

D, NOISE_SD, DELTA = 16, 0.5, 0.3
BATCH, MICRO, STEPS = 64, 4, 1000


def diag_c() -> torch.Tensor:
    return torch.linspace(0.5, 1.5, D, dtype=torch.float64)


def truth() -> float:
    c = diag_c()
    delta = torch.full((D,), DELTA, dtype=torch.float64)
    cd = c * delta
    g2 = float(cd @ cd)
    trace = g2 + (float(delta @ cd) + NOISE_SD**2) * float(c.sum())
    return trace / g2


def make(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """A bias-free Linear at w = w* + δ, its lr-0 optimizer, and w*."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    w_star = torch.randn(D, generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(D, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_((w_star + DELTA).reshape(1, D))
    return model, torch.optim.SGD(model.parameters(), lr=0.0), w_star


def batch(
    gen: torch.Generator, w_star: torch.Tensor, n: int = BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, D, generator=gen) * diag_c().sqrt().float()
    y = x @ w_star + NOISE_SD * torch.randn(n, generator=gen)
    return x, y


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(x).squeeze(-1) - y).square().mean()


def train(
    mode: str,
    seed: int,
    server: str,
    run: str,
    steps: int = STEPS,
    rank: int = 0,
    world: int = 1,
    wrap: Any = None,
    **watch: Any,
) -> None:
    """``steps`` optimizer steps at batch size 64 measured in ``mode`` ("micro": 4
    micro-batches of 16 accumulated; "per_example": one backward of 64; "ddp": this rank's
    64/world slice of the global batch, the model wrapped by ``wrap``)."""
    model, opt, w_star = make(seed)
    net = wrap(model) if wrap is not None else model
    mon = client_hooks.watch(
        net,
        opt,
        run=run,
        server=server,
        batch_size=BATCH,
        noise_scale=mode,
        flush_interval=0.2,
        param_every=0,
        **watch,
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = batch(gen, w_star)
        if mode == "micro":
            for xs, ys in zip(x.chunk(MICRO), y.chunk(MICRO), strict=True):
                (loss_of(net, xs, ys) / MICRO).backward()
        else:
            share = BATCH // world
            sl = slice(rank * share, (rank + 1) * share)
            loss_of(net, x[sl], y[sl]).backward()
        opt.step()
        opt.zero_grad()
        mon.log()
    assert mon.flush(timeout=60), mon.stats
    mon.close()


def estimate(records: list[dict[str, Any]], dataset_size: int | None = None) -> float:
    """B_simple from the records' ``gns`` totals: per-step two-batch estimates averaged
    separately over all steps, then divided (what the service does with horizon 0)."""
    g2s, trs = [], []
    for rec in records:
        g = rec["gns"]
        g2, tr = gns.two_batch(
            math.fsum(g["small_sq"]), math.fsum(g["big_sq"]), g["b_small"], g["b_big"], dataset_size
        )
        g2s.append(float(g2))
        trs.append(float(tr))
    return float(np.mean(trs) / np.mean(g2s))
