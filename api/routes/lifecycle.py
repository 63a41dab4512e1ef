"""Lifecycle actions on NHIs and agents, and the prompts people answer.

Every action is a Temporal update with a deadline: it must be accepted by the NHI's lifecycle
within `NHI_API_UPDATE_TIMEOUT_SECONDS`, or the call answers 503 and the action is never
applied later (the update carries `not_after`, which the workflow's validator enforces). With
an `Idempotency-Key` the update id derives from the caller and key, so Temporal applies a
retried action once. Decommission never depends on the lifecycle's health: when no run is
running, or the run is stuck, it starts a fresh one from the inventory carrying the decommission.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
    WorkflowUpdateStage,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import FailureError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import (
    AppState,
    CurrentPrincipal,
    SessionDep,
    State,
    TemporalUnavailable,
    authenticated,
)
from api.errors import refusal
from api.idempotency import IdempotencyKeyHeader
from models.contracts import (
    LifecycleAction,
    LifecycleInput,
    LifecycleView,
    Phase,
    PromptAnswer,
    PromptAnswerKind,
    RenewRequest,
)
from models.enums import NhiStatus, Role
from models.orm import Agent, Nhi
from models.schemas import Body, Duration, PromptOut, Reason, duration_seconds
from nhi.rules.ids import (
    api_answer_update_id,
    completion_update_id,
    keyed_update_id,
    lifecycle_workflow_id,
)
from nhi.rules.policy import RuleViolation
from nhi.services import agents, incidents, nhis, prompts
from nhi.services.auth import Principal, require, require_owner, require_read, require_visible_nhi
from nhi.services.errors import Conflict, Forbidden, NotFound, PolicyViolation
from workflows.lifecycle import NhiLifecycleWorkflow

log = logging.getLogger(__name__)
router = APIRouter(tags=["lifecycle"], dependencies=[authenticated])
T = TypeVar("T")

# The 202 answer's detail: the lifecycle accepted the action and is still carrying it out.
STILL_RUNNING = "accepted; still being carried out"
# A Temporal start or describe that takes longer than this is treated as Temporal unreachable.
TEMPORAL_CALL_BUDGET = 1.5
# The API waits this much past `not_after` before giving up, so a lifecycle whose clock runs a
# little behind the API's cannot accept an action the caller was told failed.
CLOCK_MARGIN = 1.0
# After acceptance, how long the call waits for the action's result before answering 202.
RESULT_WAIT = 60.0
MAX_EXTEND_SECONDS = 366 * 86400
# Statuses whose identity may still exist on its platform: what containment acts on.
CONTAINABLE = frozenset(
    {
        NhiStatus.ACTIVE,
        NhiStatus.ROTATING,
        NhiStatus.EXPIRING,
        NhiStatus.QUARANTINED,
        NhiStatus.REVOKE_FAILED,
    }
)
# A workflow task that failed this often is stuck (a poisoned value, a bug): a lifecycle that
# cannot run its own code cannot carry out a decommission either.
STUCK_TASK_ATTEMPTS = 2


class ActionBody(Body):
    """Why (recorded in the audit trail)."""

    reason: Reason = ""


class RenewBody(ActionBody):
    """Extend by `extend_by` (seconds or '30d'), or by the policy's default TTL."""

    # At least 1 s and at most 366 days here; never past the maximum lifetime (the workflow).
    extend_by: Duration | None = None


class AnswerBody(ActionBody):
    """An answer to a prompt."""

    answer: PromptAnswerKind


class CompleteBody(ActionBody):
    """The agent's task has ended."""


class ContainmentView(LifecycleView):
    """A decommission's outcome, and how it reached the NHI: `update` (its running lifecycle
    accepted it), `fresh_lifecycle` (no run was running: a new one started from the inventory
    carrying the decommission) or `restarted_lifecycle` (the run was stuck: terminated, then
    a fresh one)."""

    path: Literal["update", "fresh_lifecycle", "restarted_lifecycle"] = "update"


# ---- Temporal with deadlines ---------------------------------------------------------------


@asynccontextmanager
async def temporal_deadline(seconds: float, what: str) -> AsyncIterator[None]:
    """Bound Temporal calls: past `seconds` (or on any RPC failure) the request is a 503."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise TemporalUnavailable(f"{what}: Temporal did not answer within {seconds:g}s") from None


async def temporal_client(state: AppState) -> Client:
    """The shared client, connected within the budget (a down Temporal is a quick 503)."""
    async with temporal_deadline(TEMPORAL_CALL_BUDGET, "connecting"):
        return await state.temporal()


async def send_update(
    state: AppState,
    handle: WorkflowHandle[Any, Any],
    update: Any,
    make_arg: Callable[[datetime], Any],
    *,
    update_id: str | None,
) -> Any:
    """Send one update that must be accepted before the API's deadline.

    Returns the update's result, or a 202 JSONResponse for an action still running after
    acceptance. Raises the workflow's refusal as a domain error (`api.errors.refusal`),
    TemporalUnavailable for a missed deadline (503: never applied later), and RPCError
    NOT_FOUND when no run is running.
    """
    timeout = state.settings.api_update_timeout_seconds
    not_after = datetime.now(UTC) + timedelta(seconds=timeout)
    arg = make_arg(not_after)
    try:
        async with asyncio.timeout(timeout + CLOCK_MARGIN):
            started = await handle.start_update(
                update,
                arg,
                id=update_id or str(uuid.uuid4()),
                wait_for_stage=WorkflowUpdateStage.ACCEPTED,
                rpc_timeout=timedelta(seconds=timeout + CLOCK_MARGIN),
            )
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        raise TemporalUnavailable(
            f"the lifecycle did not accept the action within {timeout:g}s (is a worker "
            "running?); it will not be applied later"
        ) from None
    except WorkflowUpdateFailedError as err:
        raise refusal(err) from None
    except RPCError as err:
        if err.status is RPCStatusCode.NOT_FOUND:
            raise
        raise TemporalUnavailable(f"Temporal refused the request: {err.message}") from None
    try:
        return await asyncio.wait_for(started.result(), RESULT_WAIT)
    except WorkflowUpdateFailedError as err:
        raise refusal(err) from None
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        return JSONResponse(
            status_code=202,
            content={"detail": STILL_RUNNING, "update_id": started.id},
        )
    except RPCError as err:
        raise TemporalUnavailable(f"Temporal refused the request: {err.message}") from None


LIFECYCLE_START_WAIT = 5.0  # seconds an action waits for a just-activated NHI's lifecycle
# How recently activated an NHI must be for that wait: one active for longer whose lifecycle
# is not running (a sweep restarts it) is answered at once, not after the wait.
JUST_ACTIVATED = timedelta(minutes=1)


def _just_activated(nhi: Nhi) -> bool:
    # `activated_at` is the provisioning workflow's clock: ahead of this one on a
    # time-skipping test server, where "in the future" counts as just activated.
    return (
        nhi.status == "active"
        and nhi.activated_at is not None
        and datetime.now(UTC) - nhi.activated_at < JUST_ACTIVATED
    )


async def call_lifecycle(
    state: AppState,
    nhi_id: uuid.UUID,
    send: Callable[[WorkflowHandle[Any, Any]], Awaitable[Any]],
    authorize: Callable[[Agent], None],
    addressed: str | None = None,
) -> Any:
    """Authorize against the NHI's agent, then talk to its lifecycle. What the caller may not
    see answers like a missing `addressed` object (default: the NHI), so ids cannot be probed."""
    nhi, agent = await state.db(lambda s: _with_agent(s, nhi_id))
    try:
        authorize(agent)
    except NotFound:
        raise NotFound(f"{addressed or f'nhi {nhi_id}'} not found") from None
    client = await temporal_client(state)
    handle = client.get_workflow_handle_for(NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi_id))
    # Provisioning records `active` just before the lifecycle loads (in the same run, or in the
    # run it starts for NHIs provisioned before one-run provisioning): a caller who acts on an
    # NHI the moment it turns active waits for its lifecycle briefly instead of a 409.
    deadline = asyncio.get_running_loop().time() + LIFECYCLE_START_WAIT
    while True:
        try:
            return await send(handle)
        except RPCError as err:
            if err.status is not RPCStatusCode.NOT_FOUND:
                raise TemporalUnavailable(f"Temporal refused the request: {err.message}") from err
            if not _just_activated(nhi) or asyncio.get_running_loop().time() >= deadline:
                raise Conflict(
                    f"status: nhi {nhi_id} is {nhi.status} and has no running lifecycle"
                ) from None
        except WorkflowQueryFailedError as err:
            # The run is still provisioning the NHI, or loading it right after.
            if not _just_activated(nhi) or asyncio.get_running_loop().time() >= deadline:
                raise Conflict(f"status: nhi {nhi_id} is {nhi.status}: {err.message}") from None
        except WorkflowUpdateFailedError as err:
            raise refusal(err) from None
        await asyncio.sleep(0.2)


def _with_agent(session: Session, nhi_id: uuid.UUID) -> tuple[Nhi, Agent]:
    nhi = nhis.get_nhi(session, nhi_id)
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

    async def query(handle: WorkflowHandle[Any, Any]) -> LifecycleView:
        async with temporal_deadline(state.settings.api_update_timeout_seconds, "query"):
            view: LifecycleView = await handle.query(NhiLifecycleWorkflow.view)
            return view

    result: LifecycleView | JSONResponse = await call_lifecycle(
        state, nhi_id, query, lambda a: require_read(p, a)
    )
    return result


def _extend_seconds(value: int | str | None) -> int | None:
    if value is None:
        return None
    seconds = duration_seconds(value)
    if not 0 < seconds <= MAX_EXTEND_SECONDS:  # the type checks it; kept as the last word
        raise RuleViolation("extend_by", "must be between 1 second and 366 days")
    return seconds


@router.post("/v1/nhis/{nhi_id}/renew", response_model=LifecycleView)
async def renew(
    nhi_id: uuid.UUID,
    body: RenewBody,
    state: State,
    p: CurrentPrincipal,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Extend the expiry (owner or backup owner); never past the maximum lifetime."""
    extend = _extend_seconds(body.extend_by)
    return await _owner_update(
        state,
        nhi_id,
        p,
        NhiLifecycleWorkflow.renew,
        lambda who, not_after: RenewRequest(
            actor=who.actor,
            principal=who.principal,
            reason=body.reason,
            extend_by_seconds=extend,
            not_after=not_after,
        ),
        keyed_update_id("renew", p.actor, idempotency_key),
    )


async def _owner_update(
    state: AppState,
    nhi_id: uuid.UUID,
    p: Principal,
    update: Any,
    build: Callable[[LifecycleAction, datetime], Any],
    update_id: str | None,
    *,
    containment: bool = False,
    addressed: str | None = None,
) -> Any:
    """An owner's action on the NHI's lifecycle: owner rights (or security, for containment)
    checked against its agent, then the update `build` makes from who acts and the deadline."""
    sent: dict[str, LifecycleAction] = {}

    def authorize(agent: Agent) -> None:
        require_owner(p, agent, security_may=containment)
        sent["who"] = _person(p, agent, containment=containment)

    return await call_lifecycle(
        state,
        nhi_id,
        lambda h: send_update(
            state, h, update, lambda not_after: build(sent["who"], not_after), update_id=update_id
        ),
        authorize,
        addressed,
    )


def _with_reason(body: ActionBody) -> Callable[[LifecycleAction, datetime], LifecycleAction]:
    return lambda who, not_after: who.model_copy(
        update={"reason": body.reason, "not_after": not_after}
    )


@router.post("/v1/nhis/{nhi_id}/rotate", response_model=LifecycleView)
async def rotate(
    nhi_id: uuid.UUID,
    body: ActionBody,
    state: State,
    p: CurrentPrincipal,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Rotate the credential now, without downtime (owner, or security)."""
    return await _owner_update(
        state,
        nhi_id,
        p,
        NhiLifecycleWorkflow.rotate,
        _with_reason(body),
        keyed_update_id("rotate", p.actor, idempotency_key),
        containment=True,
    )


@router.post("/v1/nhis/{nhi_id}/decommission", response_model=ContainmentView)
async def decommission(
    nhi_id: uuid.UUID,
    body: ActionBody,
    state: State,
    p: CurrentPrincipal,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Quarantine now; delete after the grace period (owner, or security for containment).

    Works whatever the state of the NHI's lifecycle run: a running run gets an update; when
    none runs (failed, terminated, gone) or the run is stuck, a fresh run starts from the
    inventory with the decommission in its input. `path` says which, and it is audited."""
    nhi, agent = await state.db(lambda s: _with_agent(s, nhi_id))
    require_visible_nhi(p, nhi_id, agent)  # 404, as for a missing NHI
    require_owner(p, agent, security_may=True)
    who = _person(p, agent, containment=True).model_copy(update={"reason": body.reason})
    if NhiStatus(nhi.status) not in CONTAINABLE:
        raise Conflict(
            f"status: nhi {nhi_id} is {nhi.status}: nothing on its platform to decommission"
            + (
                " yet (deny the request, or decommission once it is active)"
                if nhi.status in (NhiStatus.REQUESTED, NhiStatus.PENDING_APPROVAL)
                or nhi.status == NhiStatus.PROVISIONING
                else ""
            )
        )
    client = await temporal_client(state)
    workflow_id = lifecycle_workflow_id(nhi_id)
    handle = client.get_workflow_handle_for(NhiLifecycleWorkflow.run, workflow_id)
    path: Literal["update", "fresh_lifecycle", "restarted_lifecycle"] = "update"
    described = await _describe(handle)
    result: Any = None
    if described is not None and described.status is WorkflowExecutionStatus.RUNNING:
        if _stuck(described):
            try:
                async with temporal_deadline(TEMPORAL_CALL_BUDGET, "terminating the stuck run"):
                    await handle.terminate(
                        reason=f"stuck (workflow task failing); restarted to decommission by "
                        f"{p.actor}"
                    )
            except RPCError as err:
                if err.status is not RPCStatusCode.NOT_FOUND:  # NOT_FOUND: it ended meanwhile
                    raise TemporalUnavailable(
                        f"Temporal refused the request: {err.message}"
                    ) from err
            path = "restarted_lifecycle"
        else:
            try:
                result = await send_update(
                    state,
                    handle,
                    NhiLifecycleWorkflow.decommission,
                    lambda not_after: who.model_copy(update={"not_after": not_after}),
                    update_id=keyed_update_id("decommission", p.actor, idempotency_key),
                )
            except RPCError as err:
                if err.status is not RPCStatusCode.NOT_FOUND:
                    raise TemporalUnavailable(
                        f"Temporal refused the request: {err.message}"
                    ) from err
                path = "fresh_lifecycle"  # the run ended between the describe and the update
    else:
        path = "fresh_lifecycle"
    if path != "update":
        result = await _fresh_lifecycle(state, client, nhi, who, path)
    if isinstance(result, JSONResponse):
        return result
    actor, reason = p.actor, body.reason
    await state.db(
        lambda s: nhis.record_containment(s, nhi_id, actor, reason or "decommission", path)
    )
    view = result if isinstance(result, LifecycleView) else _inventory_view(nhi, path)
    return ContainmentView(**view.model_dump(), path=path)


async def _describe(handle: WorkflowHandle[Any, Any]) -> WorkflowExecutionDescription | None:
    try:
        async with temporal_deadline(TEMPORAL_CALL_BUDGET, "describing the lifecycle"):
            return await handle.describe()
    except RPCError as err:
        if err.status is RPCStatusCode.NOT_FOUND:
            return None
        raise TemporalUnavailable(f"Temporal refused the request: {err.message}") from err


def _stuck(described: WorkflowExecutionDescription) -> bool:
    raw = described.raw_description
    return (
        raw.HasField("pending_workflow_task")
        and raw.pending_workflow_task.attempt >= STUCK_TASK_ATTEMPTS
    )


async def _fresh_lifecycle(
    state: AppState, client: Client, nhi: Nhi, who: LifecycleAction, path: str
) -> Any:
    """Start a new lifecycle run from the inventory that decommissions at once."""
    try:
        async with temporal_deadline(TEMPORAL_CALL_BUDGET, "starting a fresh lifecycle"):
            await client.start_workflow(
                NhiLifecycleWorkflow.run,
                LifecycleInput(nhi_id=nhi.id, pending_decommission=who),
                id=lifecycle_workflow_id(nhi.id),
                task_queue=state.settings.temporal_task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            )
    except WorkflowAlreadyStartedError:
        # Someone (a sweep) started one a moment ago: it takes the update like any run.
        handle = client.get_workflow_handle_for(
            NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi.id)
        )
        return await send_update(
            state,
            handle,
            NhiLifecycleWorkflow.decommission,
            lambda not_after: who.model_copy(update={"not_after": not_after}),
            update_id=None,
        )
    except (RPCError, FailureError) as err:
        raise TemporalUnavailable(f"the lifecycle could not be started ({path}): {err}") from err
    return None


def _inventory_view(nhi: Nhi, path: str) -> LifecycleView:
    phase = {
        NhiStatus.QUARANTINED: Phase.QUARANTINED,
        NhiStatus.REVOKE_FAILED: Phase.REVOKE_FAILED,
    }.get(NhiStatus(nhi.status), Phase.ACTIVE)
    return LifecycleView(
        nhi_id=nhi.id,
        phase=phase,
        expires_at=nhi.expires_at,
        max_lifetime_at=nhi.max_lifetime_at,
        message=f"decommission started in a new lifecycle run ({path.replace('_', ' ')})",
    )


@router.post("/v1/nhis/{nhi_id}/restore", response_model=LifecycleView)
async def restore(
    nhi_id: uuid.UUID,
    body: ActionBody,
    state: State,
    p: CurrentPrincipal,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Undo a quarantine during the grace period (owner or backup owner); not while the
    agent is contained (409: a release by a second person lifts that)."""
    await state.db(lambda s: incidents.refuse_restore_while_contained(s, p, nhi_id))
    return await _owner_update(
        state,
        nhi_id,
        p,
        NhiLifecycleWorkflow.restore,
        _with_reason(body),
        keyed_update_id("restore", p.actor, idempotency_key),
    )


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
        for p in prompts.list_prompts(
            session, None if status == "all" else status, nhi_id, visible_to=p
        )
    ]


@router.post("/v1/prompts/{prompt_id}/answer", response_model=LifecycleView)
async def answer_prompt(
    prompt_id: uuid.UUID,
    body: AnswerBody,
    state: State,
    p: CurrentPrincipal,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Answer a prompt as its owner or backup owner: renew, let_expire or decommission_now."""
    prompt = await state.db(lambda s: prompts.get_prompt(s, prompt_id))
    return await _owner_update(
        state,
        prompt.nhi_id,
        p,
        NhiLifecycleWorkflow.answer,
        lambda who, not_after: PromptAnswer(
            actor=who.actor,
            principal=who.principal,
            reason=body.reason,
            prompt_id=prompt_id,
            answer=body.answer,
            not_after=not_after,
        ),
        # Without a key, one answer per person and prompt (a retried click is applied once).
        api_answer_update_id(prompt_id, p.actor, idempotency_key),
        addressed=f"prompt {prompt_id}",
    )


@router.post("/v1/agents/{agent_id}/complete")
async def complete_agent(
    agent_id: uuid.UUID,
    body: CompleteBody,
    state: State,
    p: CurrentPrincipal,
) -> dict[str, Any]:
    """The agent's task has ended: decommission every identity it holds (its platform team,
    its owner, or security)."""
    agent = await state.db(lambda s: agents.get_agent(s, agent_id))
    require_read(p, agent)  # 404 for an agent the caller may not see
    require(
        p.acts_for(agent.team) or p.owns(agent) or p.has(Role.SECURITY),
        f"{p.actor} may not complete agent {agent.name}: not platform for {agent.team}, "
        "not its owner, not security",
    )
    actor = p.actor
    nhi_ids = await state.db(lambda s: agents.complete_agent(s, agent_id, actor, body.reason))
    req = LifecycleAction(
        actor="system:agent-completed",
        channel="system",
        reason=body.reason or f"agent task ended ({actor})",
    )
    if not nhi_ids:
        return {"agent_id": str(agent_id), "status": "completed", "decommissioning": []}
    client = await temporal_client(state)

    async def one(nhi_id: uuid.UUID) -> str | None:
        handle = client.get_workflow_handle_for(
            NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi_id)
        )
        try:
            result = await send_update(
                state,
                handle,
                NhiLifecycleWorkflow.decommission,
                lambda not_after: req.model_copy(update={"not_after": not_after}),
                update_id=completion_update_id(nhi_id),
            )
        except (RPCError, TemporalUnavailable, Conflict, Forbidden, PolicyViolation):
            # No run, refused, or not reachable in time: the sweep's "agent gone" rule (and a
            # lifecycle that starts later, which sees the completed agent) decommissions it.
            return None
        return None if isinstance(result, JSONResponse) else str(nhi_id)

    started = [n for n in await asyncio.gather(*(one(i) for i in nhi_ids)) if n is not None]
    return {"agent_id": str(agent_id), "status": "completed", "decommissioning": started}
