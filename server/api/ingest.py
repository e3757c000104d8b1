"""Write endpoints: announce runs, post step batches."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from server import errors
from server.api.responses import WireJSONResponse
from server.auth.deps import Ingest, IngestRun
from server.db import SessionDep, SettingsDep
from server.metrics import Metrics, count_layer_values
from server.schemas import IngestResult, RunCreate, RunOut, StepBatch
from server.services import ingest, runs

router = APIRouter(prefix="/api/v1", tags=["ingest"])


async def steps_body(request: Request, settings: SettingsDep) -> StepBatch:
    """Read the raw body (bounded), then decode and validate it."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.BodyTooLarge(f"body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.BodyTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    request.state.body_bytes = size
    return ingest.decode_body(
        b"".join(chunks),
        request.headers.get("content-type"),
        request.headers.get("content-encoding"),
        limit,
    )


@router.post(
    "/runs",
    response_model=RunOut,
    status_code=201,
    responses={200: {"model": RunOut, "description": "The run existed and is resumed"}},
)
def create_run(
    principal: Ingest, spec: RunCreate, session: SessionDep, settings: SettingsDep
) -> Response:
    """Create a run, or resume the run with this id (idempotent)."""
    principal.require_project(spec.project)
    run, created = runs.create_or_resume(session, spec, settings)
    return WireJSONResponse(run, status_code=201 if created else 200)


@router.post("/runs/{run_id}/finish", response_model=RunOut)
def finish_run(run_id: str, _principal: IngestRun, session: SessionDep) -> Response:
    """Mark the run finished (the client does at close); new steps resume it."""
    return WireJSONResponse(runs.finish_run(session, run_id))


@router.post(
    "/runs/{run_id}/steps",
    response_model=IngestResult,
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "A batch of step records (gzip allowed: Content-Encoding: gzip)",
            "content": {"application/json": {"schema": StepBatch.model_json_schema()}},
        }
    },
)
def post_steps(
    request: Request,
    run_id: str,
    _principal: IngestRun,  # before the body is read
    batch: Annotated[StepBatch, Depends(steps_body)],
    session: SessionDep,
    settings: SettingsDep,
) -> IngestResult:
    """Upsert a batch of steps keyed by (run, step); all or nothing."""
    result = ingest.ingest_steps(session, run_id, batch, settings)
    m: Metrics = request.app.state.metrics
    m.steps_ingested.inc(result.accepted)
    m.batches_ingested.inc()
    m.bytes_ingested.inc(request.state.body_bytes)
    m.layer_values_ingested.inc(count_layer_values(batch))
    return result
