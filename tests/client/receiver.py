"""A real HTTP stand-in for the collector: answers the two client endpoints, keeps the bodies.

Scripted answers let a test make the collector fail (503, 422, ...) before it succeeds.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = tuple[int, dict[str, Any]] | tuple[int, dict[str, Any], dict[str, str]]
_STEPS_PATH = re.compile(r"^/api/v1/runs/([^/]+)/steps$")


class Receiver:
    """Served on 127.0.0.1 (port 0) in a daemon thread; :attr:`url` is its base URL."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []  # accepted POST /api/v1/runs bodies
        self.batches: list[dict[str, Any]] = []  # accepted POST .../steps bodies (decoded)
        self.log: list[tuple[str, int]] = []  # (path, status answered), every request
        self.headers: list[dict[str, str]] = []
        self.finished: list[str] = []  # run ids of POST /api/v1/runs/{run}/finish
        # Scripted answers: (status, body) or (status, body, extra response headers).
        self.run_answers: deque[Answer] = deque()
        self.step_answers: deque[Answer] = deque()
        self.times: list[float] = []  # time.monotonic() of every request, like ``log``
        self.release_runs = threading.Event()  # clear() to hold run creation until set()
        self.release_runs.set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    @property
    def steps(self) -> list[dict[str, Any]]:
        """Every accepted step record, in arrival order."""
        with self._lock:
            return [s for batch in self.batches for s in batch["steps"]]

    def answer(self, path: str, body: dict[str, Any],
               headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        extra: dict[str, str] = {}
        if path == "/api/v1/runs":
            self.release_runs.wait(timeout=20)
            status, reply, extra = _next(self.run_answers, (201, {"id": body.get("id")}))
            store = self.runs
        elif match := _STEPS_PATH.match(path):
            n = len(body["steps"])
            status, reply, extra = _next(self.step_answers, (200, {"accepted": n}))
            store = self.batches
            if match.group(1) not in {r["id"] for r in self.runs}:
                status, reply = 404, {"error": "RunNotFound", "detail": match.group(1)}
        elif path.startswith("/api/v1/runs/") and path.endswith("/finish"):
            with self._lock:
                self.finished.append(path.split("/")[4])
            return 200, {}, {}
        else:
            return 404, {"error": "NotFound", "detail": path}, {}
        with self._lock:
            self.log.append((path, status))
            self.times.append(time.monotonic())
            self.headers.append(headers)
            if status < 300:
                store.append(body)
        return status, reply, extra

    def close(self) -> None:
        self.release_runs.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _next(answers: deque[Answer],
          default: tuple[int, dict[str, Any]]) -> tuple[int, dict[str, Any], dict[str, str]]:
    try:
        answer = answers.popleft()
    except IndexError:
        answer = default
    return answer[0], answer[1], answer[2] if len(answer) == 3 else {}


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                raw = gzip.decompress(raw)
            status, reply, extra = receiver.answer(self.path, json.loads(raw), dict(self.headers))
            data = json.dumps(reply).encode()
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler
