"""Alerts REST: alerts, acknowledgement, silences, rules per project, receivers, deliveries."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query, Response

from server.alerts.schemas import (
    AckIn,
    AlertDetail,
    AlertList,
    AlertOut,
    NotificationList,
    ReceiverIn,
    ReceiverList,
    ReceiverOut,
    RulesOut,
    SilenceIn,
    SilenceList,
    SilenceOut,
)
from server.analysis.rules import DEFAULT_RULES
from server.api.responses import WireJSONResponse
from server.db import SessionDep, SettingsDep
from server.services import alerts

router = APIRouter(prefix="/api/v1", tags=["alerts"])

StateQ = Annotated[Literal["firing", "resolved", "all"], Query()]
LimitQ = Annotated[int, Query(ge=1, le=1000)]
# Alert, silence and receiver ids are 32-bit keys: a larger number names nothing.
ROW_ID_MAX = 2**31 - 1
RowId = Annotated[int, Path(ge=1, le=ROW_ID_MAX)]


@router.get("/alerts", response_model=AlertList)
def list_alerts(
    session: SessionDep,
    project: str | None = None,
    run: str | None = None,
    state: StateQ = "all",
    limit: LimitQ = 100,
) -> Response:
    """Alerts, newest first."""
    return WireJSONResponse(alerts.list_alerts(session, project, run, state, limit))


@router.get("/alerts/{alert_id}", response_model=AlertDetail)
def get_alert(alert_id: RowId, session: SessionDep, settings: SettingsDep) -> Response:
    """One alert with its forensics (K steps before and after)."""
    return WireJSONResponse(alerts.get_alert(session, alert_id, settings))


@router.post("/alerts/{alert_id}/ack", response_model=AlertOut)
def ack_alert(
    alert_id: RowId, session: SessionDep, body: Annotated[AckIn | None, Body()] = None
) -> Response:
    """Acknowledge: stops repeat notifications of this alert."""
    return WireJSONResponse(alerts.acknowledge(session, alert_id, body or AckIn()))


@router.get("/runs/{run_id}/alerts", response_model=AlertList)
def run_alerts(
    run_id: str, session: SessionDep, state: StateQ = "all", limit: LimitQ = 100
) -> Response:
    return WireJSONResponse(alerts.run_alerts(session, run_id, state, limit))


@router.get("/silences", response_model=SilenceList)
def list_silences(session: SessionDep, project: str | None = None) -> Response:
    return WireJSONResponse(alerts.list_silences(session, project))


@router.post("/silences", response_model=SilenceOut, status_code=201)
def create_silence(body: SilenceIn, session: SessionDep) -> Response:
    """Mute matching alerts by time window and/or step range (e.g. warm-up, after a resume)."""
    return WireJSONResponse(alerts.create_silence(session, body), status_code=201)


@router.delete("/silences/{silence_id}", status_code=204)
def delete_silence(silence_id: RowId, session: SessionDep) -> Response:
    alerts.delete_silence(session, silence_id)
    return Response(status_code=204)


@router.get("/rules")
def default_rules() -> dict[str, Any]:
    """The built-in rules and their default parameters."""
    return {"rules": DEFAULT_RULES}


@router.get("/projects/{project}/rules", response_model=RulesOut)
def get_rules(project: str, session: SessionDep, settings: SettingsDep) -> Response:
    """Rules in force for a project (defaults < YAML file < overrides) and its overrides."""
    return WireJSONResponse(alerts.get_rules(session, project, settings))


@router.put("/projects/{project}/rules", response_model=RulesOut)
def put_rules(
    project: str,
    session: SessionDep,
    settings: SettingsDep,
    body: Annotated[dict[str, Any], Body()],
) -> Response:
    """Replace the project's overrides: ``{rule: {parameter: value}}``."""
    return WireJSONResponse(alerts.put_rules(session, project, body, settings))


@router.get("/receivers", response_model=ReceiverList)
def list_receivers(session: SessionDep, project: str | None = None) -> Response:
    return WireJSONResponse(alerts.list_receivers(session, project))


@router.post(
    "/receivers",
    response_model=ReceiverOut,
    status_code=201,
    responses={200: {"model": ReceiverOut, "description": "Replaced by name"}},
)
def put_receiver(body: ReceiverIn, session: SessionDep) -> Response:
    """Create a receiver (webhook, slack, email, alertmanager), or replace it by name."""
    out, created = alerts.upsert_receiver(session, body)
    return WireJSONResponse(out, status_code=201 if created else 200)


@router.delete("/receivers/{receiver_id}", status_code=204)
def delete_receiver(receiver_id: RowId, session: SessionDep) -> Response:
    alerts.delete_receiver(session, receiver_id)
    return Response(status_code=204)


@router.get("/notifications", response_model=NotificationList)
def list_notifications(
    session: SessionDep,
    alert: Annotated[int | None, Query(ge=1, le=ROW_ID_MAX)] = None,
    receiver: str | None = None,
    status: Annotated[Literal["pending", "sent", "failed"] | None, Query()] = None,
    limit: LimitQ = 100,
) -> Response:
    """Delivery status of the outbox, newest first."""
    return WireJSONResponse(alerts.list_notifications(session, alert, receiver, status, limit))
