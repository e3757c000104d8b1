"""The collector's FastAPI application factory."""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import __version__, errors
from server.alerts.metrics import alert_gauges
from server.alerts.worker import AlertWorker
from server.api import alerts, health, ingest, login, pages, runs, tokens
from server.api import noise as noise_api
from server.api.openapi import install_openapi
from server.auth.deps import LoginRequired, MetricsReader
from server.body_limit import BodyLimit
from server.db import make_engine
from server.metrics import (
    DatabaseCollector,
    Metrics,
    install_http_metrics,
    install_metrics_route,
)
from server.schemas import ErrorOut
from server.services.noise import noise_gauges
from server.settings import Settings

log = logging.getLogger("gradsentry.server")

# The database cannot be reached (down, restarting, connection cut, pool exhausted, SQLite
# busy): the request may succeed later, so it is a 503 with Retry-After, not a 500. Clients
# retry 5xx (client_hooks.sender); an ingest transaction that failed this way stored nothing.
DATABASE_UNAVAILABLE = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
)
RETRY_AFTER_S = 1
# Documented on every operation: what error answers look like.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    "4XX": {"model": ErrorOut, "description": "Rejected request: what is wrong, in words"},
    503: {"model": ErrorOut, "description": "Database unreachable; retry after Retry-After s"},
}


def create_app(
    settings: Settings | None = None, registry: CollectorRegistry | None = None
) -> FastAPI:
    """Build the collector. Nothing connects until the first request."""
    settings = settings or Settings()
    registry = registry or CollectorRegistry()
    engine = make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        worker = _start_alert_worker(app, settings)
        yield
        if worker is not None:
            worker.stop()
        engine.dispose()

    app = FastAPI(
        title="gradsentry collector",
        version=__version__,
        description="Gradient-norm telemetry for PyTorch training.",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = sessionmaker(engine, expire_on_commit=False)
    app.state.metrics = Metrics.create(registry)
    install_http_metrics(app, app.state.metrics)
    app.add_middleware(
        BodyLimit,
        limit=settings.max_body_bytes,
        on_reject=app.state.metrics.ingest_rejected.labels("BodyTooLarge").inc,
    )
    # Scrape-time gauges from the database; alerts/noise scale plug in with add_source().
    app.state.db_metrics = DatabaseCollector(
        app.state.sessionmaker, engine, settings.metrics_active_window_s, settings.metrics_max_runs
    )
    app.state.db_metrics.add_source(alert_gauges)
    app.state.db_metrics.add_source(noise_gauges)
    registry.register(app.state.db_metrics)
    _install_error_handlers(app)
    install_openapi(app)
    app.include_router(ingest.router)
    app.include_router(runs.router)
    app.include_router(alerts.router)
    app.include_router(noise_api.router)  # noise scale
    app.include_router(tokens.router)
    app.include_router(health.router)
    install_metrics_route(app, registry, dependencies=[MetricsReader])
    app.include_router(pages.router)
    app.include_router(login.router)
    return app


def app_from_env() -> FastAPI:
    """The collector with settings read from the environment: the import string
    (``server.app:app_from_env``, a factory) of ``gradsentry serve --workers N``."""
    return create_app(Settings())


def _start_alert_worker(app: FastAPI, settings: Settings) -> AlertWorker | None:
    """The outbox delivery thread (and YAML receivers), unless alerts are disabled."""
    if not settings.alerts_enabled:
        return None
    if settings.alert_rules_file is not None:
        from server.services.alerts import sync_config_receivers

        with app.state.sessionmaker() as session:
            sync_config_receivers(session, settings)
    worker = AlertWorker(app.state.sessionmaker, settings)
    worker.start()
    return worker


def _error(
    app: FastAPI, status: int, name: str, detail: object, headers: dict[str, str] | None = None
) -> JSONResponse:
    if 400 <= status < 500:
        app.state.metrics.ingest_rejected.labels(name).inc()
    return JSONResponse({"error": name, "detail": detail}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.GradsentryError)
    async def domain_error(_req: Request, exc: errors.GradsentryError) -> JSONResponse:
        return _error(app, exc.status_code, type(exc).__name__, exc.detail, exc.headers)

    @app.exception_handler(LoginRequired)
    async def login_required(_req: Request, exc: LoginRequired) -> RedirectResponse:
        fields = {"next": exc.next_url, **({"reason": exc.reason} if exc.reason else {})}
        query = urllib.parse.urlencode(fields)
        return RedirectResponse(f"/login?{query}", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:10]:
            loc = ".".join(str(p) for p in err["loc"])
            parts.append(f"{loc}: {err['msg']}")
        return _error(app, 422, "InvalidInput", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        name = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return _error(app, exc.status_code, name, exc.detail)

    async def database_unavailable(_req: Request, exc: Exception) -> JSONResponse:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.warning("database unavailable: %s: %s", type(exc).__name__, first_line)
        return JSONResponse(
            {"error": "DatabaseUnavailable",
             "detail": f"the database cannot be reached ({type(exc).__name__}); retry later"},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    for exc_class in DATABASE_UNAVAILABLE:
        app.add_exception_handler(exc_class, database_unavailable)

    @app.exception_handler(sa_exc.DataError)
    async def data_refused(_req: Request, exc: sa_exc.DataError) -> JSONResponse:
        # A value the API let through but the database cannot hold (out of range, NUL
        # in text): bad input all the same. The transaction is rolled back, nothing stored.
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else "?"
        log.warning("database refused a value: %s", reason)
        return _error(app, 422, "InvalidInput", f"the database refused a value: {reason}")

    @app.exception_handler(Exception)
    async def unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            {"error": "InternalError", "detail": "unexpected server error; see collector log"},
            status_code=500,
        )
