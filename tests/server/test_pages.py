"""The dashboard pages render from the collector, with plotly.js served locally."""

from __future__ import annotations

import httpx

from tests.factories import create_run, make_steps, post_steps


def test_index_and_run_pages(api: httpx.Client) -> None:
    run_id = create_run(api, layers=["enc.0", "enc.1", "head"], name="page-run")
    post_steps(api, run_id, make_steps(0, 5)).raise_for_status()
    index = api.get("/")
    assert index.status_code == 200 and f'href="/runs/{run_id}"' in index.text
    page = api.get(f"/runs/{run_id}")
    assert page.status_code == 200
    assert "page-run" in page.text and "5 steps · 3 layers" in page.text
    assert '<script src="/static/plotly.min.js">' in page.text  # no CDN


def test_plotly_js_is_served_from_the_package(api: httpx.Client) -> None:
    js = api.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000
    assert js.headers["content-type"].startswith("application/javascript")


def test_unknown_run_page_is_404(api: httpx.Client) -> None:
    assert api.get("/runs/does-not-exist").status_code == 404
