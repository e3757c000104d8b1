"""Detection rules: names, default parameters, validation of per-project overrides (pure).

Every rule has ``enabled``, ``cooldown`` (records during which a resolved alert of the same
level may not fire again) and ``resolve_after`` (consecutive clear records before a firing
alert resolves). The defaults work on a fresh install; a project overrides any key over REST
(``PUT /api/v1/projects/{project}/rules``) or from the YAML file named by
``GRADSENTRY_ALERT_RULES_FILE``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Params = dict[str, float]
Rules = dict[str, Params]

_COMMON: Params = {"enabled": 1.0, "cooldown": 50.0, "resolve_after": 10.0}

DEFAULT_RULES: Rules = {
    # NaN/Inf in the loss, the total norm or any layer: immediate, critical.
    "nonfinite": {**_COMMON, "resolve_after": 20.0},
    # Robust z-scores (median/MAD of the last `window` accepted values, see robust.py).
    "loss_spike": {
        **_COMMON,
        "warning": 6.0,
        "critical": 12.0,
        "rel_floor": 0.03,
        "warmup": 20.0,
        "window": 100.0,
        "reject": 4.0,
        "patience": 30.0,
    },
    "grad_norm_spike": {
        **_COMMON,
        "warning": 6.0,
        "critical": 15.0,
        "rel_floor": 0.25,
        "warmup": 20.0,
        "window": 100.0,
        "reject": 4.0,
        "patience": 30.0,
    },
    # Per-layer grad norm against its own log-EMA baseline: ratio to the baseline level.
    "layer_explosion": {**_COMMON, "warning": 10.0, "critical": 100.0, "warmup": 20.0},
    "layer_vanishing": {**_COMMON, "ratio": 1e-3, "sustain": 5.0, "warmup": 20.0},
    # Short vs long EMA of log grad norm: growth factor sustained for `sustain` records.
    "norm_growth": {**_COMMON, "warning": 3.0, "critical": 10.0, "sustain": 20.0, "warmup": 50.0},
    # Per-layer update/weight ratio (sampled every K steps) against its own baseline.
    "update_ratio_jump": {**_COMMON, "warning": 10.0, "critical": 100.0, "warmup": 3.0},
    # Loss EMA above (1 + margin) × its running minimum (warning), or back above the first
    # loss after having dropped below (1 - drop) × it (critical), for `sustain` records;
    # the raw loss above (1 + initial_margin) × the first loss for `initial_sustain` records
    # (critical, from the first step: high learning rate without warm-up).
    "divergence": {
        **_COMMON,
        "margin": 0.3,
        "drop": 0.1,
        "sustain": 8.0,
        "warmup": 20.0,
        "alpha": 0.1,
        "initial_margin": 0.2,
        "initial_sustain": 3.0,
    },
    # Fraction of AMP-overflow (skipped) steps among the last `window` records, after a
    # warm-up (a fresh GradScaler overflows a few times while it finds its scale).
    "amp_overflow": {**_COMMON, "warning": 0.25, "critical": 0.5, "window": 20.0, "warmup": 50.0},
    # No data for `after_s` seconds (checked periodically by the delivery loop).
    "stalled": {**_COMMON, "after_s": 600.0, "max_age_s": 86400.0},
}

RULE_NAMES = tuple(DEFAULT_RULES)
# A firing non-finite alert mutes these rules for the same run (Alertmanager inhibition).
INHIBITED_BY_NONFINITE = frozenset(
    {
        "loss_spike",
        "grad_norm_spike",
        "layer_explosion",
        "norm_growth",
        "update_ratio_jump",
        "divergence",
    }
)


class RuleError(ValueError):
    """An override names an unknown rule or key, or gives a value of the wrong kind."""


def validate(overrides: Mapping[str, Any]) -> Rules:
    """Check an override document ``{rule: {key: number|bool}}``; returns it normalised."""
    if not isinstance(overrides, Mapping):
        raise RuleError("rules must be an object {rule: {parameter: value}}")
    out: Rules = {}
    for rule, params in overrides.items():
        if rule not in DEFAULT_RULES:
            raise RuleError(f"unknown rule {rule!r}; known: {', '.join(RULE_NAMES)}")
        if not isinstance(params, Mapping):
            raise RuleError(f"{rule}: parameters must be an object")
        clean: Params = {}
        for key, value in params.items():
            if key not in DEFAULT_RULES[rule]:
                known = ", ".join(DEFAULT_RULES[rule])
                raise RuleError(f"{rule}.{key}: unknown parameter; known: {known}")
            if isinstance(value, bool):
                value = float(value)
            if not isinstance(value, int | float) or value != value or value < 0:
                raise RuleError(f"{rule}.{key}: must be a non-negative number, got {value!r}")
            clean[key] = float(value)
        out[rule] = clean
    return out


def merge(*layers: Mapping[str, Mapping[str, float]]) -> Rules:
    """Defaults overridden by each layer in turn (later wins)."""
    rules: Rules = {name: dict(params) for name, params in DEFAULT_RULES.items()}
    for layer in layers:
        for rule, params in layer.items():
            rules[rule].update(params)
    return rules
