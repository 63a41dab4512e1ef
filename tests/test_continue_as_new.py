"""A long-lived lifecycle continues as new when Temporal suggests it, carrying its state.

The dev server is started with the suggestion threshold lowered to 40 events, so a handful of
renewals is enough (the default is 4,096 events)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest_asyncio
from sqlalchemy.orm import Session, sessionmaker
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from models.contracts import LifecycleView, Phase, ProvisionInput, RenewRequest
from nhi.aws import AwsClients
from nhi.config import Settings
from nhi.temporal import provision_workflow_id
from tests.conftest import binary
from tests.helpers import eventually, request_nhi
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
