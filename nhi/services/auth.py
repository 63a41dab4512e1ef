"""Who is calling, and what they may do.

Callers present a bearer token: an API token issued by this service (`nhi_...`, stored only as
a SHA-256 hash), a JWT from the company's OIDC provider, or a workload's JWT (a trusted
platform issuer's, its subject bound to one agent). Each becomes a `Principal`; the rules
below decide per action. Owner rights come from being an agent's owner or backup owner, by
email, whatever the role, except `auditor`: an auditor's credential is read-only.

What a caller may not see answers 404 exactly like what does not exist, so ids cannot be
probed; 403 is kept for what a caller can see but not do.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session, sessionmaker

from models.enums import Role
from models.orm import Agent, AgentWorkload, ApiToken, Nhi
from nhi.infra.config import Settings
from nhi.rules.owners import is_owner
from nhi.services.errors import Forbidden as Forbidden
from nhi.services.errors import NotFound
from nhi.services.tokens import MAX_TOKEN_LIFETIME as MAX_TOKEN_LIFETIME
from nhi.services.tokens import TOKEN_PREFIX as TOKEN_PREFIX
from nhi.services.tokens import hash_token as hash_token
from nhi.services.tokens import issue_token as issue_token
from nhi.services.tokens import revoke_token as revoke_token

# An approver judges a request by the agent's whole footprint, so it reads what it decides on.
_READ_ALL = frozenset({Role.AUDITOR, Role.SECURITY, Role.ADMIN, Role.APPROVER})


class Unauthenticated(Exception):
    """No valid credential: 401."""


def _not_visible(what: str) -> Exception:
    """NotFound (404), worded exactly like a missing object."""
    return NotFound(f"{what} not found")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    kind: str  # "token", "oidc" or "workload"
    roles: frozenset[Role]
    # The teams a platform caller acts for; empty acts for no team, never for all.
    teams: frozenset[str] = frozenset()
    email: str | None = None
    # The one agent an `agent` token or a bound workload acts as (None for every other principal).
    agent_id: uuid.UUID | None = None

    @property
    def actor(self) -> str:
        """How the audit trail names this caller."""
        return f"{self.kind}:{self.name}"

    @property
    def person(self) -> str:
        """The human behind the credential, for four-eyes: two credentials of one email are
        one person. Without an email, the OIDC subject (or the token) is the person."""
        return person_key(self.email, self.actor)

    def has(self, *roles: Role) -> bool:
        return bool(self.roles & set(roles))

    def acts_for(self, team: str) -> bool:
        """A platform caller's team restriction."""
        return self.has(Role.PLATFORM) and team in self.teams

    def owns(self, agent: Agent) -> bool:
        """Owner rights: the agent's owner or backup owner, by email. Never through an
        auditor's credential, which reads and changes nothing."""
        if self.has(Role.AUDITOR, Role.AGENT):
            # An agent token acts as its agent, never as a person, whatever email it carries.
            return False
        return is_owner(self.email, agent.owner_email, agent.backup_owner_email)

    def reads_everything(self) -> bool:
        return bool(self.roles & _READ_ALL)

    def can_read(self, agent: Agent) -> bool:
        return self.reads_everything() or self.acts_for(agent.team) or self.owns(agent)


def person_key(email: str | None, actor: str) -> str:
    """`email:<address>` when an email is known, else the actor (`oidc:<subject>`, `token:...`)."""
    return f"email:{email.lower()}" if email else actor


# ---- the rules, one per kind of action -------------------------------------------------------


def require(allowed: bool, reason: str) -> None:
    """Raise Forbidden with `reason` unless `allowed`."""
    if not allowed:
        raise Forbidden(reason)


def require_role(p: Principal, *roles: Role) -> None:
    names = " or ".join(r.value for r in roles)
    require(p.has(*roles), f"{p.actor} needs the {names} role")


def require_read(p: Principal, agent: Agent) -> None:
    """404, worded like a missing agent, unless `p` may see `agent`: not its owner, not
    platform for its team, not a reader of everything."""
    if not p.can_read(agent):
        raise _not_visible(f"agent {agent.id}")


def require_visible_nhi(p: Principal, nhi_id: object, agent: Agent) -> None:
    """404, worded like a missing NHI, unless `p` may see the NHI's agent."""
    if not p.can_read(agent):
        raise _not_visible(f"nhi {nhi_id}")


def require_team(p: Principal, team: str, agent: Agent | None = None) -> None:
    """Platform for `team`; when acting on an existing `agent`, 404 first if it is not even
    visible to `p`."""
    if agent is not None:
        require_read(p, agent)
    require(p.acts_for(team), f"{p.actor} is not platform for team {team}")


def require_owner(p: Principal, agent: Agent, *, security_may: bool = False) -> None:
    """Owner rights, or (for containment) the security role; 404 if `p` cannot see `agent`."""
    require_read(p, agent)
    if security_may and p.has(Role.SECURITY):
        return
    require(
        p.owns(agent),
        f"{p.actor} is not the owner or backup owner of agent {agent.name}"
        + (" (nor security)" if security_may else ""),
    )


def authorize_decision(session: Session, p: Principal, nhi: Nhi) -> Nhi:
    """Who may approve or deny `nhi`: 404 if `p` cannot see it, 403 unless `p` is an approver
    and a different person from the requester (by email or OIDC subject, not by credential)."""
    require_visible_nhi(p, nhi.id, nhi.agent)
    require_role(p, Role.APPROVER)
    require(
        nhi.requested_by != p.actor and person_of_actor(session, nhi.requested_by) != p.person,
        f"{p.actor} requested this NHI (or is the person who did) and cannot decide on it",
    )
    return nhi


# ---- API tokens ------------------------------------------------------------------------------


def principal_from_token(session: Session, token: str) -> Principal:
    """The principal of a valid API token; Unauthenticated otherwise (without saying which check
    failed, so probing learns nothing)."""
    return _token_principal(session, token)[0]


def _token_principal(session: Session, token: str) -> tuple[Principal, datetime]:
    """The principal of a valid API token and the token's expiry."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    now = datetime.now(UTC)
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        raise Unauthenticated("invalid, expired or revoked token")
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
        # Last-used evidence (stale tokens are NHIs to clean up too), at most once a minute.
        session.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
    principal = Principal(
        name=row.name,
        kind="token",
        roles=frozenset({Role(row.role)}),
        # A token issued before teams were required (teams NULL) acts for no team.
        teams=frozenset(row.teams or ()),
        email=row.email,
        agent_id=row.agent_id,
    )
    return principal, row.expires_at


# ---- a short-lived cache of token principals, for hot paths ---------------------------------

# How long a token's principal is reused without reading `api_tokens` again (issue 15: task
# credential issuance authenticates each request; the read is most of its inventory time).
# Revocation through this process ends the cached entry at once (the ORM event below); a
# revocation made by another process (another API replica, the CLI on the database) takes
# effect here within this many seconds. The token's own expiry is never exceeded.
PRINCIPAL_CACHE_S = 5.0
_PRINCIPAL_CACHE_MAX = 4096


class PrincipalCache:
    """Token principals by token hash, each until min(now + ttl, the token's expiry).

    Thread-safe. A token revoked in this process is tombstoned: never served from the cache
    again (every use reads the database), even if that revocation was rolled back."""

    def __init__(self, ttl_s: float = PRINCIPAL_CACHE_S) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._revoked: set[str] = set()
        self._lock = threading.Lock()

    def get(self, token_hash: str) -> Principal | None:
        now = time.monotonic()
        with self._lock:
            found = self._entries.get(token_hash)
            if found is None:
                return None
            if now >= found[0]:
                del self._entries[token_hash]
                return None
            return found[1]

    def put(self, token_hash: str, principal: Principal, expires_at: datetime) -> None:
        left = (expires_at - datetime.now(UTC)).total_seconds()
        if left <= 0 or self.ttl_s <= 0:
            return
        until = time.monotonic() + min(self.ttl_s, left)
        with self._lock:
            if token_hash in self._revoked:
                return
            if len(self._entries) >= _PRINCIPAL_CACHE_MAX:
                self._entries.clear()  # bounded: a flood of tokens only costs re-reads
            self._entries[token_hash] = (until, principal)

    def forget(self, token_hash: str) -> None:
        """Drop a token for good (it was revoked in this process)."""
        with self._lock:
            self._entries.pop(token_hash, None)
            self._revoked.add(token_hash)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


principal_cache = PrincipalCache()


@event.listens_for(ApiToken.revoked_at, "set")
def _forget_revoked(target: ApiToken, value: object, _old: object, _initiator: object) -> None:
    # Any revocation through the ORM in this process (the API route, `nhi dev`, tests):
    # tombstoned before its transaction even commits, so no request re-caches the token
    # between the revocation and its commit.
    if value is not None and target.token_hash:
        principal_cache.forget(target.token_hash)


def cached_principal_from_token(sessions: sessionmaker[Session], token: str) -> Principal:
    """`principal_from_token`, reusing a principal for up to PRINCIPAL_CACHE_S (see above):
    no database round trip for a token seen moments ago."""
    digest = hash_token(token)
    found = principal_cache.get(digest)
    if found is not None:
        return found
    with sessions.begin() as session:
        principal, expires_at = _token_principal(session, token)
    principal_cache.put(digest, principal, expires_at)
    return principal


def person_of_actor(session: Session, actor: str) -> str:
    """The person behind an audit actor: an API token's email when it has one, else the actor
    itself (an OIDC subject carries no email once recorded)."""
    kind, _, name = actor.partition(":")
    if kind == "token":
        email = session.scalar(select(ApiToken.email).where(ApiToken.name == name))
        return person_key(email, actor)
    return actor


# ---- OIDC ------------------------------------------------------------------------------------


_JWT_ALGORITHMS = ["RS256", "ES256", "PS256"]


class _Jwks:
    """An issuer's signing keys: a JWKS given inline, or fetched from its URL (cached 5 min)."""

    def __init__(self, jwks: dict[str, Any] | None, url: str | None) -> None:
        self._keys: dict[str, Any] = {}
        self._client: jwt.PyJWKClient | None = None
        if jwks is not None:
            for key in jwt.PyJWKSet.from_dict(jwks).keys:
                self._keys[key.key_id or ""] = key.key
        elif url:
            self._client = jwt.PyJWKClient(url, cache_keys=True, lifespan=300)
        else:
            raise ValueError("a JWKS or a JWKS URL is needed")

    def key(self, token: str) -> Any:
        if self._client is not None:
            return self._client.get_signing_key_from_jwt(token).key
        kid = jwt.get_unverified_header(token).get("kid") or ""
        if kid not in self._keys:
            raise Unauthenticated("token signed with an unknown key")
        return self._keys[kid]

    def decode(self, token: str, *, issuer: str, audience: str) -> dict[str, Any]:
        """The claims of a JWT whose signature, expiry, issuer and audience hold."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.key(token),
                algorithms=_JWT_ALGORITHMS,
                audience=audience,
                issuer=issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except (jwt.PyJWTError, ValueError) as err:
            raise Unauthenticated(f"invalid token: {err}") from None
        return claims


class OidcVerifier:
    """Checks JWTs from the configured issuer: signature (JWKS), expiry, issuer and audience."""

    def __init__(self, settings: Settings) -> None:
        if not (settings.oidc_issuer and settings.oidc_audience):
            raise ValueError("NHI_OIDC_ISSUER and NHI_OIDC_AUDIENCE are both needed")
        if not (settings.oidc_jwks or settings.oidc_jwks_url):
            raise ValueError("NHI_OIDC_JWKS or NHI_OIDC_JWKS_URL is needed")
        self._settings = settings
        self.issuer = settings.oidc_issuer
        self._jwks = _Jwks(
            json.loads(settings.oidc_jwks) if settings.oidc_jwks else None, settings.oidc_jwks_url
        )

    def principal(self, token: str) -> Principal:
        s = self._settings
        assert s.oidc_issuer and s.oidc_audience  # checked in __init__
        claims = self._jwks.decode(token, issuer=s.oidc_issuer, audience=s.oidc_audience)
        roles = frozenset(
            Role(r)
            for r in _strings(claims.get(s.oidc_roles_claim))
            # `agent` needs a binding to one agent, which an agent token or a bound workload
            # identity (WorkloadVerifier) carries; a person's claims never grant it.
            if r in Role._value2member_map_ and r != Role.AGENT
        )
        teams = frozenset(_strings(claims.get(s.oidc_teams_claim)))
        email = claims.get(s.oidc_email_claim)
        return Principal(
            name=str(claims["sub"]),
            kind="oidc",
            roles=roles,
            teams=teams,
            email=str(email).lower() if email else None,
        )


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [str(v) for v in value]
    return []


# ---- workload identities (issue 15) ----------------------------------------------------------

WORKLOAD_KIND = "workload"
# An actor column holds 254 characters: `workload:<issuer>#<subject>` must fit.
ACTOR_MAX = 254


def workload_name(issuer: str, subject: str) -> str:
    """How a workload principal is named: `<issuer>#<subject>` (its actor: `workload:...`)."""
    return f"{issuer}#{subject}"


class WorkloadVerifier:
    """JWTs of workloads: a token of a trusted issuer (`NHI_WORKLOAD_OIDC_ISSUERS`) whose
    signature, expiry, issuer and audience hold, and whose subject is bound to one agent
    (`agent_workloads`), acts as that agent: role `agent`, no email, no teams. Like an `agent`
    token it issues task credentials for its agent's NHIs and nothing else.

    The binding is read on every request (one indexed row), so removing it refuses the very
    next request; the JWT's own expiry bounds everything else."""

    def __init__(self, settings: Settings) -> None:
        self._issuers = {e.issuer: e for e in settings.workload_oidc_issuers}
        self._jwks = {e.issuer: _Jwks(e.jwks, e.jwks_url) for e in settings.workload_oidc_issuers}

    def claims(self, token: str, *, people_issuer: str | None) -> dict[str, Any] | None:
        """The verified claims when `token` is meant for this path, else None (the company
        IdP's path then judges it). Routed by the unverified (iss, aud), then verified against
        that issuer alone: a token of an issuer listed here goes here when it carries the
        issuer's workload audience, or whenever that issuer is not also the company IdP's."""
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return None
        issuer = unverified.get("iss")
        entry = self._issuers.get(issuer) if isinstance(issuer, str) else None
        if entry is None:
            return None
        aud = unverified.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if entry.audience not in audiences and entry.issuer == people_issuer:
            return None
        return self._jwks[entry.issuer].decode(token, issuer=entry.issuer, audience=entry.audience)

    @staticmethod
    def principal(session: Session, claims: dict[str, Any]) -> Principal:
        """The agent the verified token's subject is bound to; Unauthenticated when none."""
        issuer, subject = str(claims["iss"]), str(claims["sub"])
        agent_id = session.scalar(
            select(AgentWorkload.agent_id).where(
                AgentWorkload.issuer == issuer, AgentWorkload.subject == subject
            )
        )
        if agent_id is None:
            raise Unauthenticated(
                f"workload {subject!r} of {issuer} is not bound to an agent "
                "(nhi agents workloads add AGENT_ID --issuer ... --subject ...)"
            )
        return Principal(
            name=workload_name(issuer, subject),
            kind=WORKLOAD_KIND,
            roles=frozenset({Role.AGENT}),
            agent_id=agent_id,
        )


def principal_from_jwt(
    sessions: sessionmaker[Session],
    token: str,
    oidc: OidcVerifier | None,
    workloads: WorkloadVerifier | None,
) -> Principal:
    """A JWT's principal: a workload bound to an agent, or a person of the company IdP."""
    if workloads is not None:
        claims = workloads.claims(token, people_issuer=oidc.issuer if oidc else None)
        if claims is not None:
            with sessions.begin() as session:
                return workloads.principal(session, claims)
    if oidc is None:
        raise Unauthenticated(
            "OIDC tokens are not accepted here (NHI_OIDC_ISSUER is not set, and the token is "
            "not from an issuer of NHI_WORKLOAD_OIDC_ISSUERS)"
        )
    return oidc.principal(token)
