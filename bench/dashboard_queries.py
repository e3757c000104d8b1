"""Run-page read latency for a large run on PostgreSQL: rollups vs reading every row.

Workload: one run of ``--steps`` steps x ``--layers`` layers (default 100,000 x 256), loaded
with COPY into a fresh database migrated to head: the ``steps`` table (loss, grad norm, lr,
non-finite count), ``layer_values`` rows of ``grad_norm`` every step and ``update_ratio``
every 10 steps (as ``param_every=10`` sends), lognormal values with a few NaN/Inf, and ONE
spike (1e6) in one layer at one step. The rollups are then built with
``server.services.rollups.rebuild``/``rebuild_series`` (timed and reported; on a live
collector they are written on ingest).

Measured, interleaved, in the same process:

* ``new``: ``server.services.dashboard.run_page`` -- everything the run page's data route
  reads (4 series at 600 points, grad-norm and update-ratio matrices at 400 points) --
  plus building the figures and the JSON body (``/runs/{id}/figures.json`` minus HTTP),
  reading ``layer_rollups`` and ``series_rollups``.
* ``baseline``: the same data read the way the collector read it before rollups: every row
  in range fetched and bucketed in numpy (``downsample``), for the same series and matrices.

Both results are checked: the spike is the maximum of its bucket in both, and the bucket
counts stay within the limits (the grids differ: rollup buckets are aligned to blocks;
tests/server/test_rollups.py checks every bucket against brute force). Prints p50/p95 of
each and the ratio baseline/new. Usage::

    python bench/dashboard_queries.py [--steps 100000] [--layers 256] [--reps 30]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import psycopg
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from client_hooks.wire import dumps
from dashboards.views import run_figures
from server.api.pages import HEATMAP_POINTS, SERIES_POINTS, FigureJSONResponse
from server.app import create_app
from server.db import make_engine
from server.migrate import upgrade
from server.models import LayerValues, Run, Step
from server.services import dashboard, rollups, series
from server.services.downsample import bucket_size, downsample
from server.settings import Settings

ADMIN = os.environ.get("GRADSENTRY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def load(url: str, steps: int, layers: int, spike: tuple[int, int]) -> str:
    """COPY a synthetic run into the database; returns its id."""
    rng = np.random.default_rng(0)
    run_id = "bench-large"
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO projects (name, created_at) VALUES ('bench', now())")
        names = [f"blocks.{i // 8}.l{i % 8}" for i in range(layers)]
        conn.execute(
            "INSERT INTO runs (id, project_id, name, config, tags, status, batch_size,"
            " world_size, layers, semantics, created_at, updated_at, last_step)"
            " VALUES (%s, (SELECT id FROM projects), %s, '{}', '[]', 'running', 64, 1, %s,"
            " '{}', now(), now(), %s)",
            (run_id, run_id, dumps(names).decode(), steps - 1),
        )
        pk = conn.execute("SELECT pk FROM runs").fetchone()[0]  # type: ignore[index]
        grad = rng.lognormal(-2, 1, size=(steps, layers)).astype("<f4")
        grad[rng.integers(steps, size=20), rng.integers(layers, size=20)] = np.nan
        grad[rng.integers(steps, size=5), rng.integers(layers, size=5)] = np.inf
        grad[spike] = 1e6
        total = np.sqrt(np.nansum(np.where(np.isfinite(grad), grad, 0) ** 2, axis=1))
        bad = (~np.isfinite(grad)).sum(axis=1)
        with conn.cursor() as cur:
            with cur.copy(
                "COPY steps (run_pk, step, loss, lr, grad_norm, nonfinite) FROM STDIN"
            ) as copy:
                for i in range(steps):
                    copy.write_row(
                        (pk, i, 3.0 / math.sqrt(1 + i), 1e-3, float(total[i]), int(bad[i]))
                    )
            with cur.copy("COPY layer_values (run_pk, metric, step, values) FROM STDIN") as copy:
                for i in range(steps):
                    copy.write_row((pk, "grad_norm", i, grad[i].tobytes()))
                ratio = rng.lognormal(-7, 1, size=(steps // 10 + 1, layers)).astype("<f4")
                for k, i in enumerate(range(0, steps, 10)):
                    copy.write_row((pk, "update_ratio", i, ratio[k].tobytes()))
        conn.execute("ANALYZE")
    return run_id


def baseline(session: Session, run_id: str, points: int, heat: int) -> dict[str, Any]:
    """The pre-rollup read: every row in range fetched, then bucketed in numpy."""
    run = session.scalar(select(Run).where(Run.id == run_id))
    assert run is not None
    out: dict[str, Any] = {}
    for name in dashboard.RUN_SERIES:
        col = getattr(Step, name)
        rows = session.execute(
            select(Step.step, col).where(Step.run_pk == run.pk, col.is_not(None))
        ).all()
        steps = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        values = np.fromiter((r[1] for r in rows), np.float64, len(rows))
        out[name] = downsample(
            steps, values, int(steps[0]), bucket_size(int(steps[0]), int(steps[-1]), points)
        )
    for metric in ("grad_norm", "update_ratio"):
        rows = session.execute(
            select(LayerValues.step, LayerValues.values)
            .where(LayerValues.run_pk == run.pk, LayerValues.metric == metric)
            .order_by(LayerValues.step)
        ).all()
        steps = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        matrix = np.stack([r[1] for r in rows]).astype(np.float64)
        out[metric] = downsample(
            steps, matrix, int(steps[0]), bucket_size(int(steps[0]), int(steps[-1]), heat)
        )
    return out


def new(session: Session, run_id: str, points: int, heat: int) -> bytes:
    d = dashboard.run_page(session, run_id, points, heat)
    figures = run_figures(d.series, d.lr_groups, d.grad, d.update_ratio)
    body = FigureJSONResponse({"figures": figures}).body
    new.last = d  # type: ignore[attr-defined]
    return body


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=256)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--baseline-reps", type=int, default=5)
    args = ap.parse_args()
    name = f"gradsentry_bench_{uuid.uuid4().hex[:8]}"
    base, _, _ = ADMIN.rpartition("/")
    url = f"{base}/{name}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        settings = Settings(database_url=url)
        upgrade(settings.database_url)
        spike = (args.steps * 7 // 10 + 3, args.layers // 3)
        t0 = time.perf_counter()
        run_id = load(url, args.steps, args.layers, spike)
        print(
            f"loaded {args.steps} steps x {args.layers} layers in {time.perf_counter() - t0:.1f} s"
        )
        engine = make_engine(settings.database_url)
        with Session(engine) as s:
            pk = s.scalar(select(Run.pk).where(Run.id == run_id))
            assert pk is not None
            t0 = time.perf_counter()
            for metric in ("grad_norm", "update_ratio"):
                rollups.rebuild(s, pk, metric)
            rollups.rebuild_series(s, pk)
            s.commit()
            print(
                f"rollups rebuilt in {time.perf_counter() - t0:.1f} s "
                f"(written on ingest on a live collector)"
            )
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
            size = conn.execute(
                "SELECT pg_total_relation_size('layer_rollups'),"
                " pg_total_relation_size('layer_values')"
            ).fetchone()
            assert size is not None
            print(
                f"layer_rollups {size[0] / 2**20:.0f} MiB vs layer_values "
                f"{size[1] / 2**20:.0f} MiB ({size[0] / size[1]:.2f}x)"
            )

        points, heat = SERIES_POINTS, HEATMAP_POINTS
        t_new: list[float] = []
        t_base: list[float] = []
        with Session(engine) as s:
            new(s, run_id, points, heat)  # warm-up, and checks
            d = new.last  # type: ignore[attr-defined]
            b = baseline(s, run_id, points, heat)
            row = d.grad.max[spike[1]]
            k = next(i for i, e in enumerate(d.grad.step_end) if e >= spike[0])
            assert row[k] == 1e6 and d.grad.step[k] <= spike[0], "spike lost (rollups)"
            assert float(np.nanmax(b["grad_norm"].max[:, spike[1]])) == 1e6, "spike lost"
            assert len(d.grad.step) <= heat and len(d.series["grad_norm"].step) <= points
            print(
                f"buckets: heatmap {len(d.grad.step)} x {len(d.grad.layers)} "
                f"(bucket {d.grad.bucket_size} steps; baseline {b['grad_norm'].size}), "
                f"series {len(d.series['loss'].step)}; spike kept in both"
            )
            s.rollback()
            for i in range(args.reps):
                t_new.append(timed(lambda: new(s, run_id, points, heat)))
                s.rollback()
                if (
                    i % max(1, args.reps // args.baseline_reps) == 0
                    and len(t_base) < args.baseline_reps
                ):
                    t_base.append(timed(lambda: baseline(s, run_id, points, heat)))
                    s.rollback()
            # The run page's series alone, through the API's read path.
            t_series = [
                timed(
                    lambda: series.read_series(
                        s, run_id, list(dashboard.RUN_SERIES), None, None, points
                    )
                )
                for _ in range(10)
            ]
        engine.dispose()
        # The same through HTTP: the page's data route, in-process (Starlette's TestClient).
        with TestClient(create_app(settings)) as client:
            url_json = f"/runs/{run_id}/figures.json"
            assert client.get(url_json).status_code == 200
            t_http = [
                timed(lambda: client.get(url_json).raise_for_status()) for _ in range(args.reps)
            ]
        print(
            f"GET /runs/{{id}}/figures.json over HTTP (in-process): "
            f"p50 {statistics.median(t_http) * 1e3:.0f} ms, p95 {p95(t_http) * 1e3:.0f} ms"
        )
        print(
            f"run-page data, new (rollups; figures and JSON included): "
            f"p50 {statistics.median(t_new) * 1e3:.0f} ms, p95 {p95(t_new) * 1e3:.0f} ms "
            f"over {len(t_new)}"
        )
        print(
            f"run-page data, baseline (read every row, bucket in numpy, no figures): "
            f"p50 {statistics.median(t_base) * 1e3:.0f} ms, p95 {p95(t_base) * 1e3:.0f} ms "
            f"over {len(t_base)}"
        )
        print(f"  of which the 4 series (series_rollups): p95 {p95(t_series) * 1e3:.0f} ms")
        print(
            f"ratio baseline/new: p50 {statistics.median(t_base) / statistics.median(t_new):.1f}x,"
            f" p95 {p95(t_base) / p95(t_new):.1f}x"
        )
        worst = max(p95(t_new), p95(t_http))
        print(f"target p95 <= 300 ms: {'met' if worst <= 0.3 else 'MISSED'}")
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
