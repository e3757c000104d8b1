"""Fuzzing fixtures: a live collector per backend on a database of its own (fuzzed writes,
silences and receivers must not leak into other tests), seeded with runs and alerts so read
endpoints hit real data.

Requests carry :data:`AUTH_HEADERS`: the collector runs open here (127.0.0.1, no tokens); a
collector that requires tokens needs one bearer header added there, nothing else.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from server.migrate import upgrade
from server.settings import Settings
from tests.conftest import BACKENDS, fresh_pg_database, serve_in_thread
from tests.factories import create_run, make_steps, post_steps
from tests.fuzz.wire_strategies import MAX_BODY, MAX_STEPS

AUTH_HEADERS: dict[str, str] = {}
SEED_LAYERS = ["embed", "block.0.attn", "block.0.mlp", "head"]


@dataclass
class FuzzCollector:
    url: str
    settings: Settings
    backend: str
    # Existing values of path parameters (run_id, alert_id, ...), for reads of real data.
    seeds: dict[str, list[object]] = field(default_factory=dict)


def _seed(collector: FuzzCollector) -> None:
    """Two runs with steps (one with a NaN step, which fires an alert), a silence, a receiver."""
    import httpx

    with httpx.Client(base_url=collector.url, headers=AUTH_HEADERS, timeout=30) as api:
        runs = []
        for project in ("fuzz-a", "fuzz-b"):
            run_id = create_run(api, layers=SEED_LAYERS, project=project)
            steps = make_steps(0, 150, n_layers=len(SEED_LAYERS))
            steps[100]["loss"] = math.nan
            steps[100]["layer_grad_norms"][1] = math.inf
            steps[120]["scalars"] = {"attn_logit_max": -math.inf}
            for first in range(0, len(steps), MAX_STEPS):
                post_steps(api, run_id, steps[first:first + MAX_STEPS]).raise_for_status()
            runs.append(run_id)
        alerts = api.get("/api/v1/alerts").json()["alerts"]
        assert alerts, "the NaN step should have fired an alert"
        silence = api.post("/api/v1/silences", json={"project": "fuzz-a", "step_from": 10})
        receiver = api.post("/api/v1/receivers", json={
            "name": "fuzz-hook", "kind": "webhook", "url": "http://127.0.0.1:9/hook"})
        silence.raise_for_status()
        receiver.raise_for_status()
    collector.seeds = {
        "run_id": runs,
        "project": ["fuzz-a", "fuzz-b"],
        "alert_id": [a["id"] for a in alerts],
        "silence_id": [silence.json()["id"]],
        "receiver_id": [receiver.json()["id"]],
    }


@pytest.fixture(scope="package", params=BACKENDS)
def fuzz_collector(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzCollector]:
    backend: str = request.param
    database: contextlib.AbstractContextManager[str] = (
        fresh_pg_database("gradsentry_fuzz") if backend == "postgres"
        else contextlib.nullcontext(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}")
    )
    with database as url:
        # Alerts are detected on ingest; the delivery worker stays idle, so fuzzed receivers
        # (any URL) are never called.
        settings = Settings(database_url=url, alert_poll_interval_s=3600,
                            max_steps_per_batch=MAX_STEPS, max_body_bytes=MAX_BODY,
                            max_layers_per_run=64)
        upgrade(settings.database_url)
        base, server, thread = serve_in_thread(settings)
        collector = FuzzCollector(url=base, settings=settings, backend=backend)
        try:
            _seed(collector)
            yield collector
        finally:
            server.should_exit = True
            thread.join(timeout=10)
