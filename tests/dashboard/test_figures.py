"""The pure figure functions: what plotly is given, checked cell by cell."""

from __future__ import annotations

import base64
import math

import numpy as np

from dashboards.figures import (
    age_text,
    compare_figure,
    envelope_traces,
    health,
    heatmap_figure,
    layer_figure,
    nonfinite_figure,
)
from dashboards.views import run_figures
from server.schemas import LayersResponse, SeriesOut


def _series(name: str, lo: list[float], hi: list[float], bad: list[int] | None = None) -> SeriesOut:
    steps = list(range(0, 10 * len(lo), 10))
    return SeriesOut(
        name=name,
        bucket_size=10,
        step=steps,
        step_end=[s + 9 for s in steps],
        min=lo,
        max=hi,
        nonfinite=bad or [0] * len(lo),
    )


def _matrix(metric: str, rows: list[list[float]]) -> LayersResponse:
    n = len(rows[0])
    return LayersResponse(
        run="r",
        metric=metric,
        layers=[f"l{i}" for i in range(len(rows))],
        bucket_size=1,
        step=list(range(n)),
        step_end=list(range(n)),
        min=rows,
        max=rows,
        nonfinite=[[int(not math.isfinite(v)) for v in r] for r in rows],
    )


def _decode(z: dict[str, str]) -> np.ndarray:
    shape = tuple(int(x) for x in z["shape"].split(","))
    return np.frombuffer(base64.b64decode(z["bdata"]), dtype="<f4").reshape(shape)


def test_heatmap_rows_are_layers_in_model_order_with_log_colour_and_nonfinite_marked() -> None:
    rows = [[1.0, 10.0, 100.0], [0.01, math.nan, 1e3], [0.0, math.inf, 1.0]]
    fig = heatmap_figure(_matrix("grad_norm", rows), "t", "|g|")
    heat = fig["data"][0]
    assert heat["y"] == ["l0", "l1", "l2"] and fig["layout"]["yaxis"]["autorange"] == "reversed"
    z = _decode(heat["z"])
    assert z.shape == (3, 3)
    np.testing.assert_allclose(z[0], [0, 1, 2], atol=1e-6)
    assert z[1, 0] == np.float32(-2) and z[1, 2] == np.float32(3)
    assert np.isnan(z[1, 1]) and np.isnan(z[2, 0]) and np.isnan(z[2, 1])  # gaps, not clipped
    assert (heat["zmin"], heat["zmax"]) == (-2.0, 3.0)
    marks = fig["data"][1]
    assert list(zip(marks["x"], marks["y"], strict=True)) == [(1, "l1"), (1, "l2")]


def test_envelopes_keep_extremes_and_turn_nonfinite_into_gaps() -> None:
    s = _series("loss", [1.0, -2.0, math.nan, 0.5], [3.0, 1e6, math.inf, 0.7])
    lo, hi = envelope_traces(s, "loss", "#000000")
    assert lo["y"] == [1.0, -2.0, None, 0.5] and hi["y"] == [3.0, 1e6, None, 0.7]
    lo, hi = envelope_traces(s, "loss", "#000000", log_y=True)
    assert lo["y"] == [1.0, None, None, 0.5]  # no log of a negative, and no clipping
    assert hi["fill"] == "tonexty" and hi["customdata"] == s.step_end


def test_nonfinite_timeline_counts_buckets() -> None:
    fig = nonfinite_figure(_series("nonfinite", [0, 0, 0], [0, 3, 0], [0, 0, 0]), None)
    assert fig["data"][0]["y"] == [0, 3, 0]
    assert "1 bucket(s)" in fig["layout"]["title"]["text"]


def test_compare_has_one_legend_entry_per_run_and_layer_drilldown_one_per_metric() -> None:
    a, b = _series("loss", [1.0], [2.0]), _series("loss", [0.5], [0.9])
    fig = compare_figure([("run-a", a), ("run-b", b)], "loss", log_y=False)
    shown = [t["name"] for t in fig["data"] if t.get("showlegend", True)]
    assert shown == ["run-a", "run-b"]
    grad = _matrix("grad_norm", [[1.0, 2.0], [3.0, 4.0]])
    ratio = _matrix("update_ratio", [[1e-3, 2e-3], [3e-3, 4e-3]])
    fig = layer_figure("l1", [grad, ratio])
    by_name = {t["name"]: t for t in fig["data"]}
    assert by_name["grad_norm"]["y"] == [3.0, 4.0] and by_name["update_ratio"]["y"] == [3e-3, 4e-3]
    assert by_name["update_ratio"]["yaxis"] == "y2"


def test_run_figures_leave_panels_without_data_empty() -> None:
    empty = LayersResponse(
        run="r",
        metric="update_ratio",
        layers=["a"],
        bucket_size=1,
        step=[],
        step_end=[],
        min=[[]],
        max=[[]],
        nonfinite=[[]],
    )
    series = {n: _series(n, [1.0], [1.0]) for n in ("loss", "grad_norm", "nonfinite")}
    series["lr"] = SeriesOut(
        name="lr", bucket_size=1, step=[], step_end=[], min=[], max=[], nonfinite=[]
    )
    figs = run_figures(series, [], _matrix("grad_norm", [[1.0]]), empty)
    assert figs["update_ratio"] is None and figs["lr"] is None
    assert figs["heatmap"] is not None and figs["loss"] is not None


def test_health_and_age() -> None:
    assert health("running", 5, 0, 600) == "ok"
    assert health("running", 601, 0, 600) == "stale"
    assert health("running", 5, 2, 600) == "nonfinite"
    assert health("finished", 10_000, 0, 600) == "done"
    assert [age_text(s) for s in (5, 125, 7200, 200_000)] == ["5 s", "2 min", "2 h", "2 d"]
