"""/metrics: Prometheus text that parses, collector internals, bounded per-run gauges."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample as PromSample
from sqlalchemy import create_engine, update
from sqlalchemy.orm import Session

from server.app import create_app
from server.metrics import ActiveRun, Sample, run_labels
from server.models import Run, utcnow
from tests.conftest import Collector
from tests.factories import create_run, make_steps, post_steps


def scrape(api: httpx.Client) -> dict[str, list[PromSample]]:
    resp = api.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    return {name: list(f.samples) for name, f in families.items()} | {
        f"{name}:type": [PromSample("type", {}, 0.0, None, None)] if f.type else []
        for name, f in families.items()
    }


def per_run(samples: dict[str, list[PromSample]], run_id: str) -> dict[str, float]:
    return {
        s.name: s.value
        for name, items in samples.items()
        if name.startswith("gradsentry_run_")
        for s in items
        if s.labels.get("run") == run_id
    }


def _age_run(collector: Collector, run_id: str, **values: object) -> None:
    engine = create_engine(collector.settings.database_url)
    with Session(engine) as session:
        session.execute(update(Run).where(Run.id == run_id).values(**values))
        session.commit()
    engine.dispose()


def test_metrics_parse_and_carry_ingest_and_latency(api: httpx.Client) -> None:
    before = scrape(api)
    run_id = create_run(api, layers=["a", "b", "c"])
    body_steps = make_steps(0, 5)
    assert post_steps(api, run_id, body_steps).status_code == 200
    assert api.get("/api/v1/runs/nope").status_code == 404
    after = scrape(api)

    def total(samples: dict[str, list[PromSample]], name: str) -> float:
        return sum(s.value for s in samples.get(name, []) if s.name == f"{name}_total")

    assert (
        total(after, "gradsentry_steps_ingested") - total(before, "gradsentry_steps_ingested") == 5
    )
    assert (
        total(after, "gradsentry_batches_ingested") - total(before, "gradsentry_batches_ingested")
        == 1
    )
    assert total(after, "gradsentry_ingest_bytes") - total(before, "gradsentry_ingest_bytes") > 0
    assert (
        total(after, "gradsentry_layer_values_ingested")
        - total(before, "gradsentry_layer_values_ingested")
        == 5 * 3 * 2
    )  # grad norms + nonfinite
    assert total(after, "gradsentry_requests_rejected") >= 1

    hist = after["gradsentry_http_request_duration_seconds"]
    routes = {s.labels["route"] for s in hist if s.name.endswith("_count")}
    assert "/api/v1/runs/{run_id}/steps" in routes and "/api/v1/runs/{run_id}" in routes
    assert all("nope" not in r for r in routes)  # templates, not raw paths: bounded labels
    for name in (
        "gradsentry_http_requests_in_flight",
        "gradsentry_db_pool_checked_out",
        "gradsentry_database_up",
        "gradsentry_active_runs",
        "gradsentry_alerts_firing",
        "gradsentry_outbox_backlog",
    ):
        assert name in after, name
    assert after["gradsentry_database_up"][0].value == 1.0
    assert after["gradsentry_active_runs"][0].value >= 1


def test_active_runs_get_gauges_and_runs_idle_or_finished_long_ago_none(
    api: httpx.Client, collector: Collector
) -> None:
    live, idle, done = (create_run(api, layers=["a", "b", "c"]) for _ in range(3))
    for run_id in (live, idle, done):
        post_steps(api, run_id, make_steps(0, 5)).raise_for_status()
    got = per_run(scrape(api), live)
    last = make_steps(4, 5)[0]
    assert got == {
        "gradsentry_run_loss": last["loss"],
        "gradsentry_run_grad_norm": last["grad_norm"],
        "gradsentry_run_last_step": 4.0,
        "gradsentry_run_last_step_timestamp_seconds": last["wall_time"],
        "gradsentry_run_alerts_firing": 0.0,
    }
    assert per_run(scrape(api), idle) and per_run(scrape(api), done)

    _age_run(collector, idle, updated_at=utcnow() - timedelta(days=2))
    _age_run(collector, done, status="finished", updated_at=utcnow() - timedelta(hours=3))
    samples = scrape(api)
    assert per_run(samples, idle) == {} and per_run(samples, done) == {}
    assert per_run(samples, live)
    text = api.get("/metrics").text
    assert idle not in text and done not in text


def test_scrape_sources_plug_in(collector: Collector) -> None:
    """The extension point the alerts and noise-scale parts use."""
    registry = CollectorRegistry()
    app = create_app(collector.settings, registry)

    def noise(_session: Session, active: Sequence[ActiveRun]) -> list[Sample]:
        return [
            Sample("gradsentry_run_b_simple", 42.0 + i, run_labels(r)) for i, r in enumerate(active)
        ]

    app.state.db_metrics.add_source(noise)
    app.state.db_metrics.declare("gradsentry_example_gauge", "An example", ["kind"])
    app.state.db_metrics.add_source(
        lambda _s, _a: [Sample("gradsentry_example_gauge", 1.0, {"kind": "x"})]
    )
    with httpx.Client(base_url=collector.url) as api:
        run_id = create_run(api)
        post_steps(api, run_id, make_steps(0, 2)).raise_for_status()
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    b_simple = {s.labels["run"]: s.value for s in families["gradsentry_run_b_simple"].samples}
    assert run_id in b_simple and min(b_simple.values()) == 42.0
    assert families["gradsentry_example_gauge"].samples[0].labels == {"kind": "x"}


def test_alert_gauges_count_a_firing_alert(api: httpx.Client) -> None:
    run_id = create_run(api, layers=["a", "b", "c"])
    steps = make_steps(0, 5)
    steps[4]["loss"] = "NaN"  # non-finite loss: a critical alert at once
    post_steps(api, run_id, steps).raise_for_status()
    alerts = api.get("/api/v1/alerts", params={"run": run_id, "state": "firing"}).json()
    firing = [a for a in alerts["alerts"] if a["severity"] == "critical"]
    assert firing, alerts
    samples = scrape(api)
    assert per_run(samples, run_id)["gradsentry_run_alerts_firing"] == len(alerts["alerts"])
    firing_now = samples["gradsentry_alerts_firing"]
    critical = [s for s in firing_now if s.labels["severity"] == "critical"]
    assert critical[0].value >= len(firing)
    assert samples["gradsentry_outbox_backlog"][0].value >= 0
