"""Pre-aggregated per-layer blocks: min, max and non-finite count per block of steps.

``layer_rollups`` holds, for each (run, metric) and each level L of ``ROLLUP_LEVELS``, one
row per block of L consecutive steps (block b covers steps [b·L, (b+1)·L)), with the
per-layer minimum, maximum (NaN ignored, ±Inf kept, as ``downsample``) and count of
non-finite values over the block's stored steps. Maintained on ingest
(``server.services.rollups``); reads of long ranges combine whole blocks instead of
reading every step, so a one-step spike is still the maximum of its bucket.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import BigInteger, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from server.columns import Float32Array, Float64
from server.models import Base

# Block sizes in steps, finest first; each divides the next.
ROLLUP_LEVELS = (64, 256, 1024, 4096)


class LayerRollup(Base):
    __tablename__ = "layer_rollups"

    run_pk: Mapped[int] = mapped_column(ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True)
    metric: Mapped[str] = mapped_column(String(32), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    block: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    step_first: Mapped[int] = mapped_column(BigInteger)
    step_last: Mapped[int] = mapped_column(BigInteger)
    vmin: Mapped[np.ndarray] = mapped_column(Float32Array)
    vmax: Mapped[np.ndarray] = mapped_column(Float32Array)
    # Counts as float32 (exact up to 2^24, far above any block's size).
    nonfinite: Mapped[np.ndarray] = mapped_column(Float32Array)


class SeriesRollup(Base):
    """The same blocks for the built-in step series (``steps`` columns): one row per series.

    Only steps where the series is reported (not NULL) take part; a block where it never is
    has no row.
    """

    __tablename__ = "series_rollups"

    run_pk: Mapped[int] = mapped_column(ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    block: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    step_first: Mapped[int] = mapped_column(BigInteger)
    step_last: Mapped[int] = mapped_column(BigInteger)
    vmin: Mapped[float] = mapped_column(Float64)
    vmax: Mapped[float] = mapped_column(Float64)
    nonfinite: Mapped[int] = mapped_column(Integer)
