"""Dashboard pages (templates live in ``dashboards``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates

from dashboards import TEMPLATES_DIR, plotly_js_path
from server.db import SessionDep
from server.services import runs

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(TEMPLATES_DIR))


@router.get("/", response_class=HTMLResponse)
def index(request: Request, session: SessionDep) -> HTMLResponse:
    items = runs.list_runs(session, None, 200, 0)
    return templates.TemplateResponse(request, "index.html", {"runs": items})


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: str, request: Request, session: SessionDep) -> HTMLResponse:
    return templates.TemplateResponse(request, "run.html", {"run": runs.describe(session, run_id)})


@router.get("/static/plotly.min.js")
def plotly_js() -> FileResponse:
    return FileResponse(plotly_js_path(), media_type="application/javascript")
