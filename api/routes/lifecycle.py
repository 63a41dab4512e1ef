"""Lifecycle actions on NHIs and agents, and the prompts people answer."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import Field
from sqlalchemy.orm import Session
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import (
    AppState,
    CurrentPrincipal,
    SessionDep,
    State,
    TemporalUnavailable,
    authenticated,
)
from models.contracts import (
    LifecycleAction,
    LifecycleView,
    PromptAnswer,
    PromptAnswerKind,
    RenewRequest,
)
from models.enums import Role
from models.orm import Agent, Nhi
from models.schemas import Body, PromptOut
from nhi import inventory
from nhi.auth import Principal, require, require_owner, require_read
from nhi.inventory import Conflict
from nhi.policy import RuleViolation, parse_ttl
from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id

router = APIRouter(tags=["lifecycle"], dependencies=[authenticated])

# Workflow refusals as HTTP: who may not (403), what may not now (409), what may never (422).
_STATUS_OF = {"NotOwner": 403, "InvalidState": 409, "AlreadyDecided": 409, "MaxLifetime": 422}


class ActionBody(Body):
    """Why (recorded in the audit trail)."""

    reason: str = Field(default="", max_length=2000)


class RenewBody(ActionBody):
    """Extend by `extend_by` (seconds or '30d'), or by the policy's default TTL."""

    extend_by: int | str | None = None


class AnswerBody(ActionBody):
    """An answer to a prompt."""

    answer: PromptAnswerKind


class CompleteBody(ActionBody):
    """The agent's task has ended."""


async def call_lifecycle(
    state: AppState,
    nhi_id: uuid.UUID,
    send: Callable[[Any], Awaitable[LifecycleView]],
    authorize: Callable[[Agent], None],
) -> LifecycleView | JSONResponse:
    """Authorize against the NHI's agent, send an update to its lifecycle, and turn the
    workflow's refusals into HTTP answers."""
    nhi, agent = await state.db(lambda s: _with_agent(s, nhi_id))
    authorize(agent)
    client = await state.temporal()
    handle = client.get_workflow_handle_for(NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi_id))
    try:
        return await send(handle)
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        kind = cause.type if isinstance(cause, ApplicationError) else None
        message = cause.message if isinstance(cause, ApplicationError) else str(cause)
        if kind == "NotReady":
            raise TemporalUnavailable(message) from None
        body: dict[str, Any] = {"detail": message}
        if kind == "MaxLifetime":
            body["field"] = "extend_by"
        return JSONResponse(status_code=_STATUS_OF.get(kind or "", 409), content=body)
    except RPCError as err:
        if err.status is RPCStatusCode.NOT_FOUND:
            raise Conflict(
                f"status: nhi {nhi_id} is {nhi.status} and has no running lifecycle"
            ) from None
        raise TemporalUnavailable(f"Temporal refused the request: {err.message}") from err


def _with_agent(session: Session, nhi_id: uuid.UUID) -> tuple[Nhi, Agent]:
    nhi = inventory.get_nhi(session, nhi_id)
    return nhi, nhi.agent


def _person(p: Principal, agent: Agent, *, containment: bool = False) -> LifecycleAction:
    """Who the workflow should see acting: the owner's email, or the security team."""
    if containment and p.has(Role.SECURITY) and not p.owns(agent):
        return LifecycleAction(actor=f"security:{p.name}", principal=p.actor)
    return LifecycleAction(actor=p.email or p.name, principal=p.actor)


@router.get("/v1/nhis/{nhi_id}/lifecycle", response_model=LifecycleView)
async def lifecycle_view(
    nhi_id: uuid.UUID, state: State, p: CurrentPrincipal
) -> LifecycleView | JSONResponse:
    """Phase, expiry, next rotation and reminders, as the lifecycle workflow sees them."""
    return await call_lifecycle(
        state, nhi_id, lambda h: h.query(NhiLifecycleWorkflow.view), lambda a: require_read(p, a)
    )


@router.post("/v1/nhis/{nhi_id}/renew", response_model=LifecycleView)
async def renew(
    nhi_id: uuid.UUID, body: RenewBody, state: State, p: CurrentPrincipal
) -> LifecycleView | JSONResponse:
    """Extend the expiry (owner or backup owner); never past the maximum lifetime."""
    try:
        extend = None if body.extend_by is None else parse_ttl(body.extend_by)
    except RuleViolation as err:
        raise RuleViolation("extend_by", err.message) from None
    sent: dict[str, RenewRequest] = {}

    def authorize(agent: Agent) -> None:
        require_owner(p, agent)
        who = _person(p, agent)
        sent["req"] = RenewRequest(
            actor=who.actor, principal=who.principal, reason=body.reason, extend_by_seconds=extend
        )

    return await call_lifecycle(
        state,
        nhi_id,
        lambda h: h.execute_update(NhiLifecycleWorkflow.renew, sent["req"]),
        authorize,
    )


async def _owner_update(
    state: AppState,
    nhi_id: uuid.UUID,
    p: Principal,
    body: ActionBody,
    update: Any,
    *,
    containment: bool = False,
) -> LifecycleView | JSONResponse:
    sent: dict[str, LifecycleAction] = {}

    def authorize(agent: Agent) -> None:
        require_owner(p, agent, security_may=containment)
        who = _person(p, agent, containment=containment)
        sent["req"] = who.model_copy(update={"reason": body.reason})

    return await call_lifecycle(
        state, nhi_id, lambda h: h.execute_update(update, sent["req"]), authorize
    )


@router.post("/v1/nhis/{nhi_id}/rotate", response_model=LifecycleView)
async def rotate(
    nhi_id: uuid.UUID, body: ActionBody, state: State, p: CurrentPrincipal
) -> LifecycleView | JSONResponse:
    """Rotate the credential now, without downtime (owner, or security)."""
    return await _owner_update(
        state, nhi_id, p, body, NhiLifecycleWorkflow.rotate, containment=True
    )


@router.post("/v1/nhis/{nhi_id}/decommission", response_model=LifecycleView)
async def decommission(
    nhi_id: uuid.UUID, body: ActionBody, state: State, p: CurrentPrincipal
) -> LifecycleView | JSONResponse:
    """Quarantine now; delete after the grace period (owner, or security for containment)."""
    return await _owner_update(
        state, nhi_id, p, body, NhiLifecycleWorkflow.decommission, containment=True
    )


@router.post("/v1/nhis/{nhi_id}/restore", response_model=LifecycleView)
async def restore(
    nhi_id: uuid.UUID, body: ActionBody, state: State, p: CurrentPrincipal
) -> LifecycleView | JSONResponse:
    """Undo a quarantine during the grace period (owner or backup owner)."""
    return await _owner_update(state, nhi_id, p, body, NhiLifecycleWorkflow.restore)


@router.get("/v1/prompts", response_model=list[PromptOut])
def list_prompts(
    session: SessionDep,
    p: CurrentPrincipal,
    status: Annotated[str, Query(pattern="^(open|decided|superseded|all)$")] = "open",
    nhi_id: uuid.UUID | None = None,
) -> list[PromptOut]:
    """Renewal prompts (open ones by default): what dev mode shows instead of Slack."""
    return [
        PromptOut.model_validate(p)
        for p in inventory.list_prompts(
            session, None if status == "all" else status, nhi_id, visible_to=p
        )
    ]


@router.post("/v1/prompts/{prompt_id}/answer", response_model=LifecycleView)
async def answer_prompt(
    prompt_id: uuid.UUID, body: AnswerBody, state: State, p: CurrentPrincipal
) -> LifecycleView | JSONResponse:
    """Answer a prompt as its owner or backup owner: renew, let_expire or decommission_now."""
    prompt = await state.db(lambda s: inventory.get_prompt(s, prompt_id))
    sent: dict[str, PromptAnswer] = {}

    def authorize(agent: Agent) -> None:
        require_owner(p, agent)
        who = _person(p, agent)
        sent["req"] = PromptAnswer(
            actor=who.actor,
            principal=who.principal,
            reason=body.reason,
            prompt_id=prompt_id,
            answer=body.answer,
        )

    return await call_lifecycle(
        state,
        prompt.nhi_id,
        lambda h: h.execute_update(
            NhiLifecycleWorkflow.answer, sent["req"], id=f"api-{prompt_id}-{p.actor}"
        ),
        authorize,
    )


@router.post("/v1/agents/{agent_id}/complete")
async def complete_agent(
    agent_id: uuid.UUID, body: CompleteBody, state: State, p: CurrentPrincipal
) -> dict[str, Any]:
    """The agent's task has ended: decommission every identity it holds (its platform team,
    its owner, or security)."""
    agent = await state.db(lambda s: inventory.get_agent(s, agent_id))
    require(
        p.acts_for(agent.team) or p.owns(agent) or p.has(Role.SECURITY),
        f"{p.actor} may not complete agent {agent.name}: not platform for {agent.team}, "
        "not its owner, not security",
    )
    actor = p.actor
    nhi_ids = await state.db(lambda s: inventory.complete_agent(s, agent_id, actor, body.reason))
    client = await state.temporal()
    req = LifecycleAction(
        actor="system:agent-completed",
        channel="system",
        reason=body.reason or f"agent task ended ({actor})",
    )
    started: list[str] = []
    for nhi_id in nhi_ids:
        handle = client.get_workflow_handle_for(
            NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi_id)
        )
        try:
            await handle.execute_update(
                NhiLifecycleWorkflow.decommission, req, id=f"complete-{nhi_id}"
            )
            started.append(str(nhi_id))
        except (WorkflowUpdateFailedError, RPCError):
            # Not active (already going, or still provisioning: its lifecycle sees the
            # completed agent when it starts and decommissions at once).
            continue
    return {"agent_id": str(agent_id), "status": "completed", "decommissioning": started}
