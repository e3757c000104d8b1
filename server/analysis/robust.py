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

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAD_TO_SIGMA = 1.4826


@dataclass
class Window:
    size: int = 100
    values: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)  # consecutive rejected values

    def ready(self, warmup: int) -> bool:
        return len(self.values) >= warmup

    def stats(self, rel_floor: float, abs_floor: float) -> tuple[float, float]:
        """(median, effective sigma) of the accepted values."""
        arr = np.asarray(self.values, dtype=np.float64)
        med = float(np.median(arr))
        mad = float(np.median(np.abs(arr - med)))
        sigma = max(MAD_TO_SIGMA * mad, rel_floor * abs(med), abs_floor)
        return med, sigma

    def score(self, x: float, rel_floor: float, abs_floor: float) -> float:
        """One-sided robust z of ``x`` against the window (excluding ``x``)."""
        med, sigma = self.stats(rel_floor, abs_floor)
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
                self.values = self.rejected[-self.size:]
                self.rejected = []
            return False
        self.rejected = []
        self.values.append(x)
        if len(self.values) > self.size:
            del self.values[: len(self.values) - self.size]
        return True

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "values": self.values, "rejected": self.rejected}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, size: int) -> Window:
        if not data:
            return cls(size=size)
        return cls(size=size, values=list(data["values"])[-size:],
                   rejected=list(data.get("rejected", [])))


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
        if self.mean.shape != (self.n_layers,):
            self.mean = np.zeros(self.n_layers)
            self.dev = np.zeros(self.n_layers)
            self.count = np.zeros(self.n_layers, dtype=np.int64)
            self.rejects = np.zeros(self.n_layers, dtype=np.int64)

    def score(self, values: np.ndarray, floor: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log(np.asarray(values, dtype=np.float64))
            return (logs - self.mean) / np.maximum(1.25 * self.dev, floor)

    def offer(self, values: np.ndarray, z: np.ndarray, reject_z: float, patience: int,
              warmup: int) -> None:
        """Update the layers whose value is finite, positive and not an outlier (|z| < reject)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log(np.asarray(values, dtype=np.float64))
        finite = np.isfinite(logs)
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

    def to_json(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "mean": self.mean.tolist(), "dev": self.dev.tolist(),
                "count": self.count.tolist(), "rejects": self.rejects.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, n_layers: int, alpha: float) -> LayerEma:
        if not data or len(data["mean"]) != n_layers:
            return cls(n_layers=n_layers, alpha=alpha)
        return cls(n_layers=n_layers, alpha=alpha, mean=np.asarray(data["mean"], np.float64),
                   dev=np.asarray(data["dev"], np.float64),
                   count=np.asarray(data["count"], np.int64),
                   rejects=np.asarray(data["rejects"], np.int64))
