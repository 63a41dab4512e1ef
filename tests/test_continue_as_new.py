"""A long-lived lifecycle continues as new when Temporal suggests it, carrying its state.

The dev server is started with the suggestion threshold lowered to 40 events, so a handful of
renewals is enough (the default is 4,096 events)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowExecutionStatus
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from models.contracts import (
    LifecycleAction,
    LifecycleView,
    Phase,
    ProvisionInput,
    RenewRequest,
)
from models.orm import AuditEvent, Nhi
from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.rules.ids import provision_workflow_id
from tests.conftest import binary
from tests.helpers import eventually, request_nhi, start_one_run
from worker import build_worker
from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id
from workflows.provision import ProvisionNhiWorkflow


@pytest_asyncio.fixture
async def small_history_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=binary("temporal"),
        dev_server_extra_args=[
            "--dynamic-config-value",
            "limit.historyCount.suggestContinueAsNew=40",
        ],
    )
    yield env
    await env.shutdown()


async def test_lifecycle_continues_as_new_with_its_state(
    small_history_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    env = small_history_env
    queue = f"can-{uuid.uuid4().hex[:8]}"
    _, nhi_id, _ = request_nhi(sessions, settings, "iam_role", ttl="10d")
    async with build_worker(env.client, settings, sessions, aws, task_queue=queue):
        # As the API starts it: the NHI's one run, provisioning first (its events count
        # toward the threshold; the next run must keep the NHI, never provision it again).
        handle = await start_one_run(env.client, ProvisionInput(nhi_id=nhi_id), queue)

        async def started() -> str:
            description = await handle.describe()
            await handle.query(NhiLifecycleWorkflow.view)
            return description.run_id

        first_run = await eventually(lambda: _swallow(started))
        views: list[LifecycleView] = []
        for days in range(11, 19):
            views.append(
                await handle.execute_update(
                    NhiLifecycleWorkflow.renew,
                    RenewRequest(actor="ana@example.com", extend_by_seconds=days * 86400),
                )
            )

        async def continued() -> LifecycleView:
            description = await handle.describe()
            assert description.run_id != first_run, "still the first run"
            return await handle.query(NhiLifecycleWorkflow.view)

        view = await eventually(lambda: _swallow(continued), timeout=30)
        assert view.phase is Phase.ACTIVE
        assert view.expires_at == views[-1].expires_at, "the renewed expiry survived"
        history = await handle.fetch_history()
        assert len(history.events) < 40
        scheduled = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events
            if e.HasField("activity_task_scheduled_event_attributes")
        ]
        assert "create_identity" not in scheduled, "the continued run provisioned again"
        with transaction(sessions) as session:
            activated = session.scalars(
                select(AuditEvent.event).where(
                    AuditEvent.subject_id == str(nhi_id), AuditEvent.event == "nhi.activated"
                )
            ).all()
        assert len(activated) == 1
        # The new run still answers updates.
        again = await handle.execute_update(
            NhiLifecycleWorkflow.renew,
            RenewRequest(actor="ana@example.com", extend_by_seconds=20 * 86400),
        )
        assert again.expires_at > view.expires_at


async def _swallow(check):  # type: ignore[no-untyped-def]
    try:
        return await check()
    except AssertionError:
        raise
    except Exception as err:  # the run is between activations or not started yet
        raise AssertionError(str(err)) from err


async def test_a_decommission_accepted_right_before_continue_as_new_is_carried_out(
    small_history_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
) -> None:
    """A rotation under way pushes history past the threshold; a decommission accepted during
    it is pending when the loop continues as new, and the next run carries it out."""
    env = small_history_env
    queue = f"can-{uuid.uuid4().hex[:8]}"
    _, nhi_id, _ = request_nhi(sessions, settings, "iam_user_key", ttl="10d")
    worker_aws = make_aws_clients(settings)
    staging = threading.Event()

    def slow_create_key(**_: Any) -> None:
        # A slow network on the rotation's CreateAccessKey: the step is under way long enough
        # for the decommission to arrive in the middle of it.
        staging.set()
        time.sleep(2)

    async with build_worker(env.client, settings, sessions, worker_aws, task_queue=queue):
        await env.client.execute_workflow(
            ProvisionNhiWorkflow.run,
            ProvisionInput(nhi_id=nhi_id),
            id=provision_workflow_id(nhi_id),
            task_queue=queue,
        )
        handle = env.client.get_workflow_handle_for(
            NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi_id)
        )

        async def started() -> str:
            description = await handle.describe()
            await handle.query(NhiLifecycleWorkflow.view)
            return description.run_id

        first_run = await eventually(lambda: _swallow(started))
        worker_aws.iam.meta.events.register("before-send.iam.CreateAccessKey", slow_create_key)
        rotating = await handle.execute_update(
            NhiLifecycleWorkflow.rotate, LifecycleAction(actor="ana@example.com")
        )
        assert rotating.message == "rotation started"
        await eventually(_flag(staging), timeout=30)
        accepted = await handle.execute_update(
            NhiLifecycleWorkflow.decommission,
            LifecycleAction(actor="security:oncall", reason="contain before the next run"),
        )
        assert accepted.message == "decommission started"

        async def quarantined_by_a_later_run() -> LifecycleView:
            description = await handle.describe()
            assert description.run_id != first_run, "still the first run"
            view = await handle.query(NhiLifecycleWorkflow.view)
            assert view.phase is Phase.QUARANTINED, view.phase
            return view

        view = await eventually(lambda: _swallow(quarantined_by_a_later_run), timeout=60)
        assert view.decommission_reason == "contain before the next run"
        with transaction(sessions) as session:
            nhi = session.get_one(Nhi, nhi_id)
            assert nhi.status == "quarantined"
            events = [
                (e, a)
                for e, a in session.execute(
                    select(AuditEvent.event, AuditEvent.actor)
                    .where(AuditEvent.subject_id == str(nhi_id))
                    .order_by(AuditEvent.id)
                )
            ]
        assert ("nhi.rotated", "api:ana@example.com") in events, "the rotation finished"
        assert ("nhi.quarantined", "api:security:oncall") in events
        # The first run continued as new before acting on the decommission (the case it covers).
        first = env.client.get_workflow_handle(lifecycle_workflow_id(nhi_id), run_id=first_run)
        scheduled = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            for e in (await first.fetch_history()).events
            if e.HasField("activity_task_scheduled_event_attributes")
        ]
        assert "promote_pending" in scheduled and "quarantine" not in scheduled, scheduled
        assert (await first.describe()).status is WorkflowExecutionStatus.CONTINUED_AS_NEW


def _flag(event: threading.Event):  # type: ignore[no-untyped-def]
    async def check() -> None:
        assert event.is_set()

    return check
