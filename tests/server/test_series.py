"""Server-side downsampling: min/max buckets never lose a spike."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

from server.services.downsample import bucket_size, downsample
from tests.factories import create_run, post_steps


def _brute_force(steps: np.ndarray, values: np.ndarray, origin: int, size: int) -> list[tuple]:
    out = []
    for key in sorted({(s - origin) // size for s in steps.tolist()}):
        sel = [(s, v) for s, v in zip(steps.tolist(), values.tolist(), strict=False)
               if (s - origin) // size == key]
        finite_or_inf = [v for _, v in sel if not math.isnan(v)]
        lo = min(finite_or_inf) if finite_or_inf else math.nan
        hi = max(finite_or_inf) if finite_or_inf else math.nan
        bad = sum(1 for _, v in sel if not math.isfinite(v))
        out.append((sel[0][0], sel[-1][0], lo, hi, bad))
    return out


@pytest.mark.parametrize("size", [1, 3, 10, 1000])
def test_downsample_matches_brute_force(size: int) -> None:
    rng = np.random.default_rng(size)
    steps = np.sort(rng.choice(5000, size=800, replace=False)).astype(np.int64)
    values = rng.lognormal(size=800)
    values[rng.choice(800, 40, replace=False)] = np.nan
    values[rng.choice(800, 5, replace=False)] = np.inf
    values[rng.choice(800, 5, replace=False)] = -np.inf
    b = downsample(steps, values, int(steps[0]), size)
    got = list(zip(b.step.tolist(), b.step_end.tolist(), b.min.tolist(), b.max.tolist(),
                   b.nonfinite.tolist(), strict=False))
    want = _brute_force(steps, values, int(steps[0]), size)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=False):
        assert g[:2] == w[:2] and g[4] == w[4]
        for a, e in zip(g[2:4], w[2:4], strict=False):
            assert (math.isnan(a) and math.isnan(e)) or a == e


def test_bucket_size_bounds_the_bucket_count() -> None:
    for first, last, points in [(0, 99_999, 200), (5, 5, 10), (0, 1000, 1001), (7, 1006, 3)]:
        size = bucket_size(first, last, points)
        assert (last - first) // size + 1 <= points
        assert size == 1 or (last - first) // (size - 1) + 1 > points


def test_a_single_spike_among_100k_steps_survives_downsampling(api: httpx.Client) -> None:
    n, spike_at, spike = 100_000, 73_219, 1e4
    run_id = create_run(api, layers=["a", "b"])
    rng = np.random.default_rng(0)
    norms = rng.uniform(0.5, 1.5, n)
    norms[spike_at] = spike
    for lo in range(0, n, 20_000):
        steps = [
            {"step": i, "loss": 1.0, "grad_norm": float(norms[i]),
             "layer_grad_norms": [1.0, float(norms[i])]}
            for i in range(lo, lo + 20_000)
        ]
        post_steps(api, run_id, steps).raise_for_status()

    got = api.get(f"/api/v1/runs/{run_id}/series",
                  params={"names": "grad_norm", "max_points": 200}).json()["series"][0]
    assert len(got["step"]) <= 200
    assert max(got["max"]) == spike
    k = got["max"].index(spike)
    assert got["step"][k] <= spike_at <= got["step_end"][k]
    assert sorted(got["max"])[-2] <= 1.5  # the spike stays in its own bucket only

    layers = api.get(f"/api/v1/runs/{run_id}/layers",
                     params={"max_points": 200, "layers": "b"}).json()
    assert layers["layers"] == ["b"] and len(layers["step"]) <= 200
    assert max(layers["max"][0]) == spike

    window = api.get(f"/api/v1/runs/{run_id}/series", params={
        "names": "grad_norm", "start": spike_at - 5, "end": spike_at + 5}).json()["series"][0]
    assert window["bucket_size"] == 1 and window["step"] == list(range(spike_at - 5, spike_at + 6))
    assert window["max"][5] == spike


def test_unknown_series_and_layers_are_404(api: httpx.Client) -> None:
    run_id = create_run(api, layers=["a"])
    resp = api.get(f"/api/v1/runs/{run_id}/series", params={"names": "loss,nope"})
    assert resp.status_code == 404 and "nope" in resp.json()["detail"]
    resp = api.get(f"/api/v1/runs/{run_id}/layers", params={"layers": "zz"})
    assert resp.status_code == 404 and "zz" in resp.json()["detail"]
    resp = api.get(f"/api/v1/runs/{run_id}/layers", params={"metric": "bogus"})
    assert resp.status_code == 422
    resp = api.get(f"/api/v1/runs/{run_id}/series", params={"max_points": 0})
    assert resp.status_code == 422 and "max_points" in resp.json()["detail"]


def test_empty_run_reads_empty(api: httpx.Client) -> None:
    run_id = create_run(api, layers=["a", "b"])
    s = api.get(f"/api/v1/runs/{run_id}/series").json()["series"]
    assert [x["step"] for x in s] == [[], []]
    m = api.get(f"/api/v1/runs/{run_id}/layers").json()
    assert m["step"] == [] and m["max"] == [[], []]
