"""Min/max bucketing that never drops a spike."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Buckets:
    """Per-bucket aggregates; the value arrays have one row per bucket."""

    size: int
    step: np.ndarray
    step_end: np.ndarray
    min: np.ndarray
    max: np.ndarray
    nonfinite: np.ndarray


def bucket_size(first: int, last: int, max_points: int) -> int:
    """Smallest whole number of steps per bucket that yields ≤ ``max_points`` buckets."""
    span = last - first + 1
    return max(1, -(-span // max_points))


def downsample(steps: np.ndarray, values: np.ndarray, origin: int, size: int) -> Buckets:
    """Group ``values`` (rows ordered by ``steps``) into buckets of ``size`` steps.

    Bucket ``k`` holds the steps in ``[origin + k·size, origin + (k+1)·size)``.
    min/max ignore NaN (``np.fmin``/``np.fmax``) so a NaN next to a spike hides
    neither; ±Inf take part, so an overflow shows as the bucket's max (or min).
    ``values`` may be 1-D (one series) or 2-D (steps × layers).
    """
    if steps.size == 0:
        empty = np.empty((0,) + values.shape[1:], dtype=values.dtype)
        none = np.empty(0, dtype=np.int64)
        return Buckets(size, none, none, empty, empty, empty.astype(np.int64))
    keys = (steps - origin) // size
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], steps.size] - 1
    with np.errstate(invalid="ignore"):
        vmin = np.fmin.reduceat(values, starts, axis=0)
        vmax = np.fmax.reduceat(values, starts, axis=0)
    nonfinite = np.add.reduceat((~np.isfinite(values)).astype(np.int64), starts, axis=0)
    return Buckets(size, steps[starts], steps[ends], vmin, vmax, nonfinite)
