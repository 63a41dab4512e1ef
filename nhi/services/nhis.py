"""NHIs: the request (checked against policy before anything exists on a platform), reads,
and the transitions the API drives (a start that failed, how a decommission was routed).

Every function takes an open session; the caller owns the transaction, so a refused request
changes nothing. The lifecycle's own transitions are written by `activities.db` through the
same helper, `nhi.services.transitions`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.enums import (
    KINDS_BY_PLATFORM,
    ROTATABLE_KINDS,
    AgentStatus,
    CredentialDelivery,
    NhiKind,
    NhiStatus,
)
from models.orm import Agent, AuditEvent, Nhi
from models.schemas import NhiCreate
from nhi.infra.config import Settings
from nhi.rules.github_scope import reissue_period
from nhi.rules.pg_grants import group_name
from nhi.rules.policy import (
    INLINE_POLICY_LIMIT,
    QUARANTINE_POLICY_RESERVE,
    RuleViolation,
    check_trust_account,
    identity_name,
    identity_policy_document,
    parse_ttl,
    policy_size,
    principal_account,
    scope_policy_limit,
    validate_cidrs,
    validate_trust_principal,
)
from nhi.services.agents import FINAL_STATUSES, get_agent
from nhi.services.auth import Principal
from nhi.services.errors import Conflict, NotFound
from nhi.services.incidents import containment_of
from nhi.services.policies import check_scope, find_policy, rules_of
from nhi.services.target_registry import find_target
from nhi.services.transitions import note, transition
from nhi.services.visibility import visible


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
    contained = containment_of(session, agent.id)
    if contained is not None:
        # Provisioning checks again before creating and before activating (activities/db.py).
        raise Conflict(f"agent {agent.name}: {contained}")
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
    # GitHub's IP allow lists are the organisation's, not a token's.
    if body.kind is NhiKind.GITHUB_APP_TOKEN and body.allowed_cidrs:
        raise RuleViolation("allowed_cidrs", "only applies to AWS kinds, not github_app_token")
    sensitive = check_scope(body.platform, body.scope, rules)
    cidrs = validate_cidrs(body.allowed_cidrs)
    principal = validate_trust_principal(body.kind, body.trust_principal)
    delivery = delivery_of(body, policy.delivery, settings)
    if settings.identity_reuse_check:
        check_identity_reuse(session, agent, principal, body.target)

    now = now or datetime.now(UTC)
    expires_at = now + timedelta(seconds=ttl)
    if agent.expected_end_at is not None:
        if agent.expected_end_at <= now:
            raise Conflict(
                f"agent {agent.name}'s task ended at {agent.expected_end_at:%Y-%m-%d %H:%M}"
            )
        # Reaching the agent's expected end decommissions the NHI unless someone renews it.
        expires_at = min(expires_at, agent.expected_end_at)
    if body.kind in INLINE_POLICY_LIMIT:
        document = identity_policy_document(body.scope, cidrs, expires_at)
        if policy_size(document) > scope_policy_limit(body.kind):
            raise RuleViolation(
                "scope",
                f"the policy would be {policy_size(document)} characters; IAM allows "
                f"{INLINE_POLICY_LIMIT[body.kind]} for all of an {body.kind.value}'s inline "
                f"policies, {QUARANTINE_POLICY_RESERVE} of them kept for its quarantine, so at "
                f"most {scope_policy_limit(body.kind)}",
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
        platform=body.platform,
        kind=body.kind,
        name=name,
        granted_scope=[s.model_dump() for s in body.scope],
        allowed_cidrs=cidrs,
        trust_principal=principal,
        status=NhiStatus.PENDING_APPROVAL if sensitive else NhiStatus.REQUESTED,
        status_reason=(
            f"sensitive actions need an approver: {', '.join(sensitive)}" if sensitive else None
        ),
        requested_by=actor,
        created_at=now,
        expires_at=expires_at,
        max_lifetime_at=now + timedelta(seconds=rules.max_lifetime_seconds),
        rotation_period_seconds=(
            reissue_period(policy.rotation_period_seconds)
            if body.kind is NhiKind.GITHUB_APP_TOKEN
            else policy.rotation_period_seconds
        ),
        target=body.target,
        delivery=delivery,
    )
    session.add(nhi)
    session.flush()
    note(
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


def delivery_of(
    body: NhiCreate, default: CredentialDelivery, settings: Settings
) -> CredentialDelivery:
    """Where the credential goes: the request's choice, else the policy's. Only kinds with a
    static credential are delivered (others' reference is the identity itself), and
    `vault_kv` needs a Vault this deployment talks to."""
    if body.kind not in ROTATABLE_KINDS:
        if body.delivery not in (None, CredentialDelivery.AWS_SECRETS_MANAGER):
            raise RuleViolation("delivery", f"{body.kind.value} has no credential to deliver")
        return CredentialDelivery.AWS_SECRETS_MANAGER
    delivery = body.delivery or default
    if delivery is CredentialDelivery.VAULT_KV and not settings.vault_addr:
        raise RuleViolation("delivery", "vault_kv needs a Vault: NHI_VAULT_ADDR is not set")
    return delivery


def check_identity_reuse(
    session: Session, agent: Agent, principal: str | None, target: str | None
) -> None:
    """One identity per agent and environment: a trust principal that another agent's live NHI
    trusts (OWASP NHI9, reuse; NHI8 when that agent is in another environment), or a Postgres
    target holding live NHIs of another environment (NHI8), is refused with a Conflict naming
    the field. An AWS service principal names a service, not an agent's identity: exempt."""
    live = Nhi.status.not_in(sorted(FINAL_STATUSES))
    # Two requests racing for one principal or target check one after the other (the lock
    # lasts until the request's transaction ends).
    for held in (principal, target):
        if held:
            session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"nhi-reuse:{held}"))))
    if principal and principal_account(principal) is not None:
        other = session.scalar(
            select(Agent)
            .join(Nhi, Nhi.agent_id == Agent.id)
            .where(live, Nhi.trust_principal == principal, Agent.id != agent.id)
            .order_by(Agent.environment != agent.environment, Agent.created_at)
            .limit(1)
        )
        if other is not None:
            rule = (
                "environments stay isolated (OWASP NHI8)"
                if other.environment != agent.environment
                else "one identity per agent (OWASP NHI9, reuse)"
            )
            raise Conflict(
                f"trust_principal: already trusted by agent {other.name} in "
                f"{other.environment}; {rule}: give this agent a runtime principal of its own",
                field="trust_principal",
            )
    if target:
        env = session.scalar(
            select(Agent.environment)
            .join(Nhi, Nhi.agent_id == Agent.id)
            .where(live, Nhi.target == target, Agent.environment != agent.environment)
            .limit(1)
        )
        if env is not None:
            raise Conflict(
                f"target: {target!r} holds identities of {env} agents, and this agent is in "
                f"{agent.environment}: environments stay isolated (OWASP NHI8)",
                field="target",
            )


def check_trust(session: Session, nhi: Nhi, own: str | None) -> None:
    """The requested role's trust principal against the policy's accounts (the format was
    checked by `request_nhi`); raising rolls the whole request back."""
    if nhi.kind != NhiKind.IAM_ROLE.value or not nhi.trust_principal:
        return
    policy = find_policy(session, nhi.platform, nhi.kind, nhi.agent.environment)
    if policy is None:  # request_nhi refused that already
        return
    check_trust_account(
        nhi.trust_principal,
        own_account=own or "",
        allowed_accounts=list(policy.allowed_trust_accounts or []),
        allow_service_principals=policy.allow_service_principals,
        label=f"{policy.platform}/{policy.kind}/{policy.environment}",
    )


def request_checked(
    session: Session,
    settings: Settings,
    agent_id: uuid.UUID,
    body: NhiCreate,
    actor: str,
    own_account: str | None,
) -> tuple[Nhi, list[str]]:
    """`request_nhi`, then the trust principal against the policy's accounts, where
    `own_account` is this service's AWS account (None when the principal names none)."""
    nhi, sensitive = request_nhi(session, settings, agent_id, body, actor)
    check_trust(session, nhi, own_account)
    return nhi, sensitive


def fail_start(session: Session, nhi_id: uuid.UUID, actor: str, reason: str) -> None:
    """The workflow could not be started: nothing was created, so the request simply failed."""
    nhi = session.get(Nhi, nhi_id, with_for_update=True)
    if nhi is None:
        return
    transition(
        session,
        nhi,
        status=NhiStatus.FAILED,
        changes={"status_reason": reason},
        event="nhi.failed",
        actor=actor,
        reason=reason,
    )


def record_containment(
    session: Session, nhi_id: uuid.UUID, actor: str, reason: str, path: str
) -> None:
    """Audit how a decommission reached the NHI: through its running lifecycle (`update`), or a
    new run started from the inventory (`fresh_lifecycle`, `restarted_lifecycle`)."""
    note(
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
    query = visible(select(Nhi).join(Agent).order_by(Nhi.created_at.desc(), Nhi.id), visible_to)
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
