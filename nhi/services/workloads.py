"""Workload identities bound to agents (issue 15): a JWT subject of a trusted issuer
(`NHI_WORKLOAD_OIDC_ISSUERS`) that acts as one agent, so the agent's runtime asks for task
credentials with its platform-issued token instead of a long-lived API token. Authentication
itself is `nhi.services.auth.WorkloadVerifier`; this module keeps the bindings. Each change
writes one audit event about the agent.

Every function takes an open session; the caller owns the transaction, so a refused change
writes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.enums import AgentStatus
from models.orm import Agent, AgentWorkload
from models.schemas import WorkloadCreate
from nhi.rules.policy import RuleViolation
from nhi.services.agents import get_agent
from nhi.services.auth import ACTOR_MAX, WORKLOAD_KIND, workload_name
from nhi.services.errors import Conflict, NotFound
from nhi.services.transitions import note

# More than this many workloads standing for one agent is a shared identity, not a list to keep.
MAX_WORKLOADS = 100


def add_workload(
    session: Session,
    agent_id: uuid.UUID,
    body: WorkloadCreate,
    actor: str,
    trusted_issuers: Iterable[str],
) -> AgentWorkload:
    """Bind a subject of a trusted issuer to the agent; RuleViolation (422) or Conflict (409)
    bind nothing."""
    trusted = sorted(trusted_issuers)
    if body.issuer not in trusted:
        raise RuleViolation(
            "issuer",
            f"{body.issuer!r} is not a trusted workload issuer (NHI_WORKLOAD_OIDC_ISSUERS: "
            f"{', '.join(trusted) or 'none configured'})",
        )
    # The audit trail names the workload in full (`workload:<issuer>#<subject>`, one actor
    # column); a shortened name could stand for two workloads.
    room = ACTOR_MAX - len(f"{WORKLOAD_KIND}:{workload_name(body.issuer, '')}")
    if len(body.subject) > room:
        raise RuleViolation("subject", f"too long for this issuer: at most {room} characters")
    agent = session.get(Agent, agent_id, with_for_update=True)
    if agent is None:
        raise NotFound(f"agent {agent_id} not found")
    if agent.status != AgentStatus.ACTIVE.value:
        raise Conflict(f"agent {agent.name} is {agent.status}: no new workloads", field="agent_id")
    held = session.scalars(
        select(AgentWorkload.id).where(AgentWorkload.agent_id == agent.id).limit(MAX_WORKLOADS)
    ).all()
    if len(held) >= MAX_WORKLOADS:
        raise Conflict(f"agent {agent.name} already has {MAX_WORKLOADS} workloads", field="subject")
    binding = AgentWorkload(
        agent_id=agent.id, issuer=body.issuer, subject=body.subject, created_by=actor
    )
    try:
        with session.begin_nested():
            session.add(binding)
            session.flush()
    except IntegrityError:
        # Which agent holds it is not said: the caller may not be allowed to see that agent.
        raise Conflict(
            f"subject: {body.subject!r} of {body.issuer} is already bound to an agent "
            "(a workload stands for one agent only; remove that binding first)",
            field="subject",
        ) from None
    note(
        session,
        subject_type="agent",
        subject_id=agent.id,
        event="agent.workload_bound",
        actor=actor,
        reason=body.reason or "workload identity bound through the API",
        details={"workload_id": str(binding.id), "issuer": body.issuer, "subject": body.subject},
    )
    return binding


def list_workloads(session: Session, agent_id: uuid.UUID) -> list[AgentWorkload]:
    """The workloads bound to the agent, oldest first."""
    get_agent(session, agent_id)
    return list(
        session.scalars(
            select(AgentWorkload)
            .where(AgentWorkload.agent_id == agent_id)
            .order_by(AgentWorkload.created_at, AgentWorkload.id)
        )
    )


def remove_workload(
    session: Session, agent_id: uuid.UUID, workload_id: uuid.UUID, actor: str, reason: str = ""
) -> None:
    """Unbind a workload: its next request is refused (401). NotFound unless it is one of this
    agent's. Task credentials it already holds live on to their expiry (contain the agent to
    end them at once)."""
    binding = session.get(AgentWorkload, workload_id, with_for_update=True)
    if binding is None or binding.agent_id != agent_id:
        raise NotFound(f"workload {workload_id} not found")
    note(
        session,
        subject_type="agent",
        subject_id=agent_id,
        event="agent.workload_unbound",
        actor=actor,
        reason=reason or "workload identity unbound through the API",
        details={
            "workload_id": str(binding.id),
            "issuer": binding.issuer,
            "subject": binding.subject,
        },
    )
    session.delete(binding)
    session.flush()
