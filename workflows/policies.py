"""Named timeouts and retry policies, one per dependency (never inline literals)."""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

DB_TIMEOUT = timedelta(seconds=30)
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
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
PLATFORM_REMOVAL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
    maximum_attempts=25,
)

# Proving a new key or a quarantine: IAM is eventually consistent (AWS advises up to ~2 minutes).
VERIFY_TIMEOUT = timedelta(seconds=30)
VERIFY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=1.5,
    maximum_interval=timedelta(seconds=20),
    maximum_attempts=12,
    non_retryable_error_types=["WrongIdentity"],
)

SLACK_TIMEOUT = timedelta(seconds=30)
# People-facing messages must never hold up a revocation: a few tries, then the workflow logs
# the failure and moves on.
SLACK_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
)


def failure_reason(err: BaseException) -> str:
    """The innermost message of an activity failure (the activity's own classified error)."""
    while isinstance(err, ActivityError) and err.cause is not None:
        err = err.cause
    return str(err) or type(err).__name__
