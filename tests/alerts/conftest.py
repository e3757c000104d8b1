"""Fixtures of the alert tests: collectors with fast retries on fresh databases, a real HTTP
receiver that can go down and come back on the same port, a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from server.migrate import upgrade
from server.settings import Settings
from tests.conftest import Collector, free_port, fresh_pg_database, serve_in_thread

FAST = {
    "alert_retry_base_s": 0.1,
    "alert_retry_max_s": 0.4,
    "alert_poll_interval_s": 0.05,
    "alert_scheduler_interval_s": 0.3,
}


@pytest.fixture(scope="session")
def alerts_pg() -> Iterator[str]:
    with fresh_pg_database("gradsentry_alerts") as url:
        url = Settings(database_url=url).database_url
        upgrade(url)
        yield url


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def alert_collector(
    request: pytest.FixtureRequest, alerts_pg: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Collector]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('alerts') / 'a.db'}"
        upgrade(url)
    else:
        url = alerts_pg
    settings = Settings(database_url=url, **FAST)
    base, server, thread = serve_in_thread(settings)
    yield Collector(url=base, settings=settings, backend=request.param)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def api(alert_collector: Collector) -> Iterator[httpx.Client]:
    with alert_collector.client() as client:
        yield client


class HttpReceiver:
    """Records every POST (path, JSON body); ``down()``/``up()`` close and reopen the port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.posts: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.up()

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.posts.append((self.path, json.loads(raw)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bodies(self, path: str) -> list[Any]:
        with self.lock:
            return [body for p, body in self.posts if p == path]


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    receiver = HttpReceiver()
    yield receiver
    receiver.down()


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp_server() -> Iterator[tuple[int, list[Message]]]:
    box = _Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield port, box.messages
    controller.stop()


LAYERS = ["emb", "h0", "h1", "head"]


def healthy(start: int, stop: int, seed: int = 0) -> list[dict[str, Any]]:
    """A healthy run: loss decaying with a little noise, steady per-layer norms."""
    out = []
    for i in range(start, stop):
        wobble = 1 + 0.02 * math.sin(1.7 * i + seed)
        norms = [0.5 * wobble, 1.0 * wobble, 2.0 * wobble, 0.25 * wobble]
        out.append(
            {
                "step": i,
                "loss": (3.0 * math.exp(-i / 200) + 1.0) * wobble,
                "lr": 1e-3,
                "grad_norm": math.sqrt(sum(n * n for n in norms)),
                "layer_grad_norms": norms,
                "layer_nonfinite": [0, 0, 0, 0],
            }
        )
    return out


def h1_blowup(start: int) -> list[dict[str, Any]]:
    """Layer h1 deviates from ``start``; the total grad norm explodes 3 steps later."""
    steps = healthy(start, start + 4)
    for k, factor in enumerate([3.0, 6.0, 12.0]):
        steps[k]["layer_grad_norms"][2] *= factor
    steps[3]["layer_grad_norms"] = [5.0, 10.0, 2000.0, 2.5]
    steps[3]["grad_norm"] = 2000.0
    return steps


def wait_until(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
