"""The lifecycle under faults and hostile values, on Temporal's time-skipping server with real
activities (Postgres, moto over HTTP, the Slack emulator). Faults are injected at the boundary:
botocore event hooks on the worker's own AWS clients, and Slack answering errors.

Updates are sent straight to the workflow (a Temporal client), as a sweep or a caller that
bypasses the API would."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pydantic import SecretStr
from slack_sdk import WebClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from models.contracts import (
    LifecycleAction,
    LifecycleInput,
    LifecycleView,
    Phase,
    RenewRequest,
)
from models.orm import Agent, AuditEvent, Nhi, Policy
from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.infra.slack_client import make_slack_client
from nhi.infra.task_alerts import SDK_LOGGER, TaskFailureAlerts
from tests.conftest import dev_address
from tests.helpers import eventually, inject_aws_error, provision, request_nhi, skip_until
from tests.slack_emulator import SlackEmulator, _ApiError
from worker import build_worker
from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id

HISTORIES = Path(__file__).resolve().parent / "histories"
DAY = timedelta(days=1)
OWNER, BACKUP = "ana@example.com", "ben@example.com"
SECURITY = "#nhi-security"
SECURITY_ACTOR = "security:sec-oncall"


class FlakySlack(SlackEmulator):
    """The emulator, able to refuse posts to one channel a number of times (as Slack does when
    it has trouble): the rest of the workspace keeps working."""

    def __init__(self, token: str = "xoxb-test") -> None:
        super().__init__(token)
        self._refusals: dict[str, int] = {}
        post = self._methods["chat.postMessage"]

        def flaky_post(args: dict[str, Any]) -> dict[str, Any]:
            channel = str(args.get("channel", ""))
            if self._refusals.get(channel, 0) > 0:
                self._refusals[channel] -= 1
                raise _ApiError("internal_error")
            return post(args)

        self._methods["chat.postMessage"] = flaky_post

    def refuse_posts_to(self, channel: str, times: int) -> None:
        with self._lock:
            self._refusals[channel] = times


@dataclass
class Rig:
    env: WorkflowEnvironment
    settings: Settings
    sessions: sessionmaker[Session]
    aws: AwsClients
    slack: FlakySlack
    users: dict[str, str]
    worker_aws: AwsClients
    queue: str


@pytest.fixture(scope="module")
def slack() -> Iterator[FlakySlack]:
    emulator = FlakySlack(token="xoxb-test")
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest_asyncio.fixture
async def rig(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    slack: FlakySlack,
    aws: AwsClients,
) -> AsyncIterator[Rig]:
    users = {}
    for email in (OWNER, BACKUP):
        try:
            users[email] = slack.add_user(email)
        except ValueError:
            users[email] = str(
                WebClient(token="xoxb-test", base_url=slack.url).users_lookupByEmail(email=email)[
                    "user"
                ]["id"]
            )
    slack.clear()
    rig_settings = settings.model_copy(
        update={
            "temporal_address": dev_address(ts_env),
            "slack_bot_token": SecretStr("xoxb-test"),
            "slack_api_url": slack.url,
            "slack_team_channels": {"search": "#search-team"},
        }
    )
    queue = f"faults-{uuid.uuid4().hex[:8]}"
    worker_aws = make_aws_clients(rig_settings)  # its own clients: faults stay in this test
    worker = build_worker(
        ts_env.client,
        rig_settings,
        sessions,
        worker_aws,
        slack=make_slack_client(rig_settings),
        task_queue=queue,
    )
    async with worker:
        yield Rig(ts_env, rig_settings, sessions, aws, slack, users, worker_aws, queue)


def _nhi(rig: Rig, nhi_id: uuid.UUID) -> Nhi:
    with transaction(rig.sessions) as s:
        return s.get_one(Nhi, nhi_id)


def _events(rig: Rig, nhi_id: uuid.UUID) -> list[tuple[str, str, str]]:
    with transaction(rig.sessions) as s:
        rows = s.execute(
            select(AuditEvent.event, AuditEvent.actor, AuditEvent.reason)
            .where(AuditEvent.subject_id == str(nhi_id))
            .order_by(AuditEvent.id)
        )
        return [(e, a, r or "") for e, a, r in rows]


def _dm(rig: Rig, email: str) -> str:
    return "D" + rig.users[email][1:]


def _texts(rig: Rig, channel: str, contains: str) -> list[str]:
    return [m.text or "" for m in rig.slack.messages_in(channel) if contains in (m.text or "")]


async def _started(handle: WorkflowHandle[Any, LifecycleView]) -> LifecycleView:
    try:
        return await handle.query(NhiLifecycleWorkflow.view)
    except Exception as err:  # still starting
        raise AssertionError(str(err)) from err


async def _refusal(update: Any) -> str:
    """The message an update was refused with (validator or handler)."""
    with pytest.raises(WorkflowUpdateFailedError) as failed:
        await update
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError), cause
    return cause.message


async def test_a_removal_that_keeps_failing_surfaces_within_the_alert_window_once(
    rig: Rig,
) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_role", ttl="5d", now=await rig.env.get_current_time()
    )
    handle = await provision(rig.env, rig.queue, nhi_id)
    await eventually(lambda: _started(handle))
    name = _nhi(rig, nhi_id).name
    # Someone attached something IAM will not let go of: every DeleteRole is refused.
    lift = inject_aws_error(rig.worker_aws.iam, "DeleteRole", "DeleteConflict", status=409)
    # And the security channel has a hiccup when the alert goes out: the owner is not told twice.
    rig.slack.refuse_posts_to(SECURITY, 1)

    await handle.execute_update(
        NhiLifecycleWorkflow.decommission,
        LifecycleAction(actor=SECURITY_ACTOR, reason="contain the pilot's role"),
    )

    async def quarantined() -> LifecycleView:
        current = await _started(handle)
        assert current.phase is Phase.QUARANTINED, current.phase
        return current

    view = await eventually(quarantined)
    assert view.grace_ends_at is not None
    grace_end = view.grace_ends_at
    window = timedelta(seconds=rig.settings.revoke_alert_seconds)

    view = await skip_until(rig.env, handle, grace_end + window + timedelta(minutes=2))
    assert view.phase is Phase.REVOKE_FAILED
    assert view.quarantined_at is not None
    assert view.quarantined_at - grace_end <= window + timedelta(seconds=60), "within the window"
    current = _nhi(rig, nhi_id)
    assert current.status == "revoke_failed"
    assert "DeleteConflict" in (current.status_reason or ""), current.status_reason
    owner_alerts = _texts(rig, _dm(rig, OWNER), "keeps failing")
    security_alerts = _texts(rig, SECURITY, "keeps failing")
    assert len(owner_alerts) == 1 and len(security_alerts) == 1, (owner_alerts, security_alerts)
    assert "DeleteConflict" in security_alerts[0]

    # Still failing at the next retry: recorded, not alerted again.
    retry = timedelta(seconds=rig.settings.revoke_retry_seconds)
    view = await skip_until(rig.env, handle, view.quarantined_at + retry + window + DAY / 24)
    assert view.phase is Phase.REVOKE_FAILED
    assert [e for e, _, _ in _events(rig, nhi_id)].count("nhi.revoke_retry_failed") >= 1
    assert len(_texts(rig, _dm(rig, OWNER), "keeps failing")) == 1
    assert len(_texts(rig, SECURITY, "keeps failing")) == 1
    assert rig.aws.iam.get_role(RoleName=name)["Role"]["RoleName"] == name

    # The blocker is gone: the next retry finishes the job.
    lift()
    async with rig.env.time_skipping_unlocked():  # type: ignore[attr-defined]
        result = await handle.result()
    assert result.phase is Phase.DECOMMISSIONED
    assert _nhi(rig, nhi_id).status == "decommissioned"
    with pytest.raises(rig.aws.iam.exceptions.NoSuchEntityException):
        rig.aws.iam.get_role(RoleName=name)
    events = [e for e, _, _ in _events(rig, nhi_id)]
    assert events.count("nhi.revoke_failed") == 1 and events[-1] == "nhi.decommissioned"
    if os.environ.get("NHI_RECORD_HISTORIES"):
        # The golden history of today's removal path (tests/test_replay.py replays it).
        history = await handle.fetch_history()
        (HISTORIES / "lifecycle_revoke_failed.json").write_text(history.to_json())


async def test_renewal_respects_the_agents_expected_end_and_never_shortens(rig: Rig) -> None:
    now = await rig.env.get_current_time()
    agent_id, nhi_id, _ = request_nhi(rig.sessions, rig.settings, "iam_role", ttl="10d", now=now)
    end = (now + 12 * DAY).replace(microsecond=0)
    with transaction(rig.sessions) as s:  # the agent's task is planned to end in 12 days
        s.execute(update(Agent).where(Agent.id == agent_id).values(expected_end_at=end))
    handle = await provision(rig.env, rig.queue, nhi_id)
    await eventually(lambda: _started(handle))
    before = _nhi(rig, nhi_id).expires_at

    past_end = await _refusal(
        handle.execute_update(
            NhiLifecycleWorkflow.renew,
            RenewRequest(actor=OWNER, extend_by_seconds=20 * 86400),
        )
    )
    assert "expected end" in past_end, past_end
    huge = await _refusal(
        handle.execute_update(
            NhiLifecycleWorkflow.renew, RenewRequest(actor=OWNER, extend_by_seconds=2**62)
        )
    )
    assert "extend_by" in huge
    shorter = await _refusal(
        handle.execute_update(
            NhiLifecycleWorkflow.renew, RenewRequest(actor=OWNER, extend_by_seconds=2 * 86400)
        )
    )
    assert "never shortens" in shorter, shorter
    assert _nhi(rig, nhi_id).expires_at == before

    # The default renewal (30 days) is capped at the agent's end.
    view = await handle.execute_update(NhiLifecycleWorkflow.renew, RenewRequest(actor=OWNER))
    assert view.expires_at == end
    assert _nhi(rig, nhi_id).expires_at == end
    history = await handle.fetch_history()
    accepted = [
        e
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]
    assert len(accepted) == 1, "refusals happen in the validator, before history"
    again = await _refusal(
        handle.execute_update(
            NhiLifecycleWorkflow.renew, RenewRequest(actor=OWNER, extend_by_seconds=13 * 86400)
        )
    )
    assert "expected end" in again


async def test_a_nul_byte_reaching_the_workflow_cannot_poison_it(rig: Rig) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_user_key", ttl="20d", now=await rig.env.get_current_time()
    )
    handle = await provision(rig.env, rig.queue, nhi_id)
    await eventually(lambda: _started(handle))

    rotated = await handle.execute_update(
        NhiLifecycleWorkflow.rotate, LifecycleAction(actor=OWNER, reason="rotate\x00now")
    )
    assert rotated.message == "rotation started"

    async def rotation_recorded() -> None:
        assert "nhi.rotated" in [e for e, _, _ in _events(rig, nhi_id)]

    await eventually(rotation_recorded)
    renewed = await handle.execute_update(
        NhiLifecycleWorkflow.renew,
        RenewRequest(actor=OWNER, reason="still\x00needed", extend_by_seconds=25 * 86400),
    )
    assert renewed.message == "renewed"
    description = await handle.describe()
    assert description.status is WorkflowExecutionStatus.RUNNING

    await handle.execute_update(
        NhiLifecycleWorkflow.decommission,
        LifecycleAction(actor=SECURITY_ACTOR, reason="contain\x00it"),
    )

    async def quarantined() -> None:
        assert _nhi(rig, nhi_id).status == "quarantined"

    await eventually(quarantined)
    events = _events(rig, nhi_id)
    reasons = {e: r for e, _, r in events}
    assert reasons["nhi.rotation_started"] == "rotatenow"
    assert reasons["nhi.renewed"] == "stillneeded"
    assert reasons["nhi.quarantined"] == "containit"
    assert all("\x00" not in r and "\x00" not in a for _, a, r in events)
    assert "nhi.step_failed" not in reasons, "nothing failed on the way"
    assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING


async def test_mark_missing_ends_the_lifecycle_for_good(rig: Rig) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_role", ttl="10d", now=await rig.env.get_current_time()
    )
    handle = await provision(rig.env, rig.queue, nhi_id)
    await eventually(lambda: _started(handle))
    events_before = _events(rig, nhi_id)

    owner = await _refusal(
        handle.execute_update(
            NhiLifecycleWorkflow.mark_missing, LifecycleAction(actor=OWNER, reason="gone")
        )
    )
    assert "only a sweep or the security team" in owner
    view = await handle.execute_update(
        NhiLifecycleWorkflow.mark_missing,
        LifecycleAction(actor="system:sweep", channel="system", reason="not found in IAM"),
    )
    assert view.phase is Phase.MISSING and view.message == "missing"
    with rig.env.auto_time_skipping_disabled():
        result = await asyncio.wait_for(handle.result(), timeout=20)
    assert result.phase is Phase.MISSING and result.decommission_reason == "not found in IAM"
    # The run ended at once (no timer ran out), acted on nothing and wrote nothing: the sweep
    # owns the `missing` status, its audit event and the alert.
    assert await rig.env.get_current_time() < _nhi(rig, nhi_id).expires_at
    assert _events(rig, nhi_id) == events_before
    assert _nhi(rig, nhi_id).status == "active"
    name = _nhi(rig, nhi_id).name
    assert "nhi-quarantine" not in rig.aws.iam.list_role_policies(RoleName=name)["PolicyNames"]


async def test_a_slack_retry_reposts_to_the_failed_recipient_only(rig: Rig) -> None:
    # The owner is not in Slack: the first reminder escalates at once to the backup owner and
    # the team channel. The team channel refuses the first post.
    _, nhi_id, _ = request_nhi(
        rig.sessions,
        rig.settings,
        "iam_role",
        ttl="20d",
        owner_email="left-the-company@example.com",
        now=await rig.env.get_current_time(),
    )
    handle = await provision(rig.env, rig.queue, nhi_id)
    await eventually(lambda: _started(handle))
    rig.slack.refuse_posts_to("#search-team", 1)
    nhi = _nhi(rig, nhi_id)
    view = await skip_until(rig.env, handle, nhi.expires_at - 14 * DAY + timedelta(minutes=5))
    assert view.escalated

    backup = _texts(rig, _dm(rig, BACKUP), "Escalation")
    team = _texts(rig, "#search-team", "Escalation")
    assert len(team) == 1, "the refused post was retried"
    assert len(backup) == 1, "the backup owner was not posted to again"
    refused = [
        c for c in rig.slack.calls_to("chat.postMessage") if c.args["channel"] == "#search-team"
    ]
    assert len(refused) == 2


async def test_a_workflow_task_failure_alerts_the_security_channel_once(rig: Rig) -> None:
    handler = TaskFailureAlerts(
        WebClient(token="xoxb-test", base_url=rig.slack.url), SECURITY, per_workflow_seconds=600
    )
    sdk_logger = logging.getLogger(SDK_LOGGER)
    sdk_logger.addHandler(handler)
    workflow_id = f"nhi-broken-{uuid.uuid4().hex[:8]}"
    try:
        # An input the workflow cannot decode fails its workflow task on every attempt.
        handle = await rig.env.client.start_workflow(
            "NhiLifecycleWorkflow",
            {"nhi_id": "not-a-uuid"},
            id=workflow_id,
            task_queue=rig.queue,
        )

        async def alerted() -> None:
            handler.flush()
            alerts = _texts(rig, SECURITY, workflow_id)
            assert len(alerts) == 1, alerts
            assert "Workflow task failure" in alerts[0] and "NhiLifecycleWorkflow" in alerts[0]

        with rig.env.auto_time_skipping_disabled():
            await eventually(alerted, timeout=30)
            await asyncio.sleep(12)  # the task is retried; the alert is not repeated
        handler.flush()
        assert len(_texts(rig, SECURITY, workflow_id)) == 1
        await handle.terminate("test over")
    finally:
        sdk_logger.removeHandler(handler)
        handler.close()


async def test_the_rate_limit_caps_alerts_across_workflows() -> None:
    clock = [1000.0]
    sent: list[str] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sent.append(record.getMessage())

    recorder = Recorder()
    log = logging.getLogger("nhi.infra.task_alerts")
    log.addHandler(recorder)
    handler = TaskFailureAlerts(None, SECURITY, max_per_window=3, clock=lambda: clock[0])
    try:
        for i in range(5):
            record = logging.LogRecord(SDK_LOGGER, logging.WARNING, "", 0, "Failed activation on workflow", None, None)  # fmt: skip
            record.temporal_workflow = {"workflow_id": f"wf-{i}", "workflow_type": "T"}
            record.__dict__["__temporal_error_identifier"] = "WorkflowTaskFailure"
            handler.emit(record)
        handler.flush()
        assert len([m for m in sent if m.startswith("ALERT to")]) == 3
        clock[0] += 3601
        handler.emit(record)
        handler.flush()
        assert len([m for m in sent if m.startswith("ALERT to")]) == 4
    finally:
        log.removeHandler(recorder)
        handler.close()


async def test_a_step_that_keeps_failing_is_recorded_and_retried_never_the_runs_end(
    rig: Rig,
) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_user_key", ttl="20d", now=await rig.env.get_current_time()
    )
    handle = await provision(rig.env, rig.queue, nhi_id)
    await eventually(lambda: _started(handle))
    name = _nhi(rig, nhi_id).name
    await handle.execute_update(NhiLifecycleWorkflow.rotate, LifecycleAction(actor=OWNER))

    async def rotated() -> LifecycleView:
        assert "nhi.rotated" in [e for e, _, _ in _events(rig, nhi_id)]
        return await _started(handle)

    await eventually(rotated)
    old_key = next(k for k, status in _keys(rig, name).items() if status == "Active")
    assert len(_keys(rig, name)) == 2
    # Deactivating the old key after the overlap is refused (an SCP, say), on every try.
    lift = inject_aws_error(rig.worker_aws.iam, "UpdateAccessKey", "AccessDenied")
    overlap = timedelta(seconds=rig.settings.rotation_overlap_seconds)
    at = await rig.env.get_current_time() + overlap + timedelta(minutes=2)
    view = await skip_until(rig.env, handle, at)
    assert view.phase is Phase.ACTIVE
    assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING
    failed = [r for e, _, r in _events(rig, nhi_id) if e == "nhi.step_failed"]
    assert len(failed) == 1 and "AccessDenied" in failed[0], failed
    assert len(_texts(rig, SECURITY, "could not complete a step")) == 1
    assert len(_texts(rig, _dm(rig, OWNER), "could not complete a step")) == 1

    # Retried later, still failing: no second record or alert for the same streak.
    view = await skip_until(rig.env, handle, at + timedelta(minutes=40))
    assert [e for e, _, _ in _events(rig, nhi_id)].count("nhi.step_failed") == 1
    assert len(_texts(rig, SECURITY, "could not complete a step")) == 1
    assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING

    # The fault clears: the next try deactivates the old key.
    lift()
    await skip_until(rig.env, handle, at + timedelta(minutes=60))
    assert _keys(rig, name).get(old_key) in ("Inactive", None)
    assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING


async def test_an_update_whose_activity_fails_fails_that_update_only(rig: Rig) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_role", ttl="10d", now=await rig.env.get_current_time()
    )
    handle = await provision(rig.env, rig.queue, nhi_id)
    await eventually(lambda: _started(handle))
    before = _nhi(rig, nhi_id).expires_at
    lift = inject_aws_error(rig.worker_aws.iam, "PutRolePolicy", "AccessDenied")
    refused = await _refusal(
        handle.execute_update(
            NhiLifecycleWorkflow.renew, RenewRequest(actor=OWNER, extend_by_seconds=20 * 86400)
        )
    )
    lift()
    assert refused.startswith("renewal failed") and "AccessDenied" in refused, refused
    view = await handle.query(NhiLifecycleWorkflow.view)
    assert view.phase is Phase.ACTIVE and view.expires_at == before
    assert _nhi(rig, nhi_id).expires_at == before
    assert "nhi.renewed" not in [e for e, _, _ in _events(rig, nhi_id)]
    # The run goes on: the next action works.
    await handle.execute_update(
        NhiLifecycleWorkflow.decommission, LifecycleAction(actor=SECURITY_ACTOR, reason="done")
    )

    async def quarantined() -> None:
        assert _nhi(rig, nhi_id).status == "quarantined"

    await eventually(quarantined)


def _keys(rig: Rig, name: str) -> dict[str, str]:
    meta = rig.aws.iam.list_access_keys(UserName=name)["AccessKeyMetadata"]
    return {k["AccessKeyId"]: k["Status"] for k in meta}


async def test_a_policy_value_no_lifecycle_can_run_with_is_ignored_not_fatal(rig: Rig) -> None:
    # Written straight into the database, past the API's checks: a reminder offset of 1e30 s.
    policy = (Policy.platform == "aws") & (Policy.kind == "iam_role")
    with transaction(rig.sessions) as s:
        row = s.execute(select(Policy).where(policy & (Policy.environment == "dev"))).scalar_one()
        kept = list(row.reminder_offsets_seconds)
        s.execute(
            update(Policy)
            .where(Policy.id == row.id)
            .values(reminder_offsets_seconds=[1e30, -5, 3 * 86400])
        )
    try:
        _, nhi_id, _ = request_nhi(
            rig.sessions, rig.settings, "iam_role", ttl="10d", now=await rig.env.get_current_time()
        )
        handle = await provision(rig.env, rig.queue, nhi_id)
        await eventually(lambda: _started(handle))
        expiry = _nhi(rig, nhi_id).expires_at
        view = await skip_until(rig.env, handle, expiry - 3 * DAY + timedelta(minutes=5))
        assert view.reminders_done == [3 * 86400], "the sane offset still reminds"
        assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING
    finally:
        with transaction(rig.sessions) as s:
            s.execute(
                update(Policy).where(Policy.id == row.id).values(reminder_offsets_seconds=kept)
            )


async def test_a_fresh_run_started_with_a_pending_decommission_contains_the_nhi(
    rig: Rig,
) -> None:
    # The NHI's run is gone (terminated); security contains it through a fresh run started
    # from the inventory, as the API does.
    _, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_role", ttl="10d", now=await rig.env.get_current_time()
    )
    handle = await provision(rig.env, rig.queue, nhi_id)
    await eventually(lambda: _started(handle))
    await handle.terminate("lost")
    fresh = await rig.env.client.start_workflow(
        NhiLifecycleWorkflow.run,
        LifecycleInput(
            nhi_id=nhi_id,
            pending_decommission=LifecycleAction(actor=SECURITY_ACTOR, reason="contain\x00now"),
        ),
        id=lifecycle_workflow_id(nhi_id),
        task_queue=rig.queue,
    )

    async def quarantined() -> LifecycleView:
        view = await _started(fresh)
        assert view.phase is Phase.QUARANTINED, view.phase
        return view

    view = await eventually(quarantined)
    assert view.decommission_reason == "containnow"
    assert _nhi(rig, nhi_id).status == "quarantined"
    assert ("nhi.quarantined", f"api:{SECURITY_ACTOR}", "containnow") in _events(rig, nhi_id)
    name = _nhi(rig, nhi_id).name
    assert "nhi-quarantine" in rig.aws.iam.list_role_policies(RoleName=name)["PolicyNames"]
