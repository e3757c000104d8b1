"""Ingest: decode a batch of step records and upsert it in one transaction."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
from pydantic import ValidationError
from sqlalchemy import BigInteger, any_, bindparam, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from server import errors
from server.analysis.ratios import update_ratio
from server.columns import to_float32
from server.jsonenc import dumps_str
from server.models import (
    STEP_SERIES,
    WINDOW_STATS,
    WINDOW_STEPS,
    LayerValues,
    Run,
    Scalar,
    Step,
    utcnow,
)
from server.models_alerts import AlertState
from server.schemas import IngestResult, StepBatch, StepIn
from server.services import bulk, rollups
from server.services.alerts import AnalysisDone, analyze_ingested
from server.services.noise import check_gns, gns_rows
from server.services.runs import get_run
from server.settings import Settings

STEP_SERIES_SET = frozenset(STEP_SERIES)
STEP_COLUMNS = ("wall_time", "loss", "lr", "grad_norm", "batch_size", "samples", "tokens",
                "nonfinite", "clip_coef", "loss_scale", "local_grad_norm", "overflow",
                "micro_batches")
# Per-layer vectors of a step record and the layer metric each is stored under.
LAYER_FIELDS = {"layer_grad_norms": "grad_norm", "layer_nonfinite": "nonfinite",
                "layer_param_norms": "param_norm", "layer_update_norms": "update_norm"}


STEP_TIME = "step_time"  # a StepIn field stored as a scalar series
_WINDOW_SUFFIXES = tuple(f":{stat}" for stat in WINDOW_STATS)


def window_rows(run_pk: int, s: StepIn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Scalar and layer rows of a record's logging window, at the record's step.

    Series ``X`` gets ``X:max``, ``X:min``, ``X:mean`` (over its finite values; absent when
    none was finite) and ``X:nonfinite``; layer metric ``grad_norm`` the same four as layer
    metrics; ``window:steps`` counts the steps the record stands for.
    """
    w = s.window
    if w is None:
        return [], []
    scalars = [{"run_pk": run_pk, "name": WINDOW_STEPS, "step": s.step, "value": w.steps}]
    for name, st in w.series.items():
        for stat in WINDOW_STATS:
            value = getattr(st, stat)
            if value is not None:
                scalars.append(
                    {"run_pk": run_pk, "name": f"{name}:{stat}", "step": s.step, "value": value}
                )
    layers = [
        {"run_pk": run_pk, "metric": f"{metric}:{stat}", "step": s.step,
         "values": to_float32(getattr(st, stat))}
        for metric, st in w.layers.items()
        for stat in WINDOW_STATS
    ]
    return scalars, layers


def lr_series(group: int) -> str:
    """The scalar series holding param group ``group``'s learning rate (``lrs[group]``)."""
    return f"lr/group{group}"


def decode_body(
    body: bytes, content_type: str | None, content_encoding: str | None, limit: int
) -> StepBatch:
    """Check the media type, inflate gzip (bounded), parse and validate the batch."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise errors.WrongContentType(
            f"Content-Type must be application/json, got {content_type or 'none'!r}"
        )
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "gzip":
        body = _gunzip(body, limit)
    elif encoding != "identity":
        raise errors.WrongContentType(
            f"Content-Encoding must be gzip or identity, got {content_encoding!r}"
        )
    if len(body) > limit:
        raise errors.BodyTooLarge(f"body of {len(body)} bytes exceeds the limit of {limit}")
    try:
        return StepBatch.model_validate_json(body)
    except ValidationError as exc:
        raise errors.InvalidBatch(_describe(exc)) from None


def _gunzip(body: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=31)  # gzip header required
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise errors.CorruptBody(f"body is not valid gzip: {exc}") from None
    if len(out) > limit:
        raise errors.BodyTooLarge(f"decompressed body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise errors.CorruptBody("gzip body is truncated")
    return out


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more errors" if more > 0 else "")


def ingest_steps(
    session: Session, run_id: str, batch: StepBatch, settings: Settings
) -> IngestResult:
    """Upsert every step of ``batch`` into run ``run_id``; all or nothing.

    Keyed by (run, step): a retried or replayed batch overwrites the same rows,
    so it never duplicates a step and never loses one.
    """
    steps = batch.steps
    if len(steps) > settings.max_steps_per_batch:
        raise errors.BatchTooLarge(
            f"{len(steps)} steps exceed the limit of {settings.max_steps_per_batch} per batch"
        )
    _check_scalar_counts(steps, settings.max_scalars_per_step)
    # Ingests of one run take turns (any process): the rollups are recomputed from the stored
    # steps around the batch, and last_step only grows, which needs the others' commits.
    run = get_run(session, run_id, lock=True)
    _check_steps(steps, len(run.layers))
    if not steps:
        return IngestResult(run=run_id, accepted=0, first_step=None, last_step=None)

    step_rows = [
        {"run_pk": run.pk, "step": s.step, **{c: getattr(s, c) for c in STEP_COLUMNS}}
        for s in steps
    ]
    layer_rows: list[dict[str, Any]] = []
    scalar_rows: list[dict[str, Any]] = []
    for s in steps:
        vectors: dict[str, np.ndarray] = {}
        for field, metric in LAYER_FIELDS.items():
            values = getattr(s, field)
            if values is not None:
                vectors[metric] = to_float32(values)
        if s.layer_param_norms is not None and s.layer_update_norms is not None:
            vectors["update_ratio"] = update_ratio(s.layer_update_norms, s.layer_param_norms)
        layer_rows.extend(
            {"run_pk": run.pk, "metric": metric, "step": s.step, "values": values}
            for metric, values in vectors.items()
        )
        scalar_rows.extend(
            {"run_pk": run.pk, "name": k, "step": s.step, "value": v}
            for k, v in s.scalars.items()
        )
        scalar_rows.extend(
            {"run_pk": run.pk, "name": lr_series(i), "step": s.step, "value": v}
            for i, v in enumerate(s.lrs or ())
        )
        if s.step_time is not None:
            scalar_rows.append(
                {"run_pk": run.pk, "name": STEP_TIME, "step": s.step, "value": s.step_time}
            )
        w_scalars, w_layers = window_rows(run.pk, s)
        scalar_rows.extend(w_scalars)
        layer_rows.extend(w_layers)
        if s.gns is not None:  # noise scale: scalar series gns/* and layer metrics gns_*
            gns_scalars, gns_layers = gns_rows(s.gns, len(run.layers))
            scalar_rows.extend({"run_pk": run.pk, "name": k, "step": s.step, "value": v}
                               for k, v in gns_scalars.items())
            layer_rows.extend({"run_pk": run.pk, "metric": k, "step": s.step, "values": v}
                              for k, v in gns_layers.items())
    # Every stored layer vector and scalar has its step's row: when no step of the batch is
    # stored, no key of any table is (a run appending), and the rows go in as they are.
    # Every stored step is at or before run.last_step (set under this lock by every ingest),
    # so a batch that starts after it needs no look-up.
    first = min(s.step for s in steps)
    new = (run.last_step is None or first > run.last_step) or session.scalar(
        select(Step.step).where(Step.run_pk == run.pk, _among([s.step for s in steps], session))
        .limit(1)
    ) is None
    bulk.upsert(session, Step.__table__, step_rows, new)
    bulk.upsert(session, LayerValues.__table__, layer_rows, new)
    bulk.upsert(session, Scalar.__table__, scalar_rows, new)
    if new:  # fast long reads: fold the steps into the stored blocks
        rollups.merge_layers(session, run.pk, len(run.layers), layer_rows)
        rollups.merge_series(session, run.pk, step_rows)
    else:  # some steps overwritten: recompute their blocks from what is stored
        rollups.refresh_layers(session, run.pk, len(run.layers), layer_rows)
        rollups.refresh_series(session, run.pk, step_rows)

    last = max(s.step for s in steps)
    done = analyze_ingested(session, run, steps, settings) if settings.alerts_enabled else None
    last_step = last if run.last_step is None else max(run.last_step, last)
    save_run_state(session, run.pk, last_step, done)
    session.commit()
    return IngestResult(
        run=run_id, accepted=len(steps), first_step=first, last_step=last
    )


# The run's update and its analysis state in one statement (one round trip).
_SAVE_PG = """
WITH r AS (UPDATE runs SET last_step = %(last)s, updated_at = %(now)s, status = 'running'
           WHERE pk = %(pk)s)
UPDATE alert_states SET state = %(state)s::json, last_step = %(alast)s, updated_at = %(now)s
WHERE run_pk = %(pk)s
"""


def save_run_state(
    session: Session, run_pk: int, last_step: int, done: AnalysisDone | None
) -> None:
    """Set the run's ``last_step`` (status running, updated now) and, with ``done``, store
    its analysis state in the ``alert_states`` row locked by the analysis. Core statements
    (the ORM's flush of the two objects cost more than the work); the session's ``Run`` is
    stale until the commit expires it."""
    now = utcnow()
    if session.get_bind().dialect.name == "postgresql":
        raw = session.connection().connection.driver_connection
        assert isinstance(raw, psycopg.Connection)
        with raw.cursor() as cur:
            if done is None:
                cur.execute(
                    "UPDATE runs SET last_step = %s, updated_at = %s, status = 'running' "
                    "WHERE pk = %s", (last_step, now, run_pk))
            else:
                cur.execute(_SAVE_PG, {"last": last_step, "now": now, "pk": run_pk,
                                       "state": dumps_str(done.state), "alast": done.last_step})
        return
    session.execute(update(Run).where(Run.pk == run_pk).values(
        last_step=last_step, updated_at=now, status="running"))
    if done is not None:
        session.execute(update(AlertState).where(AlertState.run_pk == run_pk).values(
            state=done.state, last_step=done.last_step, updated_at=now))


def _among(steps: list[int], session: Session) -> Any:
    """``steps.step IN steps``; on Postgres one array parameter (thousands of placeholders
    would cost more to send and parse than the lookup itself)."""
    if session.get_bind().dialect.name == "postgresql":
        return Step.step == any_(bindparam("batch_steps", steps, type_=ARRAY(BigInteger)))
    return Step.step.in_(steps)


def _check_scalar_counts(steps: Sequence[StepIn], limit: int) -> None:
    for i, s in enumerate(steps):
        n = max(len(s.scalars), len(s.window.series) if s.window is not None else 0)
        if n > limit:
            raise errors.BatchTooLarge(
                f"steps.{i}: {n} named scalars exceed the limit of {limit} per step "
                "(GRADSENTRY_MAX_SCALARS_PER_STEP)"
            )


def _check_steps(steps: Sequence[StepIn], n_layers: int) -> None:
    seen: set[int] = set()
    for i, s in enumerate(steps):
        if s.step in seen:
            raise errors.DuplicateStep(f"steps.{i}: step {s.step} appears twice in this batch")
        seen.add(s.step)
        # lrs[g] is stored as the series "lr/group{g}": a scalar of that name would clash.
        taken = STEP_SERIES_SET.union(lr_series(g) for g in range(len(s.lrs or ())))
        taken = taken.union((STEP_TIME, WINDOW_STEPS))
        clash = taken.intersection(s.scalars)
        if clash:
            raise errors.InvalidInput(
                f"steps.{i}.scalars: {sorted(clash)} are built-in series names; rename them"
            )
        reserved = [k for k in s.scalars if k.endswith(_WINDOW_SUFFIXES) or k == WINDOW_STEPS]
        if reserved:
            raise errors.InvalidInput(
                f"steps.{i}.scalars: {reserved} end in a name reserved for logging-window "
                f"statistics ({', '.join(_WINDOW_SUFFIXES)}); rename them"
            )
        if s.window is not None:
            _check_window(i, s, n_layers)
        check_gns(s, i, n_layers)  # noise scale
        for field in LAYER_FIELDS:
            values = getattr(s, field)
            if values is not None and len(values) != n_layers:
                raise errors.LayerCountMismatch(
                    f"steps.{i}.{field}: {len(values)} values for a run with {n_layers} layers"
                )


def _check_window(i: int, s: StepIn, n_layers: int) -> None:
    w = s.window
    assert w is not None
    if w.first_step > s.step:
        raise errors.InvalidInput(
            f"steps.{i}.window.first_step: {w.first_step} is after the record's step {s.step}"
        )
    for metric, st in w.layers.items():
        for stat in WINDOW_STATS:
            if len(getattr(st, stat)) != n_layers:
                raise errors.LayerCountMismatch(
                    f"steps.{i}.window.layers.{metric}.{stat}: {len(getattr(st, stat))} values "
                    f"for a run with {n_layers} layers"
                )
    bad = [k for k in w.series if k.endswith(_WINDOW_SUFFIXES) or k == WINDOW_STEPS]
    if bad:
        raise errors.InvalidInput(f"steps.{i}.window.series: {bad} are reserved names")
