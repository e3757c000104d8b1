"""Delivery through the outbox to real receivers: an HTTP server (webhook, Slack,
Alertmanager API) and an SMTP server (aiosmtpd), both started by the test."""

from __future__ import annotations

import time
import uuid
from email.message import Message
from typing import Any

import httpx

from tests.alerts.conftest import LAYERS, HttpReceiver, h1_blowup, healthy, wait_until
from tests.factories import create_run, post_steps


def add_receiver(api: httpx.Client, **body: Any) -> dict[str, Any]:
    resp = api.post("/api/v1/receivers", json=body)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def test_webhook_slack_alertmanager_and_email_receive_firing_then_resolved(
    api: httpx.Client, http_receiver: HttpReceiver, smtp_server: tuple[int, list[Message]]
) -> None:
    project = f"deliver-{uuid.uuid4().hex[:6]}"
    smtp_port, mails = smtp_server
    url = http_receiver.url
    add_receiver(api, name=f"{project}-hook", kind="webhook", project=project, url=f"{url}/hook")
    add_receiver(api, name=f"{project}-slack", kind="slack", project=project, url=f"{url}/slack")
    add_receiver(api, name=f"{project}-am", kind="alertmanager", project=project, url=url)
    add_receiver(
        api,
        name=f"{project}-mail",
        kind="email",
        project=project,
        config={
            "host": "127.0.0.1",
            "port": smtp_port,
            "from": "gs@example.org",
            "to": ["oncall@example.org"],
        },
    )
    run_id = create_run(api, layers=LAYERS, project=project)
    post_steps(api, run_id, healthy(0, 60)).raise_for_status()
    post_steps(api, run_id, h1_blowup(60)).raise_for_status()

    wait_until(
        lambda: (
            http_receiver.bodies("/hook")
            and http_receiver.bodies("/slack")
            and http_receiver.bodies("/api/v2/alerts")
            and mails
        ),
        what="first deliveries",
    )
    hook = http_receiver.bodies("/hook")[0]
    assert hook["version"] == "4" and hook["status"] == "firing"
    assert hook["groupLabels"] == {"project": project, "run": run_id}
    assert hook["receiver"] == f"{project}-hook"
    names = {a["labels"]["alertname"] for a in hook["alerts"]}
    assert "grad_norm_spike" in names  # grouped with the layer explosion of the same run
    spike = next(a for a in hook["alerts"] if a["labels"]["alertname"] == "grad_norm_spike")
    assert spike["labels"]["severity"] == "critical" and spike["status"] == "firing"
    assert spike["annotations"]["first_layer"] == "h1"
    assert (
        spike["endsAt"] == "0001-01-01T00:00:00Z"
        and spike["startsAt"].endswith("Z")
        or "+00:00" in spike["startsAt"]
    )
    assert hook["commonLabels"]["run"] == run_id
    slack = http_receiver.bodies("/slack")[0]
    assert run_id in slack["text"] and "grad_norm_spike" in slack["text"]
    assert slack["blocks"][0]["type"] == "section"
    am = http_receiver.bodies("/api/v2/alerts")[0]
    assert isinstance(am, list) and "endsAt" not in am[0]
    assert {a["labels"]["run"] for a in am} == {run_id}
    mail = mails[0]
    assert "FIRING" in mail["Subject"] and run_id in mail["Subject"]
    assert mail["To"] == "oncall@example.org" and "h1" in mail.get_payload()

    post_steps(api, run_id, healthy(64, 90)).raise_for_status()
    wait_until(
        lambda: any(b["status"] == "resolved" for b in http_receiver.bodies("/hook")),
        what="resolved notification",
    )
    resolved = [b for b in http_receiver.bodies("/hook") if b["status"] == "resolved"][0]
    assert all(a["endsAt"] != "0001-01-01T00:00:00Z" for a in resolved["alerts"])
    wait_until(lambda: any("RESOLVED" in m["Subject"] for m in mails), what="resolved mail")
    wait_until(
        lambda: any("endsAt" in a for b in http_receiver.bodies("/api/v2/alerts") for a in b),
        what="resolved alertmanager push",
    )
    status = api.get("/api/v1/notifications", params={"receiver": f"{project}-hook"}).json()
    assert status["notifications"] and all(
        n["status"] == "sent" and n["attempts"] == 1 for n in status["notifications"]
    )


def test_receiver_down_then_back_gets_every_notification_once(
    api: httpx.Client, http_receiver: HttpReceiver
) -> None:
    project = f"outage-{uuid.uuid4().hex[:6]}"
    add_receiver(
        api,
        name=f"{project}-hook",
        kind="webhook",
        project=project,
        url=f"{http_receiver.url}/hook",
    )
    http_receiver.down()
    runs = []
    for _ in range(3):
        run_id = create_run(api, layers=LAYERS, project=project)
        post_steps(api, run_id, healthy(0, 60)).raise_for_status()
        post_steps(api, run_id, h1_blowup(60)).raise_for_status()
        runs.append(run_id)
    expected = {a["id"] for r in runs for a in api.get(f"/api/v1/runs/{r}/alerts").json()["alerts"]}
    assert len(expected) >= 3

    def failing() -> bool:
        rows = api.get("/api/v1/notifications", params={"receiver": f"{project}-hook"}).json()
        return all(
            n["attempts"] >= 2
            and n["status"] == "pending"
            and "unreachable" in (n["last_error"] or "")
            for n in rows["notifications"]
        )

    wait_until(failing, what="retries while the receiver is down")
    time.sleep(1.0)  # down for a while: several retry rounds, nothing lost, nothing sent
    assert http_receiver.bodies("/hook") == []
    http_receiver.up()

    def delivered() -> set[int]:
        return {
            int(a["generatorURL"].rsplit("/", 1)[1])
            for b in http_receiver.bodies("/hook")
            for a in b["alerts"]
        }

    wait_until(lambda: delivered() == expected, what="every notification after the outage")
    time.sleep(1.0)
    sent = [
        (int(a["generatorURL"].rsplit("/", 1)[1]))
        for b in http_receiver.bodies("/hook")
        for a in b["alerts"]
    ]
    assert sorted(sent) == sorted(expected)  # each exactly once
    groups = {b["groupLabels"]["run"] for b in http_receiver.bodies("/hook")}
    assert groups == set(runs)
    rows = api.get("/api/v1/notifications", params={"receiver": f"{project}-hook"}).json()
    assert all(n["status"] == "sent" and n["attempts"] >= 2 for n in rows["notifications"])
    listed = api.get("/api/v1/receivers", params={"project": project}).json()["receivers"]
    mine = next(r for r in listed if r["name"] == f"{project}-hook")
    assert mine["deliveries"]["sent"] == len(rows["notifications"])
    assert mine["deliveries"]["pending"] == 0
