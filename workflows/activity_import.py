"""The activity import (issue 17): one activity imports the files and starts auto-containment
(activities/activity_import.py); then each new finding worth an alert (the first per NHI and
kind within `NHI_FINDING_ALERT_WINDOW_SECONDS`) goes to the agent's owner and the security
channel, one recipient per activity.

Started by the Temporal Schedule `nhi-activity-import` (when `NHI_ACTIVITY_S3_PREFIX` is set;
overlap SKIP) and by `POST /v1/activity/imports` (`nhi activity import`). A file that cannot be
read is reported in the outcome and to the security channel; it changed nothing.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.activity_import import (
        ActivityImportActivities,
        ActivityImportInput,
        FindingAlert,
        ImportOutcome,
    )
    from activities.slack import SlackActivities
    from models.contracts import AlertPost
    from workflows.retry_policies import (
        IMPORT_HEARTBEAT,
        IMPORT_RETRY,
        IMPORT_TIMEOUT,
        SLACK_RETRY,
        SLACK_TIMEOUT,
        failure_reason,
    )


def alert_text(alert: FindingAlert) -> str:
    return (
        f":rotating_light: {alert.severity.upper()} activity finding on {alert.nhi_name} "
        f"(agent {alert.agent_name}): {alert.summary}. Finding {alert.finding_id}; acknowledge "
        f"with `nhi findings ack {alert.finding_id} --reason ...`."
    )


@workflow.defn
class ActivityImportWorkflow:
    """Import, then alert."""

    @workflow.run
    async def run(self, inp: ActivityImportInput) -> ImportOutcome:
        """Returns the import's outcome."""
        outcome = await workflow.execute_activity_method(
            ActivityImportActivities.import_activity,
            inp,
            start_to_close_timeout=IMPORT_TIMEOUT,
            heartbeat_timeout=IMPORT_HEARTBEAT,
            retry_policy=IMPORT_RETRY,
        )
        await alert_outcome(outcome)
        return outcome


async def alert_outcome(outcome: ImportOutcome) -> None:
    """Each new finding worth an alert to the agent's owner and the security channel, and the
    files that could not be read to the security channel (an activity per recipient)."""
    for alert in outcome.alerts:
        text = alert_text(alert)
        await _send(AlertPost(text=text, email=alert.owner_email))
        await _send(AlertPost(text=text, security=True))
    if outcome.failed_files:
        failed = [f"• {f.name}: {f.error}" for f in outcome.files if f.error]
        await _send(
            AlertPost(
                text=f"The activity import could not read {outcome.failed_files} file(s); "
                "nothing of them was imported:\n" + "\n".join(failed[:20]),
                security=True,
            )
        )


async def _send(post: AlertPost) -> None:
    try:
        await workflow.execute_activity_method(
            SlackActivities.send_alert,
            post,
            start_to_close_timeout=SLACK_TIMEOUT,
            retry_policy=SLACK_RETRY,
        )
    except ActivityError as err:
        workflow.logger.warning("finding alert not sent: %s", failure_reason(err))
