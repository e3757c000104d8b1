"""Alert use cases: detection on ingest, queries, acknowledgement, silences, rules,
receivers, delivery status, and the periodic stalled-run and repeat checks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from server import errors
from server.alerts.lifecycle import (
    Lifecycle,
    alert_out,
    effective_rules,
    lock_state,
    lock_state_for_ingest,
    project_name,
)
from server.alerts.schemas import (
    AckIn,
    AlertDetail,
    AlertList,
    AlertOut,
    NotificationList,
    NotificationOut,
    ReceiverIn,
    ReceiverList,
    ReceiverOut,
    RulesOut,
    SilenceIn,
    SilenceList,
    SilenceOut,
)
from server.analysis.ratios import update_ratio
from server.analysis.rules import RuleError, Rules, validate
from server.analysis.spikes import RunAnalysis, Signal, StepView, evaluate
from server.models import LayerValues, Project, Run, Step, utcnow
from server.models_alerts import Alert, Notification, ProjectRules, Receiver, Silence
from server.schemas import StepIn
from server.services.runs import get_run
from server.settings import Settings

log = logging.getLogger("gradsentry.alerts")


def _view(s: StepIn) -> StepView:
    ratios = None
    if s.layer_param_norms is not None and s.layer_update_norms is not None:
        ratios = update_ratio(s.layer_update_norms, s.layer_param_norms)
    return StepView(
        step=s.step,
        loss=s.loss,
        grad_norm=s.grad_norm,
        nonfinite=s.nonfinite,
        overflow=s.overflow,
        loss_scale=s.loss_scale,
        layer_grad_norms=None if s.layer_grad_norms is None else np.asarray(s.layer_grad_norms),
        layer_nonfinite=None if s.layer_nonfinite is None else np.asarray(s.layer_nonfinite),
        update_ratios=ratios,
    )


@dataclass(frozen=True)
class AnalysisDone:
    """What :func:`analyze_ingested` leaves for the caller to write (with the run's own
    update, in one statement): the run's new analysis state and its last analysed step."""

    state: dict[str, Any]
    last_step: int
    raised: list[int]  # ids of the alerts fired


def analyze_ingested(
    session: Session, run: Run, steps: Sequence[StepIn], settings: Settings
) -> AnalysisDone | None:
    """Run the detectors over a just-stored batch, in the ingest transaction.

    Steps at or before the last analysed step (replays, retries, late batches) are skipped,
    so each step is analysed once whichever collector process receives it.
    Returns the state to store in the run's locked ``alert_states`` row (the caller writes
    it, see ``ingest.save_run_state``), or None when the detectors failed.

    The detectors (pure) run over the whole batch before any alert is written: should one
    of them fail, the batch is stored anyway, its steps are left unanalysed and the error
    is logged, rather than the client's data being refused.
    """
    state, project, rules = lock_state_for_ingest(session, run, settings)
    saved = state.state or {}
    analysis = RunAnalysis.from_json(saved.get("analysis"), len(run.layers), rules)
    fresh = sorted((s for s in steps if s.step > analysis.last_step), key=lambda s: s.step)
    try:
        found = [(s.step, evaluate(analysis, _view(s), rules, run.layers)) for s in fresh]
    except Exception:
        log.exception(
            "detectors failed on run %s; steps %s-%s left unanalysed",
            run.id,
            fresh[0].step,
            fresh[-1].step,
        )
        return None
    life = Lifecycle(session, run, project, rules, saved.get("lifecycle"))
    if fresh:
        life.data_arrived(fresh[0].step)
    for step, signals in found:
        life.apply(step, signals)
    return AnalysisDone(
        {"analysis": analysis.to_json(), "lifecycle": life.to_json()},
        analysis.last_step,
        life.raised,
    )


# -- queries ------------------------------------------------------------------------------


def _rows(session: Session, query: Any) -> list[AlertOut]:
    return [alert_out(a, p, r) for a, p, r in session.execute(query).all()]


def _base() -> Any:
    return (
        select(Alert, Project.name, Run.id)
        .join(Project, Project.id == Alert.project_id)
        .join(Run, Run.pk == Alert.run_pk)
    )


def list_alerts(
    session: Session, project: str | None, run: str | None, state: str, limit: int
) -> AlertList:
    query = _base()
    if project is not None:
        query = query.where(Project.name == project)
    if run is not None:
        query = query.where(Run.id == run)
    if state != "all":
        query = query.where(Alert.state == state)
    query = query.order_by(Alert.starts_at.desc(), Alert.id.desc()).limit(limit)
    return AlertList(alerts=_rows(session, query))


def run_alerts(session: Session, run_id: str, state: str, limit: int) -> AlertList:
    get_run(session, run_id)
    return list_alerts(session, None, run_id, state, limit)


def _get(session: Session, alert_id: int) -> tuple[Alert, str, str]:
    row = session.execute(_base().where(Alert.id == alert_id)).one_or_none()
    if row is None:
        raise errors.NotFound(f"alert {alert_id} does not exist")
    return row[0], row[1], row[2]


def get_alert(session: Session, alert_id: int, settings: Settings) -> AlertDetail:
    alert, project, run_id = _get(session, alert_id)
    out = alert_out(alert, project, run_id)
    return AlertDetail(
        **out.model_dump(),
        forensics=forensics(session, alert, run_id, settings.alert_forensics_steps),
    )


def forensics(session: Session, alert: Alert, run_id: str, k: int) -> dict[str, Any]:
    """K steps before and after the alert: loss, lr, total and per-layer norms, update ratios.

    Read from the stored steps, so the "after" part fills in as the run goes on. Per-layer
    series are given for the attributed layers (and the first to deviate), not all layers.
    """
    run = session.get(Run, alert.run_pk)
    assert run is not None
    steps = session.scalars(
        select(Step)
        .where(
            Step.run_pk == alert.run_pk, Step.step >= alert.step - k, Step.step <= alert.step + k
        )
        .order_by(Step.step)
        .limit(4 * k + 2)
    ).all()
    names = [entry["layer"] for entry in alert.layers]
    if alert.first_layer and alert.first_layer not in names:
        names.append(alert.first_layer)
    if alert.scope in run.layers and alert.scope not in names:
        names.append(alert.scope)
    index = {name: i for i, name in enumerate(run.layers)}
    picked = [index[n] for n in names if n in index]
    per_layer: dict[str, dict[str, list[Any]]] = {}
    lo, hi = alert.step - k, alert.step + k
    for metric in ("grad_norm", "update_ratio"):
        rows = session.execute(
            select(LayerValues.step, LayerValues.values)
            .where(
                LayerValues.run_pk == alert.run_pk,
                LayerValues.metric == metric,
                LayerValues.step >= lo,
                LayerValues.step <= hi,
            )
            .order_by(LayerValues.step)
        ).all()
        per_layer[metric] = {
            "step": [r[0] for r in rows],
            **{run.layers[i]: [float(r[1][i]) for r in rows] for i in picked},
        }
    return {
        "window": [lo, hi],
        "alert_step": alert.step,
        "layers": [run.layers[i] for i in picked],
        "step": [s.step for s in steps],
        "loss": [s.loss for s in steps],
        "lr": [s.lr for s in steps],
        "grad_norm": [s.grad_norm for s in steps],
        "loss_scale": [s.loss_scale for s in steps],
        "overflow": [s.overflow for s in steps],
        "layer_grad_norms": per_layer["grad_norm"],
        "update_ratios": per_layer["update_ratio"],
    }


def acknowledge(session: Session, alert_id: int, body: AckIn) -> AlertOut:
    alert, project, run_id = _get(session, alert_id)
    alert.acknowledged_at = utcnow()
    alert.acknowledged_by = body.by
    alert.ack_comment = body.comment
    session.commit()
    return alert_out(alert, project, run_id)


# -- silences -----------------------------------------------------------------------------


def _project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        raise errors.NotFound(f"project {name!r} does not exist")
    return project


def _silence_out(s: Silence, project: str) -> SilenceOut:
    return SilenceOut(
        id=s.id,
        project=project,
        run=s.run,
        rule=s.rule,
        starts_at=s.starts_at,
        ends_at=s.ends_at,
        step_from=s.step_from,
        step_to=s.step_to,
        comment=s.comment,
        created_by=s.created_by,
        created_at=s.created_at,
    )


def list_silences(session: Session, project: str | None) -> SilenceList:
    query = select(Silence, Project.name).join(Project, Project.id == Silence.project_id)
    if project is not None:
        query = query.where(Project.name == project)
    rows = session.execute(query.order_by(Silence.id.desc())).all()
    return SilenceList(silences=[_silence_out(s, p) for s, p in rows])


def create_silence(session: Session, body: SilenceIn) -> SilenceOut:
    project = _project(session, body.project)
    silence = Silence(
        project_id=project.id,
        run=body.run,
        rule=body.rule,
        starts_at=body.starts_at,
        ends_at=body.ends_at,
        step_from=body.step_from,
        step_to=body.step_to,
        comment=body.comment,
        created_by=body.created_by,
    )
    session.add(silence)
    session.commit()
    return _silence_out(silence, project.name)


def delete_silence(session: Session, silence_id: int) -> None:
    if session.execute(delete(Silence).where(Silence.id == silence_id)).rowcount == 0:  # type: ignore[attr-defined]
        raise errors.NotFound(f"silence {silence_id} does not exist")
    session.commit()


# -- rules --------------------------------------------------------------------------------


def get_rules(session: Session, project: str, settings: Settings) -> RulesOut:
    p = _project(session, project)
    rules, overrides = effective_rules(session, p.id, p.name, settings)
    return RulesOut(project=p.name, rules=rules, overrides=overrides)


def put_rules(session: Session, project: str, body: dict[str, Any], settings: Settings) -> RulesOut:
    """Replace the project's overrides (an empty object restores the defaults)."""
    p = _project(session, project)
    try:
        overrides = validate(body)
    except RuleError as exc:
        raise errors.InvalidInput(str(exc)) from None
    row = session.get(ProjectRules, p.id)
    if row is None:
        session.add(ProjectRules(project_id=p.id, rules=overrides, updated_at=utcnow()))
    else:
        row.rules, row.updated_at = overrides, utcnow()
    session.commit()
    return get_rules(session, project, settings)


# -- receivers and deliveries -------------------------------------------------------------


def _receiver_out(session: Session, r: Receiver, project: str | None) -> ReceiverOut:
    counts = dict(
        session.execute(
            select(Notification.status, func.count())
            .where(Notification.receiver_id == r.id)
            .group_by(Notification.status)
        ).all()
    )
    return ReceiverOut(
        id=r.id,
        name=r.name,
        kind=r.kind,
        project=project,
        url=r.url,
        config=r.config,
        send_resolved=r.send_resolved,
        min_severity=r.min_severity,
        created_at=r.created_at,
        deliveries={k: int(counts.get(k, 0)) for k in ("pending", "sent", "failed")},
    )


def list_receivers(
    session: Session, project: str | None, include_global: bool = True
) -> ReceiverList:
    """Receivers of ``project`` (all when None), with those for every project if
    ``include_global``."""
    query = select(Receiver, Project.name).outerjoin(Project, Project.id == Receiver.project_id)
    if project is not None:
        mine = Project.name == project
        query = query.where(or_(mine, Receiver.project_id.is_(None)) if include_global else mine)
    rows = session.execute(query.order_by(Receiver.id)).all()
    return ReceiverList(receivers=[_receiver_out(session, r, p) for r, p in rows])


def upsert_receiver(session: Session, body: ReceiverIn) -> tuple[ReceiverOut, bool]:
    """Create the receiver, or replace the one with the same name. Returns (it, created)."""
    project_id = None
    if body.project is not None:
        project_id = _project_or_create(session, body.project).id
    receiver = session.scalar(select(Receiver).where(Receiver.name == body.name))
    created = receiver is None
    if receiver is None:
        receiver = Receiver(name=body.name)
        session.add(receiver)
    receiver.kind, receiver.url, receiver.config = body.kind, body.url, body.config
    receiver.project_id, receiver.send_resolved = project_id, body.send_resolved
    receiver.min_severity = body.min_severity
    session.commit()
    return _receiver_out(session, receiver, body.project), created


def _project_or_create(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def delete_receiver(session: Session, receiver_id: int) -> None:
    if session.execute(delete(Receiver).where(Receiver.id == receiver_id)).rowcount == 0:  # type: ignore[attr-defined]
        raise errors.NotFound(f"receiver {receiver_id} does not exist")
    session.commit()


def list_notifications(
    session: Session,
    alert_id: int | None,
    receiver: str | None,
    status: str | None,
    limit: int,
    project: str | None = None,
) -> NotificationList:
    """The outbox, newest first; ``project``: only notifications of that project's alerts."""
    query = select(Notification, Receiver).join(Receiver, Receiver.id == Notification.receiver_id)
    if project is not None:
        query = (
            query.join(Alert, Alert.id == Notification.alert_id)
            .join(Project, Project.id == Alert.project_id)
            .where(Project.name == project)
        )
    if alert_id is not None:
        query = query.where(Notification.alert_id == alert_id)
    if receiver is not None:
        query = query.where(Receiver.name == receiver)
    if status is not None:
        query = query.where(Notification.status == status)
    rows = session.execute(query.order_by(Notification.id.desc()).limit(limit)).all()
    return NotificationList(
        notifications=[
            NotificationOut(
                id=n.id,
                alert_id=n.alert_id,
                receiver=r.name,
                kind=r.kind,
                event=n.event,
                status=n.status,  # type: ignore[arg-type]
                attempts=n.attempts,
                next_attempt_at=n.next_attempt_at,
                last_error=n.last_error,
                created_at=n.created_at,
                sent_at=n.sent_at,
            )
            for n, r in rows
        ]
    )


# -- periodic checks (delivery worker) ----------------------------------------------------


def check_stalled(session: Session, settings: Settings) -> int:
    """Fire ``stalled`` for runs with no data for ``after_s`` (one transaction per run)."""
    now = utcnow()
    fired = 0
    firing = select(Alert.run_pk).where(Alert.rule == "stalled", Alert.state == "firing")
    candidates = session.execute(
        select(Run.pk, Run.project_id, Run.updated_at).where(
            Run.status == "running",
            Run.last_step.is_not(None),
            Run.updated_at < now - timedelta(seconds=1),
            Run.pk.not_in(firing),
        )
    ).all()
    session.rollback()
    per_project: dict[int, tuple[str, Rules]] = {}
    for run_pk, project_id, updated_at in candidates:
        if project_id not in per_project:
            name = project_name(session, project_id)
            per_project[project_id] = (
                name,
                effective_rules(session, project_id, name, settings)[0],
            )
        project, rules = per_project[project_id]
        p = rules["stalled"]
        if updated_at.tzinfo is None:
            updated_at = updated_at.replace(tzinfo=now.tzinfo)
        idle = (now - updated_at).total_seconds()
        if not p["enabled"] or idle < p["after_s"] or idle > p["max_age_s"]:
            continue
        state = lock_state(session, run_pk, skip_locked=True)
        run = session.get(Run, run_pk)
        if state is None or run is None:
            session.rollback()
            continue
        life = Lifecycle(session, run, project, rules, (state.state or {}).get("lifecycle"))
        step = run.last_step or 0
        life.fire(
            Signal(
                "stalled",
                "run",
                "warning",
                step,
                idle,
                p["after_s"],
                f"no data for {idle:.0f} s (last step {step})",
            )
        )
        state.state = {**(state.state or {}), "lifecycle": life.to_json()}
        fired += len(life.raised)
        session.commit()
    return fired


def repeat_due(session: Session, settings: Settings) -> int:
    """Re-notify firing, unacknowledged, unmuted alerts every repeat interval."""
    cutoff = utcnow() - timedelta(seconds=settings.alert_repeat_interval_s)
    alerts = session.scalars(
        select(Alert)
        .where(
            Alert.state == "firing",
            Alert.acknowledged_at.is_(None),
            Alert.silenced.is_(False),
            Alert.inhibited.is_(False),
            Alert.last_notified_at < cutoff,
        )
        .with_for_update(skip_locked=True)
        .limit(100)
    ).all()
    for alert in alerts:
        run = session.get(Run, alert.run_pk)
        assert run is not None
        project = project_name(session, run.project_id)
        rules, _ = effective_rules(session, run.project_id, project, settings)
        Lifecycle(session, run, project, rules, None)._notify(alert, "firing")
    session.commit()
    return len(alerts)


def sync_config_receivers(session: Session, settings: Settings) -> None:
    """Receivers named in the YAML file are upserted into the database at startup."""
    from server.alerts.config import load_config

    for spec in load_config(settings.alert_rules_file).receivers:
        upsert_receiver(session, ReceiverIn.model_validate(spec))


def firing_counts(session: Session) -> list[tuple[str, str, str, int]]:
    """(project, rule, severity, number of firing alerts): for a Prometheus gauge
    ``gradsentry_alerts_firing{project,rule,severity}`` computed at scrape time."""
    rows = session.execute(
        select(Project.name, Alert.rule, Alert.severity, func.count())
        .join(Project, Project.id == Alert.project_id)
        .where(Alert.state == "firing")
        .group_by(Project.name, Alert.rule, Alert.severity)
        .order_by(Project.name, Alert.rule, Alert.severity)
    ).all()
    return [(p, r, s, int(n)) for p, r, s, n in rows]
