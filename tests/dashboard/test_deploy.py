"""docker-compose file, Prometheus config and the Grafana dashboard against real /metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import repo_root
from tests.factories import create_run, make_steps, post_steps

GRAFANA = repo_root() / "dashboards" / "grafana"


def test_docker_compose_config_accepts_the_file_and_the_monitoring_profile() -> None:
    exe = shutil.which("docker-compose")
    assert exe, "Debian's docker-compose is required (scripts/test.sh installs it)"
    for extra in ([], ["--profile", "monitoring"]):
        out = subprocess.run(
            [exe, "-f", str(repo_root() / "docker-compose.yml"), *extra, "config"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        config = yaml.safe_load(out.stdout)
        assert {"postgres", "collector", "prometheus", "grafana"} <= set(config["services"])
    grafana = config["services"]["grafana"]
    assert config["services"]["prometheus"]["profiles"] == ["monitoring"]
    mounted = " ".join(str(v) for v in grafana["volumes"])
    assert "dashboards/grafana/provisioning" in mounted and "gradsentry.json" in mounted


def test_prometheus_and_grafana_provisioning_parse() -> None:
    prom = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == [
        "collector:8000"
    ]
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus"
    dash = yaml.safe_load((GRAFANA / "provisioning/dashboards/gradsentry.yml").read_text())
    assert dash["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_grafana_dashboard_references_only_exported_metrics(api: httpx.Client) -> None:
    run_id = create_run(api)
    post_steps(api, run_id, make_steps(0, 3)).raise_for_status()
    assert api.get("/api/v1/runs/no-such-run").status_code == 404  # a labelled counter sample
    text = api.get("/metrics").text
    # Names of samples, and of families (a gauge family filled by a part that is not plugged
    # in, e.g. B_simple, is still declared with HELP/TYPE).
    exported: set[str] = set()
    for family in text_string_to_metric_families(text):
        exported.add(family.name)
        exported.update(s.name for s in family.samples)
    board = json.loads((GRAFANA / "gradsentry.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in board["templating"]["list"]]
    used = {m for e in exprs for m in re.findall(r"\bgradsentry_[a-z0-9_]+", e)}
    assert len(used) >= 15
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    for p in board["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "prometheus"
