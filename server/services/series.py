"""Reads: scalar series and the layer × step matrix, downsampled on the server."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server import errors
from server.models import LAYER_METRICS, STEP_SERIES, LayerValues, Run, Scalar, Step
from server.schemas import LayersResponse, SeriesOut, SeriesResponse
from server.services.downsample import Buckets, bucket_size, downsample
from server.services.runs import get_run


def _step_range(
    session: Session, run: Run, start: int | None, end: int | None
) -> tuple[int, int] | None:
    """The first and last stored step of ``run`` inside [start, end], if any."""
    query = select(func.min(Step.step), func.max(Step.step)).where(Step.run_pk == run.pk)
    if start is not None:
        query = query.where(Step.step >= start)
    if end is not None:
        query = query.where(Step.step <= end)
    first, last = session.execute(query).one()
    return None if first is None else (int(first), int(last))


def _series_values(
    session: Session, run: Run, name: str, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray]:
    if name in STEP_SERIES:
        col = getattr(Step, name)
        query = select(Step.step, col).where(Step.run_pk == run.pk, col.is_not(None))
        query = query.where(Step.step >= lo, Step.step <= hi).order_by(Step.step)
    else:
        query = (
            select(Scalar.step, Scalar.value)
            .where(Scalar.run_pk == run.pk, Scalar.name == name)
            .where(Scalar.step >= lo, Scalar.step <= hi)
            .order_by(Scalar.step)
        )
    rows = session.execute(query).all()
    steps = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    values = np.fromiter((r[1] for r in rows), dtype=np.float64, count=len(rows))
    return steps, values


def _with_window_extremes(
    session: Session, run: Run, name: str, lo: int, hi: int, steps: np.ndarray,
    values: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """``name``'s samples plus its logging windows' max and min (series ``name:max`` and
    ``name:min``) at the windows' last steps, so a bucket's envelope covers the steps a
    client aggregated instead of sending (``log_every``). Ordered by step again."""
    extra = [_series_values(session, run, f"{name}:{stat}", lo, hi) for stat in ("max", "min")]
    if not any(s.size for s, _ in extra):
        return steps, values
    all_steps = np.concatenate([steps, *(s for s, _ in extra)])
    all_values = np.concatenate([values, *(v for _, v in extra)])
    order = np.argsort(all_steps, kind="stable")
    return all_steps[order], all_values[order]


def _unknown_names(session: Session, run: Run, names: list[str]) -> list[str]:
    extra = [n for n in names if n not in STEP_SERIES]
    if not extra:
        return []
    known = set(
        session.scalars(
            select(Scalar.name).where(Scalar.run_pk == run.pk, Scalar.name.in_(extra)).distinct()
        )
    )
    return [n for n in extra if n not in known]


def read_series(
    session: Session,
    run_id: str,
    names: list[str],
    start: int | None,
    end: int | None,
    max_points: int,
) -> SeriesResponse:
    """Series ``names`` of a run over [start, end] in at most ``max_points`` buckets."""
    run = get_run(session, run_id)
    unknown = _unknown_names(session, run, names)
    if unknown:
        raise errors.SeriesNotFound(
            f"run {run_id!r} has no series {unknown}; built-in series are {list(STEP_SERIES)}"
        )
    span = _step_range(session, run, start, end)
    out = []
    for name in names:
        if span is None:
            steps, values = np.empty(0, np.int64), np.empty(0)
            size = 1
        else:
            steps, values = _series_values(session, run, name, *span)
            steps, values = _with_window_extremes(session, run, name, *span, steps, values)
            size = bucket_size(span[0], span[1], max_points)
        origin = span[0] if span else 0
        b = downsample(steps, values, origin, size)
        out.append(SeriesOut(name=name, **_lists(b)))
    return SeriesResponse(run=run_id, series=out)


def read_layers(
    session: Session,
    run_id: str,
    metric: str,
    layers: list[str] | None,
    start: int | None,
    end: int | None,
    max_points: int,
) -> LayersResponse:
    """The layer × step matrix of ``metric``, bucketed along steps (min/max kept)."""
    if metric not in LAYER_METRICS:
        raise errors.InvalidInput(f"unknown layer metric {metric!r}; use one of {LAYER_METRICS}")
    run = get_run(session, run_id)
    index = {name: i for i, name in enumerate(run.layers)}
    if layers:
        missing = [name for name in layers if name not in index]
        if missing:
            raise errors.SeriesNotFound(f"run {run_id!r} has no layers {missing}")
        cols = [index[name] for name in layers]
    else:
        layers, cols = list(run.layers), list(range(len(run.layers)))
    steps, matrix = _layer_matrix(session, run, metric, start, end)
    if metric == "grad_norm":  # logging windows' extremes, as in _with_window_extremes
        parts = [(steps, matrix)]
        parts += [_layer_matrix(session, run, f"{metric}:{s}", start, end) for s in ("max", "min")]
        if len(parts) > 1 and any(p[0].size for p in parts[1:]):
            steps = np.concatenate([p[0] for p in parts])
            order = np.argsort(steps, kind="stable")
            steps, matrix = steps[order], np.concatenate([p[1] for p in parts])[order]
    rows = steps.size
    matrix = matrix[:, cols].astype(np.float64)
    size = bucket_size(int(steps[0]), int(steps[-1]), max_points) if rows else 1
    b = downsample(steps, matrix, int(steps[0]) if rows else 0, size)
    lists = _lists(b)
    for key in ("min", "max", "nonfinite"):  # rows = layers, as a heatmap wants them
        lists[key] = getattr(b, key).T.tolist()
    return LayersResponse(run=run_id, metric=metric, layers=layers, **lists)


def _layer_matrix(
    session: Session, run: Run, metric: str, start: int | None, end: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Steps and the step × layer float32 matrix of one layer metric, ordered by step."""
    query = select(LayerValues.step, LayerValues.values).where(
        LayerValues.run_pk == run.pk, LayerValues.metric == metric
    )
    if start is not None:
        query = query.where(LayerValues.step >= start)
    if end is not None:
        query = query.where(LayerValues.step <= end)
    rows = session.execute(query.order_by(LayerValues.step)).all()
    steps = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    matrix = np.stack([r[1] for r in rows]) if rows else np.empty((0, len(run.layers)), "<f4")
    return steps, matrix


def _lists(b: Buckets) -> dict[str, Any]:
    return {
        "bucket_size": b.size,
        "step": b.step.tolist(),
        "step_end": b.step_end.tolist(),
        "min": b.min.tolist(),
        "max": b.max.tolist(),
        "nonfinite": b.nonfinite.tolist(),
    }
