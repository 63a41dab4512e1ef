"""Lifecycle actions on NHIs and agents, and the prompts people answer."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import Field
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import Actor, AppState, Person, SessionDep, State, TemporalUnavailable
from models.contracts import (
    LifecycleAction,
    LifecycleView,
    PromptAnswer,
    PromptAnswerKind,
    RenewRequest,
)
from models.schemas import Body, PromptOut
from nhi import inventory
from nhi.inventory import Conflict
from nhi.policy import RuleViolation, parse_ttl
from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id

router = APIRouter(tags=["lifecycle"])

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
    state: AppState, nhi_id: uuid.UUID, send: Callable[[Any], Awaitable[LifecycleView]]
) -> LifecycleView | JSONResponse:
    """Send an update to an NHI's lifecycle and turn refusals into HTTP answers."""
    nhi = await state.db(lambda s: inventory.get_nhi(s, nhi_id))
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


@router.get("/v1/nhis/{nhi_id}/lifecycle", response_model=LifecycleView)
async def lifecycle_view(nhi_id: uuid.UUID, state: State) -> LifecycleView | JSONResponse:
    """Phase, expiry, next rotation and reminders, as the lifecycle workflow sees them."""
    return await call_lifecycle(state, nhi_id, lambda h: h.query(NhiLifecycleWorkflow.view))


@router.post("/v1/nhis/{nhi_id}/renew", response_model=LifecycleView)
async def renew(
    nhi_id: uuid.UUID, body: RenewBody, state: State, person: Person
) -> LifecycleView | JSONResponse:
    """Extend the expiry (owner or backup owner); never past the maximum lifetime."""
    try:
        extend = None if body.extend_by is None else parse_ttl(body.extend_by)
    except RuleViolation as err:
        raise RuleViolation("extend_by", err.message) from None
    req = RenewRequest(actor=person, channel="api", reason=body.reason, extend_by_seconds=extend)
    return await call_lifecycle(
        state, nhi_id, lambda h: h.execute_update(NhiLifecycleWorkflow.renew, req)
    )


def _action(person: str, body: ActionBody) -> LifecycleAction:
    return LifecycleAction(actor=person, channel="api", reason=body.reason)


@router.post("/v1/nhis/{nhi_id}/rotate", response_model=LifecycleView)
async def rotate(
    nhi_id: uuid.UUID, body: ActionBody, state: State, person: Person
) -> LifecycleView | JSONResponse:
    """Rotate the credential now, without downtime."""
    req = _action(person, body)
    return await call_lifecycle(
        state, nhi_id, lambda h: h.execute_update(NhiLifecycleWorkflow.rotate, req)
    )


@router.post("/v1/nhis/{nhi_id}/decommission", response_model=LifecycleView)
async def decommission(
    nhi_id: uuid.UUID, body: ActionBody, state: State, person: Person
) -> LifecycleView | JSONResponse:
    """Quarantine now; delete after the grace period."""
    req = _action(person, body)
    return await call_lifecycle(
        state, nhi_id, lambda h: h.execute_update(NhiLifecycleWorkflow.decommission, req)
    )


@router.post("/v1/nhis/{nhi_id}/restore", response_model=LifecycleView)
async def restore(
    nhi_id: uuid.UUID, body: ActionBody, state: State, person: Person
) -> LifecycleView | JSONResponse:
    """Undo a quarantine during the grace period."""
    req = _action(person, body)
    return await call_lifecycle(
        state, nhi_id, lambda h: h.execute_update(NhiLifecycleWorkflow.restore, req)
    )


@router.get("/v1/prompts", response_model=list[PromptOut])
def list_prompts(
    session: SessionDep,
    status: Annotated[str, Query(pattern="^(open|decided|superseded|all)$")] = "open",
    nhi_id: uuid.UUID | None = None,
) -> list[PromptOut]:
    """Renewal prompts (open ones by default): what dev mode shows instead of Slack."""
    return [
        PromptOut.model_validate(p)
        for p in inventory.list_prompts(session, None if status == "all" else status, nhi_id)
    ]


@router.post("/v1/prompts/{prompt_id}/answer", response_model=LifecycleView)
async def answer_prompt(
    prompt_id: uuid.UUID, body: AnswerBody, state: State, person: Person
) -> LifecycleView | JSONResponse:
    """Answer a prompt as its owner or backup owner: renew, let_expire or decommission_now."""
    prompt = await state.db(lambda s: inventory.get_prompt(s, prompt_id))
    req = PromptAnswer(
        actor=person, channel="api", reason=body.reason, prompt_id=prompt_id, answer=body.answer
    )
    return await call_lifecycle(
        state,
        prompt.nhi_id,
        lambda h: h.execute_update(
            NhiLifecycleWorkflow.answer, req, id=f"api-{prompt_id}-{person}"
        ),
    )


@router.post("/v1/agents/{agent_id}/complete")
async def complete_agent(
    agent_id: uuid.UUID, body: CompleteBody, state: State, actor: Actor
) -> dict[str, Any]:
    """The agent's task has ended: decommission every identity it holds."""
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
