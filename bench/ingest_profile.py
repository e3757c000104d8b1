"""In-process ingest cost: small (sustained-load) and large (ceiling) batches on a fresh
Postgres database, no HTTP. Prints ms per request, CPU ms per request (this process, and
the Postgres backends serving this database, read from /proc where Postgres runs on this
machine), SQL statements per request and the values/s of large batches; ``--profile`` adds
a cProfile of each phase.

    PYTHONPATH=. .venv/bin/python bench/ingest_profile.py [--small 300] [--large 8]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
import uuid
from typing import Any

import numpy as np
import psycopg
from sqlalchemy import event
from sqlalchemy.orm import sessionmaker

from client_hooks.wire import WIRE_VERSION
from server.db import make_engine
from server.migrate import upgrade
from server.schemas import RunCreate
from server.services import ingest, runs
from server.settings import Settings

ADMIN = os.environ.get("GRADSENTRY_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")


def record(step: int, base: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    v = base * (1.0 + 0.01 * rng.standard_normal(base.size))
    return {"step": step, "wall_time": time.time(), "step_time": 0.5, "loss": 2.0 - step * 1e-5,
            "lr": 3e-4, "grad_norm": float(np.sqrt((v * v).sum())), "batch_size": 32,
            "samples": 32 * (step + 1), "nonfinite": 0, "clip_coef": 1.0,
            "layer_grad_norms": v.tolist()}


def body(steps: list[dict[str, Any]]) -> bytes:
    return json.dumps({"wire_version": WIRE_VERSION, "steps": steps}).encode()


def _backend_cpu(admin: psycopg.Connection[Any], name: str) -> float | None:
    """CPU seconds (user + system) of the Postgres backends connected to database ``name``;
    None where their /proc entries cannot be read (Postgres on another machine)."""
    pids = [r[0] for r in admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)).fetchall()]
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    except OSError:
        return None
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=300, help="2-step requests, over 20 runs")
    ap.add_argument("--large", type=int, default=8, help="1000-step requests, one run")
    ap.add_argument("--layers", type=int, default=128)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sort", default="cumulative", help="cProfile order: cumulative, tottime")
    args = ap.parse_args()
    name = f"ingest_profile_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    try:
        upgrade(url)
        engine = make_engine(url)
        statements = [0]

        @event.listens_for(engine, "before_cursor_execute")
        def _count(*_: Any) -> None:
            statements[0] += 1

        factory = sessionmaker(engine)
        settings = Settings(database_url=url)
        layers = [f"l{i}" for i in range(args.layers)]
        rng = np.random.default_rng(0)
        base = np.exp(rng.standard_normal(args.layers))

        def make_run(run_id: str) -> None:
            with factory() as s:
                runs.create_or_resume(s, RunCreate(id=run_id, project="p", layers=layers),
                                      settings)

        def post(run_id: str, data: bytes) -> None:
            batch = ingest.decode_body(data, "application/json", None, 1 << 30)
            with factory() as s:
                ingest.ingest_steps(s, run_id, batch, settings)

        n_runs = 20
        for i in range(n_runs):
            make_run(f"s{i}")
        small = [body([record(2 * k + j, base, rng) for j in range(2)])
                 for k in range(20 + args.small // n_runs)]
        # warm up (first 30 steps: baselines warming) untimed
        for k in range(20):
            for i in range(n_runs):
                post(f"s{i}", small[k])
        statements[0] = 0
        prof = cProfile.Profile()
        admin = psycopg.connect(ADMIN, autocommit=True)
        pg0 = _backend_cpu(admin, name)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        if args.profile:
            prof.enable()
        count = 0
        for k in range(20, len(small)):
            for i in range(n_runs):
                post(f"s{i}", small[k])
                count += 1
        prof.disable()
        dt = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        pg1 = _backend_cpu(admin, name)
        admin.close()
        pg = "n/a" if pg0 is None or pg1 is None else f"{1000 * (pg1 - pg0) / count:.2f}"
        print(f"small: {count} requests of 2 steps x {args.layers} layers: "
              f"{1000 * dt / count:.2f} ms/request, CPU {1000 * cpu / count:.2f} ms/request "
              f"here + {pg} ms/request in Postgres, {statements[0] / count:.1f} SQL/request")
        if args.profile:
            _show(prof, args.sort)

        make_run("big")
        large = [body([record(1000 * k + j, base, rng) for j in range(1000)])
                 for k in range(args.large + 1)]
        post("big", large[0])
        prof = cProfile.Profile()
        t_decode = t_total = 0.0
        if args.profile:
            prof.enable()
        for data in large[1:]:
            t0 = time.perf_counter()
            batch = ingest.decode_body(data, "application/json", None, 1 << 30)
            t1 = time.perf_counter()
            with factory() as s:
                ingest.ingest_steps(s, "big", batch, settings)
            t_decode += t1 - t0
            t_total += time.perf_counter() - t0
        prof.disable()
        values = args.large * 1000 * args.layers
        print(f"large: {args.large} requests of 1000 steps x {args.layers} layers: "
              f"{1000 * t_total / args.large:.1f} ms/request (decode "
              f"{1000 * t_decode / args.large:.1f}), {values / t_total / 1e6:.3f}M values/s")
        if args.profile:
            _show(prof, args.sort)
        engine.dispose()
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"load average: {os.getloadavg()[0]:.1f}")


def _show(prof: cProfile.Profile, sort: str) -> None:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(sort).print_stats(45)
    print(out.getvalue())


if __name__ == "__main__":
    main()
