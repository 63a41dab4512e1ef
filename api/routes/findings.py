"""Activity findings (issue 17): list them (`nhi findings`), read one, acknowledge one with a
reason (audited). Callers see the findings of the agents they may read."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from api.deps import CurrentPrincipal, SessionDep, authenticated
from models.enums import ActivityKind, Role, Severity
from models.orm import Agent
from models.schemas import Body, Limit, Offset, RequiredReason, Timestamp
from nhi.services import findings
from nhi.services.auth import require_read, require_role
from nhi.services.errors import NotFound

router = APIRouter(prefix="/v1/findings", tags=["findings"], dependencies=[authenticated])
ACKERS = (Role.SECURITY, Role.ADMIN)


class FindingOut(BaseModel):
    """A finding with its evidence and whether someone has looked at it."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    nhi_id: uuid.UUID
    agent_id: uuid.UUID
    task_credential_id: uuid.UUID | None
    kind: ActivityKind
    severity: Severity
    summary: str
    evidence: dict[str, Any]
    event_id: uuid.UUID | None
    occurred_at: datetime
    created_at: datetime
    alerted_at: datetime | None
    acked_at: datetime | None
    acked_by: str | None
    ack_reason: str | None


class AckIn(Body):
    reason: RequiredReason


@router.get("", response_model=list[FindingOut])
def list_findings(
    session: SessionDep,
    p: CurrentPrincipal,
    agent: uuid.UUID | None = None,
    since: Timestamp | None = None,
    severity: Severity | None = None,
    acked: bool | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[FindingOut]:
    """Newest first; `severity` is a minimum (`high` lists high and critical)."""
    if agent is not None:
        row = session.get(Agent, agent)
        if row is None:
            return []
        require_read(p, row)
    rows = findings.list_findings(
        session,
        agent_id=agent,
        since=since,
        severity=severity,
        acked=acked,
        visible_to=p,
        limit=limit,
        offset=offset,
    )
    return [FindingOut.model_validate(r) for r in rows]


@router.get("/{finding_id}", response_model=FindingOut)
def get_finding(finding_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal) -> FindingOut:
    finding = findings.get_finding(session, finding_id)
    agent = session.get(Agent, finding.agent_id)
    assert agent is not None
    if not p.can_read(agent):
        # Worded exactly like a missing finding (not its agent), so ids cannot be probed.
        raise NotFound(f"finding {finding_id} not found")
    return FindingOut.model_validate(finding)


@router.post("/{finding_id}/ack", response_model=FindingOut)
def ack_finding(
    finding_id: uuid.UUID, body: AckIn, session: SessionDep, p: CurrentPrincipal
) -> FindingOut:
    """Acknowledge a finding with a reason (security or admin); audited."""
    require_role(p, *ACKERS)
    finding = findings.acknowledge(
        session, finding_id, actor=p.actor, reason=body.reason, now=datetime.now(UTC)
    )
    return FindingOut.model_validate(finding)
