"""Detection on ingest, lifecycle and the alerts REST API, on SQLite and Postgres."""

from __future__ import annotations

import math
from typing import Any

import httpx

from tests.alerts.conftest import LAYERS, h1_blowup, healthy
from tests.factories import create_run, post_steps


def run_with(api: httpx.Client, *batches: list[dict[str, Any]], project: str = "alerts") -> str:
    run_id = create_run(api, layers=LAYERS, project=project)
    for batch in batches:
        assert post_steps(api, run_id, batch).status_code == 200
    return run_id


def alerts_of(api: httpx.Client, run_id: str, state: str = "all") -> list[dict[str, Any]]:
    resp = api.get(f"/api/v1/runs/{run_id}/alerts", params={"state": state})
    assert resp.status_code == 200, resp.text
    return list(resp.json()["alerts"])


def test_healthy_run_raises_nothing(api: httpx.Client) -> None:
    run_id = run_with(api, healthy(0, 150), healthy(150, 300))
    assert alerts_of(api, run_id) == []


def test_spike_alerts_once_names_first_layer_and_keeps_forensics(api: httpx.Client) -> None:
    blow = h1_blowup(60)
    run_id = run_with(api, healthy(0, 60), blow)
    post_steps(api, run_id, blow).raise_for_status()  # a replayed batch changes nothing
    found = alerts_of(api, run_id)
    spikes = [a for a in found if a["rule"] == "grad_norm_spike"]
    assert len(spikes) == 1, found
    spike = spikes[0]
    assert (spike["severity"], spike["state"], spike["step"]) == ("critical", "firing", 63)
    assert spike["first_layer"] == "h1" and spike["first_layer_lead_steps"] == 3
    assert spike["layers"][0]["layer"] == "h1" and spike["scope"] == "run"
    assert spike["threshold"] < spike["value"] == 2000.0
    assert len(spike["fingerprint"]) == 16 and spike["silenced"] is False
    assert any(a["rule"] == "layer_explosion" and a["scope"] == "h1" for a in found)

    # forensics: K steps before (and after, as they arrive), per-layer norms of h1
    post_steps(api, run_id, healthy(64, 90)).raise_for_status()
    detail = api.get(f"/api/v1/alerts/{spike['id']}").json()
    f = detail["forensics"]
    assert f["step"] == list(range(43, 84)) and len(f["loss"]) == len(f["lr"]) == 41
    assert f["grad_norm"][f["step"].index(63)] == 2000.0
    assert f["layer_grad_norms"]["h1"][f["layer_grad_norms"]["step"].index(63)] == 2000.0
    # listed in the global list with filters, newest first
    listed = api.get("/api/v1/alerts", params={"run": run_id, "state": "all"}).json()["alerts"]
    assert {a["id"] for a in listed} == {a["id"] for a in found}
    assert [a["id"] for a in listed] == sorted((a["id"] for a in listed), reverse=True)


def test_alert_resolves_after_clear_steps_and_can_be_acknowledged(api: httpx.Client) -> None:
    run_id = run_with(api, healthy(0, 60), h1_blowup(60), healthy(64, 70))
    (spike,) = [a for a in alerts_of(api, run_id, "firing") if a["rule"] == "grad_norm_spike"]
    ack = api.post(f"/api/v1/alerts/{spike['id']}/ack", json={"by": "ana", "comment": "on it"})
    assert ack.status_code == 200 and ack.json()["acknowledged_by"] == "ana"
    assert ack.json()["acknowledged_at"] is not None
    post_steps(api, run_id, healthy(70, 90)).raise_for_status()
    again = api.get(f"/api/v1/alerts/{spike['id']}").json()
    assert again["state"] == "resolved" and again["ends_at"] is not None
    assert again["end_step"] == 73  # resolve_after = 10 clear records
    assert alerts_of(api, run_id, "firing") == []


def test_nonfinite_is_critical_and_inhibits_spikes(api: httpx.Client) -> None:
    bad = healthy(60, 61)
    bad[0]["loss"] = math.nan
    bad[0]["layer_nonfinite"] = [0, 1, 0, 0]
    bad[0]["layer_grad_norms"][1] = math.inf
    run_id = run_with(api, healthy(0, 60), bad, h1_blowup(61))
    found = {a["rule"]: a for a in alerts_of(api, run_id)}
    assert found["nonfinite"]["severity"] == "critical" and found["nonfinite"]["step"] == 60
    assert "loss=nan" in found["nonfinite"]["summary"]
    assert found["grad_norm_spike"]["inhibited"] is True


def test_silence_by_step_range(api: httpx.Client) -> None:
    run_id = create_run(api, layers=LAYERS, project="silenced")
    body = {
        "project": "silenced",
        "run": run_id,
        "rule": None,
        "step_from": 0,
        "step_to": 100,
        "comment": "warm-up after resume",
        "created_by": "ana",
    }
    created = api.post("/api/v1/silences", json=body)
    assert created.status_code == 201, created.text
    silence = created.json()
    assert silence["id"] > 0 and silence["step_to"] == 100
    post_steps(api, run_id, healthy(0, 60)).raise_for_status()
    post_steps(api, run_id, h1_blowup(60)).raise_for_status()
    assert all(a["silenced"] for a in alerts_of(api, run_id))
    listed = api.get("/api/v1/silences", params={"project": "silenced"}).json()["silences"]
    assert [s["id"] for s in listed] == [silence["id"]]
    assert api.delete(f"/api/v1/silences/{silence['id']}").status_code == 204
    assert api.delete(f"/api/v1/silences/{silence['id']}").status_code == 404


def test_rules_per_project_over_rest(api: httpx.Client) -> None:
    run_id = create_run(api, layers=LAYERS, project="quiet")
    put = api.put(
        "/api/v1/projects/quiet/rules",
        json={"grad_norm_spike": {"enabled": False}, "layer_explosion": {"enabled": 0}},
    )
    assert put.status_code == 200, put.text
    assert put.json()["rules"]["grad_norm_spike"]["enabled"] == 0.0
    assert put.json()["rules"]["loss_spike"]["warning"] == 6.0  # defaults stay in force
    post_steps(api, run_id, healthy(0, 60)).raise_for_status()
    post_steps(api, run_id, h1_blowup(60)).raise_for_status()
    assert {a["rule"] for a in alerts_of(api, run_id)} == set()
    assert api.get("/api/v1/projects/quiet/rules").json()["overrides"] == {
        "grad_norm_spike": {"enabled": 0.0},
        "layer_explosion": {"enabled": 0.0},
    }


def test_bad_alert_requests_are_clear_4xx(api: httpx.Client) -> None:
    create_run(api, layers=LAYERS, project="bad")
    cases = [
        api.put("/api/v1/projects/bad/rules", json={"no_such_rule": {"x": 1}}),
        api.put("/api/v1/projects/bad/rules", json={"loss_spike": {"warning": -1}}),
        api.put("/api/v1/projects/bad/rules", json={"loss_spike": {"wrning": 3}}),
        api.post("/api/v1/silences", json={"project": "bad", "rule": "nope"}),
        api.post("/api/v1/silences", json={"project": "bad", "step_from": 5, "step_to": 1}),
        api.post("/api/v1/receivers", json={"name": "x", "kind": "webhook", "url": "ftp://x"}),
        api.post("/api/v1/receivers", json={"name": "x", "kind": "email", "config": {}}),
        api.post("/api/v1/receivers", json={"name": "x", "kind": "pager", "url": "http://x"}),
        api.get("/api/v1/alerts", params={"state": "burning"}),
    ]
    for resp in cases:
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"] and resp.json()["detail"]
    for resp in (
        api.get("/api/v1/alerts/999999"),
        api.post("/api/v1/alerts/999999/ack"),
        api.get("/api/v1/projects/nope/rules"),
        api.get("/api/v1/runs/nope/alerts"),
        api.post("/api/v1/silences", json={"project": "nope"}),
    ):
        assert resp.status_code == 404, resp.text
    assert api.get("/api/v1/silences", params={"project": "bad"}).json() == {"silences": []}


def test_silence_by_time_window_and_rule(api: httpx.Client) -> None:
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    run_id = create_run(api, layers=LAYERS, project="timed")
    expired = {
        "project": "timed",
        "rule": "layer_explosion",
        "comment": "over",
        "starts_at": (now - timedelta(hours=2)).isoformat(),
        "ends_at": (now - timedelta(hours=1)).isoformat(),
    }
    active = {
        "project": "timed",
        "run": run_id,
        "rule": "grad_norm_spike",
        "comment": "known bad shard",
        "starts_at": (now - timedelta(minutes=1)).isoformat(),
        "ends_at": (now + timedelta(hours=1)).isoformat(),
    }
    for body in (expired, active):
        assert api.post("/api/v1/silences", json=body).status_code == 201
    post_steps(api, run_id, healthy(0, 60)).raise_for_status()
    post_steps(api, run_id, h1_blowup(60)).raise_for_status()
    found = {a["rule"]: a["silenced"] for a in alerts_of(api, run_id)}
    assert found == {"grad_norm_spike": True, "layer_explosion": False}


def test_firing_counts_for_prometheus(api: httpx.Client, alert_collector: Any) -> None:
    from sqlalchemy.orm import Session

    from server.db import make_engine
    from server.services.alerts import firing_counts

    run_with(api, healthy(0, 60), h1_blowup(60), project="gauges")
    engine = make_engine(alert_collector.settings.database_url)
    with Session(engine) as session:
        counts = [c for c in firing_counts(session) if c[0] == "gauges"]
    engine.dispose()
    assert ("gauges", "grad_norm_spike", "critical", 1) in counts
    assert all(n >= 1 for *_, n in counts)


def test_a_failing_detector_never_costs_the_client_its_data(
    api: httpx.Client, monkeypatch: Any, caplog: Any
) -> None:
    from server.services import alerts as service

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("detector bug")

    run_id = create_run(api, layers=LAYERS, project="robust")
    monkeypatch.setattr(service, "evaluate", broken)
    resp = post_steps(api, run_id, healthy(0, 30))
    assert resp.status_code == 200 and resp.json()["accepted"] == 30
    assert api.get(f"/api/v1/runs/{run_id}").json()["num_steps"] == 30
    assert "detectors failed" in caplog.text
    monkeypatch.undo()
    # later batches are analysed again
    post_steps(api, run_id, healthy(30, 90)).raise_for_status()
    post_steps(api, run_id, h1_blowup(90)).raise_for_status()
    assert "grad_norm_spike" in {a["rule"] for a in alerts_of(api, run_id)}
