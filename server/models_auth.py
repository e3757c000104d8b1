"""Access control tables: API tokens (hashed at rest) and rate-limit counters.

A token is shown once, as ``gs_<id>_<secret>``; the table keeps the public ``id`` (the lookup
key, also what ``token list``/``revoke`` show) and the SHA-256 of the secret, never the secret.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from server.models import Base


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    # NULL: every project (a lab-wide admin or reader); else the one project it may touch.
    project: Mapped[str | None] = mapped_column(String(128), index=True)
    scopes: Mapped[str] = mapped_column(String(64))  # comma-separated: ingest,read,admin
    name: Mapped[str] = mapped_column(String(128))
    secret_sha256: Mapped[str] = mapped_column(String(64))  # hex digest
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RateCounter(Base):
    """Requests of one token in one fixed window (``period`` = epoch seconds // window length).

    Shared by every collector process on the database, so the limit holds across them.
    """

    __tablename__ = "rate_counters"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    period: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
