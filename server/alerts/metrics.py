"""Prometheus gauges of the alerting side, computed from the database at scrape time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.metrics import ActiveRun, Sample, run_labels
from server.models_alerts import Alert, Notification


def alert_gauges(session: Session, active: Sequence[ActiveRun]) -> Iterator[Sample]:
    """``gradsentry_alerts_firing{severity}`` (every run), ``gradsentry_outbox_backlog``
    (notifications not yet delivered) and ``gradsentry_run_alerts_firing`` (active runs)."""
    by_severity = dict.fromkeys(("warning", "critical"), 0)
    rows = session.execute(
        select(Alert.severity, func.count()).where(Alert.state == "firing")
        .group_by(Alert.severity)
    ).all()
    for severity, n in rows:
        by_severity[severity] = int(n)
    for severity, n in by_severity.items():
        yield Sample("gradsentry_alerts_firing", float(n), {"severity": severity})
    backlog = session.scalar(
        select(func.count()).select_from(Notification)
        .where(Notification.status == "pending")
    )
    yield Sample("gradsentry_outbox_backlog", float(backlog or 0))
    if not active:
        return
    by_pk = {r.pk: r for r in active}
    firing = dict(
        session.execute(
            select(Alert.run_pk, func.count())
            .where(Alert.state == "firing", Alert.run_pk.in_(list(by_pk)))
            .group_by(Alert.run_pk)
        ).all()
    )
    for pk, run in by_pk.items():
        yield Sample("gradsentry_run_alerts_firing", float(firing.get(pk, 0)), run_labels(run))
