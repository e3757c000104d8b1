"""Rules and receivers from the YAML file, the repeat interval, acknowledgement, and the
stalled-run check of the scheduler loop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from server.migrate import upgrade
from server.settings import Settings
from tests.alerts.conftest import FAST, LAYERS, HttpReceiver, h1_blowup, healthy, wait_until
from tests.conftest import serve_in_thread
from tests.factories import create_run, post_steps


@pytest.fixture
def yaml_collector(tmp_path: Path, http_receiver: HttpReceiver) -> Iterator[httpx.Client]:
    rules = tmp_path / "alerts.yaml"
    rules.write_text(f"""
rules:
  loss_spike: {{warning: 7}}
projects:
  yamlproj:
    rules:
      layer_explosion: {{enabled: false}}
receivers:
  - {{name: yaml-hook, kind: webhook, url: "{http_receiver.url}/hook", project: yamlproj}}
""")
    url = f"sqlite:///{tmp_path / 'y.db'}"
    upgrade(url)
    settings = Settings(
        database_url=url, alert_rules_file=rules, **{**FAST, "alert_repeat_interval_s": 0.6}
    )
    base, server, thread = serve_in_thread(settings)
    with httpx.Client(base_url=base, timeout=30) as client:
        yield client
    server.should_exit = True
    thread.join(timeout=10)


def test_yaml_rules_receivers_repeat_and_ack(
    yaml_collector: httpx.Client, http_receiver: HttpReceiver
) -> None:
    api = yaml_collector
    run_id = create_run(api, layers=LAYERS, project="yamlproj")
    rules = api.get("/api/v1/projects/yamlproj/rules").json()
    assert rules["rules"]["loss_spike"]["warning"] == 7.0  # file-wide
    assert rules["rules"]["layer_explosion"]["enabled"] == 0.0  # file, per project
    assert rules["overrides"] == {}
    names = [r["name"] for r in api.get("/api/v1/receivers").json()["receivers"]]
    assert names == ["yaml-hook"]

    post_steps(api, run_id, healthy(0, 60)).raise_for_status()
    post_steps(api, run_id, h1_blowup(60)).raise_for_status()
    alerts = api.get(f"/api/v1/runs/{run_id}/alerts").json()["alerts"]
    assert [a["rule"] for a in alerts] == ["grad_norm_spike"]  # no layer_explosion
    # firing and unacknowledged: notified again every repeat interval
    wait_until(lambda: len(http_receiver.bodies("/hook")) >= 3, what="repeat notifications")
    api.post(f"/api/v1/alerts/{alerts[0]['id']}/ack", json={"by": "bo"}).raise_for_status()
    time.sleep(0.7)  # an in-flight repeat may still land
    settled = len(http_receiver.bodies("/hook"))
    time.sleep(1.5)
    assert len(http_receiver.bodies("/hook")) == settled  # acknowledged: no more repeats


def test_a_bad_rules_file_fails_fast(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("rules: [1, 2", "not valid YAML"),
        ("rules: {loss_spike: {warnin: 3}}", "unknown parameter"),
        ("rulez: {}", "unknown keys"),
    ]:
        bad.write_text(text)
        with pytest.raises(ValidationError, match=message):
            Settings(database_url="sqlite:///x.db", alert_rules_file=bad)
        time.sleep(0.01)  # a new mtime: the file is re-read
    with pytest.raises(ValidationError, match="alert rules file"):
        Settings(database_url="sqlite:///x.db", alert_rules_file=tmp_path / "missing.yaml")


def test_stalled_run_fires_then_resolves_when_data_returns(api: httpx.Client) -> None:
    project = f"stall-{time.monotonic_ns()}"
    run_id = create_run(api, layers=LAYERS, project=project)
    api.put(
        f"/api/v1/projects/{project}/rules", json={"stalled": {"after_s": 1}}
    ).raise_for_status()
    post_steps(api, run_id, healthy(0, 5)).raise_for_status()

    def stalled() -> list[dict[str, object]]:
        found = api.get(f"/api/v1/runs/{run_id}/alerts").json()["alerts"]
        return [a for a in found if a["rule"] == "stalled"]

    wait_until(lambda: stalled(), timeout=10, what="stalled alert")
    time.sleep(0.8)  # the scheduler runs again meanwhile: still one alert
    (alert,) = stalled()
    assert alert["state"] == "firing" and alert["step"] == 4
    post_steps(api, run_id, healthy(5, 10)).raise_for_status()
    (alert,) = stalled()
    assert alert["state"] == "resolved" and alert["end_step"] == 5
