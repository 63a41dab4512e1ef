"""Sweeps: find what the per-NHI timers missed, and orphans, and deal with them.

`SweepWorkflow` runs per provider on a Temporal Schedule (and on demand). `OrphanRemovalWorkflow`
quarantines an orphan at once and deletes it after a grace period; its id is derived from the
identity, so a second sweep never starts a second removal.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.provider import ProviderActivities
    from activities.slack import SlackActivities
    from activities.sweep import SupervisionActivities, SweepActivities
    from models.contracts import (
        Alert,
        Finding,
        FindingKind,
        LifecycleNudge,
        OrphanInput,
        RemoveIdentity,
        SweepInput,
        SweepOutcome,
        SweepPlan,
        orphan_plan,
    )
    from models.enums import NhiKind
    from workflows.policies import (
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

SWEEP_TIMEOUT = timedelta(minutes=30)
SWEEP_HEARTBEAT = timedelta(minutes=2)
ORPHAN_GRACE_DEFAULT = 86400


def sweep_workflow_id(provider: str) -> str:
    """Id of the scheduled sweep of a provider (Schedules append the fire time)."""
    return f"nhi-sweep-{provider}"


def orphan_workflow_id(kind: str, name: str, target: str | None = None) -> str:
    """One removal per orphaned identity, however many sweeps find it."""
    where = f"{target}-" if target else ""
    return f"nhi-orphan-{kind}-{where}{name}"


@workflow.defn
class SweepWorkflow:
    """Discover, compare, act (unless a dry run), report."""

    def __init__(self) -> None:
        self._grace = ORPHAN_GRACE_DEFAULT

    @workflow.run
    async def run(self, inp: SweepInput) -> SweepOutcome:
        """Returns the report it stored; a failed listing stops the sweep without acting."""
        # The report's id is fixed before any activity runs, so even a failure is recorded.
        inp = inp.model_copy(update={"sweep_id": inp.sweep_id or workflow.uuid4()})
        try:
            plan: SweepPlan = await workflow.execute_activity_method(
                SweepActivities.plan_sweep,
                inp,
                start_to_close_timeout=SWEEP_TIMEOUT,
                heartbeat_timeout=SWEEP_HEARTBEAT,
                retry_policy=PLATFORM_RETRY,
            )
            unsupervised: list[Finding] = await workflow.execute_activity_method(
                SupervisionActivities.find_unsupervised,
                inp,
                start_to_close_timeout=SWEEP_TIMEOUT,
                heartbeat_timeout=SWEEP_HEARTBEAT,
                retry_policy=PLATFORM_RETRY,
            )
        except ActivityError as err:
            return await self._failed(inp, failure_reason(err))
        self._grace = plan.orphan_grace_seconds
        findings = [*plan.findings, *unsupervised]
        counts = dict(plan.counts)
        if unsupervised:
            counts[FindingKind.UNSUPERVISED.value] = len(unsupervised)
        if not inp.dry_run:
            findings = [await self._act(f, inp) for f in findings]
        outcome = SweepOutcome(
            sweep_id=plan.sweep_id,
            status="completed",
            summary=counts | {"truncated": plan.truncated, "dry_run": int(inp.dry_run)},
            findings=findings,
        )
        await self._record(outcome)
        if findings:
            await self._digest(inp, outcome)
        return outcome

    async def _act(self, finding: Finding, inp: SweepInput) -> Finding:
        try:
            if finding.kind is FindingKind.ORPHAN:
                done = await self._orphan(finding, inp)
            elif finding.kind in (FindingKind.EXPIRED_ALIVE, FindingKind.AGENT_GONE):
                done = await self._nudge(finding, "decommission")
            elif finding.kind is FindingKind.UNSUPERVISED:
                done = await self._nudge(finding, "restart")
            elif finding.kind is FindingKind.MISSING:
                await self._db(SweepActivities.mark_missing, finding)
                done = "marked in the inventory"
            elif finding.kind is FindingKind.DRIFT:
                reverted = await self._db(SweepActivities.revert_drift, finding)
                done = "granted scope restored" if reverted else "reported (policy does not revert)"
            else:
                done = "reported"
        except ActivityError as err:
            done = f"failed: {failure_reason(err)}"
        return finding.model_copy(update={"action": f"{finding.action}: {done}"})

    async def _orphan(self, finding: Finding, inp: SweepInput) -> str:
        try:
            await workflow.start_child_workflow(
                OrphanRemovalWorkflow.run,
                OrphanInput(
                    identity=finding.identity,
                    identity_kind=NhiKind(finding.identity_kind),
                    secret_arn=finding.secret_arn,
                    grace_seconds=self._grace,
                    found_by=f"system:sweep ({inp.triggered_by})",
                    target=finding.target,
                    nhi_id=finding.nhi_id,
                ),
                id=orphan_workflow_id(finding.identity_kind, finding.identity, finding.target),
                parent_close_policy=ParentClosePolicy.ABANDON,
            )
        except WorkflowAlreadyStartedError:
            return "removal already under way"
        return "removal started"

    async def _nudge(self, finding: Finding, action: str) -> str:
        if finding.nhi_id is None:
            return "no inventory id"
        result: str = await workflow.execute_activity_method(
            SupervisionActivities.nudge_lifecycle,
            LifecycleNudge(nhi_id=finding.nhi_id, action=action, reason=f"sweep: {finding.detail}"),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        return result

    async def _db(self, method: Callable[..., Any], arg: Any) -> Any:
        return await workflow.execute_activity_method(
            method,
            arg,
            start_to_close_timeout=PLATFORM_TIMEOUT,
            retry_policy=PLATFORM_RETRY,
        )

    async def _record(self, outcome: SweepOutcome) -> None:
        await workflow.execute_activity_method(
            SweepActivities.record_sweep,
            outcome,
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )

    async def _failed(self, inp: SweepInput, reason: str) -> SweepOutcome:
        if inp.sweep_id is not None:
            await self._record(
                SweepOutcome(sweep_id=inp.sweep_id, status="failed", error=reason, summary={})
            )
        await self._alert(f"The {inp.provider} sweep stopped without acting: {reason}")
        raise ApplicationError(reason, type="SweepFailed", non_retryable=True)

    async def _digest(self, inp: SweepInput, outcome: SweepOutcome) -> None:
        what = f"{inp.provider} sweep{' (dry run)' if inp.dry_run else ''}"
        lines = [f"{what}: {len(outcome.findings)} findings"]
        lines += [
            f"• {f.kind.value}: {f.identity} — {f.detail} → {f.action}"
            for f in outcome.findings[:20]
        ]
        if len(outcome.findings) > 20:
            lines.append(
                f"… and {len(outcome.findings) - 20} more (nhi sweep show {outcome.sweep_id})"
            )
        await self._alert("\n".join(lines))

    async def _alert(self, text: str) -> None:
        try:
            await workflow.execute_activity_method(
                SlackActivities.alert,
                Alert(security=True, text=text),
                start_to_close_timeout=SLACK_TIMEOUT,
                retry_policy=SLACK_RETRY,
            )
        except ActivityError as err:
            workflow.logger.warning("sweep digest not sent: %s", failure_reason(err))


@workflow.defn
class OrphanRemovalWorkflow:
    """Quarantine an orphan now, delete it (and its secret) after the grace period."""

    @workflow.run
    async def run(self, orphan: OrphanInput) -> list[str]:
        """Returns what was removed."""
        await workflow.execute_activity_method(
            SweepActivities.quarantine_orphan,
            orphan,
            start_to_close_timeout=PLATFORM_TIMEOUT,
            retry_policy=PLATFORM_RETRY,
        )
        await workflow.sleep(timedelta(seconds=orphan.grace_seconds))
        plan = orphan_plan(orphan, workflow.uuid4(), workflow.now())
        removed = await workflow.execute_activity_method(
            ProviderActivities.remove_identity,
            RemoveIdentity(plan=plan),
            start_to_close_timeout=PLATFORM_TIMEOUT,
            heartbeat_timeout=PLATFORM_HEARTBEAT,
            retry_policy=PLATFORM_REMOVAL_RETRY,
        )
        return list(removed.removed)
