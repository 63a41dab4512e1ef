"""Inventory tables. The schema itself is built only by Alembic (`migrations/`)."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar, get_args

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from models.enums import (
    ActivityKind,
    ActivitySource,
    AgentCategory,
    AgentStatus,
    CredentialDelivery,
    Environment,
    IncidentStatus,
    InvokerChannel,
    InvokerKind,
    NhiKind,
    NhiStatus,
    Platform,
    Role,
    Severity,
)
from models.schemas import SslMode

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _one_of(column: str, values: type[Any]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


E = TypeVar("E", bound=StrEnum)


class EnumText(TypeDecorator[E]):
    """A `StrEnum` stored as its value in a plain `String(length)` column.

    The database keeps the column type and the CHECK constraint that lists the values (so
    `alembic check` sees no change and SQL readers see text); Python reads and writes the enum,
    so a status is typed from the row to the API. A value outside the enum is refused before
    it reaches the database.
    """

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        del dialect  # the same text on every dialect
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        del dialect
        return None if value is None else self.enum(value)


class Base(DeclarativeBase):
    """Declarative base with a naming convention so migrations name constraints stably."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
        list[Any]: JSONB,
        list[str]: JSONB,
        list[int]: JSONB,
    }


class Agent(Base):
    """An AI agent: the thing NHIs are made for, with the people answerable for it."""

    __tablename__ = "agents"
    __table_args__ = (
        UniqueConstraint("name", "environment", name="uq_agents_name_environment"),
        CheckConstraint(_one_of("category", AgentCategory), name="category"),
        CheckConstraint(_one_of("environment", Environment), name="environment"),
        CheckConstraint(_one_of("status", AgentStatus), name="status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(63))
    category: Mapped[AgentCategory] = mapped_column(EnumText(AgentCategory, 32))
    environment: Mapped[Environment] = mapped_column(EnumText(Environment, 16))
    owner_email: Mapped[str] = mapped_column(String(254), index=True)
    owner_slack_id: Mapped[str | None] = mapped_column(String(32))
    backup_owner_email: Mapped[str | None] = mapped_column(String(254))
    team: Mapped[str] = mapped_column(String(100))
    purpose: Mapped[str] = mapped_column(Text)
    expected_end_at: Mapped[datetime | None]
    invokers: Mapped[list[str]] = mapped_column(default=list)
    status: Mapped[AgentStatus] = mapped_column(
        EnumText(AgentStatus, 16), default=AgentStatus.ACTIVE
    )
    created_by: Mapped[str] = mapped_column(String(254))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    nhis: Mapped[list[Nhi]] = relationship(back_populates="agent", order_by="Nhi.created_at")


class Nhi(Base):
    """One non-human identity on one platform, and its lease."""

    __tablename__ = "nhis"
    __table_args__ = (
        CheckConstraint(_one_of("platform", Platform), name="platform"),
        CheckConstraint(_one_of("kind", NhiKind), name="kind"),
        CheckConstraint(_one_of("status", NhiStatus), name="status"),
        CheckConstraint(_one_of("delivery", CredentialDelivery), name="delivery"),
        CheckConstraint("expires_at <= max_lifetime_at", name="expiry_within_max_lifetime"),
        # Due-work selection (reminders, expiry, sweeps) scans by status and deadline.
        Index("ix_nhis_status_expires_at", "status", "expires_at"),
        # The /metrics gauges (migration 0009): overdue and expiring usable NHIs as an
        # index-only range scan, and the few revoke_failed ones.
        Index(
            "ix_nhis_usable_expires_at",
            "expires_at",
            postgresql_include=["platform", "kind", "agent_id"],
            postgresql_where=text("status IN ('active', 'rotating', 'expiring')"),
        ),
        Index("ix_nhis_revoke_failed", "id", postgresql_where=text("status = 'revoke_failed'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"), index=True)
    platform: Mapped[Platform] = mapped_column(EnumText(Platform, 32))
    kind: Mapped[NhiKind] = mapped_column(EnumText(NhiKind, 32))
    name: Mapped[str] = mapped_column(String(64), unique=True)
    external_id: Mapped[str | None] = mapped_column(String(2048))
    granted_scope: Mapped[list[Any]] = mapped_column(default=list)
    allowed_cidrs: Mapped[list[str]] = mapped_column(default=list)
    trust_principal: Mapped[str | None] = mapped_column(String(2048))
    credential_ref: Mapped[str | None] = mapped_column(String(2048))
    status: Mapped[NhiStatus] = mapped_column(EnumText(NhiStatus, 32), default=NhiStatus.REQUESTED)
    status_reason: Mapped[str | None] = mapped_column(Text)
    workflow_id: Mapped[str | None] = mapped_column(String(255))
    requested_by: Mapped[str] = mapped_column(String(254))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    activated_at: Mapped[datetime | None]
    expires_at: Mapped[datetime]
    max_lifetime_at: Mapped[datetime]
    last_rotated_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    decommissioned_at: Mapped[datetime | None]
    rotation_period_seconds: Mapped[int | None] = mapped_column(Integer)
    # postgres_role only: the registered target's name. No foreign key, because a target may
    # be defined in settings rather than in the `targets` table.
    target: Mapped[str | None] = mapped_column(String(63), index=True)
    # Where the credential is delivered (migration 0015): fixed at request time, from the
    # request or the policy, so every later secret name derives from it.
    delivery: Mapped[CredentialDelivery] = mapped_column(
        EnumText(CredentialDelivery, 32),
        default=CredentialDelivery.AWS_SECRETS_MANAGER,
        server_default=CredentialDelivery.AWS_SECRETS_MANAGER.value,
    )

    agent: Mapped[Agent] = relationship(back_populates="nhis")


class Policy(Base):
    """What may be created for a (platform, kind, environment), and for how long."""

    __tablename__ = "policies"
    __table_args__ = (
        UniqueConstraint("platform", "kind", "environment", name="uq_policies_target"),
        CheckConstraint(_one_of("platform", Platform), name="platform"),
        CheckConstraint(_one_of("kind", NhiKind), name="kind"),
        CheckConstraint(_one_of("environment", Environment), name="environment"),
        CheckConstraint(_one_of("delivery", CredentialDelivery), name="delivery"),
        # Every TTL is bounded: nothing lives longer than a year, whatever a policy file says.
        CheckConstraint(
            "default_ttl_seconds > 0 AND default_ttl_seconds <= max_lifetime_seconds",
            name="default_ttl_bounded",
        ),
        CheckConstraint(
            "max_lifetime_seconds > 0 AND max_lifetime_seconds <= 31622400",
            name="max_lifetime_bounded",
        ),
        CheckConstraint(
            "rotation_period_seconds IS NULL OR rotation_period_seconds > 0",
            name="rotation_period_positive",
        ),
        CheckConstraint("grace_period_seconds >= 0", name="grace_period_nonnegative"),
        CheckConstraint(
            "max_session_duration_seconds BETWEEN 3600 AND 43200",
            name="max_session_duration_range",
        ),
        CheckConstraint(
            "task_credential_max_ttl_seconds BETWEEN 60 AND 43200",
            name="task_credential_max_ttl_range",
        ),
        # Approvals (issue 16, migration 0011).
        CheckConstraint("approvals_required IN (1, 2)", name="approvals_required_range"),
        CheckConstraint(
            "approval_window_seconds BETWEEN 60 AND 2592000", name="approval_window_range"
        ),
        CheckConstraint(
            "risk_threshold IS NULL OR risk_threshold BETWEEN 0 AND 100",
            name="risk_threshold_range",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    platform: Mapped[Platform] = mapped_column(EnumText(Platform, 32))
    kind: Mapped[NhiKind] = mapped_column(EnumText(NhiKind, 32))
    environment: Mapped[Environment] = mapped_column(EnumText(Environment, 16))
    allowed: Mapped[bool] = mapped_column(Boolean)
    default_ttl_seconds: Mapped[int] = mapped_column(Integer)
    max_lifetime_seconds: Mapped[int] = mapped_column(Integer)
    rotation_period_seconds: Mapped[int | None] = mapped_column(Integer)
    reminder_offsets_seconds: Mapped[list[int]] = mapped_column(default=list)
    grace_period_seconds: Mapped[int] = mapped_column(Integer)
    max_session_duration_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    allow_resource_wildcard: Mapped[bool] = mapped_column(Boolean, default=False)
    # Sweeps put back the granted scope when the platform's permissions drifted from it.
    revert_drift: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    forbidden_actions: Mapped[list[str]] = mapped_column(default=list)
    sensitive_actions: Mapped[list[str]] = mapped_column(default=list)
    # AWS account ids whose principals an iam_role may trust (empty: this service's own only).
    allowed_trust_accounts: Mapped[list[str]] = mapped_column(
        default=list, server_default=text("'[]'::jsonb")
    )
    # github_app_token: the repositories (`owner/repo`, `owner/*`) a scope may name; empty
    # allows none (migration 0014).
    allowed_resources: Mapped[list[str]] = mapped_column(
        default=list, server_default=text("'[]'::jsonb")
    )
    # Whether an iam_role may trust an AWS service principal (`bedrock.amazonaws.com`).
    allow_service_principals: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default="false"
    )
    # Task credentials (issue 15): whether they may be derived from this policy's NHIs, and
    # how long one lives at most.
    allow_task_credentials: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default="false"
    )
    task_credential_max_ttl_seconds: Mapped[int] = mapped_column(
        Integer, default=3600, server_default="3600"
    )
    # Where this policy's NHIs get their credential unless the request says (migration 0015).
    delivery: Mapped[CredentialDelivery] = mapped_column(
        EnumText(CredentialDelivery, 32),
        default=CredentialDelivery.AWS_SECRETS_MANAGER,
        server_default=CredentialDelivery.AWS_SECRETS_MANAGER.value,
    )
    # Who decides requests that need approval: Slack user groups (`@handle` or `S...`),
    # channels (`#name` or `C...`) or emails. Empty: any `approver` through the API.
    approvers: Mapped[list[str]] = mapped_column(default=list, server_default=text("'[]'::jsonb"))
    # Two distinct approvers for, typically, production.
    approvals_required: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # No decision within this window denies the request.
    approval_window_seconds: Mapped[int] = mapped_column(
        Integer, default=259200, server_default="259200"
    )
    # A request that would raise the agent's risk score past this needs approval (None: none).
    risk_threshold: Mapped[int | None] = mapped_column(Integer)
    updated_by: Mapped[str] = mapped_column(String(254))
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


class Target(Base):
    """A Postgres database where `postgres_role` NHIs are created, and how to reach it as an
    admin. `password_ref` says where the admin password is (`env:VAR` or `secret:ARN`); the
    password itself is never stored here."""

    __tablename__ = "targets"
    __table_args__ = (
        CheckConstraint(
            f"sslmode IN ({', '.join(repr(m) for m in get_args(SslMode))})", name="sslmode"
        ),
        CheckConstraint("connection_limit BETWEEN 1 AND 1000", name="connection_limit_range"),
        CheckConstraint("port BETWEEN 1 AND 65535", name="port_range"),
        # A reference, never a password: refuse anything else even if the API were bypassed.
        CheckConstraint("password_ref ~ '^(env|secret):.'", name="password_ref"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    dbname: Mapped[str] = mapped_column(String(63))
    admin_user: Mapped[str] = mapped_column(String(63))
    password_ref: Mapped[str] = mapped_column(Text)
    sslmode: Mapped[str] = mapped_column(String(16), default="prefer", server_default="prefer")
    connection_limit: Mapped[int] = mapped_column(Integer, default=10, server_default="10")
    created_by: Mapped[str] = mapped_column(String(254))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


class AuditEvent(Base):
    """One state change: who did what to which subject, and why. Insert only (a trigger refuses
    UPDATE and DELETE, see the first migration)."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_subject", "subject_type", "subject_id", "id"),
        # One event per idempotency key: the transition helper inserts ON CONFLICT DO NOTHING,
        # so a retried or concurrent attempt applies its change once (migration 0007).
        Index(
            "uq_audit_events_idempotency_key",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    subject_type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(254))
    reason: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # `<subject_type>:<subject_id>:<key>` (or its SHA-256 when longer), set by retried changes.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))


class Prompt(Base):
    """A renewal reminder or escalation sent to people, and the answer it got."""

    __tablename__ = "prompts"
    __table_args__ = (
        # One prompt per NHI, kind, expiry and offset: a retried activity finds the same row,
        # so no reminder is ever sent twice for the same offset.
        UniqueConstraint(
            "nhi_id",
            "kind",
            "for_expires_at",
            "offset_seconds",
            name="uq_prompts_once",
        ),
        CheckConstraint("kind IN ('reminder', 'escalation')", name="kind"),
        CheckConstraint("status IN ('open', 'decided', 'superseded')", name="status"),
        Index("ix_prompts_status_created_at", "status", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    nhi_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("nhis.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    for_expires_at: Mapped[datetime]
    # The reminder offset (seconds before expiry) the prompt belongs to.
    offset_seconds: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text, default="")
    deliveries: Mapped[list[Any]] = mapped_column(default=list)
    status: Mapped[str] = mapped_column(String(16), default="open")
    decision: Mapped[str | None] = mapped_column(String(32))
    decided_by: Mapped[str | None] = mapped_column(String(254))
    decided_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class ApiToken(Base):
    """A credential of this service's own: an NHI too, listed in its inventory. Only a hash is
    stored; the token is shown once, when it is created."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        CheckConstraint(
            "role IN ('platform', 'approver', 'security', 'auditor', 'admin', 'agent')",
            name="role",
        ),
        CheckConstraint("(role = 'agent') = (agent_id IS NOT NULL)", name="agent_bound"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[Role] = mapped_column(EnumText(Role, 16))
    # None: every team. A list: the teams a platform token may act for.
    teams: Mapped[list[str] | None] = mapped_column(JSONB)
    email: Mapped[str | None] = mapped_column(String(254))
    # Set exactly for an `agent` token: the one agent it may act as.
    agent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[str] = mapped_column(String(254))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class TaskCredential(Base):
    """A short-lived credential issued for one task of an agent, derived from an active NHI.
    The credential itself is never stored: only where it lives (`name`: the Postgres login
    role or the STS session name), for whom, until when, and whether it has been ended."""

    __tablename__ = "task_credentials"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'ended', 'reap_failed')", name="status"),
        Index(
            "ix_task_credentials_live_expiry", "expires_at", postgresql_where="status <> 'ended'"
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    nhi_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("nhis.id"), index=True)
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"))
    platform: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(128), unique=True)
    task_id: Mapped[str | None] = mapped_column(String(128))
    issued_by: Mapped[str] = mapped_column(String(254))
    issued_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime]
    # The narrowed scope (a list of statements), or None: the NHI's whole scope.
    scope: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(16), server_default="active")
    ended_at: Mapped[datetime | None]
    end_reason: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)


class Sweep(Base):
    """One sweep of one provider: what it found, what it did, or why it stopped."""

    __tablename__ = "sweeps"
    __table_args__ = (
        CheckConstraint("status IN ('running', 'completed', 'failed')", name="status"),
        Index("ix_sweeps_started_at", "started_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    provider: Mapped[str] = mapped_column(String(32))
    dry_run: Mapped[bool] = mapped_column(Boolean)
    triggered_by: Mapped[str] = mapped_column(String(254))
    workflow_id: Mapped[str] = mapped_column(String(255), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(server_default=func.now())
    finished_at: Mapped[datetime | None]
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    findings: Mapped[list[Any]] = mapped_column(default=list)
    error: Mapped[str | None] = mapped_column(Text)


class IdempotencyKey(Base):
    """The first answer to a state-changing POST sent with an `Idempotency-Key`: a retry with
    the same key and body gets it again instead of applying the action twice."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("principal", "key", name="uq_idempotency_keys_principal_key"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    principal: Mapped[str] = mapped_column(String(254))
    key: Mapped[str] = mapped_column(String(255))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(2048))
    request_hash: Mapped[str] = mapped_column(String(64))
    # None while the first request is still being answered.
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)


# NHIs by (platform, kind, environment, status) as signed deltas, appended by statement
# triggers on `nhis` and folded by the metrics refresh (migration 0009): a count is the sum of
# a combination's rows. Read and written with SQL only, hence a Core table without a key.
nhi_counts = Table(
    "nhi_counts",
    Base.metadata,
    Column("platform", String(32), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("environment", String(16), nullable=False),
    Column("status", String(32), nullable=False),
    Column("n", BigInteger, nullable=False),
)


class AgentInvoker(Base):
    """Who or what can make an agent act, and through which channel (issue 16). An invoker of
    kind `agent` names another agent of the same environment by id: the footprint follows
    such links, so what can make that agent act can make this one act too."""

    __tablename__ = "agent_invokers"
    __table_args__ = (
        UniqueConstraint("agent_id", "kind", "ref", "channel", name="uq_agent_invokers_once"),
        CheckConstraint(_one_of("kind", InvokerKind), name="kind"),
        CheckConstraint(_one_of("channel", InvokerChannel), name="channel"),
        # The chain is walked backwards too (which agents does this agent invoke).
        Index("ix_agent_invokers_kind_ref", "kind", "ref"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"), index=True)
    kind: Mapped[InvokerKind] = mapped_column(EnumText(InvokerKind, 16))
    ref: Mapped[str] = mapped_column(String(254))
    channel: Mapped[InvokerChannel] = mapped_column(EnumText(InvokerChannel, 16))
    expires_at: Mapped[datetime | None]
    added_by: Mapped[str] = mapped_column(String(254))
    added_at: Mapped[datetime] = mapped_column(server_default=func.now())


class AgentWorkload(Base):
    """A workload identity bound to one agent (issue 15): a JWT subject of a trusted issuer
    (`NHI_WORKLOAD_OIDC_ISSUERS`), such as a Kubernetes service account or a GitHub Actions
    workflow, that acts as the agent (role `agent`) when it presents that issuer's token. One
    subject stands for one agent only; subjects match exactly, never by pattern."""

    __tablename__ = "agent_workloads"
    __table_args__ = (
        UniqueConstraint("issuer", "subject", name="uq_agent_workloads_issuer_subject"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"), index=True)
    issuer: Mapped[str] = mapped_column(String(200))
    subject: Mapped[str] = mapped_column(String(240))
    created_by: Mapped[str] = mapped_column(String(254))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class UiSession(Base):
    """A web dashboard session (issue 18): the cookie's SHA-256 hash, the API token it was
    exchanged for (checked again on every request, so revoking the token ends the session) or
    the OIDC principal it signed in as, and the secret its forms carry against CSRF. Signing out
    deletes the row: a session is revocable, unlike a signed cookie."""

    __tablename__ = "ui_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("api_tokens.id", ondelete="CASCADE"), index=True
    )
    principal: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    csrf_secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Approval(Base):
    """A request (one NHI, or a bundle of them) waiting for approvers (issue 16): who may
    decide, what they were shown, and the decisions so far. Its workflow (`workflow_id`) holds
    the authoritative wait; this row is what `GET /v1/approvals` and Slack clicks read."""

    __tablename__ = "approvals"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'approved', 'denied')", name="status"),
        CheckConstraint("approvals_required IN (1, 2)", name="approvals_required_range"),
        Index("ix_approvals_status_expires_at", "status", "expires_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"), index=True)
    workflow_id: Mapped[str] = mapped_column(String(255), unique=True)
    bundle: Mapped[bool] = mapped_column(Boolean)
    nhi_ids: Mapped[list[str]] = mapped_column()
    approvers: Mapped[list[str]] = mapped_column()
    approvals_required: Mapped[int] = mapped_column(Integer)
    requested_by: Mapped[str] = mapped_column(String(254))
    requested_by_person: Mapped[str] = mapped_column(String(254))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    # Why approval is needed: sensitive entries, and the risk reasons that moved the score.
    reasons: Mapped[list[str]] = mapped_column()
    # What approvers were shown (models.contracts.ApprovalMessage as JSON).
    summary: Mapped[dict[str, Any]] = mapped_column()
    decisions: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime]
    decided_at: Mapped[datetime | None]

    agent: Mapped[Agent] = relationship()


class ActivityEvent(Base):
    """One thing an NHI (or a task credential derived from it) did, as its platform logged it
    (issue 17). The id is the source's own event id (CloudTrail's eventID) or a hash of the
    log line, so importing the same file twice adds nothing. Events of identities this
    service does not know are counted by the import, never stored."""

    __tablename__ = "activity_events"
    __table_args__ = (
        CheckConstraint(_one_of("source", ActivitySource), name="source"),
        CheckConstraint("outcome IN ('success', 'denied', 'error')", name="outcome"),
        Index("ix_activity_events_nhi_id_occurred_at", "nhi_id", "occurred_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    # No foreign key: the importer writes only ids it has just read from `nhis` (never deleted),
    # and a per-row key check would cost a third of the import rate.
    nhi_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    task_credential_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    source: Mapped[ActivitySource] = mapped_column(EnumText(ActivitySource, 16))
    occurred_at: Mapped[datetime]
    action: Mapped[str] = mapped_column(String(128))
    resource: Mapped[str | None] = mapped_column(Text)
    source_ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(256))
    outcome: Mapped[str] = mapped_column(String(16))
    identity: Mapped[str] = mapped_column(String(512))


class ActivityCursor(Base):
    """How far a scheduled import got: the last object key processed under a prefix."""

    __tablename__ = "activity_cursors"

    name: Mapped[str] = mapped_column(String(1024), primary_key=True)
    position: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


class NhiProfile(Base):
    """What an NHI has been seen doing (nhi/rules/baseline.py `Profile`), learned from its
    imported activity."""

    __tablename__ = "nhi_profiles"

    nhi_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("nhis.id"), primary_key=True)
    profile: Mapped[dict[str, Any]] = mapped_column(default=dict)
    events: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


class ActivityFinding(Base):
    """A deviation of an NHI's activity from its intent or its learned profile, with the
    evidence (issue 17). Acknowledged with a reason; alerted at most once per NHI and kind
    within `NHI_FINDING_ALERT_WINDOW_SECONDS`."""

    __tablename__ = "activity_findings"
    __table_args__ = (
        CheckConstraint(_one_of("kind", ActivityKind), name="kind"),
        CheckConstraint(_one_of("severity", Severity), name="severity"),
        Index("ix_activity_findings_created_at", "created_at"),
        Index("ix_activity_findings_agent_id_created_at", "agent_id", "created_at"),
        Index("ix_activity_findings_nhi_id_kind_alerted_at", "nhi_id", "kind", "alerted_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    nhi_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("nhis.id"))
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"))
    task_credential_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    kind: Mapped[ActivityKind] = mapped_column(EnumText(ActivityKind, 32))
    severity: Mapped[Severity] = mapped_column(EnumText(Severity, 16))
    summary: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    event_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    occurred_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    alerted_at: Mapped[datetime | None]
    acked_at: Mapped[datetime | None]
    acked_by: Mapped[str | None] = mapped_column(String(254))
    ack_reason: Mapped[str | None] = mapped_column(Text)


class Incident(Base):
    """One containment of an agent (issue 17): who contained it and why, what was done to each
    credential and the proof it is dead (`report`), and who released it. At most one
    unreleased incident per agent: a second contain joins it."""

    __tablename__ = "incidents"
    __table_args__ = (
        CheckConstraint(_one_of("status", IncidentStatus), name="status"),
        Index(
            "uq_incidents_agent_id_open",
            "agent_id",
            unique=True,
            postgresql_where="status <> 'released'",
        ),
        Index("ix_incidents_opened_at", "opened_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"))
    status: Mapped[IncidentStatus] = mapped_column(EnumText(IncidentStatus, 32))
    reason: Mapped[str] = mapped_column(Text)
    opened_by: Mapped[str] = mapped_column(String(254))
    # The person behind `opened_by` (`email:<address>` or the actor): release compares people.
    opened_by_person: Mapped[str] = mapped_column(String(254))
    opened_at: Mapped[datetime] = mapped_column(server_default=func.now())
    contained_at: Mapped[datetime | None]
    released_by: Mapped[str | None] = mapped_column(String(254))
    released_at: Mapped[datetime | None]
    release_reason: Mapped[str | None] = mapped_column(Text)
    # The activity finding that set it off (automatic containment); no foreign key, so a
    # finding's retention never blocks on an incident.
    finding_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    # {"credentials": [per-credential entries], "timeline": [...], "cause": str | None}
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
