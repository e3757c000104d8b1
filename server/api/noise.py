"""``GET /api/v1/runs/{run}/noise-scale``: gradient noise scale and critical batch size."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from server.api.responses import WireJSONResponse
from server.auth.deps import ReadRun
from server.db import SessionDep, SettingsDep
from server.schemas_noise import NoiseScaleResponse
from server.services import noise

router = APIRouter(prefix="/api/v1", tags=["read"])


@router.get("/runs/{run_id}/noise-scale", response_model=NoiseScaleResponse)
def get_noise_scale(
    run_id: str,
    _principal: ReadRun,
    session: SessionDep,
    settings: SettingsDep,
    horizon: Annotated[
        int,
        Query(
            ge=0,
            le=10**7,
            description=(
                "EMA span in steps for |G|² and tr Σ (and the interval's window); 0 = all steps"
            ),
        ),
    ] = noise.DEFAULT_HORIZON,
    max_points: Annotated[int | None, Query(ge=1)] = None,
    group_depth: Annotated[
        int | None,
        Query(
            ge=1,
            le=64,
            description=("also estimate per layer group: module paths cut to this many components"),
        ),
    ] = None,
) -> Response:
    """B_simple = tr Σ / |G|² (EMA-averaged separately) per step, the current estimate with
    its 95 % block-jackknife interval (null while |G|² is not positive: never clipped), and
    McCandlish's steps/examples trade-off at the run's batch size."""
    points = min(max_points or settings.default_max_points, settings.max_max_points)
    return WireJSONResponse(
        noise.noise_scale(session, run_id, horizon or None, points, group_depth)
    )
