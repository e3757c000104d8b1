"""Request and response models of the token API."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints, field_validator

from server.auth.tokens import Scope
from server.schemas import NoNul, Out, ProjectName, Strict, UTCDateTime

DEFAULT_SCOPES: tuple[Scope, ...] = ("ingest", "read")
TokenName = Annotated[str, StringConstraints(max_length=128), NoNul]


class TokenCreate(Strict):
    """``project`` null: a token for every project (only an all-projects admin may make one)."""

    project: ProjectName | None
    scopes: list[Scope] = Field(default_factory=lambda: list(DEFAULT_SCOPES), min_length=1,
                                max_length=3)
    name: TokenName | None = None

    @field_validator("scopes")
    @classmethod
    def _unique(cls, scopes: list[Scope]) -> list[Scope]:
        return sorted(set(scopes))


class TokenOut(Out):
    id: str
    project: str | None
    scopes: list[str]
    name: str
    created_at: UTCDateTime
    revoked_at: UTCDateTime | None
    last_used_at: UTCDateTime | None


class TokenCreated(TokenOut):
    """The only time the token string is shown: the collector keeps its hash."""

    token: str


class TokenList(Out):
    tokens: list[TokenOut]
