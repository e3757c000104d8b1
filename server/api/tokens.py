"""API tokens over REST (``admin`` scope): create (the token is shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.api.responses import WireJSONResponse
from server.auth import store
from server.auth.deps import Admin
from server.auth.schemas import TokenCreate, TokenCreated, TokenList
from server.db import SessionDep

router = APIRouter(prefix="/api/v1", tags=["tokens"])


@router.post("/tokens", response_model=TokenCreated, status_code=201)
def create_token(principal: Admin, body: TokenCreate, session: SessionDep) -> Response:
    """A new token for ``project`` (null: every project; only an all-projects admin may). The
    answer's ``token`` is the only copy: the collector keeps a hash."""
    principal.require_project(body.project)
    return WireJSONResponse(
        store.create(session, body.project, body.scopes, body.name), status_code=201
    )


@router.get("/tokens", response_model=TokenList)
def list_tokens(principal: Admin, session: SessionDep, project: str | None = None) -> Response:
    """Tokens (no secrets), revoked ones included; a project's admin sees that project's."""
    return WireJSONResponse(store.list_tokens(session, principal.project_filter(project)))


@router.delete("/tokens/{token_id}", status_code=204)
def revoke_token(token_id: str, principal: Admin, session: SessionDep) -> Response:
    """Revoke: every collector process rejects the token from its next request on."""
    store.revoke(session, token_id, by=principal)
    return Response(status_code=204)
