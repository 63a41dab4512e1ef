"""The NHI inventory, and decisions on requests that need an approver."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from api.deps import CurrentPrincipal, SessionDep, State, authenticated
from models.contracts import ApprovalDecision
from models.enums import NhiStatus, Role
from models.schemas import AuditOut, Body, NhiOut
from nhi import inventory
from nhi.auth import Principal, require, require_read, require_role
from nhi.inventory import Conflict
from workflows.provision import ProvisionNhiWorkflow

router = APIRouter(prefix="/v1/nhis", tags=["nhis"], dependencies=[authenticated])


class DecisionBody(Body):
    """Why the approver decided as they did."""

    reason: str = Field(min_length=1, max_length=2000)


@router.get("", response_model=list[NhiOut])
def list_nhis(
    session: SessionDep,
    p: CurrentPrincipal,
    agent_id: uuid.UUID | None = None,
    nhi_status: Annotated[NhiStatus | None, Query(alias="status")] = None,
    owner: Annotated[str | None, Query(description="Email of the agent's owner.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[NhiOut]:
    """The inventory, filtered by agent, status or owner."""
    nhis = inventory.list_nhis(
        session,
        agent_id=agent_id,
        status=nhi_status.value if nhi_status else None,
        owner=owner,
        limit=limit,
        offset=offset,
        visible_to=p,
    )
    return [NhiOut.model_validate(n) for n in nhis]


@router.get("/{nhi_id}", response_model=NhiOut)
def get_nhi(nhi_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal) -> NhiOut:
    """One NHI: status, scope, expiry and where its credential is delivered."""
    nhi = inventory.get_nhi(session, nhi_id)
    require_read(p, nhi.agent)
    return NhiOut.model_validate(nhi)


@router.get("/{nhi_id}/events", response_model=list[AuditOut])
def nhi_events(nhi_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal) -> list[AuditOut]:
    """The NHI's audit trail, oldest first."""
    require_read(p, inventory.get_nhi(session, nhi_id).agent)
    return [AuditOut.model_validate(e) for e in inventory.events_for(session, nhi_id)]


async def _decide(
    state: State, nhi_id: uuid.UUID, approve: bool, p: Principal, reason: str
) -> NhiOut:
    require_role(p, Role.APPROVER)
    nhi = await state.db(lambda s: inventory.get_nhi(s, nhi_id))
    require(nhi.requested_by != p.actor, f"{p.actor} requested this NHI and cannot decide on it")
    actor = p.actor
    if nhi.status != NhiStatus.PENDING_APPROVAL or not nhi.workflow_id:
        raise Conflict(f"status: nhi {nhi_id} is {nhi.status}, not pending_approval")
    client = await state.temporal()
    handle = client.get_workflow_handle_for(ProvisionNhiWorkflow.run, nhi.workflow_id)
    try:
        await handle.execute_update(
            ProvisionNhiWorkflow.decide,
            ApprovalDecision(approve=approve, approver=actor, reason=reason),
            # A retried HTTP call from the same approver is applied once.
            id=f"decide-{nhi_id}-{actor}",
        )
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        message = cause.message if isinstance(cause, ApplicationError) else str(cause)
        raise Conflict(f"decision refused: {message}") from None
    return NhiOut.model_validate(await state.db(lambda s: inventory.get_nhi(s, nhi_id)))


@router.post("/{nhi_id}/approve", response_model=NhiOut)
async def approve(
    nhi_id: uuid.UUID, body: DecisionBody, state: State, p: CurrentPrincipal
) -> NhiOut:
    """Approve a request for sensitive actions (approver role; never your own)."""
    return await _decide(state, nhi_id, True, p, body.reason)


@router.post("/{nhi_id}/deny", response_model=NhiOut)
async def deny(nhi_id: uuid.UUID, body: DecisionBody, state: State, p: CurrentPrincipal) -> NhiOut:
    """Deny a request for sensitive actions (approver role)."""
    return await _decide(state, nhi_id, False, p, body.reason)
