"""Column types that keep NaN and ±Inf exact on Postgres and on SQLite."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sqlalchemy import Dialect, Float, LargeBinary
from sqlalchemy.types import TypeDecorator

_SQLITE_NAN = "NaN"


class Float64(TypeDecorator[float]):
    """A double that round-trips NaN on SQLite too.

    SQLite has no NaN: it stores a bound NaN as NULL, which would make a NaN
    loss indistinguishable from "not reported". We bind NaN as the text 'NaN'
    instead; a REAL-affinity column keeps text that is not a number as text, and
    reading it back yields ``float('nan')``. ±Inf are native on both databases.
    """

    impl = Float(precision=53)
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Any:
        # Replaces, rather than precedes, the impl's processor: SQLite's Float
        # processor would turn the 'NaN' text straight back into a float.
        if dialect.name != "sqlite":
            return None

        def process(value: float | None) -> Any:
            if value is not None and math.isnan(value):
                return _SQLITE_NAN
            return value

        return process

    def process_result_value(self, value: Any, dialect: Dialect) -> float | None:
        if value is None:
            return None
        return float(value)


def to_float32(values: Any) -> np.ndarray:
    """``values`` as a little-endian float32 vector, the storage of per-layer values.

    A double beyond float32's range becomes ±Inf, as the cast makes it (without numpy's
    overflow warning): a layer value that large is stored as overflowed.
    """
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float64).astype("<f4")


class Float32Array(TypeDecorator[np.ndarray]):
    """A vector of float32 stored as little-endian bytes (bytea / BLOB).

    Chosen by ``bench/storage.py`` (see ``bench/RESULTS.md``): one row per step
    holding the values of every layer; the same bytes on both databases, NaN and
    ±Inf bit-exact, decoded with one ``np.frombuffer``.
    """

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | None:
        if value is None or isinstance(value, bytes):
            return value
        return to_float32(value).tobytes()

    def process_result_value(self, value: Any, dialect: Dialect) -> np.ndarray | None:
        if value is None:
            return None
        return np.frombuffer(value, dtype="<f4")
