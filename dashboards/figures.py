"""Plotly figures as plain dicts (``{"data": [...], "layout": {...}}``), from API responses.

Pure functions: they take the read models of ``server.schemas`` (or anything shaped like
them) and return JSON-ready dicts that ``Plotly.react`` draws. No HTTP, no database, no
plotly import (building ``go.Figure`` objects validates every cell: too slow for 100k cells).

Non-finite values never reach plotly as numbers: they become gaps (``None``) and are drawn
separately (the non-finite timeline, red markers on the heatmap), so an Inf does not flatten
the colour scale and a NaN does not hide a spike.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

Figure = dict[str, Any]

PALETTE = ("#2355c4", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#0b7285", "#5f3dc4", "#e67700")
NONFINITE_COLOUR = "#e03131"
MAX_HEATMAP_PX = 1400


class Series(Protocol):
    """A bucketed series (``server.schemas.SeriesOut``): lists or numpy arrays."""

    @property
    def name(self) -> str: ...
    @property
    def step(self) -> Any: ...
    @property
    def step_end(self) -> Any: ...
    @property
    def min(self) -> Any: ...
    @property
    def max(self) -> Any: ...
    @property
    def nonfinite(self) -> Any: ...


class Matrix(Protocol):
    """A layer × bucket matrix (``LayersResponse`` or numpy ``LayerMatrix``); rows = layers."""

    @property
    def metric(self) -> str: ...
    @property
    def layers(self) -> list[str]: ...
    @property
    def step(self) -> Any: ...
    @property
    def step_end(self) -> Any: ...
    @property
    def min(self) -> Any: ...
    @property
    def max(self) -> Any: ...
    @property
    def nonfinite(self) -> Any: ...


def as_list(values: Any) -> list[Any]:
    """A JSON-ready list (numpy integers are not JSON numbers)."""
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def log10_or_none(v: float) -> float | None:
    """log10 of a positive finite value; gaps for 0, negatives and non-finite values."""
    return math.log10(v) if math.isfinite(v) and v > 0 else None


def log10_grid(rows: Sequence[Sequence[float]]) -> tuple[dict[str, str], float, float]:
    """log10 of each cell as a plotly typed array, and the range of the finite logs.

    Gaps (0, negatives, NaN/Inf) are NaN, which plotly leaves blank. A base64 float32
    array (plotly.js >= 2.28 decodes ``{"dtype", "bdata", "shape"}``) is a third of the
    size of the same numbers as JSON text and costs nothing to encode: a 256 x 400
    heatmap would otherwise spend most of the run page's time in the JSON encoder.
    """
    arr = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    ok = np.isfinite(arr) & (arr > 0)
    logs = np.full(arr.shape, np.nan, dtype="<f4")
    logs[ok] = np.log10(arr[ok])
    z = {
        "dtype": "f4",
        "bdata": base64.b64encode(logs.tobytes()).decode(),
        "shape": f"{arr.shape[0]},{arr.shape[1]}",
    }
    if not ok.any():
        return z, 0.0, 1.0
    return z, float(logs[ok].min()), float(logs[ok].max())


def _layout(title: str, *, log_y: bool = False, **extra: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {
        "title": {"text": title, "x": 0.01, "font": {"size": 15}},
        "margin": {"l": 60, "r": 20, "t": 40, "b": 40},
        "xaxis": {"title": {"text": "step"}},
        "yaxis": {"type": "log" if log_y else "linear"},
        "legend": {"orientation": "h", "y": -0.2},
        "hovermode": "x",
    }
    layout.update(extra)
    return layout


def envelope_traces(s: Series, label: str, colour: str, *, log_y: bool = False) -> list[Any]:
    """Two traces: the bucket minimum (invisible) and the maximum filled down to it.

    On a log axis, non-positive minima are dropped (gaps) rather than clipped.
    """
    fix = (lambda v: finite_or_none(v) if v > 0 else None) if log_y else finite_or_none
    lo = [fix(v) for v in s.min]
    hi = [fix(v) for v in s.max]
    group = f"{label}-band"
    return [
        {
            "type": "scatter",
            "mode": "lines",
            "x": as_list(s.step),
            "y": lo,
            "name": f"{label} min",
            "line": {"width": 0.5, "color": colour},
            "legendgroup": group,
            "showlegend": False,
            "hoverinfo": "skip",
        },
        {
            "type": "scatter",
            "mode": "lines",
            "x": as_list(s.step),
            "y": hi,
            "name": label,
            "line": {"width": 1.2, "color": colour},
            "fill": "tonexty",
            "legendgroup": group,
            "fillcolor": colour + "40",
            "customdata": as_list(s.step_end),
            "hovertemplate": f"{label}<br>steps %{{x}}–%{{customdata}}<br>max %{{y:.4g}}"
            "<extra></extra>",
        },
    ]


def envelope_figure(s: Series, title: str, *, log_y: bool = False) -> Figure:
    """One series as a min/max envelope: every bucket's extreme stays visible."""
    return {
        "data": envelope_traces(s, s.name, PALETTE[0], log_y=log_y),
        "layout": _layout(title, log_y=log_y),
    }


def lines_figure(series: Sequence[Series], title: str, *, log_y: bool = False) -> Figure:
    """Several series (e.g. the learning rate of each param group) as envelopes."""
    data: list[Any] = []
    for i, s in enumerate(series):
        data += envelope_traces(s, s.name, PALETTE[i % len(PALETTE)], log_y=log_y)
    return {"data": data, "layout": _layout(title, log_y=log_y)}


def nonfinite_figure(s: Series, layers: Matrix | None) -> Figure:
    """Non-finite timeline: NaN/Inf gradient values per step (bucket max), and per layer.

    ``s`` is the ``nonfinite`` step series (count of non-finite tensors per step).
    """
    counts = [v if math.isfinite(v) else None for v in s.max]
    data: list[Any] = [
        {
            "type": "bar",
            "x": as_list(s.step),
            "y": counts,
            "name": "non-finite values",
            "marker": {"color": NONFINITE_COLOUR},
            "customdata": as_list(s.step_end),
            "hovertemplate": "steps %{x}–%{customdata}<br>%{y} non-finite<extra></extra>",
        }
    ]
    bad_layers = 0
    if layers is not None:
        bad_layers = sum(1 for row in layers.max if any(v > 0 for v in row if math.isfinite(v)))
    total = sum(1 for v in counts if v)
    note = (f"{total} bucket(s) with non-finite values" if total else "no NaN/Inf so far") + (
        f" · {bad_layers} layer(s) affected" if bad_layers else ""
    )
    return {
        "data": data,
        "layout": _layout(f"non-finite timeline ({note})", bargap=0, yaxis={"rangemode": "tozero"}),
    }


def heatmap_figure(m: Matrix, title: str, colour_title: str) -> Figure:
    """Layers × steps heatmap of the bucket maxima, log colour, layers in model order.

    One row per layer (first layer of the model at the top); cells with a NaN/Inf in
    their bucket are gaps in the colour layer and red crosses on top of it.
    """
    z, lo, hi = log10_grid(m.max)
    ticks = list(range(math.floor(lo), math.ceil(hi) + 1)) or [0]
    data: list[Any] = [
        {
            "type": "heatmap",
            "z": z,
            "x": as_list(m.step),
            "y": list(m.layers),
            "colorscale": "Viridis",
            "zmin": lo,
            "zmax": hi if hi > lo else lo + 1,
            "hoverongaps": False,
            "colorbar": {
                "title": {"text": colour_title},
                "tickvals": ticks,
                "ticktext": [f"1e{t}" for t in ticks],
            },
            "hovertemplate": "%{y}<br>step %{x}<br>max 10^%{z:.2f}<extra></extra>",
        }
    ]
    rows_bad, cols_bad = np.nonzero(np.asarray(m.nonfinite).reshape(len(m.layers), -1))
    bad_x = np.asarray(m.step)[cols_bad].tolist()
    bad_y = np.asarray(m.layers, dtype=object)[rows_bad].tolist()
    if bad_x:
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "x": bad_x,
                "y": bad_y,
                "name": "NaN/Inf",
                "marker": {"symbol": "x", "color": NONFINITE_COLOUR, "size": 7},
                "hoverinfo": "x+y+name",
            }
        )
    height = min(MAX_HEATMAP_PX, max(320, 14 * len(m.layers) + 120))
    left = min(320, 30 + 7 * max((len(n) for n in m.layers), default=4))
    layout = _layout(
        title, height=height, hovermode="closest", margin={"l": left, "r": 20, "t": 40, "b": 40}
    )
    layout["yaxis"] = {
        "autorange": "reversed",
        "type": "category",
        "automargin": False,
        "tickfont": {"size": 10},
    }
    return {"data": data, "layout": layout}


def row_of(m: Matrix, index: int, name: str) -> Series:
    """Row ``index`` of a matrix as a series named ``name``."""
    return _Row(
        name=name,
        step=m.step,
        step_end=m.step_end,
        min=m.min[index],
        max=m.max[index],
        nonfinite=m.nonfinite[index],
    )


class _Row:
    def __init__(
        self,
        *,
        name: str,
        step: Any,
        step_end: Any,
        min: Any,
        max: Any,
        nonfinite: Any,
    ) -> None:
        self.name, self.step, self.step_end = name, step, step_end
        self.min, self.max, self.nonfinite = min, max, nonfinite


def layer_figure(layer: str, matrices: Sequence[Matrix]) -> Figure:
    """Drill-down: one layer's series of each per-layer metric (grad norm, update ratio…)."""
    data: list[Any] = []
    for i, m in enumerate(matrices):
        if not len(m.step):
            continue
        row = row_of(m, m.layers.index(layer), m.metric)
        traces = envelope_traces(row, m.metric, PALETTE[i % len(PALETTE)], log_y=True)
        if i:
            for t in traces:
                t["yaxis"] = "y2"
        data += traces
    layout = _layout(f"layer {layer}", log_y=True, margin={"l": 60, "r": 70, "t": 40, "b": 40})
    layout["yaxis"]["title"] = {"text": "grad norm"}
    layout["yaxis2"] = {
        "type": "log",
        "overlaying": "y",
        "side": "right",
        "title": {"text": "other metrics"},
        "showgrid": False,
    }
    return {"data": data, "layout": layout}


def compare_figure(runs: Sequence[tuple[str, Series]], title: str, *, log_y: bool) -> Figure:
    """Two or more runs' envelopes of the same series, overlaid, one colour per run."""
    data: list[Any] = []
    for i, (run, s) in enumerate(runs):
        data += envelope_traces(s, run, PALETTE[i % len(PALETTE)], log_y=log_y)
    return {"data": data, "layout": _layout(title, log_y=log_y)}


def health(status: str, age_s: float, nonfinite_steps: int, stale_after_s: float) -> str:
    """A one-word health of a run for the list: what needs a look first.

    ``nonfinite`` beats ``stale`` beats ``ok``; finished runs are ``done``.
    """
    if nonfinite_steps:
        return "nonfinite"
    if status == "running" and age_s > stale_after_s:
        return "stale"
    return "ok" if status == "running" else "done"


def age_text(seconds: float) -> str:
    """'12 s', '5 min', '3 h', '2 d': how long ago, for people."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s // size} {unit}"
    return f"{s} s"
