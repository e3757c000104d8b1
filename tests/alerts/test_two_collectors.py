"""Two collector processes on one Postgres, fed concurrently: every alert is raised once
and every notification delivered once."""

from __future__ import annotations

import math
import random
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from client_hooks.wire import encode_batch
from server.analysis.rules import merge
from server.analysis.spikes import RunAnalysis, StepView, evaluate
from server.migrate import upgrade
from server.settings import Settings
from tests.alerts.conftest import LAYERS, HttpReceiver, h1_blowup, healthy, wait_until
from tests.conftest import free_port, fresh_pg_database, spawn_collector


@pytest.fixture
def shared_pg() -> Iterator[str]:
    with fresh_pg_database("gradsentry_two") as url:
        url = Settings(database_url=url).database_url
        upgrade(url)
        yield url


@pytest.fixture
def two_collectors(shared_pg: str) -> Iterator[list[str]]:
    procs: list[subprocess.Popen[bytes]] = []
    urls = []
    try:
        for _ in range(2):
            port = free_port()
            procs.append(spawn_collector(shared_pg, port, "--no-migrate"))
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)


def scenario(seed: int) -> list[list[dict[str, Any]]]:
    """Batches of one run: healthy, a layer blow-up, a NaN step, healthy again."""
    nan = healthy(100, 101, seed)
    nan[0]["loss"] = math.nan
    steps = (
        healthy(0, 60, seed)
        + h1_blowup(60)
        + healthy(64, 100, seed)
        + nan
        + healthy(101, 140, seed)
    )
    return [steps[i : i + 10] for i in range(0, len(steps), 10)]


def expected_alerts(batches: list[list[dict[str, Any]]]) -> Counter[tuple[str, str]]:
    """What one process evaluating the run in order fires: (rule, scope) → times."""
    rules, state = merge(), RunAnalysis.from_json(None, len(LAYERS), merge())
    firing: dict[tuple[str, str], int] = {}
    fired: Counter[tuple[str, str]] = Counter()
    for s in (s for b in batches for s in b):
        view = StepView(
            step=s["step"],
            loss=s["loss"],
            grad_norm=s["grad_norm"],
            layer_grad_norms=np.asarray(s["layer_grad_norms"]),
            layer_nonfinite=np.asarray(s["layer_nonfinite"]),
        )
        now = {(sig.rule, sig.scope) for sig in evaluate(state, view, rules, LAYERS)}
        for key in now - set(firing):
            fired[key] += 1
        firing = {k: 0 for k in now} | {
            k: c + 1
            for k, c in firing.items()
            if k not in now and c + 1 < rules[k[0]]["resolve_after"]
        }
    return fired


def feed(urls: list[str], run_id: str, batches: list[list[dict[str, Any]]], seed: int) -> None:
    rng = random.Random(seed)
    clients = [httpx.Client(base_url=u, timeout=60) for u in urls]
    for k, batch in enumerate(batches):
        body, headers = encode_batch(batch, compress=True)
        path = f"/api/v1/runs/{run_id}/steps"
        if rng.random() < 0.4:  # the same batch to both at once, like a racing retry
            results: list[int] = []

            def post(
                c: httpx.Client,
                body: bytes = body,
                headers: Any = headers,
                path: str = path,
                results: list[int] = results,
            ) -> None:
                results.append(c.post(path, content=body, headers=headers).status_code)

            threads = [threading.Thread(target=post, args=(c,)) for c in clients]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert results == [200, 200]
        else:
            resp = clients[k % 2].post(path, content=body, headers=headers)
            assert resp.status_code == 200, resp.text
    for c in clients:
        c.close()


def test_two_collectors_raise_each_alert_once(
    two_collectors: list[str], http_receiver: HttpReceiver
) -> None:
    a, b = two_collectors
    project = f"two-{uuid.uuid4().hex[:6]}"
    resp = httpx.post(
        f"{a}/api/v1/receivers",
        json={
            "name": f"{project}-hook",
            "kind": "webhook",
            "project": project,
            "url": f"{http_receiver.url}/hook",
            "send_resolved": False,
        },
    )
    assert resp.status_code == 201, resp.text
    runs = {}
    for i in range(6):
        run_id = f"{project}-r{i}"
        created = httpx.post(
            f"{[a, b][i % 2]}/api/v1/runs",
            json={"id": run_id, "project": project, "layers": LAYERS},
        )
        assert created.status_code == 201, created.text
        runs[run_id] = scenario(seed=i)
    threads = [
        threading.Thread(target=feed, args=([a, b], run_id, batches, i))
        for i, (run_id, batches) in enumerate(runs.items())
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    all_alerts = httpx.get(f"{b}/api/v1/alerts", params={"project": project, "limit": 1000}).json()[
        "alerts"
    ]
    for run_id, batches in runs.items():
        got = Counter((x["rule"], x["scope"]) for x in all_alerts if x["run"] == run_id)
        assert got == expected_alerts(batches), run_id
        assert {"nonfinite", "grad_norm_spike"} <= {rule for rule, _ in got}

    notified = [x for x in all_alerts if not x["inhibited"] and not x["silenced"]]

    def received() -> Counter[tuple[int, str]]:
        return Counter(
            (int(al["generatorURL"].rsplit("/", 1)[1]), al["labels"]["severity"])
            for body in http_receiver.bodies("/hook")
            for al in body["alerts"]
        )

    wait_until(
        lambda: {i for i, _ in received()} == {x["id"] for x in notified},
        timeout=30,
        what="all notifications",
    )
    rows = httpx.get(
        f"{a}/api/v1/notifications", params={"receiver": f"{project}-hook", "limit": 1000}
    ).json()
    wait_until(
        lambda: all(
            n["status"] == "sent"
            for n in httpx.get(
                f"{a}/api/v1/notifications", params={"receiver": f"{project}-hook", "limit": 1000}
            ).json()["notifications"]
        ),
        what="outbox drained",
    )
    assert max(received().values()) == 1, received()  # no notification sent twice
    assert len(rows["notifications"]) >= len(notified)
