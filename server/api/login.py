"""Sign-in for the dashboard when tokens are required.

A browser cannot add a bearer header to page loads, so ``POST /login`` (or ``GET
/login?token=…`` from a script or link) checks the token and keeps it in an HttpOnly,
SameSite=Strict cookie that every page and the pages' API calls then send; ``/logout``
drops it. The cookie holds the token itself: revoking the token signs the browser out.
"""

from __future__ import annotations

import urllib.parse

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from server import errors
from server.api.pages import _render
from server.auth import store
from server.auth.deps import COOKIE
from server.auth.mode import required_for

router = APIRouter(include_in_schema=False)
COOKIE_MAX_AGE_S = 30 * 86_400


def safe_next(url: str | None) -> str:
    """Only a path on this site: no scheme, no host, no protocol-relative ``//``."""
    if not url or not url.startswith("/") or url.startswith(("//", "/\\")):
        return "/"
    return url


def _form(request: Request, next_url: str, error: str = "", status: int = 200) -> HTMLResponse:
    page = _render(request, "login.html", {"next_url": next_url, "error": error})
    page.status_code = status
    return page


def _sign_in(request: Request, token: str, next_url: str) -> Response:
    engine: Engine = request.app.state.engine
    try:
        with engine.connect() as conn:
            store.authenticate(conn, token).require("read")
            conn.commit()
    except (errors.Unauthorized, errors.Forbidden) as exc:
        return _form(request, next_url, exc.detail, exc.status_code)
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(COOKIE, token, max_age=COOKIE_MAX_AGE_S, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/")
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/", token: str | None = None,
               reason: str = "") -> Response:
    next_url = safe_next(next)
    if not required_for(request.app.state.settings.auth, request.scope.get("server")):
        return RedirectResponse(next_url, status_code=303)  # open: nothing to sign in to
    if token:
        return _sign_in(request, token, next_url)
    return _form(request, next_url, reason)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    # A plain urlencoded form: parsed here, no multipart dependency needed.
    fields = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
    next_url = safe_next((fields.get("next") or ["/"])[0])
    token = (fields.get("token") or [""])[0].strip()
    if not token:
        return _form(request, next_url, "enter a token", 401)
    # The lookup is synchronous database work: keep it off the event loop.
    return await run_in_threadpool(_sign_in, request, token, next_url)


@router.get("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response
