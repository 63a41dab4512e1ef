"""Sweeps: find what the per-NHI timers missed, and orphans, and deal with them.

`SweepWorkflow` runs per provider on a Temporal Schedule (and on demand). `OrphanRemovalWorkflow`
quarantines an orphan at once and deletes it after a grace period; its id is derived from the
identity, so a second sweep never starts a second removal. A removal that keeps failing for
NHI_REVOKE_ALERT_SECONDS is recorded and alerted once, and the next sweep tries again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    FailureError,
    WorkflowAlreadyStartedError,
)
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.activity_import import (
        ActivityImportActivities,
        ActivityImportInput,
        ImportOutcome,
    )
    from activities.provider import ProviderActivities
    from activities.slack import SlackActivities
    from activities.sweep import (
        OrphanBatch,
        OrphanBatchResult,
        OrphanOutcome,
        SupervisionActivities,
        SweepActivities,
    )
    from models.contracts import (
        Alert,
        AlertPost,
        Finding,
        FindingKind,
        LifecycleNudge,
        MissingMarked,
        OrphanEvent,
        OrphanInput,
        OrphanNoted,
        OrphanQuarantined,
        PreactiveAction,
        PreactiveNhi,
        RemoveIdentity,
        SweepInput,
        SweepOutcome,
        SweepPlan,
        orphan_plan,
    )
    from models.enums import NhiKind
    from nhi.rules.ids import orphan_workflow_id
    from workflows.activity_import import alert_outcome
    from workflows.retry_policies import (
        DB_RETRY,
        DB_TIMEOUT,
        IMPORT_HEARTBEAT,
        IMPORT_RETRY,
        IMPORT_TIMEOUT,
        NUDGE_RETRY,
        NUDGE_TIMEOUT,
        PLATFORM_HEARTBEAT,
        PLATFORM_REMOVAL_RETRY,
        PLATFORM_RETRY,
        PLATFORM_TIMEOUT,
        REMOVAL_RETRY,
        SLACK_RETRY,
        SLACK_TIMEOUT,
        failure_reason,
        removal_window,
    )

SWEEP_TIMEOUT = timedelta(minutes=30)
SWEEP_HEARTBEAT = timedelta(seconds=30)  # progress beats every 5 s; a dead worker is seen soon
ORPHAN_GRACE_DEFAULT = 86400
# Sweeps and orphan removals recorded before the lifecycle guarantee (issue 11) replay the old
# paths: no pre-active check, `missing` only noted, orphan removal with no alert rule.
SWEEP_PATCH = "sweep-preactive-missing"
ORPHAN_PATCH = "orphan-alert-rule"
# Sweeps recorded before issue 19 act on their findings one at a time and report no history
# length; later ones act ACT_CONCURRENCY at a time.
PARALLEL_PATCH = "sweep-parallel-actions"
ACT_CONCURRENCY = 20  # removals and nudges under way at once
# Sweeps recorded before this patch start a child workflow per orphan; later ones remove the
# orphans whose grace period is over in `remove_orphans` batches (ORPHAN_BATCH_SIZE each,
# ORPHAN_BATCHES at once: each removes ORPHAN_THREADS orphans at a time), and start a child only
# for an orphan still in its grace period or whose removal failed.
BATCH_PATCH = "sweep-orphan-batches"
# A nudge is tried 3 times for at most a minute each (NUDGE_RETRY), then reported as failed.
BOUNDED_NUDGES = "sweep-bounded-nudges"
# A Postgres sweep (not a dry run) takes one `pg_stat_activity` sample of every target: an
# activity import whose findings alert and may contain like a log file's (issue 17).
ACTIVITY_SAMPLES = "sweep-activity-samples"
ORPHAN_BATCH_SIZE = 50
ORPHAN_BATCHES = 4


def failure_code(err: BaseException) -> str:
    """The platform's error code (the classified ApplicationError's type) inside a failure."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ApplicationError) and cause.type:
            return cause.type
        cause = cause.cause if isinstance(cause, FailureError) else None
    return ""


@workflow.defn
class SweepWorkflow:
    """Discover, compare, act (unless a dry run), report."""

    def __init__(self) -> None:
        self._grace = ORPHAN_GRACE_DEFAULT
        self._plan: SweepPlan | None = None
        self._current = False

    @workflow.run
    async def run(self, inp: SweepInput) -> SweepOutcome:
        """Returns the report it stored; a failed listing stops the sweep without acting."""
        self._current = workflow.patched(SWEEP_PATCH)
        parallel = workflow.patched(PARALLEL_PATCH)
        batched = parallel and workflow.patched(BATCH_PATCH)
        orphans: dict[str, int] = {}
        # The report's id is fixed before any activity runs, so even a failure is recorded.
        inp = inp.model_copy(update={"sweep_id": inp.sweep_id or workflow.uuid4()})
        preactive: list[Finding] = []
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
            if self._current:
                preactive = await workflow.execute_activity_method(
                    SupervisionActivities.find_preactive,
                    inp,
                    start_to_close_timeout=SWEEP_TIMEOUT,
                    heartbeat_timeout=SWEEP_HEARTBEAT,
                    retry_policy=PLATFORM_RETRY,
                )
        except ActivityError as err:
            return await self._failed(inp, failure_reason(err))
        self._grace = plan.orphan_grace_seconds
        self._plan = plan
        findings = [*plan.findings, *unsupervised, *preactive]
        counts = dict(plan.counts)
        if unsupervised:
            counts[FindingKind.UNSUPERVISED.value] = len(unsupervised)
        if preactive:
            counts[FindingKind.PREACTIVE.value] = len(preactive)
        if not inp.dry_run and batched:
            findings, orphans = await self._act_batched(findings, inp)
        elif not inp.dry_run and parallel:
            findings = await self._act_all(findings, inp)
        elif not inp.dry_run:
            findings = [await self._act(f, inp) for f in findings]
        summary = counts | {"truncated": plan.truncated, "dry_run": int(inp.dry_run)} | orphans
        if inp.provider == "postgres" and not inp.dry_run and workflow.patched(ACTIVITY_SAMPLES):
            summary |= await self._sample_activity(inp)
        if parallel:
            # At most MAX_FINDINGS findings reach a sweep's history (the rest is counted and
            # left to the next sweep), so its length stays far below Temporal's limits.
            summary["history_events"] = workflow.info().get_current_history_length()
        outcome = SweepOutcome(
            sweep_id=plan.sweep_id,
            status="completed",
            summary=summary,
            findings=findings,
        )
        await self._record(outcome)
        if findings:
            await self._digest(inp, outcome)
        return outcome

    async def _sample_activity(self, inp: SweepInput) -> dict[str, int]:
        """One `pg_stat_activity` sample of every target, imported and alerted like a log
        file; its counts for the report. A failed sample never fails the sweep."""
        try:
            outcome: ImportOutcome = await workflow.execute_activity_method(
                ActivityImportActivities.import_activity,
                ActivityImportInput(
                    sample_postgres=True, triggered_by=f"system:sweep ({inp.triggered_by})"[:254]
                ),
                start_to_close_timeout=IMPORT_TIMEOUT,
                heartbeat_timeout=IMPORT_HEARTBEAT,
                retry_policy=IMPORT_RETRY,
            )
        except ActivityError as err:
            workflow.logger.warning("activity sample failed: %s", failure_reason(err))
            return {"activity_samples_failed": 1}
        await alert_outcome(outcome)
        return {
            "activity_events": outcome.new,
            "activity_findings": outcome.findings,
            "activity_samples_failed": outcome.failed_files,
        }

    async def _act_all(self, findings: list[Finding], inp: SweepInput) -> list[Finding]:
        """Every finding acted on, ACT_CONCURRENCY at a time, reported in their order."""
        slots = asyncio.Semaphore(ACT_CONCURRENCY)

        async def one(finding: Finding) -> Finding:
            async with slots:
                return await self._act(finding, inp)

        return list(await asyncio.gather(*(one(f) for f in findings)))

    async def _act_batched(
        self, findings: list[Finding], inp: SweepInput
    ) -> tuple[list[Finding], dict[str, int]]:
        """Orphans in batches, everything else as `_act_all`; reported in their order, with
        how many orphans were removed here, handed to their removal workflow, and failed."""
        is_orphan = [f.kind is FindingKind.ORPHAN for f in findings]
        others = [f for f, o in zip(findings, is_orphan, strict=True) if not o]
        mine = [f for f, o in zip(findings, is_orphan, strict=True) if o]
        acted, (removed, tally) = await asyncio.gather(
            self._act_all(others, inp), self._remove_orphans(mine, inp)
        )
        done_others, done_orphans = iter(acted), iter(removed)
        out = [next(done_orphans) if o else next(done_others) for o in is_orphan]
        return out, tally

    async def _remove_orphans(
        self, orphans: list[Finding], inp: SweepInput
    ) -> tuple[list[Finding], dict[str, int]]:
        """Each orphan removed in a batch when its grace period is over; the others, and any
        whose removal failed, handed to their `OrphanRemovalWorkflow` (which waits out the
        grace, retries until the alert window has passed, records and alerts the failure)."""
        batches = [
            orphans[i : i + ORPHAN_BATCH_SIZE] for i in range(0, len(orphans), ORPHAN_BATCH_SIZE)
        ]
        slots = asyncio.Semaphore(ORPHAN_BATCHES)
        handoffs = asyncio.Semaphore(ACT_CONCURRENCY)
        tally = {"orphans_removed": 0, "orphans_handed_off": 0, "orphan_removals_failed": 0}

        async def handoff(finding: Finding, outcome: OrphanOutcome) -> Finding:
            if outcome.status == "removed":
                tally["orphans_removed"] += 1
                what = "; ".join(outcome.removed) or "nothing was left"
                done = f"removed (grace period over): {what}"
            else:
                async with handoffs:
                    started = await self._orphan(finding, inp)
                tally["orphans_handed_off"] += 1
                done = started
                if outcome.status == "failed":
                    # Visible in the report now; the removal workflow records and alerts it
                    # if it keeps failing past the alert window.
                    tally["orphan_removals_failed"] += 1
                    code = f" ({outcome.code})" if outcome.code else ""
                    done = (
                        f"removal failed{code}: {outcome.reason}; its removal workflow retries: "
                        f"{started}"
                    )
            return finding.model_copy(update={"action": f"{finding.action}: {done}"})

        async def batch(found: list[Finding]) -> list[Finding]:
            async with slots:
                try:
                    result: OrphanBatchResult = await workflow.execute_activity_method(
                        SweepActivities.remove_orphans,
                        OrphanBatch(orphans=[self._orphan_input(f, inp) for f in found]),
                        start_to_close_timeout=SWEEP_TIMEOUT,
                        heartbeat_timeout=PLATFORM_HEARTBEAT,
                        retry_policy=PLATFORM_RETRY,
                    )
                    outcomes = result.outcomes
                except ActivityError as err:
                    reason = f"batch removal failed: {failure_reason(err)}"
                    outcomes = [
                        OrphanOutcome(identity=f.identity, status="failed", reason=reason)
                        for f in found
                    ]
            return list(
                await asyncio.gather(*(handoff(f, o) for f, o in zip(found, outcomes, strict=True)))
            )

        done = await asyncio.gather(*(batch(b) for b in batches))
        return [f for b in done for f in b], tally

    async def _act(self, finding: Finding, inp: SweepInput) -> Finding:
        try:
            if finding.kind is FindingKind.ORPHAN:
                done = await self._orphan(finding, inp)
            elif finding.kind in (FindingKind.EXPIRED_ALIVE, FindingKind.AGENT_GONE):
                done = await self._nudge(finding, "decommission")
            elif finding.kind is FindingKind.UNSUPERVISED:
                done = await self._nudge(finding, "restart")
            elif finding.kind is FindingKind.MISSING and self._current:
                done = await self._missing(finding)
            elif finding.kind is FindingKind.MISSING:
                await self._db(SweepActivities.mark_missing, finding)
                done = "marked in the inventory"
            elif finding.kind is FindingKind.PREACTIVE:
                done = await self._preactive(finding)
            elif finding.kind is FindingKind.DRIFT:
                reverted = await self._db(SweepActivities.revert_drift, finding)
                done = "granted scope restored" if reverted else "reported (policy does not revert)"
            else:
                done = "reported"
        except ActivityError as err:
            done = f"failed: {failure_reason(err)}"
        return finding.model_copy(update={"action": f"{finding.action}: {done}"})

    def _orphan_input(self, finding: Finding, inp: SweepInput) -> OrphanInput:
        return OrphanInput(
            identity=finding.identity,
            identity_kind=NhiKind(finding.identity_kind),
            secret_arn=finding.secret_arn,
            grace_seconds=self._grace,
            found_by=f"system:sweep ({inp.triggered_by})",
            target=finding.target,
            nhi_id=finding.nhi_id,
            alert_seconds=self._settings().revoke_alert_seconds,
            security_channel=self._settings().security_channel,
        )

    async def _orphan(self, finding: Finding, inp: SweepInput) -> str:
        try:
            await workflow.start_child_workflow(
                OrphanRemovalWorkflow.run,
                self._orphan_input(finding, inp),
                id=orphan_workflow_id(finding.identity_kind, finding.identity, finding.target),
                parent_close_policy=ParentClosePolicy.ABANDON,
            )
        except WorkflowAlreadyStartedError:
            return "removal already under way"
        return "removal started"

    def _settings(self) -> SweepPlan:
        if self._plan is None:  # unreachable: actions run only after the plan
            raise ApplicationError("the sweep acted before it planned", non_retryable=True)
        return self._plan

    async def _nudge(self, finding: Finding, action: str) -> str:
        if finding.nhi_id is None:
            return "no inventory id"
        bounded = workflow.patched(BOUNDED_NUDGES)
        result: str = await workflow.execute_activity_method(
            SupervisionActivities.nudge_lifecycle,
            LifecycleNudge(
                nhi_id=finding.nhi_id,
                action=action,
                reason=f"sweep: {finding.detail}",
                sweep_id=self._settings().sweep_id,
            ),
            # Bounded on today's code (patch `sweep-bounded-nudges`).
            start_to_close_timeout=NUDGE_TIMEOUT if bounded else DB_TIMEOUT,
            retry_policy=NUDGE_RETRY if bounded else DB_RETRY,
        )
        return result

    async def _missing(self, finding: Finding) -> str:
        """Gone from a completely listed platform: `missing` in the inventory (with its audit
        event), its lifecycle stopped (nothing is left to rotate, remind or remove), and the
        owner and the security channel told."""
        marked: MissingMarked | None = await self._db(SweepActivities.mark_missing, finding)
        if marked is None or not marked.changed:
            return f"not marked: it is {marked.status if marked else 'gone'} now"
        stopped = await self._nudge(finding, "mark_missing")
        text = (
            f"NHI {marked.name} of agent {marked.agent_name} is gone from its platform, "
            "although this service never removed it. The inventory now says `missing` and its "
            "lifecycle has stopped. Find out who deleted it, and whether anything replaced it."
        )
        await self._tell(AlertPost(text=text, email=marked.owner_email))
        await self._tell(AlertPost(text=text, channel=self._settings().security_channel))
        return f"marked missing, owner and security alerted; lifecycle: {stopped}"

    async def _preactive(self, finding: Finding) -> str:
        if finding.nhi_id is None or finding.preactive is None:
            return "no inventory id"
        stuck = PreactiveNhi(
            nhi_id=finding.nhi_id,
            action=finding.preactive,
            reason=f"stuck before active: {finding.detail}",
            sweep_id=self._settings().sweep_id,
        )
        result: str
        if finding.preactive is PreactiveAction.REDRIVE:
            result = await workflow.execute_activity_method(
                SupervisionActivities.redrive_provisioning,
                stuck,
                start_to_close_timeout=DB_TIMEOUT,
                retry_policy=DB_RETRY,
            )
        else:
            result = await workflow.execute_activity_method(
                SweepActivities.clean_preactive,
                stuck,
                start_to_close_timeout=PLATFORM_TIMEOUT,
                heartbeat_timeout=PLATFORM_HEARTBEAT,
                retry_policy=PLATFORM_RETRY,
            )
        return result

    async def _tell(self, post: AlertPost) -> None:
        # One recipient per activity: a retry never reposts to someone already told.
        try:
            await workflow.execute_activity_method(
                SlackActivities.send_alert,
                post,
                start_to_close_timeout=SLACK_TIMEOUT,
                retry_policy=SLACK_RETRY,
            )
        except ActivityError as err:
            workflow.logger.warning("alert not sent: %s", failure_reason(err))

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
    """Quarantine an orphan now, delete it (and its secret) after the grace period.

    A removal still failing after the alert window is recorded (audit event with the platform's
    code and message, shown in the next sweep's finding), alerted to the security channel once
    however many sweeps retry it, and the run fails: the next sweep starts a new one, which
    waits only what is left of the grace period.
    """

    @workflow.run
    async def run(self, orphan: OrphanInput) -> list[str]:
        """Returns what was removed."""
        current = workflow.patched(ORPHAN_PATCH)
        quarantined: OrphanQuarantined | None = await workflow.execute_activity_method(
            SweepActivities.quarantine_orphan,
            orphan,
            start_to_close_timeout=PLATFORM_TIMEOUT,
            retry_policy=PLATFORM_RETRY,
        )
        grace = timedelta(seconds=orphan.grace_seconds)
        if not current or quarantined is None:
            await workflow.sleep(grace)
            return await self._remove_legacy(orphan)
        left = quarantined.first_quarantined_at + grace - workflow.now()
        if left > timedelta(0):
            await workflow.sleep(left)
        plan = orphan_plan(orphan, workflow.uuid4(), workflow.now())
        try:
            removed = await workflow.execute_activity_method(
                ProviderActivities.remove_identity,
                RemoveIdentity(plan=plan),
                # Retried until the alert window has passed, not for a number of attempts.
                schedule_to_close_timeout=removal_window(orphan.alert_seconds),
                start_to_close_timeout=PLATFORM_TIMEOUT,
                heartbeat_timeout=PLATFORM_HEARTBEAT,
                retry_policy=REMOVAL_RETRY,
            )
        except ActivityError as err:
            reason = failure_reason(err)
            noted = await self._note(
                orphan,
                "orphan.removal_failed",
                reason,
                {"code": failure_code(err), "kind": orphan.identity_kind.value},
            )
            if noted.first:
                await self._alert(
                    orphan,
                    f"Removing orphan {orphan.identity} ({orphan.identity_kind.value}"
                    f"{f' in {orphan.target}' if orphan.target else ''}) keeps failing after "
                    f"{orphan.alert_seconds}s: {reason}. It stays quarantined; the next sweep "
                    "retries it.",
                )
            raise ApplicationError(
                f"removing orphan {orphan.identity} failed: {reason}",
                type="OrphanRemovalFailed",
                non_retryable=True,
            ) from err
        await self._note(
            orphan,
            "orphan.deleted",
            "not in the inventory: removed after the grace period",
            {"removed": "; ".join(removed.removed), "kind": orphan.identity_kind.value},
        )
        return list(removed.removed)

    async def _remove_legacy(self, orphan: OrphanInput) -> list[str]:
        plan = orphan_plan(orphan, workflow.uuid4(), workflow.now())
        removed = await workflow.execute_activity_method(
            ProviderActivities.remove_identity,
            RemoveIdentity(plan=plan),
            start_to_close_timeout=PLATFORM_TIMEOUT,
            heartbeat_timeout=PLATFORM_HEARTBEAT,
            retry_policy=PLATFORM_REMOVAL_RETRY,
        )
        return list(removed.removed)

    async def _note(
        self, orphan: OrphanInput, event: str, reason: str, details: dict[str, str]
    ) -> OrphanNoted:
        info = workflow.info()
        noted: OrphanNoted = await workflow.execute_activity_method(
            SweepActivities.note_orphan,
            OrphanEvent(
                identity=orphan.identity,
                event=event,
                actor=orphan.found_by or "system:sweep",
                reason=reason,
                details={k: v for k, v in details.items() if v},
                key=f"{info.workflow_id}/{info.run_id}/{event}",
            ),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        return noted

    async def _alert(self, orphan: OrphanInput, text: str) -> None:
        try:
            await workflow.execute_activity_method(
                SlackActivities.send_alert,
                AlertPost(text=text, channel=orphan.security_channel),
                start_to_close_timeout=SLACK_TIMEOUT,
                retry_policy=SLACK_RETRY,
            )
        except ActivityError as err:
            workflow.logger.warning("orphan alert not sent: %s", failure_reason(err))
