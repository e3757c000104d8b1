"""Per-step measurement context: clip coefficient, loss scale, local norm, overflow, micro-batches.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from server.columns import Float64

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_FLOATS = ("clip_coef", "loss_scale", "local_grad_norm")


def upgrade() -> None:
    # Batch mode: SQLite cannot ALTER most things in place (a no-op wrapper on Postgres).
    with op.batch_alter_table("steps") as batch:
        for name in _FLOATS:
            batch.add_column(sa.Column(name, Float64(), nullable=True))
        batch.add_column(sa.Column("overflow", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("micro_batches", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("steps") as batch:
        for name in ("micro_batches", "overflow", *reversed(_FLOATS)):
            batch.drop_column(name)
