"""Postgres crashes and comes back while a client streams into a collector: meanwhile the
collector answers 503 with Retry-After (health check included) instead of a 500, the client
keeps retrying, and after recovery every step is stored exactly once.

Runs on a private cluster (tests/faults/pg_cluster.py), never on the shared server."""

from __future__ import annotations

import threading
import time

import httpx

from client_hooks import wire
from tests.conftest import new_run_id
from tests.faults import streams
from tests.faults.conftest import CollectorProcess, wait_for
from tests.faults.pg_cluster import private_cluster

N_LAYERS = 32
STEPS_PER_S = 300


class Producer(threading.Thread):
    """A training loop's side of the stream: steps at a steady rate until stopped."""

    def __init__(self, client: streams.Sender) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.produced = 0
        self.halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.halt.is_set():
            due = int((time.monotonic() - start) * STEPS_PER_S)
            while self.produced < due:
                self.client.put(streams.Item(self.produced, N_LAYERS))
                self.produced += 1
            time.sleep(0.005)


def _health(url: str) -> httpx.Response | None:
    try:
        return httpx.get(f"{url}/healthz", timeout=10)
    except httpx.TransportError:
        return None


def test_postgres_restarted_mid_run() -> None:
    with private_cluster() as cluster:
        url = cluster.create_database("gradsentry")
        collector = CollectorProcess(url)
        collector.start()
        run_id = new_run_id("pgrestart")
        client = streams.sender(collector.url, run_id, N_LAYERS, max_batch=100)
        producer = Producer(client)
        try:
            producer.start()
            wait_for(lambda: client.stats["sent"] >= 300, timeout=60)

            cluster.stop("immediate")  # a crash: no checkpoint, connections cut
            outage = time.monotonic()
            down: list[httpx.Response] = []
            wait_for(lambda: (r := _health(collector.url)) is not None
                     and r.status_code == 503 and not down.append(r), timeout=30)
            answer = down[0].json()
            assert answer["error"] == "DatabaseUnavailable" and answer["detail"]
            assert down[0].headers["Retry-After"].isdigit()
            body, headers = wire.encode_batch([streams.record(0, N_LAYERS)])
            resp = httpx.post(f"{collector.url}/api/v1/runs/{run_id}/steps", content=body,
                              headers=headers, timeout=30)
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"] == "DatabaseUnavailable"
            assert int(resp.headers["Retry-After"]) >= 1
            sent_while_down = client.stats["sent"]
            time.sleep(max(0.0, 2.0 - (time.monotonic() - outage)))  # down for 2 s at least
            assert client.stats["sent"] == sent_while_down  # nothing got through meanwhile
            assert client.stats["pending"] > 0

            cluster.start()  # crash recovery from the write-ahead log
            wait_for(lambda: (r := _health(collector.url)) is not None
                     and r.status_code == 200, timeout=30)
            # The stream goes on until the client has delivered well past the outage.
            resumed = producer.produced
            wait_for(lambda: client.stats["sent"] >= resumed + 200, timeout=60)
            producer.halt.set()
            producer.join(timeout=10)
            assert client.flush(timeout=60), client.stats
            client.close()
            stats = client.stats
            total = producer.produced
            assert (stats["sent"], stats["dropped"], stats["failed_steps"]) == (total, 0, 0)
            streams.check_exactly_once(url, run_id, total, N_LAYERS)
            streams.check_layer_buckets(collector.url, run_id, total, N_LAYERS, 41)
        finally:
            producer.halt.set()
            client.close(timeout=1)
            collector.stop()
