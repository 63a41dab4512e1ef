"""Invokers: who or what can make an agent act (issue 16). Each change writes one audit event
about the agent.

Every function takes an open session; the caller owns the transaction, so a refused change
writes nothing.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.enums import AgentStatus, InvokerKind
from models.orm import Agent, AgentInvoker
from models.schemas import MAX_DURATION_SECONDS, InvokerCreate
from nhi.rules.policy import RuleViolation
from nhi.services.agents import get_agent
from nhi.services.errors import Conflict, NotFound
from nhi.services.transitions import note

# More than this many invokers on one agent is a sign of a shared agent, not a list to keep.
MAX_INVOKERS = 200


def _check_agent_ref(session: Session, agent: Agent, ref: str) -> Agent:
    """An agent invoker: another agent, existing, of the same environment."""
    other_id = uuid.UUID(ref)  # canonical: models.schemas checked it
    if other_id == agent.id:
        raise RuleViolation("ref", "an agent cannot be its own invoker")
    other = session.get(Agent, other_id)
    if other is None:
        raise RuleViolation("ref", f"agent {ref} does not exist")
    if other.environment != agent.environment:
        # OWASP NHI8: an agent of one environment must not drive one of another.
        raise RuleViolation(
            "ref",
            f"agent {other.name} is in {other.environment}, not {agent.environment}: "
            "environments stay isolated (OWASP NHI8)",
        )
    return other


def add_invoker(
    session: Session,
    agent_id: uuid.UUID,
    body: InvokerCreate,
    actor: str,
    now: datetime | None = None,
) -> AgentInvoker:
    """Record an invoker of the agent; RuleViolation (422) or Conflict (409) add nothing."""
    now = now or datetime.now(UTC)
    agent = session.get(Agent, agent_id, with_for_update=True)
    if agent is None:
        raise NotFound(f"agent {agent_id} not found")
    if agent.status != AgentStatus.ACTIVE.value:
        raise Conflict(f"agent {agent.name} is {agent.status}: no new invokers", field="agent_id")
    if body.expires_at is not None:
        if body.expires_at <= now:
            raise RuleViolation("expires_at", "must be in the future")
        if body.expires_at > now + timedelta(seconds=MAX_DURATION_SECONDS):
            raise RuleViolation("expires_at", "must be within 366 days")
    if body.kind is InvokerKind.AGENT:
        _check_agent_ref(session, agent, body.ref)
    held = session.scalars(
        select(AgentInvoker.id).where(AgentInvoker.agent_id == agent.id).limit(MAX_INVOKERS)
    ).all()
    if len(held) >= MAX_INVOKERS:
        raise Conflict(f"agent {agent.name} already has {MAX_INVOKERS} invokers", field="ref")
    invoker = AgentInvoker(
        agent_id=agent.id,
        kind=body.kind,
        ref=body.ref,
        channel=body.channel,
        expires_at=body.expires_at,
        added_by=actor,
        added_at=now,
    )
    try:
        with session.begin_nested():
            session.add(invoker)
            session.flush()
    except IntegrityError:
        raise Conflict(
            f"ref: {body.kind.value} {body.ref} already invokes agent {agent.name} "
            f"through {body.channel.value}",
            field="ref",
        ) from None
    note(
        session,
        subject_type="agent",
        subject_id=agent.id,
        event="agent.invoker_added",
        actor=actor,
        reason=f"{body.kind.value} invoker added through {body.channel.value}",
        details={
            "invoker_id": str(invoker.id),
            "kind": body.kind.value,
            "ref": body.ref,
            "channel": body.channel.value,
            "expires_at": body.expires_at.isoformat() if body.expires_at else None,
        },
    )
    return invoker


def list_invokers(session: Session, agent_id: uuid.UUID) -> list[AgentInvoker]:
    """The agent's invokers, oldest first (expired ones too: they say until when)."""
    get_agent(session, agent_id)
    return list(
        session.scalars(
            select(AgentInvoker)
            .where(AgentInvoker.agent_id == agent_id)
            .order_by(AgentInvoker.added_at, AgentInvoker.id)
        )
    )


def remove_invoker(
    session: Session, agent_id: uuid.UUID, invoker_id: uuid.UUID, actor: str, reason: str = ""
) -> None:
    """Forget an invoker; NotFound unless it is one of this agent's."""
    invoker = session.get(AgentInvoker, invoker_id, with_for_update=True)
    if invoker is None or invoker.agent_id != agent_id:
        raise NotFound(f"invoker {invoker_id} not found")
    note(
        session,
        subject_type="agent",
        subject_id=agent_id,
        event="agent.invoker_removed",
        actor=actor,
        reason=reason or f"{invoker.kind} invoker removed",
        details={
            "invoker_id": str(invoker.id),
            "kind": str(invoker.kind),
            "ref": invoker.ref,
            "channel": str(invoker.channel),
        },
    )
    session.delete(invoker)
    session.flush()
