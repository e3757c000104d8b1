"""The dashboard in a real browser, on data from real training runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import client_hooks
from client_hooks.demo import train
from tests.conftest import Collector, new_run_id
from tests.dashboard.conftest import WatchedPage

STEPS = 15  # per demo run: enough for the update ratio (every 10 steps)
DRAWN = (
    "id => { const el = document.getElementById(id); return !!(el && el.data && el.data.length); }"
)


@pytest.fixture(scope="module")
def trained(pg_collector: Collector) -> list[str]:
    """Two short runs of the demo transformer streamed into the collector."""
    ids = [new_run_id("browser-a"), new_run_id("browser-b")]
    for run_id in ids:
        train(pg_collector.url, "browser", run_id, steps=STEPS)
    return ids


def _run(c: Collector, run_id: str) -> dict[str, Any]:
    with c.client() as api:
        resp = api.get(f"/api/v1/runs/{run_id}")
        resp.raise_for_status()
        out: dict[str, Any] = resp.json()
        return out


def _shot(page: WatchedPage, artifacts: Path, name: str) -> None:
    path = artifacts / f"{name}.png"
    page.page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000


def test_every_page_loads_without_console_errors(
    pg_collector: Collector, trained: list[str], page: WatchedPage, artifacts: Path
) -> None:
    a, b = trained
    p = page.page
    p.goto(f"{pg_collector.url}/")
    for run_id in trained:
        assert p.locator(f'tr[data-run="{run_id}"] .last-step').inner_text() == str(STEPS - 1)
    _shot(page, artifacts, "index")

    p.goto(f"{pg_collector.url}/runs/{a}")
    for panel in ("loss", "grad_norm", "heatmap", "lr", "nonfinite", "update_ratio"):
        p.wait_for_function(DRAWN, arg=panel, timeout=15_000)
    _shot(page, artifacts, "run")

    p.goto(f"{pg_collector.url}/compare?runs={a},{b}")
    p.wait_for_function(DRAWN, arg="cmp-loss", timeout=15_000)
    _shot(page, artifacts, "compare")

    p.goto(f"{pg_collector.url}/alerts")
    p.wait_for_load_state("networkidle")
    _shot(page, artifacts, "alerts")
    assert page.errors == []


def test_heatmap_has_one_row_per_layer_and_a_click_shows_that_layer(
    pg_collector: Collector, trained: list[str], page: WatchedPage, artifacts: Path
) -> None:
    run_id = trained[0]
    layers = _run(pg_collector, run_id)["layers"]
    assert len(layers) > 10
    p = page.page
    p.goto(f"{pg_collector.url}/runs/{run_id}")
    p.wait_for_function(DRAWN, arg="heatmap", timeout=15_000)
    heat = p.evaluate(
        "() => { const gd = document.getElementById('heatmap'), d = gd.data[0];"
        " const z = gd.calcdata[0][0].z;"  # the grid plotly drew
        " return {y: d.y, rows: z.length, cols: z[0].length, x: d.x,"
        " finite: z.flat().filter(Number.isFinite).length}; }"
    )
    assert heat["y"] == layers  # model order, one row each
    assert heat["rows"] == len(layers) and heat["cols"] == len(heat["x"]) == STEPS
    assert heat["finite"] > 0.9 * len(layers) * STEPS  # log colours, not blanks

    target = layers[len(layers) // 2]
    # A real mouse click on the middle of that row, at the middle step.
    xy = p.evaluate(
        """name => {
        const gd = document.getElementById('heatmap'), L = gd._fullLayout;
        const box = gd.getBoundingClientRect();
        return [box.left + L.xaxis._offset + L.xaxis._length / 2,
                box.top + L.yaxis._offset + L.yaxis.l2p(L.yaxis.d2l(name))];
    }""",
        target,
    )
    p.mouse.click(xy[0], xy[1])
    p.wait_for_function(
        f"() => document.getElementById('layer-detail-name').textContent === 'layer {target}'",
        timeout=10_000,
    )
    p.wait_for_function(DRAWN, arg="layer-detail", timeout=10_000)
    shown = p.evaluate(
        "() => document.getElementById('layer-detail').data"
        ".filter(t => t.name === 'grad_norm').map(t => t.y)[0]"
    )
    with pg_collector.client() as api:
        want = api.get(
            f"/api/v1/runs/{run_id}/layers", params={"layers": target, "max_points": 1000}
        ).json()["max"][0]
    assert shown == pytest.approx(want, rel=1e-6)
    _shot(page, artifacts, "drilldown")
    assert page.errors == []


def test_compare_page_overlays_the_runs(
    pg_collector: Collector, trained: list[str], page: WatchedPage, artifacts: Path
) -> None:
    p = page.page
    p.goto(f"{pg_collector.url}/")
    for run_id in trained:
        p.locator(f'input.pick[value="{run_id}"]').check()
    p.locator("#compare").click()
    p.wait_for_url("**/compare?runs=*")
    for panel in ("cmp-loss", "cmp-grad_norm"):
        p.wait_for_function(DRAWN, arg=panel, timeout=15_000)
        names = p.evaluate(
            f"() => document.getElementById('{panel}').data"
            ".filter(t => t.showlegend !== false).map(t => t.name)"
        )
        assert sorted(names) == sorted(trained)
        steps = p.evaluate(f"() => document.getElementById('{panel}').data.map(t => t.x.length)")
        assert steps == [STEPS] * 4
    _shot(page, artifacts, "compare-overlay")
    assert page.errors == []


class SlowRun:
    """A small model trained in a thread, slowly, so a page can watch it grow."""

    def __init__(self, server: str, steps: int, delay: float) -> None:
        self.run_id = new_run_id("live")
        self.steps, self.delay, self.server = steps, delay, server
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._train, daemon=True)

    def _train(self) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = client_hooks.watch(
            model,
            opt,
            project="browser",
            run=self.run_id,
            server=self.server,
            flush_interval=0.1,
            batch_size=4,
        )
        for _ in range(self.steps):
            if self.stop.is_set():
                break
            x = torch.randn(4, 8)
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.log(loss=loss)
            time.sleep(self.delay)
        mon.close()


@pytest.fixture
def slow_run(pg_collector: Collector) -> Iterator[SlowRun]:
    run = SlowRun(pg_collector.url, steps=400, delay=0.03)
    run.thread.start()
    yield run
    run.stop.set()
    run.thread.join(timeout=30)


def test_live_run_page_shows_new_steps_without_reload(
    pg_collector: Collector, slow_run: SlowRun, page: WatchedPage, artifacts: Path
) -> None:
    deadline = time.monotonic() + 20
    with pg_collector.client() as api:
        while api.get(f"/api/v1/runs/{slow_run.run_id}").json().get("last_step") is None:
            assert time.monotonic() < deadline, "the live run sent nothing"
            time.sleep(0.1)
    p = page.page
    p.goto(f"{pg_collector.url}/runs/{slow_run.run_id}?poll_ms=300")
    p.wait_for_function(DRAWN, arg="heatmap", timeout=15_000)
    p.evaluate("() => { window.__sameDocument = true; }")
    first = p.evaluate("() => Math.max(...document.getElementById('heatmap').data[0].x)")
    # The heatmap's last step and the KPI both move on, in the same document.
    p.wait_for_function(
        "first => Math.max(...document.getElementById('heatmap').data[0].x) >= first + 20"
        " && Number(document.getElementById('last-step').textContent) >= first + 20",
        arg=first,
        timeout=20_000,
    )
    assert p.evaluate("() => window.__sameDocument") is True
    _shot(page, artifacts, "live")
    assert page.errors == []
