"""What the dashboard pages read: one call per page, composed of the read services."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server import errors
from server.models import Project, Run, Scalar, Step, utcnow
from server.schemas import RunOut, SeriesOut
from server.services import runs, series
from server.services.series import LayerMatrix

RUN_SERIES = ("loss", "grad_norm", "lr", "nonfinite")


@dataclass(frozen=True)
class RunRow:
    """One line of the runs list."""

    run: RunOut
    age_s: float
    nonfinite_steps: int


@dataclass(frozen=True)
class RunPageData:
    run: RunOut
    series: dict[str, SeriesOut]
    lr_groups: list[SeriesOut]
    grad: LayerMatrix
    update_ratio: LayerMatrix


def run_rows(
    session: Session, project: str | None, limit: int, now: datetime | None = None
) -> list[RunRow]:
    """The most recently active runs, with their age and count of steps that had NaN/Inf."""
    items = runs.list_runs(session, project, limit, 0)
    pks = {
        run_id: pk
        for run_id, pk in session.execute(
            select(Run.id, Run.pk).where(Run.id.in_([r.id for r in items]))
        )
    }
    bad = {
        pk: n
        for pk, n in session.execute(
            select(Step.run_pk, func.count())
            .where(Step.run_pk.in_(list(pks.values())), Step.nonfinite > 0)
            .group_by(Step.run_pk)
        )
    }
    now = now or utcnow()
    return [
        RunRow(
            run=r,
            age_s=(now - r.updated_at).total_seconds(),
            nonfinite_steps=int(bad.get(pks[r.id], 0)),
        )
        for r in items
    ]


def run_page(session: Session, run_id: str, max_points: int, heat_points: int) -> RunPageData:
    """Everything the run page draws except alerts and noise scale (their own REST)."""
    row = runs.get_run(session, run_id)
    project = session.scalar(select(Project.name).where(Project.id == row.project_id))
    run = runs.run_out(session, row, project or "")  # no step count: a scan of every step
    groups = lr_groups(session, row.pk)
    got = series.read_series(session, run_id, [*RUN_SERIES, *groups], None, None, max_points)
    by_name = {s.name: s for s in got.series}
    grad = series.layer_matrix(session, run_id, "grad_norm", None, None, None, heat_points)
    ratio = series.layer_matrix(session, run_id, "update_ratio", None, None, None, heat_points)
    return RunPageData(
        run=run,
        series={n: by_name[n] for n in RUN_SERIES},
        lr_groups=[by_name[n] for n in groups],
        grad=grad,
        update_ratio=ratio,
    )


def lr_groups(session: Session, run_pk: int) -> list[str]:
    """``lr/group0``, ``lr/group1``, … that the run logs: one index probe per group."""
    names: list[str] = []
    while True:
        name = f"lr/group{len(names)}"
        probe = select(Scalar.step).where(Scalar.run_pk == run_pk, Scalar.name == name)
        if session.scalar(probe.limit(1)) is None:
            return names
        names.append(name)


def layer_detail(session: Session, run_id: str, layer: str, max_points: int) -> list[LayerMatrix]:
    """One layer's grad norm and update-to-weight ratio (drill-down from the heatmap)."""
    return [
        series.layer_matrix(session, run_id, metric, [layer], None, None, max_points)
        for metric in ("grad_norm", "update_ratio")
    ]


def compare(
    session: Session, run_ids: list[str], names: list[str], max_points: int
) -> dict[str, list[tuple[str, SeriesOut]]]:
    """Series ``names`` of each run, keyed by series name: ``{name: [(run, series)]}``."""
    if len(run_ids) < 2:
        raise errors.InvalidInput("compare needs two or more runs: ?runs=a,b")
    out: dict[str, list[tuple[str, SeriesOut]]] = {n: [] for n in names}
    for run_id in run_ids:
        for s in series.read_series(session, run_id, names, None, None, max_points).series:
            out[s.name].append((run_id, s))
    return out
