"""Ratios the collector derives from the sufficient statistics clients send."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def update_ratio(update_norms: Sequence[float], param_norms: Sequence[float]) -> np.ndarray:
    """Per-layer update-to-weight ratio |Δw_l| / |w_l| (weights after the step), float32.

    Divided in float64; 0/0 is NaN and x/0 is ±Inf, NaN and ±Inf propagate (they are data).
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.asarray(update_norms, dtype=np.float64) / np.asarray(param_norms, np.float64)
        return ratio.astype("<f4")
