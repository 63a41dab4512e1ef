"""Alert the security channel when a workflow task fails.

A workflow task that fails (a bug, a value the workflow code cannot handle, a nondeterministic
change) does not fail the run: Temporal retries the task for ever and the run sits stuck,
visible only in the worker's log. The SDK logs every such failure ("Failed activation on
workflow ...") on its worker logger with the workflow's details; this handler turns those
records into one Slack message per workflow per rate window, sent from a background thread so
the workflow's own thread never waits on Slack.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from slack_sdk import WebClient

log = logging.getLogger(__name__)

# The SDK's worker logger: its workflow modules log every workflow task failure through it
# ("Failed activation on workflow ..." with the workflow's details and a marker, or "Failed
# handling/completing activation ..." with the run id when the failure is outside the workflow).
SDK_LOGGER = "temporalio.worker"
TASK_FAILURE_MARKER = "__temporal_error_identifier"
TASK_FAILURE = "WorkflowTaskFailure"
FAILURE_PREFIXES = (
    "Failed activation on workflow",
    "Failed handling activation on workflow",
    "Failed completing activation on workflow",
)


class TaskFailureAlerts(logging.Handler):
    """A logging handler that alerts on workflow task failures, rate-limited per workflow.

    `per_workflow_seconds`: at most one alert per workflow id in that window (a stuck task is
    retried every few seconds); `max_per_window`: at most that many alerts in all per window,
    so a bad deploy failing every workflow cannot flood the channel.
    """

    def __init__(
        self,
        slack: WebClient | None,
        channel: str,
        *,
        per_workflow_seconds: float = 3600.0,
        max_per_window: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(level=logging.WARNING)
        self._slack = slack
        self._channel = channel
        self._per_workflow = per_workflow_seconds
        self._max = max_per_window
        self._clock = clock
        self._last: dict[str, float] = {}
        self._window: list[float] = []
        self._lock = threading.Lock()
        self._outbox: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._send_loop, name="task-alerts", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if getattr(record, TASK_FAILURE_MARKER, None) != TASK_FAILURE and not (
                message.startswith(FAILURE_PREFIXES)
            ):
                return
            details: Any = getattr(record, "temporal_workflow", None) or {}
            workflow_id = str(details.get("workflow_id") or message.rsplit(" ", 1)[-1])
            workflow_type = str(details.get("workflow_type", "workflow run"))
            error = _error_of(record)
            if not self._admit(workflow_id):
                return
            text = (
                f"Workflow task failure: {workflow_type} {workflow_id} is stuck retrying its "
                f"workflow task: {error}. The run does not progress until this is fixed."
            )
            log.error("workflow task failure alert: %s %s: %s", workflow_type, workflow_id, error)
            self._outbox.put(text)
        except Exception:  # a logging handler must never raise into the code that logged
            self.handleError(record)

    def _admit(self, workflow_id: str) -> bool:
        now = self._clock()
        with self._lock:
            last = self._last.get(workflow_id)
            if last is not None and now - last < self._per_workflow:
                return False
            self._window = [t for t in self._window if now - t < self._per_workflow]
            if len(self._window) >= self._max:
                return False
            self._last[workflow_id] = now
            self._window.append(now)
            return True

    def _send_loop(self) -> None:
        while True:
            text = self._outbox.get()
            try:
                if text is None:
                    return
                if self._slack is None:
                    log.error("ALERT to %s: %s", self._channel, text)
                    continue
                try:
                    self._slack.chat_postMessage(channel=self._channel, text=text)
                except Exception as err:  # Slack down: the log line above still stands
                    log.error("task failure alert not sent to %s: %s", self._channel, err)
            finally:
                self._outbox.task_done()

    def flush(self) -> None:
        """Wait until every queued alert has been sent (or given up)."""
        self._outbox.join()

    def close(self) -> None:
        self._outbox.put(None)
        self._thread.join(timeout=5)
        super().close()


def _error_of(record: logging.LogRecord) -> str:
    """The failure's type and message, one line, bounded (never the traceback)."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None:
        return record.getMessage()[:300]
    parts = [f"{type(exc).__name__}: {exc}"]
    cause = exc.__cause__
    if cause is not None and cause is not exc:
        parts.append(f"caused by {type(cause).__name__}: {cause}")
    return "; ".join(parts).replace("\n", " ")[:500]


def install_task_failure_alerts(slack: WebClient | None, channel: str) -> TaskFailureAlerts:
    """Attach the handler to the SDK's workflow logger (once per worker process)."""
    handler = TaskFailureAlerts(slack, channel)
    logging.getLogger(SDK_LOGGER).addHandler(handler)
    return handler
