"""Hypothesis on the wire format, against a live collector on each backend.

Valid batches (any subset of the record's fields; NaN, ±Inf, huge and tiny doubles; windows,
noise-scale statistics, learning rates per group, extra scalars; steps up to 2**62) are
answered 200 and read back exactly, from the database rows and through the REST API; a
replayed batch changes nothing. Mutated batches (wrong types, wrong layer counts, duplicate
steps, huge numbers, bad names, corrupt or truncated bodies, wrong headers, over the limits)
are answered 4xx with a message and leave every row of the run as it was. Never a 5xx.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from client_hooks import wire
from server.db import make_engine
from server.models import Base, LayerValues, Run, Scalar, Step
from tests.conftest import new_run_id
from tests.factories import create_run, make_steps, post_steps
from tests.fuzz.conftest import AUTH_HEADERS, FuzzCollector
from tests.fuzz.wire_strategies import (
    LAYER_NAMES,
    WRONG,
    encode,
    expected_rows,
    invalid_batch,
    same,
    valid_batch,
)

# Bounded: no deadline per example (a shared machine), no shrinking (each example is HTTP
# requests; the failing one is printed as drawn), no example database.
FUZZ: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "phases": [Phase.explicit, Phase.generate],
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.function_scoped_fixture],
}


@pytest.fixture(scope="module")
def engine(fuzz_collector: FuzzCollector) -> Iterator[Engine]:
    eng = make_engine(fuzz_collector.settings.database_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def api(fuzz_collector: FuzzCollector) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_collector.url, headers=AUTH_HEADERS, timeout=60) as client:
        yield client


def run_pk(engine: Engine, run_id: str) -> int:
    with Session(engine) as session:
        pk = session.scalar(select(Run.pk).where(Run.id == run_id))
    assert pk is not None
    return pk


def _plain(value: Any) -> Any:
    """A stored value in a form that compares by content (NaN equal to NaN)."""
    if isinstance(value, np.ndarray):
        return value.tobytes()
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return value


def snapshot(engine: Engine, pk: int, times: bool = True) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the run owns, in every table that has one (runs, steps, layer values,
    scalars, rollups, alerts...), in a comparable form; without time stamps if not ``times``."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with Session(engine) as session:
        for table in Base.metadata.sorted_tables:
            column = table.c.get("run_pk") if table.name != "runs" else table.c.pk
            if column is None:
                continue
            rows = session.execute(select(table).where(column == pk)).all()
            out[table.name] = sorted(
                (tuple(_plain(v) for v in row if times or not isinstance(v, datetime))
                 for row in rows), key=repr)
    return out


def stored(engine: Engine, pk: int) -> tuple[dict[int, Step], dict[tuple[str, int], np.ndarray],
                                             dict[tuple[str, int], float | None]]:
    with Session(engine) as session:
        steps = {s.step: s for s in session.scalars(select(Step).where(Step.run_pk == pk))}
        layers = {(v.metric, v.step): v.values for v in
                  session.scalars(select(LayerValues).where(LayerValues.run_pk == pk))}
        scalars = {(v.name, v.step): v.value for v in
                   session.scalars(select(Scalar).where(Scalar.run_pk == pk))}
    return steps, layers, scalars


def wire_value(x: Any) -> float:
    return float(wire.decode_float(x))


def check_rows(engine: Engine, run_id: str, batch: list[dict[str, Any]], n_layers: int) -> None:
    """The run's rows are exactly what the batch says, nothing more."""
    steps, layers, scalars = stored(engine, run_pk(engine, run_id))
    assert sorted(steps) == sorted(r["step"] for r in batch)
    want_layers: dict[tuple[str, int], np.ndarray] = {}
    want_scalars: dict[tuple[str, int], float] = {}
    for rec in batch:
        cols, vecs, extra = expected_rows(rec, n_layers)
        row = steps[rec["step"]]
        for name, want in cols.items():
            got = getattr(row, name)
            assert same(got, want), (rec["step"], name, got, want)
        want_layers.update({(m, rec["step"]): v for m, v in vecs.items()})
        want_scalars.update({(k, rec["step"]): v for k, v in extra.items()})
    assert layers.keys() == want_layers.keys()
    for key, want in want_layers.items():
        assert same(layers[key], want), (key, layers[key], want)
    assert scalars.keys() == want_scalars.keys()
    for key, want in want_scalars.items():
        assert same(scalars[key], float(want)), (key, scalars[key], want)


def check_api(api: httpx.Client, run_id: str, batch: list[dict[str, Any]]) -> None:
    """The REST reads give back the values sent (NaN and ±Inf as the wire strings)."""
    lo, hi = min(r["step"] for r in batch), max(r["step"] for r in batch)
    names = ["loss", "grad_norm", *sorted({k for r in batch for k in r.get("scalars", {})})]
    got = api.get(f"/api/v1/runs/{run_id}/series",
                  params={"names": ",".join(names), "start": lo, "end": hi, "max_points": 64})
    assert got.status_code == 200, got.text
    for series in got.json()["series"]:
        name = series["name"]
        sent = {r["step"]: (r.get("scalars", {}) if name not in ("loss", "grad_norm") else r)
                .get(name) for r in batch}
        sent = {s: v for s, v in sent.items() if v is not None}
        assert series["bucket_size"] == 1 and series["step"] == sorted(sent), name
        for i, step in enumerate(series["step"]):
            for key in ("min", "max"):
                assert same(wire_value(series[key][i]), float(sent[step])), (name, step)
            assert series["nonfinite"][i] == int(not math.isfinite(sent[step]))
    with_layers = [r for r in batch if "layer_grad_norms" in r]
    if with_layers:
        got = api.get(f"/api/v1/runs/{run_id}/layers",
                      params={"start": lo, "end": hi, "max_points": 64})
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["step"] == [r["step"] for r in sorted(with_layers, key=lambda r: r["step"])]
        for j, rec in enumerate(sorted(with_layers, key=lambda r: r["step"])):
            want = expected_rows(rec, len(body["layers"]))[1]["grad_norm"]
            row = np.array([wire_value(body["max"][i][j]) for i in range(len(want))], "<f4")
            assert same(row, want), (rec["step"], row, want)


@settings(max_examples=20, **FUZZ)
@given(data=st.data())
def test_valid_batches_are_stored_exactly(
    api: httpx.Client, engine: Engine, data: st.DataObject
) -> None:
    layers = data.draw(LAYER_NAMES, label="layers")
    run_id = create_run(api, layers=layers, project="wire-fuzz")
    batch = data.draw(valid_batch(len(layers)), label="batch")
    body, headers = encode(batch, compress=data.draw(st.booleans(), label="gzip"))
    resp = api.post(f"/api/v1/runs/{run_id}/steps", content=body, headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["accepted"] == len(batch)
    check_rows(engine, run_id, batch, len(layers))
    if not any("window" in r for r in batch):  # windows widen the envelopes: rows say it
        check_api(api, run_id, batch)
    # A retried batch (the client did not see the answer) changes nothing.
    pk = run_pk(engine, run_id)
    before = snapshot(engine, pk, times=False)
    again = api.post(f"/api/v1/runs/{run_id}/steps", content=body, headers=headers)
    assert again.status_code == 200, again.text
    assert snapshot(engine, pk, times=False) == before


@pytest.fixture(scope="module")
def target(api: httpx.Client, engine: Engine) -> tuple[str, int, list[int]]:
    """A run with stored steps (and a NaN step, hence an alert) that bad batches aim at."""
    run_id = create_run(api, layers=["x", "y", "z"], project="wire-fuzz",
                        id=new_run_id("target"))
    steps = make_steps(0, 40)
    steps[7]["loss"] = math.nan
    assert post_steps(api, run_id, steps).status_code == 200
    return run_id, run_pk(engine, run_id), [s["step"] for s in steps]


@settings(max_examples=50, **FUZZ)
@given(data=st.data())
def test_bad_batches_are_refused_and_change_nothing(
    api: httpx.Client, engine: Engine, target: tuple[str, int, list[int]], data: st.DataObject
) -> None:
    run_id, pk, steps = target
    kind, body, headers = data.draw(invalid_batch(3, steps), label="bad batch")
    before = snapshot(engine, pk)
    resp = api.post(f"/api/v1/runs/{run_id}/steps", content=body, headers=headers)
    assert 400 <= resp.status_code < 500, (kind, resp.status_code, resp.text[:500])
    answer = resp.json()
    assert answer["error"] and answer["detail"], (kind, answer)
    assert snapshot(engine, pk) == before, kind


def test_every_wrong_value_is_refused(
    api: httpx.Client, engine: Engine, target: tuple[str, int, list[int]]
) -> None:
    """Each junk value of WRONG, in every field it is listed for (not left to chance)."""
    run_id, pk, steps = target
    before = snapshot(engine, pk)
    for field, values in WRONG.items():
        for value in values:
            rec = {**make_steps(steps[-1], steps[-1] + 1)[0], field: value}
            body, headers = encode([make_steps(1000, 1001)[0], rec], compress=False)
            resp = api.post(f"/api/v1/runs/{run_id}/steps", content=body, headers=headers)
            assert resp.status_code == 422, (field, value, resp.status_code, resp.text)
            assert field in resp.json()["detail"], (field, value, resp.json())
    assert snapshot(engine, pk) == before
