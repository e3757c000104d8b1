"""A fixed-window request counter per token, kept in the database.

One statement per request, ``INSERT … ON CONFLICT (key, period) DO UPDATE SET count = count + 1
RETURNING count``, on Postgres and SQLite alike: the row lock serialises concurrent increments,
so every collector process on the same database counts against the same limit. The first
request of a new window deletes the key's older rows, so the table holds about one row per
active token.
"""

from __future__ import annotations

import math

from sqlalchemy import Connection, delete
from sqlalchemy.dialects import postgresql, sqlite

from server import errors
from server.models_auth import RateCounter


def hit(conn: Connection, key: str, limit: int, window_s: int, now: float) -> None:
    """Count one request of ``key``; raise 429 (with Retry-After) past ``limit`` per window.

    ``limit`` 0 disables the check. The caller commits.
    """
    if limit <= 0:
        return
    period = int(now // window_s)
    dialect = conn.dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(RateCounter).values(key=key, period=period, count=1)
    upsert = stmt.on_conflict_do_update(
        index_elements=["key", "period"], set_={"count": RateCounter.count + 1}
    ).returning(RateCounter.count)
    count = int(conn.execute(upsert).scalar_one())
    if count == 1:
        conn.execute(
            delete(RateCounter).where(RateCounter.key == key, RateCounter.period < period)
        )
    if count > limit:
        retry_after = max(1, math.ceil((period + 1) * window_s - now))
        raise errors.RateLimited(
            f"rate limit of {limit} requests per {window_s} s exceeded for {key}; "
            f"retry after {retry_after} s (GRADSENTRY_RATE_LIMIT_REQUESTS)",
            retry_after,
        )
