"""Gradient noise scale from squared gradient norms at two batch sizes (pure, numpy).

Source: McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"
(arXiv:1812.06162), appendix A.1. With G the full-batch gradient, Σ the per-example gradient
covariance and G_b the mean gradient of b i.i.d. examples::

    E|G_b|² = |G|² + tr(Σ)/b

so two batch sizes b < B give the unbiased estimators

    |G|²  ≈ (B·|G_B|² − b·|G_b|²) / (B − b)
    tr Σ  ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

and the "simple" noise scale B_simple = tr Σ / |G|². A ratio of two noisy estimates is biased,
so |G|² and tr Σ are averaged *separately* (EMA here) and divided afterwards; the average of
per-step ratios reads far too high (DESIGN.md: 57–100 against a truth of 44).

Finite population (Cochran, "Sampling Techniques", 1977, th. 2.2): a batch of b drawn without
replacement from N examples has Var(mean) = σ²·(N−b)/(b(N−1)), σ² the population variance
(divisor N). Replacing 1/b by f(b) = (N−b)/(b(N−1)) everywhere keeps both estimators unbiased.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Student t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95 % interval).
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)
DEFAULT_BLOCKS = 10


def inverse_batch(b: float, dataset_size: int | None = None) -> float:
    """The variance factor of a batch mean: 1/b with replacement, or with ``dataset_size`` N
    (sampling without replacement) the finite-population factor f(b) = (N−b)/(b(N−1))
    (Cochran 1977, th. 2.2). f(1) = 1 and f(N) = 0."""
    if b <= 0:
        raise ValueError(f"batch size must be > 0, got {b}")
    if dataset_size is None:
        return 1.0 / b
    n = float(dataset_size)
    if n < 2 or b > n:
        raise ValueError(f"batch size {b} does not fit a dataset of {dataset_size}")
    return (n - b) / (b * (n - 1))


def two_batch(
    small_sq: np.ndarray | float,
    big_sq: np.ndarray | float,
    b_small: float,
    b_big: float,
    dataset_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased per-step estimates ``(|G|², tr Σ)`` from E|G_b|² = |G|² + tr Σ·f(b).

    With f_s = f(b_small), f_b = f(b_big) (:func:`inverse_batch`)::

        tr Σ = (|G_b|² − |G_B|²) / (f_s − f_b)
        |G|² = (f_s·|G_B|² − f_b·|G_b|²) / (f_s − f_b)

    which is McCandlish et al. 2018, eq. A.2–A.3 when f(b) = 1/b. ``small_sq`` may be a mean
    of several small-batch squared norms (micro-batches, ranks, examples): the estimators
    stay unbiased. Works elementwise (per layer). Raises ValueError unless f_s > f_b.
    """
    fs, fb = inverse_batch(b_small, dataset_size), inverse_batch(b_big, dataset_size)
    if not fs > fb:
        raise ValueError(f"need b_small < b_big, got {b_small} and {b_big}")
    small = np.asarray(small_sq, dtype=np.float64)
    big = np.asarray(big_sq, dtype=np.float64)
    return (fs * big - fb * small) / (fs - fb), (small - big) / (fs - fb)


def ema(values: Sequence[float] | np.ndarray, horizon: int | None) -> np.ndarray:
    """Bias-corrected exponential moving average, NaN-skipping.

    With α = 2/(H+1) (an EMA of "span" H, whose variance equals that of a plain mean of H
    values) and x_t the finite inputs so far::

        m_t = (1−α)·m_{t−1} + α·x_t,   w_t = (1−α)·w_{t−1} + α,   out_t = m_t / w_t

    (Kingma & Ba 2015, §3, bias correction). ``horizon`` None is the plain running mean of all
    values. A NaN input (a step without a measurement) leaves the average unchanged; before
    the first finite input the output is NaN.
    """
    x = np.asarray(values, dtype=np.float64)
    out = np.full(x.shape, np.nan)
    alpha = None if horizon is None else 2.0 / (horizon + 1.0)
    m = w = 0.0
    n = 0
    for i, v in enumerate(x):
        if math.isfinite(v):
            n += 1
            a = 1.0 / n if alpha is None else alpha
            m, w = (1 - a) * m + a * v, (1 - a) * w + a
        if w > 0:
            out[i] = m / w
    return out


def ratio_defined(trace: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """tr Σ / |G|² where |G|² > 0, NaN elsewhere ("undefined": never clipped to a floor)."""
    t, g = np.asarray(trace, np.float64), np.asarray(g2, np.float64)
    out = np.full(np.broadcast(t, g).shape, np.nan)
    ok = np.isfinite(t) & np.isfinite(g) & (g > 0)
    np.divide(t, g, out=out, where=ok)
    return out


def t_quantile(df: int) -> float:
    """Two-sided 95 % Student t quantile (normal 1.96 beyond 30 degrees of freedom)."""
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def jackknife_interval(
    g2: np.ndarray, trace: np.ndarray, blocks: int = DEFAULT_BLOCKS
) -> tuple[float, float] | None:
    """95 % interval of tr Σ̄/|G|̄² from per-step estimates, by the delete-one-block jackknife.

    Why batch means + jackknife: successive per-step estimates are correlated (the parameters
    move slowly, consecutive batches overlap in time), so an i.i.d. bootstrap of steps would
    be too narrow; contiguous blocks (batch means, Flegal & Jones 2010) absorb that
    correlation. The statistic is a ratio of means, which is nonlinear; the jackknife
    (Quenouille 1956, Efron & Stein 1981) handles that without resampling noise and is
    deterministic, so every collector process answers the same. Computed on the log scale so
    the interval stays positive::

        θ_(j) = log( T̄_(−j) / Ḡ_(−j) )      (means over all blocks but j)
        se²   = (m−1)/m · Σ_j (θ_(j) − θ̄)²
        [lo, hi] = exp(θ̂ ± t_{m−1}·se)

    Returns None when there are fewer than 2 steps per block, or when a leave-one-out mean of
    |G|² or tr Σ is not positive (the ratio is not yet defined; no interval is invented).
    """
    g = np.asarray(g2, np.float64)
    t = np.asarray(trace, np.float64)
    ok = np.isfinite(g) & np.isfinite(t)
    g, t = g[ok], t[ok]
    m = blocks
    if m < 2 or len(g) < 2 * m:
        return None
    edges = np.linspace(0, len(g), m + 1).astype(int)
    bg = np.add.reduceat(g, edges[:-1])
    bt = np.add.reduceat(t, edges[:-1])
    sizes = np.diff(edges).astype(np.float64)
    loo_g = (bg.sum() - bg) / (sizes.sum() - sizes)
    loo_t = (bt.sum() - bt) / (sizes.sum() - sizes)
    full_g, full_t = bg.sum() / sizes.sum(), bt.sum() / sizes.sum()
    if min(loo_g.min(), loo_t.min(), full_g, full_t) <= 0:
        return None
    theta = np.log(loo_t / loo_g)
    se = math.sqrt((m - 1) / m * float(np.sum((theta - theta.mean()) ** 2)))
    centre = math.log(full_t / full_g)
    half = t_quantile(m - 1) * se
    return math.exp(centre - half), math.exp(centre + half)


@dataclass(frozen=True)
class NoiseSeries:
    """Per-step noise-scale series (NaN where undefined) and the current estimate."""

    g2: np.ndarray  # EMA of the per-step |G|² estimates
    trace: np.ndarray  # EMA of the per-step tr Σ estimates
    b_simple: np.ndarray  # trace / g2 where g2 > 0, else NaN
    lo: np.ndarray  # jackknife interval of the trailing window (NaN where none)
    hi: np.ndarray


def noise_series(
    g2_step: np.ndarray,
    trace_step: np.ndarray,
    horizon: int | None,
    blocks: int = DEFAULT_BLOCKS,
    interval_every: int = 1,
) -> NoiseSeries:
    """EMA-averaged |G|² and tr Σ (each separately, :func:`ema`), their ratio B_simple and a
    95 % interval per step (:func:`jackknife_interval` over the trailing ``horizon`` steps, or
    all steps so far when ``horizon`` is None: the same averaging length as the EMA, whose
    variance equals that of a plain mean over ``horizon`` values).

    ``interval_every`` k > 1 computes the interval only every k-th step and at the last one
    (NaN elsewhere), to bound the cost on long runs.
    """
    g2 = ema(g2_step, horizon)
    tr = ema(trace_step, horizon)
    bs = ratio_defined(tr, g2)
    n = len(g2)
    lo, hi = np.full(n, np.nan), np.full(n, np.nan)
    gs, ts = np.asarray(g2_step, np.float64), np.asarray(trace_step, np.float64)
    for i in range(n):
        if math.isnan(bs[i]) or (i % interval_every and i != n - 1):
            continue
        start = 0 if horizon is None else max(0, i + 1 - horizon)
        iv = jackknife_interval(gs[start : i + 1], ts[start : i + 1], blocks)
        if iv is not None:
            lo[i], hi[i] = iv
    return NoiseSeries(g2, tr, bs, lo, hi)


def group_layers(layers: Sequence[str], depth: int) -> dict[str, list[int]]:
    """Layer indices grouped by the first ``depth`` components of their module path
    (``blocks.0.attn.proj`` → ``blocks.0`` at depth 2), in model order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(layers):
        key = ".".join(name.split(".")[: max(depth, 1)])
        groups.setdefault(key, []).append(i)
    return groups


def group_sums(layer_sq: np.ndarray, groups: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """Per-group squared norms: Σ over the group's layers of ``layer_sq[step, layer]`` (NaN
    when a member layer is NaN, i.e. not measured at that step). Squared norms add over
    disjoint parameter sets, so a group's noise scale uses these sums in :func:`two_batch`."""
    sq = np.asarray(layer_sq, np.float64)
    return {name: sq[:, list(idx)].sum(axis=1) for name, idx in groups.items()}
