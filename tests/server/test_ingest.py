"""Ingest through a live collector, on SQLite and on PostgreSQL."""

from __future__ import annotations

import gzip
import json
import math
from typing import Any

import httpx
import pytest

from client_hooks.wire import dumps
from tests.conftest import Collector, new_run_id
from tests.factories import create_run, make_steps, num_steps, post_steps


def test_create_run_is_idempotent_and_resumes(api: httpx.Client) -> None:
    run_id = new_run_id()
    body = {"id": run_id, "project": "p1", "layers": ["x", "y"], "config": {"lr": 0.1}}
    first = api.post("/api/v1/runs", json=body)
    again = api.post("/api/v1/runs", json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["layers"] == ["x", "y"]
    assert again.json()["config"] == {"lr": 0.1}


def test_same_batch_twice_stores_each_step_once(api: httpx.Client) -> None:
    run_id = create_run(api)
    steps = make_steps(0, 50)
    assert post_steps(api, run_id, steps).status_code == 200
    assert post_steps(api, run_id, steps).status_code == 200
    assert num_steps(api, run_id) == 50
    series = api.get(f"/api/v1/runs/{run_id}/series", params={"names": "loss"}).json()
    assert series["series"][0]["step"] == list(range(50))


def test_resumed_run_appends(api: httpx.Client) -> None:
    run_id = create_run(api, layers=["a", "b", "c"])
    post_steps(api, run_id, make_steps(0, 30)).raise_for_status()
    again = api.post("/api/v1/runs", json={"id": run_id, "project": "tests",
                                           "layers": ["a", "b", "c"]})
    assert again.status_code == 200
    post_steps(api, run_id, make_steps(30, 60)).raise_for_status()
    run = api.get(f"/api/v1/runs/{run_id}").json()
    assert (run["num_steps"], run["last_step"]) == (60, 59)


def test_resume_with_other_layers_or_project_conflicts(api: httpx.Client) -> None:
    run_id = create_run(api, layers=["a", "b"])
    other_layers = api.post("/api/v1/runs", json={"id": run_id, "project": "tests",
                                                  "layers": ["a", "z"]})
    other_project = api.post("/api/v1/runs", json={"id": run_id, "project": "elsewhere",
                                                   "layers": ["a", "b"]})
    assert other_layers.status_code == 409 and "layer list" in other_layers.json()["detail"]
    assert other_project.status_code == 409 and "another project" in other_project.json()["detail"]


NONFINITE = [math.nan, math.inf, -math.inf]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _num(v: Any) -> float:
    return float(v.replace("Infinity", "inf")) if isinstance(v, str) else float(v)


def test_nonfinite_values_round_trip(api: httpx.Client) -> None:
    run_id = create_run(api, layers=["a", "b", "c"])
    steps = make_steps(0, 3)
    for i, bad in enumerate(NONFINITE):
        steps[i]["loss"] = bad
        steps[i]["grad_norm"] = NONFINITE[(i + 1) % 3]
        steps[i]["layer_grad_norms"] = [bad, 1.5, NONFINITE[(i + 2) % 3]]
        steps[i]["scalars"] = {"attn_logit_max": bad}
    post_steps(api, run_id, steps).raise_for_status()

    got = api.get(f"/api/v1/runs/{run_id}/series",
                  params={"names": "loss,grad_norm,attn_logit_max"}).json()
    by_name = {s["name"]: s for s in got["series"]}
    for i in range(3):
        assert _same(_num(by_name["loss"]["max"][i]), NONFINITE[i])
        assert _same(_num(by_name["loss"]["min"][i]), NONFINITE[i])
        assert _same(_num(by_name["grad_norm"]["max"][i]), NONFINITE[(i + 1) % 3])
        assert _same(_num(by_name["attn_logit_max"]["max"][i]), NONFINITE[i])
        assert by_name["loss"]["nonfinite"][i] == 1
    layers = api.get(f"/api/v1/runs/{run_id}/layers").json()
    for i in range(3):
        assert _same(_num(layers["max"][0][i]), NONFINITE[i])
        assert _num(layers["max"][1][i]) == 1.5
        assert _same(_num(layers["max"][2][i]), NONFINITE[(i + 2) % 3])
    # The wire strings, literally: any JSON parser can read the response.
    raw = api.get(f"/api/v1/runs/{run_id}/series", params={"names": "loss"}).text
    assert '"NaN"' in raw and '"Infinity"' in raw and '"-Infinity"' in raw


def test_bare_nan_tokens_are_accepted(api: httpx.Client) -> None:
    run_id = create_run(api)
    body = json.dumps({"wire_version": 1, "steps": [{"step": 0, "loss": math.nan,
                                                     "grad_norm": math.inf}]})
    resp = api.post(f"/api/v1/runs/{run_id}/steps", content=body,
                    headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    series = api.get(f"/api/v1/runs/{run_id}/series", params={"names": "loss"}).json()
    assert series["series"][0]["max"] == ["NaN"]


def _batch(**step_overrides: Any) -> dict[str, Any]:
    step = {**make_steps(0, 1)[0], **step_overrides}
    return {"wire_version": 1, "steps": [step]}


def _gz(obj: Any) -> bytes:
    return gzip.compress(dumps(obj))


GZ = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
BAD_INPUTS: list[tuple[str, Any, dict[str, str], int, str]] = [
    ("string step", _gz(_batch(step="ten")), GZ, 422, "steps.0.step"),
    ("float step", _gz(_batch(step=1.5)), GZ, 422, "steps.0.step"),
    ("negative step", _gz(_batch(step=-1)), GZ, 422, "greater than or equal to 0"),
    ("loss not a number", _gz(_batch(loss="abc")), GZ, 422, "steps.0.loss"),
    ("layers not a list", _gz(_batch(layer_grad_norms={"a": 1})), GZ, 422, "layer_grad_norms"),
    ("too few layer values", _gz(_batch(layer_grad_norms=[1.0])), GZ, 422, "3 layers"),
    ("unknown field", _gz(_batch(lsos=1.0)), GZ, 422, "lsos"),
    ("missing step", _gz({"wire_version": 1, "steps": [{"loss": 1.0}]}), GZ, 422, "step"),
    ("missing wire_version", _gz({"steps": []}), GZ, 422, "wire_version"),
    ("wrong wire_version", _gz({"wire_version": 99, "steps": []}), GZ, 422, "wire_version"),
    ("steps not a list", _gz({"wire_version": 1, "steps": 5}), GZ, 422, "steps"),
    ("scalar clashes", _gz(_batch(scalars={"loss": 1.0})), GZ, 422, "built-in"),
    ("not JSON", gzip.compress(b"{nope"), GZ, 422, "JSON"),
    ("corrupt gzip", b"\x1f\x8b\x08\x00garbage-bytes", GZ, 400, "gzip"),
    ("truncated gzip", _gz(_batch())[:-12], GZ, 400, "gzip"),
    ("plain body labelled gzip", dumps(_batch()), GZ, 400, "gzip"),
    ("wrong content type", dumps(_batch()), {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("no content type", dumps(_batch()), {}, 415, "Content-Type"),
    ("unknown encoding", dumps(_batch()), {"Content-Type": "application/json",
                                           "Content-Encoding": "br"}, 415, "Content-Encoding"),
]


@pytest.mark.parametrize(
    ("body", "headers", "status", "says"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_is_a_clear_4xx_and_stores_nothing(
    api: httpx.Client, body: bytes, headers: dict[str, str], status: int, says: str
) -> None:
    run_id = create_run(api)
    resp = api.post(f"/api/v1/runs/{run_id}/steps", content=body, headers=headers)
    assert resp.status_code == status, resp.text
    payload = resp.json()
    assert payload["error"] and says in payload["detail"], payload
    assert num_steps(api, run_id) == 0


def test_one_bad_step_rejects_the_whole_batch(api: httpx.Client) -> None:
    run_id = create_run(api)
    steps = make_steps(0, 100)
    steps[57]["layer_nonfinite"] = [0, -1, 0]
    resp = post_steps(api, run_id, steps)
    assert resp.status_code == 422 and "steps.57.layer_nonfinite" in resp.json()["detail"]
    dup = make_steps(0, 10) + make_steps(5, 6)
    resp = post_steps(api, run_id, dup)
    assert resp.status_code == 422 and "step 5 appears twice" in resp.json()["detail"]
    assert num_steps(api, run_id) == 0


def test_unknown_run_is_404(api: httpx.Client) -> None:
    resp = post_steps(api, "no-such-run", make_steps(0, 1))
    assert resp.status_code == 404
    assert "no-such-run" in resp.json()["detail"]
    assert api.get("/api/v1/runs/no-such-run").status_code == 404


def test_batch_over_the_limits_is_413(api: httpx.Client, collector: Collector) -> None:
    run_id = create_run(api, layers=["a"])
    limit = collector.settings.max_steps_per_batch
    steps = [{"step": i, "loss": 1.0} for i in range(limit + 1)]
    resp = post_steps(api, run_id, steps)
    assert resp.status_code == 413 and str(limit) in resp.json()["detail"]
    # A gzip bomb: small on the wire, over the body limit once inflated.
    bomb = gzip.compress(b" " * (collector.settings.max_body_bytes + 10))
    resp = api.post(f"/api/v1/runs/{run_id}/steps", content=bomb, headers=GZ)
    assert resp.status_code == 413 and "limit" in resp.json()["detail"]
    assert num_steps(api, run_id) == 0


def test_bad_run_spec_is_422(api: httpx.Client) -> None:
    bad_id = api.post("/api/v1/runs", json={"id": "has space", "layers": []})
    dup_layers = api.post("/api/v1/runs", json={"id": new_run_id(), "layers": ["a", "a"]})
    no_id = api.post("/api/v1/runs", json={"layers": []})
    assert bad_id.status_code == 422 and "id" in bad_id.json()["detail"]
    assert dup_layers.status_code == 422 and "'a'" in dup_layers.json()["detail"]
    assert no_id.status_code == 422


def test_config_with_nonfinite_values_is_stored(api: httpx.Client) -> None:
    run_id = create_run(api, config={"init_loss": math.inf, "eps": 1e-8})
    assert api.get(f"/api/v1/runs/{run_id}").json()["config"] == {
        "init_loss": "Infinity", "eps": 1e-8}


def test_listing_projects_and_runs(api: httpx.Client) -> None:
    project = f"proj-{new_run_id()}"
    ids = {create_run(api, project=project) for _ in range(3)}
    runs = api.get("/api/v1/runs", params={"project": project}).json()
    assert {r["id"] for r in runs} == ids
    projects = {p["name"]: p for p in api.get("/api/v1/projects").json()}
    assert projects[project]["runs"] == 3


def test_numeric_array_literals_read_back_exactly_on_postgres() -> None:
    """The array literals the Postgres ingest path sends for numeric columns keep every
    double bit-exact (NaN, ±Inf, -0.0, subnormals, shortest repr) and NULL."""
    import psycopg

    from server.services.bulk import numeric_array
    from tests.conftest import PG_ADMIN_URL

    floats = [math.nan, math.inf, -math.inf, -0.0, 5e-324, 0.1 + 0.2, 1.7976931348623157e308,
              1e-5, None, 3.0]
    ints = [0, -(2**63), 2**63 - 1, None, 7]
    with psycopg.connect(PG_ADMIN_URL) as conn:
        row = conn.execute("SELECT %s::float8[], %s::int8[]",
                           (numeric_array(floats, float), numeric_array(ints, int))).fetchone()
    assert row is not None
    got_f, got_i = row
    assert got_i == ints
    assert len(got_f) == len(floats)
    for want, got in zip(floats, got_f, strict=True):
        if want is None or math.isnan(want):
            assert got is None if want is None else math.isnan(got)
        else:
            assert got == want and math.copysign(1.0, got) == math.copysign(1.0, want)
