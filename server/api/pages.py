"""Dashboard pages (templates and figures live in ``dashboards``).

Pages render server-side; each page's figures come from a ``*.json`` route built by the pure
functions of ``dashboards.views`` and are redrawn in place by polling (no reload).
Alerts and noise scale are read by the page from their REST endpoints when this collector
has them (``features``), so a collector without them shows a note instead of errors.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates

from dashboards import STATIC_DIR, TEMPLATES_DIR, plotly_js_path
from dashboards.figures import age_text, health
from dashboards.views import compare_figures, layer_figures, run_figures
from server import errors
from server.api.responses import WireJSONResponse
from server.auth.deps import Read, ReadPage, ReadRun, ReadRunPage, check_run
from server.db import SessionDep
from server.services import dashboard
from server.services import runs as run_service

router = APIRouter(include_in_schema=False)


class FigureJSONResponse(WireJSONResponse):
    """Figures hold no NaN/Inf (they are gaps): the C encoder, ~10x faster than the wire's."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()
        except ValueError:  # a non-finite number slipped through: the wire strings then
            return super().render(content)


templates = Jinja2Templates(directory=str(TEMPLATES_DIR))

SERIES_POINTS = 600  # buckets per line chart (~1 per pixel of a half-width chart)
HEATMAP_POINTS = 400  # buckets per heatmap row
STALE_AFTER_S = 600.0
COMPARE_SERIES = ["loss", "grad_norm"]
PollQ = Annotated[int, Query(ge=200, le=600_000, description="refresh interval, ms")]


def features(request: Request) -> dict[str, bool]:
    """Which optional REST endpoints this collector serves (alerts, noise scale)."""
    # From the OpenAPI schema (built once, cached): on recent FastAPI, included routers are
    # entries of ``app.routes`` without a ``path``, so walking the routes finds none.
    paths = set(request.app.openapi().get("paths", {}))
    return {
        "alerts": "/api/v1/alerts" in paths,
        "noise": any(p.startswith("/api/v1/runs/{") and p.endswith("}/noise-scale") for p in paths),
    }


def _render(request: Request, name: str, context: dict[str, Any]) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"features": features(request), **context})


@router.get("/", response_class=HTMLResponse)
def index(request: Request, principal: ReadPage, session: SessionDep) -> HTMLResponse:
    rows = dashboard.run_rows(session, principal.project, 200)
    return _render(
        request,
        "index.html",
        {
            "rows": rows,
            "ages": {r.run.id: age_text(r.age_s) for r in rows},
            "healths": {
                r.run.id: health(r.run.status, r.age_s, r.nonfinite_steps, STALE_AFTER_S)
                for r in rows
            },
        },
    )


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(
    run_id: str,
    request: Request,
    _principal: ReadRunPage,
    session: SessionDep,
    poll_ms: PollQ = 3000,
) -> HTMLResponse:
    run = run_service.describe(session, run_id)
    return _render(request, "run.html", {"run": run, "poll_ms": poll_ms})


@router.get("/runs/{run_id}/figures.json")
def run_figures_json(run_id: str, _principal: ReadRun, session: SessionDep) -> Response:
    d = dashboard.run_page(session, run_id, SERIES_POINTS, HEATMAP_POINTS)
    figures = run_figures(d.series, d.lr_groups, d.grad, d.update_ratio)
    return FigureJSONResponse(
        {
            "run": d.run.model_dump(
                mode="json", include={"id", "status", "last_step", "num_steps", "batch_size"}
            ),
            "figures": figures,
        }
    )


@router.get("/runs/{run_id}/layer.json")
def layer_json(run_id: str, _principal: ReadRun, session: SessionDep, name: str) -> Response:
    return FigureJSONResponse(
        layer_figures(name, dashboard.layer_detail(session, run_id, name, SERIES_POINTS))
    )


def _run_list(raw: str) -> list[str]:
    ids = list(dict.fromkeys(r.strip() for r in raw.split(",") if r.strip()))
    if len(ids) < 2:
        raise errors.InvalidInput("compare needs two or more distinct runs: ?runs=a,b")
    return ids


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request, principal: ReadPage, session: SessionDep, runs: str, poll_ms: PollQ = 5000
) -> HTMLResponse:
    ids = _run_list(runs)
    for run_id in ids:  # 404 for an unknown run, 403 for another project's
        check_run(session, principal, run_id)
        run_service.get_run(session, run_id)
    return _render(
        request, "compare.html", {"runs": ids, "names": COMPARE_SERIES, "poll_ms": poll_ms}
    )


@router.get("/compare/figures.json")
def compare_json(
    principal: Read, session: SessionDep, runs: str, names: str = "loss,grad_norm"
) -> Response:
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    for run_id in _run_list(runs):
        check_run(session, principal, run_id)
    return FigureJSONResponse(
        {
            "figures": compare_figures(
                dashboard.compare(session, _run_list(runs), wanted, SERIES_POINTS)
            )
        }
    )


@router.get("/alerts", response_class=HTMLResponse)
def alerts_page(request: Request, _principal: ReadPage) -> HTMLResponse:
    return _render(request, "alerts.html", {})


@router.get("/static/plotly.min.js")
def plotly_js() -> FileResponse:
    return FileResponse(plotly_js_path(), media_type="application/javascript")


@router.get("/static/gradsentry.js")
def dashboard_js() -> FileResponse:
    return FileResponse(STATIC_DIR / "gradsentry.js", media_type="application/javascript")
