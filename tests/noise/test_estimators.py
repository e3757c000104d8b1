"""The pure estimators of server/analysis/gns.py and cbs.py against exact values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.analysis import cbs, gns


def test_two_batch_is_exact_on_expected_values() -> None:
    g2, tr = 2.0, 30.0
    for n in (None, 100):
        small = g2 + tr * gns.inverse_batch(4, n)
        big = g2 + tr * gns.inverse_batch(32, n)
        est_g2, est_tr = gns.two_batch(small, big, 4, 32, n)
        assert float(est_g2) == pytest.approx(g2) and float(est_tr) == pytest.approx(tr)
    assert gns.inverse_batch(1, 100) == 1.0 and gns.inverse_batch(100, 100) == 0.0
    with pytest.raises(ValueError):
        gns.two_batch(1.0, 1.0, 8, 8)
    with pytest.raises(ValueError):
        gns.inverse_batch(200, 100)


def test_separate_averages_beat_the_average_of_ratios() -> None:
    """Averaging per-step ratios is biased (DESIGN.md); averaging |G|² and tr Σ is not."""
    rng = np.random.default_rng(0)
    g2_true, tr_true, b, big_b = 1.0, 44.0, 8, 64
    small = g2_true + tr_true / b + rng.normal(0, 2.0, 4000)
    big = g2_true + tr_true / big_b + rng.normal(0, 0.5, 4000)
    g2, tr = gns.two_batch(small, big, b, big_b)
    separate = float(gns.ema(tr, None)[-1] / gns.ema(g2, None)[-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = tr / g2
    naive = float(np.mean(ratios[g2 > 0]))
    assert separate == pytest.approx(44.0, rel=0.1)
    assert abs(naive / 44.0 - 1) > 0.3


def test_ema_and_undefined_ratio() -> None:
    out = gns.ema([1.0, math.nan, 3.0], None)
    assert out.tolist() == [1.0, 1.0, 2.0]
    assert np.isnan(gns.ema([math.nan, 1.0], 10)[0])
    assert gns.ema([5.0, 5.0], 10).tolist() == [5.0, 5.0]  # bias-corrected
    r = gns.ratio_defined(np.array([3.0, 3.0, 3.0]), np.array([1.0, 0.0, -1.0]))
    assert r[0] == 3.0 and np.isnan(r[1]) and np.isnan(r[2])  # never clipped


def test_jackknife_interval_brackets_and_refuses() -> None:
    rng = np.random.default_rng(1)
    g2 = 1.0 + rng.normal(0, 0.3, 400)
    tr = 20.0 + rng.normal(0, 3.0, 400)
    lo, hi = gns.jackknife_interval(g2, tr)  # type: ignore[misc]
    assert lo < 20.0 < hi and hi / lo < 1.3
    assert gns.jackknife_interval(g2[:15], tr[:15]) is None  # fewer than 2 steps per block
    assert gns.jackknife_interval(g2 - 1.0, tr) is None  # |G|² not positive


def test_groups_add_squared_norms() -> None:
    groups = gns.group_layers(["a.0.x", "a.1", "b", "(root)"], 1)
    assert groups == {"a": [0, 1], "b": [2], "(root)": [3]}
    sums = gns.group_sums(np.array([[1.0, 2.0, 3.0, np.nan]]), groups)
    assert sums["a"].tolist() == [3.0] and np.isnan(sums["(root)"][0])


def test_tradeoff_and_knee_fit() -> None:
    off = cbs.tradeoff(100.0, 50.0)
    assert off["steps_ratio"] == 3.0 and off["examples_ratio"] == 1.5
    assert off["regime"] == "noise-dominated"
    doubled = next(o for o in off["options"] if o["batch_size"] == 100.0)  # type: ignore[union-attr]
    assert doubled["steps_vs_current"] == pytest.approx(2.0 / 3.0)
    assert doubled["examples_vs_current"] == pytest.approx(2.0 / 1.5)
    batches = [4, 16, 64, 256, 1024]
    steps = [10.0 * (1 + 120.0 / b) for b in batches]
    s_min, b_crit = cbs.fit_knee(batches, steps)
    assert s_min == pytest.approx(10.0) and b_crit == pytest.approx(120.0)
    with pytest.raises(ValueError):
        cbs.tradeoff(-1.0, 8.0)
