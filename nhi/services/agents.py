"""Agents: registration, reads, and their one transition (`active` -> `completed`).

Every function takes an open session; the caller owns the transaction, so a refused request
changes nothing.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from models.enums import AgentStatus, NhiStatus
from models.orm import Agent, Nhi
from models.schemas import AgentCreate
from nhi.rules.policy import RuleViolation
from nhi.services.auth import Principal
from nhi.services.errors import Conflict, NotFound
from nhi.services.transitions import note, transition
from nhi.services.visibility import visible

# NHI statuses nothing follows: no identity on a platform, no lifecycle to run.
FINAL_STATUSES = frozenset({NhiStatus.DECOMMISSIONED.value, NhiStatus.FAILED.value})


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
        category=body.category,
        environment=body.environment,
        owner_email=body.owner_email,
        owner_slack_id=body.owner_slack_id,
        backup_owner_email=body.backup_owner_email,
        team=body.team,
        purpose=body.purpose,
        expected_end_at=body.expected_end_at,
        invokers=list(body.invokers),
        status=AgentStatus.ACTIVE,
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
    note(
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
    query = visible(select(Agent).order_by(Agent.created_at.desc(), Agent.id), visible_to)
    if environment:
        query = query.where(Agent.environment == environment)
    if owner:
        query = query.where(Agent.owner_email == owner.lower())
    if team:
        query = query.where(Agent.team == team)
    if status:
        query = query.where(Agent.status == status)
    return list(session.scalars(query.limit(limit).offset(offset)))


def complete_agent(
    session: Session, agent_id: uuid.UUID, actor: str, reason: str
) -> list[uuid.UUID]:
    """Mark the agent's task ended; returns its NHIs that are still alive."""
    agent = session.get(Agent, agent_id, with_for_update=True)
    if agent is None:
        raise NotFound(f"agent {agent_id} not found")
    if agent.status == AgentStatus.ACTIVE.value:
        transition(
            session,
            agent,
            status=AgentStatus.COMPLETED,
            event="agent.completed",
            actor=actor,
            reason=reason or "the agent's task ended",
        )
    return [
        n.id
        for n in session.scalars(select(Nhi).where(Nhi.agent_id == agent_id))
        if n.status not in FINAL_STATUSES
    ]
