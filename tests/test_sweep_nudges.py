"""A sweep's nudge is bounded: a lifecycle that cannot take the update (its worker is gone, or
a long step holds it) fails the nudge with its reason within the attempt's timeout, so the
sweep records "failed: ..." and finishes instead of waiting on one lifecycle; the next sweep
asks again (workflows/sweep.py, patch `sweep-bounded-nudges`, NUDGE_RETRY)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.sweep import SupervisionActivities
from models.contracts import LifecycleInput, LifecycleNudge
from nhi.infra.config import Settings
from nhi.rules.ids import LIFECYCLE_WORKFLOW, lifecycle_workflow_id


async def test_a_nudge_the_lifecycle_cannot_take_fails_with_its_reason(
    dev_env: WorkflowEnvironment, sessions: sessionmaker[Session], settings: Settings
) -> None:
    nhi_id = uuid.uuid4()
    # A lifecycle whose workers are all gone: it runs, but no update of it is ever accepted.
    handle = await dev_env.client.start_workflow(
        LIFECYCLE_WORKFLOW,
        LifecycleInput(nhi_id=nhi_id),
        id=lifecycle_workflow_id(nhi_id),
        task_queue=f"no-worker-{uuid.uuid4().hex[:8]}",
    )
    try:
        env = ActivityEnvironment(client=dev_env.client)
        env.info = dataclasses.replace(env.info, start_to_close_timeout=timedelta(seconds=8))
        nudge = LifecycleNudge(
            nhi_id=nhi_id, action="decommission", reason="sweep: test", sweep_id=uuid.uuid4()
        )
        started = time.monotonic()
        with pytest.raises(ApplicationError) as refused:
            await env.run(SupervisionActivities(sessions, settings).nudge_lifecycle, nudge)
        waited = time.monotonic() - started
        assert refused.value.type == "LifecycleBusy"
        assert "did not accept decommission within 3 s" in str(refused.value)
        # Gave up before the attempt's own timeout (8 s), so the failure carries the reason.
        assert 3 <= waited < 8, waited
    finally:
        await handle.terminate("test over")
