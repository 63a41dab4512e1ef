"""Pure rules for task credentials: names, TTLs and how a narrowed scope stays inside its NHI's.

Shared by the issuing service (API process) and the reaper (worker), so both agree on what a
task role is called and how it is marked, without either importing the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from models.contracts import ScopeStatement
from models.enums import NhiKind
from nhi.rules.pg_grants import Grant, parse_grants
from nhi.rules.policy import (
    RuleViolation,
    identity_policy_document,
    parse_ttl,
    policy_size,
)

TASK_ROLE_PREFIX = "nhit_"
TASK_TTL_DEFAULT = 15 * 60
# STS refuses AssumeRole with DurationSeconds below 900; Postgres has no minimum, but a shorter
# credential than this is not useful for a task and would only make expiry races likelier.
AWS_MIN_TTL_SECONDS = 900
TASK_TTL_MIN_SECONDS = 60


# The parent named by a Postgres task role made ahead (a stock role, NOLOGIN, not yet any
# credential's): no NHI has it, so sweeps judge a leftover one as a task role of no live NHI.
STOCK_NHI_ID = uuid.UUID(int=0)


def task_role_name(credential_id: uuid.UUID) -> str:
    """The Postgres login role of one task credential: `nhit_` + the id's hex (37 chars,
    within Postgres' 63). Derived from the id alone so the reaper needs nothing else."""
    return TASK_ROLE_PREFIX + credential_id.hex


def is_task_role_name(name: str) -> bool:
    """Whether a role is named like a task credential's login role."""
    rest = name.removeprefix(TASK_ROLE_PREFIX)
    if rest == name or len(rest) != 32:
        return False
    try:
        return uuid.UUID(hex=rest).hex == rest
    except ValueError:
        return False


def task_session_name(credential_id: uuid.UUID) -> str:
    """The STS RoleSessionName of one task credential (2..64 chars of `[\\w+=,.@-]`)."""
    return TASK_ROLE_PREFIX + credential_id.hex


def parse_task_ttl(value: int | str | None, *, max_seconds: int) -> int:
    """Seconds of a task credential's life from `900`, `"900s"`, `"15m"` or `"1h"`; None means
    the default (15 min, or the policy maximum when that is lower).

    Raises:
        RuleViolation: naming `ttl`, for a malformed value or one outside the policy's bounds.
    """
    if value is None:
        return min(TASK_TTL_DEFAULT, max_seconds)
    seconds = parse_ttl(value)
    if seconds < TASK_TTL_MIN_SECONDS:
        raise RuleViolation("ttl", f"must be at least {TASK_TTL_MIN_SECONDS} seconds")
    if seconds > max_seconds:
        raise RuleViolation(
            "ttl",
            f"{seconds} s exceeds the policy's task_credential_max_ttl of {max_seconds} s",
        )
    return seconds


# Task ids end up in STS session tags (and the audit trail): tag values allow only these.
TASK_ID_RE = re.compile(r"^[A-Za-z0-9_.:/=+@-]{1,128}$")
TASK_KINDS = frozenset({NhiKind.IAM_ROLE, NhiKind.POSTGRES_ROLE, NhiKind.GITHUB_APP_TOKEN})


def check_task_id(task_id: str | None) -> str | None:
    """A caller's task id, as session tags and the audit trail may carry it."""
    if task_id is not None and not TASK_ID_RE.fullmatch(task_id):
        raise RuleViolation(
            "task_id", "must be 1-128 characters of letters, digits and _ . : / = + @ -"
        )
    return task_id


# ---- narrowing: a task's scope within its NHI's -------------------------------------------


def _pattern_covers(outer: str, inner: str) -> bool:
    """Whether every string `inner` (an IAM pattern) matches is matched by `outer`, case
    blind. A wildcard in `inner` is covered only by a `*` of `outer`: `s3:Get*` lies within
    `s3:*`, never within `s3:Get?`."""
    regex = "".join(
        ".*" if c == "*" else "[^*?]" if c == "?" else re.escape(c) for c in outer.lower()
    )
    return re.fullmatch(regex, inner.lower()) is not None


def check_aws_narrowing(
    narrowed: Sequence[ScopeStatement], granted: Sequence[ScopeStatement]
) -> None:
    """Every action and resource of each narrowed statement lies within one granted
    statement (action and resource of the same statement: a grant of s3:GetObject on one
    bucket says nothing of another). AWS intersects a session policy with the role's own
    anyway; this refuses a request that would silently get less than it asked for.

    Raises:
        RuleViolation: naming `scope[i].actions[j]` or `scope[i].resources[j]`.
    """
    for i, statement in enumerate(narrowed):
        candidates = list(granted)
        for j, action in enumerate(statement.actions):
            candidates = [
                g for g in candidates if any(_pattern_covers(a, action) for a in g.actions)
            ]
            if not candidates:
                raise RuleViolation(
                    f"scope[{i}].actions[{j}]",
                    f"{action!r} is not within the NHI's scope (a task credential only narrows)",
                )
        for j, resource in enumerate(statement.resources):
            if not any(_pattern_covers(r, resource) for g in candidates for r in g.resources):
                raise RuleViolation(
                    f"scope[{i}].resources[{j}]",
                    f"{resource!r} is not within the NHI's scope for "
                    f"{', '.join(statement.actions)} (a task credential only narrows)",
                )


def _grant_covered(grant: Grant, held: set[Grant]) -> bool:
    if grant.on_schema:
        # The provider grants USAGE on the schema of every table grant alongside it.
        return any(h.schema == grant.schema for h in held)
    return grant in held or Grant(grant.privilege, grant.schema, None) in held


def check_postgres_narrowing(
    narrowed: Sequence[ScopeStatement], granted: Sequence[ScopeStatement]
) -> None:
    """Every grant the narrowed scope means is one the NHI's scope holds: the same privilege
    on the same table, or on `schema.*` of its schema.

    Raises:
        RuleViolation: naming `scope[i].actions[j]` or `scope[i].resources[j]`.
    """
    held = set(parse_grants(list(granted)))
    for i, statement in enumerate(narrowed):
        for j, resource in enumerate(statement.resources):
            for k, action in enumerate(statement.actions):
                for grant in parse_grants([ScopeStatement(actions=[action], resources=[resource])]):
                    if _grant_covered(grant, held):
                        continue
                    where = (
                        f"scope[{i}].resources[{j}]"
                        if any(h.privilege == grant.privilege for h in held)
                        else f"scope[{i}].actions[{k}]"
                    )
                    raise RuleViolation(
                        where,
                        f"{grant.privilege} on {resource!r} is not within the NHI's scope "
                        "(a task credential only narrows)",
                    )


# STS's limit on an AssumeRole session policy (plain text, whitespace excluded).
SESSION_POLICY_LIMIT = 2048


def session_policy(grant: TaskGrant) -> dict[str, Any] | None:
    """The AssumeRole session policy of a narrowed AWS task credential (None: the role's whole
    scope): the narrowed statements, pinned like the role's own to its CIDRs and expiry.

    Raises:
        RuleViolation: naming `scope`, when STS would refuse it as too large.
    """
    if grant.scope is None:
        return None
    document = identity_policy_document(
        list(grant.scope), list(grant.allowed_cidrs), grant.expires_at
    )
    if policy_size(document) > SESSION_POLICY_LIMIT:
        raise RuleViolation(
            "scope",
            f"the narrowed scope makes a session policy over STS's {SESSION_POLICY_LIMIT} "
            "characters; name fewer actions or resources",
        )
    return document


def source_identity(agent_id: uuid.UUID) -> str:
    """STS SourceIdentity (2-64 chars of `[\\w+=,.@-]`): the agent, kept by AWS across role
    chaining and written to CloudTrail."""
    return f"agent-{agent_id}"


def session_tags(grant: TaskGrant) -> dict[str, str]:
    """STS session tags: CloudTrail names the agent, the task and the credential."""
    tags = {
        "nhi:agent-id": str(grant.agent_id),
        "nhi:nhi-id": str(grant.nhi_id),
        "nhi:task-credential-id": str(grant.credential_id),
    }
    if grant.task_id:
        tags["nhi:task-id"] = grant.task_id
    return tags


# ---- SCRAM-SHA-256 verifiers, computed client side ----------------------------------------

SCRAM_ITERATIONS = 4096


def scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """The `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` verifier Postgres
    stores (RFC 5802/7677), so only the verifier reaches the server and its statement log.
    The password must be ASCII without control characters (SASLprep is then the identity):
    the ones this service generates are."""
    if not password.isascii() or not password.isprintable():
        raise ValueError("only printable ASCII passwords are hashed here (SASLprep skipped)")
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def new_password() -> str:
    """A task credential's password: 256 random bits, URL-safe ASCII."""
    return secrets.token_urlsafe(32)


# ---- what a platform is asked for, and what it hands back once ----------------------------


@dataclass(frozen=True)
class TaskGrant:
    """What to issue: derived from the inventory by the service, never holding a secret."""

    credential_id: uuid.UUID
    nhi_id: uuid.UUID
    agent_id: uuid.UUID
    kind: NhiKind
    identity_name: str  # the NHI's IAM role name or Postgres group role
    external_id: str  # the role's ARN, or the target's DSN and group
    target: str | None
    task_id: str | None
    issued_at: datetime
    expires_at: datetime
    ttl_seconds: int
    # The NHI's granted scope, and the narrowed statements (None: the whole scope).
    granted_scope: tuple[ScopeStatement, ...] = ()
    scope: tuple[ScopeStatement, ...] | None = None
    allowed_cidrs: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """Where the credential lives on the platform (login role / STS session name)."""
        return task_role_name(self.credential_id)


@dataclass(frozen=True)
class IssuedCredential:
    """The credential, shown once: `secret` holds the parts the caller needs (a password, or
    STS keys); `public` what may also be recorded (role name, source identity, session tags).
    Neither `repr` nor `str` shows the secret."""

    expires_at: datetime
    secret: Mapping[str, str | int] = field(repr=False)
    public: Mapping[str, object] = field(default_factory=dict)


# The error type of a platform that refuses a task credential because the parent NHI is
# quarantined there (its own logins locked out): the service answers 409, not 502.
QUARANTINED_ON_PLATFORM = "IdentityQuarantined"


class PreparedCredential(Protocol):
    """A credential made on its platform but not yet usable by anyone: `commit` makes it so
    (and returns it), `rollback` leaves nothing behind. Exactly one of them, once."""

    def commit(self) -> IssuedCredential: ...

    def rollback(self) -> None: ...


class TaskIssuer(Protocol):
    """What the service needs of a platform's task-credential provider."""

    def issue(self, grant: TaskGrant) -> IssuedCredential: ...


@runtime_checkable
class TwoPhaseIssuer(TaskIssuer, Protocol):
    """A provider that can also make a credential in two steps (`prepare`, then commit), so
    the service writes its row meanwhile and the credential exists only after its row."""

    def prepare(self, grant: TaskGrant) -> PreparedCredential: ...
