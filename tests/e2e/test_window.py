"""Logging every N steps, client → live collector → REST, on both databases: the window's
statistics are stored, and a spike at a step that was never sent on its own still shows in
the downsampled grad-norm envelope and the layer heatmap."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
import torch
from torch.nn import functional as F

import client_hooks
from client_hooks.demo import TinyGPT, markov_batches
from tests.conftest import Collector, new_run_id
from tests.factories import create_run, make_steps, num_steps, post_steps

STEPS, EVERY, SPIKE_AT = 30, 10, 13
RTOL = 1e-5


def _num(v: float | str) -> float:
    return float(v.replace("Infinity", "inf")) if isinstance(v, str) else float(v)


def _series(api: httpx.Client, run_id: str, names: str, max_points: int) -> dict[str, Any]:
    got = api.get(f"/api/v1/runs/{run_id}/series",
                  params={"names": names, "max_points": max_points})
    assert got.status_code == 200, got.text
    return {s["name"]: s for s in got.json()["series"]}


def test_log_every_spike_survives_to_the_api(collector: Collector, api: httpx.Client) -> None:
    torch.manual_seed(3)
    model = TinyGPT(vocab=32, dim=32, depth=2, heads=2, seq=16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = markov_batches(32, 16, 8, seed=2)
    run_id = new_run_id("window")
    totals: list[float] = []
    with client_hooks.watch(model, opt, project="e2e", run=run_id, server=collector.url,
                            log_every=EVERY) as mon:
        for step in range(STEPS):
            x = next(data)
            loss = F.cross_entropy(model(x[:, :-1]).reshape(-1, 32), x[:, 1:].reshape(-1))
            (loss * (500.0 if step == SPIKE_AT else 1.0)).backward()
            grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
            totals.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))
            opt.step()
            opt.zero_grad()
            mon.log(loss=loss)
        assert mon.flush(timeout=30)
        assert mon.stats["errors"] == 0
    assert num_steps(api, run_id) == STEPS // EVERY  # one record per window

    full = _series(api, run_id, "grad_norm,grad_norm:max,grad_norm:min,window:steps", 1000)
    assert full["grad_norm"]["step"] == [9, 19, 29]
    assert [_num(v) for v in full["window:steps"]["max"]] == [EVERY] * 3
    window_max = [_num(v) for v in full["grad_norm:max"]["max"]]
    for w, got in enumerate(window_max):
        want = max(totals[w * EVERY:(w + 1) * EVERY])
        assert math.isclose(got, want, rel_tol=RTOL), (w, got, want)
    # The envelope at step 19 covers steps 10..19, the spike at 13 included.
    assert math.isclose(_num(full["grad_norm"]["max"][1]), totals[SPIKE_AT], rel_tol=RTOL)
    assert math.isclose(_num(full["grad_norm"]["min"][1]), min(totals[10:20]), rel_tol=RTOL)
    assert totals[SPIKE_AT] > 50 * totals[19]
    # ... and survives downsampling to one bucket.
    coarse = _series(api, run_id, "grad_norm", 1)["grad_norm"]
    assert math.isclose(_num(coarse["max"][0]), totals[SPIKE_AT], rel_tol=RTOL)

    layers = api.get(f"/api/v1/runs/{run_id}/layers",
                     params={"metric": "grad_norm", "max_points": 1})
    assert layers.status_code == 200, layers.text
    body = layers.json()
    stored = api.get(f"/api/v1/runs/{run_id}/layers",
                     params={"metric": "grad_norm:max", "max_points": 1000}).json()
    assert stored["step"] == [9, 19, 29]
    for row, layer_max in enumerate(body["max"]):  # heatmap max = max over every window
        assert _num(layer_max[0]) == max(_num(v) for v in stored["max"][row])


def per_run_gauges(api: httpx.Client, run_id: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        s.name: s.value
        for f in text_string_to_metric_families(api.get("/metrics").text)
        for s in f.samples
        if s.labels.get("run") == run_id
    }


def test_finishing_an_unknown_run_is_404(api: httpx.Client) -> None:
    got = api.post("/api/v1/runs/no-such-run-x1/finish")
    assert got.status_code == 404 and "no-such-run-x1" in got.text


@pytest.mark.parametrize(("window", "needle"), [
    ({"steps": 2, "first_step": 9, "series": {}}, "first_step"),
    ({"steps": 0, "first_step": 0}, "steps"),
    ({"steps": 2, "first_step": 4, "layers": {"grad_norm": {
        "count": 2, "max": [1.0], "min": [1.0], "mean": [1.0], "nonfinite": [0]}}},
     "3 layers"),
    ({"steps": 2, "first_step": 4, "layers": {"param_norm": {
        "count": 2, "max": [1.0] * 3, "min": [1.0] * 3, "mean": [1.0] * 3,
        "nonfinite": [0] * 3}}}, "grad_norm"),
    ({"steps": 2, "first_step": 4, "series": {"loss:max": {"count": 1, "nonfinite": 0}}},
     "reserved"),
])
def test_bad_window_is_a_clear_4xx_and_stores_nothing(
    api: httpx.Client, window: dict[str, Any], needle: str
) -> None:
    run_id = create_run(api)
    steps = make_steps(0, 6)
    steps[5]["window"] = window
    got = post_steps(api, run_id, steps)
    assert 400 <= got.status_code < 500, got.text
    assert needle in got.text
    assert num_steps(api, run_id) == 0


def test_scalar_names_of_window_statistics_are_reserved(api: httpx.Client) -> None:
    run_id = create_run(api)
    steps = make_steps(0, 2)
    steps[1]["scalars"] = {"attn:max": 1.0}
    got = post_steps(api, run_id, steps)
    assert got.status_code == 422, got.text
    assert "reserved" in got.json()["detail"]
    assert num_steps(api, run_id) == 0


def test_step_time_is_measured_and_stored(collector: Collector, api: httpx.Client) -> None:
    import time

    torch.manual_seed(4)
    model = TinyGPT(vocab=32, dim=16, depth=1, heads=2, seq=8)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = markov_batches(32, 8, 4, seed=1)
    run_id = new_run_id("steptime")
    pauses = [0.0, 0.12, 0.03, 0.2]
    with client_hooks.watch(model, opt, project="e2e", run=run_id, server=collector.url) as mon:
        for pause in pauses:
            time.sleep(pause)  # data loading, say: part of the step's wall time
            x = next(data)
            F.cross_entropy(model(x[:, :-1]).reshape(-1, 32), x[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
            mon.log()
        assert mon.flush(timeout=30)
    # close() marked the run finished; a step sent later resumes it.
    assert api.get(f"/api/v1/runs/{run_id}").json()["status"] == "finished"
    assert per_run_gauges(api, run_id) == {}
    assert post_steps(api, run_id, make_steps(10, 11, n_layers=len(mon.layers))).status_code == 200
    assert api.get(f"/api/v1/runs/{run_id}").json()["status"] == "running"
    assert "gradsentry_run_last_step" in per_run_gauges(api, run_id)
    got = _series(api, run_id, "step_time", 1000)["step_time"]
    assert got["step"] == [1, 2, 3]  # the first step has no previous one
    for value, pause in zip(got["max"], pauses[1:], strict=True):
        # seconds, not ms; the upper bound is loose because a loaded CI machine stalls steps
        assert pause <= _num(value) < pause + 10


def test_step_time_is_a_reserved_scalar_name(api: httpx.Client) -> None:
    run_id = create_run(api)
    steps = make_steps(0, 1)
    steps[0]["scalars"] = {"step_time": 1.0}
    got = post_steps(api, run_id, steps)
    assert got.status_code == 422, got.text
    assert num_steps(api, run_id) == 0
