"""FastAPI dependencies: every route names the scope it needs (and the run it touches).

(No ``from __future__ import annotations``: FastAPI must see the closures' annotations.)

A request carries its token as ``Authorization: Bearer gs_…``, or, from a browser, in the
HttpOnly cookie the login page sets. Each request looks the token up in the database and
counts it against the token's rate limit there, in a short transaction committed before the
route runs (the row lock of the counter is never held across a request).
"""

import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from server import errors
from server.auth import ownership, ratelimit, store
from server.auth.mode import required_for
from server.auth.tokens import Principal, Scope
from server.db import SessionDep

COOKIE = "gradsentry_token"
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="An API token `gs_<id>_<secret>` (README, Access control); not needed when "
    "the collector runs open on localhost.",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


class LoginRequired(Exception):
    """A dashboard page was asked for without a usable token: the app redirects to /login."""

    def __init__(self, next_url: str, reason: str) -> None:
        super().__init__(reason)
        self.next_url = next_url
        self.reason = reason


def _raw_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise errors.Unauthorized("the Authorization header must read 'Bearer <token>'")
        return value.strip()
    return request.cookies.get(COOKIE) or None


def authenticate(request: Request, session: Session) -> Principal:
    """The principal of this request: open, or its token's (401 without a usable one).

    Runs on the request's session (one pooled connection per request) and commits before
    the route starts its own work, so the rate counter's row lock is held only for this.
    """
    settings = request.app.state.settings
    if not required_for(settings.auth, request.scope.get("server")):
        return Principal.open()
    raw = _raw_token(request)
    if raw is None:
        raise errors.Unauthorized(
            "this collector requires an API token: send 'Authorization: Bearer gs_…' "
            "(client: watch(token=...) or $GRADSENTRY_TOKEN; create one with "
            "`gradsentry token create`)"
        )
    conn = session.connection()
    try:
        principal = store.authenticate(conn, raw)
        ratelimit.hit(conn, f"token:{principal.token_id}",
                      settings.rate_limit_requests, settings.rate_limit_window_s, time.time())
    finally:
        session.commit()  # also a 429's count, and last_used_at
    return principal


def principal_for(
    request: Request, session: Session, scope: Scope, *, page: bool = False
) -> Principal:
    """Authenticate and check ``scope``. ``page``: a missing or rejected token redirects an
    HTML page to the login form instead of answering 401."""
    try:
        principal = authenticate(request, session)
    except errors.Unauthorized as exc:
        if not page:
            raise
        # Say why only when a token was offered (revoked, unknown): else just the form.
        offered = COOKIE in request.cookies or "authorization" in request.headers
        query = f"?{request.url.query}" if request.url.query else ""
        raise LoginRequired(request.url.path + query, exc.detail if offered else "") from None
    principal.require(scope)
    return principal


def check_run(session: Session, principal: Principal, run_id: str) -> None:
    """403 when ``run_id`` exists in a project the principal may not touch (an unknown run is
    left to the route's 404)."""
    if principal.project is not None:
        check_owner(principal, ownership.run_project(session, run_id), f"run {run_id!r}")


def check_owner(principal: Principal, owner: str | None, what: str) -> None:
    """403 when ``what`` (found by ``ownership``, owned by ``owner``) is outside the
    principal's project; a missing object is left to the route's 404."""
    if principal.project is not None and owner != ownership.MISSING:
        principal.require_project(owner, f"{what} of another project")


# Each dependency is one function: FastAPI runs every sync dependency in the threadpool
# separately, and a hop costs more than the checks.


def _require(scope: Scope, *, page: bool = False) -> Callable[..., Principal]:
    def dependency(request: Request, session: SessionDep, _bearer: BearerDep = None) -> Principal:
        return principal_for(request, session, scope, page=page)

    dependency.__name__ = f"require_{scope}{'_page' if page else ''}"
    return dependency


def _require_run(scope: Scope, *, page: bool = False) -> Callable[..., Principal]:
    """The scope, and the run in the path must be in the token's project (else 403)."""

    def dependency(
        request: Request, run_id: str, session: SessionDep, _bearer: BearerDep = None
    ) -> Principal:
        principal = principal_for(request, session, scope, page=page)
        check_run(session, principal, run_id)
        return principal

    dependency.__name__ = f"require_{scope}_run{'_page' if page else ''}"
    return dependency


def _metrics_reader(request: Request, session: SessionDep, _bearer: BearerDep = None) -> Principal:
    principal = principal_for(request, session, "read")
    # The gauges span every project: only a token for all projects may scrape them.
    principal.require_project(None, "/metrics (it holds every project's gauges); use a token "
                              "created for all projects")
    return principal


Ingest = Annotated[Principal, Depends(_require("ingest"))]
Read = Annotated[Principal, Depends(_require("read"))]
Admin = Annotated[Principal, Depends(_require("admin"))]
IngestRun = Annotated[Principal, Depends(_require_run("ingest"))]
ReadRun = Annotated[Principal, Depends(_require_run("read"))]
ReadPage = Annotated[Principal, Depends(_require("read", page=True))]
ReadRunPage = Annotated[Principal, Depends(_require_run("read", page=True))]
MetricsReader = Depends(_metrics_reader)
