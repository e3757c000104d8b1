"""Noise scale: store the clients' two-batch squared norms, estimate B_simple on read.

Storage needs no table of its own: per step, the totals over the measured layers are the
scalar series ``gns/b_small``, ``gns/b_big``, ``gns/small_sq``, ``gns/big_sq``, and the
per-layer values the layer metrics ``gns_small_sq``, ``gns_big_sq`` (NaN where a layer is not
measured). The mode and the dataset size are run semantics (``noise_scale``,
``dataset_size``; ``config["dataset_size"]`` is accepted too). Estimates are computed on read
by the pure functions of :mod:`server.analysis.gns` and :mod:`server.analysis.cbs`, so any
collector process answers the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from server import errors
from server.analysis import cbs, gns
from server.columns import to_float32
from server.metrics import ActiveRun, Sample, run_labels
from server.models import LayerValues, Run, Scalar
from server.schemas import GnsIn, StepIn
from server.services.runs import get_run

SCALARS = ("gns/b_small", "gns/b_big", "gns/small_sq", "gns/big_sq")
PREFIX = "gns/"
DEFAULT_HORIZON = 500


def check_gns(step: StepIn, i: int, n_layers: int) -> None:
    """Reject a malformed ``gns`` field (and user scalars in the reserved ``gns/`` space)."""
    taken = [k for k in step.scalars if k.startswith(PREFIX)]
    if taken:
        raise errors.InvalidInput(
            f"steps.{i}.scalars: names starting with {PREFIX!r} are "
            f"reserved for the noise scale: {sorted(taken)}"
        )
    g = step.gns
    if g is None:
        return
    where = f"steps.{i}.gns"
    if not g.b_small < g.b_big:
        raise errors.InvalidInput(f"{where}: b_small ({g.b_small}) must be < b_big ({g.b_big})")
    if len(g.small_sq) != len(g.layers) or len(g.big_sq) != len(g.layers):
        raise errors.InvalidInput(
            f"{where}: small_sq and big_sq need one value per entry of layers ({len(g.layers)})"
        )
    if len(set(g.layers)) != len(g.layers) or max(g.layers) >= n_layers:
        raise errors.InvalidInput(
            f"{where}.layers: must be distinct indices below the run's {n_layers} layers"
        )


def total(values: Sequence[float]) -> float:
    """The correctly rounded sum of ``values``; ±Inf when it overflows or holds an infinity,
    NaN when it holds a NaN or both +Inf and -Inf (the values are data: no error)."""
    try:
        return math.fsum(values)
    except ValueError:  # +Inf and -Inf
        return math.nan
    except OverflowError:  # an intermediate sum went beyond a double; the total may not
        if special := [v for v in values if not math.isfinite(v)]:
            return total(special)  # fsum stopped before it saw them: they decide the total
        exact = sum(map(Fraction, values))
        try:
            return float(exact)  # correctly rounded
        except OverflowError:
            return math.inf if exact > 0 else -math.inf


def gns_rows(g: GnsIn, n_layers: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The scalar values and layer vectors one step's ``gns`` field is stored as."""
    small = np.full(n_layers, np.nan, dtype="<f4")
    big = np.full(n_layers, np.nan, dtype="<f4")
    small[g.layers] = to_float32(g.small_sq)
    big[g.layers] = to_float32(g.big_sq)
    scalars = {
        "gns/b_small": g.b_small,
        "gns/b_big": g.b_big,
        "gns/small_sq": total(g.small_sq),
        "gns/big_sq": total(g.big_sq),
    }
    return scalars, {"gns_small_sq": small, "gns_big_sq": big}


def dataset_size(run: Run) -> int | None:
    """The declared number of examples sampled without replacement, if any."""
    for source in (run.semantics or {}, run.config or {}):
        value = source.get("dataset_size")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
            return value
    return None


def _per_step(
    b_small: np.ndarray, b_big: np.ndarray, small: np.ndarray, big: np.ndarray, n: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-step (|G|², tr Σ) estimates; NaN where a step cannot give one."""
    g2 = np.full(len(small), np.nan)
    tr = np.full(len(small), np.nan)
    for i in range(len(small)):
        try:
            g2[i], tr[i] = gns.two_batch(small[i], big[i], b_small[i], b_big[i], n)
        except ValueError:
            continue  # b_big above the declared dataset size: not measurable
    return g2, tr


def _none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _read(
    session: Session, run: Run, since: int | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    query = select(Scalar.name, Scalar.step, Scalar.value).where(
        Scalar.run_pk == run.pk, Scalar.name.in_(SCALARS)
    )
    if since is not None:
        query = query.where(Scalar.step >= since)
    rows = session.execute(query.order_by(Scalar.step)).all()
    steps = np.array(sorted({r[1] for r in rows}), dtype=np.int64)
    pos = {s: i for i, s in enumerate(steps.tolist())}
    cols = {name: np.full(len(steps), np.nan) for name in SCALARS}
    for name, step, value in rows:
        cols[name][pos[step]] = np.nan if value is None else value
    return steps, cols


def _groups(
    session: Session,
    run: Run,
    steps: np.ndarray,
    cols: dict[str, np.ndarray],
    depth: int,
    horizon: int | None,
    n: int | None,
) -> list[dict[str, Any]]:
    """Noise scale per layer group (module path prefix of ``depth`` components)."""
    mats: dict[str, np.ndarray] = {}
    for metric in ("gns_small_sq", "gns_big_sq"):
        rows = session.execute(
            select(LayerValues.step, LayerValues.values)
            .where(LayerValues.run_pk == run.pk, LayerValues.metric == metric)
            .order_by(LayerValues.step)
        ).all()
        mat = np.full((len(steps), len(run.layers)), np.nan)
        index = {s: i for i, s in enumerate(steps.tolist())}
        for step, values in rows:
            if step in index:
                mat[index[step]] = values
        mats[metric] = mat
    out = []
    groups = gns.group_layers(run.layers, depth)
    small = gns.group_sums(mats["gns_small_sq"], groups)
    big = gns.group_sums(mats["gns_big_sq"], groups)
    for name in groups:
        if not np.isfinite(small[name]).any():
            continue  # no layer of this group is measured
        g2, tr = _per_step(cols["gns/b_small"], cols["gns/b_big"], small[name], big[name], n)
        series = gns.noise_series(g2, tr, horizon, interval_every=max(len(g2), 1))
        out.append(
            {
                "name": name,
                "layers": [run.layers[i] for i in groups[name]],
                **_current(steps, series),
            }
        )
    return out


def _current(steps: np.ndarray, s: gns.NoiseSeries) -> dict[str, Any]:
    if len(steps) == 0:
        return {
            "step": None,
            "b_simple": None,
            "lo": None,
            "hi": None,
            "defined": False,
            "reason": "no noise-scale measurements yet",
        }
    b = float(s.b_simple[-1])
    defined = math.isfinite(b)
    reason = None
    if not defined:
        reason = (
            "the |G|² estimate is not positive yet: the gradient signal is still "
            "below the noise at this averaging horizon"
        )
    return {
        "step": int(steps[-1]),
        "b_simple": _none(b),
        "lo": _none(float(s.lo[-1])),
        "hi": _none(float(s.hi[-1])),
        "defined": defined,
        "reason": reason,
    }


def noise_scale(
    session: Session,
    run_id: str,
    horizon: int | None,
    max_points: int,
    group_depth: int | None = None,
) -> dict[str, Any]:
    """The noise-scale series, the current estimate with its 95 % interval, the trade-off at
    the run's batch size and, with ``group_depth``, per layer group (see module docstring)."""
    run = get_run(session, run_id)
    n = dataset_size(run)
    steps, cols = _read(session, run)
    g2, tr = _per_step(
        cols["gns/b_small"], cols["gns/b_big"], cols["gns/small_sq"], cols["gns/big_sq"], n
    )
    every = max(1, math.ceil(len(steps) / max_points))
    series = gns.noise_series(g2, tr, horizon, interval_every=every)
    picks = [i for i in range(len(steps)) if i % every == 0 or i == len(steps) - 1]
    current = _current(steps, series)
    batch = run.batch_size
    if batch is None and len(steps):
        last = cols["gns/b_big"][-1]
        batch = int(last) if math.isfinite(last) else None
    tradeoff = None
    if current["defined"] and current["b_simple"] > 0 and batch:
        tradeoff = cbs.tradeoff(current["b_simple"], float(batch))
        tradeoff["b_noise_lo"], tradeoff["b_noise_hi"] = current["lo"], current["hi"]
    out: dict[str, Any] = {
        "run": run.id,
        "batch_size": batch,
        "mode": (run.semantics or {}).get("noise_scale"),
        "dataset_size": n,
        "horizon": horizon,
        "series": {
            "step": [int(steps[i]) for i in picks],
            "b_simple": [_none(series.b_simple[i]) for i in picks],
            "lo": [_none(series.lo[i]) for i in picks],
            "hi": [_none(series.hi[i]) for i in picks],
            "g2": [_none(series.g2[i]) for i in picks],
            "trace": [_none(series.trace[i]) for i in picks],
        },
        "current": current,
        "tradeoff": tradeoff,
    }
    if group_depth is not None:
        out["groups"] = _groups(session, run, steps, cols, group_depth, horizon, n)
    return out


def latest_b_simple(session: Session, run: Run, horizon: int = DEFAULT_HORIZON) -> float | None:
    """The current B_simple of ``run`` (as ``noise_scale`` reports it, None while undefined),
    from the last 4 horizons of measurements only: the EMA's weight beyond them is e^-4 < 2%,
    and a scrape must not read a long run whole."""
    if run.last_step is None:
        return None
    steps, cols = _read(session, run, since=run.last_step - 4 * horizon)
    if not len(steps):
        return None
    g2, tr = _per_step(
        cols["gns/b_small"], cols["gns/b_big"], cols["gns/small_sq"], cols["gns/big_sq"],
        dataset_size(run),
    )
    series = gns.noise_series(g2, tr, horizon, interval_every=max(1, len(steps)))
    b = float(series.b_simple[-1])
    return b if math.isfinite(b) else None


def noise_gauges(session: Session, active: Sequence[ActiveRun]) -> Iterator[Sample]:
    """``gradsentry_run_b_simple`` for active runs that measure the noise scale."""
    if not active:
        return
    by_pk = {r.pk: r for r in active}
    runs = session.scalars(select(Run).where(Run.pk.in_(list(by_pk)))).all()
    for run in runs:
        if not (run.semantics or {}).get("noise_scale"):
            continue
        b = latest_b_simple(session, run)
        if b is not None:
            yield Sample("gradsentry_run_b_simple", b, run_labels(by_pk[run.pk]))
