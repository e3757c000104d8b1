"""Rollups: min/max/non-finite per block of steps at a few block sizes (layers, series).

Revision ID: 0005
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import Session

from server.columns import Float32Array, Float64

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "layer_rollups",
        sa.Column("run_pk", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("block", sa.BigInteger(), nullable=False),
        sa.Column("step_first", sa.BigInteger(), nullable=False),
        sa.Column("step_last", sa.BigInteger(), nullable=False),
        sa.Column("vmin", Float32Array(), nullable=False),
        sa.Column("vmax", Float32Array(), nullable=False),
        sa.Column("nonfinite", Float32Array(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_pk"], ["runs.pk"], name="fk_layer_rollups_run_pk_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_pk", "metric", "level", "block", name="pk_layer_rollups"),
    )
    op.create_table(
        "series_rollups",
        sa.Column("run_pk", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("block", sa.BigInteger(), nullable=False),
        sa.Column("step_first", sa.BigInteger(), nullable=False),
        sa.Column("step_last", sa.BigInteger(), nullable=False),
        sa.Column("vmin", Float64(), nullable=False),
        sa.Column("vmax", Float64(), nullable=False),
        sa.Column("nonfinite", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_pk"], ["runs.pk"], name="fk_series_rollups_run_pk_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_pk", "name", "level", "block", name="pk_series_rollups"),
    )
    # Backfill from the stored steps (the rollups of new steps are written on ingest).
    from server.services.rollups import rebuild, rebuild_series  # noqa: PLC0415

    session = Session(bind=op.get_bind())
    pairs = session.execute(sa.text("SELECT DISTINCT run_pk, metric FROM layer_values")).all()
    for run_pk, metric in pairs:
        rebuild(session, int(run_pk), str(metric))
    for (run_pk,) in session.execute(sa.text("SELECT DISTINCT run_pk FROM steps")).all():
        rebuild_series(session, int(run_pk))


def downgrade() -> None:
    op.drop_table("series_rollups")
    op.drop_table("layer_rollups")
