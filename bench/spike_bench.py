"""Spike-detection benchmark: labelled real CPU training runs, scored for precision, recall
and lead time; plus the latency from a batch's arrival to the webhook delivery.

Every run trains a tiny decoder-only transformer on a synthetic Markov-chain language whose
entropy rate is known (``client_hooks.demo.markov_batches``), streaming through the real
client hooks into a real collector (uvicorn in this process, SQLite by default), which runs
the detectors with their default rules. Scenarios (onset step in brackets):

- healthy (3 seeds), healthy with batch 4 (noisier; 2 seeds) and qk-norm at a 3x higher
  learning rate (2 seeds): negative controls;
- bad batch [150]: one batch of uniformly random tokens;
- lr spike [150]: the learning rate x30 for 3 steps;
- overflow [150]: AMP GradScaler on CPU; gradients overflow for 30 steps (loss scale collapses);
- slow ramp [100]: the learning rate grows 4 % per step from step 100 until divergence;
- high lr [0]: 30x the learning rate, no warm-up.

Scoring: an alert (any rule, silenced or not) at or after the onset of a positive run is a
true positive; any alert of a negative run, or before the onset, a false positive. Recall
counts positive runs with at least one true alert within ``HORIZON`` steps of the onset;
precision counts alerts. Lead time = first true alert step - onset. For the slow ramp, the
step where the loss (EMA 0.1) doubles from its minimum is reported beside the alert step.

Latency: ``TRIALS`` times, a run gets 60 healthy steps, then a batch with a grad-norm spike is
POSTed; the time from sending it to the webhook receiver having the notification is
recorded, against the plain ingest round trip of the same request (the baseline).

    PYTHONPATH=. python bench/spike_bench.py [--steps 260] [--database-url URL]
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from torch import nn
from torch.nn import functional as F

import client_hooks
from client_hooks.demo import markov_batches
from client_hooks.wire import encode_batch
from server.app import create_app
from server.migrate import upgrade
from server.settings import Settings

VOCAB, SEQ, BATCH, DIM, DEPTH, HEADS = 32, 32, 16, 48, 2, 4
BASE_LR = 3e-3
HORIZON = 100
TRIALS = 30


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.qn = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.kn = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(x).split(d, dim=-1)
        )
        y = F.scaled_dot_product_attention(self.qn(q), self.kn(k), v, is_causal=True)
        out: torch.Tensor = self.proj(y.transpose(1, 2).reshape(b, t, d))
        return out


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, qk_norm)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class GPT(nn.Module):
    def __init__(self, qk_norm: bool = False) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, DIM), nn.Parameter(torch.zeros(SEQ, DIM))
        self.blocks = nn.ModuleList(Block(DIM, HEADS, qk_norm) for _ in range(DEPTH))
        self.ln_f, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB, bias=False)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.head(self.ln_f(x))
        return out


def entropy_rate(seed: int = 0) -> float:
    """Entropy rate (nats/token) of the chain ``markov_batches(VOCAB, ..., seed)`` samples."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(VOCAB, VOCAB, generator=g) * 3.0, dim=-1).double()
    pi = torch.full((VOCAB,), 1.0 / VOCAB, dtype=torch.float64)
    for _ in range(2000):
        pi = pi @ probs
    row_h = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
    return float(pi @ row_h)


@dataclass(frozen=True)
class Scenario:
    name: str
    onset: int | None  # None: negative control
    kind: str
    seed: int


SCENARIOS = (
    [Scenario(f"healthy-s{s}", None, "healthy", s) for s in range(3)]
    + [Scenario(f"healthy-b4-s{s}", None, "healthy-b4", s) for s in range(2)]
    + [Scenario(f"qknorm-s{s}", None, "qknorm", s) for s in range(2)]
    + [
        Scenario(f"{k}-s{s}", onset, k, s)
        for k, onset in (
            ("bad-batch", 150),
            ("lr-spike", 150),
            ("overflow", 150),
            ("slow-ramp", 100),
            ("high-lr", 0),
        )
        for s in range(2)
    ]
)


def lr_at(sc: Scenario, step: int) -> float:
    warm = min(1.0, (step + 1) / 20)
    if sc.kind == "qknorm":
        return 3 * BASE_LR * warm
    if sc.kind == "high-lr":
        return 30 * BASE_LR
    if sc.kind == "lr-spike" and 150 <= step < 153:
        return 30 * BASE_LR
    if sc.kind == "slow-ramp" and step >= 100:
        return BASE_LR * 1.04 ** (step - 100)
    return BASE_LR * warm


def train(sc: Scenario, server: str, steps: int, project: str) -> tuple[str, list[float]]:
    torch.manual_seed(sc.seed)
    model = GPT(qk_norm=sc.kind == "qknorm")
    opt = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=0.01)
    scaler = (
        torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=20)
        if sc.kind == "overflow"
        else None
    )
    batch = 4 if sc.kind == "healthy-b4" else BATCH
    mon = client_hooks.watch(
        model,
        opt,
        project=project,
        run=f"{project}-{sc.name}",
        server=server,
        batch_size=batch,
        flush_interval=0.1,
        scaler=scaler,
        spool=False,
    )
    data = markov_batches(VOCAB, SEQ, batch, seed=0)
    gen = torch.Generator().manual_seed(1000 + sc.seed)
    losses: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(sc, step)
        x = next(data)
        if sc.kind == "bad-batch" and step == 150:
            x = torch.randint(VOCAB, x.shape, generator=gen)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        if scaler is not None:
            scaled = scaler.scale(loss)
            if 150 <= step < 180:  # gradients overflow: the scaler skips and halves the scale
                scaled = scaled * math.inf
            scaled.backward()  # type: ignore[no-untyped-call]
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        mon.log(loss=loss)
        losses.append(float(loss.detach()))  # the bench's own sync, for the doubling point
    mon.close()
    return mon.run_id, losses


def doubling_step(losses: list[float], after: int) -> int | None:
    ema, low = None, math.inf
    for i, x in enumerate(losses):
        if not math.isfinite(x):
            return i
        ema = x if ema is None else 0.9 * ema + 0.1 * x
        if i >= after and ema >= 2 * low:
            return i
        low = min(low, ema)
    return None


# -- collector and receiver -------------------------------------------------------------


class Receiver:
    def __init__(self) -> None:
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.arrivals.append((time.perf_counter(), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


def serve(settings: Settings) -> tuple[str, uvicorn.Server]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


# -- scoring ------------------------------------------------------------------------------


def score(api: httpx.Client, sc: Scenario, run_id: str, losses: list[float]) -> dict[str, Any]:
    alerts = api.get(f"/api/v1/runs/{run_id}/alerts", params={"limit": 1000}).json()["alerts"]
    alerts = [a for a in alerts if a["rule"] != "stalled"]
    steps = sorted(a["step"] for a in alerts)
    if sc.onset is None:
        true, false = [], steps
    else:
        true = [s for s in steps if s >= sc.onset]
        false = [s for s in steps if s < sc.onset]
    hit = sc.onset is not None and any(s <= sc.onset + HORIZON for s in true)
    out = {
        "scenario": sc.name,
        "onset": sc.onset,
        "alerts": len(steps),
        "true": len(true),
        "false": len(false),
        "detected": hit,
        "lead": (min(true) - sc.onset) if (hit and sc.onset is not None) else None,
        "rules": sorted({a["rule"] for a in alerts}),
        "first": (sorted(alerts, key=lambda a: a["step"])[0]["rule"] if alerts else None),
        "false_rules": sorted(
            {a["rule"] for a in alerts if sc.onset is None or a["step"] < sc.onset}
        ),
    }
    if sc.kind == "slow-ramp":
        out["loss_doubles_at"] = doubling_step(losses, 100)
    return out


def latency(api: httpx.Client, receiver: Receiver, project: str) -> dict[str, float]:
    layers = [f"l{i}" for i in range(8)]
    lat, base = [], []
    for t in range(TRIALS):
        run_id = f"{project}-lat{t}"
        api.post("/api/v1/runs", json={"id": run_id, "project": project, "layers": layers})
        healthy = [
            {
                "step": i,
                "loss": 2.0 + 0.01 * math.sin(i),
                "grad_norm": 1.0 + 0.02 * math.sin(1.3 * i),
                "layer_grad_norms": [0.3] * 8,
            }
            for i in range(60)
        ]
        body, headers = encode_batch(healthy, compress=True)
        api.post(f"/api/v1/runs/{run_id}/steps", content=body, headers=headers)
        spike = [{"step": 60, "loss": 2.0, "grad_norm": 50.0, "layer_grad_norms": [0.3] * 8}]
        body, headers = encode_batch(spike, compress=True)
        n = len(receiver.arrivals)
        t0 = time.perf_counter()
        api.post(f"/api/v1/runs/{run_id}/steps", content=body, headers=headers)
        base.append(time.perf_counter() - t0)
        while not any(b["groupLabels"]["run"] == run_id for _, b in receiver.arrivals[n:]):
            time.sleep(0.002)
        arrived = next(at for at, b in receiver.arrivals[n:] if b["groupLabels"]["run"] == run_id)
        lat.append(arrived - t0)
    lat.sort()
    base.sort()
    p95 = lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)]
    return {
        "p50_s": statistics.median(lat),
        "p95_s": p95,
        "max_s": lat[-1],
        "ingest_p50_s": statistics.median(base),
        "ratio_p50": statistics.median(lat) / statistics.median(base),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=260)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--only", default=None, help="comma-separated scenario kinds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="spike_bench_")
    url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
    settings = Settings(database_url=url)
    upgrade(settings.database_url)
    base, server = serve(settings)
    receiver = Receiver()
    project = f"bench-{int(time.time())}"
    api = httpx.Client(base_url=base, timeout=60)
    api.post(
        "/api/v1/receivers",
        json={
            "name": f"{project}-hook",
            "kind": "webhook",
            "project": project,
            "url": f"{receiver.url}/hook",
        },
    )
    print(
        f"Markov language: vocab {VOCAB}, entropy rate {entropy_rate():.3f} nats/token "
        f"(uniform {math.log(VOCAB):.3f}); model dim {DIM} depth {DEPTH}, {args.steps} steps"
    )
    kinds = set(args.only.split(",")) if args.only else None
    rows = []
    t_start = time.perf_counter()
    for sc in SCENARIOS:
        if kinds and sc.kind not in kinds:
            continue
        t0 = time.perf_counter()
        run_id, losses = train(sc, base, args.steps, project)
        time.sleep(0.3)
        row = score(api, sc, run_id, losses)
        row["final_loss"] = round(sum(losses[-10:]) / 10, 3)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    pos = [r for r in rows if r["onset"] is not None]
    total_alerts = sum(r["alerts"] for r in rows)
    true_alerts = sum(r["true"] for r in rows)
    print(
        f"\nrecall {sum(r['detected'] for r in pos)}/{len(pos)} positive runs; precision "
        f"{true_alerts}/{total_alerts} alerts; negative runs with an alert: "
        f"{sum(1 for r in rows if r['onset'] is None and r['alerts'])}"
        f"/{sum(1 for r in rows if r['onset'] is None)}"
    )
    for kind in sorted({r["scenario"].rsplit("-s", 1)[0] for r in pos}):
        leads = [r["lead"] for r in pos if r["scenario"].startswith(kind) and r["lead"] is not None]
        print(f"  {kind}: lead times {leads}")
    lat = latency(api, receiver, project)
    print(
        f"\nlatency batch -> webhook over {TRIALS} trials: p50 {lat['p50_s'] * 1000:.0f} ms, "
        f"p95 {lat['p95_s'] * 1000:.0f} ms, max {lat['max_s'] * 1000:.0f} ms; plain ingest "
        f"round trip p50 {lat['ingest_p50_s'] * 1000:.1f} ms (latency / ingest = "
        f"{lat['ratio_p50']:.1f}x)"
    )
    print(f"total {time.perf_counter() - t_start:.0f} s")
    server.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
