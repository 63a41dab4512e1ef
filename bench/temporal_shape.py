"""Temporal alone, in the shape of one provisioning: the floor under the durable path.

Ours, one run per NHI: what ours asks of Temporal and of the Python SDK for one `iam_role`,
and nothing more: the provisioning steps (patch markers, a local activity, an activity, a
local activity, two search-attribute upserts), then the lifecycle's timer, in one run (ours also
loads the lifecycle's configuration, one more local activity in the same workflow task). No
database, no AWS, no API: each activity returns its argument. The two workflows ours had before
one-run provisioning are kept for comparison: a provisioning run (two upserts, a child workflow
started and abandoned) and the lifecycle it starts (a patch marker, an upsert, a local
activity, a timer it then waits on). They run on their own worker process
(`python -m bench.temporal_shape ADDRESS TASK_QUEUE`, built as `worker.py` builds ours: same
data converter, sandbox, slots and cache) against the same dev server, in the same run, and are
started the way the API starts ours (32 in flight, with the NHI's search attributes).

What it answers: how much of ours' CPU per NHI the workflow shape itself costs (the Temporal
server, and the SDK's sandbox, activations and payloads in the worker), which no change to the
activities, the inventory or the API can remove; only a different shape (fewer runs, fewer
workflow tasks) can. The benchmark reads one history of each back from the server and reports
both event counts, so the shape can be checked against ours.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.common import TypedSearchAttributes
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from models.contracts import LifecycleInput, NhiRef
    from models.enums import NhiKind, NhiStatus, Platform
    from nhi.rules import search_attributes as sa

SHAPE_PROVISION = "BenchShapeProvision"
SHAPE_LIFECYCLE = "BenchShapeLifecycle"
SHAPE_ONE_RUN = "BenchShapeOneRun"
STEP = timedelta(seconds=30)
# Ours records this many patch markers in a provisioning run of today's code, and one in its
# lifecycle's first task (read from the benchmark's own histories; see `compare`).
PROVISION_PATCHES = 4
LIFECYCLE_PATCHES = 1
# Where ours passes the worker's settings (worker.py): the SDK's defaults otherwise.
ACTIVITY_SLOTS = 32
LOCAL_ACTIVITY_SLOTS = 16
CACHED_WORKFLOWS = 400


@activity.defn(name="bench_shape_step")
def step(ref: NhiRef) -> NhiRef:
    """An inventory step that does nothing (run as a local activity, as ours)."""
    return ref


@activity.defn(name="bench_shape_platform")
def platform_call(ref: NhiRef) -> NhiRef:
    """A platform call that does nothing (run as an activity, as ours)."""
    return ref


LIFECYCLE_PREFIX = "bench-shape-lifecycle-"


def lifecycle_id(nhi_id: uuid.UUID) -> str:
    return f"{LIFECYCLE_PREFIX}{nhi_id}"


def nhi_of(lifecycle_workflow_id: str) -> uuid.UUID:
    return uuid.UUID(lifecycle_workflow_id.removeprefix(LIFECYCLE_PREFIX))


def provision_id(nhi_id: uuid.UUID) -> str:
    return f"bench-shape-provision-{nhi_id}"


async def first_steps(name: str, patches: int, status: NhiStatus, ref: NhiRef) -> None:
    """What each of ours does first: its patch markers, a status upsert, an inventory step."""
    for i in range(patches):
        workflow.patched(f"{name}-{i}")
    workflow.upsert_search_attributes(sa.status_updates(status))
    await workflow.execute_local_activity(step, ref, start_to_close_timeout=STEP)


async def provisioning_steps(name: str, ref: NhiRef) -> None:
    """A provisioning run's steps up to `active`: first steps, the platform call, the inventory
    step that records it, the status upsert."""
    await first_steps(name, PROVISION_PATCHES, NhiStatus.PROVISIONING, ref)
    await workflow.execute_activity(platform_call, ref, start_to_close_timeout=STEP)
    await workflow.execute_local_activity(step, ref, start_to_close_timeout=STEP)
    workflow.upsert_search_attributes(sa.status_updates(NhiStatus.ACTIVE))


@workflow.defn(name=SHAPE_LIFECYCLE)
class ShapeLifecycle:
    @workflow.run
    async def run(self, inp: LifecycleInput) -> None:
        ref = NhiRef(nhi_id=inp.nhi_id)
        await first_steps(SHAPE_LIFECYCLE, LIFECYCLE_PATCHES, NhiStatus.ACTIVE, ref)
        await workflow.sleep(timedelta(days=30))


@workflow.defn(name=SHAPE_PROVISION)
class ShapeProvision:
    @workflow.run
    async def run(self, ref: NhiRef) -> None:
        await provisioning_steps(SHAPE_PROVISION, ref)
        await workflow.start_child_workflow(
            ShapeLifecycle.run,
            LifecycleInput(nhi_id=ref.nhi_id),
            id=lifecycle_id(ref.nhi_id),
            parent_close_policy=ParentClosePolicy.ABANDON,
            search_attributes=workflow.info().typed_search_attributes,
        )


@workflow.defn(name=SHAPE_ONE_RUN)
class ShapeOneRun:
    """One run from request to deletion: the provisioning run's steps, then the lifecycle's
    wait (its own first task, patch marker, upsert and inventory step folded away)."""

    @workflow.run
    async def run(self, ref: NhiRef) -> None:
        await provisioning_steps(SHAPE_ONE_RUN, ref)
        await workflow.sleep(timedelta(days=30))


def one_run_id(nhi_id: uuid.UUID) -> str:
    return f"bench-shape-one-run-{nhi_id}"


def attributes(nhi_id: uuid.UUID, agent_id: uuid.UUID) -> TypedSearchAttributes:
    """What the API starts a provisioning run with."""
    return sa.nhi_attributes(
        nhi_id=nhi_id,
        agent_id=agent_id,
        owner="bench@example.com",
        team="bench",
        platform=Platform.AWS,
        kind=NhiKind.IAM_ROLE,
        status=NhiStatus.REQUESTED,
        expires_at=datetime.now(UTC) + timedelta(days=30),
    )


async def serve(address: str, task_queue: str) -> None:
    """The shape's worker: configured as `worker.build_worker` configures ours."""
    from temporalio.worker import Worker

    from nhi.infra.config import Settings
    from nhi.infra.temporal_client import connect

    settings = Settings(temporal_address=address, temporal_task_queue=task_queue, _env_file=None)
    client = await connect(settings)
    with ThreadPoolExecutor(ACTIVITY_SLOTS + LOCAL_ACTIVITY_SLOTS) as executor:
        worker = Worker(
            client,
            task_queue=task_queue,
            workflows=[ShapeProvision, ShapeLifecycle, ShapeOneRun],
            activities=[step, platform_call],
            activity_executor=executor,
            max_concurrent_activities=ACTIVITY_SLOTS,
            max_concurrent_local_activities=LOCAL_ACTIVITY_SLOTS,
            max_cached_workflows=CACHED_WORKFLOWS,
        )
        await worker.run()


async def start_all(
    client: Any, task_queue: str, n: int, in_flight: int, *, one_run: bool = False
) -> dict[str, float]:
    """Start `n` shape provisionings (or one-run shapes), `in_flight` at a time; when each was
    sent, by the id of the lifecycle it starts (of the one run)."""
    agent_id = uuid.uuid4()
    pending = [uuid.uuid4() for _ in range(n)]
    sent: dict[str, float] = {}

    async def sender() -> None:
        while pending:
            nhi_id = pending.pop()
            sent[one_run_id(nhi_id) if one_run else lifecycle_id(nhi_id)] = time.time()
            await client.start_workflow(
                SHAPE_ONE_RUN if one_run else SHAPE_PROVISION,
                NhiRef(nhi_id=nhi_id),
                id=one_run_id(nhi_id) if one_run else provision_id(nhi_id),
                task_queue=task_queue,
                search_attributes=attributes(nhi_id, agent_id),
            )

    await asyncio.gather(*(sender() for _ in range(in_flight)))
    return sent


LIFECYCLES = f"WorkflowType = '{SHAPE_LIFECYCLE}'"


async def wait_started(client: Any, n: int, timeout: float) -> bool:
    """Until `n` shape lifecycles run (each provisioning handed over); False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await client.count_workflows(LIFECYCLES)).count >= n:
            return True
        await asyncio.sleep(0.2)
    return False


ONE_RUNS_ACTIVE = f"WorkflowType = '{SHAPE_ONE_RUN}' AND {sa.NHI_STATUS.name} = 'active'"


async def wait_active(client: Any, n: int, timeout: float) -> list[float]:
    """Until `n` one-run shapes are `active` (visibility, polled every 0.2 s): when each was
    first seen so (one run's time to active has no event of its own to read, as a
    lifecycle's start is); the times found so far on timeout."""
    deadline = time.monotonic() + timeout
    seen: list[float] = []
    while len(seen) < n and time.monotonic() < deadline:
        count = (await client.count_workflows(ONE_RUNS_ACTIVE)).count
        seen += [time.time()] * (min(count, n) - len(seen))
        if len(seen) < n:
            await asyncio.sleep(0.2)
    return seen


async def start_times(client: Any) -> dict[str, float]:
    """When each shape lifecycle started (the server's clock, from visibility)."""
    return {w.id: w.start_time.timestamp() async for w in client.list_workflows(LIFECYCLES)}


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2]))
