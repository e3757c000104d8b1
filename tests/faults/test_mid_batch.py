"""The collector SIGKILLed while a batch is being written to Postgres: the batch's transaction
either landed whole or not at all, and once the collector is back the client's retry stores
every step exactly once, with its values, and the rollups agree with the stored rows."""

from __future__ import annotations

import time

import psycopg

from tests.conftest import fresh_pg_database, new_run_id
from tests.faults import streams
from tests.faults.conftest import CollectorProcess, wait_for

N_LAYERS = 128
BATCH = 1000
N_STEPS = 4 * BATCH

# A transaction of the collector that has written (it holds a transaction id) and is busy
# with, or between, the statements of an ingest: the rows of a batch are on their way in.
WRITE_IN_FLIGHT = """
SELECT query FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_xid IS NOT NULL AND state IN ('active', 'idle in transaction')
  AND query ~* '(insert|copy|delete|update).*(steps|layer_values|rollups|scalars)'
LIMIT 1
"""


def _plain_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def test_collector_sigkilled_mid_batch() -> None:
    with fresh_pg_database("gradsentry_midbatch") as url:
        collector = CollectorProcess(url)
        collector.start()
        watcher = psycopg.connect(_plain_url(url), autocommit=True)
        run_id = new_run_id("midbatch")
        # flush_interval long: the sender wakes for full batches only, so batch k holds
        # steps [k*BATCH, (k+1)*BATCH) and the stored steps tell which batches landed.
        client = streams.sender(collector.url, run_id, N_LAYERS, max_batch=BATCH,
                                flush_interval=2.0)
        try:
            for step in range(N_STEPS):
                client.put(streams.Item(step, N_LAYERS))
            wait_for(lambda: client.stats["sent"] >= BATCH, timeout=120)
            seen: list[str] = []

            def writing() -> bool:
                row = watcher.execute(WRITE_IN_FLIGHT).fetchone()
                if row is not None:
                    seen.append(row[0][:80])
                return row is not None

            deadline = time.monotonic() + 120
            while not writing():  # polled closely: a batch's transaction may take only ~0.1 s
                assert time.monotonic() < deadline, "no batch write seen in 120 s"
                assert client.stats["sent"] < N_STEPS, "every batch landed before a kill"
                time.sleep(0.002)
            collector.kill()
            acknowledged = client.stats["sent"]
            assert BATCH <= acknowledged < N_STEPS, (acknowledged, seen)
            # The orphaned backend notices the lost client and rolls back: wait it out.
            wait_for(lambda: watcher.execute(WRITE_IN_FLIGHT).fetchone() is None, timeout=60)
            stored = streams.stored_steps(url, run_id)
            # Whole batches only: those acknowledged, plus at most the one in flight if its
            # commit beat the kill (the client did not hear of it and will send it again).
            assert stored == list(range(len(stored))), "a gap: part of a batch is missing"
            assert len(stored) in (acknowledged, acknowledged + BATCH), (
                len(stored), acknowledged, seen)
            assert len(stored) % BATCH == 0, f"half a batch stored: {len(stored)} steps"
            # ... and in every table: values, layer vectors, scalars, rollups all agree.
            streams.check_exactly_once(url, run_id, len(stored), N_LAYERS)

            collector.start()  # same port, same database; the client retries on its own
            assert client.flush(timeout=180), client.stats
            client.close()
            stats = client.stats
            assert (stats["sent"], stats["dropped"], stats["failed_steps"]) == (N_STEPS, 0, 0)
            streams.check_exactly_once(url, run_id, N_STEPS, N_LAYERS)
            streams.check_layer_buckets(collector.url, run_id, N_STEPS, N_LAYERS, 37)
        finally:
            client.close(timeout=1)
            watcher.close()
            collector.stop()
