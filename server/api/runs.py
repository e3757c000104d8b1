"""Read endpoints: projects, runs, series, layer matrices."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from server.api.responses import WireJSONResponse
from server.auth.deps import Read, ReadRun
from server.db import SessionDep, SettingsDep
from server.schemas import STEP_MAX, LayersResponse, ProjectOut, RunOut, SeriesResponse
from server.services import runs, series

router = APIRouter(prefix="/api/v1", tags=["read"])

StepQ = Annotated[
    int | None, Query(ge=0, le=STEP_MAX, description="first/last step (inclusive)")
]
PointsQ = Annotated[int | None, Query(ge=1, description="at most this many buckets")]


def _names(raw: str) -> list[str]:
    return [n.strip() for n in raw.split(",") if n.strip()]


def _points(max_points: int | None, settings: SettingsDep) -> int:
    return min(max_points or settings.default_max_points, settings.max_max_points)


@router.get("/projects", response_model=list[ProjectOut])
def list_projects(principal: Read, session: SessionDep) -> Response:
    return WireJSONResponse(runs.list_projects(session, principal.project))


@router.get("/runs", response_model=list[RunOut])
def list_runs(
    principal: Read,
    session: SessionDep,
    project: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=STEP_MAX)] = 0,
) -> Response:
    project = principal.project_filter(project)
    return WireJSONResponse(runs.list_runs(session, project, limit, offset))


@router.get("/runs/{run_id}", response_model=RunOut)
def get_run(run_id: str, _principal: ReadRun, session: SessionDep) -> Response:
    return WireJSONResponse(runs.describe(session, run_id))


@router.get("/runs/{run_id}/series", response_model=SeriesResponse)
def get_series(
    run_id: str,
    _principal: ReadRun,
    session: SessionDep,
    settings: SettingsDep,
    names: Annotated[str, Query(description="comma-separated series names")] = "loss,grad_norm",
    start: StepQ = None,
    end: StepQ = None,
    max_points: PointsQ = None,
) -> Response:
    """Series downsampled to min/max buckets: a one-step spike survives any zoom level."""
    result = series.read_series(
        session, run_id, _names(names), start, end, _points(max_points, settings)
    )
    return WireJSONResponse(result)


@router.get("/runs/{run_id}/layers", response_model=LayersResponse)
def get_layers(
    run_id: str,
    _principal: ReadRun,
    session: SessionDep,
    settings: SettingsDep,
    metric: str = "grad_norm",
    layers: Annotated[str | None, Query(description="comma-separated layer names")] = None,
    start: StepQ = None,
    end: StepQ = None,
    max_points: PointsQ = None,
) -> Response:
    """Layer × step matrix (rows in model order), bucketed along steps with min/max."""
    result = series.read_layers(
        session, run_id, metric, _names(layers) if layers else None, start, end,
        _points(max_points, settings),
    )
    return WireJSONResponse(result)
