"""The NHI inventory, and decisions on requests that need an approver."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from temporalio.client import Client
from temporalio.common import TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from api.deps import (
    AppState,
    CurrentPrincipal,
    SessionDep,
    State,
    TemporalUnavailable,
    authenticated,
)
from api.idempotency import IdempotencyKeyHeader
from api.routes.approvals import decide_api
from api.routes.lifecycle import (
    TEMPORAL_CALL_BUDGET,
    send_update,
    temporal_client,
    temporal_deadline,
)
from models.contracts import ApprovalDecision, LifecycleInput, ProvisionInput
from models.enums import NhiKind, NhiStatus, Platform
from models.orm import Nhi
from models.schemas import (
    AuditOut,
    Body,
    Email,
    Limit,
    NhiAccepted,
    NhiOut,
    Offset,
    RequiredReason,
)
from nhi.rules import search_attributes as sa
from nhi.rules.ids import decide_update_id, lifecycle_workflow_id
from nhi.services import approvals, nhis
from nhi.services.auth import Principal, authorize_decision, require_visible_nhi
from nhi.services.errors import Conflict
from workflows.lifecycle import NhiLifecycleWorkflow

log = logging.getLogger(__name__)
# Connecting plus starting the provisioning workflow: a request answers within ~2 s either way.
PROVISION_START_BUDGET = 1.8
router = APIRouter(prefix="/v1/nhis", tags=["nhis"], dependencies=[authenticated])


class DecisionBody(Body):
    """Why the approver decided as they did."""

    reason: RequiredReason


@router.get("", response_model=list[NhiOut])
def list_nhis(
    session: SessionDep,
    p: CurrentPrincipal,
    agent_id: uuid.UUID | None = None,
    nhi_status: Annotated[NhiStatus | None, Query(alias="status")] = None,
    owner: Annotated[Email | None, Query(description="Email of the agent's owner.")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[NhiOut]:
    """The inventory, filtered by agent, status or owner."""
    rows = nhis.list_nhis(
        session,
        agent_id=agent_id,
        status=nhi_status.value if nhi_status else None,
        owner=owner,
        limit=limit,
        offset=offset,
        visible_to=p,
    )
    return [NhiOut.model_validate(n) for n in rows]


@router.get("/{nhi_id}", response_model=NhiOut)
def get_nhi(nhi_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal) -> NhiOut:
    """One NHI: status, scope, expiry and where its credential is delivered."""
    nhi = nhis.get_nhi(session, nhi_id)
    require_visible_nhi(p, nhi_id, nhi.agent)
    return NhiOut.model_validate(nhi)


@router.get("/{nhi_id}/events", response_model=list[AuditOut])
def nhi_events(nhi_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal) -> list[AuditOut]:
    """The NHI's audit trail, oldest first."""
    require_visible_nhi(p, nhi_id, nhis.get_nhi(session, nhi_id).agent)
    return [AuditOut.model_validate(e) for e in nhis.events_for(session, nhi_id)]


async def start_provisioning(
    state: AppState,
    record: Callable[[Session], tuple[Nhi, list[str]]],
    make_input: Callable[[uuid.UUID, bool], ProvisionInput],
) -> NhiAccepted:
    """Record the lease and start its provisioning workflow: both, or neither.

    The NHI row and its audit event are written in one transaction that commits only once
    Temporal has accepted the workflow start (bounded: a Temporal that is down or does not
    answer is a 503 within ~2 s, and nothing is written). If the commit fails after the start,
    the workflow finds no lease and ends without creating anything (and is terminated here).
    """
    began = time.monotonic()
    try:
        client = await temporal_client(state)
    except TemporalUnavailable as err:
        raise TemporalUnavailable(
            f"provisioning could not start ({err}); nothing was recorded or created"
        ) from None
    session = state.sessions()
    try:
        # `record` checks the request against policy and adds the row and its audit event.
        nhi, sensitive = await run_in_threadpool(record, session)
        # One run per NHI (issue 15): its lifecycle provisions it first, then keeps it.
        workflow_id = lifecycle_workflow_id(nhi.id)
        nhi.workflow_id = workflow_id
        await run_in_threadpool(session.flush)
        accepted = NhiAccepted(
            id=nhi.id,
            workflow_id=workflow_id,
            status=NhiStatus(nhi.status),
            expires_at=nhi.expires_at,
        )
        tags = await run_in_threadpool(_search_attributes, nhi)
        budget = max(PROVISION_START_BUDGET - (time.monotonic() - began), 0.5)
        try:
            async with temporal_deadline(budget, "starting provisioning"):
                await _start(
                    client,
                    make_input(nhi.id, bool(sensitive)),
                    workflow_id,
                    state.settings.temporal_task_queue,
                    timedelta(seconds=budget),
                    tags,
                )
        except Exception as err:
            log.warning("provisioning of nhi %s could not start: %s", nhi.id, err)
            raise TemporalUnavailable(
                f"provisioning could not start (Temporal at {state.settings.temporal_address}); "
                "nothing was recorded or created"
            ) from None
        try:
            await run_in_threadpool(session.commit)
        except SQLAlchemyError:
            log.exception("nhi %s: started but not recorded", nhi.id)
            with contextlib.suppress(Exception):
                async with temporal_deadline(TEMPORAL_CALL_BUDGET, "terminating"):
                    await client.get_workflow_handle(workflow_id).terminate(
                        reason="the lease could not be recorded"
                    )
            raise TemporalUnavailable(
                "the request could not be recorded; nothing was created"
            ) from None
        return accepted
    finally:
        await run_in_threadpool(session.close)


def _search_attributes(nhi: Nhi) -> TypedSearchAttributes:
    agent = nhi.agent
    return sa.nhi_attributes(
        nhi_id=nhi.id,
        agent_id=agent.id,
        owner=agent.owner_email,
        team=agent.team,
        platform=Platform(nhi.platform),
        kind=NhiKind(nhi.kind),
        status=NhiStatus(nhi.status),
        expires_at=nhi.expires_at,
    )


async def _start(
    client: Client,
    inp: ProvisionInput,
    workflow_id: str,
    task_queue: str,
    rpc_timeout: timedelta,
    tags: TypedSearchAttributes,
) -> None:
    """Start the NHI's one run (its lifecycle, provisioning it first) tagged with the NHI's
    search attributes; on a namespace that lacks them (`nhi temporal setup` not run)
    untagged, so provisioning never depends on them."""
    for attributes in (tags, None):
        try:
            await client.start_workflow(
                NhiLifecycleWorkflow.run,
                LifecycleInput(nhi_id=inp.nhi_id, provision=inp),
                id=workflow_id,
                task_queue=task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                rpc_timeout=rpc_timeout,
                search_attributes=attributes,
            )
            return
        except RPCError as err:
            if attributes is None or not (
                err.status is RPCStatusCode.INVALID_ARGUMENT and sa.unregistered(err.message)
            ):
                raise
            log.warning("starting %s untagged (run `nhi temporal setup`): %s", workflow_id, err)


async def _decide(
    state: AppState,
    nhi_id: uuid.UUID,
    approve: bool,
    p: Principal,
    reason: str,
    key: str | None,
) -> Any:
    # 404 unless visible, 403 unless an approver who is not the requesting person.
    nhi = await state.db(lambda s: authorize_decision(s, p, nhis.get_nhi(s, nhi_id)))
    actor = p.actor
    if nhi.status != NhiStatus.PENDING_APPROVAL or not nhi.workflow_id:
        raise Conflict(f"status: nhi {nhi_id} is {nhi.status}, not pending_approval")
    # A request recorded with its approvers (issue 16) is decided through its approval: only
    # a listed approver who is not the owner, and a bundle as a whole.
    approval = await state.db(lambda s: approvals.approval_of_nhi(s, nhi_id))
    if approval is not None:
        result = await decide_api(state, approval.id, approve, p, reason, key)
        if isinstance(result, JSONResponse):
            return result
        return NhiOut.model_validate(await state.db(lambda s: nhis.get_nhi(s, nhi_id)))
    client = await temporal_client(state)
    # The run the row names: the NHI's one run, or (requested before one-run provisioning) its
    # provisioning run; both take the decision as the same `decide` update.
    handle = client.get_workflow_handle(nhi.workflow_id)
    try:
        result = await send_update(
            state,
            handle,
            NhiLifecycleWorkflow.decide,
            lambda not_after: ApprovalDecision(
                approve=approve,
                approver=actor,
                reason=reason,
                not_after=not_after,
                # Four-eyes by person: the workflow refuses the requester under another token.
                approver_person=p.person,
            ),
            # A retried HTTP call from the same approver is applied once.
            update_id=decide_update_id(nhi_id, actor, key),
        )
    except RPCError:
        raise Conflict(f"status: nhi {nhi_id} has no running provisioning workflow") from None
    if isinstance(result, JSONResponse):
        return result
    return NhiOut.model_validate(await state.db(lambda s: nhis.get_nhi(s, nhi_id)))


@router.post("/{nhi_id}/approve", response_model=NhiOut)
async def approve(
    nhi_id: uuid.UUID,
    body: DecisionBody,
    state: State,
    p: CurrentPrincipal,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Approve a request for sensitive actions (approver role; never your own)."""
    return await _decide(state, nhi_id, True, p, body.reason, idempotency_key)


@router.post("/{nhi_id}/deny", response_model=NhiOut)
async def deny(
    nhi_id: uuid.UUID,
    body: DecisionBody,
    state: State,
    p: CurrentPrincipal,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Deny a request for sensitive actions (approver role)."""
    return await _decide(state, nhi_id, False, p, body.reason, idempotency_key)
