"""Response models of ``GET /api/v1/runs/{run}/noise-scale`` (OpenAPI documentation)."""

from __future__ import annotations

from pydantic import Field

from server.schemas import Out


class NoiseSeriesOut(Out):
    """Per-step values (downsampled to ``max_points``); null where undefined, never clipped."""

    step: list[int]
    b_simple: list[float | None] = Field(description="EMA(tr Σ) / EMA(|G|²) where |G|² > 0")
    lo: list[float | None] = Field(description="95 % block-jackknife interval, low end")
    hi: list[float | None]
    g2: list[float | None] = Field(description="EMA of the per-step |G|² estimates")
    trace: list[float | None] = Field(description="EMA of the per-step tr Σ estimates")


class NoiseCurrentOut(Out):
    step: int | None
    b_simple: float | None
    lo: float | None
    hi: float | None
    defined: bool
    reason: str | None


class BatchOptionOut(Out):
    batch_size: float
    steps_vs_current: float
    examples_vs_current: float


class TradeoffOut(Out):
    """McCandlish et al. 2018: S/S_min = 1 + B_noise/B, E/E_min = 1 + B/B_noise."""

    batch_size: float
    b_noise: float
    b_noise_lo: float | None
    b_noise_hi: float | None
    steps_ratio: float
    examples_ratio: float
    regime: str
    options: list[BatchOptionOut]


class NoiseGroupOut(NoiseCurrentOut):
    name: str
    layers: list[str]


class NoiseScaleResponse(Out):
    run: str
    batch_size: int | None
    mode: str | None
    dataset_size: int | None
    horizon: int | None
    series: NoiseSeriesOut
    current: NoiseCurrentOut
    tradeoff: TradeoffOut | None
    groups: list[NoiseGroupOut] | None = None
