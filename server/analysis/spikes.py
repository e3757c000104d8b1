"""Instability detectors over a run's step records (pure: numpy, no database).

:func:`evaluate` takes the run's :class:`RunAnalysis` (its baselines), one step record and the
rules, and returns the conditions that hold at that step as :class:`Signal` s; it updates the
baselines *after* scoring, so the point under test is never part of its own baseline, and
outliers and non-finite values are never fed in (see ``robust.py``).

Rules (parameters in ``rules.py``):

- ``nonfinite``: loss, total grad norm or any layer NaN/±Inf → critical at once.
- ``loss_spike``, ``grad_norm_spike``: robust z of the value against the median/MAD of the
  last accepted values (OLMo-style σ-rule, with a relative floor on σ, i.e. a ratio rule).
- ``layer_explosion``: a layer's grad norm / exp(its log-EMA baseline) ≥ warning/critical.
- ``layer_vanishing``: a layer's norm ≤ ratio × its baseline for ``sustain`` records.
- ``norm_growth``: exp(EMA₀.₂ − EMA₀.₀₂) of log grad norm ≥ factor for ``sustain`` records.
- ``update_ratio_jump``: a layer's |Δw|/|w| over its baseline (records that carry it).
- ``divergence``: loss EMA ≥ (1+margin) × its running minimum (warning), or ≥ the first
  loss after having fallen below (1−drop) × it (critical), for ``sustain`` records; or the
  raw loss ≥ (1+initial_margin) × the first loss for ``initial_sustain`` records (critical).
- ``amp_overflow``: share of overflow (skipped) records among the last ``window``.

Attribution: every signal names the layers whose grad norm deviates most (log-space z ≥ 3)
and the first of them to start deviating, with how many steps earlier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.analysis.robust import LayerEma, Window, unpack
from server.analysis.rules import Rules

ATTRIBUTION_Z = 3.0
LAYER_SIGMA_FLOOR = math.log(1.5) / 3  # a 1.5x move is 3 "sigmas" for a steady layer
LAYER_REJECT_Z = 4.0
TOP_LAYERS = 5


@dataclass(frozen=True)
class StepView:
    """What the detectors read from one step record."""

    step: int
    loss: float | None = None
    grad_norm: float | None = None
    nonfinite: int | None = None
    overflow: bool | None = None
    loss_scale: float | None = None
    layer_grad_norms: np.ndarray | None = None
    layer_nonfinite: np.ndarray | None = None
    update_ratios: np.ndarray | None = None


@dataclass(frozen=True)
class Signal:
    """A rule's condition holding at ``step`` (one per rule and scope)."""

    rule: str
    scope: str
    severity: str  # "warning" | "critical"
    step: int
    value: float
    threshold: float | None
    summary: str
    layers: list[tuple[str, float]] = field(default_factory=list)
    first_layer: str | None = None
    first_layer_lead_steps: int | None = None


@dataclass
class RunAnalysis:
    """Everything the detectors remember about one run (JSON-serialisable; numeric vectors
    as base64, see ``robust.pack``; states written before as JSON lists read the same)."""

    n_layers: int
    records: int = 0
    last_step: int = -1
    loss: Window = field(default_factory=Window)
    grad: Window = field(default_factory=Window)
    layers: LayerEma | None = None
    updates: LayerEma | None = None
    update_records: int = 0
    # per layer: step where its current deviation began (-1: none); records it has vanished
    dev_start: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    vanish: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    growth: list[float] = field(default_factory=lambda: [math.nan, math.nan, 0.0, 0.0])
    div: dict[str, float] = field(default_factory=dict)
    overflow: list[int] = field(default_factory=list)
    amp_records: int = 0

    def __post_init__(self) -> None:
        if self.layers is None:
            self.layers = LayerEma(self.n_layers)
        if self.updates is None:
            self.updates = LayerEma(self.n_layers, alpha=0.2)
        if len(self.dev_start) != self.n_layers:
            self.dev_start = np.full(self.n_layers, -1, dtype=np.int64)
            self.vanish = np.zeros(self.n_layers, dtype=np.int64)

    def to_json(self) -> dict[str, Any]:
        assert self.layers is not None and self.updates is not None
        return {
            "n_layers": self.n_layers,
            "records": self.records,
            "last_step": self.last_step,
            "loss": self.loss.to_json(),
            "grad": self.grad.to_json(),
            "layers": self.layers.to_json(),
            "updates": self.updates.to_json(),
            "update_records": self.update_records,
            "dev_start": self.dev_start.tolist(),
            "vanish": self.vanish.tolist(),
            "growth": [_nan_null(g) for g in self.growth],
            "div": {k: _nan_null(v) for k, v in self.div.items()},
            "overflow": self.overflow,
            "amp_records": self.amp_records,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, n_layers: int, rules: Rules) -> RunAnalysis:
        if not data or data.get("n_layers") != n_layers:
            return cls(
                n_layers=n_layers,
                loss=Window(size=int(rules["loss_spike"]["window"])),
                grad=Window(size=int(rules["grad_norm_spike"]["window"])),
            )
        return cls(
            n_layers=n_layers,
            records=data["records"],
            last_step=data["last_step"],
            loss=Window.from_json(data["loss"], int(rules["loss_spike"]["window"])),
            grad=Window.from_json(data["grad"], int(rules["grad_norm_spike"]["window"])),
            layers=LayerEma.from_json(data["layers"], n_layers, 0.05),
            updates=LayerEma.from_json(data["updates"], n_layers, 0.2),
            update_records=data["update_records"],
            dev_start=unpack(data["dev_start"], "<i8"),
            vanish=unpack(data["vanish"], "<i8"),
            growth=[math.nan if g is None else g for g in data["growth"]],
            div={k: math.nan if v is None else v for k, v in data["div"].items()},
            overflow=list(data["overflow"]),
            amp_records=int(data.get("amp_records", 0)),
        )


def _nan_null(x: float) -> float | None:
    return None if x != x else x


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _level(value: float, params: dict[str, float]) -> tuple[str, float] | None:
    if value >= params["critical"]:
        return "critical", params["critical"]
    if value >= params["warning"]:
        return "warning", params["warning"]
    return None


class _Eval:
    """One step's evaluation; collects signals with the step's attribution."""

    def __init__(self, state: RunAnalysis, view: StepView, rules: Rules, names: list[str]) -> None:
        self.s, self.v, self.rules, self.names = state, view, rules, names
        self.signals: list[Signal] = []
        self.layer_z: np.ndarray | None = None

    def on(self, rule: str) -> bool:
        return bool(self.rules[rule]["enabled"])

    def emit(
        self,
        rule: str,
        severity: str,
        value: float,
        threshold: float | None,
        summary: str,
        scope: str = "run",
    ) -> None:
        layers, first, lead = self.attribution()
        self.signals.append(
            Signal(
                rule, scope, severity, self.v.step, value, threshold, summary, layers, first, lead
            )
        )

    def attribution(self) -> tuple[list[tuple[str, float]], str | None, int | None]:
        z = self.layer_z
        if z is None or not self.names:
            return [], None, None
        score = np.where(np.isnan(z), np.inf, z)
        order = np.argsort(-score, kind="stable")[:TOP_LAYERS]
        top = [(self.names[i], float(score[i])) for i in order if score[i] >= ATTRIBUTION_Z]
        ds = self.s.dev_start
        if not (ds >= 0).any():
            return top, None, None
        idx = int(np.argmin(np.where(ds >= 0, ds, np.iinfo(np.int64).max)))
        return top, self.names[idx], self.v.step - int(ds[idx])


def evaluate(
    state: RunAnalysis, view: StepView, rules: Rules, layer_names: list[str]
) -> list[Signal]:
    """Score one step record against the run's baselines, then update them."""
    ev = _Eval(state, view, rules, layer_names)
    _layers(ev)
    _nonfinite(ev)
    _scalar_spike(ev, "loss_spike", state.loss, view.loss, "loss")
    _scalar_spike(ev, "grad_norm_spike", state.grad, view.grad_norm, "grad norm")
    _growth(ev)
    _updates(ev)
    _divergence(ev)
    _overflow(ev)
    state.records += 1
    state.last_step = max(state.last_step, view.step)
    return ev.signals


def _layers(ev: _Eval) -> None:
    s, v = ev.s, ev.v
    assert s.layers is not None
    norms = v.layer_grad_norms
    if norms is None or len(norms) != s.n_layers or s.n_layers == 0:
        return
    norms = np.asarray(norms, dtype=np.float64)
    if _layers_steady(ev, norms):
        return
    z = s.layers.score(norms, LAYER_SIGMA_FLOOR)
    warm = s.layers.count >= ev.rules["layer_explosion"]["warmup"]
    z = np.where(warm, z, 0.0)
    if v.layer_nonfinite is not None:
        z = np.where(np.asarray(v.layer_nonfinite) > 0, np.nan, z)
    ev.layer_z = z
    deviating = np.isnan(z) | (z >= ATTRIBUTION_Z)
    s.dev_start = np.where(deviating, np.where(s.dev_start < 0, v.step, s.dev_start), -1)
    with np.errstate(invalid="ignore", over="ignore"):
        ratio = norms / np.exp(s.layers.mean)
    if ev.on("layer_explosion"):
        p = ev.rules["layer_explosion"]
        for i in map(int, np.flatnonzero(warm & np.isfinite(ratio) & (ratio >= p["warning"]))):
            level = _level(float(ratio[i]), p)
            assert level is not None
            ev.emit(
                "layer_explosion",
                level[0],
                float(ratio[i]),
                level[1],
                f"layer {ev.names[i]} grad norm {norms[i]:.3g} is {ratio[i]:.1f}x its baseline",
                scope=ev.names[i],
            )
    if ev.on("layer_vanishing"):
        p = ev.rules["layer_vanishing"]
        low = warm & np.isfinite(ratio) & (ratio <= p["ratio"])
        s.vanish = np.where(low, s.vanish + 1, 0)
        for i in map(int, np.flatnonzero(s.vanish >= p["sustain"])):
            ev.emit(
                "layer_vanishing",
                "warning",
                float(ratio[i]),
                p["ratio"],
                f"layer {ev.names[i]} grad norm fell to {ratio[i]:.2g}x its "
                f"baseline for {s.vanish[i]} records",
                scope=ev.names[i],
            )
    s.layers.offer(
        norms,
        z,
        LAYER_REJECT_Z,
        int(ev.rules["grad_norm_spike"]["patience"]),
        int(ev.rules["layer_explosion"]["warmup"]),
    )


def _layers_steady(ev: _Eval, norms: np.ndarray) -> bool:
    """The common case in one pass: every layer warm, finite, positive and within
    ATTRIBUTION_Z of its baseline (so no explosion, vanishing or deviation can hold; a 10x
    explosion is >= 17 sigma). Updates the baseline and returns True; False: take the full
    path."""
    s, v, ema = ev.s, ev.v, ev.s.layers
    assert ema is not None
    if not ema.steady or (v.layer_nonfinite is not None and np.any(v.layer_nonfinite)):
        return False
    if not (norms > 0).all() or not np.isfinite(norms).all():
        return False
    delta = np.log(norms) - ema.mean
    z = delta / np.maximum(1.25 * ema.dev, LAYER_SIGMA_FLOOR)
    if not (np.abs(z) < ATTRIBUTION_Z).all():
        return False
    ev.layer_z = z
    s.dev_start.fill(-1)
    s.vanish.fill(0)
    ema.update_steady(delta)
    return True


def _nonfinite(ev: _Eval) -> None:
    v = ev.v
    if not ev.on("nonfinite") or v.overflow:
        return  # an AMP overflow is the scaler doing its job; amp_overflow watches the rate
    bad = []
    if v.loss is not None and not math.isfinite(v.loss):
        bad.append(f"loss={v.loss}")
    if v.grad_norm is not None and not math.isfinite(v.grad_norm):
        bad.append(f"grad_norm={v.grad_norm}")
    n_layers = 0
    if v.layer_nonfinite is not None:
        n_layers = int(np.count_nonzero(np.asarray(v.layer_nonfinite) > 0))
    elif v.layer_grad_norms is not None:
        n_layers = int(np.count_nonzero(~np.isfinite(np.asarray(v.layer_grad_norms))))
    if n_layers:
        bad.append(f"{n_layers} layers with NaN/Inf gradients")
    elif v.nonfinite:
        bad.append(f"{v.nonfinite} tensors with NaN/Inf gradients")
    if bad:
        ev.emit(
            "nonfinite",
            "critical",
            float(n_layers or v.nonfinite or 1),
            None,
            f"non-finite values at step {v.step}: " + ", ".join(bad),
        )


def _scalar_spike(ev: _Eval, rule: str, window: Window, x: float | None, what: str) -> None:
    if x is None or ev.v.overflow:
        return
    p = ev.rules[rule]
    z: float | None = None
    if window.ready(int(p["warmup"])) and math.isfinite(x):
        z = window.score(x, p["rel_floor"], 1e-12, min(p["reject"], p["warning"]))
        level = _level(z, p)
        if level is not None and ev.on(rule):
            med, sigma = window.stats(p["rel_floor"], 1e-12)
            ev.emit(
                rule,
                level[0],
                x,
                med + level[1] * sigma,
                f"{what} {x:.4g} is {z:.1f} sigma above its baseline {med:.4g} "
                f"({x / med if med else math.inf:.2f}x)",
            )
    window.offer(x, z, p["reject"], int(p["patience"]))


def _growth(ev: _Eval) -> None:
    x, g = ev.v.grad_norm, ev.s.growth
    if not _finite(x) or x is None or x <= 0:
        return
    lx = math.log(x)
    short, long_, n, run = g
    short = lx if short != short else 0.8 * short + 0.2 * lx
    long_ = lx if long_ != long_ else 0.98 * long_ + 0.02 * lx
    n += 1
    p = ev.rules["norm_growth"]
    factor = math.exp(short - long_)
    run = run + 1 if factor >= p["warning"] and n >= p["warmup"] else 0
    ev.s.growth = [short, long_, n, run]
    if run >= p["sustain"] and ev.on("norm_growth"):
        level = _level(factor, p)
        assert level is not None
        ev.emit(
            "norm_growth",
            level[0],
            factor,
            level[1],
            f"grad norm has grown {factor:.1f}x over its slow average for {int(run)} records",
        )


def _updates(ev: _Eval) -> None:
    s, u = ev.s, ev.v.update_ratios
    assert s.updates is not None
    if u is None or len(u) != s.n_layers or s.n_layers == 0:
        return
    u = np.asarray(u, dtype=np.float64)
    p = ev.rules["update_ratio_jump"]
    with np.errstate(invalid="ignore", over="ignore"):
        jump = u / np.exp(s.updates.mean)
    warm = s.update_records >= p["warmup"]
    if warm and ev.on("update_ratio_jump"):
        finite = np.where(np.isfinite(jump), jump, -np.inf)
        i = int(np.argmax(finite))
        level = _level(float(finite[i]), p)
        if level is not None:
            ev.emit(
                "update_ratio_jump",
                level[0],
                float(finite[i]),
                level[1],
                f"update/weight ratio of {ev.names[i]} jumped {finite[i]:.1f}x (to {u[i]:.3g})",
            )
    z = s.updates.score(u, LAYER_SIGMA_FLOOR) if warm else np.zeros(s.n_layers)
    s.updates.offer(u, z, LAYER_REJECT_Z, 3, int(p["warmup"]))
    s.update_records += 1


def _divergence(ev: _Eval) -> None:
    x, d = ev.v.loss, ev.s.div
    if x is None or not math.isfinite(x) or ev.v.overflow:
        return
    p = ev.rules["divergence"]
    n = d.get("n", 0.0) + 1
    ema = x if n == 1 else (1 - p["alpha"]) * d["ema"] + p["alpha"] * x
    initial = d.get("initial", x)  # the run's first finite loss
    prev = d.get("min", math.nan)
    low = (ema if prev != prev else min(prev, ema)) if n >= p["warmup"] else math.nan
    dropped = d.get("dropped", 0.0) or float(ema <= (1 - p["drop"]) * initial)
    above = d.get("above", 0.0) + 1 if x >= (1 + p["initial_margin"]) * initial else 0.0
    crit = bool(dropped) and ema >= initial
    warn = n >= p["warmup"] and ema >= (1 + p["margin"]) * low
    run = d.get("run", 0.0) + 1 if (warn or crit) else 0.0
    ev.s.div = {
        "n": n,
        "ema": ema,
        "initial": initial,
        "min": low,
        "dropped": dropped,
        "run": run,
        "above": above,
    }
    if not ev.on("divergence"):
        return
    if above >= p["initial_sustain"]:
        ev.emit(
            "divergence",
            "critical",
            x,
            (1 + p["initial_margin"]) * initial,
            f"loss {x:.4g} has stayed above its initial value {initial:.4g} "
            f"for {int(above)} records",
        )
    elif run >= p["sustain"] and crit:
        ev.emit(
            "divergence",
            "critical",
            ema,
            initial,
            f"loss (EMA {ema:.4g}) is back above its initial value {initial:.4g}",
        )
    elif run >= p["sustain"]:
        ev.emit(
            "divergence",
            "warning",
            ema,
            (1 + p["margin"]) * low,
            f"loss (EMA {ema:.4g}) is trending up: {ema / low:.2f}x its minimum {low:.4g}",
        )


def _overflow(ev: _Eval) -> None:
    v, s = ev.v, ev.s
    if v.overflow is None:
        return
    p = ev.rules["amp_overflow"]
    s.overflow.append(int(bool(v.overflow)))
    size = int(p["window"])
    s.amp_records += 1
    seen = s.amp_records
    del s.overflow[: max(0, len(s.overflow) - size)]
    if seen <= p["warmup"] or len(s.overflow) < size or not ev.on("amp_overflow"):
        return
    rate = sum(s.overflow) / len(s.overflow)
    level = _level(rate, p)
    if level is not None:
        scale = f", loss scale {v.loss_scale:g}" if v.loss_scale is not None else ""
        ev.emit(
            "amp_overflow",
            level[0],
            rate,
            level[1],
            f"{rate:.0%} of the last {size} steps overflowed{scale}",
        )
