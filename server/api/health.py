"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from server import __version__
from server.db import SessionDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(session: SessionDep) -> dict[str, str]:
    """Answers 200 when the collector can reach its database."""
    session.execute(text("SELECT 1"))
    return {"status": "ok", "version": __version__,
            "database": session.get_bind().dialect.name}
