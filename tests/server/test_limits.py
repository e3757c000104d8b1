"""Limits: each answered with a 4xx naming it, nothing half-stored; the per-token rate limit
(429 + Retry-After) holds across collector processes, and the client backs off and loses
nothing."""

from __future__ import annotations

import gzip
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from client_hooks.sender import Sender
from server.migrate import upgrade
from server.settings import Settings
from tests.conftest import BACKENDS, free_port, new_run_id, serve_in_thread
from tests.server.test_auth import _spawn_collector, _stop, database, make_tokens

SMALL = {"max_body_bytes": 20_000, "max_steps_per_batch": 5, "max_layers_per_run": 4,
         "max_scalars_per_step": 3}


@pytest.fixture(scope="module", params=BACKENDS)
def small(request: pytest.FixtureRequest, database_urls: dict[str, str]) -> Iterator[httpx.Client]:
    """An open collector (localhost) with small limits, on each backend."""
    url = database_urls[request.param]
    upgrade(url)
    base, server, thread = serve_in_thread(Settings(database_url=url, **SMALL))
    with httpx.Client(base_url=base, timeout=30) as client:
        yield client
    server.should_exit = True
    thread.join(timeout=10)


def _absent(api: httpx.Client, run_id: str) -> bool:
    return api.get(f"/api/v1/runs/{run_id}").status_code == 404


def _run(api: httpx.Client, layers: int = 2) -> str:
    run_id = new_run_id("lim")
    r = api.post("/api/v1/runs", json={"id": run_id, "layers": [f"l{i}" for i in range(layers)]})
    assert r.status_code == 201, r.text
    return run_id


def _steps(n: int, **extra: Any) -> dict[str, Any]:
    return {"wire_version": 1, "steps": [{"step": i, "loss": 1.0, **extra} for i in range(n)]}


def _stored(api: httpx.Client, run_id: str) -> int:
    return int(api.get(f"/api/v1/runs/{run_id}").json()["num_steps"])


def test_a_large_refused_body_still_gets_its_413_not_a_reset(small: httpx.Client) -> None:
    """The collector reads and drops a refused body before answering: closing with unread
    data would make the kernel reset the connection, and the client would never see the
    413 (the wire fuzzer met this as "connection reset by peer")."""
    run_id = _run(small)
    body = b'{"wire_version":1,"steps":[' + b" " * 3_000_000 + b"]}"
    for _ in range(5):
        r = small.post(f"/api/v1/runs/{run_id}/steps", content=body,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "BodyTooLarge"
        chunks = iter([body[i:i + 65536] for i in range(0, len(body), 65536)])
        r = small.post(f"/api/v1/runs/{run_id}/steps", content=chunks,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "BodyTooLarge"
    assert _stored(small, run_id) == 0


def test_body_size_limit_on_every_json_route(small: httpx.Client) -> None:
    run_id = new_run_id("big")
    spec = {"id": run_id, "config": {"blob": "x" * 30_000}}
    r = small.post("/api/v1/runs", json=spec)
    assert r.status_code == 413 and r.json()["error"] == "BodyTooLarge"
    assert "20000" in r.json()["detail"] and "GRADSENTRY_MAX_BODY_BYTES" in r.json()["detail"]
    assert _absent(small, run_id)
    # chunked (no Content-Length): counted while it is read
    chunks = iter([json.dumps({"project": "p", "comment": "y" * 30_000}).encode()[i:i + 4096]
                   for i in range(0, 30_100, 4096)])
    r = small.post("/api/v1/silences", content=chunks,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit of 20000" in r.json()["detail"]
    assert small.get("/api/v1/silences", params={"project": "p"}).json()["silences"] == []
    run_id = _run(small)
    r = small.post(f"/api/v1/runs/{run_id}/steps",
                   content=gzip.compress(json.dumps(_steps(5, note="z" * 30_000)).encode()),
                   headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert r.status_code == 413  # past the limit once decompressed
    assert _stored(small, run_id) == 0
    # a body under the limit still passes
    assert small.post("/api/v1/runs", json={"id": new_run_id(), "config": {"x": 1}}
                      ).status_code == 201


def test_steps_layers_and_scalars_limits(small: httpx.Client) -> None:
    run_id = _run(small)
    r = small.post(f"/api/v1/runs/{run_id}/steps", json=_steps(6))
    assert r.status_code == 413 and "limit of 5 per batch" in r.json()["detail"]
    scalars = {"steps": [{"step": 0, "scalars": {"a": 1.0}},
                         {"step": 1, "scalars": {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}}],
               "wire_version": 1}
    r = small.post(f"/api/v1/runs/{run_id}/steps", json=scalars)
    assert r.status_code == 413 and "steps.1: 4 named scalars" in r.json()["detail"]
    assert "GRADSENTRY_MAX_SCALARS_PER_STEP" in r.json()["detail"]
    assert _stored(small, run_id) == 0  # neither batch left a step behind
    assert small.post(f"/api/v1/runs/{run_id}/steps", json=_steps(5)).status_code == 200
    assert _stored(small, run_id) == 5

    wide = new_run_id("wide")
    r = small.post("/api/v1/runs", json={"id": wide, "layers": [f"l{i}" for i in range(5)]})
    assert r.status_code == 413 and "limit of 4 per run" in r.json()["detail"]
    assert _absent(small, wide)


@pytest.mark.parametrize(("what", "spec"), [
    ("run id", {"id": "r" * 129}),
    ("project", {"project": "p" * 129}),
    ("name", {"name": "n" * 257}),
    ("tag", {"tags": ["t" * 129]}),
    ("tag count", {"tags": [f"t{i}" for i in range(65)]}),
    ("layer name", {"layers": ["l" * 513]}),
])
def test_run_string_limits_are_422(small: httpx.Client, what: str, spec: dict[str, Any]) -> None:
    spec = {"id": new_run_id("str"), **spec}  # the parameters are shared: no pop()
    run_id = spec["id"]
    r = small.post("/api/v1/runs", json=spec)
    assert r.status_code == 422 and r.json()["error"] == "InvalidInput", what
    assert r.json()["detail"]
    if len(run_id) <= 128:
        assert _absent(small, run_id)


def test_scalar_name_and_other_string_limits_are_422(small: httpx.Client) -> None:
    run_id = _run(small)
    r = small.post(f"/api/v1/runs/{run_id}/steps",
                   json={"wire_version": 1, "steps": [{"step": 0, "scalars": {"s" * 129: 1.0}}]})
    assert r.status_code == 422 and "scalars" in r.json()["detail"]
    assert _stored(small, run_id) == 0
    r = small.post("/api/v1/tokens", json={"project": "p", "name": "n" * 129})
    assert r.status_code == 422 and "name" in r.json()["detail"]
    r = small.post("/api/v1/silences", json={"project": "p", "comment": "c" * 4001})
    assert r.status_code == 422


# -- rate limit ---------------------------------------------------------------------------------


def _window_start(window_s: int) -> None:
    """Sleep to just after a window boundary, so a burst falls inside one window."""
    time.sleep(window_s - time.time() % window_s + 0.05)


@pytest.fixture(params=BACKENDS)
def limited(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(backend, database URL, tokens) of a fresh database; collectors are the test's."""
    with database(request.param, tmp_path) as url:
        upgrade(url)
        yield request.param, url, make_tokens(url)


def test_rate_limit_is_429_with_retry_after_per_token(
    limited: tuple[str, str, dict[str, str]],
) -> None:
    _, url, tokens = limited
    base, server, thread = serve_in_thread(Settings(
        database_url=url, auth="required", rate_limit_requests=5, rate_limit_window_s=2))
    try:
        a = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tokens['a_rw']}"})
        b = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tokens['b_rw']}"})
        with a, b:
            _window_start(2)
            assert [a.get("/api/v1/runs").status_code for _ in range(5)] == [200] * 5
            r = a.get("/api/v1/runs")
            assert r.status_code == 429 and r.json()["error"] == "RateLimited"
            assert "5 requests per 2 s" in r.json()["detail"]
            retry = int(r.headers["retry-after"])
            assert 1 <= retry <= 2
            assert b.get("/api/v1/runs").status_code == 200  # per token
            time.sleep(retry)
            assert a.get("/api/v1/runs").status_code == 200  # a new window
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.postgres
@pytest.mark.parametrize("limited", ["postgres"], indirect=True)
def test_rate_limit_holds_across_collector_processes(
    limited: tuple[str, str, dict[str, str]],
) -> None:
    _, url, tokens = limited
    window = 4
    base, server, thread = serve_in_thread(Settings(
        database_url=url, auth="required", rate_limit_requests=6, rate_limit_window_s=window))
    port = free_port()
    other = _spawn_collector(url, port, env={
        "GRADSENTRY_AUTH": "required", "GRADSENTRY_RATE_LIMIT_REQUESTS": "6",
        "GRADSENTRY_RATE_LIMIT_WINDOW_S": str(window)})
    headers = {"Authorization": f"Bearer {tokens['a_rw']}"}
    try:
        with httpx.Client(base_url=base, headers=headers) as here, httpx.Client(
                base_url=f"http://127.0.0.1:{port}", headers=headers) as there:
            _window_start(window)
            codes = [c.get("/api/v1/projects").status_code for c in (here, there) * 3]
            assert codes == [200] * 6  # 3 + 3: each process alone is under the limit
            assert here.get("/api/v1/projects").status_code == 429
            assert there.get("/api/v1/projects").status_code == 429
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        _stop(other)


class _Step:
    def __init__(self, step: int) -> None:
        self.step = step

    def to_record(self) -> dict[str, Any]:
        return {"step": self.step, "loss": float(self.step)}


def test_client_backs_off_on_429_and_delivers_every_step(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rl.db'}"
    upgrade(url)
    token = make_tokens(url)["a_ingest"]
    base, server, thread = serve_in_thread(Settings(
        database_url=url, auth="required", rate_limit_requests=4, rate_limit_window_s=1))
    try:
        run_id = new_run_id("rl")
        sender = Sender(base, run_id, {"id": run_id, "project": "proj-a"}, token=token,
                        flush_interval=0.02, max_batch=2, spool_dir=tmp_path / "spool")
        for i in range(30):  # 15 batches + the run: 16 requests at 4 per second
            sender.put(_Step(i))
        start = time.monotonic()
        assert sender.flush(timeout=60)
        elapsed = time.monotonic() - start
        sender.close(timeout=5)
        stats = sender.stats
        assert (stats["sent"], stats["dropped"], stats["failed_steps"]) == (30, 0, 0)
        assert elapsed >= 2.5  # it did have to wait for windows
        metrics = server.config.app.state.metrics  # type: ignore[attr-defined]
        limited = metrics.ingest_rejected.labels("RateLimited")._value.get()
        assert limited >= 1
        # Retry-After is waited out: about one 429 per window, not a volley of retries
        assert limited <= math.ceil(elapsed) + 2, (limited, elapsed)
        root = make_tokens(url)["root"]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {root}"}) as api:
            run = api.get(f"/api/v1/runs/{run_id}").json()
            series = api.get(f"/api/v1/runs/{run_id}/series",
                             params={"names": "loss", "max_points": 100}).json()
        assert run["num_steps"] == 30 and run["last_step"] == 29
        assert series["series"][0]["step"] == list(range(30))  # every step, once
    finally:
        server.should_exit = True
        thread.join(timeout=10)
