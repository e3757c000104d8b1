"""GET /api/v1/runs/{run}/noise-scale through a live collector (SQLite and Postgres)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch.multiprocessing as mp
from prometheus_client.parser import text_string_to_metric_families

from server.schemas_noise import NoiseScaleResponse
from tests.conftest import Collector, free_port, new_run_id
from tests.noise import linreg
from tests.noise.ddp_worker import WORLD, worker

LAYERS = ["enc.0", "enc.1", "head"]


def _noise(api: httpx.Client, run: str, **params: Any) -> dict[str, Any]:
    got = api.get(f"/api/v1/runs/{run}/noise-scale", params=params)
    assert got.status_code == 200, got.text
    body: dict[str, Any] = got.json()
    NoiseScaleResponse.model_validate(body)  # the documented (OpenAPI) shape, strictly
    return body


@pytest.mark.parametrize("mode", ["micro", "per_example", "ddp"])
def test_linear_regression_end_to_end(collector: Collector, api: httpx.Client, mode: str) -> None:
    """One seed per mode: client → live collector → REST is within 5 % of the closed form."""
    run = new_run_id(f"lr-{mode}")
    if mode == "ddp":
        mp.spawn(
            worker,
            args=(free_port(), [(0, run, collector.url, "ddp")], linreg.STEPS),
            nprocs=WORLD,
            join=True,
        )
    else:
        linreg.train(mode, 0, collector.url, run)
    truth = linreg.truth()
    body = _noise(api, run, horizon=0)
    assert body["run"] == run and body["mode"] == mode and body["batch_size"] == linreg.BATCH
    cur = body["current"]
    assert cur["defined"] and cur["reason"] is None and cur["step"] == linreg.STEPS - 1
    assert abs(cur["b_simple"] / truth - 1) <= 0.05, (cur, truth)
    assert cur["lo"] < cur["b_simple"] < cur["hi"]
    assert cur["hi"] / cur["lo"] < 1.5  # the interval is informative after 1000 steps
    series = body["series"]
    assert series["step"] == list(range(linreg.STEPS))
    assert series["b_simple"][-1] == cur["b_simple"]
    assert all(len(series[k]) == linreg.STEPS for k in ("b_simple", "lo", "hi", "g2", "trace"))
    off = body["tradeoff"]
    assert off["steps_ratio"] == pytest.approx(1 + cur["b_simple"] / linreg.BATCH)
    assert off["examples_ratio"] == pytest.approx(1 + linreg.BATCH / cur["b_simple"])
    assert off["regime"] == "curvature-dominated"  # B = 64 > B_simple ≈ 18
    # Downsampled reads keep the last point and the current estimate.
    small = _noise(api, run, horizon=0, max_points=10)["series"]
    assert len(small["step"]) <= 11 and small["step"][-1] == linreg.STEPS - 1
    # /metrics carries the current estimate at the default horizon for active runs: close()
    # marked this one finished, so resume it (as a client re-announcing it would) first.
    project = api.get(f"/api/v1/runs/{run}").json()["project"]
    assert api.post("/api/v1/runs", json={"id": run, "project": project}).status_code == 200
    default = _noise(api, run)["current"]["b_simple"]
    text = api.get("/metrics").text
    gauges = {
        s.labels["run"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "gradsentry_run_b_simple"
        for s in f.samples
    }
    assert gauges[run] == pytest.approx(default, rel=1e-9)


def _create(api: httpx.Client, **semantics: Any) -> str:
    run = new_run_id("ns")
    got = api.post(
        "/api/v1/runs",
        json={
            "id": run,
            "layers": LAYERS,
            "batch_size": 8,
            "semantics": {"noise_scale": "micro", **semantics},
        },
    )
    assert got.status_code in (200, 201), got.text
    return run


def _step(step: int, small: list[float], big: list[float], **gns: Any) -> dict[str, Any]:
    return {
        "step": step,
        "loss": 1.0,
        "gns": {
            "mode": "micro",
            "b_small": 2.0,
            "b_big": 8.0,
            "layers": [0, 1, 2],
            "small_sq": small,
            "big_sq": big,
            **gns,
        },
    }


def _post(api: httpx.Client, run: str, steps: list[dict[str, Any]]) -> httpx.Response:
    return api.post(f"/api/v1/runs/{run}/steps", json={"wire_version": 1, "steps": steps})


def test_undefined_while_g2_not_positive_then_defined(api: httpx.Client) -> None:
    run = _create(api)
    empty = _noise(api, run)
    assert empty["current"]["defined"] is False and empty["current"]["b_simple"] is None
    assert empty["series"]["step"] == [] and empty["tradeoff"] is None
    # |G_B|² below |G_b|²/4 (b = B/4): the |G|² estimate (B|G_B|² − b|G_b|²)/(B − b) < 0.
    assert (
        _post(api, run, [_step(i, [4.0, 4.0, 4.0], [0.5, 0.5, 0.5]) for i in range(30)]).status_code
        == 200
    )
    body = _noise(api, run, horizon=0)
    assert body["current"]["defined"] is False and body["current"]["b_simple"] is None
    assert "not positive" in body["current"]["reason"]
    assert body["series"]["b_simple"] == [None] * 30  # null, never clipped to a floor
    assert body["series"]["g2"][-1] < 0  # the negative estimate itself is reported
    assert body["tradeoff"] is None
    # Now a clear signal: |G_b|² = 1 + T/2, |G_B|² = 1 + T/8 per layer with T = 6.
    ok = [_step(i, [4.0, 4.0, 4.0], [1.75, 1.75, 1.75]) for i in range(30, 600)]
    assert _post(api, run, ok).status_code == 200
    body = _noise(api, run, horizon=50)
    cur = body["current"]
    assert cur["defined"] and cur["b_simple"] == pytest.approx(6.0, rel=1e-6)
    assert body["tradeoff"]["steps_ratio"] == pytest.approx(1 + 6 / 8)
    # Constant inputs: the jackknife interval collapses onto the estimate.
    assert cur["lo"] == pytest.approx(6.0, rel=1e-6) and cur["hi"] == pytest.approx(6.0, rel=1e-6)
    groups = _noise(api, run, horizon=50, group_depth=1)["groups"]
    assert [g["name"] for g in groups] == ["enc", "head"]
    assert all(g["b_simple"] == pytest.approx(6.0, rel=1e-6) for g in groups)


def test_dataset_size_applies_the_finite_population_correction(api: httpx.Client) -> None:
    run = _create(api, dataset_size=16)
    # With N = 16: f(2) = 14/30, f(8) = 8/120. |G|² = 1, tr Σ = 3: E|G_b|² = 1 + 3 f(b).
    small, big = 1 + 3 * 14 / 30, 1 + 3 * 8 / 120
    assert (
        _post(api, run, [_step(i, [small, 0, 0], [big, 0, 0]) for i in range(40)]).status_code
        == 200
    )
    body = _noise(api, run, horizon=0)
    assert body["dataset_size"] == 16
    assert body["current"]["b_simple"] == pytest.approx(3.0, rel=1e-6)


@pytest.mark.parametrize(
    "bad, detail",
    [
        ({"b_small": 8.0}, "b_small"),
        ({"layers": [0, 1]}, "one value per entry"),
        ({"layers": [0, 1, 3]}, "distinct indices"),
        ({"layers": [0, 0, 1]}, "distinct indices"),
        ({"b_small": 0}, "b_small"),
        ({"mode": "guess"}, "mode"),
    ],
)
def test_bad_gns_is_a_4xx_and_nothing_is_stored(
    api: httpx.Client, bad: dict[str, Any], detail: str
) -> None:
    run = _create(api)
    steps = [
        _step(0, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]),
        _step(1, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], **bad),
    ]
    got = _post(api, run, steps)
    assert 400 <= got.status_code < 500, got.text
    assert got.json()["error"] and detail in got.json()["detail"]
    assert _noise(api, run)["series"]["step"] == []  # the good step 0 was not half-stored


def test_reserved_scalar_names_and_unknown_run(api: httpx.Client) -> None:
    run = _create(api)
    got = _post(api, run, [{"step": 0, "scalars": {"gns/b_small": 3.0}}])
    assert got.status_code == 422 and "reserved" in got.json()["detail"]
    missing = api.get("/api/v1/runs/no-such-run/noise-scale")
    assert missing.status_code == 404 and missing.json()["error"] == "RunNotFound"
    assert api.get(f"/api/v1/runs/{run}/noise-scale", params={"horizon": -1}).status_code == 422
    spec = api.get("/openapi.json").json()
    assert "NoiseScaleResponse" in str(spec["paths"]["/api/v1/runs/{run_id}/noise-scale"])
