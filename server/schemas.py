"""Request and response models of the REST API.

Floats accept JSON numbers and the strings "NaN", "Infinity", "-Infinity" (the
wire convention); responses write non-finite floats the same way.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from client_hooks.wire import WIRE_VERSION

RunId = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
]
ProjectName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
]
ScalarName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,127}$")]
# A window's series X is stored as X:max ... X:nonfinite, names of at most 128 characters.
WindowSeriesName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,117}$")
]


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _refuse_nul(value: Any) -> Any:
    if _has_nul(value):
        raise ValueError("text may not contain the NUL character (U+0000)")
    return value


# Free text (and JSON objects) may not hold NUL: PostgreSQL cannot store it, so the API
# refuses it on every database alike instead of letting SQLite keep what Postgres refuses.
NoNul = AfterValidator(_refuse_nul)
JsonObject = Annotated[dict[str, Any], NoNul]


def _utc(value: datetime) -> datetime:
    # SQLite returns naive datetimes; every timestamp we store is UTC.
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


UTCDateTime = Annotated[datetime, AfterValidator(_utc)]
# Integers are bounded by the columns that hold them (BIGINT, INTEGER): a larger number is
# a 422 naming the bound, not a database error.
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
Count = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]
SmallCount = Annotated[int, Field(strict=True, ge=0, le=INT32_MAX)]
STEP_MAX = 2**62  # steps (and step-range bounds) fit a signed 64-bit column with room
StepNo = Annotated[int, Field(strict=True, ge=0, le=STEP_MAX)]
# lrs[i] is stored as the scalar series "lr/group{i}"; this keeps the name in ScalarName.
MAX_PARAM_GROUPS = 1024


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


class Out(BaseModel):
    """Response models: non-finite floats serialise as "NaN"/"Infinity"/"-Infinity"."""

    model_config = ConfigDict(ser_json_inf_nan="strings")


class RunCreate(Strict):
    """Announce a run, or resume one with the same id."""

    id: RunId
    project: ProjectName = "default"
    name: Annotated[str, StringConstraints(max_length=256), NoNul] | None = None
    config: JsonObject = Field(default_factory=dict)
    tags: list[Annotated[str, StringConstraints(max_length=128), NoNul]] = Field(
        default_factory=list, max_length=64
    )
    batch_size: Annotated[int, Field(strict=True, ge=1, le=INT32_MAX)] | None = None
    world_size: Annotated[int, Field(strict=True, ge=1, le=INT32_MAX)] = 1
    layers: list[Annotated[str, StringConstraints(max_length=512), NoNul]] = Field(
        default_factory=list
    )
    semantics: JsonObject = Field(default_factory=dict)


class WindowStats(Strict):
    """One series over a logging window: statistics of its finite values, non-finite count."""

    count: Count
    nonfinite: Count
    max: float | None = None
    min: float | None = None
    mean: float | None = None


class WindowLayerStats(Strict):
    """Each layer's values over a logging window (lists ordered like the run's layers)."""

    count: Count
    max: list[float]
    min: list[float]
    mean: list[float]
    nonfinite: list[Count]


class WindowIn(Strict):
    """The steps a record stands for when the client logs every N steps (``log_every``)."""

    steps: Annotated[int, Field(strict=True, ge=1, le=INT64_MAX)]
    first_step: StepNo
    series: dict[WindowSeriesName, WindowStats] = Field(default_factory=dict)
    layers: dict[Literal["grad_norm"], WindowLayerStats] = Field(default_factory=dict)


class GnsIn(Strict):
    """Noise scale: squared gradient norms at two batch sizes (``client_hooks.wire``)."""

    mode: Literal["micro", "ddp", "per_example"]
    b_small: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    b_big: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    layers: list[Annotated[int, Field(strict=True, ge=0)]] = Field(min_length=1)
    small_sq: list[float]
    big_sq: list[float]


class StepIn(Strict):
    """One optimizer step as the client reports it (see ``client_hooks.wire``)."""

    step: StepNo
    wall_time: float | None = None
    step_time: float | None = None
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    batch_size: Count | None = None
    samples: Count | None = None
    tokens: Count | None = None
    nonfinite: SmallCount | None = None
    layer_grad_norms: list[float] | None = None
    layer_nonfinite: list[Count] | None = None
    clip_coef: float | None = None
    loss_scale: float | None = None
    local_grad_norm: float | None = None
    overflow: Annotated[bool, Field(strict=True)] | None = None
    micro_batches: SmallCount | None = None
    layer_param_norms: list[float] | None = None
    layer_update_norms: list[float] | None = None
    gns: GnsIn | None = None  # noise scale
    lrs: list[float] | None = Field(default=None, max_length=MAX_PARAM_GROUPS)
    scalars: dict[ScalarName, float] = Field(default_factory=dict)
    window: WindowIn | None = None


class StepBatch(Strict):
    wire_version: Literal[WIRE_VERSION]  # type: ignore[valid-type]
    steps: list[StepIn]


class ErrorOut(Out):
    """Every error answer (4xx, and 503 while the database is unreachable)."""

    error: str = Field(description="the error's name, e.g. InvalidBatch, RunNotFound")
    detail: Any = Field(description="what is wrong, in words")


class IngestResult(Out):
    run: str
    accepted: int
    first_step: int | None
    last_step: int | None


class RunOut(Out):
    id: str
    project: str
    name: str
    status: str
    config: dict[str, Any]
    tags: list[str]
    batch_size: int | None
    world_size: int
    layers: list[str]
    semantics: dict[str, Any]
    created_at: UTCDateTime
    updated_at: UTCDateTime
    last_step: int | None
    num_steps: int | None = None
    series: list[str] | None = None


class ProjectOut(Out):
    name: str
    created_at: UTCDateTime
    runs: int
    last_activity: UTCDateTime | None


class SeriesOut(Out):
    """One downsampled series: bucket ``i`` covers steps ``step[i]`` to ``step_end[i]``.

    ``min``/``max`` are over the bucket's values with NaN ignored (NaN only when
    every value is NaN; ±Inf kept), so a one-step spike is never lost.
    ``nonfinite`` counts the NaN/±Inf values of the bucket. With
    ``bucket_size == 1`` every bucket is one step and ``min == max == value``.
    """

    name: str
    bucket_size: int
    step: list[int]
    step_end: list[int]
    min: list[float]
    max: list[float]
    nonfinite: list[int]


class SeriesResponse(Out):
    run: str
    series: list[SeriesOut]


class LayersResponse(Out):
    """Layer × step matrix of one per-layer metric; rows follow ``layers``."""

    run: str
    metric: str
    layers: list[str]
    bucket_size: int
    step: list[int]
    step_end: list[int]
    min: list[list[float]]
    max: list[list[float]]
    nonfinite: list[list[int]]
