"""``gradsentry serve --workers 2`` on one Postgres behaves as one collector.

Many clients at once create the same runs and post interleaved, overlapping and retried
batches to them; afterwards every step is stored exactly once with the values sent, every
rollup block equals a brute-force computation from the stored rows, and each run's
``last_step`` and status are right.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client_hooks.wire import encode_batch
from server.migrate import upgrade
from server.models import STEP_SERIES
from server.models_rollups import ROLLUP_LEVELS
from server.settings import Settings
from tests.conftest import free_port, fresh_pg_database, repo_root, spawn_collector

LAYERS = [f"block{i}.weight" for i in range(12)]
RUNS = 6
STEPS = 400


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_pg_database("gradsentry_workers") as url:
        upgrade(Settings(database_url=url).database_url)
        yield url


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


@pytest.fixture
def collector(pg_url: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = spawn_collector(pg_url, port, "--workers", "2", "--no-migrate")
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_workers_refused_on_sqlite(tmp_path: Any) -> None:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--workers", "2",
           "--database-url", f"sqlite:///{tmp_path}/x.db"]
    done = subprocess.run(cmd, cwd=repo_root(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--workers > 1 needs Postgres" in done.stderr


def _step(run: int, step: int) -> dict[str, Any]:
    """Step ``step`` of run ``run``: the same record whenever it is (re)sent."""
    rng = np.random.default_rng(run * 1_000_003 + step)
    layers = rng.lognormal(size=len(LAYERS)).astype(np.float32)
    if step % 37 == 5:
        layers[step % len(LAYERS)] = [np.nan, np.inf, -np.inf][step % 3]
    rec: dict[str, Any] = {"step": step, "grad_norm": float(np.sqrt(np.nansum(layers**2))),
                           "layer_grad_norms": [float(x) for x in layers],
                           "lr": 1e-3 * (1 + step % 3)}
    if step % 5:
        rec["loss"] = float(rng.normal(2.0, 0.1)) if step % 53 else float("nan")
    if step % 7 == 0:
        rec["scalars"] = {"attn_logit_max": float(step)}
    return rec


def _batches(run: int, first: int, rng: random.Random) -> list[list[int]]:
    """Step lists covering [first, first + STEPS): interleaved, overlapping and retried."""
    steps = list(range(first, first + STEPS))
    out, i = [], 0
    while i < len(steps):
        n = rng.randint(1, 40)
        out.append(steps[i : i + n])
        i += n
    extra = [out[rng.randrange(len(out))] for _ in range(len(out) // 3)]  # retries
    for _ in range(len(out) // 4):  # overlaps across batch boundaries
        a = rng.randrange(len(steps) - 30)
        extra.append(steps[a : a + rng.randint(2, 30)])
    odd = steps[::2]  # a sparse batch interleaving with the others
    extra.append(odd[: len(odd) // 2])
    return out + extra


def _post(client: httpx.Client, run_id: str, run: int, steps: list[int]) -> int:
    body, headers = encode_batch([_step(run, s) for s in steps], compress=bool(steps[0] % 2))
    return client.post(f"/api/v1/runs/{run_id}/steps", content=body, headers=headers).status_code


def _brute_rollups(
    rows: list[tuple[int, Any]], width: int
) -> dict[tuple[int, int], tuple[int, int, list[float], list[float], list[float]]]:
    """(level, block) -> (first, last, min, max, nonfinite) from (step, values) rows."""
    out = {}
    for level in ROLLUP_LEVELS:
        blocks: dict[int, list[tuple[int, np.ndarray]]] = {}
        for step, values in rows:
            blocks.setdefault(step // level, []).append((step, values))
        for b, items in blocks.items():
            m = np.stack([v for _, v in items]).reshape(len(items), width).astype(np.float64)
            with warnings.catch_warnings():  # an all-NaN layer's min is NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                vmin, vmax = np.nanmin(m, axis=0), np.nanmax(m, axis=0)
            out[level, b] = (min(s for s, _ in items), max(s for s, _ in items),
                             vmin.astype(np.float32).tolist(), vmax.astype(np.float32).tolist(),
                             (~np.isfinite(m)).sum(axis=0).astype(np.float32).tolist())
    return out


def _same(a: Any, b: Any) -> bool:
    return bool(np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               equal_nan=True))


def _check_rollups(db: psycopg.Connection[Any], run_pk: int) -> None:
    f4 = np.dtype("<f4")
    for (metric,) in db.execute(
        "SELECT DISTINCT metric FROM layer_values WHERE run_pk = %s", (run_pk,)
    ).fetchall():
        rows = [(s, np.frombuffer(v, f4)) for s, v in db.execute(
            "SELECT step, values FROM layer_values WHERE run_pk = %s AND metric = %s",
            (run_pk, metric)).fetchall()]
        want = _brute_rollups(rows, len(LAYERS))
        got = {(lv, b): (f, la, np.frombuffer(lo, f4), np.frombuffer(hi, f4), np.frombuffer(n, f4))
               for lv, b, f, la, lo, hi, n in db.execute(
                   "SELECT level, block, step_first, step_last, vmin, vmax, nonfinite "
                   "FROM layer_rollups WHERE run_pk = %s AND metric = %s", (run_pk, metric))}
        assert set(got) == set(want), (metric, set(got) ^ set(want))
        for key, w in want.items():
            g = got[key]
            assert g[:2] == w[:2] and all(_same(x, y) for x, y in zip(g[2:], w[2:], strict=True)), (
                metric, key)
    for name in STEP_SERIES:
        rows = [(s, np.array([v])) for s, v in db.execute(
            f"SELECT step, {name} FROM steps WHERE run_pk = %s AND {name} IS NOT NULL",
            (run_pk,)).fetchall()]
        want = _brute_rollups([(s, v.astype(np.float64)) for s, v in rows], 1)
        got = {(lv, b): (f, la, [lo], [hi], [n]) for lv, b, f, la, lo, hi, n in db.execute(
            "SELECT level, block, step_first, step_last, vmin, vmax, nonfinite "
            "FROM series_rollups WHERE run_pk = %s AND name = %s", (run_pk, name))}
        assert set(got) == set(want), (name, set(got) ^ set(want))
        for key, w in want.items():
            g = got[key]
            # series rollups keep float64: compare at float64 from the stored values
            assert g[:2] == w[:2], (name, key)
            assert _same(g[4], w[4]), (name, key)
            vals = [v for s, v in rows if s // key[0] == key[1]]
            numbers = [float(v[0]) for v in vals if not np.isnan(v[0])]
            if not numbers:
                numbers = [float("nan")]
            assert _same(g[2], [min(numbers)]) and _same(g[3], [max(numbers)]), (name, key)


def test_two_workers_behave_as_one(
    pg_url: str, collector: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, proc = collector
    assert len(_children(proc.pid)) >= 2, "serve --workers 2 should run 2 worker processes"
    project = f"w-{uuid.uuid4().hex[:6]}"
    local, opened = threading.local(), []

    def client() -> httpx.Client:  # one per thread, closed at the end
        if not hasattr(local, "c"):
            local.c = httpx.Client(base_url=url, timeout=120)
            opened.append(local.c)
        return local.c  # type: ignore[no-any-return]

    try:
        _exercise(url, pg_url, project, client)
    finally:
        for c in opened:
            c.close()


def _exercise(url: str, pg_url: str, project: str, client: Any) -> None:
    run_ids = [f"{project}-r{i}" for i in range(RUNS)]
    firsts = [i * 1500 for i in range(RUNS)]  # later runs cross 1024- and 4096-step blocks

    # The same runs created by many clients at once: each created exactly once.
    spec = [{"id": r, "project": project, "layers": LAYERS} for r in run_ids]
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda s: client().post("/api/v1/runs", json=s).status_code,
                              spec * 4))
    per_run = Counter((s["id"], c) for s, c in zip(spec * 4, codes, strict=True))
    for r in run_ids:
        assert (per_run[r, 201], per_run[r, 200]) == (1, 3), per_run

    rng = random.Random(11)
    jobs = [(i, steps) for i in range(RUNS) for steps in _batches(i, firsts[i], rng)]
    rng.shuffle(jobs)
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda j: _post(client(), run_ids[j[0]], j[0], j[1]), jobs))
    assert Counter(codes) == Counter({200: len(jobs)})
    for r in run_ids[:2]:
        assert client().post(f"/api/v1/runs/{r}/finish").status_code == 200

    with psycopg.connect(pg_url) as db:
        got_runs = db.execute(
            "SELECT r.id, r.pk, r.last_step, r.status FROM runs r JOIN projects p "
            "ON p.id = r.project_id WHERE p.name = %s", (project,)).fetchall()
        assert sorted(r[0] for r in got_runs) == run_ids
        assert db.execute("SELECT count(*) FROM projects WHERE name = %s",
                          (project,)).fetchone() == (1,)
        for run_id, pk, last_step, status in got_runs:
            i = run_ids.index(run_id)
            want = list(range(firsts[i], firsts[i] + STEPS))
            steps = [s for (s,) in db.execute(
                "SELECT step FROM steps WHERE run_pk = %s ORDER BY step", (pk,))]
            assert steps == want, run_id
            layer = db.execute(
                "SELECT step, values FROM layer_values WHERE run_pk = %s AND metric = "
                "'grad_norm' ORDER BY step", (pk,)).fetchall()
            assert [s for s, _ in layer] == want
            for s, v in layer[::17]:
                sent = np.asarray(_step(i, s)["layer_grad_norms"], np.float32)
                assert _same(np.frombuffer(v, "<f4"), sent), (run_id, s)
            scalars = db.execute(
                "SELECT count(*), count(DISTINCT step) FROM scalars WHERE run_pk = %s "
                "AND name = 'attn_logit_max'", (pk,)).fetchone()
            n7 = sum(1 for s in want if s % 7 == 0)
            assert scalars == (n7, n7)
            assert last_step == want[-1]
            assert status == ("finished" if i < 2 else "running"), run_id
            _check_rollups(db, pk)


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with httpx.Client(base_url=url, timeout=30) as c:  # a new connection: any worker answers
        text = c.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_are_summed_over_the_workers(pg_url: str, tmp_path: Any) -> None:
    """Under --workers every scrape, whichever worker answers it, counts the requests of all
    workers (prometheus-client's multi-process mode; they used to be per process)."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")  # an earlier run's: removed
    port = free_port()
    proc = spawn_collector(pg_url, port, "--workers", "2", "--no-migrate",
                           env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    url = f"http://127.0.0.1:{port}"
    try:
        run_id = f"m-{uuid.uuid4().hex[:8]}"
        httpx.post(f"{url}/api/v1/runs", json={"id": run_id, "layers": LAYERS},
                   timeout=60).raise_for_status()

        def post(i: int) -> int:
            with httpx.Client(base_url=url, timeout=120) as c:  # one connection per batch
                return _post(c, run_id, 0, list(range(i * 5, i * 5 + 5)))

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(post, range(40))) == {200}
        pids = {p.stem.rsplit("_", 1)[1] for p in metrics_dir.glob("counter_*.db")}
        assert "999999" not in pids and len(pids) >= 2, pids  # both workers took batches
        route = "/api/v1/runs/{run_id}/steps"
        for _ in range(6):
            got = _scrape(url)
            assert got["gradsentry_steps_ingested_total", ()] == 200
            assert got["gradsentry_batches_ingested_total", ()] == 40
            key = ("gradsentry_http_request_duration_seconds_count",
                   (("method", "POST"), ("route", route), ("status", "200")))
            assert got[key] == 40, sorted(k for k in got if "duration_seconds_count" in k[0])
            assert got["gradsentry_database_up", ()] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
