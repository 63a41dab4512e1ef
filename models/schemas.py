"""HTTP API request and response bodies (also what `nhi --json` prints)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from models.contracts import ScopeStatement
from models.enums import AgentCategory, AgentStatus, Environment, NhiKind, NhiStatus, Platform

_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def _email(value: str) -> str:
    if not _EMAIL_RE.match(value):
        raise ValueError("must be an email address such as 'ana@example.com'")
    return value.lower()


Email = Annotated[
    str, StringConstraints(strip_whitespace=True, max_length=254), AfterValidator(_email)
]
AgentName = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$"),
    Field(description="Lower-case letters, digits and dashes, 3-63 characters."),
]

TargetName = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,62}$"),
    Field(description="Lower-case letter, then lower-case letters, digits and dashes (1-63)."),
]
# libpq's sslmode values.
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class Body(BaseModel):
    """Request bodies refuse unknown fields, so a typo is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


class AgentCreate(Body):
    """Register an AI agent and the people answerable for it."""

    name: AgentName
    category: AgentCategory
    environment: Environment
    owner_email: Email
    owner_slack_id: Annotated[str, StringConstraints(pattern=r"^[UW][A-Z0-9]{2,30}$")] | None = None
    backup_owner_email: Email | None = None
    team: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
    purpose: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
    expected_end_at: datetime | None = Field(
        default=None, description="When the agent's task is expected to end (timezone required)."
    )
    invokers: list[Annotated[str, StringConstraints(min_length=1, max_length=254)]] = Field(
        default_factory=list, max_length=100, description="Principals who may invoke the agent."
    )


class NhiCreate(Body):
    """Request one identity for an agent."""

    platform: Platform
    kind: NhiKind
    scope: list[ScopeStatement] = Field(min_length=1, max_length=20)
    ttl: int | str | None = Field(
        default=None, description="Seconds or a duration ('30d', '12h'); policy default if unset."
    )
    allowed_cidrs: list[str] = Field(default_factory=list, max_length=50)
    trust_principal: str | None = Field(
        default=None, description="iam_role only: the agent runtime's principal ARN or service."
    )
    target: str | None = Field(
        default=None,
        max_length=63,
        description="postgres_role only: the registered target database.",
    )


class PolicyIn(Body):
    """One policy, as `nhi policies apply FILE` sends it."""

    platform: Platform
    kind: NhiKind
    environment: Environment
    allowed: bool
    default_ttl: int | str
    max_lifetime: int | str
    rotation_period: int | str | None = None
    reminder_offsets: list[int | str] = Field(default_factory=list, max_length=10)
    grace_period: int | str = 0
    max_session_duration: int | str = 3600
    allow_resource_wildcard: bool = False
    forbidden_actions: list[str] = Field(default_factory=list, max_length=200)
    sensitive_actions: list[str] = Field(default_factory=list, max_length=200)


class PolicyApply(Body):
    """A set of policies to create or replace."""

    policies: list[PolicyIn] = Field(min_length=1, max_length=100)


class TargetIn(Body):
    """Register a Postgres target: where to reach it as an admin, and where its admin password
    is (an environment variable or a Secrets Manager secret), never the password itself."""

    # Pydantic's own messages would quote the input: a DSN pasted with a password in it.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: TargetName
    dsn: str = Field(
        max_length=1024,
        description="`postgresql://admin_user@host:port/dbname`, without a password.",
    )
    password_env: str | None = Field(
        default=None, description="Environment variable of the worker holding the password."
    )
    password_secret: str | None = Field(
        default=None,
        description="Secrets Manager ARN or name of the password (plain, or RDS-style JSON).",
    )
    sslmode: SslMode = "prefer"
    connection_limit: int = Field(
        default=10, ge=1, le=1000, description="At most this many admin connections at once."
    )


class Out(BaseModel):
    """Responses read straight from ORM rows."""

    model_config = ConfigDict(from_attributes=True)


class NhiOut(Out):
    """An NHI as the inventory knows it. `credential_ref` is where the credential is, never it."""

    id: uuid.UUID
    agent_id: uuid.UUID
    platform: Platform
    kind: NhiKind
    name: str
    status: NhiStatus
    status_reason: str | None
    external_id: str | None
    credential_ref: str | None
    granted_scope: list[ScopeStatement]
    allowed_cidrs: list[str]
    trust_principal: str | None
    workflow_id: str | None
    requested_by: str
    created_at: datetime
    activated_at: datetime | None
    expires_at: datetime
    max_lifetime_at: datetime
    last_rotated_at: datetime | None
    last_used_at: datetime | None
    decommissioned_at: datetime | None
    rotation_period_seconds: int | None
    target: str | None = None


class NhiAccepted(BaseModel):
    """202 answer to a provisioning request."""

    id: uuid.UUID
    workflow_id: str
    status: NhiStatus
    expires_at: datetime


class AgentOut(Out):
    """An agent without its NHIs."""

    id: uuid.UUID
    name: str
    category: AgentCategory
    environment: Environment
    owner_email: str
    owner_slack_id: str | None
    backup_owner_email: str | None
    team: str
    purpose: str
    expected_end_at: datetime | None
    invokers: list[str]
    status: AgentStatus
    created_by: str
    created_at: datetime


class AgentDetail(AgentOut):
    """An agent with every NHI it holds."""

    nhis: list[NhiOut]


class PolicyOut(Out):
    """A stored policy."""

    platform: Platform
    kind: NhiKind
    environment: Environment
    allowed: bool
    default_ttl_seconds: int
    max_lifetime_seconds: int
    rotation_period_seconds: int | None
    reminder_offsets_seconds: list[int]
    grace_period_seconds: int
    max_session_duration_seconds: int
    allow_resource_wildcard: bool
    forbidden_actions: list[str]
    sensitive_actions: list[str]
    updated_by: str
    updated_at: datetime


class TargetOut(Out):
    """A registered target: how it is reached and where its password is, never the password."""

    name: str
    host: str
    port: int
    dbname: str
    admin_user: str
    password_ref: str
    sslmode: SslMode
    connection_limit: int
    source: Literal["inventory", "settings"]
    created_by: str | None
    created_at: datetime | None


class AuditOut(Out):
    """One audit event."""

    id: int
    subject_type: str
    subject_id: str
    event: str
    actor: str
    reason: str
    details: dict[str, Any]
    created_at: datetime


class PromptOut(Out):
    """A renewal prompt and its answer."""

    id: uuid.UUID
    nhi_id: uuid.UUID
    kind: str
    for_expires_at: datetime
    offset_seconds: int
    reason: str
    deliveries: list[dict[str, Any]]
    status: str
    decision: str | None
    decided_by: str | None
    decided_at: datetime | None
    created_at: datetime
