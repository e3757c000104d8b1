"""Layer rollups: reads through them equal a brute-force computation over the stored steps."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, delete, select
from sqlalchemy.orm import Session

from server.models import Run
from server.models_rollups import LayerRollup, SeriesRollup
from server.services.rollups import rebuild, rebuild_series
from tests.conftest import Collector
from tests.factories import create_run, post_steps

LAYERS = ["a", "b", "c"]


def _loss(v: np.ndarray) -> float | None:
    """The loss sent with a step, from its layer values; None (not reported) at times."""
    x = float(v[0]) * 3 + float(v[2])
    return None if math.isfinite(x) and int(abs(x) * 1000) % 11 == 0 else x


def _steps(values: dict[int, np.ndarray]) -> list[dict[str, object]]:
    return [
        {"step": s, "loss": _loss(v), "grad_norm": 1.0, "layer_grad_norms": [float(x) for x in v]}
        for s, v in sorted(values.items())
    ]


@pytest.fixture(scope="module")
def stored(collector: Collector) -> tuple[str, dict[int, np.ndarray]]:
    """A run written out of order, with gaps, NaN/Inf, a spike and overwritten steps."""
    rng = np.random.default_rng(7)
    truth: dict[int, np.ndarray] = {}
    batches = [
        range(3000, 9000),
        range(0, 3000, 3),
        range(1, 3000, 3),
        range(2500, 3500),
        range(8990, 9100),
        range(40_000, 40_005),
    ]
    with collector.client() as api:
        run_id = create_run(api, layers=LAYERS)
        for steps in batches:
            chunk = {s: rng.lognormal(size=len(LAYERS)) for s in steps}
            for s in list(chunk)[::97]:
                chunk[s][rng.integers(len(LAYERS))] = rng.choice([np.nan, np.inf, -np.inf])
            truth.update(chunk)
            post_steps(api, run_id, _steps(chunk)).raise_for_status()
        truth[5555] = np.array([1.0, 1e6, 1.0])  # a one-step spike, written as an overwrite
        post_steps(api, run_id, _steps({5555: truth[5555]})).raise_for_status()
    return run_id, truth


def _expected(truth: dict[int, np.ndarray], lo: int, hi: int) -> tuple[list, list, list]:
    sel = np.array([truth[s] for s in sorted(truth) if lo <= s <= hi], dtype=np.float32)
    sel = sel.astype(np.float64)
    with np.errstate(invalid="ignore"):
        vmin = np.fmin.reduce(sel, axis=0)
        vmax = np.fmax.reduce(sel, axis=0)
    return vmin.tolist(), vmax.tolist(), (~np.isfinite(sel)).sum(axis=0).tolist()


def _same(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


def _num(v: object) -> float:
    return float(v) if not isinstance(v, str) else float(v.replace("Infinity", "inf"))


@pytest.mark.parametrize(
    ("start", "end", "points"),
    [
        (None, None, 50),
        (None, None, 7),
        (None, None, 400),
        (17, 8999, 60),
        (100, 3333, 25),
        (5000, 5100, 1000),
        (None, 9100, 3),
        (123, None, 40),
    ],
)
def test_layer_buckets_match_brute_force(
    api: httpx.Client,
    stored: tuple[str, dict[int, np.ndarray]],
    start: int | None,
    end: int | None,
    points: int,
) -> None:
    run_id, truth = stored
    params: dict[str, object] = {"max_points": points}
    if start is not None:
        params["start"] = start
    if end is not None:
        params["end"] = end
    got = api.get(f"/api/v1/runs/{run_id}/layers", params=params).json()
    lo, hi = start or 0, end if end is not None else max(truth)
    in_range = [s for s in sorted(truth) if lo <= s <= hi]
    assert 0 < len(got["step"]) <= points
    assert got["step"][0] == in_range[0] and got["step_end"][-1] == in_range[-1]
    covered = 0
    for i, (a, b) in enumerate(zip(got["step"], got["step_end"], strict=True)):
        assert a in truth and b in truth and a <= b
        assert (b - a) < got["bucket_size"]
        if i:
            assert a > got["step_end"][i - 1]
        covered += sum(1 for s in in_range if a <= s <= b)
        vmin, vmax, bad = _expected(truth, a, b)
        assert _same([_num(r[i]) for r in got["min"]], vmin)
        assert _same([_num(r[i]) for r in got["max"]], vmax)
        assert [r[i] for r in got["nonfinite"]] == bad
    assert covered == len(in_range)  # buckets partition the stored steps
    if lo <= 5555 <= hi:
        k = next(i for i, b in enumerate(got["step_end"]) if b >= 5555)
        assert _num(got["max"][1][k]) >= 1e6  # the spike survives in its bucket


@pytest.mark.parametrize(
    ("start", "end", "points"),
    [
        (None, None, 50),
        (17, 8999, 60),
        (100, 3333, 25),
        (5000, 5100, 1000),
        (123, None, 40),
    ],
)
def test_series_buckets_match_brute_force(
    api: httpx.Client,
    stored: tuple[str, dict[int, np.ndarray]],
    start: int | None,
    end: int | None,
    points: int,
) -> None:
    run_id, truth = stored
    loss = {s: _loss(v) for s, v in truth.items()}
    loss = {s: v for s, v in loss.items() if v is not None}
    params: dict[str, object] = {"names": "loss", "max_points": points}
    if start is not None:
        params["start"] = start
    if end is not None:
        params["end"] = end
    got = api.get(f"/api/v1/runs/{run_id}/series", params=params).json()["series"][0]
    lo, hi = start or 0, end if end is not None else max(truth)
    in_range = [s for s in sorted(loss) if lo <= s <= hi]
    assert 0 < len(got["step"]) <= points
    covered = 0
    for i, (a, b) in enumerate(zip(got["step"], got["step_end"], strict=True)):
        sel = np.array([loss[s] for s in in_range if a <= s <= b])
        assert sel.size and a in loss and b in loss
        covered += sel.size
        with np.errstate(invalid="ignore"):
            want = (float(np.fmin.reduce(sel)), float(np.fmax.reduce(sel)))
        assert _same([_num(got["min"][i]), _num(got["max"][i])], list(want))
        assert got["nonfinite"][i] == int((~np.isfinite(sel)).sum())
    assert covered == len(in_range)


def snapshot(session: Session, pk: int) -> dict[tuple[str, int, int], tuple[object, ...]]:
    """Every rollup row of run ``pk``, bytes and reprs exact (-0.0 differs from 0.0)."""
    out: dict[tuple[str, int, int], tuple[object, ...]] = {}
    for r in session.scalars(select(LayerRollup).where(LayerRollup.run_pk == pk)):
        out[(f"layer:{r.metric}", r.level, r.block)] = (
            r.step_first,
            r.step_last,
            r.vmin.tobytes(),
            r.vmax.tobytes(),
            r.nonfinite.tobytes(),
        )
    for q in session.scalars(select(SeriesRollup).where(SeriesRollup.run_pk == pk)):
        out[(f"series:{q.name}", q.level, q.block)] = (
            q.step_first,
            q.step_last,
            repr(q.vmin),
            repr(q.vmax),
            q.nonfinite,
        )
    return out


def test_incremental_rollups_equal_a_rebuild(
    collector: Collector, stored: tuple[str, dict[int, np.ndarray]]
) -> None:
    """What ingest maintained batch by batch equals a rebuild from the stored steps."""
    run_id, _ = stored
    engine = create_engine(collector.settings.database_url)


    with Session(engine) as session:
        pk = session.scalar(select(Run.pk).where(Run.id == run_id))
        assert pk is not None
        incremental = snapshot(session, pk)
        session.execute(delete(LayerRollup).where(LayerRollup.run_pk == pk))
        session.execute(delete(SeriesRollup).where(SeriesRollup.run_pk == pk))
        rebuild(session, pk, "grad_norm")
        rebuild_series(session, pk)
        session.flush()
        rebuilt = snapshot(session, pk)
        session.rollback()
    engine.dispose()
    assert {k[0] for k in rebuilt} == {"layer:grad_norm", "series:grad_norm", "series:loss"}
    assert incremental.keys() == rebuilt.keys() and len(rebuilt) > 200
    assert incremental == rebuilt


def test_signed_zeros_leave_rollups_unchanged_on_retry(collector: Collector) -> None:
    """0.0 and -0.0 in one block: a retried or reordered batch leaves every rollup row
    byte-identical (the wire fuzzer found the block's min flipping between them)."""
    engine = create_engine(collector.settings.database_url)
    order = [39, 22, 51, 29, 0, 48, 3, 2]  # out of order, as the fuzzer sent them
    steps = [
        {"step": s, "loss": -0.0 if s % 3 else 0.0, "grad_norm": 1.0,
         "layer_grad_norms": [-0.0 if s % 2 else 0.0, 0.0 if s % 3 else -0.0, 1.0]}
        for s in order
    ]
    with collector.client() as api:
        run_id = create_run(api, layers=LAYERS)
        post_steps(api, run_id, steps).raise_for_status()
        with Session(engine) as session:
            pk = session.scalar(select(Run.pk).where(Run.id == run_id))
            assert pk is not None
            first = snapshot(session, pk)
        for again in (steps, steps[::-1], sorted(steps, key=lambda r: r["step"])):
            post_steps(api, run_id, again).raise_for_status()
            with Session(engine) as session:
                assert snapshot(session, pk) == first
    engine.dispose()
