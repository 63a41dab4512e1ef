"""Approvals where approvers are (issue 16, items 3 and 4): the policy's approvers get the
request in Slack (the Slack Web API emulator), decide with correctly signed interactivity
requests to the API over HTTP, and nothing exists on the platform (moto) before a listed
approver who is neither the requester nor the owner approves. Time-skipping Temporal server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
from botocore.exceptions import ClientError
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowExecutionStatus
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from api.app import create_app
from models.enums import Environment, NhiKind, Platform
from models.orm import Approval, AuditEvent, Nhi, Policy
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.infra.slack_client import make_slack_client
from nhi.rules.ids import lifecycle_workflow_id
from nhi.rules.slack_messages import (
    DENY_REASON_BLOCK,
    DENY_REASON_INPUT,
    ApprovalAction,
    approval_value,
)
from tests.conftest import dev_address
from tests.helpers import TRUST, ApiServer, agent_body, bearer, eventually, keep_history, mint
from tests.slack_emulator import SlackEmulator, block_actions_payload, signed_interaction
from worker import WORKFLOWS, build_worker

SIGNING_SECRET = "approvals-signing-secret-0123456789"
REQUESTER, OWNER, BACKUP = "rita@example.com", "ana@example.com", "ben@example.com"
CAROL, DAVE, MALLORY = "carol@example.com", "dave@example.com", "mallory@example.com"
PEOPLE = (REQUESTER, OWNER, BACKUP, CAROL, DAVE, MALLORY)
SENSITIVE = [{"actions": ["s3:DeleteObject"], "resources": ["arn:aws:s3:::kb-docs/*"]}]
PLAIN = [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::kb-docs/*"]}]


@dataclass
class Rig:
    env: WorkflowEnvironment
    settings: Settings
    sessions: sessionmaker[Session]
    aws: AwsClients
    slack: SlackEmulator
    api: str
    users: dict[str, str]
    handle: str


@pytest.fixture(scope="module")
def slack() -> Iterator[SlackEmulator]:
    with SlackEmulator(token="xoxb-test") as emulator:
        yield emulator


@pytest_asyncio.fixture
async def rig(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    slack: SlackEmulator,
) -> AsyncIterator[Rig]:
    users = {}
    for email in PEOPLE:
        try:
            users[email] = slack.add_user(email)
        except ValueError:
            users[email] = str(
                make_slack_client(_slack_settings(settings, slack)).users_lookupByEmail(  # type: ignore[union-attr]
                    email=email
                )["user"]["id"]
            )
    slack.clear()
    # The approvers' user group holds a real approver, and the requester and the owner too:
    # being listed never lets them decide their own request or agent.
    handle = f"nhi-approvers-{uuid.uuid4().hex[:6]}"
    slack.add_usergroup(handle, [users[CAROL], users[REQUESTER], users[OWNER]])
    rig_settings = _slack_settings(settings, slack).model_copy(
        update={
            "temporal_address": dev_address(ts_env),
            "temporal_task_queue": f"appr-{uuid.uuid4().hex[:8]}",
        }
    )
    worker = build_worker(
        ts_env.client,
        rig_settings,
        sessions,
        aws,
        slack=make_slack_client(rig_settings),
        task_queue=rig_settings.temporal_task_queue,
    )
    async with worker:
        with ApiServer(create_app(rig_settings)) as server:
            yield Rig(ts_env, rig_settings, sessions, aws, slack, server.url, users, handle)


def _slack_settings(settings: Settings, slack: SlackEmulator) -> Settings:
    return settings.model_copy(
        update={
            "slack_bot_token": SecretStr("xoxb-test"),
            "slack_signing_secret": SecretStr(SIGNING_SECRET),
            "slack_api_url": slack.url,
        }
    )


@pytest.fixture
def policy(sessions: sessionmaker[Session]) -> Iterator[Any]:
    """Set approval fields on a shipped policy for one test, and put them back after."""
    saved: list[tuple[tuple[str, str, str], dict[str, Any]]] = []
    fields = ("approvers", "approvals_required", "approval_window_seconds", "risk_threshold")

    def configure(environment: str = "dev", **values: Any) -> None:
        key = ("aws", "iam_role", environment)
        with transaction(sessions) as s:
            row = s.scalars(
                select(Policy).where(
                    Policy.platform == Platform.AWS,
                    Policy.kind == NhiKind.IAM_ROLE,
                    Policy.environment == Environment(environment),
                )
            ).one()
            saved.append((key, {f: getattr(row, f) for f in fields}))
            for name, value in values.items():
                setattr(row, name, value)

    yield configure
    for (_, kind, environment), values in reversed(saved):
        with transaction(sessions) as s:
            row = s.scalars(
                select(Policy).where(
                    Policy.platform == Platform.AWS,
                    Policy.kind == NhiKind(kind),
                    Policy.environment == Environment(environment),
                )
            ).one()
            for name, value in values.items():
                setattr(row, name, value)


def _token(rig: Rig, email: str, role: str) -> dict[str, str]:
    teams = ["search"] if role == "platform" else None
    return bearer(
        mint(rig.sessions, f"{role}-{email.split('@')[0]}", role, teams=teams, email=email)
    )


async def _request(
    rig: Rig, scope: list[dict[str, Any]], environment: str = "dev", **agent: Any
) -> tuple[uuid.UUID, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=rig.api, timeout=30) as http:
        created = await http.post(
            "/v1/agents",
            json=agent_body(environment=environment, **agent),
            headers=_token(rig, REQUESTER, "platform"),
        )
        assert created.status_code == 201, created.text
        body = await _ask(http, created.json()["id"], scope, _token(rig, REQUESTER, "platform"))
        return uuid.UUID(body["id"]), body


async def _ask(
    http: httpx.AsyncClient, agent_id: Any, scope: list[dict[str, Any]], headers: dict[str, str]
) -> dict[str, Any]:
    """One `iam_role` request for the agent; its 202 answer."""
    answer = await http.post(
        f"/v1/agents/{agent_id}/nhis",
        json={"platform": "aws", "kind": "iam_role", "scope": scope, "trust_principal": TRUST},
        headers=headers,
    )
    assert answer.status_code == 202, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _nhi(rig: Rig, nhi_id: uuid.UUID) -> Nhi:
    with transaction(rig.sessions) as s:
        return s.get_one(Nhi, nhi_id)


def _approval(rig: Rig, approval_id: str) -> Approval:
    with transaction(rig.sessions) as s:
        return s.get_one(Approval, uuid.UUID(approval_id))


def _role_exists(rig: Rig, nhi_id: uuid.UUID) -> bool:
    try:
        rig.aws.iam.get_role(RoleName=_nhi(rig, nhi_id).name)
    except ClientError as err:
        assert err.response["Error"]["Code"] == "NoSuchEntity"
        return False
    return True


def _approval_messages(rig: Rig, approval_id: str) -> list[Any]:
    """The approval's messages while they still carry its buttons."""
    return [m for m in rig.slack.messages.values() if approval_id in str(m.blocks)]


def _current(rig: Rig, messages: list[Any]) -> list[Any]:
    """The same messages as they stand now (after any chat.update)."""
    return [rig.slack.messages[(m.channel, m.ts)] for m in messages]


async def _click(
    rig: Rig, email: str, action: ApprovalAction, approval_id: str, *, secret: str = SIGNING_SECRET
) -> httpx.Response:
    user = rig.users[email]
    payload = block_actions_payload(
        user_id=user,
        action_id=action.value,
        value=approval_value(uuid.UUID(approval_id)),
        channel_id="D" + user[1:],
        message_ts="1700000000.000100",
        action_ts=f"{uuid.uuid4().int % 10**9}.{uuid.uuid4().int % 10**6:06d}",
    )
    body, headers = signed_interaction(secret, payload)
    async with httpx.AsyncClient(base_url=rig.api, timeout=30) as http:
        return await http.post("/slack/interactions", content=body, headers=headers)


def _told(rig: Rig, email: str) -> list[str]:
    return [
        str(c.args.get("text"))
        for c in rig.slack.calls_to("chat.postEphemeral")
        if c.args.get("user") == rig.users[email]
    ]


async def test_a_sensitive_request_exists_only_once_a_listed_approver_clicks_approve(
    rig: Rig, policy: Any
) -> None:
    policy(approvers=[f"@{rig.handle}", DAVE])
    nhi_id, accepted = await _request(rig, SENSITIVE)
    assert accepted["status"] == "pending_approval"
    approval = accepted["approval"]
    approval_id = approval["approval_id"]
    assert approval["approvers"] == [f"@{rig.handle}", DAVE]
    assert any("s3:DeleteObject" in r for r in approval["reasons"])
    assert approval["risk_after"] > approval["risk_before"]

    # Every listed approver gets the request: each group member and the listed email.
    async def posted() -> list[Any]:
        messages = _approval_messages(rig, approval_id)
        assert len(messages) == 4, messages
        return messages

    messages = await eventually(posted)
    assert {m.channel for m in messages} == {
        "D" + rig.users[e][1:] for e in (CAROL, REQUESTER, OWNER, DAVE)
    }
    shown = str(messages[0].blocks)
    for fact in (REQUESTER, OWNER, "⚠️*s3:DeleteObject*", "Approve", "Deny", "sensitive_write"):
        assert fact in shown, fact
    assert f"{approval['risk_before']} → {approval['risk_after']}" in shown
    assert not _role_exists(rig, nhi_id)

    # An unsigned (wrongly signed) click is refused before anything is parsed.
    forged = await _click(rig, CAROL, ApprovalAction.APPROVE, approval_id, secret="not-it")
    assert forged.status_code == 401
    # The requester and the owner (both in the approvers' group) and an unlisted person.
    for email, why in (
        (REQUESTER, "requester cannot decide"),
        (OWNER, "owner cannot decide"),
        (MALLORY, "only the policy's approvers"),
    ):
        assert (await _click(rig, email, ApprovalAction.APPROVE, approval_id)).status_code == 200

        async def refused(email: str = email, why: str = why) -> None:
            assert any(why in t for t in _told(rig, email)), _told(rig, email)

        await eventually(refused)
    assert _nhi(rig, nhi_id).status == "pending_approval"
    assert not _role_exists(rig, nhi_id)

    # A listed approver approves: the role is created, the messages say who decided.
    assert (await _click(rig, CAROL, ApprovalAction.APPROVE, approval_id)).status_code == 200

    async def active() -> None:
        assert _nhi(rig, nhi_id).status == "active"

    await eventually(active)
    assert _role_exists(rig, nhi_id)

    async def rewritten() -> None:
        for current in _current(rig, messages):
            assert f"approved by {CAROL}" in str(current.text), current.text
            assert "Approve" not in str(current.blocks)

    await eventually(rewritten)

    # A second decision is refused, by anyone.
    assert (await _click(rig, DAVE, ApprovalAction.APPROVE, approval_id)).status_code == 200

    async def second_refused() -> None:
        assert any("already decided" in t for t in _told(rig, DAVE)), _told(rig, DAVE)

    await eventually(second_refused)
    row = _approval(rig, approval_id)
    assert row.status == "approved"
    assert [d["approver"] for d in row.decisions] == [CAROL]
    with transaction(rig.sessions) as s:
        events = list(
            s.scalars(select(AuditEvent.event).where(AuditEvent.subject_id == approval_id))
        )
    assert events == ["approval.requested", "approval.approved"]

    # The run replays; it is the golden history of the Slack approval path (one run per NHI;
    # `slack_approval_provision` keeps the provisioning run of before).
    handle = rig.env.client.get_workflow_handle(lifecycle_workflow_id(nhi_id))
    history = await handle.fetch_history()
    activities = str(history.to_json())
    assert "post_approval" in activities and "update_messages" in activities
    replayed = await Replayer(
        workflows=WORKFLOWS, data_converter=pydantic_data_converter
    ).replay_workflow(history, raise_on_replay_failure=True)
    assert replayed.replay_failure is None
    keep_history(history, "slack_approval_one_run")


async def test_deny_asks_for_a_reason_in_a_modal(rig: Rig, policy: Any) -> None:
    policy(approvers=[DAVE])
    nhi_id, accepted = await _request(rig, SENSITIVE)
    approval_id = accepted["approval"]["approval_id"]
    messages = await eventually(_returning(lambda: _approval_messages(rig, approval_id), 1))
    assert (await _click(rig, DAVE, ApprovalAction.DENY, approval_id)).status_code == 200

    async def opened() -> dict[str, Any]:
        views = [v for v in rig.slack.views if approval_id in str(v.get("private_metadata"))]
        assert views
        return views[-1]

    view = await eventually(opened)
    assert view["callback_id"] == ApprovalAction.DENY_MODAL
    submission = {
        "type": "view_submission",
        "user": {"id": rig.users[DAVE]},
        "view": {
            "id": view["id"],
            "callback_id": view["callback_id"],
            "private_metadata": view["private_metadata"],
            "state": {
                "values": {
                    DENY_REASON_BLOCK: {
                        DENY_REASON_INPUT: {"type": "plain_text_input", "value": "use a read role"}
                    }
                }
            },
        },
    }
    body, headers = signed_interaction(SIGNING_SECRET, submission)
    async with httpx.AsyncClient(base_url=rig.api, timeout=30) as http:
        assert (await http.post("/slack/interactions", content=body, headers=headers)).is_success

    async def denied() -> None:
        nhi = _nhi(rig, nhi_id)
        assert nhi.status == "failed"
        assert f"denied by {DAVE}" in str(nhi.status_reason)

    await eventually(denied)
    assert not _role_exists(rig, nhi_id)
    row = _approval(rig, approval_id)
    assert row.status == "denied"
    assert row.decisions[0]["reason"] == "use a read role"

    async def rewritten() -> None:
        (m,) = _current(rig, messages)
        assert f"denied by {DAVE}" in str(m.text)

    await eventually(rewritten)


async def test_no_decision_within_the_window_denies(rig: Rig, policy: Any) -> None:
    policy(approvers=[DAVE], approval_window_seconds=3600)
    nhi_id, accepted = await _request(rig, SENSITIVE)
    approval_id = accepted["approval"]["approval_id"]
    messages = await eventually(_returning(lambda: _approval_messages(rig, approval_id), 1))
    # The test server skips the hour.
    await rig.env.sleep(timedelta(hours=2))
    handle = rig.env.client.get_workflow_handle(lifecycle_workflow_id(nhi_id))

    async def ended() -> str:
        described = await handle.describe()
        assert described.status is WorkflowExecutionStatus.FAILED, described.status
        return str(_nhi(rig, nhi_id).status_reason)

    assert "no approver decided within 3600s" in await eventually(ended)
    assert _nhi(rig, nhi_id).status == "failed"
    assert not _role_exists(rig, nhi_id)
    (m,) = _current(rig, messages)
    assert "no decision in the window" in str(m.text)
    async with httpx.AsyncClient(base_url=rig.api, timeout=30) as http:
        security = _token(rig, MALLORY, "security")
        every = await http.get("/v1/approvals?all=true", headers=security)
        pending = await http.get("/v1/approvals", headers=security)
    # The workflow's window (skipped here) decided; the row no longer counts as pending.
    assert {a["id"]: a["status"] for a in every.json()}[approval_id] == "closed"
    assert approval_id not in [a["id"] for a in pending.json()]


async def test_production_needs_two_distinct_approvers(rig: Rig, policy: Any) -> None:
    policy("prod", approvers=[CAROL, DAVE], approvals_required=2)
    nhi_id, accepted = await _request(rig, SENSITIVE, environment="prod")
    approval_id = accepted["approval"]["approval_id"]
    assert accepted["approval"]["approvals_required"] == 2
    async with httpx.AsyncClient(base_url=rig.api, timeout=30) as http:
        carol, dave = _token(rig, CAROL, "approver"), _token(rig, DAVE, "approver")
        mallory = _token(rig, MALLORY, "approver")
        pending = await http.get("/v1/approvals", headers=dave)
        assert approval_id in [a["id"] for a in pending.json()]
        assert approval_id not in [
            a["id"] for a in (await http.get("/v1/approvals", headers=mallory)).json()
        ]
        refused = await http.post(
            f"/v1/approvals/{approval_id}/approve", json={"reason": "ok"}, headers=mallory
        )
        assert refused.status_code == 403, refused.text
        first = await http.post(
            f"/v1/approvals/{approval_id}/approve", json={"reason": "ok"}, headers=carol
        )
        assert first.status_code == 200, first.text
        assert first.json()["status"] == "pending"
        assert _nhi(rig, nhi_id).status == "pending_approval"
        assert not _role_exists(rig, nhi_id)
        again = await http.post(
            f"/v1/approvals/{approval_id}/approve",
            json={"reason": "still ok"},
            headers={**carol, "Idempotency-Key": "second-try"},
        )
        assert again.status_code == 409, again.text
        assert "different approver" in again.json()["detail"]
        second = await http.post(
            f"/v1/approvals/{approval_id}/approve", json={"reason": "agreed"}, headers=dave
        )
        assert second.status_code == 200, second.text
        assert second.json()["status"] == "approved"

    async def active() -> None:
        assert _nhi(rig, nhi_id).status == "active"

    await eventually(active)
    assert _role_exists(rig, nhi_id)


async def test_a_request_past_the_risk_threshold_waits_for_approval(rig: Rig, policy: Any) -> None:
    """No sensitive action, but a prod agent reaching data scores `production_data`: past a
    threshold of 10 it waits, and the answer and the message say which reasons moved it."""
    policy("prod", approvers=[DAVE], risk_threshold=10)
    nhi_id, accepted = await _request(rig, PLAIN, environment="prod")
    assert accepted["status"] == "pending_approval"
    approval = accepted["approval"]
    assert approval["risk_before"] <= 10 < approval["risk_after"]
    assert any(r.startswith("production_data +20") for r in approval["reasons"]), approval
    assert "production_data" in str(_nhi(rig, nhi_id).status_reason)
    (m,) = await eventually(_returning(lambda: _approval_messages(rig, approval["approval_id"]), 1))
    assert "production_data +20" in str(m.blocks)
    assert not _role_exists(rig, nhi_id)
    async with httpx.AsyncClient(base_url=rig.api, timeout=30) as http:
        ok = await http.post(
            f"/v1/approvals/{approval['approval_id']}/approve",
            json={"reason": "prod reads are expected"},
            headers=_token(rig, DAVE, "approver"),
        )
        assert ok.status_code == 200, ok.text

    async def active() -> None:
        assert _nhi(rig, nhi_id).status == "active"

    await eventually(active)

    # Below the threshold (another prod agent, threshold raised): no approval.
    policy("prod", risk_threshold=50)
    _, plain = await _request(rig, PLAIN, environment="prod")
    assert plain["status"] == "requested"
    assert plain["approval"] is None


async def test_risk_before_counts_the_agents_other_nhis_and_not_the_requested_one(
    rig: Rig, policy: Any
) -> None:
    """A request with nothing sensitive and no threshold reads no footprint; one that needs an
    approval reports `risk_before` as the agent's footprint before it: the NHI the agent
    already has counts, the one requested does not."""
    policy("prod", approvers=[DAVE])
    first_id, first = await _request(rig, PLAIN, environment="prod")
    assert first["status"] == "requested" and first["approval"] is None
    agent_id = _nhi(rig, first_id).agent_id
    platform = _token(rig, REQUESTER, "platform")
    async with httpx.AsyncClient(base_url=rig.api, timeout=30) as http:
        seen = await http.get(f"/v1/agents/{agent_id}/footprint", headers=platform)
        assert seen.status_code == 200, seen.text
        score = seen.json()["risk"]["score"]
        assert score > 0  # a prod agent reaching a data store
        second = await _ask(http, agent_id, SENSITIVE, platform)
    approval = second["approval"]
    assert approval["risk_before"] == score
    assert approval["risk_after"] > score


def _returning(fetch: Any, count: int) -> Any:
    async def run() -> Any:
        items = fetch()
        assert len(items) == count, items
        return items

    return run
