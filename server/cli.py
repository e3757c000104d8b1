"""``gradsentry`` command line: serve | migrate | demo | sync | token."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from server.auth.mode import is_loopback, resolve
from server.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradsentry", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the collector (embedded SQLite by default)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--database-url", help="default: $GRADSENTRY_DATABASE_URL or SQLite")
    serve.add_argument("--no-migrate", action="store_true", help="do not upgrade the schema")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--workers", type=int, default=1,
                       help="collector processes sharing the port (Postgres only; default 1)")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="serve without API tokens even on a non-loopback host "
                       "(same as GRADSENTRY_AUTH=off)")

    migrate = sub.add_parser("migrate", help="upgrade (or downgrade) the database schema")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.add_argument("--downgrade", action="store_true", help="downgrade to REVISION")
    migrate.add_argument("--database-url")

    demo = sub.add_parser("demo", help="train a small model streaming into a collector")
    demo.add_argument("--server", default="http://127.0.0.1:8000")
    demo.add_argument("--database-url", help="for the embedded collector, if one is started")
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--project", default="demo")
    keep = demo.add_mutually_exclusive_group()
    keep.add_argument("--keep-serving", dest="keep", action="store_true", default=None,
                      help="keep the embedded collector running after training (default on a tty)")
    keep.add_argument("--exit", dest="keep", action="store_false",
                      help="stop the embedded collector when training ends")

    sync = sub.add_parser("sync", help="upload a spool or an offline run directory")
    sync.add_argument("directory", help="a run's spool directory, or a spool root of several")
    sync.add_argument("--server", default=os.environ.get("GRADSENTRY_SERVER",
                                                         "http://127.0.0.1:8000"),
                      help="collector URL (default: $GRADSENTRY_SERVER or %(default)s)")
    sync.add_argument("--token", default=os.environ.get("GRADSENTRY_TOKEN"),
                      help="bearer token (default: $GRADSENTRY_TOKEN)")
    sync.add_argument("--attempts", type=int, default=5,
                      help="tries per request when the collector is unreachable or busy")

    from server.auth import cli as token_cli

    token_cli.add_parser(sub)

    args = parser.parse_args(argv)
    handler = {"serve": _serve, "migrate": _migrate, "demo": _demo, "sync": _sync,
               "token": token_cli.run}[args.command]
    return handler(args)


def _settings(database_url: str | None) -> Settings:
    return Settings(database_url=database_url) if database_url else Settings()


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.migrate import upgrade

    settings = _settings(args.database_url)
    if args.workers < 1:
        print("gradsentry serve: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and not settings.database_url.startswith("postgresql"):
        print("gradsentry serve: --workers > 1 needs Postgres (--database-url "
              "postgresql://...): with SQLite the worker processes would contend for one "
              "writer lock and the alert outbox cannot be claimed safely by several processes",
              file=sys.stderr)
        return 2
    if not args.no_migrate:
        upgrade(settings.database_url)
    mode = "off" if args.insecure_no_auth else resolve(settings.auth, args.host)
    banner = auth_banner(mode, args.host, settings)
    if banner is None:
        return 2
    settings = settings.model_copy(update={"auth": mode})
    os.environ["GRADSENTRY_AUTH"] = mode  # worker processes read their settings from the env
    print(f"gradsentry collector on http://{args.host}:{args.port} "
          f"(database: {_redact(settings.database_url)}"
          f"{f', {args.workers} worker processes' if args.workers > 1 else ''})\n{banner}",
          flush=True)
    if args.workers == 1:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
        return 0
    # Worker processes build their own app from the environment (server.app.app_from_env):
    # settings given on the command line travel there as GRADSENTRY_* variables.
    os.environ["GRADSENTRY_DATABASE_URL"] = settings.database_url
    with _multiprocess_metrics():
        uvicorn.run("server.app:app_from_env", factory=True, workers=args.workers,
                    host=args.host, port=args.port, log_level=args.log_level)
    return 0


@contextlib.contextmanager
def _multiprocess_metrics() -> Iterator[None]:
    """``/metrics`` summed over the worker processes: prometheus-client's multi-process mode,
    whose directory must be set before the workers import it and be empty at start. Ours is
    a fresh temporary directory, removed at exit; a ``$PROMETHEUS_MULTIPROC_DIR`` the user
    set is used instead, emptied of an earlier run's files first."""
    import glob
    import shutil
    import tempfile

    from server.metrics import MULTIPROC_ENV

    given = os.environ.get(MULTIPROC_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for stale in glob.glob(os.path.join(given, "*.db")):
            os.unlink(stale)
        yield
        return
    path = tempfile.mkdtemp(prefix="gradsentry-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


def auth_banner(mode: str, host: str, settings: Settings) -> str | None:
    """The line ``serve`` prints about access control, or None (after saying why on stderr)
    when tokens are required and the database holds none: nobody could use the collector."""
    if mode == "off":
        if is_loopback(host):
            return ("auth: open (localhost only): no API tokens needed; a non-loopback --host "
                    "requires them")
        return (f"auth: OFF on {host} (--insecure-no-auth / GRADSENTRY_AUTH=off): anyone who "
                "reaches this port can read and write every project")
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from server.auth.store import active_count
    from server.db import make_engine

    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session:
            active = active_count(session)
    except SQLAlchemyError as exc:
        print(f"gradsentry: cannot read API tokens ({type(exc).__name__}); run "
              "`gradsentry migrate` first", file=sys.stderr)
        return None
    finally:
        engine.dispose()
    if active == 0:
        print(f"gradsentry: refusing to serve on {host}: API tokens are required "
              f"(GRADSENTRY_AUTH={settings.auth}; auto requires them off localhost) and "
              f"{_redact(settings.database_url)} holds none. Create one (printed once; same "
              "--database-url or $GRADSENTRY_DATABASE_URL):\n"
              "  gradsentry token create --all-projects --scope admin\n"
              f"or serve on 127.0.0.1, or pass --insecure-no-auth (GRADSENTRY_AUTH=off) to "
              "run without tokens.", file=sys.stderr)
        return None
    limit = (f"{settings.rate_limit_requests} requests per {settings.rate_limit_window_s} s "
             "per token" if settings.rate_limit_requests else "no rate limit")
    return f"auth: required: API tokens ({active} active); {limit}"


def _migrate(args: argparse.Namespace) -> int:
    from server.migrate import downgrade, upgrade

    settings = _settings(args.database_url)
    if args.downgrade:
        downgrade(settings.database_url, args.revision)
    else:
        upgrade(settings.database_url, args.revision)
    print(f"database {_redact(settings.database_url)} at revision {args.revision}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    # Standard library only (no torch): the client's spool module is shared with the sender.
    from client_hooks.spool import sync

    return sync(args.directory, args.server, token=args.token, attempts=max(1, args.attempts),
                out=lambda line: print(line, flush=True))


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url


def _get_json(url: str, timeout: float = 5.0) -> Any:
    token = os.environ.get("GRADSENTRY_TOKEN")  # as the demo's training process uses
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=timeout) as resp:
        return json.loads(resp.read())


def _healthy(server: str) -> bool:
    try:
        return _get_json(f"{server}/healthz", timeout=2.0).get("status") == "ok"  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return False


def _start_collector(server: str, database_url: str | None) -> subprocess.Popen[bytes]:
    host_port = server.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.partition(":")
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", host, "--port", port or "80",
           "--log-level", "warning"]
    if database_url:
        cmd += ["--database-url", database_url]
    print(f"no collector answers at {server}; starting an embedded one (SQLite)", flush=True)
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the embedded collector exited with code {proc.returncode}")
        if _healthy(server):
            return proc
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"the embedded collector did not answer at {server} within 60 s")


def _demo(args: argparse.Namespace) -> int:
    server = args.server.rstrip("/")
    collector = None if _healthy(server) else _start_collector(server, args.database_url)
    run_id = f"{args.project}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        # Training runs in its own interpreter: the collector side never imports torch.
        code = subprocess.call([
            sys.executable, "-m", "client_hooks.demo", "--server", server,
            "--project", args.project, "--run", run_id, "--steps", str(args.steps),
        ])
        if code != 0:
            print(f"demo training failed with exit code {code}", file=sys.stderr)
            return code
        _print_summary(server, run_id)
        keep = args.keep if args.keep is not None else sys.stdin.isatty()
        if collector is not None and keep:
            print("collector keeps running; press Ctrl+C to stop it", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                collector.wait()
    finally:
        if collector is not None and collector.poll() is None:
            collector.terminate()
            collector.wait(timeout=30)
    return 0


def _print_summary(server: str, run_id: str) -> None:
    """Read the run back through the REST API and say where to look."""
    run = _get_json(f"{server}/api/v1/runs/{run_id}")
    series = _get_json(f"{server}/api/v1/runs/{run_id}/series?names=loss,grad_norm&max_points=1")
    peak = {s["name"]: (s["max"][0] if s["max"] else None) for s in series["series"]}
    print(f"\nrun {run_id}: {run['num_steps']} steps (last step {run['last_step']}), "
          f"{len(run['layers'])} layers")
    print(f"  peak loss {peak['loss']}, peak total grad norm {peak['grad_norm']}")
    print(f"  API:       {server}/api/v1/runs/{run_id}")
    print(f"  dashboard: {server}/runs/{run_id}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
