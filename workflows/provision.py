"""Provisioning in a run of its own: validate, create the identity, deliver the credential,
record it active, then start the lifecycle as a child.

Every NHI requested before one-run provisioning (issue 15) ran here, and each NHI of a bundle
still does. The steps themselves, their compensation and the approval gate live in
workflows/provisioning.py, shared with the lifecycle, which now runs them as its first phase.

A permanent failure removes whatever was created and marks the NHI `failed`; if even the
removal fails, the NHI is `revoke_failed` so nothing is silently left behind. So does a
cancellation: the run removes what it created, marks the NHI `failed`, then ends cancelled. A
terminated run cannot clean up after itself; the sweep's pre-active check does.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from models.contracts import (
        ApprovalDecision,
        ApprovalOutcome,
        LifecycleInput,
        ProvisionInput,
        ProvisionPlan,
        ProvisionResult,
    )
    from nhi.rules.ids import LIFECYCLE_WORKFLOW, PROVISION_WORKFLOW, lifecycle_workflow_id
    from workflows import tagging
    from workflows.provisioning import Provisioning


@workflow.defn(name=PROVISION_WORKFLOW)
class ProvisionNhiWorkflow:
    """One run per NHI, id `nhi-provision-<nhi id>`.

    A request for sensitive actions waits for an approver's `decide` update first.
    """

    @workflow.init
    def __init__(self, inp: ProvisionInput) -> None:
        self._steps = Provisioning(inp)

    @workflow.update
    async def decide(self, decision: ApprovalDecision) -> ApprovalOutcome:
        """Approve or deny a pending request; validated before it reaches history. With two
        approvers required, the first approval is recorded and the request keeps waiting."""
        return self._steps.gate.apply(decision, self._steps.inp.nhi_id)

    @decide.validator
    def _check_decision(self, decision: ApprovalDecision) -> None:
        self._steps.gate.check(decision)

    @workflow.run
    async def run(self, inp: ProvisionInput) -> ProvisionResult:  # noqa: ARG002
        """Provision the NHI the API recorded (`inp` is the input `__init__` took); raises
        ApplicationError on permanent failure, and compensates before a cancellation ends the
        run cancelled."""
        return await self._steps.run(hand_over=_start_lifecycle)


async def _start_lifecycle(plan: ProvisionPlan) -> None:
    """The lifecycle outlives this run: rotation, reminders and expiry from here on."""
    await workflow.start_child_workflow(
        LIFECYCLE_WORKFLOW,
        LifecycleInput(nhi_id=plan.nhi_id),
        id=lifecycle_workflow_id(plan.nhi_id),
        parent_close_policy=ParentClosePolicy.ABANDON,
        search_attributes=tagging.carried(),
    )
