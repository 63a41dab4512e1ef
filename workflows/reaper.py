"""The task reaper: ends expired task credentials, and those of quarantined or removed NHIs.

Started by the Temporal Schedule `nhi-task-reaper` every `NHI_TASK_REAPER_INTERVAL_SECONDS`
(overlap SKIP: a run still going when the next is due is not doubled). Each run takes batches
(`ReaperActivities.reap_task_credentials`) until none is left or `max_batches` have run, so
its history stays small; what is left waits for the next run. Credentials whose login role
could not be dropped become `reap_failed` and are retried every run; the security channel is
told once per credential, when it first fails. A batch that keeps failing (the inventory
database down) fails the run: the next run starts over.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.reaper import (
        ReapBatch,
        ReaperActivities,
        ReaperInput,
        ReaperOutcome,
        ReapFailure,
        ReapInput,
        merge,
    )
    from activities.slack import SlackActivities
    from models.contracts import AlertPost
    from workflows.retry_policies import (
        REAPER_HEARTBEAT,
        REAPER_RETRY,
        REAPER_TIMEOUT,
        SLACK_RETRY,
        SLACK_TIMEOUT,
        failure_reason,
    )

# Failures listed in one alert; the rest are counted (they are all in the inventory).
ALERT_LINES = 20


@workflow.defn
class TaskReaperWorkflow:
    """Batches until done, one alert per batch with new failures."""

    @workflow.run
    async def run(self, inp: ReaperInput) -> ReaperOutcome:
        """Returns the run's totals."""
        outcome = ReaperOutcome()
        batch = ReapBatch()
        for _ in range(inp.max_batches):
            batch = await workflow.execute_activity_method(
                ReaperActivities.reap_task_credentials,
                ReapInput(batch_size=inp.batch_size, after=batch.next),
                start_to_close_timeout=REAPER_TIMEOUT,
                heartbeat_timeout=REAPER_HEARTBEAT,
                retry_policy=REAPER_RETRY,
            )
            outcome = ReaperOutcome(
                batches=outcome.batches + 1,
                ended=merge(outcome.ended, batch.ended.items()),
                reap_failed=merge(outcome.reap_failed, batch.reap_failed.items()),
                reasons=merge(outcome.reasons, batch.reasons.items()),
                new_failures=outcome.new_failures + len(batch.failures),
            )
            if batch.failures:
                await self._alert(batch.failures)
            if batch.next is None:
                break
        return outcome

    async def _alert(self, failures: list[ReapFailure]) -> None:
        lines = [
            f"• {f.name}{f' on {f.target}' if f.target else ''} (task credential "
            f"{f.credential_id} of NHI {f.nhi_id}): {f.error}"
            for f in failures[:ALERT_LINES]
        ]
        if len(failures) > ALERT_LINES:
            lines.append(f"… and {len(failures) - ALERT_LINES} more (status reap_failed)")
        text = (
            f"The task reaper could not drop {len(failures)} task credential role(s). Their "
            "logins are refused (expired or NOLOGIN) but the roles remain; every run retries "
            "them:\n" + "\n".join(lines)
        )
        try:
            await workflow.execute_activity_method(
                SlackActivities.send_alert,
                AlertPost(text=text, security=True),
                start_to_close_timeout=SLACK_TIMEOUT,
                retry_policy=SLACK_RETRY,
            )
        except ActivityError as err:
            workflow.logger.warning("reaper alert not sent: %s", failure_reason(err))
