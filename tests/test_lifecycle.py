"""A whole NHI life on Temporal's time-skipping server, with real activities: Postgres, moto
over HTTP, a Slack Web API emulator and signed interactivity requests to the API over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowHandle, WorkflowUpdateStage
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from models.contracts import LifecycleAction, LifecycleView, Phase
from models.orm import AuditEvent, Nhi
from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.infra.slack_client import make_slack_client
from nhi.rules.ids import provision_workflow_id
from tests.conftest import dev_address
from tests.helpers import (
    ApiServer,
    bearer,
    eventually,
    inject_aws_error,
    mint,
    provision,
    request_nhi,
    skip_until,
)
from tests.slack_emulator import SlackEmulator, block_actions_payload, signed_interaction
from worker import build_worker
from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id

HISTORIES = Path(__file__).resolve().parent / "histories"
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
DAY = timedelta(days=1)
OWNER, BACKUP, STRANGER = "ana@example.com", "ben@example.com", "mallory@example.com"


@dataclass
class Rig:
    env: WorkflowEnvironment
    settings: Settings
    sessions: sessionmaker[Session]
    aws: AwsClients
    slack: SlackEmulator
    api: str
    queue: str
    users: dict[str, str]
    worker_aws: AwsClients


@pytest.fixture(scope="module")
def slack() -> Iterator[SlackEmulator]:
    with SlackEmulator(token="xoxb-test") as emulator:
        yield emulator


@pytest_asyncio.fixture(params=["slack"])
async def rig(
    request: pytest.FixtureRequest,
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    slack: SlackEmulator,
) -> AsyncIterator[Rig]:
    """Worker and API on the time-skipping server; with Slack (the emulator) or without it
    (dev mode: prompts go to the log and `nhi prompts`)."""
    users = {}
    for email in (OWNER, BACKUP, STRANGER):
        try:
            users[email] = slack.add_user(email)
        except ValueError:
            users[email] = _lookup(slack, email)
    slack.clear()
    slack_settings: dict[str, Any] = {
        "slack_bot_token": SecretStr("xoxb-test"),
        "slack_signing_secret": SecretStr(SIGNING_SECRET),
        "slack_api_url": slack.url,
        "slack_team_channels": {"search": "#search-team"},
    }
    rig_settings = settings.model_copy(
        update={"temporal_address": dev_address(ts_env)}
        | (slack_settings if request.param == "slack" else {})
    )
    queue = f"life-{uuid.uuid4().hex[:8]}"
    worker_aws = make_aws_clients(rig_settings)  # its own clients, so a test can inject faults
    worker = build_worker(
        ts_env.client,
        rig_settings,
        sessions,
        worker_aws,
        slack=make_slack_client(rig_settings),
        task_queue=queue,
    )
    async with worker:
        with ApiServer(create_app(rig_settings)) as server:
            yield Rig(
                ts_env, rig_settings, sessions, aws, slack, server.url, queue, users, worker_aws
            )


def _lookup(slack: SlackEmulator, email: str) -> str:
    from slack_sdk import WebClient

    return str(
        WebClient(token="xoxb-test", base_url=slack.url).users_lookupByEmail(email=email)["user"][
            "id"
        ]
    )


def _nhi(rig: Rig, nhi_id: uuid.UUID) -> Nhi:
    with transaction(rig.sessions) as s:
        return s.get_one(Nhi, nhi_id)


def _events(rig: Rig, nhi_id: uuid.UUID) -> list[tuple[str, str]]:
    with transaction(rig.sessions) as s:
        rows = s.execute(
            select(AuditEvent.event, AuditEvent.actor)
            .where(AuditEvent.subject_id == str(nhi_id))
            .order_by(AuditEvent.id)
        )
        return [(e, a) for e, a in rows]


def _secret_key_id(rig: Rig, nhi: Nhi) -> str:
    value = rig.aws.secrets.get_secret_value(
        SecretId=nhi.credential_ref or "", VersionStage="AWSCURRENT"
    )["SecretString"]
    return str(json.loads(value)["AccessKeyId"])


def _keys(rig: Rig, name: str) -> dict[str, str]:
    meta = rig.aws.iam.list_access_keys(UserName=name)["AccessKeyMetadata"]
    return {k["AccessKeyId"]: k["Status"] for k in meta}


async def _provision(
    rig: Rig, nhi_id: uuid.UUID, *, one_run: bool = True
) -> WorkflowHandle[Any, LifecycleView]:
    return await provision(rig.env, rig.queue, nhi_id, one_run=one_run)


async def _until(
    rig: Rig, handle: WorkflowHandle[Any, LifecycleView], at: datetime
) -> LifecycleView:
    return await skip_until(rig.env, handle, at)


def _dm(rig: Rig, email: str) -> str:
    return "D" + rig.users[email][1:]


def _prompt_messages(rig: Rig, email: str, kind: str = "Renewal needed") -> list[Any]:
    """Prompts still showing their buttons, of one kind (reminders unless told otherwise)."""
    return [
        m
        for m in rig.slack.messages_in(_dm(rig, email))
        if m.blocks and len(m.blocks) >= 4 and (m.text or "").startswith(kind)
    ]


def _buttons(message: Any) -> dict[str, str]:
    actions = next(b for b in message.blocks if b["type"] == "actions")
    return {e["action_id"]: e["value"] for e in actions["elements"]}


async def _click(
    rig: Rig, message: Any, action_id: str, user_id: str, *, secret: str = SIGNING_SECRET,
    timestamp: int | None = None, action_ts: str | None = None,
) -> httpx.Response:  # fmt: skip
    payload = block_actions_payload(
        user_id=user_id,
        action_id=action_id,
        value=_buttons(message)[action_id],
        channel_id=message.channel,
        message_ts=message.ts,
        action_ts=action_ts or f"{time.time():.6f}",
    )
    body, headers = signed_interaction(secret, payload, timestamp=timestamp)
    async with httpx.AsyncClient(base_url=rig.api) as http:
        started = time.monotonic()
        response = await http.post("/slack/interactions", content=body, headers=headers)
        assert time.monotonic() - started < 3, "Slack needs an answer within 3 seconds"
        return response


@pytest.mark.slow
# As the API provisions (the NHI's one run), and as bundles do (a provisioning run starting the
# lifecycle), whose runs record the golden histories of that shape.
@pytest.mark.parametrize("one_run", [True, False], ids=["one_run", "two_runs"])
async def test_a_whole_life_in_seconds(rig: Rig, one_run: bool) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_user_key", ttl="45d", now=await rig.env.get_current_time()
    )
    handle = await _provision(rig, nhi_id, one_run=one_run)
    nhi = _nhi(rig, nhi_id)
    born = nhi.activated_at
    assert born is not None and nhi.status == "active"
    first_key = _secret_key_id(rig, nhi)
    assert _keys(rig, nhi.name) == {first_key: "Active"}

    # Day 30: the policy's rotation period. New key proven, promoted, old one retired.
    view = await _until(rig, handle, born + 30 * DAY + timedelta(hours=2, minutes=5))
    second_key = _secret_key_id(rig, nhi)
    assert second_key != first_key
    assert _keys(rig, nhi.name) == {second_key: "Active"}, "old key gone after the overlap"
    assert _nhi(rig, nhi_id).last_rotated_at is not None
    assert ("nhi.rotated", "system:rotation") in _events(rig, nhi_id)

    # Days 31, 42, 44: reminders 14, 3 and 1 days before expiry; the last one escalates.
    expiry = nhi.expires_at
    view = await _until(rig, handle, expiry - 14 * DAY + timedelta(minutes=1))
    reminders = _prompt_messages(rig, OWNER)
    assert len(reminders) == 1
    text = reminders[0].text or ""
    assert nhi.name in text and "s3:GetObject" in text and expiry.strftime("%Y-%m-%d") in text
    assert set(_buttons(reminders[0])) == {"nhi_renew", "nhi_let_expire", "nhi_decommission_now"}
    assert view.reminders_done == [14 * 86400]

    # Forged, stale and not-the-owner clicks change nothing.
    before = (_nhi(rig, nhi_id).expires_at, len(_events(rig, nhi_id)))
    forged = await _click(rig, reminders[0], "nhi_renew", rig.users[OWNER], secret="wrong")
    stale = await _click(
        rig, reminders[0], "nhi_renew", rig.users[OWNER], timestamp=int(time.time()) - 301
    )
    assert forged.status_code == 401 and stale.status_code == 401
    stranger = await _click(rig, reminders[0], "nhi_renew", rig.users[STRANGER])
    assert stranger.status_code == 200

    async def refused() -> None:
        ephemeral = rig.slack.calls_to("chat.postEphemeral")
        assert ephemeral and ephemeral[-1].args["user"] == rig.users[STRANGER]
        assert "owner or backup owner" in ephemeral[-1].args["text"]

    await eventually(refused)
    assert _nhi(rig, nhi_id).expires_at == before[0]
    assert _events(rig, nhi_id)[before[1] :] == [("nhi.decision_refused", f"slack:{STRANGER}")]

    await _until(rig, handle, expiry - 3 * DAY + timedelta(minutes=1))
    view = await _until(rig, handle, expiry - 1 * DAY + timedelta(minutes=1))
    assert len(_prompt_messages(rig, OWNER)) == 3
    assert view.escalated
    assert len(_prompt_messages(rig, BACKUP, "Escalation")) == 1, "escalated to the backup owner"
    assert len(rig.slack.messages_in("#search-team")) == 1, "and to the team channel"

    # The owner renews from the last reminder, with one click in Slack.
    last = _prompt_messages(rig, OWNER)[-1]
    click_ts = f"{time.time():.6f}"
    assert (
        await _click(rig, last, "nhi_renew", rig.users[OWNER], action_ts=click_ts)
    ).status_code == 200

    async def renewed() -> Nhi:
        current = _nhi(rig, nhi_id)
        assert current.expires_at > expiry
        return current

    nhi = await eventually(renewed)
    now = await rig.env.get_current_time()
    assert abs((nhi.expires_at - (now + 30 * DAY)).total_seconds()) < 600, "default TTL from now"
    # A redelivered request (same click) is applied once.
    assert (
        await _click(rig, last, "nhi_renew", rig.users[OWNER], action_ts=click_ts)
    ).status_code == 200
    renewals = [e for e in _events(rig, nhi_id) if e[0] == "nhi.renewed"]
    assert renewals == [("nhi.renewed", f"slack:{OWNER}")]

    async def messages_show_decision() -> None:
        for who, kind in ((OWNER, "Renewal"), (OWNER, "Escalation"), (BACKUP, "Escalation")):
            assert _prompt_messages(rig, who, kind) == [], f"{who} still sees buttons"
        decided = [m for m in rig.slack.messages_in(_dm(rig, OWNER)) if m.updates]
        assert len(decided) == 4  # three reminders and the escalation
        assert all(OWNER in (m.text or "") and "renewed" in (m.text or "") for m in decided)

    await eventually(messages_show_decision)
    policy = rig.aws.iam.get_user_policy(UserName=nhi.name, PolicyName="nhi-scope")[
        "PolicyDocument"
    ]
    policy = json.loads(policy) if isinstance(policy, str) else policy
    assert policy["Statement"][0]["Condition"]["DateLessThan"][
        "aws:CurrentTime"
    ] == nhi.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")

    # Day 60: second rotation (and the first reminder of the renewed term).
    rig.slack.clear()
    await _until(rig, handle, born + 60 * DAY + timedelta(hours=2, minutes=5))
    third_key = _secret_key_id(rig, nhi)
    assert third_key not in (first_key, second_key)
    assert _keys(rig, nhi.name) == {third_key: "Active"}

    # Reminders again for the new expiry, silence, escalation.
    expiry = nhi.expires_at
    view = await _until(rig, handle, expiry - 1 * DAY + timedelta(minutes=1))
    assert len(_prompt_messages(rig, OWNER)) == 3
    assert view.escalated and len(_prompt_messages(rig, BACKUP, "Escalation")) == 1

    # Silence means expiry: quarantine, proven from IAM's own state.
    view = await _until(rig, handle, expiry + timedelta(minutes=5))
    assert view.phase is Phase.QUARANTINED
    assert _nhi(rig, nhi_id).status == "quarantined"
    assert set(_keys(rig, nhi.name).values()) == {"Inactive"}
    assert "nhi-quarantine" in rig.aws.iam.list_user_policies(UserName=nhi.name)["PolicyNames"]

    # Grace passes: everything attached is deleted, the secret is scheduled for deletion.
    # (A handle from get_workflow_handle does not skip time by itself while awaiting a result.)
    async with rig.env.time_skipping_unlocked():  # type: ignore[attr-defined]
        result = await handle.result()
    assert await rig.env.get_current_time() >= expiry + DAY
    assert result.phase is Phase.DECOMMISSIONED
    nhi = _nhi(rig, nhi_id)
    assert nhi.status == "decommissioned" and nhi.decommissioned_at is not None
    with pytest.raises(rig.aws.iam.exceptions.NoSuchEntityException):
        rig.aws.iam.get_user(UserName=nhi.name)
    assert "DeletedDate" in rig.aws.secrets.describe_secret(SecretId=nhi.credential_ref or "")
    if os.environ.get("NHI_RECORD_HISTORIES") and not one_run:
        # Refresh the golden histories that tests/test_replay.py replays.
        for name, wid in (
            ("provision", provision_workflow_id(nhi_id)),
            ("lifecycle", lifecycle_workflow_id(nhi_id)),
        ):
            history = await rig.env.client.get_workflow_handle(wid).fetch_history()
            (HISTORIES / f"{name}.json").write_text(history.to_json())
    events = [e for e, _ in _events(rig, nhi_id)]
    assert events.count("nhi.rotated") == 2
    assert events.count("nhi.reminder") == 6 and events.count("nhi.escalation") == 2
    assert events[-3:] == ["nhi.escalation", "nhi.quarantined", "nhi.decommissioned"]


async def test_a_restore_sent_as_the_inventory_shows_the_quarantine_is_applied(rig: Rig) -> None:
    """The inventory says `quarantined` as soon as the quarantine step records it; the step
    then closes the owner's open prompts (a Slack call). A restore sent in that window is
    accepted and applied once the step ends, not refused as 'active, not quarantined'."""
    _, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_role", ttl="30d", now=await rig.env.get_current_time()
    )
    handle = await _provision(rig, nhi_id)
    expiry = _nhi(rig, nhi_id).expires_at
    await _until(rig, handle, expiry - 14 * DAY + timedelta(minutes=1))
    assert len(_prompt_messages(rig, OWNER)) == 1, "an open reminder the quarantine will close"
    lifecycle = rig.env.client.get_workflow_handle_for(
        NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi_id)
    )
    held = rig.slack.hold_next("chat.update")
    try:
        with rig.env.auto_time_skipping_disabled():
            await lifecycle.execute_update(
                NhiLifecycleWorkflow.decommission,
                LifecycleAction(actor=OWNER, channel="api", reason="the task ended"),
            )
            assert await asyncio.to_thread(held.reached.wait, 30), "prompts never closed"
            assert _nhi(rig, nhi_id).status == "quarantined"
            restore = await lifecycle.start_update(
                NhiLifecycleWorkflow.restore,
                LifecycleAction(actor=OWNER, channel="api", reason="still needed"),
                wait_for_stage=WorkflowUpdateStage.ACCEPTED,
            )
            held.release()
            view = await restore.result()
    finally:
        held.release()
    assert view.phase is Phase.ACTIVE
    assert _nhi(rig, nhi_id).status == "active"
    events = [e for e, _ in _events(rig, nhi_id)]
    assert events[-2:] == ["nhi.quarantined", "nhi.restored"]


async def _api(
    rig: Rig, method: str, path: str, actor: str | None = OWNER, **kw: Any
) -> httpx.Response:
    headers = {}
    if actor:
        name = actor.split("@")[0]
        headers = bearer(mint(rig.sessions, name, "platform", teams=["search"], email=actor))
    async with httpx.AsyncClient(base_url=rig.api, timeout=30) as http:
        return await http.request(method, path, headers=headers, **kw)


async def test_owner_missing_from_slack_escalates_at_once(rig: Rig) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions,
        rig.settings,
        "iam_role",
        ttl="20d",
        owner_email="gone@example.com",
        now=await rig.env.get_current_time(),
    )
    handle = await _provision(rig, nhi_id)
    nhi = _nhi(rig, nhi_id)
    view = await _until(rig, handle, nhi.expires_at - 14 * DAY + timedelta(minutes=1))
    assert view.reminders_done == [14 * 86400] and view.escalated
    assert len(_prompt_messages(rig, BACKUP, "Escalation")) == 1
    team = rig.slack.messages_in("#search-team")
    assert len(team) == 1 and "the owner has no active Slack account" in (team[0].text or "")
    assert [e for e, _ in _events(rig, nhi_id)][-2:] == ["nhi.reminder", "nhi.escalation"]


@pytest.mark.parametrize("rig", ["log"], indirect=True)
async def test_dev_mode_prompts_are_answered_through_the_api(rig: Rig) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_user_key", ttl="10d", now=await rig.env.get_current_time()
    )
    handle = await _provision(rig, nhi_id)
    nhi = _nhi(rig, nhi_id)
    await _until(rig, handle, nhi.expires_at - 3 * DAY + timedelta(minutes=1))
    assert rig.slack.calls == [], "no Slack configured: nothing goes to Slack"
    prompts = (await _api(rig, "GET", "/v1/prompts", params={"nhi_id": str(nhi_id)})).json()
    assert [p["kind"] for p in prompts] == ["reminder"]
    assert prompts[0]["deliveries"][0]["channel"] == "log"

    stranger = await _api(
        rig,
        "POST",
        f"/v1/prompts/{prompts[0]['id']}/answer",
        actor=STRANGER,
        json={"answer": "renew"},
    )
    assert stranger.status_code == 403 and "not the owner" in stranger.json()["detail"]
    anonymous = await _api(
        rig, "POST", f"/v1/prompts/{prompts[0]['id']}/answer", actor=None, json={"answer": "renew"}
    )
    assert anonymous.status_code == 401
    answered = await _api(
        rig, "POST", f"/v1/prompts/{prompts[0]['id']}/answer", json={"answer": "let_expire"}
    )
    assert answered.status_code == 200, answered.text
    assert answered.json()["let_expire"] is True
    again = await _api(
        rig,
        "POST",
        f"/v1/prompts/{prompts[0]['id']}/answer",
        actor=BACKUP,
        json={"answer": "renew"},
    )
    assert again.status_code == 409 and "already been answered" in again.json()["detail"]

    # Let expire: no more reminders, no escalation, quarantine at expiry.
    view = await _until(rig, handle, nhi.expires_at + timedelta(minutes=5))
    assert view.phase is Phase.QUARANTINED and not view.escalated
    prompts = (
        await _api(rig, "GET", "/v1/prompts", params={"nhi_id": str(nhi_id), "status": "all"})
    ).json()
    assert [(p["status"], p["decision"], p["decided_by"]) for p in prompts] == [
        ("decided", "let_expire", f"token:{OWNER.split('@')[0]}")
    ]

    # The backup owner restores it during the grace period; it is renewed from now.
    restored = await _api(
        rig, "POST", f"/v1/nhis/{nhi_id}/restore", actor=BACKUP, json={"reason": "still needed"}
    )
    assert restored.status_code == 200, restored.text
    assert restored.json()["phase"] == "active"
    assert set(_keys(rig, nhi.name).values()) == {"Active"}
    assert "nhi-quarantine" not in rig.aws.iam.list_user_policies(UserName=nhi.name)["PolicyNames"]
    assert _nhi(rig, nhi_id).expires_at > nhi.expires_at + 20 * DAY

    # Decommission now through the API, then nothing is left.
    done = await _api(
        rig, "POST", f"/v1/nhis/{nhi_id}/decommission", json={"reason": "task finished"}
    )
    assert done.status_code == 200, done.text

    async def quarantined() -> None:
        assert _nhi(rig, nhi_id).status == "quarantined"

    await eventually(quarantined)
    async with rig.env.time_skipping_unlocked():  # type: ignore[attr-defined]
        result = await handle.result()
    assert result.phase is Phase.DECOMMISSIONED
    events = _events(rig, nhi_id)
    assert ("nhi.let_expire", f"token:{OWNER.split('@')[0]}") in events
    assert ("nhi.restored", f"token:{BACKUP.split('@')[0]}") in events
    assert ("nhi.quarantined", f"token:{OWNER.split('@')[0]}") in events
    assert events[-1][0] == "nhi.decommissioned"


async def test_renewal_past_max_lifetime_is_refused_before_history(rig: Rig) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_role", ttl="10d", now=await rig.env.get_current_time()
    )
    handle = await _provision(rig, nhi_id)
    await eventually(lambda: _ready(handle))
    too_long = await _api(rig, "POST", f"/v1/nhis/{nhi_id}/renew", json={"extend_by": "120d"})
    assert too_long.status_code == 422 and too_long.json()["field"] == "extend_by"
    assert "maximum lifetime" in too_long.json()["detail"]
    bad = await _api(rig, "POST", f"/v1/nhis/{nhi_id}/renew", json={"extend_by": "soon"})
    assert bad.status_code == 422 and bad.json()["field"] == "extend_by"
    stranger = await _api(rig, "POST", f"/v1/nhis/{nhi_id}/renew", actor=STRANGER, json={})
    assert stranger.status_code == 403
    before = _nhi(rig, nhi_id).expires_at
    ok = await _api(
        rig,
        "POST",
        f"/v1/nhis/{nhi_id}/renew",
        json={"extend_by": "20d", "reason": "pilot extended"},
    )
    assert ok.status_code == 200, ok.text
    after = _nhi(rig, nhi_id).expires_at
    assert after > before
    history = await handle.fetch_history()
    accepted = [
        e
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]
    assert len(accepted) == 1, "refused updates leave no trace in history"
    role = rig.aws.iam.get_role_policy(RoleName=_nhi(rig, nhi_id).name, PolicyName="nhi-scope")[
        "PolicyDocument"
    ]
    role = json.loads(role) if isinstance(role, str) else role
    assert role["Statement"][0]["Condition"]["DateLessThan"]["aws:CurrentTime"] == after.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert ("nhi.renewed", f"token:{OWNER.split('@')[0]}") in _events(rig, nhi_id)


async def _ready(handle: WorkflowHandle[Any, LifecycleView]) -> LifecycleView:
    try:
        return await handle.query(NhiLifecycleWorkflow.view)
    except Exception as err:  # still starting
        raise AssertionError(str(err)) from err


async def test_role_rotation_is_not_applicable_and_quarantine_revokes_sessions(rig: Rig) -> None:
    agent_id, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_role", ttl="10d", now=await rig.env.get_current_time()
    )
    handle = await _provision(rig, nhi_id)
    await eventually(lambda: _ready(handle))
    rotated = await _api(rig, "POST", f"/v1/nhis/{nhi_id}/rotate", json={})
    assert rotated.status_code == 200 and "not applicable" in rotated.json()["message"]
    assert ("nhi.rotation_not_applicable", f"token:{OWNER.split('@')[0]}") in _events(rig, nhi_id)

    completed = await _api(
        rig, "POST", f"/v1/agents/{agent_id}/complete", json={"reason": "pilot over"}
    )
    assert completed.status_code == 200 and completed.json()["decommissioning"] == [str(nhi_id)]

    async def quarantined() -> None:
        assert _nhi(rig, nhi_id).status == "quarantined"

    await eventually(quarantined)
    name = _nhi(rig, nhi_id).name
    policies = rig.aws.iam.list_role_policies(RoleName=name)["PolicyNames"]
    assert {"nhi-quarantine", "nhi-revoke-older-sessions"} <= set(policies)
    restore = await _api(rig, "POST", f"/v1/nhis/{nhi_id}/restore", json={})
    assert restore.status_code == 200
    policies = rig.aws.iam.list_role_policies(RoleName=name)["PolicyNames"]
    assert "nhi-quarantine" not in policies and "nhi-revoke-older-sessions" in policies
    assert (await _api(rig, "POST", f"/v1/nhis/{nhi_id}/restore", json={})).status_code == 409


async def test_deletion_that_keeps_failing_is_revoke_failed_alerted_and_retried(rig: Rig) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_role", ttl="5d", now=await rig.env.get_current_time()
    )
    handle = await _provision(rig, nhi_id)
    nhi = _nhi(rig, nhi_id)
    lift = inject_aws_error(rig.worker_aws.iam, "DeleteRole", "AccessDenied")
    # Past expiry and the one-day grace: deletion is refused (an SCP, say).
    view = await _until(rig, handle, nhi.expires_at + DAY + timedelta(minutes=5))
    assert view.phase is Phase.REVOKE_FAILED
    current = _nhi(rig, nhi_id)
    assert current.status == "revoke_failed" and "AccessDenied" in (current.status_reason or "")
    alerts = [
        c
        for c in rig.slack.calls_to("chat.postMessage")
        if "keeps failing" in c.args.get("text", "")
    ]
    assert {a.args["channel"] for a in alerts} == {rig.users[OWNER], "#nhi-security"}
    listed = (await _api(rig, "GET", "/v1/nhis", params={"status": "revoke_failed"})).json()
    assert str(nhi_id) in {n["id"] for n in listed}, "visible in the inventory"

    # The fault clears; the scheduled retry finishes the job.
    lift()
    async with rig.env.time_skipping_unlocked():  # type: ignore[attr-defined]
        result = await handle.result()
    assert result.phase is Phase.DECOMMISSIONED
    retried_at = await rig.env.get_current_time()
    assert retried_at >= nhi.expires_at + DAY + timedelta(seconds=rig.settings.revoke_retry_seconds)
    with pytest.raises(rig.aws.iam.exceptions.NoSuchEntityException):
        rig.aws.iam.get_role(RoleName=nhi.name)
    events = [e for e, _ in _events(rig, nhi_id)]
    assert events[-2:] == ["nhi.revoke_failed", "nhi.decommissioned"]
