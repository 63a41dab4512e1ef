"""Workload identities of an agent (issue 15): JWT subjects of trusted issuers that act as the
agent, so its runtime asks for task credentials with its platform-issued token.

Bound and unbound by whoever may change the agent (its platform team, its owner or backup
owner, an admin); read by whoever may read it. Auditors read only; the workload itself reads
nothing (it is an `agent` principal).
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from api.deps import CurrentPrincipal, SessionDep, State, authenticated
from api.routes.invokers import require_agent_change
from models.schemas import Reason, WorkloadCreate, WorkloadOut
from nhi.services import agents, workloads
from nhi.services.auth import require_read

router = APIRouter(prefix="/v1/agents", tags=["agents"], dependencies=[authenticated])


@router.post(
    "/{agent_id}/workloads", status_code=status.HTTP_201_CREATED, response_model=WorkloadOut
)
def bind_workload(
    agent_id: uuid.UUID,
    body: WorkloadCreate,
    session: SessionDep,
    state: State,
    p: CurrentPrincipal,
) -> WorkloadOut:
    """Bind a workload identity (issuer + exact subject) to the agent: its JWTs then act as
    the agent. 409 when the subject is already bound (to this or another agent)."""
    require_agent_change(p, agents.get_agent(session, agent_id))
    trusted = [e.issuer for e in state.settings.workload_oidc_issuers]
    binding = workloads.add_workload(session, agent_id, body, p.actor, trusted)
    return WorkloadOut.model_validate(binding)


@router.get("/{agent_id}/workloads", response_model=list[WorkloadOut])
def list_workloads(
    agent_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal
) -> list[WorkloadOut]:
    """The workload identities bound to the agent, oldest first."""
    require_read(p, agents.get_agent(session, agent_id))
    return [WorkloadOut.model_validate(w) for w in workloads.list_workloads(session, agent_id)]


@router.delete("/{agent_id}/workloads/{workload_id}", status_code=status.HTTP_204_NO_CONTENT)
def unbind_workload(
    agent_id: uuid.UUID,
    workload_id: uuid.UUID,
    session: SessionDep,
    p: CurrentPrincipal,
    reason: Reason = "",
) -> Response:
    """Unbind a workload identity: its next request is refused (401)."""
    require_agent_change(p, agents.get_agent(session, agent_id))
    workloads.remove_workload(session, agent_id, workload_id, p.actor, reason)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
