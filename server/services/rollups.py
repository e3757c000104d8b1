"""Maintain and read the rollup tables (see ``server.models_rollups``).

Blocks are recomputed from what is stored, never merged into, so an upsert that overwrites
a step with a different value (or drops a series from it) leaves every level exact. On
ingest, the finest level is computed from the batch plus the few stored steps of its edge
blocks; each coarser level from the level below (the blocks just computed plus the stored
neighbours at the edges). Every level's blocks in the batch's range are replaced
(delete, insert) in the ingest transaction.

Two stores share that logic: per-layer vectors (``layer_rollups``, keyed by metric) and the
built-in step series (``series_rollups``, keyed by series name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Protocol

import numpy as np
from sqlalchemy import and_, delete, func, insert, not_, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.models import STEP_SERIES, LayerValues, Step
from server.models_rollups import ROLLUP_LEVELS, LayerRollup, SeriesRollup
from server.services.bulk import numeric_array

# Steps per chunk when rebuilding a whole run (a multiple of the coarsest level).
REBUILD_CHUNK = ROLLUP_LEVELS[-1] * 4
INSERT_ROWS = 2000


@dataclass(frozen=True)
class Pieces:
    """Aggregates of disjoint step ranges, ordered by ``first``; one row per piece."""

    first: np.ndarray  # int64 (n,)
    last: np.ndarray  # int64 (n,)
    vmin: np.ndarray  # float64 (n, width)
    vmax: np.ndarray
    nonfinite: np.ndarray  # int64 (n, width)

    @classmethod
    def from_steps(cls, steps: np.ndarray, values: np.ndarray) -> Pieces:
        """Single steps: min = max = value (-0.0 stored as 0.0: with both in a block, which
        one fmin/fmax keep depends on the order, so a retried batch could change a block)."""
        values = values.reshape(len(steps), -1) + 0.0
        return cls(steps, steps, values, values, (~np.isfinite(values)).astype(np.int64))

    @classmethod
    def empty(cls, width: int) -> Pieces:
        none = np.empty(0, np.int64)
        vals = np.empty((0, width), np.float64)
        return cls(none, none, vals, vals, vals.astype(np.int64))

    def __len__(self) -> int:
        return int(self.first.size)

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.first, self.last, self.vmin, self.vmax, self.nonfinite)

    def concat(self, other: Pieces) -> Pieces:
        """Both sets of pieces, ordered by first step (they must not overlap)."""
        if not len(other):
            return self
        if not len(self):
            return other
        order = np.argsort(np.r_[self.first, other.first], kind="stable")
        pairs = zip(self._arrays(), other._arrays(), strict=True)
        return Pieces(*(np.concatenate([a, b])[order] for a, b in pairs))

    def columns(self, cols: Sequence[int]) -> Pieces:
        idx = list(cols)
        if idx == list(range(self.vmin.shape[1])):
            return self
        return Pieces(
            self.first, self.last, self.vmin[:, idx], self.vmax[:, idx], self.nonfinite[:, idx]
        )

    def group(self, keys: np.ndarray) -> tuple[np.ndarray, Pieces]:
        """Merge pieces with equal consecutive ``keys``: (key of each group, merged pieces).

        min/max ignore NaN (``fmin``/``fmax``) as ``downsample`` does; counts add up.
        """
        if not len(self):
            return keys[:0], self
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        with np.errstate(invalid="ignore"):
            vmin = np.fmin.reduceat(self.vmin, starts, axis=0)
            vmax = np.fmax.reduceat(self.vmax, starts, axis=0)
        nonfinite = np.add.reduceat(self.nonfinite, starts, axis=0)
        last = np.maximum.reduceat(self.last, starts)  # = last[ends] for disjoint pieces
        return keys[starts], Pieces(self.first[starts], last, vmin, vmax, nonfinite)


Keyed = dict[str, Pieces]


class BlockStore(Protocol):
    def stored(
        self,
        session: Session,
        keys: Sequence[str],
        level: int,
        b0: int,
        b1: int,
        skip: tuple[int, int] | None,
    ) -> Keyed: ...

    def replace(
        self,
        session: Session,
        level: int,
        b0: int,
        b1: int,
        keys: Sequence[str],
        blocks: Mapping[str, tuple[np.ndarray, Pieces]],
    ) -> None: ...


def _insert(session: Session, table: Any, rows: list[dict[str, Any]]) -> None:
    for lo in range(0, len(rows), INSERT_ROWS):
        session.execute(insert(table), rows[lo : lo + INSERT_ROWS])


@dataclass(frozen=True)
class LayerStore:
    """``layer_rollups`` of one run; keys are layer metrics."""

    run_pk: int
    width: int

    def stored(
        self,
        session: Session,
        keys: Sequence[str],
        level: int,
        b0: int,
        b1: int,
        skip: tuple[int, int] | None = None,
    ) -> Keyed:
        t = LayerRollup
        where = and_(
            t.run_pk == self.run_pk,
            t.metric.in_(list(keys)),
            t.level == level,
            t.block.between(b0, b1),
        )
        if skip is not None:
            where = and_(where, not_(t.block.between(*skip)))
        rows = (
            session.connection()
            .execute(
                select(t.metric, t.step_first, t.step_last, t.vmin, t.vmax, t.nonfinite)
                .where(where)
                .order_by(t.metric, t.block)
            )
            .all()
        )
        out: Keyed = {}
        for key, group in groupby(rows, key=lambda r: str(r[0])):
            mine = list(group)
            if mine:
                out[key] = Pieces(
                    np.fromiter((r[1] for r in mine), np.int64, len(mine)),
                    np.fromiter((r[2] for r in mine), np.int64, len(mine)),
                    np.stack([r[3] for r in mine]).astype(np.float64),
                    np.stack([r[4] for r in mine]).astype(np.float64),
                    np.stack([r[5] for r in mine]).astype(np.int64),
                )
        return out

    def replace(
        self,
        session: Session,
        level: int,
        b0: int,
        b1: int,
        keys: Sequence[str],
        blocks: Mapping[str, tuple[np.ndarray, Pieces]],
    ) -> None:
        t = LayerRollup
        session.execute(
            delete(t).where(
                t.run_pk == self.run_pk,
                t.metric.in_(list(keys)),
                t.level == level,
                t.block.between(b0, b1),
            )
        )
        rows = [
            {
                "run_pk": self.run_pk,
                "metric": key,
                "level": level,
                "block": int(b),
                "step_first": int(p.first[i]),
                "step_last": int(p.last[i]),
                "vmin": p.vmin[i],
                "vmax": p.vmax[i],
                "nonfinite": p.nonfinite[i],
            }
            for key, (ids, p) in blocks.items()
            for i, b in enumerate(ids.tolist())
        ]
        _insert(session, t.__table__, rows)


@dataclass(frozen=True)
class SeriesStore:
    """``series_rollups`` of one run; keys are built-in step series (width 1)."""

    run_pk: int

    def stored(
        self,
        session: Session,
        keys: Sequence[str],
        level: int,
        b0: int,
        b1: int,
        skip: tuple[int, int] | None = None,
    ) -> Keyed:
        t = SeriesRollup
        where = and_(
            t.run_pk == self.run_pk,
            t.name.in_(list(keys)),
            t.level == level,
            t.block.between(b0, b1),
        )
        if skip is not None:
            where = and_(where, not_(t.block.between(*skip)))
        rows = (
            session.connection()
            .execute(
                select(t.name, t.step_first, t.step_last, t.vmin, t.vmax, t.nonfinite)
                .where(where)
                .order_by(t.name, t.block)
            )
            .all()
        )
        out: Keyed = {}
        for key, group in groupby(rows, key=lambda r: str(r[0])):
            mine = list(group)
            if mine:
                n = len(mine)
                out[key] = Pieces(
                    np.fromiter((r[1] for r in mine), np.int64, n),
                    np.fromiter((r[2] for r in mine), np.int64, n),
                    np.fromiter((r[3] for r in mine), np.float64, n).reshape(n, 1),
                    np.fromiter((r[4] for r in mine), np.float64, n).reshape(n, 1),
                    np.fromiter((r[5] for r in mine), np.int64, n).reshape(n, 1),
                )
        return out

    def replace(
        self,
        session: Session,
        level: int,
        b0: int,
        b1: int,
        keys: Sequence[str],
        blocks: Mapping[str, tuple[np.ndarray, Pieces]],
    ) -> None:
        t = SeriesRollup
        session.execute(
            delete(t).where(
                t.run_pk == self.run_pk,
                t.name.in_(list(keys)),
                t.level == level,
                t.block.between(b0, b1),
            )
        )
        rows = [
            {
                "run_pk": self.run_pk,
                "name": key,
                "level": level,
                "block": int(b),
                "step_first": int(p.first[i]),
                "step_last": int(p.last[i]),
                "vmin": float(p.vmin[i, 0]),
                "vmax": float(p.vmax[i, 0]),
                "nonfinite": int(p.nonfinite[i, 0]),
            }
            for key, (ids, p) in blocks.items()
            for i, b in enumerate(ids.tolist())
        ]
        _insert(session, t.__table__, rows)


def cascade(
    session: Session, store: BlockStore, keys: Sequence[str], lo: int, hi: int, fresh: Keyed
) -> None:
    """Rewrite every level's blocks covering steps [lo, hi] for ``keys``.

    ``fresh[key]`` holds every stored step of ``key`` in the finest blocks covering
    [lo, hi] (as pieces); a key without any there has its blocks in range removed.
    """
    child: int | None = None
    for level in ROLLUP_LEVELS:
        b0, b1 = lo // level, hi // level
        if child is not None:
            per = level // child
            edges = store.stored(
                session, keys, child, b0 * per, (b1 + 1) * per - 1, (lo // child, hi // child)
            )
            for key, more in edges.items():
                fresh[key] = fresh[key].concat(more) if key in fresh else more
        grouped = {key: p.group(p.first // level) for key, p in fresh.items() if len(p)}
        store.replace(session, level, b0, b1, keys, grouped)
        fresh = {key: g[1] for key, g in grouped.items()}
        child = level


def _span(steps: Iterable[int]) -> tuple[int, int, int, int]:
    """(lo, hi) of ``steps`` and the step range of the finest blocks covering them."""
    s = list(steps)
    lo, hi = min(s), max(s)
    finest = ROLLUP_LEVELS[0]
    return lo, hi, lo // finest * finest, (hi // finest + 1) * finest - 1


def layer_raw(session: Session, where: Any, width: int) -> Pieces:
    """The stored layer vectors matching ``where``, one piece per step."""
    rows = session.execute(
        select(LayerValues.step, LayerValues.values).where(where).order_by(LayerValues.step)
    ).all()
    if not rows:
        return Pieces.empty(width)
    steps = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    return Pieces.from_steps(steps, np.stack([r[1] for r in rows]).astype(np.float64))


def series_raw(session: Session, run_pk: int, names: Sequence[str], where: Any) -> Keyed:
    """The stored built-in series ``names`` at the steps matching ``where`` (NULLs left out)."""
    cols = [getattr(Step, n) for n in names]
    rows = session.execute(
        select(Step.step, *cols).where(Step.run_pk == run_pk, where).order_by(Step.step)
    ).all()
    out: Keyed = {}
    for k, name in enumerate(names, start=1):
        mine = [(r[0], r[k]) for r in rows if r[k] is not None]
        if mine:
            steps = np.fromiter((s for s, _ in mine), np.int64, len(mine))
            values = np.fromiter((float(v) for _, v in mine), np.float64, len(mine))
            out[name] = Pieces.from_steps(steps, values)
    return out


def refresh_layers(
    session: Session, run_pk: int, width: int, layer_rows: Sequence[dict[str, Any]]
) -> None:
    """Bring ``layer_rollups`` up to date after ingest upserted ``layer_rows``."""
    if not layer_rows:
        return
    lo, hi, a, b = _span(r["step"] for r in layer_rows)
    fresh = _fresh_layers(layer_rows)
    for metric, pieces in list(fresh.items()):
        steps = pieces.first
        in_range = and_(
            LayerValues.run_pk == run_pk,
            LayerValues.metric == metric,
            LayerValues.step.between(a, b),
        )
        stored = set(session.scalars(select(LayerValues.step).where(in_range)))
        others = sorted(stored.difference(steps.tolist()))
        if others:
            more = layer_raw(session, and_(in_range, LayerValues.step.in_(others)), width)
            fresh[metric] = fresh[metric].concat(more)
    cascade(session, LayerStore(run_pk, width), list(fresh), lo, hi, fresh)


def refresh_series(session: Session, run_pk: int, step_rows: Sequence[dict[str, Any]]) -> None:
    """Bring ``series_rollups`` up to date after ingest upserted ``step_rows``."""
    if not step_rows:
        return
    lo, hi, a, b = _span(r["step"] for r in step_rows)
    batch_steps = [r["step"] for r in step_rows]
    # Series the batch reports, and those stored in range (an overwrite may have NULLed one).
    keys = {n for n in STEP_SERIES if any(r.get(n) is not None for r in step_rows)}
    t = SeriesRollup
    keys.update(
        session.scalars(
            select(t.name)
            .distinct()
            .where(
                t.run_pk == run_pk,
                t.level == ROLLUP_LEVELS[0],
                t.block.between(lo // ROLLUP_LEVELS[0], hi // ROLLUP_LEVELS[0]),
            )
        )
    )
    names = [n for n in STEP_SERIES if n in keys]
    if not names:
        return
    fresh = _fresh_series(step_rows)
    in_range = Step.step.between(a, b)
    stored = set(session.scalars(select(Step.step).where(Step.run_pk == run_pk, in_range)))
    others = sorted(stored.difference(batch_steps))
    if others:
        for name, more in series_raw(session, run_pk, names, Step.step.in_(others)).items():
            fresh[name] = fresh[name].concat(more) if name in fresh else more
    cascade(session, SeriesStore(run_pk), names, lo, hi, fresh)


def rebuild(session: Session, run_pk: int, metric: str) -> None:
    """Recompute every layer rollup of (run, metric) from the stored steps, chunk by chunk."""
    where = and_(LayerValues.run_pk == run_pk, LayerValues.metric == metric)
    first, last = session.execute(
        select(func.min(LayerValues.step), func.max(LayerValues.step)).where(where)
    ).one()
    if first is None:
        return
    for lo in range(int(first) // REBUILD_CHUNK * REBUILD_CHUNK, int(last) + 1, REBUILD_CHUNK):
        hi = lo + REBUILD_CHUNK - 1
        raw = layer_raw(session, and_(where, LayerValues.step.between(lo, hi)), 0)
        if len(raw):
            store = LayerStore(run_pk, raw.vmin.shape[1])
            cascade(session, store, [metric], lo, hi, {metric: raw})


def rebuild_series(session: Session, run_pk: int) -> None:
    """Recompute every series rollup of a run from its stored steps."""
    first, last = session.execute(
        select(func.min(Step.step), func.max(Step.step)).where(Step.run_pk == run_pk)
    ).one()
    if first is None:
        return
    names = list(STEP_SERIES)
    for lo in range(int(first) // REBUILD_CHUNK * REBUILD_CHUNK, int(last) + 1, REBUILD_CHUNK):
        hi = lo + REBUILD_CHUNK - 1
        fresh = series_raw(session, run_pk, names, Step.step.between(lo, hi))
        cascade(session, SeriesStore(run_pk), names, lo, hi, fresh)


# -- appends: fold new steps into the stored blocks ---------------------------------------
#
# When none of a batch's steps was stored before (the common case: a run appending), every
# block the batch touches is its stored aggregate combined with the batch's own: min/max
# (NaN ignored) and counts over the union of two disjoint sets of steps. That costs one read
# and one upsert per table instead of recomputing from the stored steps.


def _levels_where(t: Any, lo: int, hi: int) -> Any:
    return or_(*(and_(t.level == lv, t.block.between(lo // lv, hi // lv)) for lv in ROLLUP_LEVELS))


def _merged(new: Pieces, stored: Pieces | None, level: int) -> tuple[np.ndarray, Pieces]:
    both = new if stored is None else new.concat(stored)
    return both.group(both.first // level)


# merge_layers' read on Postgres: the stored blocks of the batch's range at every level.
_STORED_LAYERS_PG = (
    "SELECT metric, level, step_first, step_last, vmin, vmax, nonfinite FROM layer_rollups "
    "WHERE run_pk = %s AND metric = ANY(%s) AND ("
    + " OR ".join(f"(level = {lv} AND block BETWEEN %s AND %s)" for lv in ROLLUP_LEVELS)
    + ") ORDER BY metric, level, block"
)


def _f4_stack(vectors: Sequence[Any]) -> np.ndarray:
    """Stack stored float32 vectors (bytes from raw psycopg, arrays through SQLAlchemy)."""
    return np.stack([np.frombuffer(v, "<f4") if isinstance(v, bytes | memoryview) else v
                     for v in vectors])


def merge_layers(
    session: Session, run_pk: int, width: int, layer_rows: Sequence[dict[str, Any]]
) -> None:
    """Fold ``layer_rows`` (none of whose steps was stored before) into ``layer_rollups``."""
    if not layer_rows:
        return
    fresh = _fresh_layers(layer_rows)
    lo = min(int(p.first[0]) for p in fresh.values())
    hi = max(int(p.last[-1]) for p in fresh.values())
    t = LayerRollup
    pg = session.get_bind().dialect.name == "postgresql"
    rows: Sequence[Any]
    if pg:  # raw SQL: composing the ORM statement cost more than running it
        raw = session.connection().connection.driver_connection
        assert raw is not None
        bounds = [b for lv in ROLLUP_LEVELS for b in (lo // lv, hi // lv)]
        with raw.cursor() as cur:
            rows = cur.execute(_STORED_LAYERS_PG, [run_pk, list(fresh), *bounds]).fetchall()
    else:
        rows = session.connection().execute(
            select(t.metric, t.level, t.step_first, t.step_last, t.vmin, t.vmax, t.nonfinite)
            .where(t.run_pk == run_pk, t.metric.in_(list(fresh)), _levels_where(t, lo, hi))
            .order_by(t.metric, t.level, t.block)
        ).all()
    stored: dict[tuple[str, int], Pieces] = {}
    for (metric, level), group in groupby(rows, key=lambda r: (str(r[0]), int(r[1]))):
        mine = list(group)
        stored[metric, level] = Pieces(
            np.fromiter((r[2] for r in mine), np.int64, len(mine)),
            np.fromiter((r[3] for r in mine), np.int64, len(mine)),
            _f4_stack([r[4] for r in mine]).astype(np.float64),
            _f4_stack([r[5] for r in mine]).astype(np.float64),
            _f4_stack([r[6] for r in mine]).astype(np.int64),
        )
    out: list[dict[str, Any]] = []
    for metric, new in fresh.items():
        for level in ROLLUP_LEVELS:
            ids, p = _merged(new, stored.get((metric, level)), level)
            out.extend(
                {"run_pk": run_pk, "metric": metric, "level": level, "block": int(b),
                 "step_first": int(p.first[i]), "step_last": int(p.last[i]),
                 "vmin": p.vmin[i], "vmax": p.vmax[i], "nonfinite": p.nonfinite[i]}
                for i, b in enumerate(ids.tolist())
            )
    if session.get_bind().dialect.name == "postgresql":
        _upsert_layer_blocks_pg(session, run_pk, out)
    else:
        _upsert_blocks(session, t.__table__, out, ("run_pk", "metric", "level", "block"))


def merge_series(session: Session, run_pk: int, step_rows: Sequence[dict[str, Any]]) -> None:
    """Fold ``step_rows`` (none of which was stored before) into ``series_rollups``."""
    fresh = _fresh_series(step_rows)
    if not fresh:
        return
    if session.get_bind().dialect.name == "postgresql":
        _merge_series_pg(session, run_pk, fresh)
        return
    lo, hi = min(int(r["step"]) for r in step_rows), max(int(r["step"]) for r in step_rows)
    t = SeriesRollup
    rows = session.connection().execute(
        select(t.name, t.level, t.step_first, t.step_last, t.vmin, t.vmax, t.nonfinite)
        .where(t.run_pk == run_pk, t.name.in_(list(fresh)), _levels_where(t, lo, hi))
        .order_by(t.name, t.level, t.block)
    ).all()
    stored: dict[tuple[str, int], Pieces] = {}
    for (name, level), group in groupby(rows, key=lambda r: (str(r[0]), int(r[1]))):
        mine = list(group)
        n = len(mine)
        stored[name, level] = Pieces(
            np.fromiter((r[2] for r in mine), np.int64, n),
            np.fromiter((r[3] for r in mine), np.int64, n),
            np.fromiter((r[4] for r in mine), np.float64, n).reshape(n, 1),
            np.fromiter((r[5] for r in mine), np.float64, n).reshape(n, 1),
            np.fromiter((r[6] for r in mine), np.int64, n).reshape(n, 1),
        )
    out: list[dict[str, Any]] = []
    for name, new in fresh.items():
        for level in ROLLUP_LEVELS:
            ids, p = _merged(new, stored.get((name, level)), level)
            out.extend(
                {"run_pk": run_pk, "name": name, "level": level, "block": int(b),
                 "step_first": int(p.first[i]), "step_last": int(p.last[i]),
                 "vmin": float(p.vmin[i, 0]), "vmax": float(p.vmax[i, 0]),
                 "nonfinite": int(p.nonfinite[i, 0])}
                for i, b in enumerate(ids.tolist())
            )
    _upsert_blocks(session, t.__table__, out, ("run_pk", "name", "level", "block"))


def _upsert_blocks(
    session: Session, table: Any, rows: list[dict[str, Any]], keys: tuple[str, ...]
) -> None:
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = insert(table)
    updates = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=updates)
    for lo in range(0, len(rows), INSERT_ROWS):
        session.execute(stmt, rows[lo : lo + INSERT_ROWS])


def _fresh_layers(layer_rows: Sequence[dict[str, Any]]) -> Keyed:
    by_metric: dict[str, list[tuple[int, np.ndarray]]] = {}
    for row in layer_rows:
        by_metric.setdefault(row["metric"], []).append((row["step"], row["values"]))
    fresh: Keyed = {}
    for metric, items in by_metric.items():
        items.sort(key=lambda sv: sv[0])
        steps = np.fromiter((s for s, _ in items), np.int64, len(items))
        fresh[metric] = Pieces.from_steps(steps, np.stack([v for _, v in items]).astype(np.float64))
    return fresh


def _fresh_series(step_rows: Sequence[dict[str, Any]]) -> Keyed:
    rows = sorted(step_rows, key=lambda r: int(r["step"]))
    fresh: Keyed = {}
    for name in STEP_SERIES:
        mine = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
        if mine:
            steps = np.fromiter((s for s, _ in mine), np.int64, len(mine))
            vals = np.fromiter((float(v) for _, v in mine), np.float64, len(mine))
            fresh[name] = Pieces.from_steps(steps, vals)
    return fresh


# On Postgres the series blocks are folded in by the database: one statement, no read. The
# batch's own blocks are inserted, or combined with the stored block of the same key as
# ``Pieces.group`` would: min/max of the two (NaN ignored, as fmin/fmax), counts added.
_MERGE_SERIES_PG = """
INSERT INTO series_rollups AS t
    (run_pk, name, level, block, step_first, step_last, vmin, vmax, nonfinite)
SELECT %(run_pk)s, * FROM unnest(%(name)s::text[], %(level)s::int4[], %(block)s::int8[],
    %(first)s::int8[], %(last)s::int8[], %(vmin)s::float8[], %(vmax)s::float8[],
    %(nonfinite)s::int4[])
ON CONFLICT (run_pk, name, level, block) DO UPDATE SET
    step_first = LEAST(t.step_first, EXCLUDED.step_first),
    step_last = GREATEST(t.step_last, EXCLUDED.step_last),
    vmin = CASE WHEN t.vmin = 'NaN' THEN EXCLUDED.vmin WHEN EXCLUDED.vmin = 'NaN' THEN t.vmin
                ELSE LEAST(t.vmin, EXCLUDED.vmin) END,
    vmax = CASE WHEN t.vmax = 'NaN' THEN EXCLUDED.vmax WHEN EXCLUDED.vmax = 'NaN' THEN t.vmax
                ELSE GREATEST(t.vmax, EXCLUDED.vmax) END,
    nonfinite = t.nonfinite + EXCLUDED.nonfinite
"""


def _merge_series_pg(session: Session, run_pk: int, fresh: Keyed) -> None:
    cols: dict[str, list[Any]] = {k: [] for k in
                                  ("name", "level", "block", "first", "last", "vmin", "vmax",
                                   "nonfinite")}
    pieces = list(fresh.values())
    steps = pieces[0].first
    if all(np.array_equal(p.first, steps) for p in pieces[1:]):
        # The usual case, every series at every step: group all series at once (the same
        # blocks, min/max and counts as one series at a time).
        names = list(fresh)
        both = Pieces.from_steps(steps, np.column_stack([p.vmin[:, 0] for p in pieces]))
        width = len(names)
        for level in ROLLUP_LEVELS:
            ids, p = both.group(steps // level)
            n = len(ids)
            cols["name"].extend(names * n)
            cols["level"].extend([level] * (n * width))
            cols["block"].extend(np.repeat(ids, width).tolist())
            cols["first"].extend(np.repeat(p.first, width).tolist())
            cols["last"].extend(np.repeat(p.last, width).tolist())
            cols["vmin"].extend(p.vmin.ravel().tolist())
            cols["vmax"].extend(p.vmax.ravel().tolist())
            cols["nonfinite"].extend(p.nonfinite.ravel().tolist())
        fresh = {}
    for name, new in fresh.items():
        for level in ROLLUP_LEVELS:
            ids, p = new.group(new.first // level)
            n = len(ids)
            cols["name"].extend([name] * n)
            cols["level"].extend([level] * n)
            cols["block"].extend(ids.tolist())
            cols["first"].extend(p.first.tolist())
            cols["last"].extend(p.last.tolist())
            cols["vmin"].extend(p.vmin[:, 0].tolist())
            cols["vmax"].extend(p.vmax[:, 0].tolist())
            cols["nonfinite"].extend(p.nonfinite[:, 0].tolist())
    params: dict[str, Any] = {"run_pk": run_pk, "name": cols.pop("name")}
    for key, values in cols.items():
        params[key] = numeric_array(values, float if key in ("vmin", "vmax") else int)
    raw = session.connection().connection.driver_connection
    assert raw is not None
    with raw.cursor() as cur:
        cur.execute(_MERGE_SERIES_PG, params)


_UPSERT_LAYERS_PG = """
INSERT INTO layer_rollups AS t
    (run_pk, metric, level, block, step_first, step_last, vmin, vmax, nonfinite)
SELECT %(run_pk)s, * FROM unnest(%(metric)s::text[], %(level)s::int4[], %(block)s::int8[],
    %(step_first)s::int8[], %(step_last)s::int8[], %(vmin)s::bytea[], %(vmax)s::bytea[],
    %(nonfinite)s::bytea[])
ON CONFLICT (run_pk, metric, level, block) DO UPDATE SET
    step_first = EXCLUDED.step_first, step_last = EXCLUDED.step_last,
    vmin = EXCLUDED.vmin, vmax = EXCLUDED.vmax, nonfinite = EXCLUDED.nonfinite
"""


def _upsert_layer_blocks_pg(session: Session, run_pk: int, rows: list[dict[str, Any]]) -> None:
    """The merged blocks in one statement (arrays of columns), not one per row."""
    params: dict[str, Any] = {"run_pk": run_pk}
    params["metric"] = [r["metric"] for r in rows]
    for key in ("level", "block", "step_first", "step_last"):
        params[key] = numeric_array((r[key] for r in rows), int)
    for key in ("vmin", "vmax", "nonfinite"):
        params[key] = [np.asarray(r[key], "<f4").tobytes() for r in rows]
    raw = session.connection().connection.driver_connection
    assert raw is not None
    with raw.cursor() as cur:
        cur.execute(_UPSERT_LAYERS_PG, params)
