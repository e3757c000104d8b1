"""Request and response models of the alerts API (contract in the project's HELPERS brief)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from server.analysis.rules import RULE_NAMES
from server.schemas import JsonObject, NoNul, Out, ProjectName, StepNo, Strict, UTCDateTime

Severity = Literal["warning", "critical"]
Who = Annotated[str, StringConstraints(max_length=128), NoNul]
ReceiverKind = Literal["webhook", "slack", "email", "alertmanager"]


class LayerScore(Out):
    layer: str
    score: float


class AlertOut(Out):
    id: int
    fingerprint: str
    project: str
    run: str
    rule: str
    scope: str
    severity: Severity
    state: Literal["firing", "resolved"]
    step: int
    end_step: int | None
    value: float
    threshold: float | None
    summary: str
    layers: list[LayerScore]
    first_layer: str | None
    first_layer_lead_steps: int | None
    starts_at: UTCDateTime
    ends_at: UTCDateTime | None
    acknowledged_at: UTCDateTime | None
    acknowledged_by: str | None
    ack_comment: str | None
    silenced: bool
    inhibited: bool


class AlertDetail(AlertOut):
    forensics: dict[str, Any]


class AlertList(Out):
    alerts: list[AlertOut]


class AckIn(Strict):
    by: Who | None = None
    comment: Annotated[str, StringConstraints(max_length=4000), NoNul] | None = None


class SilenceIn(Strict):
    project: ProjectName
    run: Annotated[str, StringConstraints(max_length=128), NoNul] | None = None
    rule: str | None = None
    starts_at: UTCDateTime | None = None
    ends_at: UTCDateTime | None = None
    step_from: StepNo | None = None
    step_to: StepNo | None = None
    comment: Annotated[str, StringConstraints(max_length=4000), NoNul] = ""
    created_by: Who | None = None

    @model_validator(mode="after")
    def _ranges(self) -> SilenceIn:
        if self.rule is not None and self.rule not in RULE_NAMES:
            raise ValueError(f"unknown rule {self.rule!r}; known: {', '.join(RULE_NAMES)}")
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        if (
            self.step_from is not None
            and self.step_to is not None
            and self.step_to < self.step_from
        ):
            raise ValueError("step_to must be >= step_from")
        return self


class SilenceOut(Out):
    id: int
    project: str
    run: str | None
    rule: str | None
    starts_at: UTCDateTime | None
    ends_at: UTCDateTime | None
    step_from: int | None
    step_to: int | None
    comment: str
    created_by: str | None
    created_at: UTCDateTime


class SilenceList(Out):
    silences: list[SilenceOut]


class RulesOut(Out):
    project: str
    rules: dict[str, dict[str, float]]
    overrides: dict[str, dict[str, float]]


class ReceiverIn(Strict):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    kind: ReceiverKind
    project: ProjectName | None = None
    url: Annotated[str, StringConstraints(max_length=2000), NoNul] | None = None
    config: JsonObject = Field(default_factory=dict)
    send_resolved: bool = True
    min_severity: Severity = "warning"

    @model_validator(mode="after")
    def _target(self) -> ReceiverIn:
        if self.kind == "email":
            cfg = self.config
            to = cfg.get("to")
            if not cfg.get("host") or not to or not cfg.get("from"):
                raise ValueError("an email receiver needs config.host, config.from and config.to")
            if isinstance(to, str):
                cfg["to"] = [to]
            port = cfg.get("port", 25)
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError("config.port must be a TCP port number")
        elif not self.url or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"a {self.kind} receiver needs an http(s) url")
        return self


class ReceiverOut(Out):
    id: int
    name: str
    kind: str
    project: str | None
    url: str | None
    config: dict[str, Any]
    send_resolved: bool
    min_severity: str
    created_at: UTCDateTime
    deliveries: dict[str, int]


class ReceiverList(Out):
    receivers: list[ReceiverOut]


class NotificationOut(Out):
    id: int
    alert_id: int
    receiver: str
    kind: str
    event: str
    status: Literal["pending", "sent", "failed"]
    attempts: int
    next_attempt_at: UTCDateTime
    last_error: str | None
    created_at: UTCDateTime
    sent_at: UTCDateTime | None


class NotificationList(Out):
    notifications: list[NotificationOut]


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict (datetimes as ISO strings, non-finite floats as the wire strings)."""
    out: dict[str, Any] = model.model_dump(mode="json")
    return out
