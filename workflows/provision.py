"""Provisioning: validate, create the identity, deliver the credential, record it active.

A permanent failure removes whatever was created and marks the NHI `failed`; if even the
removal fails, the NHI is `revoke_failed` so nothing is silently left behind.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.workflow import ParentClosePolicy

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
    from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id
    from workflows.policies import (
        DB_RETRY,
        DB_TIMEOUT,
        PLATFORM_HEARTBEAT,
        PLATFORM_REMOVAL_RETRY,
        PLATFORM_RETRY,
        PLATFORM_TIMEOUT,
        failure_reason,
    )


@workflow.defn
class ProvisionNhiWorkflow:
    """One run per NHI, id `nhi-provision-<nhi id>`.

    A request for sensitive actions waits for an approver's `decide` update first.
    """

    @workflow.init
    def __init__(self, inp: ProvisionInput) -> None:
        # Set here, not in run(): an update can arrive in the very first activation.
        self._inp = inp
        self._decision: ApprovalDecision | None = None

    @workflow.update
    async def decide(self, decision: ApprovalDecision) -> ApprovalOutcome:
        """Approve or deny a pending request; validated before it reaches history."""
        self._decision = decision
        return ApprovalOutcome(
            nhi_id=self._inp.nhi_id, approved=decision.approve, approver=decision.approver
        )

    @decide.validator
    def _check_decision(self, decision: ApprovalDecision) -> None:
        if not self._inp.needs_approval:
            raise ApplicationError("this request needs no approval", type="InvalidState")
        if self._decision is not None:
            raise ApplicationError(
                f"already decided by {self._decision.approver}", type="AlreadyDecided"
            )
        if decision.approver == self._inp.requested_by:
            raise ApplicationError(
                "the requester cannot approve their own request", type="SelfApproval"
            )

    @workflow.run
    async def run(self, inp: ProvisionInput) -> ProvisionResult:
        """Provision the NHI the API recorded; raises ApplicationError on permanent failure."""
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
            # Nothing exists on the platform yet: only the inventory needs to know.
            reason = failure_reason(err)
            await self._mark(inp, NhiStatus.FAILED, reason)
            raise ApplicationError(reason, type="ProvisioningRefused", non_retryable=True) from err

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
            reason = failure_reason(err)
            status = await self._compensate(plan, reason)
            raise ApplicationError(
                f"provisioning failed ({status.value}): {reason}",
                type="ProvisioningFailed",
                non_retryable=True,
            ) from err
        # The lifecycle outlives this run: rotation, reminders and expiry from here on.
        await workflow.start_child_workflow(
            NhiLifecycleWorkflow.run,
            LifecycleInput(nhi_id=plan.nhi_id),
            id=lifecycle_workflow_id(plan.nhi_id),
            parent_close_policy=ParentClosePolicy.ABANDON,
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
        return await workflow.execute_activity_method(
            method,
            plan,
            start_to_close_timeout=PLATFORM_TIMEOUT,
            heartbeat_timeout=PLATFORM_HEARTBEAT,
            retry_policy=PLATFORM_RETRY,
        )

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
