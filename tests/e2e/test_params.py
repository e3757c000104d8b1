"""Weight norms, update norms, update-to-weight ratios and per-group learning rates: client →
live collector → REST API, on both databases, against the test's own copies of the weights."""

from __future__ import annotations

import math
from collections import defaultdict

import httpx
import torch
from torch.nn import functional as F

import client_hooks
from client_hooks.demo import TinyGPT, markov_batches
from tests.conftest import Collector, new_run_id

STEPS, EVERY = 7, 3
RTOL = 1e-5  # float32 norms on the wire and in storage; see tests/client/test_params.py


def _num(v: float | str) -> float:
    return float(v.replace("Infinity", "inf")) if isinstance(v, str) else float(v)


def _layer_norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    sq: dict[str, float] = defaultdict(float)
    for name, t in tensors.items():
        sq[name.rsplit(".", 1)[0] if "." in name else "(root)"] += float(t.pow(2).sum())
    return {k: math.sqrt(v) for k, v in sq.items()}


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def _matrix(api: httpx.Client, run_id: str, metric: str) -> dict[str, object]:
    got = api.get(f"/api/v1/runs/{run_id}/layers", params={"metric": metric,
                                                            "max_points": 1000})
    assert got.status_code == 200, got.text
    body: dict[str, object] = got.json()
    return body


def test_update_ratio_and_group_lrs_are_stored(collector: Collector, api: httpx.Client) -> None:
    torch.manual_seed(5)
    model = TinyGPT(vocab=32, dim=32, depth=2, heads=2, seq=16)
    blocks = [p for n, p in model.named_parameters() if n.startswith("blocks.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("blocks.")]
    opt = torch.optim.AdamW([{"params": rest, "lr": 3e-3}, {"params": blocks, "lr": 1e-3}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda i: 1.0, lambda i: 1.0 / (1 + i)])
    run_id = new_run_id("params")
    data = markov_batches(32, 16, 8, seed=4)
    ratios: dict[int, dict[str, float]] = {}
    w_after: dict[int, dict[str, float]] = {}
    group1_lr: list[float] = []
    with client_hooks.watch(model, opt, project="e2e", run=run_id, server=collector.url,
                            param_every=EVERY) as mon:
        for step in range(STEPS):
            x = next(data)
            loss = F.cross_entropy(model(x[:, :-1]).reshape(-1, 32), x[:, 1:].reshape(-1))
            loss.backward()
            before = _weights(model)
            group1_lr.append(opt.param_groups[1]["lr"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            after = _weights(model)
            norms = _layer_norms(after)
            updates = _layer_norms({n: after[n] - before[n] for n in after})
            w_after[step] = norms
            ratios[step] = {k: updates[k] / norms[k] for k in norms}
            mon.log(loss=loss)
        assert mon.flush(timeout=30)
        assert mon.stats["errors"] == 0

    kth = [s for s in range(STEPS) if s % EVERY == 0]
    ratio = _matrix(api, run_id, "update_ratio")
    param = _matrix(api, run_id, "param_norm")
    update = _matrix(api, run_id, "update_norm")
    for matrix in (ratio, param, update):
        assert matrix["step"] == kth and matrix["bucket_size"] == 1
    layers = ratio["layers"]
    assert isinstance(layers, list) and set(layers) == set(ratios[0])
    rmax, pmax, umax = ratio["max"], param["max"], update["max"]
    assert isinstance(rmax, list) and isinstance(pmax, list) and isinstance(umax, list)
    for row, name in enumerate(layers):
        for col, step in enumerate(kth):
            got = _num(rmax[row][col])
            assert math.isclose(got, ratios[step][name], rel_tol=RTOL), (step, name)
            assert math.isclose(_num(pmax[row][col]), w_after[step][name], rel_tol=RTOL)
            # The stored ratio is update_norm / param_norm of the stored vectors.
            assert math.isclose(got, _num(umax[row][col]) / _num(pmax[row][col]),
                                rel_tol=1e-6)
    assert len({round(ratios[0][name], 6) for name in layers}) > 1  # not a constant

    series = api.get(f"/api/v1/runs/{run_id}/series",
                     params={"names": "lr,lr/group0,lr/group1", "max_points": 1000})
    assert series.status_code == 200, series.text
    by_name = {s["name"]: s for s in series.json()["series"]}
    assert by_name["lr/group1"]["step"] == list(range(STEPS))
    assert [_num(v) for v in by_name["lr/group1"]["max"]] == group1_lr
    assert [_num(v) for v in by_name["lr/group0"]["max"]] == [3e-3] * STEPS
    assert by_name["lr"]["max"] == by_name["lr/group0"]["max"]
    run = api.get(f"/api/v1/runs/{run_id}").json()
    assert {"lr/group0", "lr/group1"} <= set(run["series"])


def test_zero_weights_give_nan_ratio_and_inputs_are_checked(api: httpx.Client) -> None:
    run_id = new_run_id("ratio")
    created = api.post("/api/v1/runs", json={"id": run_id, "layers": ["a", "b", "c"]})
    assert created.status_code in (200, 201), created.text

    def post(step: int = 0, **fields: object) -> httpx.Response:
        return api.post(f"/api/v1/runs/{run_id}/steps",
                        json={"wire_version": 1, "steps": [{"step": step, **fields}]})

    ok = post(layer_param_norms=[0.0, 2.0, 0.0], layer_update_norms=[0.0, 1.0, "Infinity"],
              lrs=[0.1, 0.2, 0.3])
    assert ok.status_code == 200, ok.text
    ratio = _matrix(api, run_id, "update_ratio")
    assert ratio["max"] == [["NaN"], [0.5], ["Infinity"]]  # 0/0 is NaN; NaN and Inf are data
    assert ratio["nonfinite"] == [[1], [0], [1]]
    got = api.get(f"/api/v1/runs/{run_id}/series", params={"names": "lr/group2"}).json()
    assert got["series"][0]["max"] == [0.3]

    short = post(layer_param_norms=[1.0, 2.0], layer_update_norms=[0.0, 1.0, 2.0])
    assert short.status_code == 422 and short.json()["error"] == "LayerCountMismatch"
    clash = post(lrs=[0.1, 0.2], scalars={"lr/group1": 5.0})
    assert clash.status_code == 422 and "lr/group1" in clash.json()["detail"]
    assert post(1, lrs=[0.1], scalars={"lr/group1": 5.0}).status_code == 200  # one group
    unknown = api.get(f"/api/v1/runs/{run_id}/layers", params={"metric": "nope"})
    assert unknown.status_code == 422 and "update_ratio" in unknown.json()["detail"]
