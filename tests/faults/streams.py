"""A client stream with known values (the real ``client_hooks`` Sender delivers it) and the
checks that every sent step is stored exactly once, with its values, and rollups agree."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from sqlalchemy import Engine, create_engine, delete, func, select
from sqlalchemy.orm import Session

from client_hooks.sender import Sender
from server.models import LayerValues, Run, Scalar, Step
from server.models_rollups import LayerRollup, SeriesRollup
from server.services.rollups import rebuild, rebuild_series
from server.settings import Settings


def layer_values(step: int, n_layers: int) -> list[float]:
    """Layer ``l``'s gradient norm at ``step``: varied, with NaN and ±Inf now and then."""
    out = [1.0 + ((step * 131 + layer * 17) % 1009) / 7.0 for layer in range(n_layers)]
    if step % 97 == 5:
        out[step % n_layers] = (math.nan, math.inf, -math.inf)[step % 3]
    if step % 389 == 11:
        out[(step * 7) % n_layers] = 1e6  # a one-step spike
    return out


def loss(step: int) -> float:
    return math.nan if step % 211 == 13 else 3.0 / (1.0 + step) + (step % 5) * 0.01


def record(step: int, n_layers: int) -> dict[str, Any]:
    values = layer_values(step, n_layers)
    finite = [v for v in values if math.isfinite(v)]
    return {"step": step, "wall_time": 1.7e9 + step, "loss": loss(step), "lr": 1e-3,
            "grad_norm": math.sqrt(sum(v * v for v in finite)), "batch_size": 8,
            "layer_grad_norms": values, "scalars": {"attn_logit_max": step * 0.5}}


@dataclass
class Item:
    """What the Sender queues: anything with ``to_record()``."""

    step: int
    n_layers: int

    def to_record(self) -> dict[str, Any]:
        return record(self.step, self.n_layers)


def run_spec(run_id: str, n_layers: int) -> dict[str, Any]:
    return {"id": run_id, "project": "faults", "layers": [f"layer.{i}" for i in range(n_layers)]}


def sender(server: str, run_id: str, n_layers: int, **options: Any) -> Sender:
    """The client's real delivery thread (retries, backoff), no spool: it holds what failed."""
    opts: dict[str, Any] = {"flush_interval": 0.05, "max_queue": 100_000, "http_timeout": 30.0}
    return Sender(server, run_id, run_spec(run_id, n_layers), **{**opts, **options})


def engine_for(database_url: str) -> Engine:
    return create_engine(Settings(database_url=database_url).database_url)


def stored_steps(database_url: str, run_id: str) -> list[int]:
    engine = engine_for(database_url)
    try:
        with Session(engine) as session:
            pk = session.scalar(select(Run.pk).where(Run.id == run_id))
            if pk is None:
                return []
            return list(session.scalars(select(Step.step).where(Step.run_pk == pk)
                                        .order_by(Step.step)))
    finally:
        engine.dispose()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a, b, equal_nan=True))


def check_exactly_once(database_url: str, run_id: str, n_steps: int, n_layers: int) -> None:
    """Steps 0..n_steps-1 stored once each with the values sent; no row of any other step;
    the rollups equal a rebuild from the stored rows."""
    engine = engine_for(database_url)
    try:
        with Session(engine) as session:
            pk = session.scalar(select(Run.pk).where(Run.id == run_id))
            assert pk is not None
            rows = session.execute(select(Step.step, Step.loss).where(Step.run_pk == pk)
                                   .order_by(Step.step)).all()
            assert [r.step for r in rows] == list(range(n_steps))  # none lost, none twice
            for r in rows:
                want = loss(r.step)
                assert r.loss == want or (math.isnan(want) and math.isnan(r.loss)), r.step
            vectors = session.execute(
                select(LayerValues.step, LayerValues.values)
                .where(LayerValues.run_pk == pk, LayerValues.metric == "grad_norm")
                .order_by(LayerValues.step)).all()
            assert [v.step for v in vectors] == list(range(n_steps))
            for v in vectors:
                want = np.asarray(layer_values(v.step, n_layers), dtype="<f4")
                assert _same(v.values, want), v.step
            metrics = session.execute(select(LayerValues.metric, func.count())
                                      .where(LayerValues.run_pk == pk)
                                      .group_by(LayerValues.metric)).all()
            assert dict(metrics) == {"grad_norm": n_steps}
            scalars = dict(session.execute(select(Scalar.step, Scalar.value).where(
                Scalar.run_pk == pk, Scalar.name == "attn_logit_max")).all())
            assert scalars == {s: s * 0.5 for s in range(n_steps)}
            _check_rollups(session, pk)
    finally:
        engine.dispose()


def _check_rollups(session: Session, pk: int) -> None:
    """What ingest maintained batch by batch (retries and all) equals a rebuild."""

    def rollups() -> dict[tuple[str, str, int, int], tuple[Any, ...]]:
        out: dict[tuple[str, str, int, int], tuple[Any, ...]] = {}
        for r in session.scalars(select(LayerRollup).where(LayerRollup.run_pk == pk)):
            out[("layer", r.metric, r.level, r.block)] = (
                r.step_first, r.step_last, r.vmin.tobytes(), r.vmax.tobytes(),
                r.nonfinite.tobytes())
        for q in session.scalars(select(SeriesRollup).where(SeriesRollup.run_pk == pk)):
            out[("series", q.name, q.level, q.block)] = (
                q.step_first, q.step_last, repr(q.vmin), repr(q.vmax), q.nonfinite)
        return out

    incremental = rollups()
    session.execute(delete(LayerRollup).where(LayerRollup.run_pk == pk))
    session.execute(delete(SeriesRollup).where(SeriesRollup.run_pk == pk))
    rebuild(session, pk, "grad_norm")
    rebuild_series(session, pk)
    session.flush()
    rebuilt = rollups()
    session.rollback()
    assert incremental.keys() == rebuilt.keys() and rebuilt
    assert incremental == rebuilt


def check_layer_buckets(server: str, run_id: str, n_steps: int, n_layers: int,
                        max_points: int) -> None:
    """The layer matrix the API serves equals brute force over the values sent."""
    got = httpx.get(f"{server}/api/v1/runs/{run_id}/layers",
                    params={"max_points": max_points}, timeout=30).json()
    truth = np.array([layer_values(s, n_layers) for s in range(n_steps)], dtype="<f4")
    truth = truth.astype(np.float64)
    assert got["step"][0] == 0 and got["step_end"][-1] == n_steps - 1
    for i, (a, b) in enumerate(zip(got["step"], got["step_end"], strict=True)):
        sel = truth[a:b + 1]
        with np.errstate(invalid="ignore"):
            vmin, vmax = np.fmin.reduce(sel, axis=0), np.fmax.reduce(sel, axis=0)
        row_min = np.array([_num(r[i]) for r in got["min"]])
        row_max = np.array([_num(r[i]) for r in got["max"]])
        assert _same(row_min, vmin) and _same(row_max, vmax), (a, b)
        assert [r[i] for r in got["nonfinite"]] == list((~np.isfinite(sel)).sum(axis=0))


def _num(v: object) -> float:
    return float(v) if not isinstance(v, str) else float(v.replace("Infinity", "inf"))
