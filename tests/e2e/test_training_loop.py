"""A real training loop → client hooks → live collector → REST API, on both databases."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import defaultdict

import httpx
import torch
from torch.nn import functional as F

import client_hooks
from client_hooks.demo import TinyGPT, markov_batches
from tests.conftest import Collector, free_port, new_run_id, repo_root


def _num(v: float | str) -> float:
    return float(v.replace("Infinity", "inf")) if isinstance(v, str) else float(v)


def _layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else "(root)"


def _independent_norms(model: torch.nn.Module) -> tuple[dict[str, float], float]:
    """Pre-clip per-layer and total norms, in float64, straight from .grad."""
    sq: dict[str, float] = defaultdict(float)
    for name, p in model.named_parameters():
        if p.grad is not None:
            sq[_layer_of(name)] += float(p.grad.double().pow(2).sum())
    return {k: math.sqrt(v) for k, v in sq.items()}, math.sqrt(sum(sq.values()))


def test_stored_norms_are_the_pre_clip_norms(collector: Collector, api: httpx.Client) -> None:
    torch.manual_seed(1)
    model = TinyGPT(vocab=32, dim=32, depth=2, heads=2, seq=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run_id = new_run_id("e2e")
    mon = client_hooks.watch(model, opt, project="e2e", run=run_id, server=collector.url,
                             batch_size=8)
    data = markov_batches(32, 16, 8, seed=3)
    expected: list[tuple[dict[str, float], float]] = []
    clipped = 0
    for _ in range(25):
        x = next(data)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 32), x[:, 1:].reshape(-1))
        loss.backward()
        expected.append(_independent_norms(model))
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        clipped += int(float(total) > 0.05)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.log(loss=loss, batch_size=8)
    assert mon.flush(timeout=30)
    mon.close()
    assert clipped == 25, "the test must exercise clipping on every step"

    run = api.get(f"/api/v1/runs/{run_id}").json()
    assert run["num_steps"] == 25 and run["last_step"] == 24
    # Tied head/embedding weight counted once: no layer for the head.
    assert "head" not in run["layers"] and "tok" in run["layers"]
    assert set(run["layers"]) == set(expected[0][0])

    layers = api.get(f"/api/v1/runs/{run_id}/layers", params={"max_points": 1000}).json()
    series = api.get(f"/api/v1/runs/{run_id}/series",
                     params={"names": "grad_norm", "max_points": 1000}).json()["series"][0]
    assert layers["bucket_size"] == 1 and layers["step"] == list(range(25))
    for step, (per_layer, total) in enumerate(expected):
        assert math.isclose(_num(series["max"][step]), total, rel_tol=1e-5)
        for row, name in enumerate(layers["layers"]):
            got = _num(layers["max"][row][step])
            assert math.isclose(got, per_layer[name], rel_tol=1e-5), (step, name)


def test_demo_against_a_running_collector(collector: Collector, api: httpx.Client) -> None:
    before = {r["id"] for r in api.get("/api/v1/runs", params={"project": "demo-e2e"}).json()}
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "demo", "--server", collector.url,
         "--steps", "20", "--project", "demo-e2e", "--exit"],
        capture_output=True, text=True, timeout=300, cwd=repo_root(),
    )
    assert out.returncode == 0, out.stderr
    runs = [r for r in api.get("/api/v1/runs", params={"project": "demo-e2e"}).json()
            if r["id"] not in before]
    assert len(runs) == 1
    run = api.get(f"/api/v1/runs/{runs[0]['id']}").json()
    assert run["num_steps"] == 20 and len(run["layers"]) > 10
    matrix = api.get(f"/api/v1/runs/{run['id']}/layers").json()
    assert matrix["step"] == list(range(20))
    assert all(math.isfinite(_num(v)) and _num(v) > 0 for row in matrix["max"] for v in row)
    assert f"/runs/{run['id']}" in out.stdout


def test_demo_starts_an_embedded_collector(tmp_path: object) -> None:
    port = free_port()
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "demo", "--server", f"http://127.0.0.1:{port}",
         "--database-url", f"sqlite:///{tmp_path}/demo.db", "--steps", "15", "--exit"],
        capture_output=True, text=True, timeout=300, cwd=repo_root(),
    )
    assert out.returncode == 0, out.stderr
    assert "starting an embedded one" in out.stdout
    assert "15 steps" in out.stdout and f"http://127.0.0.1:{port}/runs/demo-" in out.stdout
    assert "training [" in out.stderr  # the progress bar
