"""Named timeouts and retry policies, one per dependency (never inline literals)."""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError
from temporalio.exceptions import TimeoutError as TemporalTimeout

DB_TIMEOUT = timedelta(seconds=30)
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=20,
    non_retryable_error_types=["NotFound", "InvalidState", "PolicyViolation"],
)
# A sweep's nudge waits for the lifecycle to accept its update, which waits for the step under
# way (a removal may retry for minutes): a few bounded tries, then the finding says the nudge
# failed and the next sweep nudges again, instead of one sweep waiting on one lifecycle.
NUDGE_TIMEOUT = timedelta(seconds=60)
NUDGE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=3,
    non_retryable_error_types=["NotFound", "InvalidState", "PolicyViolation"],
)
# Writes that only record something went wrong (the failure itself may be the database's):
# a few tries, never holding up the lifecycle.
DB_BEST_EFFORT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=3,
    non_retryable_error_types=["NotFound", "InvalidState", "PolicyViolation"],
)

# The inventory steps run as local activities on today's code (patch `local-inventory-steps`,
# issue 15): one short transaction each, run by the worker in the workflow task that reaches it,
# so no activity task travels through the server and no workflow task follows it. An attempt is
# bounded tighter than DB_TIMEOUT (a stuck one holds its workflow task; the worker heartbeats
# that task meanwhile, on its own thread). The first retry comes after 0.1 s: the first step
# runs the moment the workflow starts, often before the API's lease commit lands, which a
# retry 1 s later would add to every provisioning; provisioning still waits about 25 s for that
# commit in all (activities/db.py, LOCAL_LEASE_COMMIT_ATTEMPTS).
DB_LOCAL_TIMEOUT = timedelta(seconds=10)
DB_LOCAL_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=20,
    non_retryable_error_types=["NotFound", "InvalidState", "PolicyViolation"],
)

PLATFORM_TIMEOUT = timedelta(minutes=2)
# Long enough for botocore's own throttling backoff between heartbeats, short enough that a
# crashed worker's activity moves to another worker quickly.
PLATFORM_HEARTBEAT = timedelta(seconds=15)
PLATFORM_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=10,
)
# Removal must not give up quickly: what it leaves behind is a live credential. Once even this
# is exhausted the NHI becomes `revoke_failed`, which is visible and retried by sweeps.
# (Provisioning's compensation and the sweeps' orphan removal still use it; the lifecycle bounds
# its removals by time instead, see REMOVAL_RETRY.)
PLATFORM_REMOVAL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
    maximum_attempts=25,
)
# The lifecycle's removals: retried until `NHI_REVOKE_ALERT_SECONDS` have passed (the activity's
# schedule-to-close timeout, see removal_window), not for a number of attempts. A removal that
# keeps failing must reach `revoke_failed` and an alert within minutes, not after the ~90
# minutes 25 backed-off attempts take; the lifecycle then retries every revoke retry period.
REMOVAL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
)

# The task reaper: one batch of expired task credentials per activity (their roles dropped on
# each target in one transaction). A batch that fails is tried a few times; the schedule runs
# the reaper again within NHI_TASK_REAPER_INTERVAL_SECONDS anyway, so retrying longer would
# only overlap the next run.
REAPER_TIMEOUT = timedelta(minutes=2)
REAPER_HEARTBEAT = timedelta(seconds=15)
REAPER_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=3,
)

# The activity import (workflows/activity_import.py): a long file is read in one activity that
# heartbeats; a worker lost mid-file is noticed within IMPORT_HEARTBEAT and the file is
# imported again from its start (its transaction never committed).
IMPORT_TIMEOUT = timedelta(hours=2)
IMPORT_HEARTBEAT = timedelta(seconds=60)
IMPORT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
    maximum_attempts=5,
)

# A lifecycle step whose activity failed (a poisoned value, a dependency down for longer than
# its retries) is recorded and tried again this much later; the run itself never fails.
STEP_RETRY_DELAY = timedelta(minutes=15)

# Proving a new key or a quarantine: IAM is eventually consistent (AWS advises up to ~2 minutes).
VERIFY_TIMEOUT = timedelta(seconds=30)
VERIFY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=1.5,
    maximum_interval=timedelta(seconds=20),
    maximum_attempts=12,
    non_retryable_error_types=["WrongIdentity"],
)

# Containment of an agent (issue 17): one pass must end within seconds, so the incident shows
# what holds and what does not; whatever a pass leaves live is tried again every
# CONTAIN_RETRY_DELAY until it holds (containment never gives up, and never weakens).
CONTAIN_PLATFORM_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=4,
)
# IAM is eventually consistent: a verification read right after the quarantine may lag.
CONTAIN_VERIFY_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=1.5,
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=6,
    non_retryable_error_types=["WrongIdentity", "InvalidPlan"],
)
CONTAIN_TIMEOUT = timedelta(seconds=60)
# Asking a lifecycle to hold, ending task credentials, trying credentials, recording a pass.
CONTAIN_STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=4,
    non_retryable_error_types=["NotFound", "InvalidPlan", "NoProvider"],
)
CONTAIN_RETRY_DELAY = timedelta(seconds=60)

SLACK_TIMEOUT = timedelta(seconds=30)
# People-facing messages must never hold up a revocation: a few tries, then the workflow logs
# the failure and moves on.
SLACK_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
)


def removal_window(alert_seconds: int) -> timedelta:
    """How long one removal attempt series may run before the NHI is `revoke_failed`."""
    return timedelta(seconds=max(alert_seconds, 1))


def failure_reason(err: BaseException) -> str:
    """The innermost message of an activity failure (the activity's own classified error).

    A retry budget that ran out by time ends in a timeout whose cause is the last attempt's
    failure: that failure (the platform's code and message) is the reason, not the timeout.
    """
    while isinstance(err, ActivityError | TemporalTimeout) and err.cause is not None:
        err = err.cause
    return str(err) or type(err).__name__
