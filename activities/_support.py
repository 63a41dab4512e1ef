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


def classify_aws(err: ClientError, doing: str) -> Exception:
    """A permanent AWS error becomes a non-retryable ApplicationError; others stay retryable."""
    code = aws_code(err)
    message = str(err.response.get("Error", {}).get("Message", ""))
    if code in PERMANENT_AWS_ERRORS:
        return ApplicationError(f"{doing}: {code}: {message}", type=code, non_retryable=True)
    return err
