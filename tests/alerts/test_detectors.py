"""Detectors as pure functions: property tests (hypothesis) and attribution."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from server.analysis.robust import MAD_TO_SIGMA
from server.analysis.rules import DEFAULT_RULES, merge
from server.analysis.spikes import RunAnalysis, Signal, StepView, evaluate

RULES = merge()
LAYERS = ["emb", "h0", "h1", "head"]
SPIKE_RULES = {"loss_spike", "grad_norm_spike"}


def feed(state: RunAnalysis, views: list[StepView]) -> list[Signal]:
    out: list[Signal] = []
    for v in views:
        out.extend(evaluate(state, v, RULES, LAYERS))
    return out


def view(step: int, loss: float, grad: float, layer_scale: float = 1.0) -> StepView:
    norms = np.array([0.5, 1.0, 2.0, 0.25]) * grad * layer_scale
    return StepView(
        step=step,
        loss=loss,
        grad_norm=grad,
        nonfinite=0,
        layer_grad_norms=norms,
        layer_nonfinite=np.zeros(4, dtype=np.int64),
    )


def fresh() -> RunAnalysis:
    return RunAnalysis.from_json(None, len(LAYERS), RULES)


@settings(max_examples=60, deadline=None)
@given(c=st.floats(1e-6, 1e6), g=st.floats(1e-6, 1e6), n=st.integers(1, 300))
def test_constant_series_never_alert(c: float, g: float, n: int) -> None:
    assert feed(fresh(), [view(i, c, g) for i in range(n)]) == []


@settings(max_examples=60, deadline=None)
@given(
    start=st.floats(0.1, 100),
    gstart=st.floats(0.01, 100),
    drops=st.lists(st.floats(0.0, 0.05), min_size=1, max_size=300),
    seed=st.integers(0, 2**32 - 1),
)
def test_healthy_decreasing_series_never_alert(
    start: float, gstart: float, drops: list[float], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    trend = start * np.cumprod(1 - np.asarray(drops))
    noise = 1 + rng.uniform(-0.03, 0.03, len(drops))
    views = [
        view(i, float(trend[i] * noise[i]), gstart * float(trend[i] / start * noise[i]))
        for i in range(len(drops))
    ]
    assert feed(fresh(), views) == []


def _history(level: float, noise: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return level * (1 + rng.uniform(-noise, noise, n))


@settings(max_examples=80, deadline=None)
@given(
    level=st.floats(0.01, 1000),
    noise=st.floats(0.0, 0.1),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(int(DEFAULT_RULES["loss_spike"]["warmup"]), 150),
    k=st.floats(DEFAULT_RULES["loss_spike"]["warning"] + 0.01, 100),
)
def test_k_sigma_spike_after_warmup_always_alerts(
    level: float, noise: float, seed: int, n: int, k: float
) -> None:
    hist = _history(level, noise, n, seed)
    state = fresh()
    assert feed(state, [view(i, float(x), 1.0) for i, x in enumerate(hist)]) == []
    # The baseline computed independently: the last `window` values, median and MAD.
    recent = hist[-int(RULES["loss_spike"]["window"]) :]
    med = float(np.median(recent))
    sigma = max(
        MAD_TO_SIGMA * float(np.median(np.abs(recent - med))),
        RULES["loss_spike"]["rel_floor"] * abs(med),
    )
    spike = med + k * sigma
    signals = feed(state, [view(n, spike, 1.0)])
    hits = [s for s in signals if s.rule == "loss_spike"]
    assert len(hits) == 1, signals
    expected = "critical" if k >= RULES["loss_spike"]["critical"] else "warning"
    assert hits[0].severity == expected and hits[0].step == n


@settings(max_examples=60, deadline=None)
@given(
    level=st.floats(0.01, 1000),
    noise=st.floats(0.0, 0.1),
    seed=st.integers(0, 2**32 - 1),
    k=st.floats(6.5, 1e6),
)
def test_spike_does_not_enter_the_baseline(level: float, noise: float, seed: int, k: float) -> None:
    hist = _history(level, noise, 60, seed)
    state = fresh()
    feed(state, [view(i, float(x), float(x)) for i, x in enumerate(hist)])
    loss_before, grad_before = list(state.loss.values), list(state.grad.values)
    layers_before = state.layers.mean.copy() if state.layers else None
    med = float(np.median(hist))
    spike = med + k * max(float(np.ptp(hist)), med)  # far above any noise
    feed(state, [view(60, spike, spike, layer_scale=1000.0)])
    assert state.loss.values == loss_before
    assert state.grad.values == grad_before
    assert spike not in state.loss.values
    assert state.layers is not None and layers_before is not None
    np.testing.assert_array_equal(state.layers.mean, layers_before)


BAD = st.sampled_from([math.nan, math.inf, -math.inf])


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.floats(0.01, 100), BAD), min_size=1, max_size=200))
def test_nan_never_enters_a_baseline(values: list[float]) -> None:
    state = fresh()
    for i, x in enumerate(values):
        norms = np.array([x, 1.0, x, 2.0])
        evaluate(
            state,
            StepView(
                step=i, loss=x, grad_norm=x, layer_grad_norms=norms, update_ratios=norms * 1e-3
            ),
            RULES,
            LAYERS,
        )
    assert all(math.isfinite(v) for v in state.loss.values + state.grad.values)
    assert state.layers is not None and state.updates is not None
    assert np.isfinite(state.layers.mean).all() and np.isfinite(state.layers.dev).all()
    assert np.isfinite(state.updates.mean).all()
    # "min" is NaN (undefined) until the warm-up ends; everything else is a finite number
    assert all(math.isfinite(v) or (k == "min" and v != v) for k, v in state.div.items())
    # and the state survives a JSON round trip unchanged
    again = RunAnalysis.from_json(state.to_json(), len(LAYERS), RULES)
    assert again.to_json() == state.to_json()


def test_nonfinite_is_immediate_and_critical_even_in_warmup() -> None:
    state = fresh()
    signals = feed(state, [view(0, 2.0, 1.0), StepView(step=1, loss=math.nan, grad_norm=1.0)])
    assert [(s.rule, s.severity, s.step) for s in signals] == [("nonfinite", "critical", 1)]


def test_overflow_steps_are_not_nonfinite_and_rate_alerts() -> None:
    state = fresh()
    views = [
        StepView(step=i, loss=2.0, overflow=(i % 3 == 0), loss_scale=1024.0) for i in range(60)
    ]
    rules = {s.rule for s in feed(state, views)}
    assert rules == {"amp_overflow"}


def test_attribution_names_the_first_layer_to_deviate_and_its_lead() -> None:
    state = fresh()
    views = [view(i, 2.0 - i * 1e-3, 1.0) for i in range(40)]
    feed(state, views)
    # Layer h1 (index 2) drifts up from step 40; the total explodes at step 44.
    signals: list[Signal] = []
    for i, factor in enumerate([3.0, 6.0, 12.0, 24.0]):
        norms = np.array([0.5, 1.0, 2.0 * factor, 0.25])
        signals += evaluate(
            state,
            StepView(step=40 + i, loss=2.0, grad_norm=1.0, layer_grad_norms=norms),
            RULES,
            LAYERS,
        )
    norms = np.array([5.0, 10.0, 2000.0, 2.5])
    signals += evaluate(
        state, StepView(step=44, loss=2.0, grad_norm=100.0, layer_grad_norms=norms), RULES, LAYERS
    )
    spike = [s for s in signals if s.rule == "grad_norm_spike"]
    assert len(spike) == 1 and spike[0].severity == "critical"
    assert spike[0].first_layer == "h1" and spike[0].first_layer_lead_steps == 4
    assert spike[0].layers[0][0] == "h1"
    explosion = {s.scope for s in signals if s.rule == "layer_explosion"}
    assert "h1" in explosion


def test_slow_divergence_warns_before_the_loss_doubles() -> None:
    state = fresh()
    losses = [4.0 * math.exp(-i / 30) + 1.0 for i in range(100)]  # healthy descent to ~1.04
    losses += [losses[-1] * (1.01**i) for i in range(1, 200)]  # then 1% growth per step
    signals = feed(state, [view(i, x, 1.0) for i, x in enumerate(losses)])
    div = [s for s in signals if s.rule == "divergence"]
    assert div, "slow divergence not detected"
    assert losses[div[0].step] < 2 * min(losses)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=150))
def test_window_median_and_mad_match_numpy(values: list[float]) -> None:
    from server.analysis.robust import Window

    w = Window(size=100)
    for x in values:
        w.offer(x, None, 4.0, 30)
    arr = np.asarray(values[-100:])
    med = float(np.median(arr))
    mad = float(np.median(np.abs(arr - med)))
    got_med, sigma = w.stats(0.0, 0.0)
    assert got_med == med
    assert math.isclose(sigma, MAD_TO_SIGMA * mad, rel_tol=1e-9, abs_tol=1e-9)


def test_a_layer_whose_gradient_dies_raises_vanishing_for_that_layer() -> None:
    state = fresh()
    feed(state, [view(i, 2.0, 1.0) for i in range(40)])
    signals: list[Signal] = []
    for i in range(40, 50):
        norms = np.array([0.5, 0.0, 2.0, 0.25])  # h0 stops receiving gradient
        signals += evaluate(
            state, StepView(step=i, loss=2.0, grad_norm=1.0, layer_grad_norms=norms), RULES, LAYERS
        )
    vanishing = [s for s in signals if s.rule == "layer_vanishing"]
    assert {s.scope for s in vanishing} == {"h0"}
    assert vanishing[0].step == 44  # after `sustain` = 5 records


def test_state_stored_as_json_lists_reads_the_same_and_continues_alike() -> None:
    """States written before the vectors were packed (plain JSON lists) read back to the same
    baselines, and the detectors go on from them exactly as from the packed state."""
    rng = np.random.default_rng(3)
    packed = fresh()
    feed(packed, [view(i, 2.0 + 0.01 * rng.standard_normal(), 1.0 + 0.01 * rng.standard_normal(),
                       1.0 + 0.02 * rng.standard_normal()) for i in range(60)])
    data = packed.to_json()
    assert isinstance(data["layers"]["mean"], str)  # packed
    assert packed.layers is not None and packed.updates is not None
    old = {**data,
           "loss": {**data["loss"], "values": packed.loss.values, "rejected": packed.loss.rejected},
           "grad": {**data["grad"], "values": packed.grad.values, "rejected": packed.grad.rejected},
           "layers": {**data["layers"], "mean": packed.layers.mean.tolist(),
                      "dev": packed.layers.dev.tolist()},
           "updates": {**data["updates"], "mean": packed.updates.mean.tolist(),
                       "dev": packed.updates.dev.tolist()},
           "dev_start": packed.dev_start.tolist(), "vanish": packed.vanish.tolist()}
    a = RunAnalysis.from_json(data, len(LAYERS), RULES)
    b = RunAnalysis.from_json(old, len(LAYERS), RULES)
    assert a.to_json() == b.to_json() == data
    spike = [view(60, 2.0, 1.0, 40.0), view(61, 9.0, 30.0)]
    assert feed(a, spike) == feed(b, spike) != []
    assert a.to_json() == b.to_json()
