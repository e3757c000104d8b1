"""Critical batch size: the measured knee of steps-to-target vs batch size, against B_simple.

Method (McCandlish et al. 2018, §2.3 and §3):

* Task: linear regression on an endless stream of fresh examples, x ~ N(0, C) with C
  diagonal, eigenvalues log-spaced from 0.1 to 1 (d = 64: curvature makes S_min more than a
  couple of steps), y = xᵀw* + ε, ε ~ N(0, 1), w* ~ N(0, I), the model a bias-free
  ``nn.Linear(d, 1)`` from w = 0, loss ½(xᵀw − y)². Its expected loss is exact,
  ½δᵀCδ + ½ (δ = w − w*), so "steps to the target" needs no held-out set and has no
  evaluation noise. B_simple grows as the loss falls.
* For each batch size B in ``--batches``: plain SGD at each learning rate of a geometric grid
  (``--lrs``), training until the expected loss reaches ``--target`` (runs slower than twice
  the best so far for that B are cut short); S(B) = the fewest mean steps over the grid
  (the learning rate tuned per batch size), the mean over ``--seeds`` data seeds. A run that
  does not reach the target within ``--max-steps`` does not count.
* Fit S = S_min·(1 + B_crit/B) by least squares in 1/B (``server.analysis.cbs.fit_knee``).
* Reference run: batch ``--ref-batch`` at its tuned learning rate, watched by the real client
  (``client_hooks.watch(noise_scale="per_example")``) streaming into a real collector (SQLite,
  started here); ``GET /api/v1/runs/{run}/noise-scale`` gives B_simple (EMA horizon
  ``--horizon`` steps) at the step where the run reaches the target loss.
* Printed: S(B) per batch size, the fit, B_simple with its interval, and B_simple / B_crit.
  The paper finds B_crit 1–10× below B_simple with tuned constant learning rates; the goal
  here is a ratio within 3×.

Run: ``.venv/bin/python bench/cbs_knee.py`` (a few minutes on one CPU core).
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import client_hooks  # noqa: E402
from server.analysis.cbs import fit_knee  # noqa: E402
from server.app import create_app  # noqa: E402
from server.migrate import upgrade  # noqa: E402
from server.settings import Settings  # noqa: E402

D, NOISE = 64, 1.0


def _eig() -> torch.Tensor:
    return torch.logspace(-1, 0, D)


def _w_star() -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(123))


class Stream:
    """Fresh i.i.d. examples of the regression."""

    def __init__(self, w_star: torch.Tensor, seed: int) -> None:
        self.w_star = w_star
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, D, generator=self.gen) * _eig().sqrt()
        return x, x @ self.w_star + NOISE * torch.randn(n, generator=self.gen)


def expected_loss(model: torch.nn.Module, w_star: torch.Tensor) -> float:
    """½δᵀCδ + ½s²: the exact population loss for x ~ N(0, C)."""
    with torch.no_grad():
        delta = model.weight.reshape(-1) - w_star
        return 0.5 * float((_eig() * delta.square()).sum()) + NOISE**2 / 2


def steps_to_target(batch: int, lr: float, args: argparse.Namespace, w_star: torch.Tensor,
                    seed: int, mon_kwargs: dict[str, Any] | None = None,
                    limit: int | None = None
                    ) -> tuple[int | None, client_hooks.Monitor | None]:
    """SGD steps until the expected loss ≤ target (None if not within ``limit`` steps, default
    ``--max-steps``)."""
    model = torch.nn.Linear(D, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mon = client_hooks.watch(model, opt, **mon_kwargs) if mon_kwargs else None
    stream = Stream(w_star, seed=seed)
    for step in range(limit or args.max_steps):
        x, y = stream.batch(batch)
        loss = 0.5 * (model(x).squeeze(-1) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if mon is not None:
            mon.log(loss=loss.detach(), batch_size=batch)
        value = expected_loss(model, w_star)
        if not math.isfinite(value) or value > 1e6:
            return None, mon
        if value <= args.target:
            return step + 1, mon
    return None, mon


def _collector(db: str) -> tuple[str, uvicorn.Server]:
    settings = Settings(database_url=f"sqlite:///{db}")
    upgrade(settings.database_url)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="4,8,16,32,64,128,256,512,1024,2048")
    p.add_argument("--lrs", default=",".join(f"{0.01 * 1.5**i:.4g}" for i in range(14)))
    p.add_argument("--target", type=float, default=0.6)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ref-batch", type=int, default=64)
    p.add_argument("--horizon", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)
    w_star = _w_star()
    start = 0.5 * float((_eig() * w_star.square()).sum()) + NOISE**2 / 2
    print(f"d={D}: expected loss at init {start:.2f}, floor {NOISE**2 / 2:.2f}, "
          f"target {args.target}")
    batches = [int(b) for b in args.batches.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    best: dict[int, tuple[float, float]] = {}
    t0 = time.time()
    for b in batches:
        for lr in sorted(lrs, reverse=True):  # large first: the rest stop at 2x the best
            limit = min(args.max_steps, int(2 * best[b][0]) + 1) if b in best else None
            runs = [steps_to_target(b, lr, args, w_star, seed, limit=limit)[0]
                    for seed in range(args.seeds)]
            if all(r is not None for r in runs):
                mean = sum(r for r in runs if r is not None) / len(runs)
                if b not in best or mean < best[b][0]:
                    best[b] = (mean, lr)
        got = best.get(b)
        print(f"B={b:5d}: " + (f"S={got[0]:8.1f} at lr={got[1]:g}" if got else "not reached")
              + f"   ({time.time() - t0:.0f}s)")
    fit_b = [b for b in batches if b in best]
    s_min, b_crit = fit_knee(fit_b, [best[b][0] for b in fit_b])
    print(f"fit S = S_min(1 + B_crit/B): S_min = {s_min:.1f}, B_crit = {b_crit:.1f}")

    ref_lr = best[args.ref_batch][1]
    with tempfile.TemporaryDirectory() as tmp:
        url, server = _collector(str(Path(tmp, "knee.db")))
        run = f"cbs-knee-ref-{args.ref_batch}"
        steps, mon = steps_to_target(
            args.ref_batch, ref_lr, args, w_star, 0,
            {"run": run, "server": url, "noise_scale": "per_example", "param_every": 0,
             "flush_interval": 0.2, "spool": False})
        assert isinstance(mon, client_hooks.Monitor)
        mon.flush(30)
        mon.close()
        body = httpx.get(f"{url}/api/v1/runs/{run}/noise-scale",
                         params={"horizon": args.horizon}).json()
        server.should_exit = True
    cur = body["current"]
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    print(f"reference run B={args.ref_batch} lr={ref_lr:g}: target reached at step {steps}; "
          f"service B_simple = {fmt(cur['b_simple'])} (95% interval {fmt(cur['lo'])}–"
          f"{fmt(cur['hi'])}, EMA horizon {args.horizon} steps)")
    ratio = cur["b_simple"] / b_crit
    print(f"B_simple / B_crit = {ratio:.2f} (goal: within 3x, i.e. 1/3 to 3)")


if __name__ == "__main__":
    main()
