"""Access control: API tokens (SHA-256 of the secret only) and per-token rate counters.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("project", sa.String(128), nullable=True),
        sa.Column("scopes", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("revoked_at", _tz(), nullable=True),
        sa.Column("last_used_at", _tz(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
    )
    op.create_index("ix_api_tokens_project", "api_tokens", ["project"])
    op.create_table(
        "rate_counters",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("period", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", "period", name="pk_rate_counters"),
    )


def downgrade() -> None:
    op.drop_table("rate_counters")
    op.drop_index("ix_api_tokens_project", table_name="api_tokens")
    op.drop_table("api_tokens")
