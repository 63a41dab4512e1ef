"""Shared plumbing for sync activities: background heartbeats and error classification."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from botocore.exceptions import ClientError
from temporalio import activity
from temporalio.exceptions import ApplicationError

# AWS answers that no retry can change: the request itself is wrong or not permitted.
PERMANENT_AWS_ERRORS = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnauthorizedOperation",
        "InvalidClientTokenId",
        "MalformedPolicyDocument",
        "MalformedPolicyDocumentException",
        "InvalidInput",
        "ValidationError",
        "ValidationException",
        "InvalidParameterException",
        "LimitExceeded",
        "LimitExceededException",
        "EntityAlreadyExists",
    }
)
# AWS answers a later try can get past: throttling and service trouble, and conflicts that
# clear once someone (or an eventually consistent IAM) catches up. Any code in neither table
# is retried too: a removal must not give up on an answer nobody has classified yet.
RETRYABLE_AWS_ERRORS = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ServiceFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "InternalError",
        "InternalServiceError",
        "InternalServiceErrorException",
        "RequestTimeout",
        "RequestTimeoutException",
        "DeleteConflict",
        "ConcurrentModification",
        "ConcurrentModificationException",
        "EntityTemporarilyUnmodifiable",
        "NoSuchEntity",
        "ResourceNotFoundException",
    }
)
# The type of an AWS error that carried no code at all (a proxy's bare 5xx, say).
UNKNOWN_AWS_ERROR = "AwsError"


@contextmanager
def heartbeating(interval: float = 5.0) -> Iterator[None]:
    """Heartbeat from a helper thread while a blocking activity body runs.

    A worker that dies mid-call stops heartbeating, so Temporal retries the activity on another
    worker after the heartbeat timeout instead of waiting out start-to-close. The thread runs in
    a copy of the activity's context, which is where `activity.heartbeat` finds its activity.
    """
    stop = threading.Event()
    context = contextvars.copy_context()

    def beat() -> None:
        while not stop.wait(interval):
            activity.heartbeat()

    thread = threading.Thread(target=context.run, args=(beat,), daemon=True)
    activity.heartbeat()
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def aws_code(err: ClientError) -> str:
    """The AWS error code of a botocore ClientError."""
    return str(err.response.get("Error", {}).get("Code", ""))


def aws_message(err: ClientError) -> str:
    """The AWS error message of a botocore ClientError (never holds request parameters)."""
    return str(err.response.get("Error", {}).get("Message", ""))


def classify_aws(err: ClientError, doing: str, *, hint: str | None = None) -> ApplicationError:
    """A new ApplicationError for an AWS error, whatever the code: never `err` itself.

    Raised `from err`, the botocore error stays the cause. (Returning `err` for retryable codes
    and raising it `from err` made it its own cause, and Temporal's failure converter recursed
    until RecursionError, losing the code.) The type is the AWS code and the SDK writes an
    ApplicationError as "Type: message", so `str()` of it (what `failure_reason` gives the
    inventory reason, the audit trail and alerts) reads "Code: message (doing)"; the details
    carry code and message for tools. `hint` tells the operator what to do about a known
    blocker.
    """
    code = aws_code(err) or UNKNOWN_AWS_ERROR
    message = aws_message(err) or str(err)
    text = f"{message} ({doing})"
    if hint:
        text += f". {hint}"
    return ApplicationError(
        text,
        {"code": code, "message": message, "operation": err.operation_name, "doing": doing},
        type=code,
        non_retryable=code in PERMANENT_AWS_ERRORS,
    )
