"""A private PostgreSQL cluster for tests that stop and restart the database server.

The shared server (GRADSENTRY_TEST_PG) is never restarted: other tests and processes use it.
This one lives in a temporary directory, listens on a free port of 127.0.0.1 with trust
authentication, and is removed afterwards whatever happens. As root, the server runs as the
``postgres`` OS user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from tests.conftest import free_port


def pg_bin_dir() -> Path:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/N/bin), else
    wherever ``pg_ctl`` is on PATH."""
    root = Path("/usr/lib/postgresql")
    versions = sorted((p for p in root.glob("*/bin") if (p / "initdb").exists()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if versions:
        return versions[-1]
    found = shutil.which("pg_ctl")
    if found is None:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are required for this test")
    return Path(found).parent


class PrivateCluster:
    def __init__(self, base: Path, port: int) -> None:
        self.bin = pg_bin_dir()
        self.data = base / "data"
        self.sockets = base / "sockets"
        self.log = base / "server.log"
        self.port = port
        self.as_postgres = os.geteuid() == 0

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def _check(self, proc: subprocess.CompletedProcess[str], what: str) -> None:
        if proc.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            pytest.fail(f"private PostgreSQL: {what} failed ({proc.returncode}):\n"
                        f"{proc.stdout}\n{proc.stderr}\n{log[-3000:]}")

    def init(self) -> None:
        self._check(self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                              "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"), "initdb")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c shared_buffers=32MB -c max_connections=40")
        self._check(self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log),
                              "-o", options, "-w", "-t", "60", "start"), "start")

    def stop(self, mode: str = "fast") -> None:
        """``immediate``: every server process quits at once, as in a crash; the next start
        recovers from the write-ahead log."""
        self._check(self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"),
                    f"stop -m {mode}")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status").returncode == 0

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextmanager
def private_cluster() -> Iterator[PrivateCluster]:
    """A started private cluster; stopped and deleted on the way out, even after a failure."""
    base = Path(tempfile.mkdtemp(prefix="gradsentry-pg-"))
    try:
        (base / "sockets").mkdir()
        if os.geteuid() == 0:
            try:
                pg = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("as root, the private PostgreSQL runs as the 'postgres' OS user, "
                            "which does not exist here")
            for path in (base, base / "sockets"):
                os.chown(path, pg.pw_uid, pg.pw_gid)
        cluster = PrivateCluster(base, free_port())
        cluster.init()
        cluster.start()
        try:
            yield cluster
        finally:
            if cluster.running():
                cluster.stop("immediate")
    finally:
        shutil.rmtree(base, ignore_errors=True)
