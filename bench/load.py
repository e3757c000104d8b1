"""Load on a collector with several worker processes on Postgres, and its ingest ceiling.

In one run, against ``gradsentry serve --workers N`` on a freshly created Postgres database:

1. **Sustained load**: ``--runs`` simulated runs (default 200) x ``--layers`` layers (128), each
   producing ``--rate`` steps/s (2) for ``--duration`` seconds (60) and posting what it has
   every ``--flush-interval`` s (1, the client ``Sender``'s default), with the client's wire
   encoder (``client_hooks.wire.encode_batch``, uncompressed JSON like the Sender). The runs
   are coroutines on one asyncio loop (httpx), not torch training. Printed: sustained layer
   values/s, p50/p99/max request latency, and, read back from the database, 0 lost and 0
   duplicated (steps per run = steps acknowledged, per table, and no key twice).
2. **Ingest ceiling over HTTP**: ``--max-senders`` threads post batches of ``--max-batch``
   steps as fast as the collector answers, for ``--max-seconds``. Bodies are prepared before
   the clock starts (per-step JSON fragments joined with fresh step numbers), so the figure is
   the collector's, not the load generator's encoding (both share the same 2 cores).
3. **Raw COPY baseline**: the same rows (``steps`` + ``layer_values``) of a fresh run COPYed
   (psycopg binary COPY, one transaction per ``--copy-batch`` steps) into the same tables.
   Printed: HTTP ceiling / raw COPY (goal 0.12 in issue 7).
4. **MLflow baseline**: a real ``mlflow server`` (SQLite backend store) in a separate venv
   (``bench/.venv-mlflow``, created on demand with ``pip install mlflow``, or
   ``--mlflow-python``), fed the same per-layer values with ``MlflowClient.log_batch`` (1000
   metrics per call, the documented limit) for ``--mlflow-seconds``. Printed: HTTP sustained
   ceiling / MLflow metrics/s (goal 400x).

"values" are per-layer values (``layer_grad_norms``), as in ``bench/storage.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client_hooks.wire import WIRE_VERSION, encode_batch  # noqa: E402

ADMIN = os.environ.get("GRADSENTRY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
MLFLOW_VENV = ROOT / "bench" / ".venv-mlflow"


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# -- collector ---------------------------------------------------------------------------


def start_collector(url: str, workers: int, port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--workers", str(workers), "--port",
           str(port), "--database-url", url, "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"collector exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit("collector did not start")


def step_record(step: int, base: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    v = base * (1.0 + 0.01 * rng.standard_normal(base.size))
    return {"step": step, "wall_time": time.time(), "step_time": 0.5, "loss": 2.0 - step * 1e-5,
            "lr": 3e-4, "grad_norm": float(np.sqrt((v * v).sum())), "batch_size": 32,
            "samples": 32 * (step + 1), "nonfinite": 0, "clip_coef": 1.0,
            "layer_grad_norms": v.tolist()}


# -- 1. sustained load ---------------------------------------------------------------------


async def sustained(base_url: str, args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    layers = [f"model.layers.{i}" for i in range(args.layers)]
    run_ids = [f"{prefix}-s{i}" for i in range(args.runs)]
    limits = httpx.Limits(max_connections=args.runs, max_keepalive_connections=args.runs)
    latencies: list[float] = []
    acked = dict.fromkeys(run_ids, 0)
    failures = 0
    lag_max = 0.0
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        for r in run_ids:
            resp = await client.post("/api/v1/runs", json={"id": r, "project": prefix,
                                                           "layers": layers})
            resp.raise_for_status()
        t0 = time.monotonic() + 1.0
        end = t0 + args.duration

        async def run(i: int, run_id: str) -> None:
            nonlocal failures, lag_max
            rng = np.random.default_rng(i)
            base = rng.lognormal(size=args.layers)
            phase = (i / args.runs) * args.flush_interval  # spread the posts over the interval
            pending: list[dict[str, Any]] = []
            made = 0
            flush_at = t0 + phase + args.flush_interval
            while True:
                now = time.monotonic()
                due = min(int((min(now, end) - t0) * args.rate), int(args.duration * args.rate))
                while made < due:
                    pending.append(step_record(made, base, rng))
                    made += 1
                if pending and (now >= flush_at or now >= end):
                    body, headers = encode_batch(pending, compress=False)
                    start = time.monotonic()
                    try:
                        resp = await client.post(f"/api/v1/runs/{run_id}/steps", content=body,
                                                 headers=headers)
                        ok = resp.status_code == 200
                    except httpx.TransportError:
                        ok = False
                    latencies.append(time.monotonic() - start)
                    if ok:
                        acked[run_id] += len(pending)
                        pending = []
                    else:
                        failures += 1  # kept and re-sent, as the Sender does
                    lag_max = max(lag_max, time.monotonic() - flush_at)
                    flush_at += args.flush_interval
                if now >= end and not pending:
                    return
                await asyncio.sleep(max(0.0, min(flush_at, end) - time.monotonic()) or 0.01)

        async def progress() -> None:
            while time.monotonic() < end:
                await asyncio.sleep(10)
                done = sum(acked.values())
                el = max(1e-9, time.monotonic() - t0)
                say(f"  [{el:5.0f} s] {done} steps acknowledged, "
                    f"{done * args.layers / el:,.0f} values/s, "
                    f"p99 latency so far {pct(latencies, 99) * 1e3:.0f} ms")

        prog = asyncio.create_task(progress())
        await asyncio.gather(*(run(i, r) for i, r in enumerate(run_ids)))
        elapsed = time.monotonic() - t0
        prog.cancel()
    total = sum(acked.values())
    return {"run_ids": run_ids, "acked": acked, "elapsed_s": elapsed, "steps": total,
            "values_per_s": total * args.layers / elapsed, "requests": len(latencies),
            "failures": failures, "p50_ms": pct(latencies, 50) * 1e3,
            "p99_ms": pct(latencies, 99) * 1e3, "max_ms": max(latencies) * 1e3,
            "max_post_delay_s": lag_max,
            "offered_values_per_s": args.runs * args.rate * args.layers}


def verify(db_url: str, acked: dict[str, int]) -> dict[str, int]:
    """Lost and duplicated steps, read back from the database."""
    lost = dup = extra = 0
    with psycopg.connect(db_url) as db:
        for run_id, n in acked.items():
            row = db.execute(
                "SELECT r.last_step, (SELECT count(*) FROM steps s WHERE s.run_pk = r.pk), "
                "(SELECT count(DISTINCT step) FROM steps s WHERE s.run_pk = r.pk), "
                "(SELECT count(*) FROM layer_values v WHERE v.run_pk = r.pk "
                " AND v.metric = 'grad_norm'), "
                "(SELECT count(DISTINCT step) FROM layer_values v WHERE v.run_pk = r.pk "
                " AND v.metric = 'grad_norm') FROM runs r WHERE r.id = %s", (run_id,)
            ).fetchone()
            assert row is not None, run_id
            last, steps, distinct, layer_rows, layer_distinct = row
            lost += max(0, n - distinct) + max(0, n - layer_distinct)
            dup += (steps - distinct) + (layer_rows - layer_distinct)
            extra += max(0, distinct - n)
            if n and last != n - 1:
                lost += 1
    return {"lost": lost, "duplicated": dup, "unacknowledged_but_stored": extra}


# -- 2. HTTP ceiling -----------------------------------------------------------------------


def fragments(n: int, layers: int, seed: int) -> list[bytes]:
    """Per-step JSON (wire format) without the step number: '"wall_time":...}'."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(size=layers)
    out = []
    for k in range(n):
        rec = step_record(k, base, rng)
        del rec["step"]
        out.append(json.dumps(rec, separators=(",", ":")).encode()[1:])
    return out


def ceiling(base_url: str, args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    layers = [f"model.layers.{i}" for i in range(args.layers)]
    frags = fragments(args.max_batch, args.layers, 99)
    head = b'{"wire_version":%d,"steps":[' % WIRE_VERSION
    sent = [0] * args.max_senders
    latencies: list[float] = []
    run_ids = [f"{prefix}-max{i}" for i in range(args.max_senders)]
    for r in run_ids:
        httpx.post(f"{base_url}/api/v1/runs", json={"id": r, "project": prefix,
                                                    "layers": layers}).raise_for_status()
    stop = threading.Event()
    errors: list[str] = []

    def body(first: int) -> bytes:
        parts = [b'{"step":%d,' % (first + k) + f for k, f in enumerate(frags)]
        return head + b",".join(parts) + b"]}"

    def sender(i: int) -> None:
        with httpx.Client(base_url=base_url, timeout=300) as c:
            nxt = body(0)
            while not stop.is_set():
                start = time.monotonic()
                resp = c.post(f"/api/v1/runs/{run_ids[i]}/steps", content=nxt,
                              headers={"Content-Type": "application/json"})
                if resp.status_code != 200:
                    errors.append(resp.text[:200])
                    return
                latencies.append(time.monotonic() - start)
                sent[i] += args.max_batch
                nxt = body(sent[i])  # built while the clock runs: a join of bytes, ~ms

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(args.max_senders)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    while time.monotonic() - t0 < args.max_seconds:
        time.sleep(min(5.0, args.max_seconds))
        el = time.monotonic() - t0
        say(f"  [{el:5.0f} s] {sum(sent)} steps, {sum(sent) * args.layers / el:,.0f} values/s")
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    if errors:
        raise SystemExit(f"ceiling phase failed: {errors[0]}")
    return {"run_ids": run_ids, "acked": dict(zip(run_ids, sent, strict=True)),
            "values_per_s": sum(sent) * args.layers / elapsed, "elapsed_s": elapsed,
            "p50_ms": pct(latencies, 50) * 1e3, "p99_ms": pct(latencies, 99) * 1e3}


# -- 3. raw COPY ---------------------------------------------------------------------------


def raw_copy(db_url: str, base_url: str, args: argparse.Namespace, prefix: str) -> float:
    """values/s of a binary COPY of the same rows (steps + layer_values) into the same tables."""
    run_id = f"{prefix}-copy"
    httpx.post(f"{base_url}/api/v1/runs", json={
        "id": run_id, "project": prefix, "layers": [f"l{i}" for i in range(args.layers)]
    }).raise_for_status()
    rng = np.random.default_rng(5)
    n = args.copy_steps
    base = rng.lognormal(size=args.layers)
    matrix = (base * (1 + 0.01 * rng.standard_normal((n, args.layers)))).astype("<f4")
    blobs = [matrix[k].tobytes() for k in range(n)]  # prepared before the clock, as the
    # collector gets its vectors decoded; the COPY itself and the commits are timed
    with psycopg.connect(db_url) as db:
        (pk,) = db.execute("SELECT pk FROM runs WHERE id = %s", (run_id,)).fetchone() or (0,)
        db.commit()
        t0 = time.perf_counter()
        for lo in range(0, n, args.copy_batch):
            with db.cursor() as cur:
                with cur.copy("COPY steps (run_pk, step, wall_time, loss, lr, grad_norm, "
                              "batch_size, samples, nonfinite, clip_coef) FROM STDIN "
                              "(FORMAT BINARY)") as cp:
                    cp.set_types(["int4", "int8", "float8", "float8", "float8", "float8",
                                  "int8", "int8", "int4", "float8"])
                    for s in range(lo, min(n, lo + args.copy_batch)):
                        cp.write_row((pk, s, 1.7e9 + s, 2.0, 3e-4, 1.0, 32, 32 * s, 0, 1.0))
                with cur.copy("COPY layer_values (run_pk, metric, step, values) FROM STDIN "
                              "(FORMAT BINARY)") as cp:
                    cp.set_types(["int4", "text", "int8", "bytea"])
                    for s in range(lo, min(n, lo + args.copy_batch)):
                        cp.write_row((pk, "grad_norm", s, blobs[s]))
            db.commit()
        elapsed = time.perf_counter() - t0
    return n * args.layers / elapsed


# -- 4. MLflow -----------------------------------------------------------------------------

MLFLOW_DRIVER = r"""
import json, sys, time
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
uri, seconds, layers = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
c = MlflowClient(tracking_uri=uri)
exp = c.create_experiment("gradsentry-load-%d" % time.time_ns())
run = c.create_run(exp).info.run_id
rng = np.random.default_rng(0)
base = rng.lognormal(size=layers)
step, pending, logged, t0 = 0, [], 0, None
while t0 is None or time.monotonic() - t0 < seconds:
    while len(pending) < 1000:
        v = base * (1 + 0.01 * rng.standard_normal(layers))
        ts = int(time.time() * 1000)
        pending += [Metric(f"grad_norm/layer{i}", float(x), ts, step) for i, x in enumerate(v)]
        step += 1
    c.log_batch(run, metrics=pending[:1000])
    pending = pending[1000:]
    if t0 is None:  # the first call (new metric keys, server warm-up) is not timed
        t0 = time.monotonic()
    else:
        logged += 1000
el = time.monotonic() - t0
print(json.dumps({"metrics": logged, "seconds": el, "metrics_per_s": logged / el}))
"""


def mlflow_python(args: argparse.Namespace) -> str:
    if args.mlflow_python:
        return str(args.mlflow_python)
    py = MLFLOW_VENV / "bin" / "python"
    if not py.exists():
        say(f"creating {MLFLOW_VENV} and installing mlflow (once)...")
        subprocess.run([sys.executable, "-m", "venv", str(MLFLOW_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "mlflow"], check=True)
    return str(py)


def mlflow_rate(args: argparse.Namespace) -> dict[str, Any]:
    py = mlflow_python(args)
    exe = str(Path(py).parent / "mlflow")
    port = args.port + 1
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [exe, "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
             "--default-artifact-root", f"{tmp}/artifacts", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            uri = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("mlflow server did not start")
                time.sleep(0.5)
            out = subprocess.run([py, "-c", MLFLOW_DRIVER, uri, str(args.mlflow_seconds),
                                  str(args.layers)], capture_output=True, text=True,
                                 check=True, timeout=args.mlflow_seconds + 300)
            result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
            return result
        finally:
            server.terminate()
            server.wait(timeout=30)


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="sustained phase, seconds")
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--layers", type=int, default=128)
    p.add_argument("--rate", type=float, default=2.0, help="steps/s per run")
    p.add_argument("--flush-interval", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=18431)
    p.add_argument("--max-seconds", type=float, default=20.0)
    p.add_argument("--max-senders", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=500)
    p.add_argument("--copy-steps", type=int, default=20_000)
    p.add_argument("--copy-batch", type=int, default=500)
    p.add_argument("--mlflow-seconds", type=float, default=20.0)
    p.add_argument("--mlflow-python", type=Path, help="python of a venv with mlflow installed")
    p.add_argument("--skip-mlflow", action="store_true")
    args = p.parse_args(argv)

    name = f"gradsentry_load_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    db_url = ADMIN.rpartition("/")[0] + "/" + name
    base_url = f"http://127.0.0.1:{args.port}"
    prefix = f"load-{uuid.uuid4().hex[:6]}"
    say(f"database {name}; collector: serve --workers {args.workers} on {base_url}")
    proc = start_collector(db_url, args.workers, args.port)
    results: dict[str, Any] = {}
    try:
        say(f"\n1. sustained: {args.runs} runs x {args.layers} layers x {args.rate} steps/s "
            f"for {args.duration:.0f} s, posting every {args.flush_interval} s")
        s = asyncio.run(sustained(base_url, args, prefix))
        v = verify(db_url, s["acked"])
        results["sustained"] = {**{k: x for k, x in s.items() if k not in ("run_ids", "acked")},
                                **v}
        say(f"   {s['values_per_s']:,.0f} values/s sustained (offered "
            f"{s['offered_values_per_s']:,.0f}); {s['requests']} requests, "
            f"latency p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, "
            f"max {s['max_ms']:.0f} ms; failed requests {s['failures']}; "
            f"latest post {s['max_post_delay_s']:.2f} s behind schedule")
        say(f"   read back: {v['lost']} lost, {v['duplicated']} duplicated "
            f"({s['steps']} steps acknowledged)")

        say(f"\n2. HTTP ceiling: {args.max_senders} senders x {args.max_batch}-step batches, "
            f"{args.max_seconds:.0f} s")
        c = ceiling(base_url, args, prefix)
        vc = verify(db_url, c["acked"])
        results["ceiling"] = {**{k: x for k, x in c.items() if k not in ("run_ids", "acked")},
                              **vc}
        say(f"   {c['values_per_s']:,.0f} values/s; latency per batch p50 {c['p50_ms']:.0f} ms"
            f", p99 {c['p99_ms']:.0f} ms; read back: {vc['lost']} lost, "
            f"{vc['duplicated']} duplicated")

        say(f"\n3. raw COPY of the same rows ({args.copy_steps} steps)")
        copy = raw_copy(db_url, base_url, args, prefix)
        results["raw_copy_values_per_s"] = copy
        say(f"   {copy:,.0f} values/s")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    if not args.skip_mlflow:
        say(f"\n4. MLflow log_batch, 1000 metrics per call, {args.mlflow_seconds:.0f} s")
        m = mlflow_rate(args)
        results["mlflow"] = m
        say(f"   {m['metrics_per_s']:,.0f} metrics/s")

    ceil = results["ceiling"]["values_per_s"]
    say("\nsummary")
    say(f"  sustained          {results['sustained']['values_per_s']:>12,.0f} values/s, "
        f"p50 {results['sustained']['p50_ms']:.1f} ms, p99 {results['sustained']['p99_ms']:.1f}"
        f" ms, lost {results['sustained']['lost']}, duplicated "
        f"{results['sustained']['duplicated']}")
    say(f"  HTTP ceiling       {ceil:>12,.0f} values/s")
    say(f"  raw COPY           {copy:>12,.0f} values/s -> HTTP / COPY = {ceil / copy:.3f} "
        f"(goal 0.12)")
    say(f"  vs the issue's 8.4M real[] COPY figure: {ceil / 8.4e6:.3f}")
    if "mlflow" in results:
        mf = results["mlflow"]["metrics_per_s"]
        say(f"  MLflow log_batch   {mf:>12,.0f} metrics/s -> HTTP / MLflow = {ceil / mf:,.0f}x "
            f"(goal 400x); sustained-phase / MLflow = "
            f"{results['sustained']['values_per_s'] / mf:,.0f}x")
    say(json.dumps(results, default=float))
    ok = results["sustained"]["lost"] == results["sustained"]["duplicated"] == 0
    ok = ok and results["ceiling"]["lost"] == results["ceiling"]["duplicated"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
