"""Critical batch size: the measured knee of steps-to-target vs batch size, against B_simple.

Method (McCandlish et al. 2018, §2.3 and §3):

* Task: teacher-student regression on an endless stream of fresh examples. The teacher is a
  random 2-layer tanh MLP (16 → 64 → 1) plus label noise N(0, 0.5²); the student is the same
  architecture with LayerNorm, from a fixed initialisation. Loss ½(f(x) − y)².
* For each batch size B in ``--batches``: plain SGD at each learning rate of a geometric grid
  (``--lrs``), training until the loss on a fixed held-out set of 2048 examples (evaluated
  every ``--eval-every`` steps) reaches ``--target``; S(B) = the fewest steps over the grid
  (the learning rate tuned per batch size). A run that does not reach the target within
  ``--max-steps`` counts as not reaching it.
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

import httpx
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import client_hooks  # noqa: E402
from server.analysis.cbs import fit_knee  # noqa: E402
from server.app import create_app  # noqa: E402
from server.migrate import upgrade  # noqa: E402
from server.settings import Settings  # noqa: E402

D_IN, HIDDEN, NOISE = 16, 64, 0.5


def _teacher() -> torch.nn.Module:
    torch.manual_seed(123)
    net = torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(),
                              torch.nn.Linear(HIDDEN, 1))
    with torch.no_grad():
        net[2].weight.mul_(3.0)
    return net


def _student() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.LayerNorm(HIDDEN),
                               torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))


class Stream:
    """Fresh i.i.d. examples from the teacher."""

    def __init__(self, teacher: torch.nn.Module, seed: int) -> None:
        self.teacher = teacher
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, D_IN, generator=self.gen)
        with torch.no_grad():
            y = self.teacher(x).squeeze(-1) + NOISE * torch.randn(n, generator=self.gen)
        return x, y


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(x).squeeze(-1) - y).square().mean()


def steps_to_target(batch: int, lr: float, args: argparse.Namespace, teacher: torch.nn.Module,
                    held: tuple[torch.Tensor, torch.Tensor], mon_kwargs: dict | None = None
                    ) -> tuple[int | None, object]:
    """SGD steps until the held-out loss ≤ target (None if not within max steps)."""
    model = _student()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mon = client_hooks.watch(model, opt, **mon_kwargs) if mon_kwargs else None
    stream = Stream(teacher, seed=batch)
    reached = None
    for step in range(args.max_steps):
        x, y = stream.batch(batch)
        loss = _loss(model, x, y)
        if not math.isfinite(float(loss.detach())):
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
        if mon is not None:
            mon.log(loss=loss.detach(), batch_size=batch)
        if (step + 1) % args.eval_every == 0:
            with torch.no_grad():
                if float(_loss(model, *held)) <= args.target:
                    reached = step + 1
                    break
    return reached, mon


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
    p.add_argument("--batches", default="16,32,64,128,256,512")
    p.add_argument("--lrs", default="0.05,0.1,0.2,0.5")
    p.add_argument("--target", type=float, default=0.14)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--ref-batch", type=int, default=32)
    p.add_argument("--horizon", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    teacher = _teacher()
    held = Stream(teacher, seed=999).batch(2048)
    with torch.no_grad():
        start = float(_loss(_student(), *held))
    print(f"held-out loss at init {start:.3f}, noise floor {NOISE**2 / 2:.3f}, "
          f"target {args.target}")
    batches = [int(b) for b in args.batches.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    best: dict[int, tuple[int, float]] = {}
    t0 = time.time()
    for b in batches:
        for lr in lrs:
            s, _ = steps_to_target(b, lr, args, teacher, held)
            if s is not None and (b not in best or s < best[b][0]):
                best[b] = (s, lr)
        got = best.get(b)
        print(f"B={b:4d}: " + (f"S={got[0]:5d} at lr={got[1]:g}" if got else "not reached")
              + f"   ({time.time() - t0:.0f}s)")
    fit_b = [b for b in batches if b in best]
    s_min, b_crit = fit_knee(fit_b, [best[b][0] for b in fit_b])
    print(f"fit S = S_min(1 + B_crit/B): S_min = {s_min:.1f}, B_crit = {b_crit:.1f}")

    ref_lr = best[args.ref_batch][1]
    with tempfile.TemporaryDirectory() as tmp:
        url, server = _collector(str(Path(tmp, "knee.db")))
        run = f"cbs-knee-ref-{args.ref_batch}"
        steps, mon = steps_to_target(
            args.ref_batch, ref_lr, args, teacher, held,
            {"run": run, "server": url, "noise_scale": "per_example", "param_every": 0,
             "flush_interval": 0.2, "spool": False})
        assert isinstance(mon, client_hooks.Monitor)
        mon.flush(30)
        mon.close()
        body = httpx.get(f"{url}/api/v1/runs/{run}/noise-scale",
                         params={"horizon": args.horizon}).json()
        server.should_exit = True
    cur = body["current"]
    print(f"reference run B={args.ref_batch} lr={ref_lr:g}: target reached at step {steps}; "
          f"service B_simple = {cur['b_simple']:.1f} (95% interval {cur['lo']:.1f}–"
          f"{cur['hi']:.1f}, EMA horizon {args.horizon} steps)")
    ratio = cur["b_simple"] / b_crit
    print(f"B_simple / B_crit = {ratio:.2f} (goal: within 3x, i.e. 1/3 to 3)")


if __name__ == "__main__":
    main()
