"""The alerts page, the run page's alert markers and its noise panel, in a real browser.

The data comes from real training runs streamed through ``client_hooks.watch`` into the live
collector: a TinyGPT whose last step has a NaN loss (the collector fires a critical
``nonfinite`` alert on ingest), and a TinyGPT trained with gradient accumulation under
``noise_scale="micro"`` (the collector turns it into B_simple).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

import client_hooks
from client_hooks.demo import TinyGPT, markov_batches
from tests.conftest import Collector, new_run_id
from tests.dashboard.conftest import WatchedPage

PROJECT = "browser-alerts"
HEALTHY = 6  # steps 0..5 are healthy; step 6 has a NaN loss
BAD_STEP = HEALTHY
NOISE_STEPS = 24
MICRO = 2  # micro-batches per optimizer step
BATCH, SEQ = 16, 16
DRAWN = (
    "id => { const el = document.getElementById(id); return !!(el && el.data && el.data.length); }"
)


def _train(
    server: str,
    run: str,
    steps: int,
    *,
    nan_at: int | None = None,
    noise_scale: str | None = None,
    micro: int = 1,
) -> None:
    torch.manual_seed(0)
    model = TinyGPT(dim=32, depth=2, heads=2, seq=SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mon = client_hooks.watch(
        model,
        opt,
        project=PROJECT,
        run=run,
        server=server,
        batch_size=BATCH,
        flush_interval=0.1,
        noise_scale=noise_scale,
        spool=False,
    )
    data = markov_batches(64, SEQ, BATCH)
    for step in range(steps):
        x = next(data)
        total = torch.zeros(())
        for chunk in x.chunk(micro):
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
            if step == nan_at:
                loss = loss * float("nan")
            (loss / micro).backward()  # type: ignore[no-untyped-call]
            total = total + loss.detach() / micro
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.log(loss=total, batch_size=BATCH)
    assert mon.flush(timeout=30), mon.stats
    mon.close()


def _get(c: Collector, path: str, **params: Any) -> Any:
    with c.client() as api:
        resp = api.get(path, params=params)
        resp.raise_for_status()
        return resp.json()


@pytest.fixture(scope="module")
def nan_run(pg_collector: Collector) -> str:
    """A short run whose last step has a NaN loss (and so NaN gradients)."""
    run = new_run_id("nan")
    _train(pg_collector.url, run, HEALTHY + 1, nan_at=BAD_STEP)
    return run


@pytest.fixture(scope="module")
def nan_alert(pg_collector: Collector, nan_run: str) -> dict[str, Any]:
    alerts = _get(pg_collector, f"/api/v1/runs/{nan_run}/alerts", state="all")["alerts"]
    found = [a for a in alerts if a["rule"] == "nonfinite"]
    assert found, f"no nonfinite alert for the NaN step: {alerts}"
    alert: dict[str, Any] = found[0]
    assert alert["severity"] == "critical" and alert["state"] == "firing"
    assert alert["step"] == BAD_STEP
    return alert


@pytest.fixture(scope="module")
def noise_run(pg_collector: Collector) -> str:
    run = new_run_id("noise")
    _train(pg_collector.url, run, NOISE_STEPS, noise_scale="micro", micro=MICRO)
    return run


def _open(page: WatchedPage, url: str, feature: str) -> None:
    """Go to ``url`` and require that the page knows this collector serves ``feature``
    (else it would only show its "not available" note and every check would time out)."""
    page.page.goto(url)
    features = page.page.evaluate("() => FEATURES")
    assert features.get(feature) is True, f"the page says {features} at {url}"


def _shot(page: WatchedPage, artifacts: Path, name: str) -> None:
    path = artifacts / f"{name}.png"
    page.page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000


def test_acknowledge_an_alert_with_a_click(
    pg_collector: Collector, nan_alert: dict[str, Any], page: WatchedPage, artifacts: Path
) -> None:
    assert nan_alert["acknowledged_at"] is None
    p = page.page
    _open(page, f"{pg_collector.url}/alerts", "alerts")
    row = p.locator(f'#alerts tbody tr[data-alert="{nan_alert["id"]}"]')
    row.wait_for(timeout=15_000)
    assert "critical" in row.inner_text() and "nonfinite" in row.inner_text()
    assert nan_alert["run"] in row.locator("a").inner_text()
    row.locator("button.ack").click()
    # The page reloads the table after the POST: the same row, now acknowledged, no button.
    p.wait_for_function(
        'id => { const r = document.querySelector(`#alerts tbody tr[data-alert="${id}"]`);'
        " return !!r && r.textContent.includes('by dashboard'); }",
        arg=nan_alert["id"],
        timeout=10_000,
    )
    row = p.locator(f'#alerts tbody tr[data-alert="{nan_alert["id"]}"]')
    assert row.locator("button.ack").count() == 0
    got = _get(pg_collector, f"/api/v1/alerts/{nan_alert['id']}")
    assert got["acknowledged_at"] is not None
    assert got["acknowledged_by"] == "dashboard"
    _shot(page, artifacts, "alerts-ack")
    assert page.errors == []


def _silences(c: Collector) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = _get(c, "/api/v1/silences")["silences"]
    return out


def test_create_and_expire_a_silence_from_the_form(
    pg_collector: Collector, nan_run: str, page: WatchedPage, artifacts: Path
) -> None:
    comment = f"warm-up of {nan_run}"
    p = page.page
    _open(page, f"{pg_collector.url}/alerts", "alerts")
    p.wait_for_load_state("networkidle")
    form = p.locator("#silence-form")
    for name, value in [
        ("project", PROJECT),
        ("run", nan_run),
        ("rule", "grad_norm_spike"),
        ("step_from", "100"),
        ("step_to", "200"),
        ("comment", comment),
    ]:
        field = form.locator(f'input[name="{name}"]')
        field.click()
        field.press_sequentially(value)
    form.locator("button").click()
    row = p.locator("#silences tbody tr", has_text=comment)
    row.wait_for(timeout=10_000)
    cells = row.locator("td").all_inner_texts()
    mine = [s for s in _silences(pg_collector) if s["comment"] == comment]
    assert len(mine) == 1
    s = mine[0]
    assert (s["project"], s["run"], s["rule"], s["step_from"], s["step_to"], s["created_by"]) == (
        PROJECT,
        nan_run,
        "grad_norm_spike",
        100,
        200,
        "dashboard",
    )
    assert cells[:5] == [str(s["id"]), PROJECT, nan_run, "grad_norm_spike", "100–200"]
    # The form was reset after the POST.
    assert form.locator('input[name="comment"]').input_value() == ""
    _shot(page, artifacts, "alerts-silence")

    row.get_by_role("button", name="expire").click()
    row.wait_for(state="detached", timeout=10_000)
    assert p.locator("#silences tbody tr", has_text=comment).count() == 0
    # DELETE removes the silence: the API no longer lists it.
    assert [x for x in _silences(pg_collector) if x["id"] == s["id"]] == []
    assert page.errors == []


def test_run_page_marks_the_alert_step_on_loss_and_grad_norm(
    pg_collector: Collector,
    nan_run: str,
    nan_alert: dict[str, Any],
    page: WatchedPage,
    artifacts: Path,
) -> None:
    alerts = _get(pg_collector, f"/api/v1/runs/{nan_run}/alerts", state="all")["alerts"]
    steps = sorted(a["step"] for a in alerts)
    assert BAD_STEP in steps
    p = page.page
    _open(page, f"{pg_collector.url}/runs/{nan_run}", "alerts")
    for panel in ("loss", "grad_norm"):
        p.wait_for_function(DRAWN, arg=panel, timeout=15_000)
        shapes = p.evaluate(
            f"() => (document.getElementById('{panel}').layout.shapes || [])"
            ".map(s => ({x0: s.x0, x1: s.x1, yref: s.yref, color: s.line.color}))"
        )
        assert sorted(s["x0"] for s in shapes) == steps, (panel, shapes)
        mark = [s for s in shapes if s["x0"] == nan_alert["step"]]
        assert mark and mark[0]["x1"] == nan_alert["step"] and mark[0]["yref"] == "paper"
        assert mark[0]["color"] == "#e03131"  # critical
        # The marker lies inside the drawn x range (it is visible, not off to the side).
        xr = p.evaluate(f"() => document.getElementById('{panel}')._fullLayout.xaxis.range")
        assert xr[0] <= nan_alert["step"] <= xr[1] + 0.5, (panel, xr)
    _shot(page, artifacts, "run-alert-markers")
    assert page.errors == []


def test_noise_panel_draws_b_simple_from_the_api(
    pg_collector: Collector, noise_run: str, page: WatchedPage, artifacts: Path
) -> None:
    ns = _get(pg_collector, f"/api/v1/runs/{noise_run}/noise-scale")
    assert ns["mode"] == "micro" and ns["batch_size"] == BATCH
    series = ns["series"]
    want = {
        st: float(v)
        for st, v in zip(series["step"], series["b_simple"], strict=True)
        if v is not None
    }
    assert len(want) >= NOISE_STEPS // 2, series
    assert all(math.isfinite(v) and v > 0 for v in want.values())

    p = page.page
    _open(page, f"{pg_collector.url}/runs/{noise_run}", "noise")
    p.wait_for_function(DRAWN, arg="noise", timeout=15_000)
    trace = p.evaluate(
        "() => { const t = document.getElementById('noise').data"
        ".find(t => (t.name || '').startsWith('B_simple')); return t ? {x: t.x, y: t.y} : null; }"
    )
    assert trace is not None
    drawn = {int(x): y for x, y in zip(trace["x"], trace["y"], strict=True) if y is not None}
    assert drawn.keys() == want.keys()
    for st, v in want.items():
        assert drawn[st] == pytest.approx(v, rel=1e-9), st
    title = p.evaluate("() => document.getElementById('noise').layout.title.text")
    assert f"batch size {BATCH}" in title
    _shot(page, artifacts, "run-noise")
    assert page.errors == []
