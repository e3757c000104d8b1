"""Robust baselines for spike detection (pure; numpy only).

Two kinds, both serialisable to plain JSON so the analysis state of a run can live in the
database and move between collector processes:

- :class:`Window`: the last ``size`` *accepted* values of a scalar series. Centre = median,
  scale = 1.4826 · MAD (the normal-consistent median absolute deviation), floored by
  ``rel_floor · |median|`` and ``abs_floor`` so that a constant series does not turn every
  rounding error into an infinite z-score. The score of a new point is

      z = (x − median) / max(1.4826 · MAD, rel_floor · |median|, abs_floor)

  computed against the window *before* the point enters it (the point under test is never
  part of its own baseline). A point is accepted into the window only when it is finite and
  its z is below the rejection level: spikes and NaN never pollute the baseline. After
  ``patience`` consecutive rejections the window restarts from the newest values (a level
  shift is a new regime, not an endless spike).
- :class:`LayerEma`: per-layer exponential moving average of log-norms and of their absolute
  deviation, with the same rejection rule, O(layers) memory.
"""

from __future__ import annotations

import base64
import bisect
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAD_TO_SIGMA = 1.4826


def pack(values: Any, dtype: str) -> str:
    """A numeric vector as base64 of its little-endian bytes (``dtype`` "<f8" or "<i8"):
    exact, and a fraction of the (de)serialising cost of a JSON list of floats (the analysis
    state of a run is read and written on every ingest). Small integers stay JSON lists,
    which are shorter."""
    return base64.b64encode(np.asarray(values, dtype).tobytes()).decode("ascii")


def unpack(data: Any, dtype: str) -> np.ndarray:
    """The vector :func:`pack` wrote; a JSON list (states stored before packing) also reads."""
    if isinstance(data, str):
        return np.frombuffer(base64.b64decode(data), dtype).astype(dtype[1:])
    return np.asarray(data, dtype[1:])


def _mad(s: list[float], med: float) -> float:
    """Median of |s_i - med| for sorted ``s``: merge the deviations outward from the median
    (both sides are already sorted), O(n/2) without sorting."""
    n = len(s)
    i = bisect.bisect_right(s, med) - 1
    j = i + 1
    want = n // 2
    prev = cur = 0.0
    for k in range(want + 1):
        left = med - s[i] if i >= 0 else math.inf
        right = s[j] - med if j < n else math.inf
        if left <= right:
            cur, i = left, i - 1
        else:
            cur, j = right, j + 1
        if k == want - 1:
            prev = cur
    return cur if n % 2 else 0.5 * (prev + cur)


@dataclass
class Window:
    size: int = 100
    values: list[float] = field(default_factory=list)  # accepted values, oldest first
    rejected: list[float] = field(default_factory=list)  # consecutive rejected values

    def __post_init__(self) -> None:
        # Kept sorted alongside ``values`` so the median costs O(1) per step (not serialised).
        self._sorted = sorted(self.values)

    def ready(self, warmup: int) -> bool:
        return len(self.values) >= warmup

    def median(self) -> float:
        s, n = self._sorted, len(self._sorted)
        return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])

    def stats(self, rel_floor: float, abs_floor: float) -> tuple[float, float]:
        """(median, effective sigma) of the accepted values."""
        med = self.median()
        mad = _mad(self._sorted, med)
        sigma = max(MAD_TO_SIGMA * mad, rel_floor * abs(med), abs_floor)
        return med, sigma

    def score(self, x: float, rel_floor: float, abs_floor: float, exact_from: float) -> float:
        """One-sided robust z of ``x`` against the window (excluding ``x``).

        The MAD is only computed where it can matter: sigma >= the floor, so
        (x - median) / floor bounds z from above, and while that bound is below
        ``exact_from`` (the lowest threshold the caller compares z with) the bound is
        returned instead of the exact z. Both are then below every threshold.
        """
        med = self.median()
        bound = (x - med) / max(rel_floor * abs(med), abs_floor)
        if bound < exact_from:
            return bound
        _, sigma = self.stats(rel_floor, abs_floor)
        return (x - med) / sigma

    def offer(self, x: float, z: float | None, reject_z: float, patience: int) -> bool:
        """Feed ``x`` (with its score ``z``, None during warm-up). Returns True if accepted.

        Non-finite values are never accepted and do not count towards a regime change.
        """
        if not math.isfinite(x):
            return False
        if z is not None and z >= reject_z:
            self.rejected.append(x)
            if len(self.rejected) >= patience:
                self.values = self.rejected[-self.size :]
                self._sorted = sorted(self.values)
                self.rejected = []
            return False
        self.rejected = []
        self.values.append(x)
        bisect.insort(self._sorted, x)
        while len(self.values) > self.size:
            old = self.values.pop(0)
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        return True

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "values": pack(self.values, "<f8"),
                "rejected": pack(self.rejected, "<f8")}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, size: int) -> Window:
        if not data:
            return cls(size=size)
        values: list[float] = unpack(data["values"], "<f8").tolist()
        rejected: list[float] = unpack(data.get("rejected", []), "<f8").tolist()
        return cls(size=size, values=values[-size:], rejected=rejected)


@dataclass
class LayerEma:
    """Per-layer baseline of log-norms: mean and mean absolute deviation (EMA, weight alpha).

    ``score`` is (log x − mean) / max(1.25 · dev, floor): 1.25 · mean-abs-dev estimates σ for
    normal data. Zero norms score −inf (vanishing), NaN scores NaN and is never accepted.
    """

    n_layers: int
    alpha: float = 0.05
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dev: np.ndarray = field(default_factory=lambda: np.zeros(0))
    count: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rejects: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        self._steady = False  # every layer past warm-up and the 1/n start (not serialised)
        if self.mean.shape != (self.n_layers,):
            self.mean = np.zeros(self.n_layers)
            self.dev = np.zeros(self.n_layers)
            self.count = np.zeros(self.n_layers, dtype=np.int64)
            self.rejects = np.zeros(self.n_layers, dtype=np.int64)

    def score(self, values: np.ndarray, floor: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log(np.asarray(values, dtype=np.float64))
            z: np.ndarray = (logs - self.mean) / np.maximum(1.25 * self.dev, floor)
        return z

    @property
    def steady(self) -> bool:
        """Every layer past its warm-up and the 1/n start of the EMA."""
        return self._steady

    def update_steady(self, delta: np.ndarray) -> None:
        """The common case, every layer warm, finite and in range (``delta`` = log x - mean):
        plain EMA updates."""
        self.mean += self.alpha * delta
        self.dev += self.alpha * (np.abs(delta) - self.dev)
        self.count += 1
        self.rejects.fill(0)

    def offer(
        self, values: np.ndarray, z: np.ndarray, reject_z: float, patience: int, warmup: int
    ) -> None:
        """Update the layers whose value is finite, positive and not an outlier (|z| < reject)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log(np.asarray(values, dtype=np.float64))
        finite = np.isfinite(logs)
        if self.steady and finite.all() and (np.abs(z) < reject_z).all():
            self.update_steady(logs - self.mean)
            return
        warm = self.count >= warmup
        outlier = warm & ~(np.abs(z) < reject_z)
        outlier &= finite
        self.rejects = np.where(outlier, self.rejects + 1, 0)
        # A layer that stays "out" for `patience` records has a new level: restart there.
        restart = self.rejects >= patience
        take = finite & (~outlier | restart)
        first = take & ((self.count == 0) | restart)
        a = np.where(self.count < 1.0 / self.alpha, 1.0 / (self.count + 1.0), self.alpha)
        delta = logs - self.mean
        new_mean = np.where(take, self.mean + a * delta, self.mean)
        new_dev = np.where(take, (1 - a) * self.dev + a * np.abs(delta), self.dev)
        self.mean = np.where(first, logs, new_mean)
        self.dev = np.where(first, 0.0, new_dev)
        self.count = np.where(restart, 1, self.count + take.astype(np.int64))
        self.rejects = np.where(restart, 0, self.rejects)
        self._steady = bool((self.count >= max(warmup, 1.0 / self.alpha)).all())

    def to_json(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "mean": pack(self.mean, "<f8"),
            "dev": pack(self.dev, "<f8"),
            "count": self.count.tolist(),
            "rejects": self.rejects.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, n_layers: int, alpha: float) -> LayerEma:
        if not data:
            return cls(n_layers=n_layers, alpha=alpha)
        mean = unpack(data["mean"], "<f8")
        if len(mean) != n_layers:
            return cls(n_layers=n_layers, alpha=alpha)
        return cls(
            n_layers=n_layers,
            alpha=alpha,
            mean=mean,
            dev=unpack(data["dev"], "<f8"),
            count=unpack(data["count"], "<i8"),
            rejects=unpack(data["rejects"], "<i8"),
        )
