"""Shared fixtures: real databases (SQLite file and PostgreSQL) and live collectors.

PostgreSQL is required: set GRADSENTRY_TEST_PG (default
postgresql://postgres@127.0.0.1:5432/test). Each test session works in a fresh
database of its own, created from that server and dropped at the end.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn

from server.app import create_app
from server.migrate import upgrade
from server.settings import Settings

PG_ADMIN_URL = os.environ.get(
    "GRADSENTRY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"
)
BACKENDS = ("sqlite", "postgres")


def _pg_url(dbname: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{dbname}"


@pytest.fixture(scope="session", autouse=True)
def spool_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Client spools (also of subprocesses) go to a temporary directory, not ~/.cache."""
    path = tmp_path_factory.mktemp("spool")
    old = os.environ.get("GRADSENTRY_SPOOL_DIR")
    os.environ["GRADSENTRY_SPOOL_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("GRADSENTRY_SPOOL_DIR", None)
    else:
        os.environ["GRADSENTRY_SPOOL_DIR"] = old


@contextlib.contextmanager
def fresh_pg_database(prefix: str = "gradsentry_test") -> Iterator[str]:
    """Create a PostgreSQL database of its own, yield its URL, drop it afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:  # a missing Postgres is a failure, not a skip
        pytest.fail(f"PostgreSQL is required for the tests ({PG_ADMIN_URL}): {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _pg_url(name)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (dropped afterwards)."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(scope="session")
def database_urls(pg_database: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    sqlite_path = tmp_path_factory.mktemp("sqlite") / "gradsentry.db"
    return {"sqlite": f"sqlite:///{sqlite_path}", "postgres": pg_database}


@dataclass
class Collector:
    """A collector served by uvicorn on a real socket, in a thread of the test process."""

    url: str
    settings: Settings
    backend: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_in_thread(settings: Settings) -> tuple[str, uvicorn.Server, threading.Thread]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test collector did not start")
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


TEST_LIMITS = {"max_steps_per_batch": 20_000, "max_body_bytes": 32 * 1024 * 1024}


@pytest.fixture(scope="session", params=BACKENDS)
def collector(request: pytest.FixtureRequest, database_urls: dict[str, str]) -> Iterator[Collector]:
    """A live collector on each backend, schema migrated once per session."""
    backend: str = request.param
    settings = Settings(database_url=database_urls[backend], **TEST_LIMITS)
    upgrade(settings.database_url)
    url, server, thread = serve_in_thread(settings)
    yield Collector(url=url, settings=settings, backend=backend)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def api(collector: Collector) -> Iterator[httpx.Client]:
    with collector.client() as client:
        yield client


def new_run_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def spawn_collector(
    database_url: str,
    port: int,
    *extra: str,
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    stdout: int = subprocess.DEVNULL,
    timeout: float = 90.0,
) -> subprocess.Popen[bytes]:
    """``gradsentry serve`` in a process of its own, returned once it answers /healthz on
    loopback (a loaded 2-core machine can take tens of seconds). ``stdout=subprocess.PIPE``
    keeps its output (stderr included) for a short-lived collector; it is shown if the
    process exits before answering."""
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", host, "--port", str(port),
           "--database-url", database_url, "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=repo_root(), env={**os.environ, **(env or {})},
                            stdout=stdout, stderr=subprocess.STDOUT if stdout == subprocess.PIPE
                            else None)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"collector exited with code {proc.returncode}: {out}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=10)
            raise RuntimeError(f"collector did not answer within {timeout:.0f} s")
        time.sleep(0.1)
