"""API token strings and the principal a request acts as.

A token reads ``gs_<id>_<secret>``: ``id`` is 12 lowercase hex characters, public (the lookup
key, shown by ``token list``), ``secret`` 32 random bytes in URL-safe base64. The database
keeps only SHA-256(secret). A fast hash is enough here: slow KDFs (bcrypt, scrypt, argon2)
exist to make guessing *low-entropy* passwords from a stolen hash expensive, but a 256-bit
random secret cannot be guessed at any hash speed, and a slow hash would cost every ingest
request milliseconds of CPU.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Literal

from server import errors

Scope = Literal["ingest", "read", "admin"]
SCOPES: tuple[Scope, ...] = ("ingest", "read", "admin")
TOKEN_RE = re.compile(r"^gs_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
TOKEN_FORMAT = "gs_<12 hex id>_<43-character secret>"


def new_token() -> tuple[str, str, str]:
    """A fresh (id, secret, token string); store only ``digest(secret)``."""
    token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    return token_id, secret, f"gs_{token_id}_{secret}"


def parse(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    m = TOKEN_RE.match(token)
    return (m.group(1), m.group(2)) if m else None


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored: str) -> bool:
    return hmac.compare_digest(digest(secret), stored)


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a token (its project, None = every project, and scopes), or
    nobody in particular when the collector runs open (``token_id`` None, everything allowed).
    ``admin`` implies ``read`` and ``ingest``."""

    token_id: str | None
    project: str | None
    scopes: frozenset[str]

    @classmethod
    def open(cls) -> Principal:
        return cls(None, None, frozenset(SCOPES))

    def has(self, scope: Scope) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def __str__(self) -> str:
        if self.token_id is None:
            return "open access"
        where = "every project" if self.project is None else f"project {self.project!r}"
        return f"token {self.token_id} ({','.join(sorted(self.scopes))} on {where})"

    def require(self, scope: Scope) -> None:
        if not self.has(scope):
            raise errors.Forbidden(f"{self} lacks the {scope!r} scope this request needs")

    def require_project(self, project: str | None, what: str = "") -> None:
        """Raise 403 unless this principal may act on ``project`` (None: every project)."""
        if self.project is None or self.project == project:
            return
        target = "every project" if project is None else f"project {project!r}"
        raise errors.Forbidden(f"{self} may not access {what or target}")

    def project_filter(self, requested: str | None) -> str | None:
        """The project a listing is restricted to: the token's own, or what was asked for."""
        if requested is not None:
            self.require_project(requested)
            return requested
        return self.project
