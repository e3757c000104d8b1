"""Bulk upserts of ingest rows: COPY on Postgres, one multi-row statement on SQLite.

Both keep the upsert semantics keyed by the table's primary key: a row whose key is stored
already is overwritten, never duplicated.

On Postgres, rows the caller knows to be new (ingest checks, under the run's lock, that no
step of the batch is stored: the normal case of a run appending) are COPYed straight into
the table; a few such rows go in as one ``INSERT ... SELECT FROM unnest(arrays)`` (one
round trip, a COPY takes two). Otherwise (a retried or replayed batch) they are COPYed
into a temporary staging table and merged with one ``INSERT ... SELECT ... ON CONFLICT DO
UPDATE``. Should a "new" key exist after all, the COPY or INSERT fails on the unique index
and the transaction with it: an error, never a duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from sqlalchemy import BigInteger, Boolean, Integer, String, Table
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from server.columns import Float32Array, Float64

# New rows up to this many go in as one INSERT of column arrays; more are COPYed.
ARRAY_INSERT_ROWS = 64


def _pg_type(column: Any) -> str:
    """The Postgres type a binary COPY sends for ``column`` (must match the column)."""
    t = column.type
    for cls, name in ((BigInteger, "int8"), (Integer, "int4"), (Boolean, "bool"),
                      (String, "text"), (Float64, "float8"), (Float32Array, "bytea")):
        if isinstance(t, cls):
            return name
    raise TypeError(f"no COPY type for {column}")


def upsert(session: Session, table: Any, rows: Sequence[dict[str, Any]], new: bool) -> None:
    """Upsert ``rows`` (one dict per row, every column) keyed by the table's primary key.

    ``new``: none of the keys is stored (Postgres then COPYs into the table directly).
    """
    assert isinstance(table, Table)
    if not rows:
        return
    if session.get_bind().dialect.name != "postgresql":
        _sqlite_upsert(session, table, rows)
        return
    raw = session.connection().connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    names = [c.name for c in table.columns]
    vectors = [isinstance(c.type, Float32Array) for c in table.columns]
    if any(vectors):
        tuples = [
            tuple(_f4(r[n]) if v else r[n] for n, v in zip(names, vectors, strict=True))
            for r in rows
        ]
    else:
        tuples = [tuple(r[n] for n in names) for r in rows]
    _pg_upsert(raw, table, tuples, new)


def _f4(values: Any) -> bytes:
    return values if isinstance(values, bytes) else np.asarray(values, "<f4").tobytes()


def _sqlite_upsert(session: Session, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    keys = [c.name for c in table.primary_key.columns]
    stmt = sqlite.insert(table)
    updates = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
    session.execute(stmt.on_conflict_do_update(index_elements=keys, set_=updates), rows)


def _copy(cur: psycopg.Cursor[Any], target: sql.Composable, table: Table,
          rows: Sequence[tuple[Any, ...]]) -> None:
    cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns)
    query = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(target, cols)
    with cur.copy(query) as copy:
        copy.set_types([_pg_type(c) for c in table.columns])
        for row in rows:
            copy.write_row(row)


_CASTS: dict[str, Any] = {"int8": int, "int4": int, "bool": bool, "text": str,
                          "float8": float, "bytea": bytes}


def _insert_arrays(cur: psycopg.Cursor[Any], table: Table,
                   rows: Sequence[tuple[Any, ...]]) -> None:
    """``INSERT ... SELECT FROM unnest(one array per column)``: one round trip, where a COPY
    takes two (the server's go-ahead, then the data), which is what small batches pay for."""
    query, casts = _array_insert(table)
    cur.execute(query, [
        numeric_array(column, cast) if cast in (int, float)
        else [None if v is None else cast(v) for v in column]  # one Python type per array
        for cast, column in zip(casts, zip(*rows, strict=True), strict=True)
    ])


def numeric_array(values: Iterable[Any], cast: type[int] | type[float]) -> str:
    """A Postgres array literal of numbers (``'{1,2.5,NULL,nan}'``) for a ``%s::float8[]``
    or ``::int8[]`` parameter: one join, where psycopg adapts a list element by element.

    Exact: ``repr`` of a float is the shortest text that reads back to the same double, and
    Postgres reads ``nan``, ``inf`` and ``-inf`` as NaN and ±Infinity."""
    return "{" + ",".join("NULL" if v is None else repr(cast(v)) for v in values) + "}"


_ARRAY_INSERTS: dict[str, tuple[bytes, list[Any]]] = {}


def _array_insert(table: Table) -> tuple[bytes, list[Any]]:
    """The statement of :func:`_insert_arrays` for ``table`` and each column's Python type,
    built once per table (composing it cost more than sending it)."""
    cached = _ARRAY_INSERTS.get(table.name)
    if cached is None:
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns)
        arrays = sql.SQL(", ").join(
            sql.SQL("%s::{}[]").format(sql.SQL(_pg_type(c))) for c in table.columns
        )
        query = sql.SQL("INSERT INTO {} ({}) SELECT * FROM unnest({})").format(
            sql.Identifier(table.name), cols, arrays
        )
        cached = (query.as_bytes(None), [_CASTS[_pg_type(c)] for c in table.columns])
        _ARRAY_INSERTS[table.name] = cached
    return cached


def _pg_upsert(conn: psycopg.Connection[Any], table: Table,
               rows: Sequence[tuple[Any, ...]], new: bool) -> None:
    name = sql.Identifier(table.name)
    with conn.cursor() as cur:
        if new and len(rows) <= ARRAY_INSERT_ROWS:
            _insert_arrays(cur, table, rows)
            return
        if new:
            _copy(cur, name, table, rows)
            return
        stage = sql.Identifier(f"stage_{table.name}")
        cur.execute(sql.SQL(
            "CREATE TEMPORARY TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DELETE ROWS"
        ).format(stage, name))
        cur.execute(sql.SQL("TRUNCATE {}").format(stage))
        _copy(cur, stage, table, rows)
        keys = [c.name for c in table.primary_key.columns]
        others = [c.name for c in table.columns if c.name not in keys]
        cur.execute(sql.SQL(
            "INSERT INTO {t} SELECT * FROM {s} ON CONFLICT ({k}) DO UPDATE SET {u}"
        ).format(
            t=name,
            s=stage,
            k=sql.SQL(", ").join(map(sql.Identifier, keys)),
            u=sql.SQL(", ").join(
                sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in others
            ),
        ))
