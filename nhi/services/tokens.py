"""API tokens: this service's own NHIs. Issued (the plaintext shown once), listed, revoked.

Only a SHA-256 of a token is stored; `nhi.services.auth` turns a presented token into a principal.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.enums import Role
from models.orm import Agent, ApiToken
from nhi.rules.policy import RuleViolation, parse_ttl
from nhi.services.errors import NotFound
from nhi.services.transitions import note, transition

TOKEN_PREFIX = "nhi_"  # noqa: S105 - a marker, not a secret
MAX_TOKEN_LIFETIME = timedelta(days=366)


def hash_token(token: str) -> str:
    """Tokens carry 256 random bits: a plain SHA-256 makes the stored hash useless to a thief."""
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(
    session: Session,
    *,
    name: str,
    role: Role,
    ttl: int | str,
    created_by: str,
    teams: Iterable[str] | None = None,
    email: str | None = None,
    agent_id: uuid.UUID | None = None,
    now: datetime | None = None,
) -> tuple[ApiToken, str]:
    """Create a token; returns the row and the plaintext, which is never stored or shown again."""
    seconds = parse_ttl(ttl)
    if timedelta(seconds=seconds) > MAX_TOKEN_LIFETIME:
        raise RuleViolation("ttl", "a token lives at most 366 days")
    if role is Role.PLATFORM and not teams:
        # A platform token without teams used to act for every team: name them instead.
        raise RuleViolation("teams", "a platform token must name at least one team it acts for")
    if (role is Role.AGENT) != (agent_id is not None):
        raise RuleViolation(
            "agent_id", "an agent token names exactly one agent, and only an agent token does"
        )
    if agent_id is not None and session.get(Agent, agent_id) is None:
        raise RuleViolation("agent_id", f"no agent {agent_id}")
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise RuleViolation("name", f"a token named {name!r} already exists")
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = now or datetime.now(UTC)
    row = ApiToken(
        name=name,
        role=role,
        teams=sorted(set(teams)) if teams is not None else None,
        email=email.lower() if email else None,
        agent_id=agent_id,
        token_hash=hash_token(plaintext),
        created_by=created_by,
        created_at=now,
        expires_at=now + timedelta(seconds=seconds),
    )
    session.add(row)
    session.flush()
    note(
        session,
        subject_type="token",
        subject_id=row.id,
        event="token.created",
        actor=created_by,
        reason=f"{role.value} token {name}",
        details={
            "role": role.value,
            "teams": row.teams,
            "agent_id": str(agent_id) if agent_id else None,
            "expires_at": row.expires_at.isoformat(),
        },
    )
    return row, plaintext


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token this service issued, newest first."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at.desc())))


def revoke_token(session: Session, name: str, actor: str) -> ApiToken:
    """Revoke by name (idempotent); NotFound (a LookupError) for an unknown name."""
    row = session.scalar(select(ApiToken).where(ApiToken.name == name).with_for_update())
    if row is None:
        raise NotFound(f"token {name} not found")
    if row.revoked_at is None:
        transition(
            session,
            row,
            changes={"revoked_at": datetime.now(UTC)},
            event="token.revoked",
            actor=actor,
            reason=f"token {name} revoked",
        )
    return row
