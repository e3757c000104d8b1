"""Prometheus collectors, registered on an injected registry.

Two kinds:

- counters and histograms updated as requests happen (``Metrics``);
- gauges computed at scrape time from the database (``DatabaseCollector``): collector
  internals (pool, database reachable) and, for ACTIVE runs only, one series per run and
  gauge (latest loss, total grad norm, last step and its timestamp, B_simple, firing
  alerts). A run is active while it is ``running`` and has sent a step within
  ``Settings.metrics_active_window_s``; at most ``metrics_max_runs`` runs are exported (the
  most recent), so the label set stays bounded and a run finished long ago leaves no series.

Extension point: other parts (alerts, noise scale) plug in with
``DatabaseCollector.add_source(fn)``; ``fn(session, active_runs)`` returns ``Sample``s of
the families in ``FAMILIES`` (or of families it declares with ``declare``). A family with no
source still appears (HELP/TYPE, no samples), so dashboards can rely on its name.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta, timezone
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, and_, select
from sqlalchemy.orm import Session, sessionmaker

from server.models import Project, Run, Step, utcnow
from server.schemas import StepBatch

log = logging.getLogger("gradsentry.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multi-process mode

RUN_LABELS = ("project", "run")
# name -> (help, label names). The per-run families carry RUN_LABELS.
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "gradsentry_database_up": ("1 when the last scrape could query the database", ()),
    "gradsentry_db_pool_checked_out": ("Database connections in use (queue depth)", ()),
    "gradsentry_db_pool_overflow": ("Connections opened beyond the pool size", ()),
    "gradsentry_active_runs": ("Runs that sent a step within the active window", ()),
    "gradsentry_run_loss": ("Latest loss of an active run", RUN_LABELS),
    "gradsentry_run_grad_norm": ("Latest total gradient norm (pre-clip)", RUN_LABELS),
    "gradsentry_run_last_step": ("Latest step number of an active run", RUN_LABELS),
    "gradsentry_run_last_step_timestamp_seconds": (
        "Unix time of an active run's latest step (client clock when reported)",
        RUN_LABELS,
    ),
    "gradsentry_run_b_simple": ("Latest noise scale B_simple of an active run", RUN_LABELS),
    "gradsentry_run_alerts_firing": ("Firing alerts of an active run", RUN_LABELS),
    "gradsentry_alerts_firing": ("Firing alerts, by severity", ("severity",)),
    "gradsentry_outbox_backlog": ("Notifications waiting in the outbox", ()),
}


@dataclass(frozen=True)
class ActiveRun:
    pk: int
    id: str
    project: str


@dataclass(frozen=True)
class Sample:
    family: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


ScrapeSource = Callable[[Session, Sequence[ActiveRun]], Iterable[Sample]]


def run_labels(run: ActiveRun) -> dict[str, str]:
    return {"project": run.project, "run": run.id}


@dataclass(frozen=True)
class Metrics:
    steps_ingested: Counter
    batches_ingested: Counter
    bytes_ingested: Counter
    layer_values_ingested: Counter
    ingest_rejected: Counter
    request_seconds: Histogram
    in_flight: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        return cls(
            steps_ingested=Counter(
                "gradsentry_steps_ingested", "Step records stored", registry=registry
            ),
            batches_ingested=Counter(
                "gradsentry_batches_ingested", "Step batches stored", registry=registry
            ),
            bytes_ingested=Counter(
                "gradsentry_ingest_bytes",
                "Bytes of step batches received, as sent (gzip counts compressed)",
                registry=registry,
            ),
            layer_values_ingested=Counter(
                "gradsentry_layer_values_ingested",
                "Per-layer values stored (layers x steps x metrics)",
                registry=registry,
            ),
            ingest_rejected=Counter(
                "gradsentry_requests_rejected",
                "Requests answered with a 4xx, by error",
                ["error"],
                registry=registry,
            ),
            request_seconds=Histogram(
                "gradsentry_http_request_duration_seconds",
                "HTTP request latency, by route template",
                ["method", "route", "status"],
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                registry=registry,
            ),
            in_flight=Gauge(
                "gradsentry_http_requests_in_flight",
                "Requests being handled (the collector's request queue)",
                registry=registry,
                multiprocess_mode="livesum",  # under --workers: summed over live workers
            ),
        )


def install_http_metrics(app: FastAPI, metrics: Metrics) -> None:
    """Time every request; label by route template, so the label set stays bounded."""

    @app.middleware("http")
    async def _timed(request: Request, call_next: Callable[..., object]) -> Response:
        start = time.perf_counter()
        metrics.in_flight.inc()
        status = "500"
        try:
            response: Response = await call_next(request)  # type: ignore[misc]
            status = str(response.status_code)
            return response
        finally:
            metrics.in_flight.dec()
            route = request.scope.get("route")
            path = getattr(route, "path", None)
            if path is None:
                path = "unmatched"
            metrics.request_seconds.labels(request.method, path, status).observe(
                time.perf_counter() - start
            )


def count_layer_values(batch: StepBatch) -> int:
    """Per-layer values in a batch (what ``gradsentry_layer_values_ingested_total`` counts)."""
    fields = ("layer_grad_norms", "layer_nonfinite", "layer_param_norms", "layer_update_norms")
    return sum(len(getattr(s, f) or ()) for s in batch.steps for f in fields)


def install_metrics_route(
    app: FastAPI, registry: CollectorRegistry, dependencies: Sequence[Any] = ()
) -> None:
    """``GET /metrics`` in the Prometheus text format (no redirect to ``/metrics/``);
    ``dependencies``: e.g. the access check."""

    @app.get("/metrics", include_in_schema=False, dependencies=list(dependencies))
    def _metrics() -> Response:  # sync: the database gauges run in the threadpool
        return Response(generate_latest(scrape_registry(app, registry)),
                        media_type=CONTENT_TYPE_LATEST)


def scrape_registry(app: FastAPI, registry: CollectorRegistry) -> CollectorRegistry:
    """What a scrape reads. One process: the app's registry. Under ``serve --workers N``
    (``$PROMETHEUS_MULTIPROC_DIR`` set, see ``server.cli``) every worker writes its counters,
    histograms and gauges to files there, and a scrape that lands on any worker sums them
    over all workers, plus the database gauges, which agree across workers anyway."""
    if not os.environ.get(MULTIPROC_ENV):
        return registry
    merged = CollectorRegistry(auto_describe=True)
    multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
    merged.register(app.state.db_metrics)
    return merged


class DatabaseCollector(Collector):
    """Gauges computed from the database at scrape time (see the module docstring)."""

    def __init__(
        self, factory: sessionmaker[Session], engine: Engine, active_window_s: float, max_runs: int
    ) -> None:
        self._factory = factory
        self._engine = engine
        self._window = timedelta(seconds=active_window_s)
        self._max_runs = max_runs
        self._sources: list[ScrapeSource] = [self._run_gauges]
        self._families = dict(FAMILIES)

    def declare(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        """Add a gauge family a source will fill."""
        self._families[name] = (help_text, tuple(labels))

    def add_source(self, source: ScrapeSource) -> None:
        self._sources.append(source)

    def describe(self) -> Iterator[Metric]:
        for name, (help_text, labels) in self._families.items():
            yield GaugeMetricFamily(name, help_text, labels=list(labels))

    def collect(self) -> Iterator[Metric]:
        families = {
            name: GaugeMetricFamily(name, help_text, labels=list(labels))
            for name, (help_text, labels) in self._families.items()
        }
        up = 1.0
        try:
            with self._factory() as session:
                active = self.active_runs(session)
                families["gradsentry_active_runs"].add_metric([], len(active))
                for source in self._sources:
                    for s in source(session, active):
                        _, labels = self._families[s.family]
                        families[s.family].add_metric([s.labels[k] for k in labels], s.value)
        except Exception:  # a scrape must answer even while the database is away
            log.exception("database gauges failed")
            up = 0.0
        families["gradsentry_database_up"].add_metric([], up)
        pool = self._engine.pool
        for name, attr in (
            ("gradsentry_db_pool_checked_out", "checkedout"),
            ("gradsentry_db_pool_overflow", "overflow"),
        ):
            fn = getattr(pool, attr, None)
            if fn is not None:
                families[name].add_metric([], max(0, int(fn())))
        yield from families.values()

    def active_runs(self, session: Session) -> list[ActiveRun]:
        since = utcnow() - self._window
        rows = session.execute(
            select(Run.pk, Run.id, Project.name)
            .join(Project, Project.id == Run.project_id)
            .where(Run.status == "running", Run.updated_at >= since)
            .order_by(Run.updated_at.desc())
            .limit(self._max_runs)
        ).all()
        return [ActiveRun(pk=pk, id=run_id, project=name) for pk, run_id, name in rows]

    def _run_gauges(self, session: Session, active: Sequence[ActiveRun]) -> Iterator[Sample]:
        if not active:
            return
        by_pk = {r.pk: r for r in active}
        rows = session.execute(
            select(Run.pk, Run.last_step, Run.updated_at, Step.loss, Step.grad_norm, Step.wall_time)
            .outerjoin(Step, and_(Step.run_pk == Run.pk, Step.step == Run.last_step))
            .where(Run.pk.in_(list(by_pk)))
        ).all()
        for pk, last_step, updated_at, loss, grad_norm, wall_time in rows:
            labels = run_labels(by_pk[pk])
            if last_step is None:
                continue
            yield Sample("gradsentry_run_last_step", float(last_step), labels)
            if updated_at.tzinfo is None:  # SQLite hands back naive UTC
                updated_at = updated_at.replace(tzinfo=timezone.utc)
            stamp = wall_time if wall_time is not None else updated_at.timestamp()
            yield Sample("gradsentry_run_last_step_timestamp_seconds", stamp, labels)
            if loss is not None:
                yield Sample("gradsentry_run_loss", loss, labels)
            if grad_norm is not None:
                yield Sample("gradsentry_run_grad_norm", grad_norm, labels)
