"""Regressions of what the fuzzers found (tests/fuzz), pinned one by one on both backends:
numbers beyond their columns are a 422 (they were 500s), non-finite noise-scale sums and
doubles beyond float32 are stored (they were 500s), an unreachable database is a 503 with
Retry-After (it was a 500), and the OpenAPI document describes what the API does."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from client_hooks import wire
from server.settings import Settings
from tests.conftest import free_port, serve_in_thread
from tests.factories import create_run, make_steps, post_steps


@pytest.mark.parametrize(
    "path",
    [
        f"/api/v1/alerts/{2**31}",
        f"/api/v1/alerts/{-(2**40)}",
        f"/api/v1/notifications?alert={2**40}",
        f"/api/v1/runs?offset={2**70}",
    ],
)
def test_numbers_beyond_their_columns_in_reads(api: httpx.Client, path: str) -> None:
    resp = api.get(path)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"] == "InvalidInput" and resp.json()["detail"]


def test_numbers_beyond_their_columns_in_writes(api: httpx.Client) -> None:
    for method, path in (("DELETE", f"/api/v1/silences/{2**40}"),
                         ("DELETE", f"/api/v1/receivers/{2**33}"),
                         ("POST", f"/api/v1/alerts/{2**31}/ack")):
        assert api.request(method, path).status_code == 422, path
    resp = api.post("/api/v1/runs", json={"id": "too-big", "batch_size": 2**31})
    assert resp.status_code == 422 and "batch_size" in resp.json()["detail"]
    assert api.get("/api/v1/runs/too-big").status_code == 404
    silence = api.post("/api/v1/silences", json={"project": "tests", "step_from": 2**63})
    assert silence.status_code == 422, silence.text
    run_id = create_run(api)
    series = api.get(f"/api/v1/runs/{run_id}/series", params={"end": 2**63})
    assert series.status_code == 422, series.text


@pytest.mark.parametrize(
    ("field", "value"),
    [("batch_size", 2**63), ("tokens", 10**30), ("nonfinite", 2**31), ("micro_batches", 2**40)],
)
def test_step_counts_beyond_their_columns(api: httpx.Client, field: str, value: int) -> None:
    run_id = create_run(api)
    assert post_steps(api, run_id, make_steps(0, 5)).status_code == 200
    steps = make_steps(5, 10)
    steps[3][field] = value
    resp = post_steps(api, run_id, steps)
    assert resp.status_code == 422, resp.text
    assert field in resp.json()["detail"]
    assert api.get(f"/api/v1/runs/{run_id}").json()["num_steps"] == 5  # nothing of it stored


@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        ("/api/v1/runs", {"id": "nul-run", "name": "a\x00b"}, "name"),
        ("/api/v1/runs", {"id": "nul-run", "tags": ["ok", "\x00"]}, "tags.1"),
        ("/api/v1/runs", {"id": "nul-run", "layers": ["w\x00"]}, "layers.0"),
        ("/api/v1/runs", {"id": "nul-run", "config": {"opt": {"k\x00": 1}}}, "config"),
        ("/api/v1/runs", {"id": "nul-run", "semantics": {"x": ["\x00"]}}, "semantics"),
        ("/api/v1/silences", {"project": "tests", "comment": "\x00"}, "comment"),
        ("/api/v1/receivers", {"name": "nul", "kind": "webhook", "url": "http://x/\x00"},
         "url"),
        ("/api/v1/tokens", {"project": "tests", "name": "t\x00"}, "name"),
    ],
)
def test_nul_in_text_is_refused_on_every_database(
    api: httpx.Client, path: str, body: dict[str, Any], where: str
) -> None:
    """PostgreSQL cannot store NUL in text; SQLite could, so the API refuses it on both
    alike (it used to be a 422 on Postgres and stored on SQLite)."""
    before = api.get(path.replace("/tokens", "/tokens?project=tests")).json()
    resp = api.post(path, json=body)
    assert resp.status_code == 422, resp.text
    assert "NUL" in resp.json()["detail"] and where in resp.json()["detail"], resp.text
    assert api.get(path.replace("/tokens", "/tokens?project=tests")).json() == before
    assert api.get("/api/v1/runs/nul-run").status_code == 404


@pytest.mark.parametrize(
    ("window", "where"),
    [({"steps": 2, "first_step": 0, "series": {"x" * 120: {"count": 1, "nonfinite": 0}}},
      "window.series"),
     ({"steps": 2**70, "first_step": 0}, "window.steps")],
)
def test_window_beyond_its_columns(api: httpx.Client, window: dict[str, Any], where: str) -> None:
    """A window series X becomes X:nonfinite (128 characters at most); window steps are a
    double: on SQLite these were 500s, on Postgres database errors."""
    run_id = create_run(api)
    steps = make_steps(0, 2)
    steps[1]["window"] = window
    resp = post_steps(api, run_id, steps)
    assert resp.status_code == 422, resp.text
    assert where in resp.json()["detail"]
    assert api.get(f"/api/v1/runs/{run_id}").json()["num_steps"] in (None, 0)  # nothing stored


def _scalar(api: httpx.Client, run_id: str, name: str) -> Any:
    got = api.get(f"/api/v1/runs/{run_id}/series", params={"names": name})
    assert got.status_code == 200, got.text
    return got.json()["series"][0]["max"]


def test_noise_scale_sums_that_are_not_finite(api: httpx.Client) -> None:
    """+Inf and -Inf in one step's squared norms sum to NaN; finite ones beyond a double
    to +Inf (math.fsum raised on both)."""
    run_id = create_run(api, layers=["a", "b"])
    steps = make_steps(0, 2, n_layers=2)
    steps[0]["gns"] = {"mode": "micro", "b_small": 4, "b_big": 16, "layers": [0, 1],
                       "small_sq": [math.inf, -math.inf], "big_sq": [1e308, 1e308]}
    steps[1]["gns"] = {"mode": "micro", "b_small": 4, "b_big": 16, "layers": [0, 1],
                       "small_sq": [-1e308, -1e308], "big_sq": [1.0, math.nan]}
    resp = post_steps(api, run_id, steps)
    assert resp.status_code == 200, resp.text
    assert _scalar(api, run_id, "gns/small_sq") == ["NaN", "-Infinity"]
    assert _scalar(api, run_id, "gns/big_sq") == ["Infinity", "NaN"]


def test_layer_values_beyond_float32_are_infinite(api: httpx.Client) -> None:
    run_id = create_run(api, layers=["a", "b", "c"])
    steps = make_steps(0, 1)
    steps[0]["layer_grad_norms"] = [1e300, -1e39, 3.0e38]
    assert post_steps(api, run_id, steps).status_code == 200
    got = api.get(f"/api/v1/runs/{run_id}/layers").json()
    assert [row[0] for row in got["max"]] == ["Infinity", "-Infinity", pytest.approx(3.0e38)]
    assert [row[0] for row in got["nonfinite"]] == [1, 1, 0]


def test_unreachable_database_is_a_503_with_retry_after() -> None:
    """Nothing listens where the database should be: a clear 503, never a 500."""
    settings = Settings(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/none",
                        alerts_enabled=False)
    url, server, thread = serve_in_thread(settings)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            body, headers = wire.encode_batch(make_steps(0, 2))
            for resp in (client.get("/healthz"), client.get("/api/v1/runs"),
                         client.post("/api/v1/runs/r/steps", content=body, headers=headers)):
                assert resp.status_code == 503, resp.text
                assert resp.json()["error"] == "DatabaseUnavailable"
                assert resp.headers["Retry-After"] == "1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_openapi_describes_the_api(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    refs = _refs(spec)
    assert refs and all(r.startswith("#/components/schemas/") for r in refs)
    assert all(r.removeprefix("#/components/schemas/") in schemas for r in refs)
    assert "$defs" not in str(spec["paths"])  # the step batch's definitions are components
    assert "StepIn" in schemas and "WindowIn" in schemas
    loss = schemas["StepIn"]["properties"]["loss"]["anyOf"]
    assert {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]} in loss[0]["anyOf"]
    steps = spec["paths"]["/api/v1/runs/{run_id}/steps"]["post"]["responses"]
    assert steps["4XX"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    assert "503" in steps


def test_noise_scale_total_survives_an_intermediate_overflow() -> None:
    """math.fsum raises when a partial sum overflows although the total is a double: the
    total is then the correctly rounded exact sum (found by the wire fuzzer)."""
    from fractions import Fraction

    from server.services.noise import total

    values = [1.7976931348623157e308, 5.313475151573518e292, -1e300, 5e-324]
    expected = float(sum(map(Fraction, values)))
    assert math.isfinite(expected)
    assert total(values) == expected
    assert total([1.7976931348623157e308, 1.7976931348623157e308]) == math.inf
    assert total([-1.7976931348623157e308, -1.7976931348623157e308]) == -math.inf
    # A non-finite value after the overflowing partial sum still decides the total (a NaN
    # there was a 500: Fraction(nan)).
    big = 1.7976931348623157e308
    assert math.isnan(total([big, big, -0.0, math.nan]))
    assert total([big, big, math.inf]) == math.inf
    assert total([big, big, -math.inf]) == -math.inf
    assert math.isnan(total([big, big, math.inf, -math.inf]))
