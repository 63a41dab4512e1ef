"""Bundles: several NHIs of one agent, approved together and provisioned all or nothing.

One approval (the `decide` update, the same gate as single requests) covers every NHI. Each NHI
is then provisioned by the ordinary `ProvisionNhiWorkflow`, run as a child with its usual id
(`nhi-provision-<nhi id>`) and `bundled=True`: it stops once its NHI is active, without
starting the lifecycle. If one fails (it removes what it created itself), the bundle removes
the identities of those already provisioned and marks every other NHI `failed`; only when all
are active does it start their lifecycles.
"""

from __future__ import annotations

import uuid

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.db import DbActivities
    from models.contracts import (
        ApprovalDecision,
        ApprovalOutcome,
        BundleInput,
        BundleResult,
        LifecycleInput,
        MarkFailed,
        ProvisionInput,
        ProvisionResult,
        RecordApproval,
    )
    from models.enums import NhiStatus
    from nhi.rules.ids import BUNDLE_WORKFLOW, lifecycle_workflow_id, provision_workflow_id
    from workflows.lifecycle import NhiLifecycleWorkflow
    from workflows.provision import ProvisionNhiWorkflow
    from workflows.provisioning import EXPIRED, ApprovalGate, remove_undelivered
    from workflows.retry_policies import (
        DB_RETRY,
        DB_TIMEOUT,
        failure_reason,
    )


@workflow.defn(name=BUNDLE_WORKFLOW)
class BundleWorkflow:
    """One run per bundle, id `nhi-bundle-<bundle id>`."""

    @workflow.init
    def __init__(self, inp: BundleInput) -> None:
        self._inp = inp
        self._gate = ApprovalGate.of(inp)

    @workflow.update
    async def decide(self, decision: ApprovalDecision) -> ApprovalOutcome:
        """Approve or deny the whole bundle (the same rules as a single request)."""
        return self._gate.apply(decision, self._inp.bundle_id)

    @decide.validator
    def _check_decision(self, decision: ApprovalDecision) -> None:
        self._gate.check(decision)

    @workflow.run
    async def run(self, inp: BundleInput) -> BundleResult:
        """Approve, provision every NHI, hand them to their lifecycles; or leave nothing."""
        if inp.needs_approval:
            refusal = await self._approve(inp)
            if refusal is not None:
                return BundleResult(bundle_id=inp.bundle_id, failed=refusal)
        done: list[ProvisionResult] = []
        for index, nhi_id in enumerate(inp.nhi_ids):
            try:
                result = await workflow.execute_child_workflow(
                    ProvisionNhiWorkflow.run,
                    ProvisionInput(
                        nhi_id=nhi_id,
                        requested_by=inp.requested_by,
                        requested_by_person=inp.requested_by_person,
                        bundled=True,
                    ),
                    id=provision_workflow_id(nhi_id),
                )
            except ChildWorkflowError as err:
                # The child's own reason (the platform's code and message), not the wrapper's.
                cause = err.cause if err.cause is not None else err
                reason = f"bundle item nhis[{index}] failed: {failure_reason(cause)}"
                await self._compensate(inp, done, nhi_id, reason)
                return BundleResult(bundle_id=inp.bundle_id, failed=reason)
            done.append(result)
        for result in done:
            await workflow.start_child_workflow(
                NhiLifecycleWorkflow.run,
                LifecycleInput(nhi_id=result.nhi_id),
                id=lifecycle_workflow_id(result.nhi_id),
                parent_close_policy=ParentClosePolicy.ABANDON,
            )
        return BundleResult(bundle_id=inp.bundle_id, provisioned=[r.nhi_id for r in done])

    async def _approve(self, inp: BundleInput) -> str | None:
        """The bundle's one approval; the refusal's reason, or None once approved."""
        gate = self._gate
        await gate.notify(inp.approval)
        if not await gate.wait(inp.approval_timeout_seconds):
            reason = f"no approver decided within {inp.approval_timeout_seconds}s"
            await self._fail_all(inp, [], reason)
            await gate.rewrite(inp.approval, EXPIRED)
            return reason
        decision = gate.decision
        if decision is None:  # unreachable: the wait returned once it was set
            raise ApplicationError("approval condition met without a decision")
        for nhi_id in inp.nhi_ids:
            await workflow.execute_activity_method(
                DbActivities.record_approval,
                RecordApproval(nhi_id=nhi_id, decision=decision),
                start_to_close_timeout=DB_TIMEOUT,
                retry_policy=DB_RETRY,
            )
        await gate.rewrite(inp.approval, "approved" if decision.approve else "denied")
        if not decision.approve:  # record_approval marked every NHI failed
            return f"denied by {decision.approver}: {decision.reason}"
        return None

    async def _compensate(
        self, inp: BundleInput, done: list[ProvisionResult], failed: uuid.UUID, reason: str
    ) -> None:
        """Remove the identities already provisioned, then fail every NHI the failed child
        did not mark itself."""
        for result in done:
            if result.plan is None:
                continue
            status = NhiStatus.FAILED
            why = f"removed: {reason}"
            try:
                await remove_undelivered(result.plan)
            except ActivityError as err:
                status = NhiStatus.REVOKE_FAILED
                why = f"{reason}; removing it also failed: {failure_reason(err)}"
            await self._mark(result.nhi_id, status, why)
        provisioned = {r.nhi_id for r in done}
        await self._fail_all(inp, [*provisioned, failed], reason)

    async def _fail_all(self, inp: BundleInput, skip: list[uuid.UUID], reason: str) -> None:
        for nhi_id in inp.nhi_ids:
            if nhi_id not in skip:
                await self._mark(nhi_id, NhiStatus.FAILED, f"not provisioned: {reason}")

    async def _mark(self, nhi_id: uuid.UUID, status: NhiStatus, reason: str) -> None:
        await workflow.execute_activity_method(
            DbActivities.mark_failed,
            MarkFailed(
                nhi_id=nhi_id,
                status=status,
                reason=reason[:2000],
                workflow_id=workflow.info().workflow_id,
            ),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
