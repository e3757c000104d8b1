"""Which project a run, alert, silence or receiver belongs to (for the project check).

Each returns ``MISSING`` when the object does not exist, so the route answers its usual 404;
a receiver for every project has project None.
"""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.models import Project, Run
from server.models_alerts import Alert, Receiver, Silence

MISSING: Final = "\0missing"  # not a valid project name


def _owner(session: Session, model: Any, key: Any, value: object) -> str | None:
    row = session.execute(
        select(Project.name)
        .select_from(model)
        .outerjoin(Project, Project.id == model.project_id)
        .where(key == value)
    ).one_or_none()
    return MISSING if row is None else row[0]


def run_project(session: Session, run_id: str) -> str | None:
    return _owner(session, Run, Run.id, run_id)


def alert_project(session: Session, alert_id: int) -> str | None:
    return _owner(session, Alert, Alert.id, alert_id)


def silence_project(session: Session, silence_id: int) -> str | None:
    return _owner(session, Silence, Silence.id, silence_id)


def receiver_project(session: Session, receiver_id: int) -> str | None:
    return _owner(session, Receiver, Receiver.id, receiver_id)


def receiver_project_by_name(session: Session, name: str) -> str | None:
    return _owner(session, Receiver, Receiver.name, name)
