"""Alert lifecycle, Alertmanager-style: firing → resolved per fingerprint (run, rule, scope),
escalation warning → critical, cooldown per level, inhibition, silences, outbox rows.

Everything here runs inside the caller's transaction, with the run's ``alert_states`` row
locked (:func:`lock_state`), so alerts and their notifications commit together with the data
that raised them, and two collector processes never evaluate the same run at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.alerts.config import load_config
from server.alerts.schemas import AlertOut, LayerScore, dump
from server.analysis.rules import INHIBITED_BY_NONFINITE, Rules, merge
from server.analysis.spikes import Signal
from server.models import Project, Run, utcnow
from server.models_alerts import (
    Alert,
    AlertState,
    Notification,
    ProjectRules,
    Receiver,
    Silence,
)
from server.settings import Settings

SEVERITY_RANK = {"warning": 1, "critical": 2}


def fingerprint(run_id: str, rule: str, scope: str) -> str:
    """Stable id of an alert's identity (run, rule, scope), as Alertmanager's label hash."""
    return hashlib.sha256(f"{run_id}\0{rule}\0{scope}".encode()).hexdigest()[:16]


def lock_state(session: Session, run_pk: int, skip_locked: bool = False) -> AlertState | None:
    """Create the run's state row if missing, then lock it until the transaction ends.

    On Postgres this is ``SELECT ... FOR UPDATE`` (concurrent ingests of one run queue up
    here); SQLite has a single writer, which serialises the same way. With ``skip_locked``
    a row another transaction holds returns None instead of waiting.
    """
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = insert(AlertState).values(run_pk=run_pk, state={}, updated_at=utcnow())
    session.execute(stmt.on_conflict_do_nothing(index_elements=["run_pk"]))
    query = (
        select(AlertState)
        .where(AlertState.run_pk == run_pk)
        .with_for_update(skip_locked=skip_locked)
        .execution_options(populate_existing=True)
    )
    return session.scalars(query).one_or_none()


# Built once (composing it cost about as much as running it).
_STATE_FOR_INGEST = (
    select(
        AlertState,
        select(Project.name).where(Project.id == bindparam("pid")).scalar_subquery(),
        select(ProjectRules.rules)
        .where(ProjectRules.project_id == bindparam("pid"))
        .scalar_subquery(),
    )
    .where(AlertState.run_pk == bindparam("run_pk"))
    .with_for_update(of=AlertState)
    .execution_options(populate_existing=True)
)


def lock_state_for_ingest(
    session: Session, run: Run, settings: Settings
) -> tuple[AlertState, str, Rules]:
    """:func:`lock_state` for ingest, with the project's name and the rules in force read
    in the same statement: one round trip where the state row exists (every ingest of a run
    but its first)."""
    params = {"pid": run.project_id, "run_pk": run.pk}
    row = session.execute(_STATE_FOR_INGEST, params).one_or_none()
    if row is None:
        lock_state(session, run.pk)  # create it (or wait for its creator), then read again
        row = session.execute(_STATE_FOR_INGEST, params).one()
    state, project, overrides = row
    assert project is not None  # foreign key
    return state, project, _merged_rules(settings, project, overrides or {})


def _merged_rules(settings: Settings, project: str, overrides: Rules) -> Rules:
    config = load_config(settings.alert_rules_file)
    return merge(config.rules, config.projects.get(project, {}), overrides)


def effective_rules(
    session: Session, project_id: int, project: str, settings: Settings
) -> tuple[Rules, Rules]:
    """(rules in force for the project, the project's REST overrides)."""
    row = session.get(ProjectRules, project_id)
    overrides: Rules = dict(row.rules) if row is not None else {}
    return _merged_rules(settings, project, overrides), overrides


def alert_out(alert: Alert, project: str, run_id: str) -> AlertOut:
    return AlertOut(
        id=alert.id,
        fingerprint=alert.fingerprint,
        project=project,
        run=run_id,
        rule=alert.rule,
        scope=alert.scope,
        severity=alert.severity,  # type: ignore[arg-type]
        state=alert.state,  # type: ignore[arg-type]
        step=alert.step,
        end_step=alert.end_step,
        value=alert.value,
        threshold=alert.threshold,
        summary=alert.summary,
        layers=[LayerScore(**entry) for entry in alert.layers],
        first_layer=alert.first_layer,
        first_layer_lead_steps=alert.first_layer_lead_steps,
        starts_at=alert.starts_at,
        ends_at=alert.ends_at,
        acknowledged_at=alert.acknowledged_at,
        acknowledged_by=alert.acknowledged_by,
        ack_comment=alert.ack_comment,
        silenced=alert.silenced,
        inhibited=alert.inhibited,
    )


def is_silenced(
    session: Session, project_id: int, run_id: str, rule: str, step: int, now: datetime
) -> bool:
    """Whether an active silence matches (project, run or any, rule or any, time, step)."""
    query = (
        select(Silence.id)
        .where(
            Silence.project_id == project_id,
            or_(Silence.run.is_(None), Silence.run == run_id),
            or_(Silence.rule.is_(None), Silence.rule == rule),
            or_(Silence.starts_at.is_(None), Silence.starts_at <= now),
            or_(Silence.ends_at.is_(None), Silence.ends_at > now),
            or_(Silence.step_from.is_(None), Silence.step_from <= step),
            or_(Silence.step_to.is_(None), Silence.step_to >= step),
        )
        .limit(1)
    )
    return session.scalar(query) is not None


class Lifecycle:
    """The alerts of one run while its state row is locked."""

    def __init__(
        self, session: Session, run: Run, project: str, rules: Rules, saved: dict[str, Any] | None
    ) -> None:
        self.session, self.run, self.project, self.rules = session, run, project, rules
        saved = saved or {}
        self.firing: dict[str, dict[str, Any]] = dict(saved.get("firing", {}))
        self.cooldown: dict[str, int] = dict(saved.get("cooldown", {}))
        self._receivers: list[Receiver] | None = None
        self.raised: list[int] = []  # ids of alerts fired in this transaction

    def to_json(self) -> dict[str, Any]:
        return {"firing": self.firing, "cooldown": self.cooldown}

    def apply(self, step: int, signals: Sequence[Signal]) -> None:
        """Fire or escalate what holds at ``step``; count clear steps of the rest."""
        active: set[str] = set()
        for sig in signals:
            fp = fingerprint(self.run.id, sig.rule, sig.scope)
            active.add(fp)
            current = self.firing.get(fp)
            if current is None:
                self._fire(fp, sig)
            else:
                current["clear"] = 0
                if SEVERITY_RANK[sig.severity] > SEVERITY_RANK[current["severity"]]:
                    self._escalate(fp, current, sig)
        for fp, current in list(self.firing.items()):
            if fp in active or current["rule"] == "stalled":
                continue
            current["clear"] += 1
            if current["clear"] >= self.rules[current["rule"]]["resolve_after"]:
                self.resolve(fp, step)

    def data_arrived(self, step: int) -> None:
        """New data resolves a stalled-run alert."""
        for fp, current in list(self.firing.items()):
            if current["rule"] == "stalled":
                self.resolve(fp, step)

    def fire(self, sig: Signal) -> None:
        """Fire ``sig`` unless its fingerprint is already firing (periodic rules)."""
        fp = fingerprint(self.run.id, sig.rule, sig.scope)
        if fp not in self.firing:
            self._fire(fp, sig)

    def _fire(self, fp: str, sig: Signal) -> None:
        key = f"{fp}/{sig.severity}"
        if self.cooldown.get(key, -1) >= sig.step:
            return
        now = utcnow()
        inhibited = sig.rule in INHIBITED_BY_NONFINITE and any(
            f["rule"] == "nonfinite" for f in self.firing.values()
        )
        silenced = is_silenced(
            self.session, self.run.project_id, self.run.id, sig.rule, sig.step, now
        )
        alert = Alert(
            fingerprint=fp,
            run_pk=self.run.pk,
            project_id=self.run.project_id,
            rule=sig.rule,
            scope=sig.scope,
            severity=sig.severity,
            state="firing",
            step=sig.step,
            value=sig.value,
            threshold=sig.threshold,
            summary=sig.summary,
            layers=[{"layer": name, "score": min(score, 1e300)} for name, score in sig.layers],
            first_layer=sig.first_layer,
            first_layer_lead_steps=sig.first_layer_lead_steps,
            starts_at=now,
            silenced=silenced,
            inhibited=inhibited,
        )
        self.session.add(alert)
        self.session.flush()
        self.firing[fp] = {"id": alert.id, "rule": sig.rule, "severity": sig.severity, "clear": 0}
        self.raised.append(alert.id)
        self._notify(alert, "firing")

    def _escalate(self, fp: str, current: dict[str, Any], sig: Signal) -> None:
        alert = self.session.get(Alert, current["id"])
        if alert is None:
            return
        current["severity"] = sig.severity
        alert.severity, alert.value, alert.threshold = sig.severity, sig.value, sig.threshold
        alert.summary = sig.summary
        if sig.layers:
            alert.layers = [{"layer": n, "score": min(s, 1e300)} for n, s in sig.layers]
        self._notify(alert, "firing")

    def resolve(self, fp: str, step: int) -> None:
        current = self.firing.pop(fp)
        alert = self.session.get(Alert, current["id"])
        cooldown = int(self.rules[current["rule"]]["cooldown"])
        self.cooldown[f"{fp}/{current['severity']}"] = step + cooldown
        if current["severity"] == "critical":  # a resolved critical also cools its warning
            self.cooldown[f"{fp}/warning"] = step + cooldown
        if alert is None:
            return
        alert.state, alert.ends_at, alert.end_step = "resolved", utcnow(), step
        self._notify(alert, "resolved")

    def _notify(self, alert: Alert, event: str) -> None:
        if alert.silenced or alert.inhibited:
            return
        if self._receivers is None:
            self._receivers = list(
                self.session.scalars(
                    select(Receiver).where(
                        or_(
                            Receiver.project_id.is_(None),
                            Receiver.project_id == self.run.project_id,
                        )
                    )
                )
            )
        payload: dict[str, Any] | None = None
        for receiver in self._receivers:
            if event == "resolved" and not receiver.send_resolved:
                continue
            if SEVERITY_RANK[alert.severity] < SEVERITY_RANK.get(receiver.min_severity, 1):
                continue
            if payload is None:
                payload = dump(alert_out(alert, self.project, self.run.id))
            self.session.add(
                Notification(
                    alert_id=alert.id,
                    receiver_id=receiver.id,
                    run_pk=self.run.pk,
                    event=event,
                    payload=payload,
                    status="pending",
                    attempts=0,
                    next_attempt_at=utcnow(),
                )
            )
        alert.last_notified_at = utcnow()


def project_name(session: Session, project_id: int) -> str:
    name = session.scalar(select(Project.name).where(Project.id == project_id))
    assert name is not None  # foreign key
    return name
