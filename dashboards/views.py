"""Page-level figure sets: which panels a page shows, built from read models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dashboards.figures import (
    Figure,
    Matrix,
    Series,
    compare_figure,
    envelope_figure,
    heatmap_figure,
    layer_figure,
    lines_figure,
    nonfinite_figure,
)

LOG_SERIES = frozenset({"grad_norm", "local_grad_norm", "lr"})


def run_figures(
    series: Mapping[str, Series], lr_groups: Sequence[Series], grad: Matrix, update_ratio: Matrix
) -> dict[str, Figure | None]:
    """The run page's panels, keyed by the id of the element each is drawn into.

    A panel without data is ``None`` (the page shows a note instead of an empty chart).
    """
    lr = [series["lr"], *lr_groups] if len(series["lr"].step) else list(lr_groups)
    return {
        "loss": envelope_figure(series["loss"], "loss (min–max per bucket)"),
        "grad_norm": envelope_figure(
            series["grad_norm"], "total gradient norm, pre-clip (min–max per bucket)", log_y=True
        ),
        "heatmap": heatmap_figure(grad, "per-layer gradient norm (bucket max) · click a row", "|g|")
        if len(grad.step)
        else None,
        "update_ratio": heatmap_figure(
            update_ratio, "update-to-weight ratio |Δw|/|w| per layer", "|Δw|/|w|"
        )
        if len(update_ratio.step)
        else None,
        "nonfinite": nonfinite_figure(series["nonfinite"], None),
        "lr": lines_figure(lr, "learning rate", log_y=True)
        if any(len(s.step) for s in lr)
        else None,
    }


def layer_figures(layer: str, matrices: Sequence[Matrix]) -> Figure:
    return layer_figure(layer, matrices)


def compare_figures(by_name: Mapping[str, Sequence[tuple[str, Series]]]) -> dict[str, Figure]:
    """One overlay per series name, every run in its own colour."""
    return {
        name: compare_figure(runs, f"{name}: {len(runs)} runs", log_y=name in LOG_SERIES)
        for name, runs in by_name.items()
    }
