"""Dashboard sessions: an API token (or an OIDC sign-in) exchanged for a server-side session.

The cookie holds a random value; the database holds only its SHA-256 hash, the API token the
session came from (re-checked on every request: revoking or expiring the token ends the
session) or the OIDC principal, and the CSRF secret every form of the session carries.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import Request, Response
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from models.enums import Role
from models.orm import ApiToken, UiSession
from nhi.infra.config import Settings
from nhi.services.auth import Principal, Unauthenticated, principal_from_token
from nhi.services.transitions import note

COOKIE = "nhi_ui_session"
# Before sign-in there is no session: the sign-in form's CSRF token is a double-submit cookie.
LOGIN_COOKIE = "nhi_ui_login"
CSRF_FIELD = "csrf_token"


@dataclass(frozen=True)
class UiContext:
    """The signed-in caller of one dashboard request."""

    principal: Principal
    csrf: str
    session_hash: str


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: str, given: object) -> bool:
    """Constant-time comparison of a form's CSRF token."""
    return isinstance(given, str) and bool(given) and hmac.compare_digest(expected, given)


def set_cookie(response: Response, settings: Settings, name: str, value: str, max_age: int) -> None:
    """HttpOnly, SameSite=Lax, and Secure everywhere but dev mode (plain-HTTP localhost)."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/ui",
        httponly=True,
        secure=not settings.dev_mode,
        samesite="lax",
    )


def start_with_token(session: Session, settings: Settings, token: str) -> tuple[str, Principal]:
    """Exchange an API token for a session; the cookie value and who signed in."""
    principal = principal_from_token(session, token.strip())
    row = session.scalar(select(ApiToken).where(ApiToken.name == principal.name))
    assert row is not None  # principal_from_token just found it
    value = _start(session, settings, token_id=row.id, principal=None)
    _audit(session, value, "ui.signed_in", principal.actor, "signed in with an API token")
    return value, principal


def start_with_principal(session: Session, settings: Settings, principal: Principal) -> str:
    """A session for an OIDC sign-in (the principal as the ID token described it)."""
    stored: dict[str, Any] = {
        "name": principal.name,
        "roles": [r.value for r in sorted(principal.roles)],
        "teams": sorted(principal.teams),
        "email": principal.email,
    }
    value = _start(session, settings, token_id=None, principal=stored)
    _audit(session, value, "ui.signed_in", principal.actor, "signed in with OIDC")
    return value


def _start(
    session: Session,
    settings: Settings,
    *,
    token_id: object,
    principal: dict[str, Any] | None,
) -> str:
    value = new_secret()
    now = datetime.now(UTC)
    # Expired sessions are swept whenever someone signs in: the table stays small.
    session.execute(delete(UiSession).where(UiSession.expires_at <= now))
    session.add(
        UiSession(
            id=_hash(value),
            token_id=token_id,
            principal=principal,
            csrf_secret=new_secret(),
            expires_at=now + timedelta(seconds=settings.ui_session_ttl_seconds),
        )
    )
    return value


def resolve(session: Session, cookie: str | None) -> UiContext:
    """The caller behind a session cookie; Unauthenticated when there is none, it expired,
    was signed out, or its API token was revoked or expired."""
    if not cookie:
        raise Unauthenticated("sign in first")
    key = _hash(cookie)
    row = session.get(UiSession, key)
    now = datetime.now(UTC)
    if row is None or row.expires_at <= now:
        raise Unauthenticated("the session expired or was signed out; sign in again")
    return UiContext(
        principal=_principal(session, row, now), csrf=row.csrf_secret, session_hash=key
    )


def _principal(session: Session, row: UiSession, now: datetime) -> Principal:
    if row.token_id is not None:
        token = session.get(ApiToken, row.token_id)
        if token is None or token.revoked_at is not None or token.expires_at <= now:
            raise Unauthenticated("the session's API token was revoked or expired")
        return Principal(
            name=token.name,
            kind="token",
            roles=frozenset({Role(token.role)}),
            teams=frozenset(token.teams or ()),
            email=token.email,
            agent_id=token.agent_id,
        )
    stored = row.principal or {}
    return Principal(
        name=str(stored["name"]),
        kind="oidc",
        roles=frozenset(Role(r) for r in stored.get("roles", [])),
        teams=frozenset(str(t) for t in stored.get("teams", [])),
        email=stored.get("email"),
    )


def end(session: Session, ctx: UiContext) -> None:
    """Sign out: the row goes, so the cookie is worthless even if it was copied."""
    session.execute(delete(UiSession).where(UiSession.id == ctx.session_hash))
    note(
        session,
        subject_type="ui_session",
        subject_id=ctx.session_hash[:16],
        event="ui.signed_out",
        actor=ctx.principal.actor,
        reason="signed out of the dashboard",
    )


def _audit(session: Session, value: str, event: str, actor: str, reason: str) -> None:
    # Named by a prefix of the cookie's hash: enough to pair sign-in and sign-out, useless to
    # sign in with.
    note(
        session,
        subject_type="ui_session",
        subject_id=_hash(value)[:16],
        event=event,
        actor=actor,
        reason=reason,
    )


def cookie_of(request: Request) -> str | None:
    return request.cookies.get(COOKIE)
