"""Storage layout for per-layer gradient norms on PostgreSQL: measure, do not guess.

Per-layer norms (runs x steps x layers) are the bulk of what the collector stores. This script
loads the same synthetic data into three layouts, each in its own freshly created table in the
schema ``bench_storage`` (dropped at the start and at the end), and measures them side by side:

* ``narrow`` -- one row per value, with a key:
  ``(run_id int, step bigint, layer smallint, value real, PRIMARY KEY (run_id, step, layer))``.
  This is the baseline: every figure is also reported as a ratio layout / narrow, measured in
  the same process run (the machine is noisy; ratios are what we record, not absolute times).
* ``array`` -- one row per (run, metric, step):
  ``(run_id int, metric text, step bigint, vals real[], PRIMARY KEY (run_id, metric, step))``,
  one array element per layer.
* ``bytes`` -- the same as ``array`` but ``vals bytea`` holding little-endian float32
  (numpy ``.astype('<f4').tobytes()``).

Tables are created with ``autovacuum_enabled = off`` so a background vacuum cannot land in the
middle of a timing; the script runs ``VACUUM ANALYZE`` itself before measuring sizes and reads.

Workload: ``--runs`` runs x ``--steps`` steps x ``--layers`` layers of lognormal float32 values
(seeded), with a few NaN, +Inf and -Inf at random positions. Steps are 0..steps-1.

Measurements, for each layout:

1. Raw COPY ingest (values/s): all runs loaded with ``COPY ... FROM STDIN (FORMAT BINARY)``,
   one transaction per run, into an empty table that already has its primary key, after a
   ``CHECKPOINT``. The time covers the whole path from the in-memory float32 matrix (client-side
   encoding included) to the commit. Several client paths are tried per layout (psycopg
   ``write_row`` with ``set_types``; for ``real[]`` with the default list adaptation and with a
   small numpy dumper that writes the binary array format; for ``narrow`` also a binary COPY
   stream built with numpy); the fastest counts.
2. Idempotent upsert ingest (values/s), the collector's path: the first ``--upsert-steps`` steps
   of every run, one transaction per batch of ``--batch-steps`` steps, into a fresh empty table,
   each batch written with ``INSERT ... ON CONFLICT (key) DO UPDATE``. Variants: psycopg
   ``executemany`` (pipeline mode), one multi-row ``VALUES`` statement per batch (split only if
   it would exceed 65,535 parameters), ``INSERT ... SELECT FROM unnest(arrays)`` (narrow, bytes),
   and, reported as its own row, binary COPY of the batch into a temp table
   (``ON COMMIT DELETE ROWS``) followed by ``INSERT ... SELECT ... ON CONFLICT DO UPDATE``.
3. On-disk bytes per value: ``pg_total_relation_size`` (heap + indexes + TOAST + FSM/VM forks)
   of the fully loaded table after ``VACUUM ANALYZE``, divided by the number of values.
4. Read one run's whole matrix (steps x layers, float32 numpy array), SQL to numpy included.
   ``narrow``: fetch rows with a binary cursor, or ``array_agg(value ORDER BY step, layer)`` in
   SQL decoded by numpy (a ``COPY (SELECT ...) TO STDOUT (FORMAT BINARY)`` path was also tried
   while writing this and was 2.2-2.5x slower than fetching: psycopg hands COPY TO output over
   one row at a time). ``array``: psycopg's list loader, a per-row numpy loader, or the raw
   binary arrays of all rows decoded by numpy in one go. ``bytes``: fetch and concatenate.
   None of the paths fetch the step column: steps are dense and come back in key order.
5. Read one layer's series (all steps of one run) into numpy. ``array`` uses ``vals[k]`` in
   SQL; ``bytes`` is tried both ways (fetch whole rows and slice in numpy, or
   ``substring(vals from 4k+1 for 4)`` in SQL); ``narrow`` filters on the third key column
   (fetch rows, or ``array_agg`` in SQL). No layout has an index made for this access.

Repetitions: every timing is repeated (loads each time into a fresh table) at least
``--ingest-reps`` / ``--upsert-reps`` / ``--reps`` times and until the repetitions add up to
``--min-seconds``, so a load that takes a fraction of a second is not judged on one sample;
the median is reported. Reads are run once untimed first (warm-up, and the result is
checked). The tables fit in the OS page cache but not all in ``shared_buffers``, so reads
measure a warm server, not the disk.

Every load and every read is checked: the float32 values read back must be bit-identical to
what was written (compared as uint32, so NaN, +Inf and -Inf must be in the same places). A
``check`` line is printed for each; the script exits with status 1 if any check fails.

Run:  .venv/bin/python bench/storage.py [--steps 20000 --runs 2 --layers 128]
(about 2-2.5 minutes with the defaults on a 2-core machine; ``--help`` lists all options).
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import numpy as np
import psycopg
from psycopg import pq
from psycopg.abc import Buffer
from psycopg.adapt import Dumper, Loader

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
SCHEMA = "bench_storage"
METRIC = "layer_grad_norm"
MAX_PARAMS = 65535  # the protocol's limit on bind parameters per statement
STREAM_CHUNK_STEPS = 1000  # steps per numpy-built chunk in the narrow COPY stream

FLOAT4_OID = 700
FLOAT4_ARRAY_OID = 1021
# One element of a binary float4[] (the format of array_send): int32 length, big-endian value.
ARRAY_ELEMENT = np.dtype([("len", ">i4"), ("val", ">f4")])
# Binary COPY framing, see "Binary Format" in https://www.postgresql.org/docs/15/sql-copy.html
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)
# One narrow row in binary COPY: field count, then (length, big-endian value) per column.
NARROW_COPY_ROW = np.dtype(
    [
        ("nfields", ">i2"),
        ("len_run", ">i4"),
        ("run_id", ">i4"),
        ("len_step", ">i4"),
        ("step", ">i8"),
        ("len_layer", ">i4"),
        ("layer", ">i2"),
        ("len_value", ">i4"),
        ("value", ">f4"),
    ]
)

Dataset = dict[int, np.ndarray]  # run_id -> (steps, layers) float32 matrix
Conn = psycopg.Connection
Cur = psycopg.Cursor
CopyFn = Callable[[Conn, str, Dataset], None]
BatchFn = Callable[[Cur, str, int, int, np.ndarray], None]  # cur, table, run, step0, block
SetupFn = Callable[[Cur, str], None]
MatrixFn = Callable[[Conn, str, int, int], np.ndarray]  # conn, table, run, n_layers
SeriesFn = Callable[[Conn, str, int, int], np.ndarray]  # conn, table, run, layer
T = TypeVar("T")

START = time.perf_counter()


def log(message: str) -> None:
    """Print a progress line with the elapsed time."""
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------- numpy <-> real[]


def encode_float4_array(vec: np.ndarray) -> bytes:
    """A 1-D float32 array in PostgreSQL's binary ``real[]`` format (no NULL elements)."""
    if vec.dtype != np.float32 or vec.ndim != 1:
        raise TypeError(f"expected a 1-D float32 array, got {vec.dtype} with ndim {vec.ndim}")
    elements = np.empty(vec.shape[0], ARRAY_ELEMENT)
    elements["len"] = 4
    elements["val"] = vec
    header = struct.pack(">iiIii", 1, 0, FLOAT4_OID, vec.shape[0], 1)
    return header + elements.tobytes()


def decode_float4_array(data: Buffer) -> np.ndarray:
    """Inverse of :func:`encode_float4_array` for a 1-D ``real[]`` without NULLs."""
    ndim, has_null, elem_oid = struct.unpack_from(">iiI", data, 0)
    if ndim == 0:
        return np.empty(0, np.float32)
    if ndim != 1 or has_null or elem_oid != FLOAT4_OID:
        raise ValueError(f"not a 1-D real[] without NULLs: {ndim=} {has_null=} {elem_oid=}")
    (count,) = struct.unpack_from(">i", data, 12)
    elements = np.frombuffer(data, ARRAY_ELEMENT, count=count, offset=20)
    return elements["val"].astype(np.float32)


def decode_float4_arrays(blob: bytes, n_layers: int) -> np.ndarray:
    """Concatenated binary ``real[]`` values, each 1-D with ``n_layers`` elements, no NULLs."""
    record = np.dtype(
        [
            ("ndim", ">i4"),
            ("has_null", ">i4"),
            ("elem_oid", ">u4"),
            ("dim", ">i4"),
            ("lbound", ">i4"),
            ("elements", ARRAY_ELEMENT, (n_layers,)),
        ]
    )
    if len(blob) % record.itemsize:
        raise ValueError(f"not a whole number of {n_layers}-element real[] values")
    records = np.frombuffer(blob, record)
    if not (
        np.all(records["ndim"] == 1)
        and np.all(records["has_null"] == 0)
        and np.all(records["elem_oid"] == FLOAT4_OID)
        and np.all(records["dim"] == n_layers)
    ):
        raise ValueError(f"not all 1-D real[{n_layers}] without NULLs")
    return records["elements"]["val"].astype(np.float32)


class Float4ArrayDumper(Dumper):
    """Dump a float32 numpy vector as a binary ``real[]`` parameter or COPY field."""

    format = pq.Format.BINARY
    oid = FLOAT4_ARRAY_OID

    def dump(self, obj: np.ndarray) -> bytes:
        return encode_float4_array(obj)


class Float4ArrayLoader(Loader):
    """Load a binary ``real[]`` column as a float32 numpy vector."""

    format = pq.Format.BINARY

    def load(self, data: Buffer) -> np.ndarray:
        return decode_float4_array(data)


class RawBinaryLoader(Loader):
    """Load a column as its raw binary wire bytes, to decode many values at once."""

    format = pq.Format.BINARY

    def load(self, data: Buffer) -> bytes:
        return bytes(data)


def numpy_cursor(conn: Conn) -> Cur:
    """A binary cursor that adapts float32 numpy vectors to and from ``real[]``."""
    cur = conn.cursor(binary=True)
    cur.adapters.register_dumper(np.ndarray, Float4ArrayDumper)
    cur.adapters.register_loader(FLOAT4_ARRAY_OID, Float4ArrayLoader)
    return cur


# --------------------------------------------------------------------------------- workload


def make_dataset(runs: int, steps: int, layers: int, seed: int) -> Dataset:
    """Lognormal float32 norms with a few NaN, +Inf and -Inf at random positions."""
    rng = np.random.default_rng(seed)
    data: Dataset = {}
    for run_id in range(1, runs + 1):
        matrix = rng.lognormal(mean=-2.0, sigma=1.5, size=(steps, layers)).astype(np.float32)
        flat = matrix.reshape(-1)
        n_special = max(3, flat.size // 20000)
        positions = rng.choice(flat.size, size=n_special, replace=False)
        specials = np.array([np.nan, np.inf, -np.inf], dtype=np.float32)
        flat[positions] = specials[np.arange(n_special) % 3]
        data[run_id] = matrix
    return data


def count_values(data: Dataset, steps: int | None = None) -> int:
    """Number of values in all runs (optionally only in their first ``steps`` steps)."""
    return sum(m[:steps].size for m in data.values())


def check(label: str, got: np.ndarray, want: np.ndarray) -> bool:
    """Print and return whether ``got`` is bit-identical float32 to ``want``."""
    want = np.ascontiguousarray(want, dtype=np.float32)
    same = (
        got.dtype == np.float32
        and got.shape == want.shape
        and np.array_equal(np.ascontiguousarray(got).view(np.uint32), want.view(np.uint32))
    )
    nan_same = got.shape == want.shape and np.array_equal(np.isnan(got), np.isnan(want))
    verdict = "OK bit-identical" if same else "FAIL not bit-identical"
    print(
        f"    check {label}: {want.size:,} values {verdict}; NaN {int(np.isnan(want).sum())} "
        f"({'same' if nan_same else 'DIFFERENT'} positions), +Inf {int(np.sum(want == np.inf))}, "
        f"-Inf {int(np.sum(want == -np.inf))}",
        flush=True,
    )
    return same


# ----------------------------------------------------------------------------- narrow layout

NARROW_COLUMNS = "run_id int, step bigint, layer smallint, value real, "
NARROW_DDL = NARROW_COLUMNS + "PRIMARY KEY (run_id, step, layer)"
NARROW_UPSERT_TAIL = "ON CONFLICT (run_id, step, layer) DO UPDATE SET value = EXCLUDED.value"


def narrow_rows(run_id: int, step0: int, block: np.ndarray) -> list[tuple[object, ...]]:
    """One (run_id, step, layer, value) tuple per value of a block of steps."""
    rows: list[tuple[object, ...]] = []
    for i, values in enumerate(block.tolist()):
        rows.extend((run_id, step0 + i, layer, value) for layer, value in enumerate(values))
    return rows


def narrow_copy_write_row(conn: Conn, table: str, data: Dataset) -> None:
    for run_id, matrix in data.items():
        with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["int4", "int8", "int2", "float4"])
            for row in narrow_rows(run_id, 0, matrix):
                copy.write_row(row)


def narrow_copy_chunk(run_id: int, step0: int, block: np.ndarray) -> bytes:
    """Binary COPY rows (without header and trailer) for a block of steps, built with numpy."""
    n_steps, n_layers = block.shape
    rows = np.empty(block.size, NARROW_COPY_ROW)
    rows["nfields"] = 4
    rows["len_run"] = 4
    rows["run_id"] = run_id
    rows["len_step"] = 8
    rows["step"] = np.repeat(np.arange(step0, step0 + n_steps), n_layers)
    rows["len_layer"] = 2
    rows["layer"] = np.tile(np.arange(n_layers), n_steps)
    rows["len_value"] = 4
    rows["value"] = block.reshape(-1)
    return rows.tobytes()


def narrow_copy_stream(conn: Conn, table: str, data: Dataset) -> None:
    for run_id, matrix in data.items():
        with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.write(COPY_HEADER)
            for step0 in range(0, len(matrix), STREAM_CHUNK_STEPS):
                block = matrix[step0 : step0 + STREAM_CHUNK_STEPS]
                copy.write(narrow_copy_chunk(run_id, step0, block))
            copy.write(COPY_TRAILER)


def narrow_executemany(cur: Cur, table: str, run_id: int, step0: int, block: np.ndarray) -> None:
    query = f"INSERT INTO {table} VALUES (%s, %s, %s, %s) {NARROW_UPSERT_TAIL}"
    cur.executemany(query, narrow_rows(run_id, step0, block))


def narrow_values(cur: Cur, table: str, run_id: int, step0: int, block: np.ndarray) -> None:
    rows = narrow_rows(run_id, step0, block)
    execute_values(cur, f"INSERT INTO {table} VALUES", NARROW_UPSERT_TAIL, rows)


def narrow_unnest(cur: Cur, table: str, run_id: int, step0: int, block: np.ndarray) -> None:
    n_steps, n_layers = block.shape
    steps = np.repeat(np.arange(step0, step0 + n_steps), n_layers).tolist()
    layers = np.tile(np.arange(n_layers), n_steps).tolist()
    query = (
        f"INSERT INTO {table} SELECT %s::int, u.step, u.layer, u.value "
        "FROM unnest(%s::bigint[], %s::smallint[], %s::real[]) AS u(step, layer, value) "
        f"{NARROW_UPSERT_TAIL}"
    )
    cur.execute(query, (run_id, steps, layers, block.reshape(-1)))


def narrow_stage_setup(cur: Cur, table: str) -> None:
    cur.execute("DROP TABLE IF EXISTS stage_narrow")
    cur.execute(f"CREATE TEMP TABLE stage_narrow (LIKE {table}) ON COMMIT DELETE ROWS")


def narrow_stage(cur: Cur, table: str, run_id: int, step0: int, block: np.ndarray) -> None:
    with cur.copy("COPY stage_narrow FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["int4", "int8", "int2", "float4"])
        for row in narrow_rows(run_id, step0, block):
            copy.write_row(row)
    cur.execute(f"INSERT INTO {table} SELECT * FROM stage_narrow {NARROW_UPSERT_TAIL}")


def narrow_matrix_fetch(conn: Conn, table: str, run_id: int, n_layers: int) -> np.ndarray:
    with conn.cursor(binary=True) as cur:
        cur.execute(f"SELECT value FROM {table} WHERE run_id = %s ORDER BY step, layer", (run_id,))
        values = [row[0] for row in cur.fetchall()]
    return np.array(values, dtype=np.float32).reshape(-1, n_layers)


def narrow_matrix_agg(conn: Conn, table: str, run_id: int, n_layers: int) -> np.ndarray:
    query = f"SELECT array_agg(value ORDER BY step, layer) FROM {table} WHERE run_id = %s"
    with numpy_cursor(conn) as cur:
        row = cur.execute(query, (run_id,)).fetchone()
    assert row is not None
    values: np.ndarray = row[0]
    return values.reshape(-1, n_layers)


def narrow_series_agg(conn: Conn, table: str, run_id: int, layer: int) -> np.ndarray:
    query = f"SELECT array_agg(value ORDER BY step) FROM {table} WHERE run_id = %s AND layer = %s"
    with numpy_cursor(conn) as cur:
        row = cur.execute(query, (run_id, layer)).fetchone()
    assert row is not None
    values: np.ndarray = row[0]
    return values


def narrow_series_fetch(conn: Conn, table: str, run_id: int, layer: int) -> np.ndarray:
    query = f"SELECT value FROM {table} WHERE run_id = %s AND layer = %s ORDER BY step"
    with conn.cursor(binary=True) as cur:
        cur.execute(query, (run_id, layer))
        values = [row[0] for row in cur.fetchall()]
    return np.array(values, dtype=np.float32)


# ------------------------------------------------------------------ array and bytes layouts

ARRAY_DDL = "run_id int, metric text, step bigint, vals real[], PRIMARY KEY (run_id, metric, step)"
BYTES_DDL = "run_id int, metric text, step bigint, vals bytea, PRIMARY KEY (run_id, metric, step)"
VECTOR_UPSERT_TAIL = "ON CONFLICT (run_id, metric, step) DO UPDATE SET vals = EXCLUDED.vals"
WHERE_RUN = "WHERE run_id = %s AND metric = %s ORDER BY step"


def array_copy_list(conn: Conn, table: str, data: Dataset) -> None:
    for run_id, matrix in data.items():
        with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["int4", "text", "int8", "float4[]"])
            for step, values in enumerate(matrix.tolist()):
                copy.write_row((run_id, METRIC, step, values))


def array_copy_numpy(conn: Conn, table: str, data: Dataset) -> None:
    for run_id, matrix in data.items():
        with (
            conn.transaction(),
            numpy_cursor(conn) as cur,
            cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["int4", "text", "int8", "float4[]"])
            for step in range(len(matrix)):
                copy.write_row((run_id, METRIC, step, matrix[step]))


def bytes_copy(conn: Conn, table: str, data: Dataset) -> None:
    for run_id, matrix in data.items():
        little_endian = matrix.astype("<f4")
        with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["int4", "text", "int8", "bytea"])
            for step in range(len(matrix)):
                copy.write_row((run_id, METRIC, step, little_endian[step].tobytes()))


def array_rows(run_id: int, step0: int, block: np.ndarray) -> list[tuple[object, ...]]:
    """One (run_id, metric, step, float32 vector) tuple per step."""
    return [(run_id, METRIC, step0 + i, block[i]) for i in range(len(block))]


def array_list_rows(run_id: int, step0: int, block: np.ndarray) -> list[tuple[object, ...]]:
    """One (run_id, metric, step, list of floats) tuple per step: psycopg's own adaptation."""
    return [(run_id, METRIC, step0 + i, values) for i, values in enumerate(block.tolist())]


def bytes_rows(run_id: int, step0: int, block: np.ndarray) -> list[tuple[object, ...]]:
    """One (run_id, metric, step, little-endian float32 bytes) tuple per step."""
    little_endian = block.astype("<f4")
    return [(run_id, METRIC, step0 + i, little_endian[i].tobytes()) for i in range(len(block))]


RowsFn = Callable[[int, int, np.ndarray], list[tuple[object, ...]]]


def vector_executemany(rows_fn: RowsFn) -> BatchFn:
    def batch(cur: Cur, table: str, run_id: int, step0: int, block: np.ndarray) -> None:
        query = f"INSERT INTO {table} VALUES (%s, %s, %s, %s) {VECTOR_UPSERT_TAIL}"
        cur.executemany(query, rows_fn(run_id, step0, block))

    return batch


def vector_values(rows_fn: RowsFn) -> BatchFn:
    def batch(cur: Cur, table: str, run_id: int, step0: int, block: np.ndarray) -> None:
        rows = rows_fn(run_id, step0, block)
        execute_values(cur, f"INSERT INTO {table} VALUES", VECTOR_UPSERT_TAIL, rows)

    return batch


def array_values_list(cur: Cur, table: str, run_id: int, step0: int, block: np.ndarray) -> None:
    """Multi-row VALUES with float lists (psycopg sends float8[]; the server casts to real[])."""
    rows = array_list_rows(run_id, step0, block)
    execute_values(cur, f"INSERT INTO {table} VALUES", VECTOR_UPSERT_TAIL, rows)


def bytes_unnest(cur: Cur, table: str, run_id: int, step0: int, block: np.ndarray) -> None:
    little_endian = block.astype("<f4")
    blobs = [little_endian[i].tobytes() for i in range(len(block))]
    query = (
        f"INSERT INTO {table} SELECT %s::int, %s::text, u.step, u.vals "
        f"FROM unnest(%s::bigint[], %s::bytea[]) AS u(step, vals) {VECTOR_UPSERT_TAIL}"
    )
    cur.execute(query, (run_id, METRIC, list(range(step0, step0 + len(block))), blobs))


def vector_stage(stage: str, pg_type: str, rows_fn: RowsFn) -> tuple[SetupFn, BatchFn]:
    """Setup and batch functions for COPY into a temp table, then INSERT ... SELECT."""

    def setup(cur: Cur, table: str) -> None:
        cur.execute(f"DROP TABLE IF EXISTS {stage}")
        cur.execute(f"CREATE TEMP TABLE {stage} (LIKE {table}) ON COMMIT DELETE ROWS")

    def batch(cur: Cur, table: str, run_id: int, step0: int, block: np.ndarray) -> None:
        with cur.copy(f"COPY {stage} FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text", "int8", pg_type])
            for row in rows_fn(run_id, step0, block):
                copy.write_row(row)
        cur.execute(f"INSERT INTO {table} SELECT * FROM {stage} {VECTOR_UPSERT_TAIL}")

    return setup, batch


def array_matrix_list(conn: Conn, table: str, run_id: int, n_layers: int) -> np.ndarray:
    with conn.cursor(binary=True) as cur:
        cur.execute(f"SELECT vals FROM {table} {WHERE_RUN}", (run_id, METRIC))
        rows = [row[0] for row in cur.fetchall()]
    return np.array(rows, dtype=np.float32).reshape(-1, n_layers)


def array_matrix_numpy(conn: Conn, table: str, run_id: int, n_layers: int) -> np.ndarray:
    with numpy_cursor(conn) as cur:
        cur.execute(f"SELECT vals FROM {table} {WHERE_RUN}", (run_id, METRIC))
        rows = [row[0] for row in cur.fetchall()]
    return np.stack(rows).reshape(-1, n_layers)


def array_matrix_raw(conn: Conn, table: str, run_id: int, n_layers: int) -> np.ndarray:
    with conn.cursor(binary=True) as cur:
        cur.adapters.register_loader(FLOAT4_ARRAY_OID, RawBinaryLoader)
        cur.execute(f"SELECT vals FROM {table} {WHERE_RUN}", (run_id, METRIC))
        blob = b"".join(row[0] for row in cur.fetchall())
    return decode_float4_arrays(blob, n_layers).reshape(-1, n_layers)


def array_series_element(conn: Conn, table: str, run_id: int, layer: int) -> np.ndarray:
    with conn.cursor(binary=True) as cur:
        cur.execute(f"SELECT vals[%s] FROM {table} {WHERE_RUN}", (layer + 1, run_id, METRIC))
        values = [row[0] for row in cur.fetchall()]
    return np.array(values, dtype=np.float32)


def bytes_matrix(conn: Conn, table: str, run_id: int, n_layers: int) -> np.ndarray:
    with conn.cursor(binary=True) as cur:
        cur.execute(f"SELECT vals FROM {table} {WHERE_RUN}", (run_id, METRIC))
        blob = b"".join(row[0] for row in cur.fetchall())
    return np.frombuffer(blob, dtype="<f4").astype(np.float32).reshape(-1, n_layers)


def bytes_series_slice(conn: Conn, table: str, run_id: int, layer: int) -> np.ndarray:
    with conn.cursor(binary=True) as cur:
        cur.execute(f"SELECT vals FROM {table} {WHERE_RUN}", (run_id, METRIC))
        rows = [np.frombuffer(row[0], dtype="<f4") for row in cur.fetchall()]
    return np.stack(rows)[:, layer].astype(np.float32)


def bytes_series_substring(conn: Conn, table: str, run_id: int, layer: int) -> np.ndarray:
    query = f"SELECT substring(vals from %s for 4) FROM {table} {WHERE_RUN}"
    with conn.cursor(binary=True) as cur:
        cur.execute(query, (4 * layer + 1, run_id, METRIC))
        blob = b"".join(row[0] for row in cur.fetchall())
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def execute_values(cur: Cur, head: str, tail: str, rows: list[tuple[object, ...]]) -> None:
    """``head (..), (..), ... tail`` as few statements as the parameter limit allows."""
    width = len(rows[0])
    per_statement = MAX_PARAMS // width
    row_sql = "(" + ", ".join(["%s"] * width) + ")"
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        params = [value for row in chunk for value in row]
        cur.execute(f"{head} {', '.join([row_sql] * len(chunk))} {tail}", params)


# -------------------------------------------------------------------------------- registry


@dataclass
class UpsertPath:
    batch: BatchFn
    setup: SetupFn | None = None
    staged: bool = False  # COPY into a temp table + INSERT ... SELECT


@dataclass
class Layout:
    name: str
    ddl: str
    copy: dict[str, CopyFn]
    upsert: dict[str, UpsertPath]
    matrix: dict[str, MatrixFn]
    series: dict[str, SeriesFn]


def layouts() -> list[Layout]:
    """The layouts under test, baseline first, with every client path tried for each."""
    array_stage_setup, array_stage_batch = vector_stage("stage_array", "float4[]", array_rows)
    bytes_stage_setup, bytes_stage_batch = vector_stage("stage_bytes", "bytea", bytes_rows)
    narrow = Layout(
        name="narrow",
        ddl=NARROW_DDL,
        copy={"write_row": narrow_copy_write_row, "numpy-stream": narrow_copy_stream},
        upsert={
            "executemany": UpsertPath(narrow_executemany),
            "values": UpsertPath(narrow_values),
            "unnest": UpsertPath(narrow_unnest),
            "stage-copy": UpsertPath(narrow_stage, narrow_stage_setup, staged=True),
        },
        matrix={
            "fetch": narrow_matrix_fetch,
            "array_agg": narrow_matrix_agg,
        },
        series={"fetch": narrow_series_fetch, "array_agg": narrow_series_agg},
    )
    array = Layout(
        name="array",
        ddl=ARRAY_DDL,
        copy={"write_row-list": array_copy_list, "write_row-numpy": array_copy_numpy},
        upsert={
            "executemany": UpsertPath(vector_executemany(array_rows)),
            "values": UpsertPath(vector_values(array_rows)),
            "values-list": UpsertPath(array_values_list),
            "stage-copy": UpsertPath(array_stage_batch, array_stage_setup, staged=True),
        },
        matrix={
            "fetch-list": array_matrix_list,
            "fetch-numpy": array_matrix_numpy,
            "fetch-raw": array_matrix_raw,
        },
        series={"vals[k]": array_series_element},
    )
    blob = Layout(
        name="bytes",
        ddl=BYTES_DDL,
        copy={"write_row": bytes_copy},
        upsert={
            "executemany": UpsertPath(vector_executemany(bytes_rows)),
            "values": UpsertPath(vector_values(bytes_rows)),
            "unnest": UpsertPath(bytes_unnest),
            "stage-copy": UpsertPath(bytes_stage_batch, bytes_stage_setup, staged=True),
        },
        matrix={"fetch": bytes_matrix},
        series={"fetch-slice": bytes_series_slice, "substring": bytes_series_substring},
    )
    return [narrow, array, blob]


# ------------------------------------------------------------------------------ measuring


@dataclass
class Figures:
    """What was measured for one layout; times in seconds, rates in values/s."""

    copy: dict[str, float] = field(default_factory=dict)
    upsert: dict[str, float] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)
    values: int = 0
    matrix: dict[str, float] = field(default_factory=dict)
    series: dict[str, float] = field(default_factory=dict)
    staged: set[str] = field(default_factory=set)


@dataclass
class Plan:
    """How much to load and how often to repeat each timing."""

    upsert_steps: int  # steps per run in the upsert measurement
    batch_steps: int  # steps per upsert batch (one transaction)
    ingest_reps: int  # least number of timed COPY loads per client path
    upsert_reps: int  # least number of timed upsert loads per client path
    reps: int  # least number of timed reads per client path
    min_seconds: float  # repeat each timing until the timed runs add up to this


def table_name(layout: Layout, suffix: str = "") -> str:
    return f"{SCHEMA}.layer_{layout.name}{suffix}"


def create_table(conn: Conn, table: str, ddl: str) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(f"CREATE TABLE {table} ({ddl}) WITH (autovacuum_enabled = off)")


def checkpoint(conn: Conn) -> None:
    """Flush dirty buffers so one load's writes do not land in the next load's timing."""
    try:
        conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        log("  (CHECKPOINT not permitted for this user; skipped)")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def seconds_of(fn: Callable[[], object]) -> float:
    return timed(fn)[0]


def repeat_until(
    once: Callable[[], float], times: list[float], reps: int, min_seconds: float
) -> list[float]:
    """Append timings of ``once`` until there are ``reps`` that add up to ``min_seconds``."""
    while len(times) < reps or sum(times) < min_seconds:
        times.append(once())
    return times


def spread(times: list[float]) -> str:
    """Min, max and count of a list of timings, for the progress lines."""
    return f"min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms, n={len(times)}"


def verify_table(
    conn: Conn, layout: Layout, table: str, data: Dataset, steps: int | None, label: str
) -> bool:
    """Read every run back with the layout's first matrix reader and check it."""
    reader = next(iter(layout.matrix.values()))
    ok = True
    for run_id, matrix in data.items():
        got = reader(conn, table, run_id, matrix.shape[1])
        ok &= check(f"{label} run {run_id}", got, matrix[:steps])
    return ok


def measure_copy(conn: Conn, layout: Layout, data: Dataset, plan: Plan, figures: Figures) -> bool:
    """Raw COPY ingest for every client path; leaves the fully loaded table behind."""
    ok = True
    table = table_name(layout)
    n_values = count_values(data)
    for variant, copy_fn in layout.copy.items():

        def load(copy_fn: CopyFn = copy_fn) -> float:
            create_table(conn, table, layout.ddl)
            checkpoint(conn)
            return seconds_of(partial(copy_fn, conn, table, data))

        times = [load()]
        ok &= verify_table(conn, layout, table, data, None, f"{layout.name}/{variant}")
        repeat_until(load, times, plan.ingest_reps, plan.min_seconds)
        figures.copy[variant] = n_values / statistics.median(times)
        log(
            f"  {layout.name} COPY {variant}: {n_values:,} values, median "
            f"{statistics.median(times):.3f} s = {figures.copy[variant] / 1e6:.3f} M values/s "
            f"({spread(times)})"
        )
    return ok


def measure_size(conn: Conn, layout: Layout, data: Dataset, figures: Figures) -> None:
    table = table_name(layout)
    conn.execute(f"VACUUM ANALYZE {table}")
    row = conn.execute(
        "SELECT pg_total_relation_size(%s::regclass), pg_relation_size(%s::regclass), "
        "pg_indexes_size(%s::regclass)",
        (table, table, table),
    ).fetchone()
    assert row is not None
    total, heap, indexes = row
    figures.size = {"total": total, "heap": heap, "index": indexes}
    figures.values = count_values(data)
    log(
        f"  {layout.name} size: {total:,} B total (heap {heap:,}, indexes {indexes:,}, "
        f"toast+fsm+vm {total - heap - indexes:,}) = {total / figures.values:.2f} B/value"
    )


def measure_reads(conn: Conn, layout: Layout, data: Dataset, plan: Plan, figures: Figures) -> bool:
    """Median read times of one run's matrix and of one layer's series, every client path."""
    ok = True
    table = table_name(layout)
    run_id = next(iter(data))
    matrix = data[run_id]
    n_layers = matrix.shape[1]
    # The layer with the most non-finite values, so the series check covers them.
    layer = int(np.argmax((~np.isfinite(matrix)).sum(axis=0)))
    jobs: list[tuple[str, dict[str, float], str, Callable[[], np.ndarray], np.ndarray]] = []
    for variant, matrix_fn in layout.matrix.items():
        job: Callable[[], np.ndarray] = partial(matrix_fn, conn, table, run_id, n_layers)
        jobs.append(("matrix", figures.matrix, variant, job, matrix))
    for variant, series_fn in layout.series.items():
        job = partial(series_fn, conn, table, run_id, layer)
        jobs.append((f"series[{layer}]", figures.series, variant, job, matrix[:, layer]))
    for what, store, variant, job, want in jobs:
        got = job()  # warm-up, and the value that is checked
        ok &= check(f"{layout.name} read {what} {variant}", got, want)
        times = repeat_until(partial(seconds_of, job), [], plan.reps, plan.min_seconds)
        store[variant] = statistics.median(times)
        log(
            f"  {layout.name} read {what} {variant}: median {store[variant] * 1e3:.1f} ms "
            f"({spread(times)})"
        )
    return ok


def upsert_once(
    conn: Conn, layout: Layout, table: str, data: Dataset, plan: Plan, path: UpsertPath
) -> float:
    """Seconds to upsert the first ``plan.upsert_steps`` steps of every run into a fresh table."""
    create_table(conn, table, layout.ddl)
    checkpoint(conn)
    with numpy_cursor(conn) as cur:
        if path.setup is not None:
            path.setup(cur, table)
        start = time.perf_counter()
        for run_id, matrix in data.items():
            for step0 in range(0, plan.upsert_steps, plan.batch_steps):
                block = matrix[step0 : min(step0 + plan.batch_steps, plan.upsert_steps)]
                with conn.transaction():
                    path.batch(cur, table, run_id, step0, block)
        return time.perf_counter() - start


def measure_upserts(
    conn: Conn, layout: Layout, data: Dataset, plan: Plan, figures: Figures
) -> bool:
    """Idempotent batched ingest, every client path, each time into a fresh empty table."""
    ok = True
    table = table_name(layout, "_upsert")
    n_values = count_values(data, plan.upsert_steps)
    for variant, path in layout.upsert.items():
        once = partial(upsert_once, conn, layout, table, data, plan, path)
        times = [once()]
        label = f"{layout.name}/upsert {variant}"
        ok &= verify_table(conn, layout, table, data, plan.upsert_steps, label)
        repeat_until(once, times, plan.upsert_reps, plan.min_seconds)
        figures.upsert[variant] = n_values / statistics.median(times)
        if path.staged:
            figures.staged.add(variant)
        log(
            f"  {layout.name} upsert {variant}: {n_values:,} values, median "
            f"{statistics.median(times):.3f} s = {figures.upsert[variant] / 1e6:.3f} M values/s "
            f"({spread(times)})"
        )
    conn.execute(f"DROP TABLE {table}")
    return ok


# ------------------------------------------------------------------------------- reporting


def best(values: dict[str, float], higher_is_better: bool) -> tuple[str, float]:
    """The best (variant, figure) of a dict of figures."""
    pick = max if higher_is_better else min
    variant = pick(values, key=lambda name: values[name])
    return variant, values[variant]


SummaryRow = tuple[str, bool, dict[str, tuple[str, float]]]


def summary_rows(figures: dict[str, Figures]) -> list[SummaryRow]:
    """(measurement, higher is better, {layout: (variant, figure)}) for the main table."""
    rows: list[SummaryRow] = []

    def add(label: str, higher: bool, pick: Callable[[Figures], dict[str, float]]) -> None:
        rows.append((label, higher, {name: best(pick(f), higher) for name, f in figures.items()}))

    add("raw COPY ingest, M values/s", True, lambda f: f.copy)
    add(
        "upsert, 1 statement per batch, M values/s",
        True,
        lambda f: {k: v for k, v in f.upsert.items() if k not in f.staged},
    )
    add(
        "upsert, COPY to temp + INSERT SELECT, M values/s",
        True,
        lambda f: {k: v for k, v in f.upsert.items() if k in f.staged},
    )
    add("on-disk bytes per value", False, lambda f: {"": f.size["total"] / f.values})
    add("read one run's matrix, ms", False, lambda f: f.matrix)
    add("read one layer's series, ms", False, lambda f: f.series)
    return rows


def format_figure(label: str, value: float) -> str:
    if "M values/s" in label:
        return f"{value / 1e6:.3f}"
    if label.endswith(", ms"):
        return f"{value * 1e3:.1f}"
    return f"{value:.2f}"


def print_summary(figures: dict[str, Figures]) -> None:
    names = list(figures)
    baseline = names[0]
    others = names[1:]
    header = ["measurement", "better"] + names + [f"{n} / {baseline}" for n in others]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
    for label, higher, cells in summary_rows(figures):
        values = [format_figure(label, cells[n][1]) for n in names]
        ratios = [f"{cells[n][1] / cells[baseline][1]:.3g}x" for n in others]
        better = "higher" if higher else "lower"
        print("| " + " | ".join([label, better, *values, *ratios]) + " |")
    print("\nClient path behind each figure above (fastest one tried):\n")
    print("| measurement | " + " | ".join(names) + " |")
    print("|---|" + "|".join(["---"] * len(names)) + "|")
    for label, _higher, cells in summary_rows(figures):
        print("| " + " | ".join([label] + [cells[n][0] or "-" for n in names]) + " |")


def print_details(figures: dict[str, Figures]) -> None:
    baseline = next(iter(figures.values()))
    print("\nEvery client path (ratio against the best narrow path of the same measurement):\n")
    print("| layout | measurement | path | figure | / best narrow |")
    print("|---|---|---|---:|---:|")
    for name, f in figures.items():
        groups: list[tuple[str, dict[str, float], dict[str, float], float]] = [
            ("raw COPY, M values/s", f.copy, baseline.copy, 1e-6),
            ("upsert, M values/s", f.upsert, baseline.upsert, 1e-6),
            ("matrix read, ms", f.matrix, baseline.matrix, 1e3),
            ("series read, ms", f.series, baseline.series, 1e3),
        ]
        for label, values, base_values, scale in groups:
            higher = "values/s" in label
            for variant, value in values.items():
                pool = base_values
                if label.startswith("upsert"):
                    staged = variant in f.staged
                    pool = {k: v for k, v in pool.items() if (k in baseline.staged) == staged}
                ratio = value / best(pool, higher)[1]
                print(f"| {name} | {label} | {variant} | {value * scale:.3f} | {ratio:.3g}x |")
    print("\nOn-disk size after VACUUM ANALYZE:\n")
    print("| layout | values | total B | heap B | index B | other B | B/value |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, f in figures.items():
        s = f.size
        other = s["total"] - s["heap"] - s["index"]
        print(
            f"| {name} | {f.values:,} | {s['total']:,} | {s['heap']:,} | {s['index']:,} "
            f"| {other:,} | {s['total'] / f.values:.2f} |"
        )


def print_claims(figures: dict[str, Figures]) -> None:
    """Set the earlier claims beside this run's figures."""
    narrow, array = figures["narrow"], figures["array"]
    array_copy = max(array.copy.values())
    narrow_copy = max(narrow.copy.values())
    print("\nEarlier claims vs this run:")
    print(
        f"  array (real[] per step), raw COPY: claimed 8.4-9.3 M values/s at 4.7 B/value; "
        f"measured {array_copy / 1e6:.2f} M values/s at "
        f"{array.size['total'] / array.values:.2f} B/value"
    )
    print(
        f"  narrow (row per value), raw COPY: claimed 0.27-0.46 M values/s at 76-79 B/value; "
        f"measured {narrow_copy / 1e6:.2f} M values/s at "
        f"{narrow.size['total'] / narrow.values:.2f} B/value"
    )


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20000, help="steps per run")
    parser.add_argument("--layers", type=int, default=128, help="layers per step")
    parser.add_argument("--upsert-steps", type=int, default=1000, help="steps per run upserted")
    parser.add_argument("--batch-steps", type=int, default=100, help="steps per upsert batch")
    parser.add_argument("--reps", type=int, default=3, help="least timed reads per path")
    parser.add_argument("--ingest-reps", type=int, default=2, help="least COPY loads per path")
    parser.add_argument("--upsert-reps", type=int, default=1, help="least upsert loads per path")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="repeat each timing until the timed repetitions add up to this many seconds",
    )
    parser.add_argument("--seed", type=int, default=20261123)
    args = parser.parse_args(argv)
    args.upsert_steps = min(args.upsert_steps, args.steps)
    return args


def run_phases(conn: Conn, data: Dataset, plan: Plan, figures: dict[str, Figures]) -> bool:
    """Each phase for every layout in turn, so slow drift of the machine hits them alike."""
    ok = True
    all_layouts = layouts()
    for layout in all_layouts:
        figures[layout.name] = Figures()
    log("phase: raw COPY ingest")
    for layout in all_layouts:
        ok &= measure_copy(conn, layout, data, plan, figures[layout.name])
    log("phase: on-disk size")
    for layout in all_layouts:
        measure_size(conn, layout, data, figures[layout.name])
    log("phase: reads")
    for layout in all_layouts:
        ok &= measure_reads(conn, layout, data, plan, figures[layout.name])
    log("phase: upserts")
    for layout in all_layouts:
        ok &= measure_upserts(conn, layout, data, plan, figures[layout.name])
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = make_dataset(args.runs, args.steps, args.layers, args.seed)
    n_values = count_values(data)
    log(
        f"workload: {args.runs} runs x {args.steps:,} steps x {args.layers} layers = "
        f"{n_values:,} values per layout; upserts: {args.upsert_steps:,} steps per run "
        f"in batches of {args.batch_steps}"
    )
    figures: dict[str, Figures] = {}
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        log(f"server: {conn.execute('SELECT version()').fetchone()}")
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        try:
            plan = Plan(
                upsert_steps=args.upsert_steps,
                batch_steps=args.batch_steps,
                ingest_reps=args.ingest_reps,
                upsert_reps=args.upsert_reps,
                reps=args.reps,
                min_seconds=args.min_seconds,
            )
            ok = run_phases(conn, data, plan, figures)
        finally:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
            log(f"dropped schema {SCHEMA}")
    print_summary(figures)
    print_details(figures)
    print_claims(figures)
    print(f"\nround-trip checks: {'all OK' if ok else 'SOME FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
