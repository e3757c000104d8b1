"""Reads: scalar series and the layer × step matrix, downsampled on the server."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Float, and_, cast, func, literal, or_, select
from sqlalchemy.orm import Session

from server import errors
from server.models import (
    LAYER_METRICS,
    STEP_SERIES,
    WINDOW_STEPS,
    LayerValues,
    Run,
    Scalar,
    Step,
)
from server.models_rollups import ROLLUP_LEVELS
from server.schemas import LayersResponse, SeriesOut, SeriesResponse
from server.services import rollups
from server.services.downsample import Buckets, bucket_size, downsample
from server.services.rollups import Pieces
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


def _series_from_rollups(
    session: Session,
    run: Run,
    names: list[str],
    span: tuple[int, int],
    bounds: tuple[int | None, int | None],
    grid: tuple[int, int, int],
) -> dict[str, Buckets]:
    """Built-in series from ``series_rollups``: whole blocks inside the range, raw edges.

    Empty when the run has no rollups at that level (the caller then reads the steps).
    """
    level, origin, size = grid
    (first, last), (start, end) = span, bounds
    b0 = first // level if start is None else -(-start // level)
    b1 = last // level if end is None else (end + 1) // level - 1
    blocks = rollups.SeriesStore(run.pk).stored(session, names, level, b0, b1)
    if not blocks:
        return {}
    outside = or_(Step.step < b0 * level, Step.step >= (b1 + 1) * level)
    edges: rollups.Keyed = {}
    if first < b0 * level or last >= (b1 + 1) * level:
        edges = rollups.series_raw(
            session, run.pk, names, and_(Step.step.between(first, last), outside)
        )
    out: dict[str, Buckets] = {}
    empty = rollups.Pieces.empty(1)
    for name in names:
        p = blocks.get(name, empty).concat(edges.get(name, empty))
        _, m = p.group((p.first - origin) // size)
        out[name] = Buckets(size, m.first, m.last, m.vmin[:, 0], m.vmax[:, 0], m.nonfinite[:, 0])
    return out


def _series_buckets_sql(
    session: Session, run: Run, names: list[str], span: tuple[int, int], size: int
) -> dict[str, Buckets]:
    """``downsample`` done by PostgreSQL: one row per bucket instead of one per step.

    Same semantics: min/max ignore NaN (Postgres orders NaN above every number, so it is
    filtered out; a bucket of NaN only reads NaN), ±Inf take part, non-finite are counted,
    steps where a series is NULL (not reported) are not part of it. Built-in series are
    read in one scan of ``steps``; each extra scalar by its own query.
    """
    lo, hi = span
    nan, inf = literal(math.nan, Float(53)), literal(math.inf, Float(53))
    builtin = [n for n in names if n in STEP_SERIES]
    queries: list[tuple[list[str], Any, list[Any]]] = []
    if builtin:
        queries.append((builtin, Step.step, [Step.run_pk == run.pk]))
    for name in names:
        if name not in STEP_SERIES:
            queries.append(([name], Scalar.step, [Scalar.run_pk == run.pk, Scalar.name == name]))
    out: dict[str, Buckets] = {}
    for group, step, keys in queries:
        bucket = ((step - lo) // size).label("bucket")
        cols: list[Any] = [bucket]
        for name in group:
            raw = getattr(Step, name) if name in STEP_SERIES else Scalar.value
            value = cast(raw, Float(53))
            present = raw.is_not(None)
            cols += [
                func.count(raw),
                func.min(step).filter(present),
                func.max(step).filter(present),
                func.min(value).filter(value != nan),
                func.max(value).filter(value != nan),
                func.count().filter(or_(value == nan, value == inf, value == -inf)),
            ]
        rows = session.execute(
            select(*cols).where(*keys, step >= lo, step <= hi).group_by(bucket).order_by(bucket)
        ).all()
        for k, name in enumerate(group):
            base = 1 + 6 * k
            mine = [r[base : base + 6] for r in rows if r[base]]
            n = len(mine)

            def col(i: int, dtype: Any, mine: list[Any] = mine, n: int = n) -> np.ndarray:
                return np.fromiter((math.nan if r[i] is None else r[i] for r in mine), dtype, n)

            out[name] = Buckets(
                size,
                col(1, np.int64),
                col(2, np.int64),
                col(3, np.float64),
                col(4, np.float64),
                col(5, np.int64),
            )
    return out


def _unknown_names(session: Session, run: Run, names: list[str]) -> list[str]:
    """Extra (non built-in) names the run never logged: one index probe per name."""
    unknown = []
    for name in dict.fromkeys(n for n in names if n not in STEP_SERIES):
        probe = select(Scalar.step).where(Scalar.run_pk == run.pk, Scalar.name == name)
        if session.scalar(probe.limit(1)) is None:
            unknown.append(name)
    return unknown


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
    size = bucket_size(span[0], span[1], max_points) if span else 1
    unique = list(dict.fromkeys(names))
    in_sql: dict[str, Buckets] = {}
    builtin = [n for n in unique if n in STEP_SERIES]
    grid = _block_grid(span[0], span[1], size, max_points) if span and builtin else None
    if span and grid:
        in_sql = _series_from_rollups(session, run, builtin, span, (start, end), grid)
    rest = [n for n in unique if n not in in_sql]
    if span and rest and size > 1 and session.get_bind().dialect.name == "postgresql":
        in_sql.update(_series_buckets_sql(session, run, rest, span, size))
    windowed = span is not None and _has_windows(session, run)
    out = []
    for name in names:
        if name in in_sql:
            b = in_sql[name]
        elif span is None:
            b = downsample(np.empty(0, np.int64), np.empty(0), 0, size)
        else:
            b = downsample(*_series_values(session, run, name, *span), span[0], size)
        if span is not None and windowed and b.step.size:
            origin = grid[1] if grid and name in builtin and name in in_sql else span[0]
            b = _with_windows(b, _series_windows(session, run, name, span), origin)
        out.append(SeriesOut(name=name, **_lists(b)))
    return SeriesResponse(run=run_id, series=out)


def _has_windows(session: Session, run: Run) -> bool:
    """Whether the client ever logged windows for ``run`` (one index probe): every windowed
    record stores ``window:steps``, so runs logged step by step skip the window reads."""
    probe = select(Scalar.step).where(Scalar.run_pk == run.pk, Scalar.name == WINDOW_STEPS)
    return session.scalar(probe.limit(1)) is not None


def _series_windows(session: Session, run: Run, name: str, span: tuple[int, int]) -> Pieces:
    """The logging windows' extremes of series ``name`` (``name:min``, ``name:max``, stored
    at each window's last step when the client logs every N steps) as one piece per window."""
    lo, hi = span
    mins = dict(zip(*_series_values(session, run, f"{name}:min", lo, hi), strict=True))
    maxs = dict(zip(*_series_values(session, run, f"{name}:max", lo, hi), strict=True))
    steps = np.array(sorted(mins.keys() | maxs.keys()), dtype=np.int64)
    vmin = np.array([mins.get(s, math.nan) for s in steps], dtype=np.float64)[:, None]
    vmax = np.array([maxs.get(s, math.nan) for s in steps], dtype=np.float64)[:, None]
    return Pieces(steps, steps, vmin, vmax, np.zeros(vmin.shape, np.int64))


def _with_windows(b: Buckets, windows: Pieces, origin: int) -> Buckets:
    """Buckets ``b`` widened by the windows' extremes, so the envelope covers the steps a
    client aggregated instead of sending (``log_every``). Non-finite counts stay the
    records' own (the windows' counts are the series ``name:nonfinite``)."""
    if not len(windows):
        return b
    own = Pieces(b.step, b.step_end, b.min[:, None], b.max[:, None], b.nonfinite[:, None])
    merged = own.concat(windows)
    _, m = merged.group((merged.first - origin) // b.size)
    return Buckets(b.size, m.first, m.last, m.vmin[:, 0], m.vmax[:, 0], m.nonfinite[:, 0])


@dataclass(frozen=True)
class LayerMatrix:
    """``LayersResponse`` as numpy: rows of ``min``/``max``/``nonfinite`` are layers."""

    run: str
    metric: str
    layers: list[str]
    bucket_size: int
    step: np.ndarray
    step_end: np.ndarray
    min: np.ndarray
    max: np.ndarray
    nonfinite: np.ndarray


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
    m = layer_matrix(session, run_id, metric, layers, start, end, max_points)
    return LayersResponse(
        run=m.run,
        metric=m.metric,
        layers=m.layers,
        bucket_size=m.bucket_size,
        step=m.step.tolist(),
        step_end=m.step_end.tolist(),
        min=m.min.tolist(),
        max=m.max.tolist(),
        nonfinite=m.nonfinite.tolist(),
    )


def layer_matrix(
    session: Session,
    run_id: str,
    metric: str,
    layers: list[str] | None,
    start: int | None,
    end: int | None,
    max_points: int,
) -> LayerMatrix:
    """The layer × step matrix of ``metric``, bucketed along steps (min/max kept).

    Long ranges read whole blocks from ``layer_rollups`` (buckets are then a whole number
    of blocks, aligned to them) and only the partial blocks at the edges from the steps.
    """
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
    where = _layer_where(run, metric, start, end)
    first, last = session.execute(
        select(func.min(LayerValues.step), func.max(LayerValues.step)).where(where)
    ).one()
    width = len(run.layers)
    if first is None:
        pieces, origin, size = rollups.Pieces.empty(width), 0, 1
    else:
        pieces, origin, size = _layer_pieces(
            session, run, metric, where, (int(first), int(last)), (start, end), max_points
        )
    if metric == "grad_norm" and first is not None and _has_windows(session, run):
        pieces = pieces.concat(_layer_windows(session, run, metric, start, end))
    _, m = pieces.columns(cols).group((pieces.first - origin) // size)
    return LayerMatrix(  # rows = layers, as a heatmap wants them
        run_id, metric, layers, size, m.first, m.last, m.vmin.T, m.vmax.T, m.nonfinite.T
    )


def _layer_where(run: Run, metric: str, start: int | None, end: int | None) -> Any:
    """The ``layer_values`` rows of one metric of ``run`` inside [start, end]."""
    where = and_(LayerValues.run_pk == run.pk, LayerValues.metric == metric)
    if start is not None:
        where = and_(where, LayerValues.step >= start)
    if end is not None:
        where = and_(where, LayerValues.step <= end)
    return where


def _layer_windows(
    session: Session, run: Run, metric: str, start: int | None, end: int | None
) -> Pieces:
    """Per-layer logging-window extremes (layer metrics ``metric:min``/``metric:max``) as one
    piece per window, so the heatmap's buckets cover the steps between records."""
    width = len(run.layers)
    found = {}
    for stat in ("min", "max"):
        where = _layer_where(run, f"{metric}:{stat}", start, end)
        found[stat] = rollups.layer_raw(session, where, width)
    lows, highs = found["min"], found["max"]
    if not len(highs) or not np.array_equal(lows.first, highs.first):
        return Pieces.empty(width)  # both are written together, at the same steps
    return Pieces(highs.first, highs.last, lows.vmin, highs.vmax,
                  np.zeros(highs.vmin.shape, np.int64))


def _block_grid(first: int, last: int, needed: int, max_points: int) -> tuple[int, int, int] | None:
    """(level, origin, bucket size) of the coarsest rollup level whose whole-block buckets
    keep at most ``max_points`` buckets without going past twice the needed bucket size;
    None when even the finest level's blocks are longer than a bucket."""
    for level in reversed(ROLLUP_LEVELS):
        if level > 2 * needed:
            continue
        size = -(-needed // level) * level
        origin = first // level * level
        while (last - origin) // size + 1 > max_points:
            size += level
        if size <= 2 * needed:
            return level, origin, size
    return None


def _layer_pieces(
    session: Session,
    run: Run,
    metric: str,
    where: Any,
    span: tuple[int, int],
    bounds: tuple[int | None, int | None],
    max_points: int,
) -> tuple[rollups.Pieces, int, int]:
    """(pieces to bucket, bucket origin, bucket size) for the steps in ``span``."""
    first, last = span
    width = len(run.layers)
    needed = bucket_size(first, last, max_points)
    grid = _block_grid(first, last, needed, max_points)
    if grid is None:
        return rollups.layer_raw(session, where, width), first, needed
    level, origin, size = grid
    start, end = bounds
    b0 = first // level if start is None else -(-start // level)
    b1 = last // level if end is None else (end + 1) // level - 1
    stored = rollups.LayerStore(run.pk, width).stored(session, [metric], level, b0, b1)
    blocks = stored.get(metric, rollups.Pieces.empty(width))
    if not len(blocks):  # nothing whole inside the range: the steps themselves are few
        return rollups.layer_raw(session, where, width), origin, size
    if first >= b0 * level and last < (b1 + 1) * level:
        return blocks, origin, size  # no partial blocks at the edges
    outside = or_(LayerValues.step < b0 * level, LayerValues.step >= (b1 + 1) * level)
    edges = rollups.layer_raw(session, and_(where, outside), width)
    return blocks.concat(edges), origin, size


def _lists(b: Buckets) -> dict[str, Any]:
    return {
        "bucket_size": b.size,
        "step": b.step.tolist(),
        "step_end": b.step_end.tolist(),
        "min": b.min.tolist(),
        "max": b.max.tolist(),
        "nonfinite": b.nonfinite.tolist(),
    }
