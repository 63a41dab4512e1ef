"""API tokens (admin role) and `whoami` (anyone authenticated)."""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CurrentPrincipal, SessionDep, authenticated
from models.enums import Role
from models.schemas import Body, Duration, Email, Team, TokenName
from nhi.services import tokens
from nhi.services.auth import require_role

router = APIRouter(prefix="/v1", tags=["tokens"], dependencies=[authenticated])


class TokenCreate(Body):
    """A new API token: a name, one role, an expiry, optionally teams and the person it is for."""

    name: TokenName
    role: Role
    ttl: Duration
    teams: list[Team] | None = Field(
        default=None, max_length=50, description="Teams a platform token acts for."
    )
    email: Email | None = Field(default=None, description="The person, for owner rights.")
    agent_id: uuid.UUID | None = Field(
        default=None, description="The one agent an `agent` token acts as (required for it)."
    )


class TokenOut(BaseModel):
    """A token's metadata (never the token)."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    role: Role
    teams: list[str] | None
    email: str | None
    agent_id: uuid.UUID | None = None
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class TokenCreated(TokenOut):
    """The one response that carries the token itself."""

    token: str


class WhoAmI(BaseModel):
    """The authenticated caller."""

    actor: str
    roles: list[Role]
    teams: list[str] | None
    email: str | None


@router.get("/whoami", response_model=WhoAmI)
def whoami(p: CurrentPrincipal) -> WhoAmI:
    """Who the API thinks you are."""
    return WhoAmI(
        actor=p.actor,
        roles=sorted(p.roles),
        teams=sorted(p.teams),
        email=p.email,
    )


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenCreated)
def create_token(body: TokenCreate, session: SessionDep, p: CurrentPrincipal) -> TokenCreated:
    """Issue a token (admin role). The response is the only time the token is shown."""
    require_role(p, Role.ADMIN)
    row, plaintext = tokens.issue_token(
        session,
        name=body.name,
        role=body.role,
        ttl=body.ttl,
        created_by=p.actor,
        teams=body.teams,
        email=body.email,
        agent_id=body.agent_id,
    )
    return TokenCreated(**TokenOut.model_validate(row).model_dump(), token=plaintext)


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(session: SessionDep, p: CurrentPrincipal) -> list[TokenOut]:
    """Every token this service issued: its own NHIs (admin, security, auditor)."""
    require_role(p, Role.ADMIN, Role.SECURITY, Role.AUDITOR)
    return [TokenOut.model_validate(r) for r in tokens.list_tokens(session)]


@router.post("/tokens/{name}/revoke", response_model=TokenOut)
def revoke(name: TokenName, session: SessionDep, p: CurrentPrincipal) -> TokenOut:
    """Revoke a token at once (admin role)."""
    require_role(p, Role.ADMIN)
    return TokenOut.model_validate(tokens.revoke_token(session, name, p.actor))
