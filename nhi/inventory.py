"""Inventory operations behind the API: validate, write, audit, all in the caller's transaction.

Every function takes an open session; the caller owns the transaction, so a refused request
changes nothing.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, false, func, or_, select, true
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from models.contracts import ScopeStatement
from models.enums import KINDS_BY_PLATFORM, AgentStatus, NhiKind, NhiStatus, Platform, Role
from models.orm import Agent, AuditEvent, Nhi, Policy, Prompt, Target
from models.schemas import AgentCreate, NhiCreate, PolicyIn, TargetIn
from nhi import audit
from nhi.auth import Principal
from nhi.config import Settings
from nhi.pg_grants import group_name, validate_grants
from nhi.policy import (
    INLINE_POLICY_LIMIT,
    PolicyRules,
    RuleViolation,
    identity_name,
    identity_policy_document,
    parse_ttl,
    policy_size,
    validate_cidrs,
    validate_privilege_name,
    validate_rule_pattern,
    validate_scope,
    validate_trust_principal,
)
from nhi.targets import (
    TargetSpec,
    all_targets,
    find_target,
    parse_dsn,
    password_ref,
    target_spec,
)


def _visible(query: Select[Any], principal: Principal | None) -> Select[Any]:
    """Restrict a query over agents (joined) to what `principal` may see."""
    if principal is None or principal.reads_everything():
        return query
    rules: list[ColumnElement[bool]] = []
    if principal.has(Role.PLATFORM):
        rules.append(true() if principal.teams is None else Agent.team.in_(sorted(principal.teams)))
    if principal.email:
        rules += [Agent.owner_email == principal.email, Agent.backup_owner_email == principal.email]
    return query.where(or_(*rules)) if rules else query.where(false())


class NotFound(LookupError):
    """The addressed object does not exist."""


class Conflict(RuntimeError):
    """The request clashes with the current state; `field` names the request field it concerns
    (a duplicate `name`), when one does."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def rules_of(policy: Policy) -> PolicyRules:
    """The decision-relevant part of a policy row."""
    return PolicyRules(
        label=f"{policy.platform}/{policy.kind}/{policy.environment}",
        allowed=policy.allowed,
        default_ttl_seconds=policy.default_ttl_seconds,
        max_lifetime_seconds=policy.max_lifetime_seconds,
        max_session_duration_seconds=policy.max_session_duration_seconds,
        allow_resource_wildcard=policy.allow_resource_wildcard,
        forbidden_actions=tuple(policy.forbidden_actions),
        sensitive_actions=tuple(policy.sensitive_actions),
    )


def check_scope(platform: str, scope: list[ScopeStatement], rules: PolicyRules) -> list[str]:
    """The platform's scope rules (Postgres grants, or IAM actions on ARNs); returns the
    sensitive entries asked for, which need an approver."""
    if platform == Platform.POSTGRES:
        return validate_grants(scope, rules)
    return validate_scope(scope, rules)


def find_policy(session: Session, platform: str, kind: str, environment: str) -> Policy | None:
    """The policy for a target, if one is defined."""
    return session.scalar(
        select(Policy).where(
            Policy.platform == platform, Policy.kind == kind, Policy.environment == environment
        )
    )


def create_agent(session: Session, body: AgentCreate, actor: str) -> Agent:
    """Register an agent; its name is unique within its environment."""
    if body.expected_end_at is not None:
        if body.expected_end_at.tzinfo is None:
            raise RuleViolation("expected_end_at", "must carry a timezone, e.g. '...T00:00:00Z'")
        if body.expected_end_at <= datetime.now(UTC):
            raise RuleViolation("expected_end_at", "must be in the future")
    if body.backup_owner_email and body.backup_owner_email == body.owner_email:
        raise RuleViolation("backup_owner_email", "must be a different person from the owner")
    agent = Agent(
        name=body.name,
        category=body.category.value,
        environment=body.environment.value,
        owner_email=body.owner_email,
        owner_slack_id=body.owner_slack_id,
        backup_owner_email=body.backup_owner_email,
        team=body.team,
        purpose=body.purpose,
        expected_end_at=body.expected_end_at,
        invokers=list(body.invokers),
        status=AgentStatus.ACTIVE.value,
        created_by=actor,
    )
    session.add(agent)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(
            f"name: an agent named {body.name!r} already exists in {body.environment.value}",
            field="name",
        ) from None
    audit.record(
        session,
        subject_type="agent",
        subject_id=agent.id,
        event="agent.created",
        actor=actor,
        reason="registered through the API",
        details={"name": agent.name, "environment": agent.environment, "owner": agent.owner_email},
    )
    return agent


def get_agent(session: Session, agent_id: uuid.UUID, *, with_nhis: bool = False) -> Agent:
    """One agent, or NotFound."""
    query = select(Agent).where(Agent.id == agent_id)
    if with_nhis:
        query = query.options(selectinload(Agent.nhis))
    agent = session.scalar(query)
    if agent is None:
        raise NotFound(f"agent {agent_id} not found")
    return agent


def list_agents(
    session: Session,
    *,
    environment: str | None = None,
    owner: str | None = None,
    team: str | None = None,
    status: str | None = None,
    limit: int = 100,
    offset: int = 0,
    visible_to: Principal | None = None,
) -> list[Agent]:
    """Agents matching every given filter, newest first (only those `visible_to` may see)."""
    query = _visible(select(Agent).order_by(Agent.created_at.desc(), Agent.id), visible_to)
    if environment:
        query = query.where(Agent.environment == environment)
    if owner:
        query = query.where(Agent.owner_email == owner.lower())
    if team:
        query = query.where(Agent.team == team)
    if status:
        query = query.where(Agent.status == status)
    return list(session.scalars(query.limit(limit).offset(offset)))


def request_nhi(
    session: Session,
    settings: Settings,
    agent_id: uuid.UUID,
    body: NhiCreate,
    actor: str,
    now: datetime | None = None,
) -> tuple[Nhi, list[str]]:
    """Check a request against policy and record the lease before anything exists on a platform.

    Returns the new NHI (status `requested` or `pending_approval`) and the sensitive actions
    that need an approver. Raises RuleViolation, NotFound or Conflict and adds nothing.
    """
    agent = get_agent(session, agent_id)
    if agent.status != AgentStatus.ACTIVE.value:
        raise Conflict(f"agent {agent.name} is {agent.status}: no new identities")
    if body.kind not in KINDS_BY_PLATFORM[body.platform]:
        raise RuleViolation("kind", f"{body.kind.value} is not a kind of {body.platform.value}")
    postgres = body.kind is NhiKind.POSTGRES_ROLE
    if postgres and not body.target:
        raise RuleViolation(
            "target",
            "is required for postgres_role: the name of a registered target database "
            "(`nhi targets list`)",
        )
    if not postgres and body.target:
        raise RuleViolation("target", f"only applies to postgres_role, not {body.kind.value}")
    # Held (FOR SHARE) until commit, so a concurrent removal of the target sees this NHI.
    if body.target and find_target(session, settings, body.target, lock=True) is None:
        raise RuleViolation("target", f"{body.target!r} is not a registered target")
    policy = find_policy(session, body.platform.value, body.kind.value, agent.environment)
    if policy is None:
        raise RuleViolation(
            "kind",
            f"no policy defines {body.platform.value}/{body.kind.value} in {agent.environment}",
        )
    rules = rules_of(policy)
    if not rules.allowed:
        raise RuleViolation(
            "kind", f"{body.kind.value} is not allowed in {agent.environment} by policy"
        )
    ttl = rules.default_ttl_seconds if body.ttl is None else parse_ttl(body.ttl)
    if ttl > rules.max_lifetime_seconds:
        raise RuleViolation(
            "ttl",
            f"{ttl}s exceeds the maximum lifetime of {rules.max_lifetime_seconds}s "
            f"for {rules.label}",
        )
    # Grants, not IAM: no source CIDRs (pg_hba's business) and no trust principal.
    if postgres and body.allowed_cidrs:
        raise RuleViolation("allowed_cidrs", "only applies to AWS kinds, not postgres_role")
    sensitive = check_scope(body.platform, body.scope, rules)
    cidrs = validate_cidrs(body.allowed_cidrs)
    principal = validate_trust_principal(body.kind, body.trust_principal)

    now = now or datetime.now(UTC)
    expires_at = now + timedelta(seconds=ttl)
    if agent.expected_end_at is not None:
        if agent.expected_end_at <= now:
            raise Conflict(
                f"agent {agent.name}'s task ended at {agent.expected_end_at:%Y-%m-%d %H:%M}"
            )
        # Reaching the agent's expected end decommissions the NHI unless someone renews it.
        expires_at = min(expires_at, agent.expected_end_at)
    if not postgres:
        document = identity_policy_document(body.scope, cidrs, expires_at)
        if policy_size(document) > INLINE_POLICY_LIMIT[body.kind]:
            raise RuleViolation(
                "scope",
                f"the policy would be {policy_size(document)} characters; IAM allows "
                f"{INLINE_POLICY_LIMIT[body.kind]} for {body.kind.value}",
            )
    nhi_id = uuid.uuid4()
    name = (
        # A plain lower-case identifier of at most 61 characters: the provider's login roles
        # add "_a"/"_b" within Postgres' 63.
        group_name(settings.name_prefix, agent.name, nhi_id)
        if postgres
        else identity_name(settings.name_prefix, agent.name, nhi_id)
    )
    nhi = Nhi(
        id=nhi_id,
        agent_id=agent.id,
        platform=body.platform.value,
        kind=body.kind.value,
        name=name,
        granted_scope=[s.model_dump() for s in body.scope],
        allowed_cidrs=cidrs,
        trust_principal=principal,
        status=(NhiStatus.PENDING_APPROVAL if sensitive else NhiStatus.REQUESTED).value,
        status_reason=(
            f"sensitive actions need an approver: {', '.join(sensitive)}" if sensitive else None
        ),
        requested_by=actor,
        created_at=now,
        expires_at=expires_at,
        max_lifetime_at=now + timedelta(seconds=rules.max_lifetime_seconds),
        rotation_period_seconds=policy.rotation_period_seconds,
        target=body.target,
    )
    session.add(nhi)
    session.flush()
    audit.record(
        session,
        subject_type="nhi",
        subject_id=nhi.id,
        event="nhi.requested",
        actor=actor,
        reason=f"{body.kind.value} requested for agent {agent.name}",
        details={
            "agent_id": str(agent.id),
            "kind": body.kind.value,
            "ttl_seconds": ttl,
            "sensitive_actions": sensitive,
            **({"target": body.target} if body.target else {}),
        },
    )
    return nhi, sensitive


def attach_workflow(session: Session, nhi_id: uuid.UUID, workflow_id: str) -> None:
    """Remember which workflow drives an NHI."""
    nhi = session.get(Nhi, nhi_id, with_for_update=True)
    if nhi is None:
        raise NotFound(f"nhi {nhi_id} not found")
    nhi.workflow_id = workflow_id


def fail_start(session: Session, nhi_id: uuid.UUID, actor: str, reason: str) -> None:
    """The workflow could not be started: nothing was created, so the request simply failed."""
    nhi = session.get(Nhi, nhi_id, with_for_update=True)
    if nhi is None:
        return
    nhi.status = NhiStatus.FAILED.value
    nhi.status_reason = reason
    audit.record(
        session,
        subject_type="nhi",
        subject_id=nhi_id,
        event="nhi.failed",
        actor=actor,
        reason=reason,
    )


def record_containment(
    session: Session, nhi_id: uuid.UUID, actor: str, reason: str, path: str
) -> None:
    """Audit how a decommission reached the NHI: through its running lifecycle (`update`), or a
    new run started from the inventory (`fresh_lifecycle`, `restarted_lifecycle`)."""
    audit.record(
        session,
        subject_type="nhi",
        subject_id=nhi_id,
        event="nhi.decommission_requested",
        actor=actor,
        reason=reason,
        details={"path": path},
    )


def get_nhi(session: Session, nhi_id: uuid.UUID) -> Nhi:
    """One NHI, or NotFound."""
    nhi = session.get(Nhi, nhi_id)
    if nhi is None:
        raise NotFound(f"nhi {nhi_id} not found")
    return nhi


def list_nhis(
    session: Session,
    *,
    agent_id: uuid.UUID | None = None,
    status: str | None = None,
    owner: str | None = None,
    limit: int = 100,
    offset: int = 0,
    visible_to: Principal | None = None,
) -> list[Nhi]:
    """NHIs matching every given filter, newest first; `owner` is the agent owner's email."""
    query = _visible(select(Nhi).join(Agent).order_by(Nhi.created_at.desc(), Nhi.id), visible_to)
    if agent_id:
        query = query.where(Nhi.agent_id == agent_id)
    if status:
        query = query.where(Nhi.status == status)
    if owner:
        query = query.where(Agent.owner_email == owner.lower())
    return list(session.scalars(query.limit(limit).offset(offset)))


def events_for(session: Session, subject_id: uuid.UUID) -> list[AuditEvent]:
    """The audit trail of one subject, oldest first."""
    return list(
        session.scalars(
            select(AuditEvent)
            .where(AuditEvent.subject_id == str(subject_id))
            .order_by(AuditEvent.id)
        )
    )


def list_policies(session: Session) -> list[Policy]:
    """Every policy, in a stable order."""
    return list(
        session.scalars(select(Policy).order_by(Policy.platform, Policy.kind, Policy.environment))
    )


def apply_policy(session: Session, body: PolicyIn, actor: str, index: int = 0) -> Policy:
    """Create or replace one policy; durations accept seconds or '30d'-style strings."""
    where = f"policies[{index}]"

    def seconds(name: str, value: int | str) -> int:
        try:
            return parse_ttl(value)
        except RuleViolation as err:
            raise RuleViolation(f"{where}.{name}", err.message) from None

    default_ttl = seconds("default_ttl", body.default_ttl)
    max_lifetime = seconds("max_lifetime", body.max_lifetime)
    if max_lifetime > 366 * 86400:
        raise RuleViolation(f"{where}.max_lifetime", "must be at most 366 days")
    if default_ttl > max_lifetime:
        raise RuleViolation(f"{where}.default_ttl", "must not exceed max_lifetime")
    rotation = (
        None if body.rotation_period is None else seconds("rotation_period", body.rotation_period)
    )
    grace = 0 if body.grace_period in (0, "0") else seconds("grace_period", body.grace_period)
    session_duration = seconds("max_session_duration", body.max_session_duration)
    if not 3600 <= session_duration <= 43200:
        raise RuleViolation(
            f"{where}.max_session_duration", "must be between 1h and 12h (IAM's range)"
        )
    offsets = sorted({seconds("reminder_offsets", o) for o in body.reminder_offsets}, reverse=True)
    # Postgres policies name privileges (`TRUNCATE`), AWS policies IAM action patterns.
    validate_entry = (
        validate_privilege_name if body.platform is Platform.POSTGRES else validate_rule_pattern
    )
    for name, patterns in (
        ("forbidden_actions", body.forbidden_actions),
        ("sensitive_actions", body.sensitive_actions),
    ):
        for j, pattern in enumerate(patterns):
            validate_entry(f"{where}.{name}[{j}]", pattern)
    policy = find_policy(session, body.platform.value, body.kind.value, body.environment.value)
    if policy is None:
        policy = Policy(
            platform=body.platform.value, kind=body.kind.value, environment=body.environment.value
        )
        session.add(policy)
    policy.allowed = body.allowed
    policy.default_ttl_seconds = default_ttl
    policy.max_lifetime_seconds = max_lifetime
    policy.rotation_period_seconds = rotation
    policy.reminder_offsets_seconds = offsets
    policy.grace_period_seconds = grace
    policy.max_session_duration_seconds = session_duration
    policy.allow_resource_wildcard = body.allow_resource_wildcard
    policy.forbidden_actions = list(body.forbidden_actions)
    policy.sensitive_actions = list(body.sensitive_actions)
    policy.updated_by = actor
    session.flush()
    audit.record(
        session,
        subject_type="policy",
        subject_id=f"{policy.platform}/{policy.kind}/{policy.environment}",
        event="policy.applied",
        actor=actor,
        reason="policy applied",
        details=body.model_dump(mode="json"),
    )
    return policy


def list_prompts(
    session: Session,
    status: str | None,
    nhi_id: uuid.UUID | None,
    visible_to: Principal | None = None,
) -> list[Prompt]:
    """Prompts, newest first."""
    query = _visible(
        select(Prompt).join(Nhi).join(Agent).order_by(Prompt.created_at.desc()), visible_to
    )
    if status:
        query = query.where(Prompt.status == status)
    if nhi_id:
        query = query.where(Prompt.nhi_id == nhi_id)
    return list(session.scalars(query.limit(500)))


def get_prompt(session: Session, prompt_id: uuid.UUID) -> Prompt:
    """One prompt, or NotFound."""
    prompt = session.get(Prompt, prompt_id)
    if prompt is None:
        raise NotFound(f"prompt {prompt_id} not found")
    return prompt


FINAL_STATUSES = frozenset({NhiStatus.DECOMMISSIONED.value, NhiStatus.FAILED.value})


def complete_agent(
    session: Session, agent_id: uuid.UUID, actor: str, reason: str
) -> list[uuid.UUID]:
    """Mark the agent's task ended; returns its NHIs that are still alive."""
    agent = session.get(Agent, agent_id, with_for_update=True)
    if agent is None:
        raise NotFound(f"agent {agent_id} not found")
    if agent.status == AgentStatus.ACTIVE.value:
        agent.status = AgentStatus.COMPLETED.value
        audit.record(
            session,
            subject_type="agent",
            subject_id=agent.id,
            event="agent.completed",
            actor=actor,
            reason=reason or "the agent's task ended",
        )
    return [
        n.id
        for n in session.scalars(select(Nhi).where(Nhi.agent_id == agent_id))
        if n.status not in FINAL_STATUSES
    ]


# ---- Postgres targets -------------------------------------------------------------------------


def list_targets(session: Session, settings: Settings) -> list[TargetSpec]:
    """Every registered target, from the table and from settings, by name."""
    return all_targets(session, settings)


def add_target(session: Session, settings: Settings, body: TargetIn, actor: str) -> TargetSpec:
    """Register a target in the inventory: where it is and where its admin password is.

    Raises:
        RuleViolation: the DSN holds a password or is malformed, or not exactly one password
            reference is given.
        Conflict: the name is taken (in the table or in settings).
    """
    parsed = parse_dsn(body.dsn)
    ref = password_ref(body.password_env, body.password_secret)
    existing = find_target(session, settings, body.name)
    if existing is not None:
        where = "in settings (NHI_POSTGRES_TARGETS)" if existing.source == "settings" else ""
        raise Conflict(
            f"name: a target named {body.name!r} already exists {where}".rstrip(), field="name"
        )
    row = Target(
        name=body.name,
        host=parsed.host,
        port=parsed.port,
        dbname=parsed.dbname,
        admin_user=parsed.admin_user,
        password_ref=ref,
        sslmode=body.sslmode,
        connection_limit=body.connection_limit,
        created_by=actor,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        # Registered concurrently, between the check above and this insert.
        raise Conflict(f"name: a target named {body.name!r} already exists", field="name") from None
    session.refresh(row)
    spec = target_spec(row)
    audit.record(
        session,
        subject_type="target",
        subject_id=row.name,
        event="target.added",
        actor=actor,
        reason=f"target {row.name} registered",
        details={
            "dsn": spec.dsn,
            "password_ref": row.password_ref,
            "sslmode": row.sslmode,
            "connection_limit": row.connection_limit,
        },
    )
    return spec


def remove_target(session: Session, settings: Settings, name: str, actor: str) -> TargetSpec:
    """Remove a target from the inventory once no living NHI uses it.

    Raises:
        NotFound: no such target.
        Conflict: it is defined in settings, or NHIs that are not yet decommissioned use it.
    """
    spec = find_target(session, settings, name)
    if spec is None:
        raise NotFound(f"target {name} not found")
    if spec.source == "settings":
        raise Conflict(
            f"target {name} is defined in settings (NHI_POSTGRES_TARGETS): remove it there"
        )
    row = session.scalar(select(Target).where(Target.name == name).with_for_update())
    if row is None:
        raise NotFound(f"target {name} not found")
    in_use = session.scalar(
        select(func.count())
        .select_from(Nhi)
        .where(Nhi.target == name, Nhi.status.not_in(sorted(FINAL_STATUSES)))
    )
    if in_use:
        raise Conflict(
            f"target {name} is used by {in_use} NHI(s) not yet decommissioned: "
            "decommission them first"
        )
    session.delete(row)
    audit.record(
        session,
        subject_type="target",
        subject_id=name,
        event="target.removed",
        actor=actor,
        reason=f"target {name} removed",
        details={"dsn": spec.dsn},
    )
    return spec
