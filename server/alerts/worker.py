"""The delivery worker: a daemon thread per collector process, started in the app lifespan.

It claims due outbox rows (``FOR UPDATE SKIP LOCKED`` on Postgres, so several collector
processes share the work without sending a row twice), groups them per (receiver, run), sends
each group, and records the outcome: sent, or retried later with exponential backoff
(``alert_retry_base_s · 2^attempts``, capped at ``alert_retry_max_s``) until
``alert_give_up_s`` after the row was written. A claimed row carries a lease, so a process
that dies mid-send leaves its rows to the others once the lease expires.

Every ``alert_scheduler_interval_s`` it also runs the periodic checks: stalled runs and the
repeat interval of firing alerts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from server.alerts.notifiers import DeliveryError, deliver
from server.models import utcnow
from server.models_alerts import Notification, Receiver
from server.settings import Settings

log = logging.getLogger("gradsentry.alerts")
LEASE_S = 60.0
CLAIM_LIMIT = 200


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


class AlertWorker:
    def __init__(self, factory: sessionmaker[Session], settings: Settings) -> None:
        self.factory, self.settings = factory, settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_schedule = 0.0
        self._last_error_log = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gradsentry-alerts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.alert_poll_interval_s):
            try:
                while self.deliver_due():
                    pass
                if time.monotonic() >= self._next_schedule:
                    interval = self.settings.alert_scheduler_interval_s
                    self._next_schedule = time.monotonic() + interval
                    self.schedule()
            except Exception:  # keep the thread alive; the database may come back
                if time.monotonic() - self._last_error_log > 60:
                    self._last_error_log = time.monotonic()
                    log.exception("alert worker iteration failed (retrying)")

    def schedule(self) -> None:
        from server.services.alerts import check_stalled, repeat_due

        with self.factory() as session:
            check_stalled(session, self.settings)
        with self.factory() as session:
            repeat_due(session, self.settings)

    def deliver_due(self) -> int:
        """Claim, send and settle one round of due notifications; returns how many."""
        now = utcnow()
        with self.factory() as session:
            rows = session.scalars(
                select(Notification)
                .where(
                    Notification.status == "pending",
                    Notification.next_attempt_at <= now,
                    or_(Notification.lease_until.is_(None), Notification.lease_until < now),
                )
                .order_by(Notification.id)
                .limit(CLAIM_LIMIT)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return 0
            lease = now + timedelta(seconds=LEASE_S)
            groups: dict[tuple[int, int], list[tuple[int, dict[str, Any], datetime]]] = defaultdict(
                list
            )
            for row in rows:
                row.lease_until = lease
                groups[(row.receiver_id, row.run_pk)].append(
                    (row.id, row.payload, _aware(row.created_at))
                )
            receivers = {
                r.id: (r.kind, r.name, r.url, dict(r.config))
                for r in session.scalars(
                    select(Receiver).where(Receiver.id.in_({k[0] for k in groups}))
                )
            }
            session.commit()
        started = time.monotonic()
        for (receiver_id, _run), items in groups.items():
            if time.monotonic() - started > LEASE_S / 2:
                # Slow receivers ate half the lease: hand the rest back rather than risk
                # another process claiming them while we still send (a double delivery).
                self._release([i for i, _, _ in items])
                continue
            kind, name, url, config = receivers[receiver_id]
            error = None
            # One entry per alert, its latest snapshot (as an Alertmanager group shows it):
            # a warning escalated to critical while the receiver was down is sent once.
            latest = {p["id"]: p for _, p, _ in sorted(items, key=lambda item: item[0])}
            try:
                deliver(
                    kind, name, url, config, list(latest.values()), self.settings.alert_external_url
                )
            except DeliveryError as exc:
                error = str(exc)
                log.warning("notification to %s failed: %s", name, error)
            self._settle(items, error)
        return len(rows)

    def _release(self, ids: list[int]) -> None:
        with self.factory() as session:
            for row in session.scalars(select(Notification).where(Notification.id.in_(ids))):
                row.lease_until = None
            session.commit()

    def _settle(self, items: list[tuple[int, dict[str, Any], datetime]], error: str | None) -> None:
        s = self.settings
        now = utcnow()
        with self.factory() as session:
            for row in session.scalars(
                select(Notification).where(Notification.id.in_([i for i, _, _ in items]))
            ):
                row.attempts += 1
                row.lease_until = None
                if error is None:
                    row.status, row.sent_at, row.last_error = "sent", now, None
                    continue
                row.last_error = error
                if (now - _aware(row.created_at)).total_seconds() > s.alert_give_up_s:
                    row.status = "failed"
                    continue
                delay = min(s.alert_retry_base_s * 2 ** (row.attempts - 1), s.alert_retry_max_s)
                row.next_attempt_at = now + timedelta(seconds=delay)
            session.commit()
