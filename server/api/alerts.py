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
from server.auth import ownership
from server.auth.deps import Admin, Read, ReadRun, check_owner
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
    principal: Read,
    session: SessionDep,
    project: str | None = None,
    run: str | None = None,
    state: StateQ = "all",
    limit: LimitQ = 100,
) -> Response:
    """Alerts, newest first."""
    project = principal.project_filter(project)
    return WireJSONResponse(alerts.list_alerts(session, project, run, state, limit))


@router.get("/alerts/{alert_id}", response_model=AlertDetail)
def get_alert(
    alert_id: RowId, principal: Read, session: SessionDep, settings: SettingsDep
) -> Response:
    """One alert with its forensics (K steps before and after)."""
    check_owner(principal, ownership.alert_project(session, alert_id), f"alert {alert_id}")
    return WireJSONResponse(alerts.get_alert(session, alert_id, settings))


@router.post("/alerts/{alert_id}/ack", response_model=AlertOut)
def ack_alert(
    alert_id: RowId,
    principal: Read,
    session: SessionDep,
    body: Annotated[AckIn | None, Body()] = None,
) -> Response:
    """Acknowledge: stops repeat notifications of this alert (``read`` scope suffices)."""
    check_owner(principal, ownership.alert_project(session, alert_id), f"alert {alert_id}")
    return WireJSONResponse(alerts.acknowledge(session, alert_id, body or AckIn()))


@router.get("/runs/{run_id}/alerts", response_model=AlertList)
def run_alerts(
    run_id: str,
    _principal: ReadRun,
    session: SessionDep,
    state: StateQ = "all",
    limit: LimitQ = 100,
) -> Response:
    return WireJSONResponse(alerts.run_alerts(session, run_id, state, limit))


@router.get("/silences", response_model=SilenceList)
def list_silences(principal: Read, session: SessionDep, project: str | None = None) -> Response:
    return WireJSONResponse(alerts.list_silences(session, principal.project_filter(project)))


@router.post("/silences", response_model=SilenceOut, status_code=201)
def create_silence(principal: Read, body: SilenceIn, session: SessionDep) -> Response:
    """Mute matching alerts by time window and/or step range (e.g. warm-up, after a resume)."""
    principal.require_project(body.project)
    return WireJSONResponse(alerts.create_silence(session, body), status_code=201)


@router.delete("/silences/{silence_id}", status_code=204)
def delete_silence(silence_id: RowId, principal: Read, session: SessionDep) -> Response:
    check_owner(principal, ownership.silence_project(session, silence_id),
                f"silence {silence_id}")
    alerts.delete_silence(session, silence_id)
    return Response(status_code=204)


@router.get("/rules")
def default_rules(_principal: Read) -> dict[str, Any]:
    """The built-in rules and their default parameters."""
    return {"rules": DEFAULT_RULES}


@router.get("/projects/{project}/rules", response_model=RulesOut)
def get_rules(
    project: str, principal: Read, session: SessionDep, settings: SettingsDep
) -> Response:
    """Rules in force for a project (defaults < YAML file < overrides) and its overrides."""
    principal.require_project(project)
    return WireJSONResponse(alerts.get_rules(session, project, settings))


@router.put("/projects/{project}/rules", response_model=RulesOut)
def put_rules(
    project: str,
    principal: Admin,
    session: SessionDep,
    settings: SettingsDep,
    body: Annotated[dict[str, Any], Body()],
) -> Response:
    """Replace the project's overrides: ``{rule: {parameter: value}}`` (``admin`` scope)."""
    principal.require_project(project)
    return WireJSONResponse(alerts.put_rules(session, project, body, settings))


@router.get("/receivers", response_model=ReceiverList)
def list_receivers(principal: Admin, session: SessionDep, project: str | None = None) -> Response:
    """Receivers of ``project`` and those for every project; a project's admin token sees
    only its own project's (``admin`` scope: receivers hold webhook URLs and credentials)."""
    project = principal.project_filter(project)
    return WireJSONResponse(
        alerts.list_receivers(session, project, include_global=principal.project is None)
    )


@router.post(
    "/receivers",
    response_model=ReceiverOut,
    status_code=201,
    responses={200: {"model": ReceiverOut, "description": "Replaced by name"}},
)
def put_receiver(principal: Admin, body: ReceiverIn, session: SessionDep) -> Response:
    """Create a receiver (webhook, slack, email, alertmanager), or replace it by name."""
    principal.require_project(body.project)
    check_owner(principal, ownership.receiver_project_by_name(session, body.name),
                f"receiver {body.name!r}")
    out, created = alerts.upsert_receiver(session, body)
    return WireJSONResponse(out, status_code=201 if created else 200)


@router.delete("/receivers/{receiver_id}", status_code=204)
def delete_receiver(receiver_id: RowId, principal: Admin, session: SessionDep) -> Response:
    check_owner(principal, ownership.receiver_project(session, receiver_id),
                f"receiver {receiver_id}")
    alerts.delete_receiver(session, receiver_id)
    return Response(status_code=204)


@router.get("/notifications", response_model=NotificationList)
def list_notifications(
    principal: Read,
    session: SessionDep,
    alert: Annotated[int | None, Query(ge=1, le=ROW_ID_MAX)] = None,
    receiver: str | None = None,
    status: Annotated[Literal["pending", "sent", "failed"] | None, Query()] = None,
    limit: LimitQ = 100,
) -> Response:
    """Delivery status of the outbox, newest first."""
    return WireJSONResponse(
        alerts.list_notifications(session, alert, receiver, status, limit, principal.project)
    )
