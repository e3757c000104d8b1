"""Maintain and read ``layer_rollups`` (see ``server.models_rollups``).

Blocks are recomputed from what is stored, never merged into, so an upsert that
overwrites a step with a different value leaves every level exact. On ingest, the finest
level is computed from the batch's vectors plus the few stored rows of its edge blocks;
each coarser level from the level below (the blocks just computed plus the stored
neighbours at the edges).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import and_, func, not_, select
from sqlalchemy.orm import Session

from server.models import LayerValues
from server.models_rollups import ROLLUP_LEVELS, LayerRollup

# Steps per chunk when rebuilding a whole run (a multiple of the coarsest level).
REBUILD_CHUNK = ROLLUP_LEVELS[-1] * 4


@dataclass(frozen=True)
class Pieces:
    """Aggregates of consecutive step ranges, ordered by ``first``; one row per piece."""

    first: np.ndarray  # int64 (n,)
    last: np.ndarray  # int64 (n,)
    vmin: np.ndarray  # float (n, layers)
    vmax: np.ndarray
    nonfinite: np.ndarray  # int64 (n, layers)

    @classmethod
    def from_steps(cls, steps: np.ndarray, values: np.ndarray) -> Pieces:
        """Single steps: min = max = value."""
        return cls(steps, steps, values, values, (~np.isfinite(values)).astype(np.int64))

    @classmethod
    def empty(cls, width: int) -> Pieces:
        none = np.empty(0, np.int64)
        vals = np.empty((0, width), np.float64)
        return cls(none, none, vals, vals, vals.astype(np.int64))

    def __len__(self) -> int:
        return int(self.first.size)

    def concat(self, other: Pieces) -> Pieces:
        """Both sets of pieces, ordered by first step (they must not overlap)."""
        if not len(other):
            return self
        if not len(self):
            return other
        order = np.argsort(np.r_[self.first, other.first], kind="stable")
        return Pieces(
            *(
                np.concatenate([a, b])[order]
                for a, b in zip(self._arrays(), other._arrays(), strict=True)
            )
        )

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.first, self.last, self.vmin, self.vmax, self.nonfinite)

    def columns(self, cols: Sequence[int]) -> Pieces:
        idx = list(cols)
        return Pieces(
            self.first, self.last, self.vmin[:, idx], self.vmax[:, idx], self.nonfinite[:, idx]
        )

    def group(self, keys: np.ndarray) -> tuple[np.ndarray, Pieces]:
        """Merge pieces with equal consecutive ``keys``: (key of each group, merged pieces)."""
        if not len(self):
            return keys[:0], self
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        ends = np.r_[starts[1:], keys.size] - 1
        with np.errstate(invalid="ignore"):
            vmin = np.fmin.reduceat(self.vmin, starts, axis=0)
            vmax = np.fmax.reduceat(self.vmax, starts, axis=0)
        nonfinite = np.add.reduceat(self.nonfinite, starts, axis=0)
        return keys[starts], Pieces(self.first[starts], self.last[ends], vmin, vmax, nonfinite)


def raw_pieces(session: Session, where: Any, width: int) -> Pieces:
    """The stored steps matching ``where``, one piece each."""
    rows = session.execute(
        select(LayerValues.step, LayerValues.values).where(where).order_by(LayerValues.step)
    ).all()
    if not rows:
        return Pieces.empty(width)
    steps = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    return Pieces.from_steps(steps, np.stack([r[1] for r in rows]).astype(np.float64))


def _stored_blocks(session: Session, where: Any, width: int) -> Pieces:
    rows = session.execute(
        select(
            LayerRollup.step_first,
            LayerRollup.step_last,
            LayerRollup.vmin,
            LayerRollup.vmax,
            LayerRollup.nonfinite,
        )
        .where(where)
        .order_by(LayerRollup.block)
    ).all()
    if not rows:
        return Pieces.empty(width)
    return Pieces(
        np.fromiter((r[0] for r in rows), np.int64, len(rows)),
        np.fromiter((r[1] for r in rows), np.int64, len(rows)),
        np.stack([r[2] for r in rows]).astype(np.float64),
        np.stack([r[3] for r in rows]).astype(np.float64),
        np.stack([r[4] for r in rows]).astype(np.int64),
    )


def stored_pieces(
    session: Session, run_pk: int, metric: str, level: int, b0: int, b1: int, width: int
) -> Pieces:
    """The stored blocks ``b0..b1`` of one level."""
    return _stored_blocks(
        session,
        and_(
            LayerRollup.run_pk == run_pk,
            LayerRollup.metric == metric,
            LayerRollup.level == level,
            LayerRollup.block.between(b0, b1),
        ),
        width,
    )


def _write(
    session: Session, run_pk: int, metric: str, level: int, blocks: np.ndarray, p: Pieces
) -> None:
    from server.services.ingest import _upsert  # noqa: PLC0415  (ingest imports this module)

    rows = [
        {
            "run_pk": run_pk,
            "metric": metric,
            "level": level,
            "block": int(b),
            "step_first": int(p.first[i]),
            "step_last": int(p.last[i]),
            "vmin": p.vmin[i],
            "vmax": p.vmax[i],
            "nonfinite": p.nonfinite[i],
        }
        for i, b in enumerate(blocks.tolist())
    ]
    for lo in range(0, len(rows), 2000):
        _upsert(
            session,
            LayerRollup.__table__,
            rows[lo : lo + 2000],
            ("run_pk", "metric", "level", "block"),
        )


def _cascade(session: Session, run_pk: int, metric: str, lo: int, hi: int, fresh: Pieces) -> None:
    """Write every level's blocks covering steps [lo, hi].

    ``fresh`` holds every stored step of the finest blocks covering [lo, hi] (as pieces).
    """
    width = fresh.vmin.shape[1]
    child_level: int | None = None
    for level in ROLLUP_LEVELS:
        if child_level is not None:
            # Children of [lo//level, hi//level] not in `fresh`: stored neighbours at the edges.
            c0, c1 = (
                lo // level * (level // child_level),
                (hi // level + 1) * (level // child_level) - 1,
            )
            have0, have1 = lo // child_level, hi // child_level
            edges = _stored_blocks(
                session,
                and_(
                    LayerRollup.run_pk == run_pk,
                    LayerRollup.metric == metric,
                    LayerRollup.level == child_level,
                    LayerRollup.block.between(c0, c1),
                    not_(LayerRollup.block.between(have0, have1)),
                ),
                width,
            )
            fresh = fresh.concat(edges)
        blocks, fresh = fresh.group(fresh.first // level)
        _write(session, run_pk, metric, level, blocks, fresh)
        child_level = level


def refresh(session: Session, run_pk: int, layer_rows: Iterable[dict[str, Any]]) -> None:
    """Bring the rollups up to date after ``layer_rows`` (ingest's rows) were upserted."""
    by_metric: dict[str, list[tuple[int, np.ndarray]]] = {}
    for row in layer_rows:
        by_metric.setdefault(row["metric"], []).append((row["step"], row["values"]))
    finest = ROLLUP_LEVELS[0]
    for metric, items in by_metric.items():
        items.sort(key=lambda sv: sv[0])
        steps = np.fromiter((s for s, _ in items), np.int64, len(items))
        values = np.stack([v for _, v in items]).astype(np.float64)
        lo, hi = int(steps[0]), int(steps[-1])
        a, b = lo // finest * finest, (hi // finest + 1) * finest - 1
        in_range = and_(
            LayerValues.run_pk == run_pk,
            LayerValues.metric == metric,
            LayerValues.step.between(a, b),
        )
        stored = set(session.scalars(select(LayerValues.step).where(in_range)))
        others = sorted(stored.difference(steps.tolist()))
        fresh = Pieces.from_steps(steps, values)
        if others:
            fresh = fresh.concat(
                raw_pieces(session, and_(in_range, LayerValues.step.in_(others)), values.shape[1])
            )
        _cascade(session, run_pk, metric, lo, hi, fresh)


def rebuild(session: Session, run_pk: int, metric: str) -> None:
    """Recompute every rollup of (run, metric) from the stored steps, chunk by chunk."""
    first, last = session.execute(
        select(func.min(LayerValues.step), func.max(LayerValues.step)).where(
            LayerValues.run_pk == run_pk, LayerValues.metric == metric
        )
    ).one()
    if first is None:
        return
    start = int(first) // REBUILD_CHUNK * REBUILD_CHUNK
    for lo in range(start, int(last) + 1, REBUILD_CHUNK):
        hi = lo + REBUILD_CHUNK - 1
        raw = raw_pieces(
            session,
            and_(
                LayerValues.run_pk == run_pk,
                LayerValues.metric == metric,
                LayerValues.step.between(lo, hi),
            ),
            0,
        )
        if len(raw):
            _cascade(session, run_pk, metric, lo, hi, raw)
