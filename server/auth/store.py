"""Tokens in the database: create, list, revoke, and authenticate one per request.

Every request looks its token up (a primary-key read), so a revocation made through any
collector process, or the CLI, takes effect on the next request everywhere: no process caches
a token.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import Connection, Table, func, select, update
from sqlalchemy.orm import Session

from server import errors
from server.auth.schemas import TokenCreated, TokenList, TokenOut
from server.auth.tokens import TOKEN_FORMAT, Principal, digest, new_token, parse, secret_matches
from server.models import utcnow
from server.models_auth import ApiToken

LAST_USED_RESOLUTION = timedelta(seconds=60)  # write last_used_at at most this often


def token_out(t: ApiToken) -> TokenOut:
    return TokenOut(id=t.id, project=t.project, scopes=t.scopes.split(","), name=t.name,
                    created_at=t.created_at, revoked_at=t.revoked_at,
                    last_used_at=t.last_used_at)


def create(session: Session, project: str | None, scopes: Iterable[str],
           name: str | None) -> TokenCreated:
    token_id, secret, token = new_token()
    row = ApiToken(id=token_id, project=project, scopes=",".join(sorted(set(scopes))),
                   name=name or "", secret_sha256=digest(secret), created_at=utcnow())
    session.add(row)
    session.commit()
    return TokenCreated(**token_out(row).model_dump(), token=token)


def list_tokens(session: Session, project: str | None = None) -> TokenList:
    """Every token (revoked ones too), or those of ``project`` only."""
    query = select(ApiToken).order_by(ApiToken.created_at, ApiToken.id)
    if project is not None:
        query = query.where(ApiToken.project == project)
    return TokenList(tokens=[token_out(t) for t in session.scalars(query)])


def get(session: Session, token_id: str) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise errors.NotFound(f"token {token_id!r} does not exist")
    return row


def revoke(session: Session, token_id: str, by: Principal | None = None) -> TokenOut:
    """Revoke at once (idempotent: a second revoke keeps the first time). ``by``: who asks
    (a project's admin token may revoke only that project's tokens)."""
    row = get(session, token_id)
    if by is not None:
        by.require_project(row.project, f"token {token_id} of another project")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return token_out(row)


def active_count(session: Session) -> int:
    return int(session.scalar(
        select(func.count()).select_from(ApiToken).where(ApiToken.revoked_at.is_(None))
    ) or 0)


def authenticate(conn: Connection, token: str) -> Principal:
    """The principal of ``token``, or 401 saying what is wrong with it.

    SQLAlchemy Core on a bare connection: this runs on every request. The caller commits
    (``last_used_at`` is written at most once a minute per token).
    """
    parsed = parse(token)
    if parsed is None:
        raise errors.Unauthorized(f"malformed API token: expected {TOKEN_FORMAT}")
    token_id, secret = parsed
    t = ApiToken.__table__
    assert isinstance(t, Table)
    row = conn.execute(
        select(t.c.project, t.c.scopes, t.c.secret_sha256, t.c.revoked_at, t.c.last_used_at)
        .where(t.c.id == token_id)
    ).one_or_none()
    if row is None or not secret_matches(secret, row.secret_sha256):
        raise errors.Unauthorized("unknown API token")
    if row.revoked_at is not None:
        raise errors.Unauthorized(f"API token {token_id} was revoked")
    now = utcnow()
    last = row.last_used_at
    if last is not None and last.tzinfo is None:  # SQLite returns naive UTC
        last = last.replace(tzinfo=now.tzinfo)
    if last is None or now - last > LAST_USED_RESOLUTION:
        conn.execute(update(t).where(t.c.id == token_id).values(last_used_at=now))
    return Principal(token_id, row.project, frozenset(row.scopes.split(",")))
