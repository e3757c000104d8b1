"""Critical batch size: McCandlish's steps/examples trade-off and the knee fit (pure).

Source: McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"
(arXiv:1812.06162), eq. 2.11–2.12 and §2.3. With B_noise the noise scale (B_simple is our
estimate of it), training to a given loss at batch size B takes

    S = S_min · (1 + B_noise / B)       optimizer steps
    E = E_min · (1 + B / B_noise)       examples (E = B·S, E_min = B_noise·S_min)

so B = B_noise costs twice the minimal steps and twice the minimal examples. The paper's
measured knee B_crit sits 1–10× below B_simple with tuned constant learning rates: the
trade-off is an estimate, shown with B_simple's interval, not a verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def steps_ratio(b_noise: float, batch: float) -> float:
    """S/S_min = 1 + B_noise/B (McCandlish et al. 2018, eq. 2.11)."""
    return 1.0 + b_noise / batch


def examples_ratio(b_noise: float, batch: float) -> float:
    """E/E_min = 1 + B/B_noise (McCandlish et al. 2018, eq. 2.11)."""
    return 1.0 + batch / b_noise


@dataclass(frozen=True)
class Option:
    """Batch size ``batch`` compared with the run's: steps and examples relative to it."""

    batch: float
    steps_vs_current: float  # S(batch)/S(B): < 1 saves steps
    examples_vs_current: float  # E(batch)/E(B): > 1 costs examples (compute)


def tradeoff(
    b_noise: float, batch: float, factors: Sequence[float] = (0.25, 0.5, 2.0, 4.0)
) -> dict[str, object]:
    """The trade-off at the run's batch size ``batch`` for noise scale ``b_noise`` (> 0).

    ``steps_ratio`` = S/S_min, ``examples_ratio`` = E/E_min, and for each factor c the batch
    c·B with S(cB)/S(B) = (1 + B_noise/(cB))/(1 + B_noise/B) and
    E(cB)/E(B) = (1 + cB/B_noise)/(1 + B/B_noise): what raising or lowering the batch would
    save in steps and cost in examples. ``regime`` is "noise-dominated" below B_noise (raising
    B saves steps almost for free), "curvature-dominated" above it (raising B mostly wastes
    examples).
    """
    if not (b_noise > 0 and batch > 0):
        raise ValueError(f"need b_noise > 0 and batch > 0, got {b_noise} and {batch}")
    s0, e0 = steps_ratio(b_noise, batch), examples_ratio(b_noise, batch)
    options = [
        Option(
            c * batch, steps_ratio(b_noise, c * batch) / s0, examples_ratio(b_noise, c * batch) / e0
        )
        for c in factors
    ]
    return {
        "batch_size": batch,
        "b_noise": b_noise,
        "steps_ratio": s0,
        "examples_ratio": e0,
        "regime": "noise-dominated" if batch < b_noise else "curvature-dominated",
        "options": [
            {
                "batch_size": o.batch,
                "steps_vs_current": o.steps_vs_current,
                "examples_vs_current": o.examples_vs_current,
            }
            for o in options
        ],
    }


def fit_knee(batches: Sequence[float], steps: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of S = S_min·(1 + B_crit/B) to (batch size, steps to target) pairs.

    S is linear in 1/B: S = a + c·(1/B) with a = S_min, c = S_min·B_crit (McCandlish et al.
    2018, §2.3 and fig. 4 fit the same relation). The line is fitted by least squares on the
    *relative* residuals (S_i − a − c/B_i)/S_i: step counts span orders of magnitude across
    batch sizes, and plain residuals would let the smallest batch decide S_min alone.
    Returns (S_min, B_crit).
    """
    x = 1.0 / np.asarray(batches, dtype=np.float64)
    y = np.asarray(steps, dtype=np.float64)
    if len(x) < 2:
        raise ValueError("need at least two batch sizes")
    c, a = np.polyfit(x, y, 1, w=1.0 / y)
    if a <= 0:
        raise ValueError(f"fit gave S_min = {a:.3g} <= 0: no knee in these points")
    return float(a), float(c / a)
