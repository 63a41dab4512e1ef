"""Readiness checks shared by the API and the worker: each dependency named, with its state and
how long it took to answer.

`/healthz` (liveness) checks nothing: it answers while the process serves, so an orchestrator
restarts a process only when the process itself is stuck, never because a dependency is down.
`/readyz` runs these checks; any check not `up` makes it 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest, GetSystemInfoRequest
from temporalio.client import Client

from nhi.infra.config import Settings

log = logging.getLogger("nhi.infra.health")

# Each check gets this long: a readiness probe must answer before the orchestrator's own
# timeout (the manifests use 5 s) even with two checks in a row.
CHECK_TIMEOUT = 2.0
UP, DOWN, UNKNOWN = "up", "down", "unknown"
TASK_TYPES = {
    "workflow": TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
    "activity": TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
}


class NotReady(Exception):
    """A dependency answered, but not as a ready service would (the message says how)."""


@dataclass(frozen=True)
class Check:
    """One dependency's state as `/readyz` reports it."""

    name: str
    state: str
    latency_ms: float
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        """The check as JSON: state, latency and, when there is one, why."""
        out: dict[str, Any] = {"state": self.state, "latency_ms": self.latency_ms}
        if self.detail:
            out["detail"] = self.detail
        return out


async def timed(
    name: str, probe: Callable[[], Awaitable[str | None]], timeout: float = CHECK_TIMEOUT
) -> Check:
    """Run `probe` under a deadline. Errors are logged here and reported only by type: the
    answer is unauthenticated and must not carry host names or server messages."""
    started = time.perf_counter()

    def elapsed() -> float:
        return round((time.perf_counter() - started) * 1000, 1)

    try:
        detail = await asyncio.wait_for(probe(), timeout)
    except TimeoutError:
        return Check(name, DOWN, elapsed(), f"no answer within {timeout:g} s")
    except NotReady as err:
        return Check(name, DOWN, elapsed(), str(err))
    except Exception as err:
        # One line, no traceback: during an outage every probe lands here.
        log.warning("readiness: %s is down: %s: %s", name, type(err).__name__, err)
        return Check(name, DOWN, elapsed(), f"unreachable ({type(err).__name__})")
    return Check(name, UP, elapsed(), detail or "")


def skipped(name: str, because: str) -> Check:
    """A check that could not run because another dependency is down."""
    return Check(name, UNKNOWN, 0.0, because)


async def temporal_answers(client: Client) -> None:
    """One cheap frontend RPC, no retries."""
    await client.workflow_service.get_system_info(
        GetSystemInfoRequest(), timeout=timedelta(seconds=CHECK_TIMEOUT)
    )


def poller_window(settings: Settings) -> timedelta:
    """How recent a poll must be for its worker to count as live. A poller's last access is
    when its current long poll started: the server holds an idle poll for about a minute
    (measured 55-60 s on the dev server), so a live idle worker can look up to a minute old;
    one older than `NHI_WORKER_POLL_FRESH_SECONDS` (default 90 s) has stopped."""
    return timedelta(seconds=settings.worker_poll_fresh_seconds)


async def recent_pollers(client: Client, task_queue: str, fresh: timedelta) -> dict[str, list[str]]:
    """Identities that polled `task_queue` within `fresh`, per task type (workflow, activity)."""
    found: dict[str, list[str]] = {}
    now = datetime.now(UTC)
    for name, task_type in TASK_TYPES.items():
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=task_queue),
                task_queue_type=task_type,
            ),
            timeout=timedelta(seconds=CHECK_TIMEOUT),
        )
        found[name] = [
            p.identity
            for p in response.pollers
            if p.HasField("last_access_time") and now - p.last_access_time.ToDatetime(UTC) <= fresh
        ]
    return found


def require_pollers(
    found: dict[str, list[str]], fresh: timedelta, identity: str | None = None
) -> str:
    """Every task type has a poller (this `identity`'s own, when given); else NotReady."""
    missing = [
        kind
        for kind, identities in found.items()
        if not identities or (identity is not None and identity not in identities)
    ]
    window = int(fresh.total_seconds())
    if missing:
        who = "this worker" if identity else "no worker"
        raise NotReady(f"{who} polled {' or '.join(missing)} tasks in the last {window} s")
    return ", ".join(f"{len(ids)} {kind}" for kind, ids in found.items()) + " poller(s)"


def report(checks: Iterable[Check]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 when every check is up, else 503 naming the ones that are not."""
    listed = list(checks)
    down = [c.name for c in listed if c.state != UP]
    body: dict[str, Any] = {
        "status": "not ready" if down else "ready",
        "checks": {c.name: c.as_json() for c in listed},
    }
    if down:
        body["down"] = down
    return (503 if down else 200), body
