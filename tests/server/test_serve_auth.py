"""When tokens are required: the mode decision, and `gradsentry serve` on a non-loopback host."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.auth.mode import is_loopback, required_for, resolve
from server.cli import auth_banner
from server.migrate import upgrade
from server.settings import Settings
from tests.conftest import free_port
from tests.server.test_auth import _cli, _spawn_collector, _stop, make_tokens


@pytest.mark.parametrize(("mode", "host", "expected"), [
    ("auto", "127.0.0.1", "off"), ("auto", "localhost", "off"), ("auto", "::1", "off"),
    ("auto", "127.0.0.2", "off"), ("auto", "0.0.0.0", "required"), ("auto", "::", "required"),
    ("auto", "192.168.1.5", "required"), ("auto", "collector.lab", "required"),
    ("required", "127.0.0.1", "required"), ("off", "0.0.0.0", "off"),
])
def test_mode_follows_the_bound_host(mode: str, host: str, expected: str) -> None:
    assert resolve(mode, host) == expected  # type: ignore[arg-type]
    assert is_loopback(host) == (host in {"127.0.0.1", "localhost", "::1", "127.0.0.2"})


@pytest.mark.parametrize(("mode", "server", "expected"), [
    ("auto", ("127.0.0.1", 8000), False), ("auto", ("::1", 8000), False),
    ("auto", ("::ffff:127.0.0.1", 8000), False), ("auto", ("10.1.2.3", 8000), True),
    ("auto", ("fe80::1", 8000), True), ("auto", ("testserver", 80), False),
    ("auto", None, False), ("required", ("127.0.0.1", 8000), True),
    ("off", ("10.1.2.3", 8000), False),
])
def test_auto_decides_per_arrival_address(
    mode: str, server: tuple[str, int] | None, expected: bool
) -> None:
    assert required_for(mode, server) is expected  # type: ignore[arg-type]


def test_banner_says_how_the_collector_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    upgrade(url)
    settings = Settings(database_url=url)
    assert auth_banner("off", "127.0.0.1", settings) == (
        "auth: open (localhost only): no API tokens needed; a non-loopback --host requires them")
    assert "auth: OFF on 0.0.0.0" in str(auth_banner("off", "0.0.0.0", settings))
    assert auth_banner("required", "0.0.0.0", settings) is None  # no token yet
    make_tokens(url)
    assert str(auth_banner("required", "0.0.0.0", settings)).startswith(
        "auth: required: API tokens (7 active); 20000 requests per 10 s per token")


def test_serve_on_a_public_host_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--host", "0.0.0.0", "--port",
         str(free_port()), "--database-url", url],
        capture_output=True, text=True, timeout=120,
        env={**_env(), "GRADSENTRY_AUTH": "auto"})
    assert done.returncode == 2
    assert "refusing to serve on 0.0.0.0" in done.stderr
    assert "gradsentry token create --all-projects --scope admin" in done.stderr
    assert "--insecure-no-auth" in done.stderr


def test_serve_on_a_public_host_with_tokens_or_the_override(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'pub.db'}"
    port = free_port()
    open_proc = _spawn_collector(url, port, "--insecure-no-auth", host="0.0.0.0")
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/runs").status_code == 200
    finally:
        out = _stop(open_proc)
    assert "auth: OFF on 0.0.0.0" in out

    made = _cli("token", "create", "--project", "p", "--database-url", url)
    token = made.stdout.strip()
    port = free_port()
    proc = _spawn_collector(url, port, host="0.0.0.0")
    try:
        base = f"http://127.0.0.1:{port}"
        r = httpx.get(f"{base}/api/v1/runs")  # resolved at start: loopback clients too
        assert r.status_code == 401 and "requires an API token" in r.json()["detail"]
        ok = httpx.get(f"{base}/api/v1/runs", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
    finally:
        out = _stop(proc)
    assert "auth: required: API tokens (1 active)" in out


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def _public_address() -> str:
    """This machine's address on its default route (no packet is sent)."""
    candidates = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # UDP connect only picks the outgoing interface
        candidates.append(str(s.getsockname()[0]))
    with contextlib.suppress(OSError):
        candidates += [str(info[4][0]) for info in
                       socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    public = [a for a in candidates if not is_loopback(a) and a != "0.0.0.0"]
    assert public, f"the test needs a non-loopback IPv4 interface (found {candidates})"
    return public[0]


@contextlib.contextmanager
def _serve_all_interfaces(settings: Settings) -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_app_in_auto_mode_requires_tokens_off_loopback(tmp_path: Path) -> None:
    """create_app() served by something else than `gradsentry serve`, on every interface."""
    url = f"sqlite:///{tmp_path / 'auto.db'}"
    upgrade(url)
    with _serve_all_interfaces(Settings(database_url=url, auth="auto")) as port:
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/runs").status_code == 200
        r = httpx.get(f"http://{_public_address()}:{port}/api/v1/runs")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
