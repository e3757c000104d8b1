"""The client and access control: token from the environment, refused tokens keep the data,
Retry-After is waited out."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

import client_hooks
from client_hooks.spool import sync
from server.migrate import upgrade
from server.settings import Settings
from tests.client.models import make
from tests.client.receiver import Receiver
from tests.client.test_delivery import train
from tests.conftest import new_run_id, serve_in_thread
from tests.server.test_auth import make_tokens


def test_retry_after_is_waited_out(receiver: Receiver) -> None:
    receiver.step_answers.append(
        (429, {"error": "RateLimited", "detail": "slow down"}, {"Retry-After": "2"}))
    model, opt = make()
    with client_hooks.watch(model, opt, server=receiver.url, flush_interval=60) as mon:
        train(mon, model, opt, 3)
        assert mon.flush(timeout=15)
        assert (mon.stats["sent"], mon.stats["failed_steps"]) == (3, 0)
    assert [s for _, s in receiver.log] == [201, 429, 200]
    gap = receiver.times[2] - receiver.times[1]
    assert 1.9 <= gap < 4.0, gap  # the default first backoff would be 0.25-0.5 s


def test_refused_token_keeps_the_steps_and_says_so_once(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    refused = (401, {"error": "Unauthorized", "detail": "API token abc was revoked"})
    receiver.step_answers.extend([refused] * 3)  # then the token works again (200)
    model, opt = make()
    with caplog.at_level(logging.WARNING, logger="client_hooks"), client_hooks.watch(
            model, opt, server=receiver.url, flush_interval=60, spool=False) as mon:
        train(mon, model, opt, 4)
        assert mon.flush(timeout=20)
        stats = mon.stats
    assert (stats["sent"], stats["failed_steps"], stats["dropped"]) == (4, 0, 0)
    assert [s for _, s in receiver.log] == [201, 401, 401, 401, 200]
    assert [r["step"] for r in receiver.steps] == [0, 1, 2, 3]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    refusals = [m for m in warnings if "refused this run's token" in m]
    assert len(refusals) == 1 and "was revoked" in refusals[0] and "GRADSENTRY_TOKEN" in refusals[0]
    assert not any("dropped" in m for m in warnings)


def test_token_from_the_environment_and_a_refused_one_is_spooled_then_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'client.db'}"
    upgrade(url)
    tokens = make_tokens(url)
    base, server, thread = serve_in_thread(Settings(database_url=url, auth="required"))
    spool_root = tmp_path / "spool"
    try:
        monkeypatch.setenv("GRADSENTRY_TOKEN", tokens["a_ingest"])
        model, opt = make()
        good = new_run_id("env")
        with client_hooks.watch(model, opt, project="proj-a", run=good, server=base,
                                flush_interval=60, spool_dir=spool_root) as mon:
            train(mon, model, opt, 5)
            assert mon.flush(timeout=10)
        assert mon.stats["sent"] == 5

        monkeypatch.setenv("GRADSENTRY_TOKEN", tokens["b_rw"])  # wrong project for this run
        bad = new_run_id("env")
        mon = client_hooks.watch(model, opt, project="proj-a", run=bad, server=base,
                                 flush_interval=0.05, spool_dir=spool_root)
        train(mon, model, opt, 6)
        mon.close(timeout=2)
        stats = mon.stats
        assert stats["sent"] == 0 and stats["failed_steps"] == 0 and stats["dropped"] == 0
        assert stats["spooled"] == 6  # on disk, for a resume or `gradsentry sync`
        assert sync(spool_root / bad, base, token=tokens["a_ingest"], out=lambda _: None) == 0

        headers = {"Authorization": f"Bearer {tokens['a_rw']}"}
        with httpx.Client(base_url=base, headers=headers) as api:
            assert api.get(f"/api/v1/runs/{good}").json()["num_steps"] == 5
            assert api.get(f"/api/v1/runs/{bad}").json()["num_steps"] == 6
    finally:
        server.should_exit = True
        thread.join(timeout=10)
