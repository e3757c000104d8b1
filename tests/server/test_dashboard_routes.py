"""Dashboard routes: bad input gets a clear 4xx, optional parts degrade to a note."""

from __future__ import annotations

import httpx
import pytest

from tests.factories import create_run, make_steps, post_steps


def test_figures_json_and_errors(api: httpx.Client) -> None:
    run_id = create_run(api, layers=["a", "b", "c"])
    post_steps(api, run_id, make_steps(0, 30)).raise_for_status()
    got = api.get(f"/runs/{run_id}/figures.json")
    assert got.status_code == 200
    body = got.json()
    assert body["run"]["last_step"] == 29 and body["figures"]["heatmap"]["data"][0]["y"] == [
        "a",
        "b",
        "c",
    ]
    assert body["figures"]["update_ratio"] is None  # no parameter norms in these steps
    layer = api.get(f"/runs/{run_id}/layer.json", params={"name": "b"}).json()
    assert layer["layout"]["title"]["text"] == "layer b"

    for url, status in [
        ("/runs/nope/figures.json", 404),
        (f"/runs/{run_id}/layer.json?name=zz", 404),
        (f"/runs/{run_id}/layer.json", 422),
        (f"/compare?runs={run_id}", 422),
        (f"/compare?runs={run_id},nope", 404),
        (f"/runs/{run_id}?poll_ms=1", 422),
    ]:
        resp = api.get(url)
        assert resp.status_code == status, url
        assert set(resp.json()) == {"error", "detail"}


def test_pages_find_the_alerts_and_noise_endpoints(api: httpx.Client) -> None:
    # The pages look the optional endpoints up in the app's OpenAPI paths; walking
    # app.routes found none on FastAPI 0.165 (included routers have no .path) and hid both.
    run_id = create_run(api)
    page = api.get("/alerts")
    assert page.status_code == 200
    assert '"alerts": true' in page.text and '"noise": true' in page.text
    assert 'id="alerts-note"' not in page.text and 'id="silence-form"' in page.text
    assert '"noise": true' in api.get(f"/runs/{run_id}").text


def test_alerts_and_noise_degrade_to_a_note_without_their_endpoints(
    api: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A collector built without those routers (the real app always has them now): the same
    # templates and script, told the endpoints are missing.
    from server.api import pages

    monkeypatch.setattr(pages, "features", lambda request: {"alerts": False, "noise": False})
    run_id = create_run(api)
    page = api.get("/alerts")
    assert page.status_code == 200 and 'id="alerts-note"' in page.text
    assert '"alerts": false' in page.text and '"noise": false' in page.text
    assert 'id="alerts-note"' in api.get("/").text
    assert api.get(f"/runs/{run_id}").status_code == 200
    js = api.get("/static/gradsentry.js")
    assert js.status_code == 200 and "noise scale is not available" in js.text
