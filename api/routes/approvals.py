"""Approvals (issue 16): the requests waiting for approvers, deciding them through the API or
a Slack click, and starting bundles (several NHIs approved and provisioned together)."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from slack_sdk.errors import SlackApiError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from temporalio.common import WorkflowIDReusePolicy
from temporalio.service import RPCError

from api.deps import (
    AppState,
    CurrentPrincipal,
    SessionDep,
    State,
    TemporalUnavailable,
    authenticated,
)
from api.errors import LifecycleNotReady
from api.idempotency import IdempotencyKeyHeader
from api.routes.lifecycle import (
    STILL_RUNNING,
    TEMPORAL_CALL_BUDGET,
    send_update,
    temporal_client,
    temporal_deadline,
)
from models.contracts import ApprovalDecision, ApprovalOutcome, BundleInput
from models.enums import NhiStatus, Role
from models.orm import Approval
from models.schemas import ApprovalOut, Body, BundleAccepted, NhiAccepted, NhiBatch, RequiredReason
from nhi.infra.db import transaction
from nhi.rules.ids import (
    bundle_workflow_id,
    decide_update_id,
    provision_workflow_id,
    slack_approval_update_id,
)
from nhi.services import approvals
from nhi.services.auth import Principal, person_key
from nhi.services.errors import Conflict, Forbidden, NotFound, PolicyViolation
from workflows.bundle import BundleWorkflow
from workflows.lifecycle import NhiLifecycleWorkflow

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/approvals", tags=["approvals"], dependencies=[authenticated])
# As a single request: a bundle is recorded and started within ~2 s, or not at all.
BUNDLE_START_BUDGET = 1.8
# Read every approval (approvers see the ones they may decide).
_READERS = (Role.SECURITY, Role.ADMIN, Role.AUDITOR)


class DecisionBody(Body):
    """Why the approver decided as they did."""

    reason: RequiredReason


def approval_out(session: Session, row: Approval) -> ApprovalOut:
    out = ApprovalOut.model_validate(row)
    return out.model_copy(update={"status": approvals.shown_status(session, row)})


@router.get("", response_model=list[ApprovalOut])
def list_approvals(
    session: SessionDep, state: State, p: CurrentPrincipal, all: bool = False
) -> list[ApprovalOut]:
    """Pending requests the caller may decide (security and admin: every pending one; with
    `all=true`, decided and expired ones too)."""
    rows = approvals.list_for(session, p, state.slack, everything=all)
    return [approval_out(session, r) for r in rows]


@router.get("/{approval_id}", response_model=ApprovalOut)
def get_approval(
    approval_id: uuid.UUID, session: SessionDep, state: State, p: CurrentPrincipal
) -> ApprovalOut:
    """One approval: who may decide, what they were shown, the decisions so far."""
    row = approvals.get_approval(session, approval_id)
    if not p.has(*_READERS) and row not in approvals.list_for(session, p, state.slack):
        raise NotFound(f"approval {approval_id} not found")
    return approval_out(session, row)


@router.post("/{approval_id}/approve", response_model=ApprovalOut)
async def approve(
    approval_id: uuid.UUID,
    body: DecisionBody,
    state: State,
    p: CurrentPrincipal,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Approve (a listed approver who is neither the requester nor the agent's owner)."""
    return await decide_api(state, approval_id, True, p, body.reason, idempotency_key)


@router.post("/{approval_id}/deny", response_model=ApprovalOut)
async def deny(
    approval_id: uuid.UUID,
    body: DecisionBody,
    state: State,
    p: CurrentPrincipal,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    """Deny, with the reason (the same people as approve)."""
    return await decide_api(state, approval_id, False, p, body.reason, idempotency_key)


async def _send(state: AppState, row: Approval, decision: Any, update_id: str) -> Any:
    """The decision to the run that waits for it (provisioning, or the bundle)."""
    client = await temporal_client(state)
    # A single NHI's decision goes to its one run (or, requested before one-run provisioning,
    # its provisioning run): both name the update `decide`, as the bundle does.
    update: Any = BundleWorkflow.decide if row.bundle else NhiLifecycleWorkflow.decide
    handle = client.get_workflow_handle(row.workflow_id)
    try:
        return await send_update(state, handle, update, decision, update_id=update_id)
    except RPCError:
        raise Conflict(f"status: approval {row.id} has no running workflow") from None


async def decide_api(
    state: AppState,
    approval_id: uuid.UUID,
    approve: bool,
    p: Principal,
    reason: str,
    key: str | None,
) -> Any:
    """Check the caller, hand the decision to the workflow, record what it accepted."""

    def check(s: Session) -> Approval:
        row = approvals.get_approval(s, approval_id)
        approvals.check_api_decider(s, p, row, state.slack)
        approvals.require_pending(s, row)
        return row

    row = await state.db(check)
    made: list[ApprovalDecision] = []

    def decision(not_after: Any) -> ApprovalDecision:
        d = ApprovalDecision(
            approve=approve,
            approver=p.actor,
            reason=reason,
            not_after=not_after,
            approver_person=p.person,
        )
        made.append(d)
        return d

    result = await _send(state, row, decision, decide_update_id(approval_id, p.actor, key))
    if isinstance(result, JSONResponse):
        return result
    outcome = ApprovalOutcome.model_validate(result)
    return await state.db(
        lambda s: approval_out(
            s, approvals.record_decision(s, approval_id, made[-1], outcome.complete, "api")
        )
    )


# ---- Slack ------------------------------------------------------------------------------------


def _email_of(state: AppState, user_id: str) -> str | None:
    if state.slack is None:
        return None
    try:
        profile = state.slack.users_info(user=user_id)["user"].get("profile", {})
    except SlackApiError:
        return None
    email = profile.get("email")
    return str(email).lower() if email else None


def _slack_check(state: AppState, approval_id: uuid.UUID, user_id: str) -> tuple[Approval, str]:
    """The approval and the clicker's email; Forbidden (with the reason) unless they may
    decide, NotFound for an unknown approval."""
    email = _email_of(state, user_id)
    with transaction(state.sessions) as session:
        row = approvals.get_approval(session, approval_id)
        if email is None:
            raise Forbidden("your Slack account has no email this service can match")
        approvals.check_decider(
            session,
            row,
            email=email,
            person=person_key(email, ""),
            actor=email,
            user_id=user_id,
            slack=state.slack,
            role_approver=False,
        )
        approvals.require_pending(session, row)
        return row, email


def tell(state: AppState, channel: str, user_id: str, text: str) -> None:
    """An ephemeral message to the clicker (never fails the click)."""
    if state.slack is None or not channel:
        return
    try:
        state.slack.chat_postEphemeral(channel=channel, user=user_id, text=text)
    except SlackApiError as err:
        log.warning("could not tell %s: %s", user_id, err.response.get("error"))


def may_decide_in_slack(state: AppState, approval_id: uuid.UUID, user_id: str) -> str | None:
    """None when the clicker may decide; otherwise why not (for the Deny modal, opened only
    for someone who may deny)."""
    try:
        _slack_check(state, approval_id, user_id)
    except (Forbidden, NotFound, Conflict) as err:
        return str(err)
    return None


async def decide_slack(
    state: AppState,
    approval_id: uuid.UUID,
    approve: bool,
    user_id: str,
    click: str,
    channel: str,
    reason: str,
) -> None:
    """A click (Approve) or a submitted Deny modal: checked, sent, recorded; the clicker is
    told in an ephemeral message when it was not applied."""
    try:
        row, email = await run_in_threadpool(_slack_check, state, approval_id, user_id)
    except NotFound:
        await run_in_threadpool(tell, state, channel, user_id, "This request is no longer known.")
        return
    except Forbidden as err:
        await run_in_threadpool(tell, state, channel, user_id, f"Not applied: {err}.")
        return
    except Conflict as err:
        await run_in_threadpool(tell, state, channel, user_id, f"Not applied: {err}")
        return
    decision = ApprovalDecision(
        approve=approve, approver=email, reason=reason, approver_person=person_key(email, "")
    )
    try:
        result = await _send(
            state,
            row,
            lambda not_after: decision.model_copy(update={"not_after": not_after}),
            slack_approval_update_id(approval_id, user_id, click),
        )
    except (Forbidden, Conflict, PolicyViolation, LifecycleNotReady) as err:
        await run_in_threadpool(tell, state, channel, user_id, f"Not applied: {err}")
        return
    except (RPCError, TemporalUnavailable) as err:
        log.error("decision on approval %s not delivered: %s", approval_id, err)
        await run_in_threadpool(tell, state, channel, user_id, "Not applied: try again shortly.")
        return
    if isinstance(result, JSONResponse):
        await run_in_threadpool(tell, state, channel, user_id, f"Not applied: {STILL_RUNNING}")
        return
    outcome = ApprovalOutcome.model_validate(result)
    await state.db(
        lambda s: approvals.record_decision(s, approval_id, decision, outcome.complete, "slack")
    )


# ---- bundles ----------------------------------------------------------------------------------


async def start_bundle(
    state: AppState, agent_id: uuid.UUID, body: NhiBatch, p: Principal, own: str | None
) -> BundleAccepted:
    """Record every NHI of a bundle (and its approval) and start its workflow: all of it, or
    nothing (as `api.routes.nhis.start_provisioning` for one NHI)."""
    try:
        client = await temporal_client(state)
    except TemporalUnavailable as err:
        raise TemporalUnavailable(
            f"the bundle could not start ({err}); nothing was recorded or created"
        ) from None
    bundle_id = uuid.uuid4()
    workflow_id = bundle_workflow_id(bundle_id)
    session = state.sessions()
    try:
        rows, gate = await run_in_threadpool(
            approvals.request_bundle,
            session,
            state.settings,
            agent_id,
            body.nhis,
            p,
            own,
            workflow_id,
        )
        for nhi in rows:
            # Each NHI is provisioned by its own run of the usual id, a child of the bundle.
            nhi.workflow_id = provision_workflow_id(nhi.id)
        await run_in_threadpool(session.flush)
        accepted = BundleAccepted(
            bundle_id=bundle_id,
            workflow_id=workflow_id,
            nhis=[
                NhiAccepted(
                    id=n.id,
                    workflow_id=provision_workflow_id(n.id),
                    status=NhiStatus(n.status),
                    expires_at=n.expires_at,
                )
                for n in rows
            ],
            approval=gate.needed,
        )
        inp = BundleInput(
            bundle_id=bundle_id,
            nhi_ids=[n.id for n in rows],
            requested_by=p.actor,
            requested_by_person=p.person,
            needs_approval=gate.needs_approval,
            approval_timeout_seconds=gate.window_seconds,
            approvals_required=gate.required,
            owner_persons=gate.owner_persons,
            approval=gate.message,
        )
        try:
            async with temporal_deadline(BUNDLE_START_BUDGET, "starting the bundle"):
                await client.start_workflow(
                    BundleWorkflow.run,
                    inp,
                    id=workflow_id,
                    task_queue=state.settings.temporal_task_queue,
                    id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                    rpc_timeout=timedelta(seconds=BUNDLE_START_BUDGET),
                )
        except Exception as err:
            log.warning("bundle %s could not start: %s", bundle_id, err)
            raise TemporalUnavailable(
                "the bundle could not start; nothing was recorded or created"
            ) from None
        try:
            await run_in_threadpool(session.commit)
        except SQLAlchemyError:
            log.exception("bundle %s: started but not recorded", bundle_id)
            try:
                async with temporal_deadline(TEMPORAL_CALL_BUDGET, "terminating"):
                    await client.get_workflow_handle(workflow_id).terminate(
                        reason="the bundle could not be recorded"
                    )
            except Exception:
                log.warning("bundle %s not terminated", bundle_id)
            raise TemporalUnavailable(
                "the bundle could not be recorded; nothing was created"
            ) from None
        return accepted
    finally:
        await run_in_threadpool(session.close)
