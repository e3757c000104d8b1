"""The REST surface is documented: OpenAPI lists every public endpoint."""

from __future__ import annotations

import httpx

PUBLIC = {
    ("post", "/api/v1/runs"),
    ("post", "/api/v1/runs/{run_id}/steps"),
    ("get", "/api/v1/projects"),
    ("get", "/api/v1/runs"),
    ("get", "/api/v1/runs/{run_id}"),
    ("get", "/api/v1/runs/{run_id}/series"),
    ("get", "/api/v1/runs/{run_id}/layers"),
    ("get", "/healthz"),
    ("post", "/api/v1/tokens"),
    ("get", "/api/v1/tokens"),
    ("delete", "/api/v1/tokens/{token_id}"),
}


def test_openapi_lists_the_endpoints(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    found = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert found >= PUBLIC
    body = spec["paths"]["/api/v1/runs/{run_id}/steps"]["post"]["requestBody"]
    assert "steps" in str(body["content"]["application/json"]["schema"])
    # the bearer token scheme is declared, and used by the API routes (not by /healthz)
    assert spec["components"]["securitySchemes"]["token"]["scheme"].lower() == "bearer"
    # this collector may run open (auth "auto"), so "no token" is an allowed alternative
    assert spec["paths"]["/api/v1/runs"]["get"]["security"] == [{"token": []}, {}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert api.get("/docs").status_code == 200


def test_unknown_route_is_a_json_404(api: httpx.Client) -> None:
    resp = api.get("/api/v1/nothing-here")
    assert resp.status_code == 404 and resp.json()["error"] == "NotFound"


def test_a_collector_that_requires_tokens_documents_no_open_alternative() -> None:
    from server.app import create_app
    from server.settings import Settings

    spec = create_app(Settings(database_url="sqlite://", auth="required")).openapi()
    assert spec["paths"]["/api/v1/runs"]["get"]["security"] == [{"token": []}]
    assert spec["paths"]["/api/v1/runs/{run_id}/steps"]["post"]["security"] == [{"token": []}]
