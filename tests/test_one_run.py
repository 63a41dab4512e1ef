"""One run per NHI (issue 15): the lifecycle provisions its NHI as its first phase, on
Temporal's time-skipping test server with real activities against Postgres and a moto server
over HTTP.

The same steps as `ProvisionNhiWorkflow` (workflows/provisioning.py), so the same outcomes:
approval by someone other than the requester, compensation on failure, denial and
cancellation; what differs is the shape (one run, no child start) and that nothing acts on the
NHI before it is active. Failures during provisioning run in both shapes in
test_provision_workflow.py, test_preactive.py and test_crash.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.contain import ContainActivities, HoldLifecycle
from models.contracts import (
    ApprovalDecision,
    LifecycleAction,
    LifecycleView,
    Phase,
    ProvisionInput,
    RenewRequest,
)
from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.rules.ids import lifecycle_workflow_id, provision_workflow_id
from nhi.services import agents, incidents
from nhi.services.target_registry import TargetRegistry
from tests.helpers import SENSITIVE_SCOPE, eventually, nhi_row, request_nhi, start_one_run
from worker import build_worker
from workflows.lifecycle import NhiLifecycleWorkflow

OWNER = "ana@example.com"

Handle = WorkflowHandle[Any, LifecycleView]


async def _life(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    inp: ProvisionInput,
    during: Callable[[Handle], Awaitable[None]],
) -> None:
    """Start the NHI's one run with its provisioning request and call `during` with it while
    a worker runs it (the clock stands still unless `during` waits on a result)."""
    queue = f"q-{uuid.uuid4().hex}"
    async with build_worker(env.client, settings, sessions, aws, task_queue=queue):
        handle = await start_one_run(env.client, inp, queue)
        await during(handle)


async def _active(sessions: sessionmaker[Session], nhi_id: uuid.UUID) -> None:
    async def check() -> None:
        assert nhi_row(sessions, nhi_id).status == "active"

    await eventually(check)


async def _view(handle: Handle) -> LifecycleView:
    """The run's view once it has loaded the NHI it provisioned (the query fails before)."""

    async def loaded() -> LifecycleView:
        try:
            return await handle.query(NhiLifecycleWorkflow.view)
        except WorkflowQueryFailedError as err:
            raise AssertionError(str(err)) from err

    return await eventually(loaded)


def _event_types(events: Any) -> list[int]:
    return [e.event_type for e in events]


async def test_one_run_provisions_the_nhi_keeps_it_and_removes_it(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    _, nhi_id, _ = request_nhi(sessions, settings, "iam_user_key")
    name = nhi_row(sessions, nhi_id).name

    async def during(handle: Handle) -> None:
        with ts_env.auto_time_skipping_disabled():
            await _active(sessions, nhi_id)
            view = await _view(handle)
        assert view.phase is Phase.ACTIVE
        nhi = nhi_row(sessions, nhi_id)
        assert nhi.workflow_id == lifecycle_workflow_id(nhi_id), "the run that keeps it"
        secret = json.loads(
            aws.secrets.get_secret_value(SecretId=nhi.credential_ref)["SecretString"]
        )
        (key,) = aws.iam.list_access_keys(UserName=name)["AccessKeyMetadata"]
        assert secret["AccessKeyId"] == key["AccessKeyId"]
        history = await handle.fetch_history()
        types = _event_types(history.events)
        assert EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED not in types
        # This one history holds the provisioning (its two platform calls) and the lifecycle
        # (waiting on its next deadline).
        scheduled = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        ]
        assert scheduled == ["create_identity", "deliver_credential"]
        assert EventType.EVENT_TYPE_TIMER_STARTED in types
        with pytest.raises(RPCError):  # no second run: nothing under the provisioning id
            await ts_env.client.get_workflow_handle(provision_workflow_id(nhi_id)).describe()
        # Provisioning is over: the gate refuses, the lifecycle's updates are accepted.
        with pytest.raises(WorkflowUpdateFailedError) as late:
            await handle.execute_update(
                NhiLifecycleWorkflow.decide,
                ApprovalDecision(approve=True, approver="bob", reason="late"),
            )
        assert "needs no approval" in str(late.value.cause)
        await handle.execute_update(
            NhiLifecycleWorkflow.decommission,
            LifecycleAction(actor=OWNER, reason="the task ended"),
        )
        ended = await handle.result()  # the grace period passes in skipped time
        assert ended.phase is Phase.DECOMMISSIONED

    await _life(ts_env, settings, sessions, aws, ProvisionInput(nhi_id=nhi_id), during)
    assert nhi_row(sessions, nhi_id).status == "decommissioned"
    users = aws.iam.list_users(PathPrefix=settings.iam_path)["Users"]
    assert name not in {u["UserName"] for u in users}


async def test_one_run_waits_for_an_approver_and_refuses_other_updates_until_active(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    _, nhi_id, sensitive = request_nhi(
        sessions, settings, "iam_role", scope=SENSITIVE_SCOPE, actor="alice"
    )
    assert sensitive == ["s3:DeleteObject"]

    async def during(handle: Handle) -> None:
        with ts_env.auto_time_skipping_disabled():
            with pytest.raises(WorkflowUpdateFailedError) as early:
                await handle.execute_update(
                    NhiLifecycleWorkflow.renew, RenewRequest(actor=OWNER, reason="too soon")
                )
            assert "still being provisioned" in str(early.value.cause)
            with pytest.raises(WorkflowQueryFailedError):
                await handle.query(NhiLifecycleWorkflow.view)
            with pytest.raises(WorkflowUpdateFailedError) as own:
                await handle.execute_update(
                    NhiLifecycleWorkflow.decide,
                    ApprovalDecision(approve=True, approver="alice", reason="mine"),
                )
            assert "cannot approve their own" in str(own.value.cause)
            assert nhi_row(sessions, nhi_id).status == "pending_approval"
            outcome = await handle.execute_update(
                NhiLifecycleWorkflow.decide,
                ApprovalDecision(approve=True, approver="bob", reason="cleanup job"),
            )
            assert outcome.approved and outcome.complete
            await _view(handle)
            renewed = await handle.execute_update(
                NhiLifecycleWorkflow.renew, RenewRequest(actor=OWNER, reason="still needed")
            )
        assert renewed.message == "renewed"
        history = await handle.fetch_history()
        accepted = [
            e
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
        ]
        assert len(accepted) == 2, "refused updates leave no trace: one decision, one renewal"

    inp = ProvisionInput(nhi_id=nhi_id, requested_by="alice", needs_approval=True)
    await _life(ts_env, settings, sessions, aws, inp, during)
    assert nhi_row(sessions, nhi_id).status == "active"


async def test_a_denied_one_run_creates_nothing_and_ends(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    _, nhi_id, _ = request_nhi(sessions, settings, "iam_role", scope=SENSITIVE_SCOPE, actor="alice")
    name = nhi_row(sessions, nhi_id).name

    async def during(handle: Handle) -> None:
        await handle.execute_update(
            NhiLifecycleWorkflow.decide,
            ApprovalDecision(approve=False, approver="bob", reason="not for this agent"),
        )
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        assert "denied by bob" in str(failure.value.cause)

    inp = ProvisionInput(nhi_id=nhi_id, requested_by="alice", needs_approval=True)
    await _life(ts_env, settings, sessions, aws, inp, during)
    assert nhi_row(sessions, nhi_id).status == "failed"
    roles = aws.iam.list_roles(PathPrefix=settings.iam_path)["Roles"]
    assert name not in {r["RoleName"] for r in roles}


async def test_a_one_run_cancelled_while_awaiting_approval_is_failed(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    _, nhi_id, _ = request_nhi(sessions, settings, "iam_role", scope=SENSITIVE_SCOPE, actor="alice")

    async def during(handle: Handle) -> None:
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        assert isinstance(failure.value.cause, CancelledError)

    inp = ProvisionInput(nhi_id=nhi_id, requested_by="alice", needs_approval=True)
    await _life(ts_env, settings, sessions, aws, inp, during)
    nhi = nhi_row(sessions, nhi_id)
    assert nhi.status == "failed"
    assert "cancelled before anything was created" in (nhi.status_reason or "")


def _contain(sessions: sessionmaker[Session], agent_id: uuid.UUID) -> None:
    """Security contains the agent: its incident is open (the containment workflow itself is
    not needed here: the open incident is what provisioning checks)."""
    with transaction(sessions) as session:
        incidents.open_incident(
            session, agent_id, reason="exfiltration suspected", actor="api:sam", person="sam"
        )


def _complete(sessions: sessionmaker[Session], agent_id: uuid.UUID) -> None:
    """The agent's task ends (`POST /v1/agents/{id}/complete` records this first)."""
    with transaction(sessions) as session:
        agents.complete_agent(session, agent_id, "api:ana", "the task ended")


async def _refused(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    worker_aws: AwsClients,
    aws: AwsClients,
    nhi_id: uuid.UUID,
    why: str,
) -> None:
    """The NHI's one run fails saying `why`, the NHI is `failed` saying so and was never
    active, and its role is not on the platform (never created, or removed)."""
    name = nhi_row(sessions, nhi_id).name
    causes: list[str] = []

    async def during(handle: Handle) -> None:
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        causes.append(str(failure.value.cause))

    await _life(env, settings, sessions, worker_aws, ProvisionInput(nhi_id=nhi_id), during)
    assert why in causes[0], causes
    nhi = nhi_row(sessions, nhi_id)
    assert nhi.status == "failed" and why in (nhi.status_reason or ""), nhi.status_reason
    assert nhi.activated_at is None
    roles = {r["RoleName"] for r in aws.iam.list_roles(PathPrefix=settings.iam_path)["Roles"]}
    assert name not in roles, f"a role left for an agent that is {why}"


@pytest.mark.parametrize(
    ("event", "when"),
    [
        ("contained", "before_the_run"),
        ("contained", "while_creating"),
        ("completed", "before_the_run"),
        ("completed", "while_creating"),
    ],
)
async def test_an_agent_contained_or_completed_gets_no_new_nhi(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    event: str,
    when: str,
) -> None:
    """A request recorded before the agent was contained or completed (the API refuses new
    ones then) is refused before anything is created; one whose agent is contained or
    completed while its role is being created (a botocore hook right after CreateRole) is
    refused before it becomes active, and the role is removed."""
    agent_id, nhi_id, _ = request_nhi(sessions, settings, "iam_role")
    worker_aws = make_aws_clients(settings)
    act = _contain if event == "contained" else _complete
    done: list[str] = []

    def now(**_: Any) -> None:
        if not done:
            done.append("after CreateRole")
            act(sessions, agent_id)

    if when == "before_the_run":
        act(sessions, agent_id)
    else:
        worker_aws.iam.meta.events.register("after-call.iam.CreateRole", now)
    await _refused(ts_env, settings, sessions, worker_aws, aws, nhi_id, event)
    assert done == ([] if when == "before_the_run" else ["after CreateRole"])


async def test_containment_asks_a_run_still_provisioning_again_never_calls_it_held(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    """The lifecycle refuses a decommission while its run provisions the NHI (here: waiting
    for an approver): containment's hold is then "not yet", an error its retries ask again
    with, never "not needed" (which would leave the run free to rotate or restore later)."""
    _, nhi_id, _ = request_nhi(sessions, settings, "iam_role", scope=SENSITIVE_SCOPE, actor="alice")
    contain = ContainActivities(
        sessions, settings, aws, TargetRegistry(sessions, settings, aws.secrets)
    )
    hold = HoldLifecycle(incident_id=uuid.uuid4(), nhi_id=nhi_id, reason="x", principal="sam")

    async def during(handle: Handle) -> None:
        async def provisioning() -> None:
            with pytest.raises(WorkflowQueryFailedError, match="still being provisioned"):
                await handle.query(NhiLifecycleWorkflow.view)

        await eventually(provisioning)
        with pytest.raises(ApplicationError) as refused:
            await ActivityEnvironment(client=ts_env.client).run(contain.hold_lifecycle, hold)
        assert refused.value.type == "LifecycleNotReady" and not refused.value.non_retryable
        assert "still provisioning" in refused.value.message
        await handle.cancel()
        with pytest.raises(WorkflowFailureError):
            await handle.result()

    inp = ProvisionInput(nhi_id=nhi_id, requested_by="alice", needs_approval=True)
    await _life(ts_env, settings, sessions, aws, inp, during)
