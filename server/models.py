"""Database tables (SQLAlchemy 2). Migrations in ``migrations/`` mirror this file.

Natural keys make writes idempotent: a step is (run, step); a layer vector is
(run, metric, step); an extra scalar is (run, name, step).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from server.columns import Float32Array, Float64

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Per-layer metrics stored as one float32 vector per step (ordered like Run.layers).
# param_norm, update_norm: |w_l| after an optimizer step and |Δw_l| of that step (reported
# every K steps); update_ratio = update_norm / param_norm, derived at ingest (0/0 is NaN).
# grad_norm:max|min|mean|nonfinite: a logging window's statistics (client log_every), at the
# window's last step.
WINDOW_STATS = ("max", "min", "mean", "nonfinite")
WINDOW_STEPS = "window:steps"  # scalar series: steps each windowed record stands for
LAYER_METRICS = (
    "grad_norm", "nonfinite", "param_norm", "update_norm", "update_ratio",
    "gns_small_sq", "gns_big_sq",  # noise scale: server/services/noise.py
    *(f"grad_norm:{stat}" for stat in WINDOW_STATS),
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    runs: Mapped[list[Run]] = relationship(back_populates="project", lazy="raise")


class Run(Base):
    __tablename__ = "runs"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The client-chosen id users see in URLs; globally unique.
    id: Mapped[str] = mapped_column(String(128), unique=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(256))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16), default="running")
    batch_size: Mapped[int | None] = mapped_column(Integer)
    world_size: Mapped[int] = mapped_column(Integer, default=1)
    layers: Mapped[list[str]] = mapped_column(JSON, default=list)
    semantics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_step: Mapped[int | None] = mapped_column(BigInteger)

    project: Mapped[Project] = relationship(back_populates="runs", lazy="raise")


class Step(Base):
    __tablename__ = "steps"

    run_pk: Mapped[int] = mapped_column(
        ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    wall_time: Mapped[float | None] = mapped_column(Float64)
    loss: Mapped[float | None] = mapped_column(Float64)
    lr: Mapped[float | None] = mapped_column(Float64)
    grad_norm: Mapped[float | None] = mapped_column(Float64)
    batch_size: Mapped[int | None] = mapped_column(BigInteger)
    samples: Mapped[int | None] = mapped_column(BigInteger)
    tokens: Mapped[int | None] = mapped_column(BigInteger)
    nonfinite: Mapped[int | None] = mapped_column(Integer)
    clip_coef: Mapped[float | None] = mapped_column(Float64)
    loss_scale: Mapped[float | None] = mapped_column(Float64)
    local_grad_norm: Mapped[float | None] = mapped_column(Float64)
    overflow: Mapped[bool | None] = mapped_column(Boolean)
    micro_batches: Mapped[int | None] = mapped_column(Integer)


class LayerValues(Base):
    """One step's values of one per-layer metric, for every layer of the run."""

    __tablename__ = "layer_values"

    run_pk: Mapped[int] = mapped_column(
        ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True
    )
    metric: Mapped[str] = mapped_column(String(32), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    values: Mapped[np.ndarray] = mapped_column(Float32Array)


class Scalar(Base):
    """Extra named scalars a run logs (``mon.log(attn_logit_max=...)``)."""

    __tablename__ = "scalars"

    run_pk: Mapped[int] = mapped_column(
        ForeignKey("runs.pk", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    value: Mapped[float | None] = mapped_column(Float64)


# Series every run has (columns of ``steps``), in the order the API lists them.
STEP_SERIES = ("loss", "grad_norm", "lr", "batch_size", "samples", "tokens", "nonfinite",
               "wall_time", "clip_coef", "loss_scale", "local_grad_norm", "micro_batches")

from server import models_alerts  # noqa: E402,F401  (alert tables join the metadata)
from server import models_auth as _models_auth  # noqa: E402,F401  (api_tokens, rate_counters)
from server import models_rollups as _models_rollups  # noqa: E402,F401  (layer_rollups table)
