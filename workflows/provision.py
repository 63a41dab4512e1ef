"""Provisioning: validate, create the identity, deliver the credential, record it active.

A permanent failure removes whatever was created and marks the NHI `failed`; if even the
removal fails, the NHI is `revoke_failed` so nothing is silently left behind. So does a
cancellation: the run removes what it created, marks the NHI `failed`, then ends cancelled. A
terminated run cannot clean up after itself; the sweep's pre-active check does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.workflow import ActivityCancellationType, ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.db import DbActivities
    from activities.provider import ProviderActivities
    from models.contracts import (
        ApprovalDecision,
        ApprovalOutcome,
        IdentityCreated,
        LifecycleInput,
        MarkFailed,
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
    from workflows import tagging
    from workflows.lifecycle import NhiLifecycleWorkflow
    from workflows.retry_policies import (
        DB_RETRY,
        DB_TIMEOUT,
        PLATFORM_HEARTBEAT,
        PLATFORM_REMOVAL_RETRY,
        PLATFORM_RETRY,
        PLATFORM_TIMEOUT,
        failure_reason,
    )

# Cancellation compensates and ends the run cancelled (it used to fail it, or leave the NHI
# stuck when the cancellation came during the approval wait).
CANCEL_PATCH = "compensate-on-cancel"


@workflow.defn(name=PROVISION_WORKFLOW)
class ProvisionNhiWorkflow:
    """One run per NHI, id `nhi-provision-<nhi id>`.

    A request for sensitive actions waits for an approver's `decide` update first.
    """

    @workflow.init
    def __init__(self, inp: ProvisionInput) -> None:
        # Set here, not in run(): an update can arrive in the very first activation.
        self._inp = inp
        self._decision: ApprovalDecision | None = None
        # What a cancellation has to undo: the plan once the platform may hold something, and
        # whether the lifecycle (which then answers for the NHI) was started.
        self._plan: ProvisionPlan | None = None
        self._handed_over = False

    @workflow.update
    async def decide(self, decision: ApprovalDecision) -> ApprovalOutcome:
        """Approve or deny a pending request; validated before it reaches history."""
        self._decision = decision
        return ApprovalOutcome(
            nhi_id=self._inp.nhi_id, approved=decision.approve, approver=decision.approver
        )

    @decide.validator
    def _check_decision(self, decision: ApprovalDecision) -> None:
        # A decision the API gave up on (503, not accepted in time) is never applied later.
        if decision.not_after is not None and workflow.now() > decision.not_after:
            raise ApplicationError(
                "not delivered before the caller's deadline; nothing was applied",
                type="DeadlinePassed",
            )
        if not self._inp.needs_approval:
            raise ApplicationError("this request needs no approval", type="InvalidState")
        if self._decision is not None:
            raise ApplicationError(
                f"already decided by {self._decision.approver}", type="AlreadyDecided"
            )
        if decision.approver == self._inp.requested_by or (
            # One person under two credentials (a platform and an approver token of one email)
            # is still the requester. A validator adds no history, so this needs no patch.
            self._inp.requested_by_person
            and decision.approver_person == self._inp.requested_by_person
        ):
            raise ApplicationError(
                "the requester cannot approve their own request", type="SelfApproval"
            )

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
            plan = await workflow.execute_activity_method(
                DbActivities.begin_provisioning,
                NhiRef(nhi_id=inp.nhi_id),
                start_to_close_timeout=DB_TIMEOUT,
                retry_policy=DB_RETRY,
            )
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
            await workflow.execute_activity_method(
                DbActivities.record_active,
                RecordActive(
                    nhi_id=plan.nhi_id,
                    external_id=created.external_id,
                    credential_ref=created.credential_ref,
                    workflow_id=workflow_id,
                    # The workflow clock, which the lifecycle's timers count from.
                    activated_at=workflow.now(),
                ),
                start_to_close_timeout=DB_TIMEOUT,
                retry_policy=DB_RETRY,
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
        try:
            await workflow.wait_condition(
                lambda: self._decision is not None,
                timeout=timedelta(seconds=inp.approval_timeout_seconds),
                timeout_summary="approval window",
            )
        except TimeoutError:
            reason = f"no approver decided within {inp.approval_timeout_seconds}s"
            await self._mark(inp, NhiStatus.FAILED, reason)
            raise ApplicationError(reason, type="ApprovalExpired", non_retryable=True) from None
        decision = self._decision
        if decision is None:  # unreachable: the condition above held
            raise ApplicationError("approval condition met without a decision")
        await workflow.execute_activity_method(
            DbActivities.record_approval,
            RecordApproval(nhi_id=inp.nhi_id, decision=decision),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
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
            await workflow.execute_activity_method(
                ProviderActivities.remove_identity,
                # Never delivered, so nobody can need the secret back.
                RemoveIdentity(plan=plan, force_delete_secret=True),
                start_to_close_timeout=PLATFORM_TIMEOUT,
                heartbeat_timeout=PLATFORM_HEARTBEAT,
                retry_policy=PLATFORM_REMOVAL_RETRY,
            )
        except ActivityError as err:
            status = NhiStatus.REVOKE_FAILED
            reason = f"{reason}; removing what was created also failed: {failure_reason(err)}"
        await self._mark(ProvisionInput(nhi_id=plan.nhi_id), status, reason)
        return status

    async def _mark(self, inp: ProvisionInput, status: NhiStatus, reason: str) -> None:
        await workflow.execute_activity_method(
            DbActivities.mark_failed,
            MarkFailed(
                nhi_id=inp.nhi_id,
                status=status,
                reason=reason[:2000],
                workflow_id=workflow.info().workflow_id,
            ),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        tagging.tag_status(status)
