"""Bundles (issue 16, item 5): several NHIs of one agent validated together, approved together
and provisioned all or nothing, through the API over HTTP, on the time-skipping server, with
moto over HTTP. A failure is injected at the boundary (a botocore hook on the worker's IAM
client), never in our code."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from models.enums import Environment, NhiKind, Platform
from models.orm import Approval, Nhi, Policy
from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import PostgresTargetSetting, Settings
from nhi.infra.db import transaction
from nhi.rules.ids import lifecycle_workflow_id
from tests.conftest import Service, dev_address
from tests.helpers import (
    TRUST,
    ApiServer,
    agent_body,
    bearer,
    eventually,
    mint,
    run_sweep,
    sweep_settings,
)
from tests.pg_cluster import ADMIN, DATABASE, PgCluster
from worker import build_worker

APPROVER = "dave@example.com"
ROLE = {
    "platform": "aws",
    "kind": "iam_role",
    "scope": [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::kb-docs/*"]}],
    "trust_principal": TRUST,
}
KEY = {
    "platform": "aws",
    "kind": "iam_user_key",
    "scope": [{"actions": ["s3:ListBucket"], "resources": ["arn:aws:s3:::kb-docs"]}],
}
TARGET = f"bundledb{uuid.uuid4().hex[:6]}"
PASSWORD_ENV = "NHI_TEST_BUNDLE_ADMIN_PASSWORD"
READER = {
    "platform": "postgres",
    "kind": "postgres_role",
    "target": TARGET,
    "scope": [{"actions": ["SELECT"], "resources": ["docs.articles"]}],
}
SENSITIVE_ROLE = ROLE | {
    "scope": [{"actions": ["s3:DeleteObject"], "resources": ["arn:aws:s3:::kb-tmp/*"]}]
}


@dataclass
class Rig:
    env: WorkflowEnvironment
    settings: Settings
    sessions: sessionmaker[Session]
    aws: AwsClients
    worker_aws: AwsClients
    api: str
    cluster: PgCluster


@pytest_asyncio.fixture
async def rig(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    cluster: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Rig]:
    # Its own IAM path and name prefix, so a sweep here sweeps only what this test made; a
    # company database as a Postgres target, its admin password in the environment.
    monkeypatch.setenv(PASSWORD_ENV, cluster.admin_password)
    dsn = f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}"
    rig_settings = sweep_settings(
        settings,
        "bundle",
        sweep_preactive_seconds=3600,
        temporal_address=dev_address(ts_env),
        postgres_targets={TARGET: PostgresTargetSetting(dsn=dsn, password_env=PASSWORD_ENV)},
    )
    worker_aws = make_aws_clients(rig_settings)  # its own clients: faults stay in this test
    worker = build_worker(
        ts_env.client,
        rig_settings,
        sessions,
        worker_aws,
        task_queue=rig_settings.temporal_task_queue,
    )
    async with worker:
        with ApiServer(create_app(rig_settings)) as server:
            yield Rig(ts_env, rig_settings, sessions, aws, worker_aws, server.url, cluster)


@pytest.fixture
def approvers(sessions: sessionmaker[Session]) -> Iterator[None]:
    """The dev iam_role policy names an approver for the length of a test."""

    def row(s: Session) -> Policy:
        return s.scalars(
            select(Policy).where(
                Policy.platform == Platform.AWS,
                Policy.kind == NhiKind.IAM_ROLE,
                Policy.environment == Environment.DEV,
            )
        ).one()

    with transaction(sessions) as s:
        saved = list(row(s).approvers)
        row(s).approvers = [APPROVER]
    yield
    with transaction(sessions) as s:
        row(s).approvers = saved


def _platform(rig: Rig) -> dict[str, str]:
    return bearer(mint(rig.sessions, "bundle-platform", "platform", teams=["search"]))


async def _agent(http: httpx.AsyncClient, rig: Rig) -> str:
    created = await http.post("/v1/agents", json=agent_body(), headers=_platform(rig))
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _nhis(rig: Rig, agent_id: str) -> list[Nhi]:
    with transaction(rig.sessions) as s:
        return list(
            s.scalars(
                select(Nhi).where(Nhi.agent_id == uuid.UUID(agent_id)).order_by(Nhi.created_at)
            )
        )


def _fail_after(client: Any, operation: str, passes: int) -> Callable[[], None]:
    """Let the first `passes` calls of `operation` through to moto, then answer AccessDenied
    as IAM would (an SCP denying it); returns the function that lifts the fault."""
    seen = {"n": 0}
    body = (
        "<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code>"
        f"<Message>injected AccessDenied on {operation}</Message></Error>"
        "<RequestId>test</RequestId></ErrorResponse>"
    ).encode()

    class _Raw:
        def stream(self, **_: Any) -> Any:
            yield body

    def answer(request: Any, **_: Any) -> AWSResponse | None:
        seen["n"] += 1
        if seen["n"] <= passes:
            return None
        return AWSResponse(request.url, 403, {}, _Raw())  # type: ignore[arg-type]

    event = f"before-send.iam.{operation}"
    client.meta.events.register(event, answer)
    return lambda: client.meta.events.unregister(event, answer)


def _gone(call: Callable[[], Any], code: str) -> bool:
    try:
        call()
    except ClientError as err:
        return bool(err.response["Error"]["Code"] == code)
    return False


async def test_a_bundle_is_refused_whole_naming_the_item_and_field(rig: Rig) -> None:
    async with httpx.AsyncClient(base_url=rig.api, timeout=30) as http:
        agent_id = await _agent(http, rig)
        forbidden = ROLE | {"scope": [{"actions": ["iam:*"], "resources": ["arn:aws:s3:::x/*"]}]}
        refused = await http.post(
            f"/v1/agents/{agent_id}/nhis:batch",
            json={"nhis": [ROLE, KEY, forbidden]},
            headers=_platform(rig),
        )
        assert refused.status_code == 422, refused.text
        assert refused.json()["field"] == "nhis[2].scope[0].actions[0]"
        malformed = await http.post(
            f"/v1/agents/{agent_id}/nhis:batch",
            json={"nhis": [ROLE, KEY | {"ttl": True}]},
            headers=_platform(rig),
        )
        assert malformed.status_code == 422, malformed.text
        assert malformed.json()["field"].startswith("nhis[1].ttl")
    assert _nhis(rig, agent_id) == []


async def test_a_bundle_whose_third_nhi_fails_leaves_nothing_behind(rig: Rig) -> None:
    # An access key and a Postgres role are created; the third NHI's CreateRole is denied.
    lift = _fail_after(rig.worker_aws.iam, "CreateRole", passes=0)
    try:
        async with httpx.AsyncClient(base_url=rig.api, timeout=30) as http:
            agent_id = await _agent(http, rig)
            accepted = await http.post(
                f"/v1/agents/{agent_id}/nhis:batch",
                json={"nhis": [KEY, READER, ROLE]},
                headers=_platform(rig),
            )
        assert accepted.status_code == 202, accepted.text
        bundle = accepted.json()
        assert bundle["approval"] is None
        handle = rig.env.client.get_workflow_handle(bundle["workflow_id"])

        async def ended() -> Any:
            described = await handle.describe()
            assert described.status is WorkflowExecutionStatus.COMPLETED, described.status
            return await handle.result()

        result = await eventually(ended, timeout=60)
    finally:
        lift()
    assert "nhis[2] failed" in result["failed"] and "AccessDenied" in result["failed"]
    rows = _nhis(rig, agent_id)
    assert [n.status for n in rows] == ["failed", "failed", "failed"]
    user, reader, third = rows
    for removed in (user, reader):
        assert "removed: bundle item nhis[2] failed" in str(removed.status_reason)
        # Each was created and delivered before the third failed: its secret is gone too.
        ref = str(removed.credential_ref or "")
        assert ref
        assert _gone(
            partial(rig.aws.secrets.describe_secret, SecretId=ref), "ResourceNotFoundException"
        )
    iam = rig.aws.iam
    assert _gone(lambda: iam.get_user(UserName=user.name), "NoSuchEntity")
    assert _gone(lambda: iam.get_role(RoleName=third.name), "NoSuchEntity")
    with rig.cluster.connect() as conn:
        left = conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (reader.name + "%",)
        ).fetchall()
    assert left == []
    tagged = [u["UserName"] for u in iam.list_users(PathPrefix=rig.settings.iam_path)["Users"]] + [
        r["RoleName"] for r in iam.list_roles(PathPrefix=rig.settings.iam_path)["Roles"]
    ]
    assert not {n.name for n in rows} & set(tagged)
    # No lifecycle was handed anything.
    for nhi in rows:
        with pytest.raises(RPCError):
            await rig.env.client.get_workflow_handle(lifecycle_workflow_id(nhi.id)).describe()


async def test_a_bundle_is_approved_once_and_provisioned_together(
    rig: Rig, approvers: None
) -> None:
    async with httpx.AsyncClient(base_url=rig.api, timeout=30) as http:
        agent_id = await _agent(http, rig)
        accepted = await http.post(
            f"/v1/agents/{agent_id}/nhis:batch",
            json={"nhis": [SENSITIVE_ROLE, ROLE]},
            headers=_platform(rig),
        )
        assert accepted.status_code == 202, accepted.text
        bundle = accepted.json()
        approval = bundle["approval"]
        assert approval["approvers"] == [APPROVER]
        assert [n["status"] for n in bundle["nhis"]] == ["pending_approval"] * 2
        dave = bearer(mint(rig.sessions, "bundle-dave", "approver", email=APPROVER))
        listed = await http.get("/v1/approvals", headers=dave)
        (mine,) = [a for a in listed.json() if a["id"] == approval["approval_id"]]
        assert mine["bundle"] and len(mine["nhi_ids"]) == 2
        ok = await http.post(
            f"/v1/approvals/{approval['approval_id']}/approve",
            json={"reason": "the cleanup job needs both"},
            headers=dave,
        )
        assert ok.status_code == 200, ok.text

    async def active() -> None:
        assert [n.status for n in _nhis(rig, agent_id)] == ["active", "active"]

    await eventually(active, timeout=60)
    for nhi in _nhis(rig, agent_id):
        assert rig.aws.iam.get_role(RoleName=nhi.name)["Role"]["RoleName"] == nhi.name

    async def lifecycles_running() -> None:
        # The bundle records every sibling active first, then starts their lifecycles.
        for nhi in _nhis(rig, agent_id):
            handle = rig.env.client.get_workflow_handle(lifecycle_workflow_id(nhi.id))
            try:
                described = await handle.describe()
            except RPCError as err:
                assert err.status is not RPCStatusCode.NOT_FOUND, f"{handle.id} not started yet"
                raise
            assert described.status is WorkflowExecutionStatus.RUNNING

    await eventually(lifecycles_running, timeout=30)
    with transaction(rig.sessions) as s:
        count = s.scalar(
            select(func.count())
            .select_from(Approval)
            .where(Approval.agent_id == uuid.UUID(agent_id))
        )
    assert count == 1


async def test_a_bundle_waiting_for_its_approval_is_not_stuck_to_the_sweep(
    rig: Rig, approvers: None
) -> None:
    """Its NHIs have no provisioning run while the bundle waits: the sweep's pre-active
    check leaves them alone within the approval window."""
    async with httpx.AsyncClient(base_url=rig.api, timeout=30) as http:
        agent_id = await _agent(http, rig)
        accepted = await http.post(
            f"/v1/agents/{agent_id}/nhis:batch",
            json={"nhis": [SENSITIVE_ROLE, KEY]},
            headers=_platform(rig),
        )
        assert accepted.status_code == 202, accepted.text
    with transaction(rig.sessions) as s:
        for nhi in s.scalars(select(Nhi).where(Nhi.agent_id == uuid.UUID(agent_id))):
            nhi.created_at = nhi.created_at - timedelta(hours=2)
    outcome = await run_sweep(rig.env, rig.settings.temporal_task_queue)
    ids = {n.id for n in _nhis(rig, agent_id)}
    assert [f for f in outcome.findings if f.nhi_id in ids] == []
    assert [n.status for n in _nhis(rig, agent_id)] == ["pending_approval"] * 2


# ---- the CLI (the service as deployed: API over HTTP, worker, Temporal dev server) -------------

NHI_CLI = str(Path(sys.executable).parent / "nhi")


def _cli(service: Service, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NHI_API_URL=service.url, NHI_TOKEN=token)
    return subprocess.run([NHI_CLI, *args], env=env, capture_output=True, text=True, timeout=60)


async def test_provision_file_sends_a_bundle_and_approvals_list_shows_it(
    service: Service, tmp_path: Path
) -> None:
    platform = service.token("bundle-cli-platform", "platform", teams=["search"])
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
        created = await http.post("/v1/agents", json=agent_body(), headers=bearer(platform))
        agent_id = str(created.json()["id"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "- kind: iam_role\n  trust_principal: " + TRUST + "\n"
        "  scope: [{actions: [s3:GetObject], resources: ['arn:aws:s3:::kb-docs/*']}]\n"
        "- kind: iam_role\n  trust_principal: " + TRUST + "\n"
        "  scope: [{actions: ['iam:*'], resources: ['arn:aws:s3:::kb-docs/*']}]\n"
    )
    refused = await asyncio.to_thread(
        _cli, service, platform, "provision", agent_id, "--file", str(bad)
    )
    assert refused.returncode == 1, refused.stdout
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: nhis[1].scope[0].actions[0]"), line
    good = tmp_path / "bundle.yaml"
    good.write_text(
        "nhis:\n"
        "  - kind: iam_role\n    trust_principal: " + TRUST + "\n"
        "    scope: [{actions: [s3:DeleteObject], resources: ['arn:aws:s3:::kb-tmp/*']}]\n"
        "  - kind: iam_user_key\n"
        "    scope: [{actions: [s3:ListBucket], resources: ['arn:aws:s3:::kb-docs']}]\n"
    )
    sent = await asyncio.to_thread(
        _cli, service, platform, "--json", "provision", agent_id, "--file", str(good)
    )
    assert sent.returncode == 0, sent.stderr
    bundle = json.loads(sent.stdout)
    assert len(bundle["nhis"]) == 2 and bundle["approval"] is not None
    security = service.token("bundle-cli-security", "security", email="sec-cli@example.com")
    listed = await asyncio.to_thread(_cli, service, security, "--json", "approvals", "list")
    assert listed.returncode == 0, listed.stderr
    assert bundle["approval"]["approval_id"] in [a["id"] for a in json.loads(listed.stdout)]
    approver = service.token("bundle-cli-approver", "approver", email="approver-cli@example.com")
    decided = await asyncio.to_thread(
        _cli, service, approver, "--json", "approvals", "deny", bundle["approval"]["approval_id"],
        "--reason", "not in this form",
    )  # fmt: skip
    assert decided.returncode == 0, decided.stderr
    assert json.loads(decided.stdout)["status"] == "denied"
