"""Agents and the NHIs requested for them."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status
from temporalio.common import WorkflowIDReusePolicy

from api.deps import CurrentPrincipal, SessionDep, State, TemporalUnavailable, authenticated
from models.contracts import ProvisionInput
from models.enums import AgentStatus, Environment, NhiStatus
from models.schemas import AgentCreate, AgentDetail, AgentOut, NhiAccepted, NhiCreate
from nhi import inventory
from nhi.auth import require_read, require_team
from nhi.temporal import provision_workflow_id
from workflows.provision import ProvisionNhiWorkflow

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/agents", tags=["agents"], dependencies=[authenticated])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=AgentOut)
def create_agent(body: AgentCreate, session: SessionDep, p: CurrentPrincipal) -> AgentOut:
    """Register an AI agent with its owner, backup owner, team and purpose (platform role)."""
    require_team(p, body.team)
    agent = inventory.create_agent(session, body, p.actor)
    return AgentOut.model_validate(agent)


@router.get("", response_model=list[AgentOut])
def list_agents(
    session: SessionDep,
    p: CurrentPrincipal,
    environment: Environment | None = None,
    owner: str | None = None,
    team: str | None = None,
    agent_status: Annotated[AgentStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[AgentOut]:
    """Agents, filtered by environment, owner email, team or status."""
    agents = inventory.list_agents(
        session,
        environment=environment.value if environment else None,
        owner=owner,
        team=team,
        status=agent_status.value if agent_status else None,
        limit=limit,
        offset=offset,
        visible_to=p,
    )
    return [AgentOut.model_validate(a) for a in agents]


@router.get("/{agent_id}", response_model=AgentDetail)
def get_agent(agent_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal) -> AgentDetail:
    """One agent with every NHI it holds: its total access footprint."""
    agent = inventory.get_agent(session, agent_id, with_nhis=True)
    require_read(p, agent)
    return AgentDetail.model_validate(agent)


@router.post("/{agent_id}/nhis", status_code=status.HTTP_202_ACCEPTED, response_model=NhiAccepted)
async def request_nhi(
    agent_id: uuid.UUID, body: NhiCreate, state: State, p: CurrentPrincipal
) -> NhiAccepted:
    """Request an identity for the agent; provisioning runs as a Temporal workflow.

    The lease (the NHI row) is committed before anything exists on the platform, so nothing
    can be created that the inventory does not know how to remove.
    """
    actor = p.actor
    agent = await state.db(lambda s: inventory.get_agent(s, agent_id))
    require_team(p, agent.team)
    client = await state.temporal()
    nhi, sensitive = await state.db(
        lambda s: inventory.request_nhi(s, state.settings, agent_id, body, actor)
    )
    workflow_id = provision_workflow_id(nhi.id)
    try:
        await client.start_workflow(
            ProvisionNhiWorkflow.run,
            ProvisionInput(nhi_id=nhi.id, requested_by=actor, needs_approval=bool(sensitive)),
            id=workflow_id,
            task_queue=state.settings.temporal_task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        )
    except Exception as err:
        log.exception("could not start provisioning of nhi %s", nhi.id)
        await state.db(
            lambda s: inventory.fail_start(
                s, nhi.id, actor, "the provisioning workflow could not start"
            )
        )
        raise TemporalUnavailable(
            f"provisioning could not start (Temporal at {state.settings.temporal_address}); "
            "nothing was created"
        ) from err
    await state.db(lambda s: inventory.attach_workflow(s, nhi.id, workflow_id))
    return NhiAccepted(
        id=nhi.id, workflow_id=workflow_id, status=NhiStatus(nhi.status), expires_at=nhi.expires_at
    )
