"""Offline mode writes only to the spool; ``gradsentry sync DIR`` uploads it exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.client import models
from tests.conftest import new_run_id, repo_root
from tests.faults.conftest import CollectorProcess, stored_steps, train_step, watch


def sync(directory: Path, server: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", "sync", str(directory),
                           "--server", server], cwd=repo_root(), capture_output=True,
                          text=True, timeout=60)


def test_offline_run_then_sync(collector_process: CollectorProcess, tmp_path: Path) -> None:
    model, opt = models.make()
    run_id = new_run_id("offline")
    # No collector exists yet: offline mode must not even try to reach it.
    mon = watch(model, opt, "http://127.0.0.1:9", run_id, tmp_path, offline=True,
                max_batch=16)
    for i in range(90):
        train_step(mon, model, opt, i)
    mon.close()
    assert mon.stats["spooled"] == 90 and mon.stats["sent"] == 0
    run_dir = tmp_path / run_id
    assert json.loads((run_dir / "run.json").read_text())["id"] == run_id
    assert list(run_dir.glob("seg-*.jsonl"))

    collector_process.start()
    first = sync(tmp_path, collector_process.url)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"run {run_id}: uploaded 90 steps in " in first.stdout
    assert not list(run_dir.glob("seg-*.jsonl"))  # delivered, so deleted
    assert stored_steps(collector_process.url, run_id) == (90, list(range(90)))
    assert "marked finished" in first.stdout  # the training process had closed normally
    run = httpx.get(f"{collector_process.url}/api/v1/runs/{run_id}", timeout=30).json()
    assert run["status"] == "finished", run

    second = sync(run_dir, collector_process.url)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "nothing to upload" in second.stdout and "synced 0 steps" in second.stdout
    assert stored_steps(collector_process.url, run_id) == (90, list(range(90)))


def test_sync_to_an_unreachable_collector_keeps_the_spool(tmp_path: Path) -> None:
    model, opt = models.make()
    run_id = new_run_id("offline")
    mon = watch(model, opt, "http://127.0.0.1:9", run_id, tmp_path, offline=True)
    for i in range(10):
        train_step(mon, model, opt, i)
    mon.close()
    done = subprocess.run([sys.executable, "-m", "server.cli", "sync", str(tmp_path),
                           "--server", "http://127.0.0.1:9", "--attempts", "1"],
                          cwd=repo_root(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "unreachable" in done.stdout and "10 steps left on disk" in done.stdout
