"""Signing in to the dashboard of a collector that requires tokens, in a real browser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.migrate import upgrade
from server.settings import Settings
from tests.conftest import new_run_id, serve_in_thread
from tests.dashboard.conftest import WatchedPage
from tests.server.test_auth import make_tokens

DRAWN = (
    "id => { const el = document.getElementById(id); return !!(el && el.data && el.data.length); }"
)


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[dict[str, Any]]:
    url = f"sqlite:///{tmp_path / 'login.db'}"
    upgrade(url)
    tokens = make_tokens(url)
    base, server, thread = serve_in_thread(Settings(database_url=url, auth="required"))
    run_id = new_run_id("login")
    with httpx.Client(base_url=base,
                      headers={"Authorization": f"Bearer {tokens['a_rw']}"}) as api:
        assert api.post("/api/v1/runs", json={"id": run_id, "project": "proj-a",
                                              "layers": ["l0", "l1"]}).status_code == 201
        steps = [{"step": i, "loss": 3.0 - 0.1 * i, "grad_norm": 1.0 + i,
                  "layer_grad_norms": [0.5, 1.0 + i]} for i in range(20)]
        assert api.post(f"/api/v1/runs/{run_id}/steps",
                        json={"wire_version": 1, "steps": steps}).status_code == 200
    yield {"url": base, "tokens": tokens, "run": run_id}
    server.should_exit = True
    thread.join(timeout=10)


def test_sign_in_then_pages_and_their_api_calls_work_until_revoked(
    page: WatchedPage, locked: dict[str, Any], artifacts: Path
) -> None:
    p, base, run_id = page.page, locked["url"], locked["run"]
    p.goto(f"{base}/runs/{run_id}")
    assert p.url.startswith(f"{base}/login?next=")  # redirected to sign in
    p.fill("input[name=token]", locked["tokens"]["a_read"])
    p.click("#login-form button")
    p.wait_for_url(f"{base}/runs/{run_id}")
    for panel in ("loss", "grad_norm", "heatmap"):  # drawn from figures.json, with the cookie
        p.wait_for_function(DRAWN, arg=panel, timeout=15_000)
    assert p.inner_text("#num-steps") == "20"
    p.screenshot(path=str(artifacts / "login-run.png"))
    assert p.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read the token
    p.goto(f"{base}/")
    assert run_id in p.content()
    assert page.errors == [], page.errors

    root = {"Authorization": f"Bearer {locked['tokens']['root']}"}
    tokens = httpx.get(f"{base}/api/v1/tokens", headers=root).json()["tokens"]
    reader = next(t["id"] for t in tokens if t["name"] == "a_read")
    assert httpx.delete(f"{base}/api/v1/tokens/{reader}", headers=root).status_code == 204
    p.goto(f"{base}/runs/{run_id}")
    assert p.url.startswith(f"{base}/login?next=")  # signed out by the revocation
    assert "was revoked" in p.inner_text("#login-error")
