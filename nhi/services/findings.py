"""Activity findings (issue 17): listing, acknowledgement, which ones to alert on, and which
agents a finding puts over the auto-containment threshold."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.enums import SEVERITY_RANK, Severity
from models.orm import ActivityFinding, Agent, Nhi
from nhi.services.auth import Principal
from nhi.services.errors import Conflict, NotFound
from nhi.services.transitions import note
from nhi.services.visibility import visible

FINDING_SUBJECT = "finding"


def at_least(severity: Severity) -> list[Severity]:
    """The severities at or above `severity`."""
    return [s for s in Severity if SEVERITY_RANK[s] >= SEVERITY_RANK[severity]]


def list_findings(
    session: Session,
    *,
    agent_id: uuid.UUID | None = None,
    since: datetime | None = None,
    severity: Severity | None = None,
    acked: bool | None = None,
    visible_to: Principal | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[ActivityFinding]:
    """Newest first, of the agents `visible_to` may read (None: all)."""
    query = visible(
        select(ActivityFinding)
        .join(Agent, Agent.id == ActivityFinding.agent_id)
        .order_by(ActivityFinding.created_at.desc(), ActivityFinding.id),
        visible_to,
    )
    if agent_id is not None:
        query = query.where(ActivityFinding.agent_id == agent_id)
    if since is not None:
        query = query.where(ActivityFinding.occurred_at >= since)
    if severity is not None:
        query = query.where(ActivityFinding.severity.in_(at_least(severity)))
    if acked is not None:
        query = query.where(
            ActivityFinding.acked_at.is_not(None) if acked else ActivityFinding.acked_at.is_(None)
        )
    return list(session.scalars(query.limit(limit).offset(offset)))


def get_finding(session: Session, finding_id: uuid.UUID) -> ActivityFinding:
    finding = session.get(ActivityFinding, finding_id)
    if finding is None:
        raise NotFound(f"finding {finding_id} not found")
    return finding


def acknowledge(
    session: Session, finding_id: uuid.UUID, *, actor: str, reason: str, now: datetime
) -> ActivityFinding:
    """Mark a finding as looked at, with why; audited. Acknowledging twice is refused (the
    first reason stands)."""
    finding = session.get(ActivityFinding, finding_id, with_for_update=True)
    if finding is None:
        raise NotFound(f"finding {finding_id} not found")
    if finding.acked_at is not None:
        raise Conflict(f"finding {finding_id} was acknowledged by {finding.acked_by} already")
    finding.acked_at = now
    finding.acked_by = actor
    finding.ack_reason = reason
    note(
        session,
        subject_type=FINDING_SUBJECT,
        subject_id=finding.id,
        event="finding.acknowledged",
        actor=actor,
        reason=reason,
        details={"nhi_id": str(finding.nhi_id), "kind": finding.kind.value},
    )
    return finding


@dataclass(frozen=True)
class AlertTarget:
    """A finding to tell people about: the owner and the security channel."""

    finding_id: uuid.UUID
    agent_id: uuid.UUID
    agent_name: str
    owner_email: str
    nhi_name: str
    kind: str
    severity: str
    summary: str


def claim_alerts(
    session: Session, finding_ids: Sequence[uuid.UUID], *, now: datetime, window: timedelta
) -> list[AlertTarget]:
    """The findings among `finding_ids` to alert on: the first per NHI and kind with no alert
    in the last `window` (they are marked alerted, in the caller's transaction, so a retried
    import does not alert twice); the rest stay quiet."""
    if not finding_ids:
        return []
    rows = session.execute(
        select(ActivityFinding, Nhi.name, Agent.name, Agent.owner_email)
        .join(Nhi, Nhi.id == ActivityFinding.nhi_id)
        .join(Agent, Agent.id == ActivityFinding.agent_id)
        .where(ActivityFinding.id.in_(finding_ids), ActivityFinding.alerted_at.is_(None))
        .order_by(ActivityFinding.occurred_at)
    ).all()
    out: list[AlertTarget] = []
    claimed: set[tuple[uuid.UUID, str]] = set()
    for finding, nhi_name, agent_name, owner in rows:
        key = (finding.nhi_id, finding.kind.value)
        if key in claimed or _alerted_within(session, finding, now - window):
            continue
        claimed.add(key)
        finding.alerted_at = now
        out.append(
            AlertTarget(
                finding_id=finding.id,
                agent_id=finding.agent_id,
                agent_name=agent_name,
                owner_email=owner,
                nhi_name=nhi_name,
                kind=finding.kind.value,
                severity=finding.severity.value,
                summary=finding.summary,
            )
        )
    session.flush()
    return out


def _alerted_within(session: Session, finding: ActivityFinding, since: datetime) -> bool:
    return bool(
        session.scalar(
            select(func.count())
            .select_from(ActivityFinding)
            .where(
                ActivityFinding.nhi_id == finding.nhi_id,
                ActivityFinding.kind == finding.kind,
                ActivityFinding.alerted_at >= since,
            )
        )
    )


def severe_agents(
    session: Session, finding_ids: Sequence[uuid.UUID], threshold: Severity
) -> dict[uuid.UUID, uuid.UUID]:
    """Agent -> its first finding at or above `threshold` among `finding_ids`."""
    if not finding_ids:
        return {}
    rows = session.execute(
        select(ActivityFinding.agent_id, ActivityFinding.id)
        .where(
            ActivityFinding.id.in_(finding_ids),
            ActivityFinding.severity.in_(at_least(threshold)),
        )
        .order_by(ActivityFinding.occurred_at)
    ).all()
    out: dict[uuid.UUID, uuid.UUID] = {}
    for agent_id, finding_id in rows:
        out.setdefault(agent_id, finding_id)
    return out
