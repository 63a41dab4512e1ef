"""What each dashboard page shows, read in one transaction with the same services and
visibility rules as the API (nothing here decides who may do what: the buttons only mirror
the rules in nhi/services/auth.py, which the actions enforce again)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from models.enums import NhiKind, NhiStatus, Platform, Role
from models.orm import (
    ActivityFinding,
    Agent,
    AuditEvent,
    Incident,
    Nhi,
    Policy,
    Prompt,
    Sweep,
    TaskCredential,
)
from models.schemas import FootprintOut
from nhi.infra.config import Settings
from nhi.rules.policy import actions_overlap
from nhi.services import (
    agents,
    findings,
    footprint,
    incidents,
    invokers,
    policies,
    sweeps,
    targets,
    tokens,
)
from nhi.services.auth import Principal, person_of_actor, require_read, require_role
from nhi.services.visibility import visible

# What renew and rotate act on; what decommission can still reach; what restore undoes.
RENEWABLE = frozenset({NhiStatus.ACTIVE, NhiStatus.EXPIRING, NhiStatus.ROTATING})
CONTAINABLE = frozenset(
    {
        NhiStatus.ACTIVE,
        NhiStatus.ROTATING,
        NhiStatus.EXPIRING,
        NhiStatus.QUARANTINED,
        NhiStatus.REVOKE_FAILED,
    }
)
LIVE = frozenset({NhiStatus.ACTIVE, NhiStatus.ROTATING, NhiStatus.EXPIRING})
SWEEP_READERS = (Role.SECURITY, Role.AUDITOR, Role.ADMIN)
ADMIN_READERS = (Role.ADMIN, Role.SECURITY, Role.AUDITOR)
EXPIRING_DAYS = 30
INVENTORY_LIMIT = 200


@dataclass
class Actions:
    """Which lifecycle buttons an NHI row shows, and whether the caller may press them."""

    renew: bool = False
    rotate: bool = False
    decommission: bool = False
    restore: bool = False
    may_own: bool = False
    may_contain: bool = False


def actions_for(p: Principal, nhi: Nhi) -> Actions:
    status = NhiStatus(nhi.status)
    owns = p.owns(nhi.agent)
    return Actions(
        renew=status in RENEWABLE,
        rotate=status in RENEWABLE,
        decommission=status in CONTAINABLE and status != NhiStatus.QUARANTINED,
        restore=status == NhiStatus.QUARANTINED,
        may_own=owns,
        # Rotate and decommission are containment: security may too (api/routes/lifecycle.py).
        may_contain=owns or (p.has(Role.SECURITY) and not p.has(Role.AUDITOR)),
    )


def mine(session: Session, p: Principal) -> list[tuple[Agent, list[Nhi]]]:
    """The agents the signed-in person owns or backs up, with their NHIs."""
    if not p.email or p.has(Role.AGENT):
        return []
    rows = session.scalars(
        select(Agent)
        .where(or_(Agent.owner_email == p.email, Agent.backup_owner_email == p.email))
        .order_by(Agent.name, Agent.environment)
    )
    return [(a, sorted(a.nhis, key=lambda n: n.created_at, reverse=True)) for a in rows]


@dataclass
class ExpiringDay:
    day: str
    nhis: list[Nhi] = field(default_factory=list)


def expiring(
    session: Session, p: Principal, now: datetime
) -> tuple[list[ExpiringDay], dict[uuid.UUID, list[Prompt]]]:
    """What expires in the next 30 days that `p` may see, by day, and the reminders sent."""
    query = visible(
        select(Nhi)
        .join(Agent)
        .where(
            Nhi.status.in_(sorted(LIVE)),
            Nhi.expires_at <= now + timedelta(days=EXPIRING_DAYS),
        )
        .order_by(Nhi.expires_at),
        p,
    )
    days: dict[str, ExpiringDay] = {}
    rows = list(session.scalars(query.limit(INVENTORY_LIMIT)))
    for nhi in rows:
        key = nhi.expires_at.astimezone(UTC).strftime("%Y-%m-%d")
        days.setdefault(key, ExpiringDay(key)).nhis.append(nhi)
    reminders: dict[uuid.UUID, list[Prompt]] = {}
    if rows:
        for prompt in session.scalars(
            select(Prompt)
            .where(Prompt.nhi_id.in_([n.id for n in rows]))
            .order_by(Prompt.created_at)
        ):
            reminders.setdefault(prompt.nhi_id, []).append(prompt)
    return list(days.values()), reminders


@dataclass
class AgentPage:
    agent: Agent
    nhis: list[Nhi]
    invokers: list[Any]
    task_credentials: list[TaskCredential]
    footprint: FootprintOut
    events: list[AuditEvent]


def agent_page(session: Session, p: Principal, agent_id: uuid.UUID) -> AgentPage:
    """One agent as the API shows it (404 unless `p` may read it) and its whole audit trail."""
    agent = agents.get_agent(session, agent_id, with_nhis=True)
    require_read(p, agent)
    nhi_ids = [str(n.id) for n in agent.nhis]
    events = list(
        session.scalars(
            select(AuditEvent)
            .where(AuditEvent.subject_id.in_([str(agent.id), *nhi_ids]))
            .order_by(AuditEvent.id.desc())
            .limit(200)
        )
    )
    credentials = list(
        session.scalars(
            select(TaskCredential)
            .where(TaskCredential.agent_id == agent.id)
            .order_by(TaskCredential.issued_at.desc())
            .limit(50)
        )
    )
    return AgentPage(
        agent=agent,
        nhis=sorted(agent.nhis, key=lambda n: n.created_at, reverse=True),
        invokers=invokers.list_invokers(session, agent.id),
        task_credentials=credentials,
        footprint=footprint.footprint(session, agent.id),
        events=events,
    )


@dataclass
class Pending:
    nhi: Nhi
    # Each scope statement's actions, with whether the policy marks it sensitive.
    scope: list[tuple[list[tuple[str, bool]], list[str]]]
    own: bool
    may_decide: bool


def approvals(session: Session, p: Principal) -> list[Pending]:
    """Requests waiting for an approver that `p` may see; the requester's own are marked so
    the page shows no decision buttons on them."""
    rows = session.scalars(
        visible(
            select(Nhi)
            .join(Agent)
            .where(Nhi.status == NhiStatus.PENDING_APPROVAL)
            .order_by(Nhi.created_at),
            p,
        ).limit(INVENTORY_LIMIT)
    )
    out = []
    for nhi in rows:
        policy = policies.find_policy(session, nhi.platform, nhi.kind, nhi.agent.environment)
        rules = list(policy.sensitive_actions) if policy else []
        own = nhi.requested_by == p.actor or person_of_actor(session, nhi.requested_by) == p.person
        out.append(
            Pending(
                nhi=nhi,
                scope=[_marked(s, rules) for s in nhi.granted_scope],
                own=own,
                may_decide=p.has(Role.APPROVER) and not own,
            )
        )
    return out


def _marked(statement: Any, rules: list[str]) -> tuple[list[tuple[str, bool]], list[str]]:
    actions = [str(a) for a in statement.get("actions", [])]
    resources = [str(r) for r in statement.get("resources", [])]
    return [(a, any(_sensitive(a, r) for r in rules)) for a in actions], resources


def _sensitive(action: str, rule: str) -> bool:
    # IAM actions match by pattern; Postgres privileges by name, in any case.
    return action.upper() == rule.upper() or actions_overlap(action, rule)


@dataclass
class Filters:
    platform: str = ""
    kind: str = ""
    environment: str = ""
    team: str = ""
    status: str = ""


@dataclass
class SecurityPage:
    inventory: list[Nhi]
    overdue: list[Nhi]
    revoke_failed: list[Nhi]
    missing: list[Nhi]
    sweeps: list[Sweep] | None
    findings: list[ActivityFinding]
    incidents: list[Incident]
    filters: Filters
    choices: dict[str, list[str]]


def security(session: Session, p: Principal, f: Filters, now: datetime) -> SecurityPage:
    """The inventory `p` may see, filtered; what is overdue, failed or missing; sweeps."""
    base = visible(select(Nhi).join(Agent).order_by(Nhi.created_at.desc(), Nhi.id), p)
    query = base
    if f.platform:
        query = query.where(Nhi.platform == f.platform)
    if f.kind:
        query = query.where(Nhi.kind == f.kind)
    if f.environment:
        query = query.where(Agent.environment == f.environment)
    if f.team:
        query = query.where(Agent.team == f.team)
    if f.status:
        query = query.where(Nhi.status == f.status)
    teams = sorted(set(session.scalars(visible(select(Agent.team).distinct(), p))))
    return SecurityPage(
        inventory=list(session.scalars(query.limit(INVENTORY_LIMIT))),
        overdue=list(
            session.scalars(
                base.where(Nhi.status.in_(sorted(LIVE)), Nhi.expires_at < now).limit(50)
            )
        ),
        revoke_failed=list(
            session.scalars(base.where(Nhi.status == NhiStatus.REVOKE_FAILED).limit(50))
        ),
        missing=list(session.scalars(base.where(Nhi.status == NhiStatus.MISSING).limit(50))),
        sweeps=sweeps.list_sweeps(session, limit=10) if p.has(*SWEEP_READERS) else None,
        findings=findings.list_findings(session, visible_to=p, limit=20),
        incidents=incidents.list_incidents(session, p, limit=20),
        filters=f,
        choices={
            "platform": [v.value for v in Platform],
            "kind": [v.value for v in NhiKind],
            "environment": ["dev", "staging", "prod"],
            "team": teams,
            "status": [v.value for v in NhiStatus],
        },
    )


@dataclass
class AdminPage:
    policies: list[tuple[Policy, str]]
    targets: list[Any] | None
    tokens: list[Any]


def admin(session: Session, settings: Settings, p: Principal) -> AdminPage:
    """Policies (as `nhi policies apply` files), targets and tokens: admin, security, auditor."""
    require_role(p, *ADMIN_READERS)
    return AdminPage(
        policies=[(row, policy_yaml(row)) for row in policies.list_policies(session)],
        targets=targets.list_targets(session, settings),
        tokens=tokens.list_tokens(session),
    )


def policy_document(row: Policy) -> dict[str, Any]:
    """A policy row as one entry of a policies file (the `PolicyIn` fields, in seconds)."""
    return {
        "platform": str(row.platform),
        "kind": str(row.kind),
        "environment": str(row.environment),
        "allowed": row.allowed,
        "default_ttl": row.default_ttl_seconds,
        "max_lifetime": row.max_lifetime_seconds,
        "rotation_period": row.rotation_period_seconds,
        "reminder_offsets": list(row.reminder_offsets_seconds),
        "grace_period": row.grace_period_seconds,
        "max_session_duration": row.max_session_duration_seconds,
        "allow_resource_wildcard": row.allow_resource_wildcard,
        "forbidden_actions": list(row.forbidden_actions),
        "sensitive_actions": list(row.sensitive_actions),
        "allowed_trust_accounts": list(row.allowed_trust_accounts),
        "allow_service_principals": row.allow_service_principals,
        "allow_task_credentials": row.allow_task_credentials,
        "task_credential_max_ttl": row.task_credential_max_ttl_seconds,
    }


def policy_yaml(row: Policy) -> str:
    return yaml.safe_dump(policy_document(row), sort_keys=False)


def current_policy_yaml(session: Session, platform: str, kind: str, environment: str) -> str:
    """The policy now in force for a target, as YAML ('' when there is none)."""
    row = policies.find_policy(session, platform, kind, environment)
    return policy_yaml(row) if row else ""
