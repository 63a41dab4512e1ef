"""Containment incidents (issue 17): one row per containment of an agent, its report and its
release.

An incident is opened by a security caller (`POST /v1/agents/{id}/contain`) or automatically for
a severe finding, and the `ContainAgentWorkflow` fills its report: one entry per credential
(what was done to it and the proof that it is dead, found by trying it) and a timeline. At most
one unreleased incident exists per agent (a partial unique index): a second contain joins it.
Release needs a second person: an approver, security or admin who is not the person who
contained it (compared by person, as four-eyes approval does). Every state change writes one
audit event through `transition`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.enums import IncidentStatus, NhiStatus, Role
from models.orm import Agent, Incident, Nhi, TaskCredential
from nhi.rules.lifecycle import HOLD_FAILED, HOLD_NOT_ANSWERED
from nhi.services.auth import Principal, person_of_actor, require, require_read, require_role
from nhi.services.errors import Conflict, NotFound
from nhi.services.transitions import transition

OPEN = frozenset(
    {IncidentStatus.CONTAINING, IncidentStatus.CONTAINED, IncidentStatus.PARTIALLY_CONTAINED}
)
# NHI statuses whose identity may exist on its platform: what containment acts on (the same
# set the per-NHI decommission accepts).
CONTAINABLE = frozenset(
    {
        NhiStatus.ACTIVE,
        NhiStatus.ROTATING,
        NhiStatus.EXPIRING,
        NhiStatus.QUARANTINED,
        NhiStatus.REVOKE_FAILED,
    }
)
# How `hold_lifecycle` reports a lifecycle this incident made decommission: release restores
# only these (an NHI quarantined before the incident stays quarantined).
HELD = frozenset({"update", "fresh_lifecycle"})
# Timeline entries kept per incident: a containment retried for days must not grow its row
# without bound (the audit trail keeps every state change anyway).
MAX_TIMELINE = 500


def now() -> datetime:
    return datetime.now(UTC)


def timeline_entry(event: str, detail: str = "", at: datetime | None = None) -> dict[str, str]:
    """One line of an incident's timeline."""
    return {"at": (at or now()).isoformat(), "event": event, "detail": detail}


# ---- who may ---------------------------------------------------------------------------------


def authorize_contain(p: Principal, agent: Agent) -> None:
    """404 if `p` cannot see the agent, 403 unless `p` is security or admin."""
    require_read(p, agent)
    require_role(p, Role.SECURITY, Role.ADMIN)


def authorize_release(session: Session, p: Principal, incident: Incident) -> None:
    """403 unless `p` is an approver, security or admin and not the person who contained it
    (by email or OIDC subject, not by credential: a second token of the same person is the
    same person)."""
    require_role(p, Role.APPROVER, Role.SECURITY, Role.ADMIN)
    opener = incident.opened_by_person or person_of_actor(session, incident.opened_by)
    require(
        p.actor != incident.opened_by and p.person != opener,
        f"{p.actor} contained agent {incident.agent_id} (or is the person who did) and cannot "
        "release it: a second person must",
    )


# ---- reads -----------------------------------------------------------------------------------


def get_agent(session: Session, agent_id: uuid.UUID) -> Agent:
    agent = session.get(Agent, agent_id)
    if agent is None:
        raise NotFound(f"agent {agent_id} not found")
    return agent


def get_incident(session: Session, incident_id: uuid.UUID, visible_to: Principal) -> Incident:
    """The incident, or 404 (also when `visible_to` may not see its agent)."""
    incident = session.get(Incident, incident_id)
    if incident is None:
        raise NotFound(f"incident {incident_id} not found")
    agent = session.get_one(Agent, incident.agent_id)
    if not visible_to.can_read(agent):
        raise NotFound(f"incident {incident_id} not found")
    return incident


def open_incident_of(
    session: Session, agent_id: uuid.UUID, *, lock: bool = False
) -> Incident | None:
    """The agent's unreleased incident, if any."""
    query = select(Incident).where(
        Incident.agent_id == agent_id, Incident.status != IncidentStatus.RELEASED
    )
    if lock:
        query = query.with_for_update()
    return session.scalar(query)


def hold_agent(session: Session, agent_id: uuid.UUID, *, opening: bool) -> Agent:
    """The agent, read under a lock on its row held until commit: exclusive to open an
    incident, shared to activate one of its NHIs. The two then never interleave, so an NHI is
    either active before the incident opens (and so in its containment plan, read after) or
    sees the incident and is refused: containment is never outrun by a provisioning finishing
    meanwhile. (Completing the agent locks the row FOR UPDATE, which the shared lock waits for
    too.) Read as the lock found it, not as this session may have loaded it before.

    Raises:
        NotFound: no such agent.
    """
    query = select(Agent).where(Agent.id == agent_id).execution_options(populate_existing=True)
    agent = session.scalar(
        query.with_for_update(key_share=True) if opening else query.with_for_update(read=True)
    )
    if agent is None:
        raise NotFound(f"agent {agent_id} not found")
    return agent


def containment_of(session: Session, agent_id: uuid.UUID) -> str | None:
    """Why the agent may get no new credential (its open incident), or None."""
    incident = open_incident_of(session, agent_id)
    if incident is None:
        return None
    return (
        f"its agent is contained (incident {incident.id}, {incident.status}): no new "
        "identities until the incident is released"
    )


def list_incidents(
    session: Session,
    visible_to: Principal,
    *,
    agent_id: uuid.UUID | None = None,
    status: IncidentStatus | None = None,
    limit: int = 100,
) -> list[Incident]:
    """Newest first, only those whose agent `visible_to` may see."""
    query = (
        select(Incident, Agent)
        .join(Agent, Agent.id == Incident.agent_id)
        .order_by(Incident.opened_at.desc(), Incident.id)
    )
    if agent_id is not None:
        query = query.where(Incident.agent_id == agent_id)
    if status is not None:
        query = query.where(Incident.status == status)
    out: list[Incident] = []
    for incident, agent in session.execute(query).all():
        if visible_to.can_read(agent):
            out.append(incident)
            if len(out) >= limit:
                break
    return out


def containment_targets(
    session: Session, agent_id: uuid.UUID
) -> tuple[list[tuple[Nhi, Agent]], list[TaskCredential]]:
    """Every NHI of the agent whose identity may exist on its platform, and every live task
    credential derived from any of its NHIs."""
    agent = get_agent(session, agent_id)
    nhis = session.scalars(
        select(Nhi)
        .where(Nhi.agent_id == agent_id, Nhi.status.in_(sorted(s.value for s in CONTAINABLE)))
        .order_by(Nhi.created_at, Nhi.id)
    ).all()
    tasks = session.scalars(
        select(TaskCredential)
        .where(TaskCredential.agent_id == agent_id, TaskCredential.status != "ended")
        .order_by(TaskCredential.issued_at, TaskCredential.id)
    ).all()
    return [(n, agent) for n in nhis], list(tasks)


# ---- writes ----------------------------------------------------------------------------------


def open_incident(
    session: Session,
    agent_id: uuid.UUID,
    *,
    reason: str,
    actor: str,
    person: str,
    finding_id: uuid.UUID | None = None,
) -> tuple[Incident, bool]:
    """The agent's open incident, joined, or a new one (`containing`, audited); whether it is
    new. Two concurrent opens meet at the partial unique index: the loser joins the winner."""
    hold_agent(session, agent_id, opening=True)
    existing = open_incident_of(session, agent_id, lock=True)
    if existing is not None:
        return existing, False
    incident = Incident(
        id=uuid.uuid4(),
        agent_id=agent_id,
        status=IncidentStatus.CONTAINING,
        reason=reason,
        opened_by=actor,
        opened_by_person=person,
        finding_id=finding_id,
        report={
            "credentials": [],
            "timeline": [timeline_entry("opened", f"by {actor}: {reason}")],
            "lifecycles": {},
            "attempts": 0,
            "cause": None,
        },
    )
    try:
        with session.begin_nested():
            session.add(incident)
            session.flush()
    except IntegrityError:
        joined = open_incident_of(session, agent_id, lock=True)
        if joined is None:  # released between the two reads: a real conflict, try again
            raise Conflict(f"agent {agent_id}: an incident changed meanwhile; try again") from None
        return joined, False
    transition(
        session,
        incident,
        event="incident.opened",
        actor=actor,
        reason=reason,
        details={"agent_id": str(agent_id), "finding_id": str(finding_id or "")},
        key="incident/opened",
    )
    return incident, True


def record_pass(
    session: Session,
    incident_id: uuid.UUID,
    *,
    credentials: Sequence[dict[str, Any]],
    lifecycles: dict[str, str],
    timeline: Sequence[dict[str, str]],
    attempt: int,
    key: str,
) -> IncidentStatus:
    """Store one containment pass: `contained` when every credential's proof passed, else
    `partially_contained` with the cause. One audit event when the status changes. A released
    incident is left as it is (the pass raced a release) and `released` returned."""
    incident = session.get(Incident, incident_id, with_for_update=True)
    if incident is None:
        raise NotFound(f"incident {incident_id} not found")
    if incident.status is IncidentStatus.RELEASED:
        return IncidentStatus.RELEASED
    failed = [f"{c['credential']}: {c['proof']}" for c in credentials if not c.get("proven")]
    failed += [
        f"lifecycle of nhi {nhi_id} not held: {how}"
        for nhi_id, how in lifecycles.items()
        if how.startswith((HOLD_FAILED, HOLD_NOT_ANSWERED))
    ]
    # No credential at all is contained too: the agent holds nothing live.
    status = IncidentStatus.PARTIALLY_CONTAINED if failed else IncidentStatus.CONTAINED
    cause = "; ".join(failed)[:2000] if failed else None
    report = dict(incident.report or {})
    # A lifecycle this incident holds stays recorded as held (a later pass finds it already
    # decommissioning): release restores exactly those.
    earlier = dict(report.get("lifecycles", {}))
    merged_lifecycles = {**lifecycles, **{k: v for k, v in earlier.items() if v in HELD}}
    report.update(
        credentials=list(credentials),
        lifecycles=merged_lifecycles,
        attempts=attempt,
        cause=cause,
        timeline=(list(report.get("timeline", [])) + list(timeline))[-MAX_TIMELINE:],
    )
    changes: dict[str, Any] = {"report": report}
    if status is IncidentStatus.CONTAINED and incident.contained_at is None:
        changes["contained_at"] = now()
    if status is not incident.status:
        applied = transition(
            session,
            incident,
            event=f"incident.{status.value}",
            actor="system:containment",
            reason=cause or f"every credential proven dead ({len(credentials)})",
            status=status,
            changes=changes,
            details={"attempt": attempt, "credentials": len(credentials), "failed": len(failed)},
            key=key,
        )
        if applied:
            return status
    incident.report = report
    if "contained_at" in changes:
        incident.contained_at = changes["contained_at"]
    return status


def release(
    session: Session,
    incident: Incident,
    p: Principal,
    reason: str,
    results: dict[str, str],
) -> Incident:
    """Mark the incident released by `p` (authorized by the caller), with what the release did
    to each NHI's lifecycle in its timeline."""
    if incident.status is IncidentStatus.RELEASED:
        raise Conflict(f"status: incident {incident.id} is already released")
    report = dict(incident.report or {})
    timeline = list(report.get("timeline", []))
    timeline += [timeline_entry("restored", f"nhi {n}: {what}") for n, what in results.items()]
    timeline.append(timeline_entry("released", f"by {p.actor}: {reason}"))
    report["timeline"] = timeline[-MAX_TIMELINE:]
    report["release"] = results
    transition(
        session,
        incident,
        event="incident.released",
        actor=p.actor,
        reason=reason,
        status=IncidentStatus.RELEASED,
        changes={
            "released_by": p.actor,
            "released_at": now(),
            "release_reason": reason,
            "report": report,
        },
        details={"restored": results},
        key="incident/released",
    )
    return incident


def refuse_restore_while_contained(session: Session, p: Principal, nhi_id: uuid.UUID) -> None:
    """An owner's restore of an NHI whose agent is contained is refused (409): only a release,
    by a second person, lifts a containment. Callers who may not restore anyway are left to
    the route's own answer (404 or 403), so this reveals nothing to them."""
    nhi = session.get(Nhi, nhi_id)
    if nhi is None:
        return
    agent = session.get_one(Agent, nhi.agent_id)
    if not p.owns(agent):
        return
    incident = open_incident_of(session, agent.id)
    if incident is not None:
        raise Conflict(
            f"status: agent {agent.name} is contained (incident {incident.id}); only a release "
            "by a second person lifts it (`nhi release`)"
        )
