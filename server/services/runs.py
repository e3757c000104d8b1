"""Projects and runs: create, resume, list, describe."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server import errors
from server.models import STEP_SERIES, Project, Run, Scalar, Step, utcnow
from server.schemas import ProjectOut, RunCreate, RunOut
from server.settings import Settings

# Built once: composing a statement costs about as much as running it (every ingest reads
# its run).
_RUN = select(Run).where(Run.id == bindparam("run_id"))
_RUN_LOCKED = _RUN.with_for_update(key_share=True).execution_options(populate_existing=True)


def get_run(session: Session, run_id: str, lock: bool = False) -> Run:
    """The run with id ``run_id``; with ``lock``, its row stays locked until the transaction
    ends (``FOR NO KEY UPDATE`` on Postgres), so writers of one run take turns across
    collector processes. SQLite has a single writer, which serialises the same way."""
    run = session.scalar(_RUN_LOCKED if lock else _RUN, {"run_id": run_id})
    if run is None:
        raise errors.RunNotFound(run_id)
    return run


def _insert_new(session: Session, table: Any, values: dict[str, Any], key: str) -> bool:
    """INSERT unless a row with this ``key`` exists (or is being inserted by another
    transaction, which this one then waits for). Returns whether the row was inserted."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = insert(table).values(**values).on_conflict_do_nothing(index_elements=[key])
    return session.execute(stmt.returning(table.c[key])).first() is not None


def _get_or_create_project(session: Session, name: str) -> Project:
    # Concurrent creators (any process) end up with the same single row.
    _insert_new(session, Project.__table__, {"name": name, "created_at": utcnow()}, "name")
    project = session.scalar(select(Project).where(Project.name == name))
    assert project is not None
    return project


def create_or_resume(session: Session, spec: RunCreate, settings: Settings) -> tuple[RunOut, bool]:
    """Create the run, or resume it when the id exists. Returns (run, created).

    Resuming keeps stored steps; new steps append (or overwrite the same step
    numbers). A resume must name the same project and the same layer list.
    """
    if len(spec.layers) > settings.max_layers_per_run:
        raise errors.BatchTooLarge(
            f"{len(spec.layers)} layers exceed the limit of {settings.max_layers_per_run} per run"
        )
    if len(set(spec.layers)) != len(spec.layers):
        dup = next(n for n in spec.layers if spec.layers.count(n) > 1)
        raise errors.InvalidInput(f"layer names must be unique; {dup!r} appears twice")
    project = _get_or_create_project(session, spec.project)
    now = utcnow()
    created = _insert_new(
        session,
        Run.__table__,
        {
            "id": spec.id,
            "project_id": project.id,
            "name": spec.name or spec.id,
            "config": spec.config,
            "tags": spec.tags,
            "status": "running",
            "batch_size": spec.batch_size,
            "world_size": spec.world_size,
            "layers": spec.layers,
            "semantics": spec.semantics,
            "created_at": now,
            "updated_at": now,
        },
        "id",
    )
    run = get_run(session, spec.id, lock=True)
    if not created:
        if run.project_id != project.id:
            raise errors.RunConflict(
                f"run {spec.id!r} already exists in another project; run ids are global"
            )
        if run.layers and spec.layers and run.layers != spec.layers:
            raise errors.RunConflict(
                f"run {spec.id!r} exists with a different layer list "
                f"({len(run.layers)} layers stored, {len(spec.layers)} sent); "
                "use a new run id for a different model"
            )
        run.layers = run.layers or spec.layers
        run.config = {**run.config, **spec.config}
        run.tags = sorted(set(run.tags) | set(spec.tags))
        run.status = "running"
        run.updated_at = utcnow()
        if spec.name:
            run.name = spec.name
    session.commit()
    return run_out(session, run, project.name), created


def finish_run(session: Session, run_id: str) -> RunOut:
    """Mark a run finished (the client does at ``close()``); new steps make it running again.

    A finished run gets no stalled-run alert and no per-run gauges on ``/metrics``.
    """
    run = get_run(session, run_id, lock=True)
    run.status = "finished"
    run.updated_at = utcnow()
    session.commit()
    return describe(session, run_id)


def run_out(session: Session, run: Run, project: str, detail: bool = False) -> RunOut:
    extra: dict[str, Any] = {}
    if detail:
        extra["num_steps"] = session.scalar(
            select(func.count()).select_from(Step).where(Step.run_pk == run.pk)
        )
        names = session.scalars(
            select(Scalar.name).where(Scalar.run_pk == run.pk).distinct().order_by(Scalar.name)
        ).all()
        extra["series"] = [*STEP_SERIES, *names]
    return RunOut(
        id=run.id,
        project=project,
        name=run.name,
        status=run.status,
        config=run.config,
        tags=run.tags,
        batch_size=run.batch_size,
        world_size=run.world_size,
        layers=run.layers,
        semantics=run.semantics,
        created_at=run.created_at,
        updated_at=run.updated_at,
        last_step=run.last_step,
        **extra,
    )


def describe(session: Session, run_id: str) -> RunOut:
    run = get_run(session, run_id)
    project = session.scalar(select(Project.name).where(Project.id == run.project_id))
    assert project is not None  # foreign key
    return run_out(session, run, project, detail=True)


def list_runs(
    session: Session, project: str | None, limit: int, offset: int
) -> list[RunOut]:
    query = select(Run, Project.name).join(Project, Project.id == Run.project_id)
    if project is not None:
        query = query.where(Project.name == project)
    query = query.order_by(Run.updated_at.desc(), Run.pk.desc()).limit(limit).offset(offset)
    return [run_out(session, run, name) for run, name in session.execute(query).all()]


def list_projects(session: Session, only: str | None = None) -> list[ProjectOut]:
    """Every project, or just ``only`` (a project-scoped token sees its own)."""
    query = (
        select(Project, func.count(Run.pk), func.max(Run.updated_at))
        .outerjoin(Run, Run.project_id == Project.id)
        .group_by(Project.id)
        .order_by(Project.name)
    )
    if only is not None:
        query = query.where(Project.name == only)
    return [
        ProjectOut(name=p.name, created_at=p.created_at, runs=n, last_activity=last)
        for p, n, last in session.execute(query).all()
    ]
