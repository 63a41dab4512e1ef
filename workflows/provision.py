"""Provisioning: validate, create the identity, deliver the credential, record it active.

A permanent failure removes whatever was created and marks the NHI `failed`; if even the
removal fails, the NHI is `revoke_failed` so nothing is silently left behind. So does a
cancellation: the run removes what it created, marks the NHI `failed`, then ends cancelled. A
terminated run cannot clean up after itself; the sweep's pre-active check does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.workflow import ActivityCancellationType, ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.db import DbActivities
    from activities.provider import ProviderActivities
    from activities.slack import SlackActivities
    from models.contracts import (
        ApprovalDecision,
        ApprovalMessage,
        ApprovalOutcome,
        ApprovalPost,
        DeleteIdentity,
        Delivery,
        IdentityCreated,
        IdentityRef,
        LifecycleInput,
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
    from nhi.rules.ids import PROVISION_WORKFLOW, lifecycle_workflow_id
    from nhi.rules.slack_messages import approval_decided_text
    from workflows import tagging
    from workflows.lifecycle import IDENTITY_REFS, NhiLifecycleWorkflow, local_db_step
    from workflows.retry_policies import (
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

Arg = TypeVar("Arg")
Ret = TypeVar("Ret")


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


@workflow.defn(name=PROVISION_WORKFLOW)
class ProvisionNhiWorkflow:
    """One run per NHI, id `nhi-provision-<nhi id>`.

    A request for sensitive actions waits for an approver's `decide` update first.
    """

    @workflow.init
    def __init__(self, inp: ProvisionInput) -> None:
        # Set here, not in run(): an update can arrive in the very first activation.
        self._inp = inp
        self._gate = ApprovalGate(
            needs_approval=inp.needs_approval,
            requested_by=inp.requested_by,
            requested_by_person=inp.requested_by_person,
            owner_persons=inp.owner_persons,
            approvals_required=inp.approvals_required,
        )
        # What a cancellation has to undo: the plan once the platform may hold something, and
        # whether the lifecycle (which then answers for the NHI) was started.
        self._plan: ProvisionPlan | None = None
        self._handed_over = False

    @workflow.update
    async def decide(self, decision: ApprovalDecision) -> ApprovalOutcome:
        """Approve or deny a pending request; validated before it reaches history. With two
        approvers required, the first approval is recorded and the request keeps waiting."""
        return self._gate.apply(decision, self._inp.nhi_id)

    @decide.validator
    def _check_decision(self, decision: ApprovalDecision) -> None:
        self._gate.check(decision)

    @workflow.run
    async def run(self, inp: ProvisionInput) -> ProvisionResult:
        """Provision the NHI the API recorded; raises ApplicationError on permanent failure.

        A cancelled run compensates before it ends cancelled (style rule 11): whatever it may
        have created is removed and the NHI is `failed`; before anything could exist, the NHI
        is only marked `failed`. Runs recorded before this replay unchanged: the patch marker
        is looked for only once a cancellation arrives.
        """
        try:
            return await self._provision(inp)
        except BaseException as err:
            if (
                not is_cancelled_exception(err)
                or self._handed_over
                or not workflow.patched(CANCEL_PATCH)
            ):
                raise
            # The cancellation was delivered once; the activities below are not cancelled.
            reason = "provisioning was cancelled"
            if self._plan is not None:
                await self._compensate(self._plan, reason)
            else:
                await self._mark(inp, NhiStatus.FAILED, f"{reason} before anything was created")
            raise

    async def _provision(self, inp: ProvisionInput) -> ProvisionResult:
        workflow_id = workflow.info().workflow_id
        if inp.needs_approval:
            await self._await_approval(inp)
        try:
            plan = await inventory(DbActivities.begin_provisioning, NhiRef(nhi_id=inp.nhi_id))
        except ActivityError as err:
            if is_cancelled_exception(err) and workflow.patched(CANCEL_PATCH):
                raise  # run() marks it failed and ends the run cancelled
            # Nothing exists on the platform yet: only the inventory needs to know.
            reason = failure_reason(err)
            await self._mark(inp, NhiStatus.FAILED, reason)
            raise ApplicationError(reason, type="ProvisioningRefused", non_retryable=True) from err

        self._plan = plan
        tagging.tag_status(NhiStatus.PROVISIONING, plan.expires_at)
        try:
            created = await self._create(plan)
            await inventory(
                DbActivities.record_active,
                RecordActive(
                    nhi_id=plan.nhi_id,
                    external_id=created.external_id,
                    credential_ref=created.credential_ref,
                    workflow_id=workflow_id,
                    # The workflow clock, which the lifecycle's timers count from.
                    activated_at=workflow.now(),
                ),
            )
        except ActivityError as err:
            if is_cancelled_exception(err) and workflow.patched(CANCEL_PATCH):
                raise  # run() compensates and ends the run cancelled, not failed
            reason = failure_reason(err)
            status = await self._compensate(plan, reason)
            raise ApplicationError(
                f"provisioning failed ({status.value}): {reason}",
                type="ProvisioningFailed",
                non_retryable=True,
            ) from err
        if inp.bundled:
            # The bundle starts the lifecycles once every sibling is active, and removes this
            # identity (with the plan) if one fails.
            return ProvisionResult(
                nhi_id=plan.nhi_id,
                status=NhiStatus.ACTIVE,
                external_id=created.external_id,
                credential_ref=created.credential_ref,
                plan=plan,
            )
        # The lifecycle outlives this run: rotation, reminders and expiry from here on.
        self._handed_over = True
        tagging.tag_status(NhiStatus.ACTIVE, plan.expires_at)
        await workflow.start_child_workflow(
            NhiLifecycleWorkflow.run,
            LifecycleInput(nhi_id=plan.nhi_id),
            id=lifecycle_workflow_id(plan.nhi_id),
            parent_close_policy=ParentClosePolicy.ABANDON,
            search_attributes=tagging.carried(),
        )
        return ProvisionResult(
            nhi_id=plan.nhi_id,
            status=NhiStatus.ACTIVE,
            external_id=created.external_id,
            credential_ref=created.credential_ref,
        )

    async def _await_approval(self, inp: ProvisionInput) -> None:
        gate = self._gate
        await gate.notify(inp.approval)
        if not await gate.wait(inp.approval_timeout_seconds):
            reason = f"no approver decided within {inp.approval_timeout_seconds}s"
            await self._mark(inp, NhiStatus.FAILED, reason)
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
        await self._mark(ProvisionInput(nhi_id=plan.nhi_id), status, reason)
        return status

    async def _mark(self, inp: ProvisionInput, status: NhiStatus, reason: str) -> None:
        await inventory(
            DbActivities.mark_failed,
            MarkFailed(
                nhi_id=inp.nhi_id,
                status=status,
                reason=reason[:2000],
                workflow_id=workflow.info().workflow_id,
            ),
        )
        tagging.tag_status(status)
