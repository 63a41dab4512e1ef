"""The provisioning of one NHI, as steps any workflow can run: the approval gate, creating
the identity, delivering its credential, recording it active, and the compensation that
removes what was created when a step fails or the run is cancelled.

Two workflows run these steps. `ProvisionNhiWorkflow` (workflows/provision.py) runs them in a
run of its own and starts the lifecycle as a child (every NHI requested before one-run
provisioning, and each NHI of a bundle). `NhiLifecycleWorkflow` runs them as the first phase of
the NHI's one run (issue 15): no second run, no child start, no second first workflow task.

Imported passed through by both workflow modules (like the lifecycle core): the code is the
same for every run, so the sandbox need not re-import it for each new one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    FailureError,
    is_cancelled_exception,
)
from temporalio.workflow import ActivityCancellationType

from activities.db import DbActivities
from activities.provider import ProviderActivities
from activities.slack import SlackActivities
from models.contracts import (
    ApprovalDecision,
    ApprovalMessage,
    ApprovalOutcome,
    ApprovalPost,
    BundleInput,
    DeleteIdentity,
    Delivery,
    IdentityCreated,
    IdentityRef,
    MarkFailed,
    MessageUpdate,
    NhiRef,
    ProvisionInput,
    ProvisionPlan,
    ProvisionResult,
    RecordActive,
    RecordApproval,
    RemoveIdentity,
)
from models.enums import ROTATABLE_KINDS, NhiKind, NhiStatus
from nhi.rules.slack_messages import approval_decided_text
from workflows import tagging
from workflows.retry_policies import (
    DB_LOCAL_RETRY,
    DB_LOCAL_TIMEOUT,
    DB_RETRY,
    DB_TIMEOUT,
    PLATFORM_HEARTBEAT,
    PLATFORM_REMOVAL_RETRY,
    PLATFORM_RETRY,
    PLATFORM_TIMEOUT,
    SLACK_RETRY,
    SLACK_TIMEOUT,
    failure_reason,
)

# Cancellation compensates and ends the run cancelled (it used to fail it, or leave the NHI
# stuck when the cancellation came during the approval wait).
CANCEL_PATCH = "compensate-on-cancel"
# Approvers get the request in Slack and the messages are rewritten once decided (issue 16).
# Only runs started with an `approval` message look for the marker, so older runs replay as
# they ran.
SLACK_APPROVAL_PATCH = "approvals-in-slack"
# The inventory steps (begin_provisioning, record_approval, record_active, mark_failed) run as
# local activities (issue 15): each is one short, idempotent transaction, so the worker runs it
# within the workflow task that reaches it, instead of an activity task through the server and
# a workflow task after it. A provisioning of today is 3 workflow tasks and 1 activity task
# instead of 5 and 4. Runs recorded before replay their activities.
LOCAL_INVENTORY = "local-inventory-steps"
EXPIRED = "denied (no decision in the window)"

# Quarantine, its proof, its lifting and removal take an IdentityRef, not the whole plan
# (used by the lifecycle, provisioning, bundle and containment workflows).
IDENTITY_REFS = "identity-ref-activities"

Arg = TypeVar("Arg")
Ret = TypeVar("Ret")


async def local_db_step(method: Callable[..., Any], arg: Any) -> Any:
    """One inventory step (a DbActivities method) as a local activity.

    A local activity's failure can reach the workflow as its bare cause (an ApplicationError, a
    timeout, a cancellation) where an activity's arrives as an ActivityError around it: it is
    wrapped the same way, so `except ActivityError`, `failure_reason` and
    `is_cancelled_exception` treat both alike.
    """
    try:
        return await workflow.execute_local_activity_method(
            method, arg, start_to_close_timeout=DB_LOCAL_TIMEOUT, retry_policy=DB_LOCAL_RETRY
        )
    except ActivityError:
        raise
    except FailureError as err:
        name = getattr(method, "__name__", "inventory step")
        raise ActivityError(
            f"local activity {name} failed",
            scheduled_event_id=0,
            started_event_id=0,
            identity="",
            activity_type=name,
            activity_id="",
            retry_state=None,
        ) from err


async def inventory(method: Callable[[DbActivities, Arg], Ret], arg: Arg) -> Ret:
    """One inventory step: a local activity on today's code, an activity on runs before.

    Crash safety is unchanged: a local activity's result is recorded with the workflow task
    that ran it, so a worker lost before that task completes runs the step again, which every
    DbActivities method allows (its idempotency key is the run's and the step's). Its failure
    arrives as an ActivityError either way.
    """
    if workflow.patched(LOCAL_INVENTORY):
        done: Ret = await local_db_step(method, arg)
        return done
    return await workflow.execute_activity_method(
        method, arg, start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY
    )


class ApprovalGate:
    """The approval step that provisioning and bundles share: who may decide (checked by the
    `decide` validators before anything reaches history), the decisions, the Slack messages
    and the wait (whose timeout denies)."""

    def __init__(
        self,
        *,
        needs_approval: bool,
        requested_by: str,
        requested_by_person: str,
        owner_persons: list[str],
        approvals_required: int,
    ) -> None:
        self.needs_approval = needs_approval
        self.requested_by = requested_by
        self.requested_by_person = requested_by_person
        self.owner_persons = owner_persons
        self.required = max(1, approvals_required)
        self.decision: ApprovalDecision | None = None
        self.approvals: list[ApprovalDecision] = []
        self.deliveries: list[Delivery] = []

    @classmethod
    def of(cls, inp: ProvisionInput | BundleInput) -> ApprovalGate:
        """The gate a request (one NHI's, or a bundle's) asks for."""
        return cls(
            needs_approval=inp.needs_approval,
            requested_by=inp.requested_by,
            requested_by_person=inp.requested_by_person,
            owner_persons=inp.owner_persons,
            approvals_required=inp.approvals_required,
        )

    def check(self, decision: ApprovalDecision) -> None:
        """Refuse a decision before it reaches history (raises ApplicationError)."""
        # A decision the API gave up on (503, not accepted in time) is never applied later.
        if decision.not_after is not None and workflow.now() > decision.not_after:
            raise ApplicationError(
                "not delivered before the caller's deadline; nothing was applied",
                type="DeadlinePassed",
            )
        if not self.needs_approval:
            raise ApplicationError("this request needs no approval", type="InvalidState")
        if self.decision is not None:
            raise ApplicationError(
                f"already decided by {self.decision.approver}", type="AlreadyDecided"
            )
        person = decision.approver_person
        if decision.approver == self.requested_by or (
            # One person under two credentials (a platform and an approver token of one email)
            # is still the requester. A validator adds no history, so this needs no patch.
            self.requested_by_person and person == self.requested_by_person
        ):
            raise ApplicationError(
                "the requester cannot approve their own request", type="SelfApproval"
            )
        if person and person in self.owner_persons:
            raise ApplicationError(
                "the agent's owner cannot decide a request for their own agent",
                type="SelfApproval",
            )
        if any(
            a.approver == decision.approver or (person and a.approver_person == person)
            for a in self.approvals
        ):
            raise ApplicationError(
                f"already approved by {decision.approver}: a second, different approver is needed",
                type="AlreadyDecided",
            )

    def apply(self, decision: ApprovalDecision, nhi_id: uuid.UUID) -> ApprovalOutcome:
        """Take a checked decision: a denial, or the last approval needed, decides."""
        if decision.approve:
            self.approvals.append(decision)
        complete = not decision.approve or len(self.approvals) >= self.required
        if complete:
            self.decision = decision
        return ApprovalOutcome(
            nhi_id=nhi_id, approved=decision.approve, approver=decision.approver, complete=complete
        )

    def deciders(self) -> list[str]:
        """Who decided: every approver, or the one who denied."""
        if self.decision is not None and not self.decision.approve:
            return [self.decision.approver]
        return [a.approver for a in self.approvals]

    async def notify(self, msg: ApprovalMessage | None) -> None:
        """Send the request to each of the policy's approvers (one activity per recipient)."""
        if msg is None or not workflow.patched(SLACK_APPROVAL_PATCH):
            return
        for recipient in msg.recipients:
            try:
                posted = await workflow.execute_activity_method(
                    SlackActivities.post_approval,
                    ApprovalPost(msg=msg, recipient=recipient),
                    start_to_close_timeout=SLACK_TIMEOUT,
                    retry_policy=SLACK_RETRY,
                )
            except ActivityError as err:
                # Slack down never blocks a request: approvers can still decide through the
                # API (`nhi approvals list`), and the window still denies.
                workflow.logger.warning("approval to %s not sent: %s", recipient, err)
                continue
            self.deliveries.extend(posted.deliveries)

    async def rewrite(self, msg: ApprovalMessage | None, verdict: str) -> None:
        """Rewrite every approval message to say who decided (or that the window passed)."""
        if msg is None or not self.deliveries:
            return
        deciders = [] if verdict == EXPIRED else self.deciders()
        try:
            await workflow.execute_activity_method(
                SlackActivities.update_messages,
                MessageUpdate(
                    deliveries=self.deliveries,
                    text=approval_decided_text(msg.agent_name, verdict, deciders),
                ),
                start_to_close_timeout=SLACK_TIMEOUT,
                retry_policy=SLACK_RETRY,
            )
        except ActivityError as err:
            workflow.logger.warning("approval messages not rewritten: %s", err)

    async def wait(self, timeout_seconds: int) -> bool:
        """Wait for the decision; False when the window passed without one."""
        try:
            await workflow.wait_condition(
                lambda: self.decision is not None,
                timeout=timedelta(seconds=timeout_seconds),
                timeout_summary="approval window",
            )
        except TimeoutError:
            return False
        return True


async def remove_undelivered(plan: ProvisionPlan) -> None:
    """Compensation: remove an identity whose credential nobody was handed, secret included
    (nobody can need it back). Raises ActivityError when its retries run out."""
    if workflow.patched(IDENTITY_REFS):
        await workflow.execute_activity_method(
            ProviderActivities.delete_identity,
            DeleteIdentity(ref=IdentityRef.of_plan(plan), force_delete_secret=True),
            start_to_close_timeout=PLATFORM_TIMEOUT,
            heartbeat_timeout=PLATFORM_HEARTBEAT,
            retry_policy=PLATFORM_REMOVAL_RETRY,
        )
        return
    await workflow.execute_activity_method(
        ProviderActivities.remove_identity,
        RemoveIdentity(plan=plan, force_delete_secret=True),
        start_to_close_timeout=PLATFORM_TIMEOUT,
        heartbeat_timeout=PLATFORM_HEARTBEAT,
        retry_policy=PLATFORM_REMOVAL_RETRY,
    )


class Provisioning:
    """The provisioning steps of one NHI and what they have done so far.

    Built in the workflow's `__init__`, not in its run: a `decide` update can arrive in the very
    first activation, and the gate answers it.
    """

    def __init__(self, inp: ProvisionInput) -> None:
        self.inp = inp
        self.gate = ApprovalGate.of(inp)
        # What a cancellation has to undo: the plan once the platform may hold something, and
        # whether the lifecycle (which then answers for the NHI) has taken over.
        self.plan: ProvisionPlan | None = None
        self.handed_over = False

    async def run(
        self, hand_over: Callable[[ProvisionPlan], Awaitable[None]] | None = None
    ) -> ProvisionResult:
        """Provision the NHI the API recorded; raises ApplicationError on permanent failure.

        Once the NHI is active, `hand_over` starts its lifecycle (a run of its own); without
        it, the caller is the lifecycle and simply goes on. A bundled NHI is never handed over:
        its bundle does that once every sibling is active.

        A cancellation compensates before it propagates (style rule 11): whatever may have
        been created is removed and the NHI is `failed`; before anything could exist, the NHI
        is only marked `failed`. Runs recorded before this replay unchanged: the patch marker
        is looked for only once a cancellation arrives.
        """
        try:
            return await self._provision(hand_over)
        except BaseException as err:
            if (
                not is_cancelled_exception(err)
                or self.handed_over
                or not workflow.patched(CANCEL_PATCH)
            ):
                raise
            # The cancellation was delivered once; the activities below are not cancelled.
            reason = "provisioning was cancelled"
            if self.plan is not None:
                await self._compensate(self.plan, reason)
            else:
                await self._mark(NhiStatus.FAILED, f"{reason} before anything was created")
            raise

    async def _provision(
        self, hand_over: Callable[[ProvisionPlan], Awaitable[None]] | None
    ) -> ProvisionResult:
        inp = self.inp
        if inp.needs_approval:
            await self._await_approval()
        try:
            plan = await inventory(DbActivities.begin_provisioning, NhiRef(nhi_id=inp.nhi_id))
        except ActivityError as err:
            if is_cancelled_exception(err) and workflow.patched(CANCEL_PATCH):
                raise  # run() marks it failed and lets the cancellation end the run
            # Nothing exists on the platform yet: only the inventory needs to know.
            reason = failure_reason(err)
            await self._mark(NhiStatus.FAILED, reason)
            raise ApplicationError(reason, type="ProvisioningRefused", non_retryable=True) from err

        self.plan = plan
        tagging.tag_status(NhiStatus.PROVISIONING, plan.expires_at)
        try:
            created = await self._create(plan)
            await inventory(
                DbActivities.record_active,
                RecordActive(
                    nhi_id=plan.nhi_id,
                    external_id=created.external_id,
                    credential_ref=created.credential_ref,
                    workflow_id=workflow.info().workflow_id,
                    # The workflow clock, which the lifecycle's timers count from.
                    activated_at=workflow.now(),
                ),
            )
        except ActivityError as err:
            if is_cancelled_exception(err) and workflow.patched(CANCEL_PATCH):
                raise  # run() compensates and lets the cancellation end the run
            reason = failure_reason(err)
            status = await self._compensate(plan, reason)
            raise ApplicationError(
                f"provisioning failed ({status.value}): {reason}",
                type="ProvisioningFailed",
                non_retryable=True,
            ) from err
        result = ProvisionResult(
            nhi_id=plan.nhi_id,
            status=NhiStatus.ACTIVE,
            external_id=created.external_id,
            credential_ref=created.credential_ref,
        )
        if inp.bundled:
            # The bundle starts the lifecycles once every sibling is active, and removes this
            # identity (with the plan) if one fails.
            return result.model_copy(update={"plan": plan})
        # The lifecycle answers for the NHI from here on: rotation, reminders and expiry.
        self.handed_over = True
        if hand_over is not None:
            tagging.tag_status(NhiStatus.ACTIVE, plan.expires_at)
            await hand_over(plan)
        # In one run, the lifecycle tags every attribute (the status included) as it loads.
        return result

    async def _await_approval(self) -> None:
        inp, gate = self.inp, self.gate
        await gate.notify(inp.approval)
        if not await gate.wait(inp.approval_timeout_seconds):
            reason = f"no approver decided within {inp.approval_timeout_seconds}s"
            await self._mark(NhiStatus.FAILED, reason)
            await gate.rewrite(inp.approval, EXPIRED)
            raise ApplicationError(reason, type="ApprovalExpired", non_retryable=True)
        decision = gate.decision
        if decision is None:  # unreachable: the condition above held
            raise ApplicationError("approval condition met without a decision")
        await inventory(
            DbActivities.record_approval, RecordApproval(nhi_id=inp.nhi_id, decision=decision)
        )
        await gate.rewrite(inp.approval, "approved" if decision.approve else "denied")
        if not decision.approve:
            raise ApplicationError(
                f"denied by {decision.approver}: {decision.reason}",
                type="Denied",
                non_retryable=True,
            )

    async def _create(self, plan: ProvisionPlan) -> IdentityCreated:
        if workflow.patched("provider-interface"):
            created = await self._platform(ProviderActivities.create_identity, plan)
            if plan.kind not in ROTATABLE_KINDS:
                return created  # no static secret: the identity itself is the reference
            return await self._platform(ProviderActivities.deliver_credential, plan)
        # Runs recorded before the provider interface (AWS only) replay down this path.
        if plan.kind is NhiKind.IAM_ROLE:
            return await self._platform(ProviderActivities.ensure_role, plan)
        await self._platform(ProviderActivities.ensure_user, plan)
        return await self._platform(ProviderActivities.issue_access_key, plan)

    async def _platform(
        self,
        method: Callable[[ProviderActivities, ProvisionPlan], IdentityCreated],
        plan: ProvisionPlan,
    ) -> IdentityCreated:
        created = await workflow.execute_activity_method(
            method,
            plan,
            start_to_close_timeout=PLATFORM_TIMEOUT,
            heartbeat_timeout=PLATFORM_HEARTBEAT,
            retry_policy=PLATFORM_RETRY,
            # On cancellation, wait until the creating call has stopped: compensation must not
            # run while it can still create something. (SDK-side only: no command changes.)
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        # A call that finished despite the cancellation returns its result and the SDK clears
        # the cancellation: look for it, so the run still compensates instead of carrying on.
        if workflow.cancellation_reason() is not None and workflow.patched(CANCEL_PATCH):
            raise asyncio.CancelledError("provisioning was cancelled")
        return created

    async def _compensate(self, plan: ProvisionPlan, reason: str) -> NhiStatus:
        status = NhiStatus.FAILED
        try:
            await remove_undelivered(plan)
        except ActivityError as err:
            status = NhiStatus.REVOKE_FAILED
            reason = f"{reason}; removing what was created also failed: {failure_reason(err)}"
        await self._mark(status, reason)
        return status

    async def _mark(self, status: NhiStatus, reason: str) -> None:
        await inventory(
            DbActivities.mark_failed,
            MarkFailed(
                nhi_id=self.inp.nhi_id,
                status=status,
                reason=reason[:2000],
                workflow_id=workflow.info().workflow_id,
            ),
        )
        tagging.tag_status(status)
