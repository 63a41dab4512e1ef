"""Invokers of an agent: who or what can make it act (issue 16).

Changed by whoever may change the agent (its platform team, its owner or backup owner, an
admin); read by whoever may read it. Auditors read only.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from api.deps import CurrentPrincipal, SessionDep, authenticated
from models.enums import Role
from models.orm import Agent
from models.schemas import InvokerCreate, InvokerOut
from nhi.services import agents, invokers
from nhi.services.auth import Principal, require, require_read

router = APIRouter(prefix="/v1/agents", tags=["agents"], dependencies=[authenticated])


def require_agent_change(p: Principal, agent: Agent) -> None:
    """404 unless `p` may see the agent; 403 unless its platform team, its owner, or admin."""
    require_read(p, agent)
    require(
        p.acts_for(agent.team) or p.owns(agent) or p.has(Role.ADMIN),
        f"{p.actor} may not change agent {agent.name}: not platform for {agent.team}, "
        "not its owner, not admin",
    )


@router.post("/{agent_id}/invokers", status_code=status.HTTP_201_CREATED, response_model=InvokerOut)
def add_invoker(
    agent_id: uuid.UUID, body: InvokerCreate, session: SessionDep, p: CurrentPrincipal
) -> InvokerOut:
    """Record who or what can make the agent act, through which channel, until when."""
    require_agent_change(p, agents.get_agent(session, agent_id))
    return InvokerOut.model_validate(invokers.add_invoker(session, agent_id, body, p.actor))


@router.get("/{agent_id}/invokers", response_model=list[InvokerOut])
def list_invokers(
    agent_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal
) -> list[InvokerOut]:
    """The agent's invokers, oldest first (expired ones too)."""
    require_read(p, agents.get_agent(session, agent_id))
    return [InvokerOut.model_validate(i) for i in invokers.list_invokers(session, agent_id)]


@router.delete("/{agent_id}/invokers/{invoker_id}", status_code=status.HTTP_204_NO_CONTENT)
def remove_invoker(
    agent_id: uuid.UUID, invoker_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal
) -> Response:
    """Forget an invoker of the agent."""
    require_agent_change(p, agents.get_agent(session, agent_id))
    invokers.remove_invoker(session, agent_id, invoker_id, p.actor)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
