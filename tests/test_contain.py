"""Containment of an agent (issue 17): one request quarantines every NHI and task credential of
the agent on AWS (moto over HTTP) and Postgres (a scram-sha-256 cluster), and each credential is
then tried by the test itself and refused; the incident lists each with its proof; release needs
a second person and restores the NHIs, while task credentials stay ended."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import pytest_asyncio
from botocore.exceptions import ClientError
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from activities.contain import REFUSED_TEXT
from api.app import create_app
from models.contracts import ContainAgentInput, ProvisionInput
from models.enums import IncidentStatus
from models.orm import AuditEvent, Incident, Nhi, TaskCredential
from models.schemas import AgentCreate, NhiCreate
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import PostgresTargetSetting, Settings
from nhi.infra.db import transaction
from nhi.rules.ids import containment_workflow_id, lifecycle_workflow_id, provision_workflow_id
from nhi.services import agents, incidents, nhis
from tests.conftest import dev_address
from tests.helpers import (
    ROLE_SCOPE,
    TRUST,
    ApiServer,
    agent_body,
    bearer,
    eventually,
    keep_history,
    mint,
)
from tests.pg_cluster import ADMIN, DATABASE, PgCluster, login, refused
from worker import build_worker
from workflows.contain import ContainAgentWorkflow
from workflows.provision import ProvisionNhiWorkflow

PASSWORD_ENV = "NHI_TEST_CONTAIN_ADMIN_PASSWORD"
OWNER = "ana@example.com"
READ_ARTICLES = [{"actions": ["SELECT"], "resources": ["docs.articles"]}]
USER_SCOPE = [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::kb-docs/*"]}]


@dataclass
class Rig:
    env: WorkflowEnvironment
    settings: Settings
    sessions: sessionmaker[Session]
    aws: AwsClients
    cluster: PgCluster
    url: str
    target: str

    def token(self, name: str, role: str, email: str | None = None) -> dict[str, str]:
        return bearer(mint(self.sessions, name, role, teams=["search"], email=email))


@pytest.fixture
def task_policies(sessions: sessionmaker[Session]) -> Iterator[None]:
    def allow(on: bool) -> None:
        with transaction(sessions) as session:
            session.execute(
                text(
                    "UPDATE policies SET allow_task_credentials = :on "
                    "WHERE environment = 'dev' AND kind IN ('postgres_role', 'iam_role')"
                ),
                {"on": on},
            )

    allow(True)
    yield
    allow(False)


@pytest_asyncio.fixture
async def rig(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    cluster: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
    task_policies: None,
) -> AsyncIterator[Rig]:
    """The API over HTTP and a worker on the real-time dev server, with a Postgres target."""
    target = f"contain{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv(PASSWORD_ENV, cluster.admin_password)
    dsn = f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}"
    rig_settings = settings.model_copy(
        update={
            "temporal_address": dev_address(dev_env),
            "temporal_task_queue": f"contain-{uuid.uuid4().hex[:8]}",
            "postgres_targets": {target: PostgresTargetSetting(dsn=dsn, password_env=PASSWORD_ENV)},
        }
    )
    worker = build_worker(dev_env.client, rig_settings, sessions, aws)
    async with worker:
        with ApiServer(create_app(rig_settings)) as server:
            yield Rig(dev_env, rig_settings, sessions, aws, cluster, server.url, target)


async def agent_with_nhis(
    rig: Rig, spec: list[tuple[str, dict[str, Any]]]
) -> tuple[uuid.UUID, list[Nhi]]:
    """One agent with an NHI per (kind, fields), each provisioned to active."""
    with transaction(rig.sessions) as session:
        agent = agents.create_agent(
            session, AgentCreate(**agent_body(owner_email=OWNER)), "test:platform"
        )
        ids = []
        for kind, fields in spec:
            platform = "postgres" if kind == "postgres_role" else "aws"
            nhi, _ = nhis.request_nhi(
                session,
                rig.settings,
                agent.id,
                NhiCreate(platform=platform, kind=kind, **fields),
                "test:platform",
            )
            ids.append(nhi.id)
        agent_id = agent.id
    for nhi_id in ids:
        await rig.env.client.execute_workflow(
            ProvisionNhiWorkflow.run,
            ProvisionInput(nhi_id=nhi_id),
            id=provision_workflow_id(nhi_id),
            task_queue=rig.settings.temporal_task_queue,
        )
    with transaction(rig.sessions) as session:
        rows = [session.get_one(Nhi, i) for i in ids]
        for row in rows:
            session.expunge(row)
    assert all(r.status == "active" for r in rows), [(r.kind, r.status) for r in rows]
    return agent_id, rows


def secret(rig: Rig, nhi: Nhi) -> dict[str, Any]:
    value = rig.aws.secrets.get_secret_value(SecretId=nhi.credential_ref or "")
    return dict(json.loads(value["SecretString"]))


def nhi_count(rig: Rig, agent_id: uuid.UUID) -> int:
    with transaction(rig.sessions) as session:
        return len(session.scalars(select(Nhi.id).where(Nhi.agent_id == agent_id)).all())


def nhi_status(rig: Rig, nhi_id: uuid.UUID) -> str:
    with transaction(rig.sessions) as session:
        return session.get_one(Nhi, nhi_id).status


def events_of(rig: Rig, subject: uuid.UUID) -> list[str]:
    with transaction(rig.sessions) as session:
        return list(
            session.scalars(
                select(AuditEvent.event)
                .where(AuditEvent.subject_id == str(subject))
                .order_by(AuditEvent.id)
            )
        )


def key_refused(rig: Rig, key: dict[str, Any]) -> bool:
    """STS with the key. moto (IAM auth off) accepts any key it knows, so the test also reads
    what AWS itself enforces: the key inactive and the deny-all in place."""
    try:
        rig.aws.sts_as(key["AccessKeyId"], key["SecretAccessKey"]).get_caller_identity()
    except ClientError:
        return True
    return False


@pytest.mark.slow
async def test_containment_kills_every_credential_and_release_needs_a_second_person(
    rig: Rig,
) -> None:
    agent_id, (user, role, pg) = await agent_with_nhis(
        rig,
        [
            ("iam_user_key", {"scope": USER_SCOPE}),
            ("iam_role", {"scope": ROLE_SCOPE, "trust_principal": TRUST}),
            ("postgres_role", {"scope": READ_ARTICLES, "target": rig.target}),
        ],
    )
    owner = rig.token("ct-owner", "platform", OWNER)
    security = rig.token("ct-sec", "security", "sam@example.com")
    security_again = rig.token("ct-sec-laptop", "security", "SAM@example.com")
    approver = rig.token("ct-approver", "approver", "cho@example.com")
    async with httpx.AsyncClient(base_url=rig.url, timeout=60) as http:
        issued = await http.post(
            f"/v1/nhis/{pg.id}/credentials", headers=owner, json={"ttl": "30m"}
        )
        assert issued.status_code == 201, issued.text
        task = issued.json()
        task_login = task["postgres"]
        session_issued = await http.post(
            f"/v1/nhis/{role.id}/credentials", headers=owner, json={"ttl": "30m"}
        )
        assert session_issued.status_code == 201, session_issued.text
        aws_task = session_issued.json()
        # Every credential works before containment.
        key, login_secret = secret(rig, user), secret(rig, pg)
        assert not refused(login_secret) and not refused(task_login)
        assert not key_refused(rig, key)
        live = login(login_secret)

        # Who may not contain: an auditor, a platform caller of the team (403).
        for name, role_name in (("ct-auditor", "auditor"), ("ct-platform", "platform")):
            answer = await http.post(
                f"/v1/agents/{agent_id}/contain",
                headers=rig.token(name, role_name),
                json={"reason": "suspicious"},
            )
            assert answer.status_code == 403, (role_name, answer.text)
        missing = await http.post(
            f"/v1/agents/{uuid.uuid4()}/contain", headers=security, json={"reason": "x"}
        )
        assert missing.status_code == 404
        assert (
            await http.post(f"/v1/agents/{agent_id}/contain", headers=security, json={})
        ).status_code == 422

        opened = await http.post(
            f"/v1/agents/{agent_id}/contain",
            headers=security,
            json={"reason": "exfiltration suspected"},
        )
        assert opened.status_code == 202, opened.text
        incident = opened.json()
        again = await http.post(
            f"/v1/agents/{agent_id}/contain", headers=security, json={"reason": "again"}
        )
        assert again.status_code == 202 and again.json()["id"] == incident["id"], "joined"

        async def contained() -> dict[str, Any]:
            got = await http.get(f"/v1/incidents/{incident['id']}", headers=security)
            assert got.status_code == 200
            body = dict(got.json())
            assert body["status"] == "contained", body["report"].get("cause")
            return body

        done = await eventually(contained, timeout=60)

        # The test tries every credential itself.
        assert refused(login_secret), "the NHI's Postgres password no longer logs in"
        assert refused(task_login), "the task credential's password no longer logs in"
        with pytest.raises(psycopg.OperationalError):
            live.execute("SELECT 1")  # its live session was ended
        live.close()
        keys = rig.aws.iam.list_access_keys(UserName=user.name)["AccessKeyMetadata"]
        assert [k["Status"] for k in keys] == ["Inactive"]
        assert "nhi-quarantine" in rig.aws.iam.list_user_policies(UserName=user.name)["PolicyNames"]
        assert {"nhi-quarantine", "nhi-revoke-older-sessions"} <= set(
            rig.aws.iam.list_role_policies(RoleName=role.name)["PolicyNames"]
        )

        # The incident lists each credential with its proof.
        proofs = {c["credential"]: c for c in done["report"]["credentials"]}
        assert all(c["proven"] for c in proofs.values()), proofs
        assert proofs[f"access key {key['AccessKeyId']}"]["platform"] == "aws"
        assert (
            "IAM: active keys none, deny-all attached"
            in proofs[f"access key {key['AccessKeyId']}"]["proof"]
        )
        assert proofs[f"role {role.name}"]["proof"].startswith("deny-all")
        pg_login = proofs[f"login {login_secret['username']}"]
        assert pg_login["method"] == "tried" and REFUSED_TEXT.search(pg_login["proof"])
        assert proofs[f"task role {task['name']}"]["proof"] == "dropped (not in pg_roles)"
        aws_session = proofs[f"task session {aws_task['name']}"]
        assert aws_session["proven"] and "deny-all" in aws_session["proof"]
        assert "quarantined" in pg_login["action"]
        assert done["contained_at"] and done["opened_by"] == "token:ct-sec"
        assert [t["event"] for t in done["report"]["timeline"]][:2] == ["opened", "pass"]
        assert set(done["report"]["lifecycles"].values()) == {"update"}
        for nhi in (user, role, pg):
            await eventually(partial(_quarantined, rig, nhi.id))
        with transaction(rig.sessions) as session:
            for issued_task in (task, aws_task):
                row = session.get_one(TaskCredential, uuid.UUID(issued_task["id"]))
                assert (row.status, row.end_reason) == ("ended", "parent_quarantined")

        listed = await http.get("/v1/incidents", headers=owner, params={"agent_id": str(agent_id)})
        assert [i["id"] for i in listed.json()] == [incident["id"]], "the owner sees it"
        other = await http.get(
            f"/v1/incidents/{incident['id']}", headers=rig.token("ct-other", "platform")
        )
        assert other.status_code == 200  # same team
        hidden = await http.get(
            f"/v1/incidents/{incident['id']}",
            headers=bearer(mint(rig.sessions, "ct-elsewhere", "platform", teams=["billing"])),
        )
        assert hidden.status_code == 404

        # No new identity for a contained agent: refused before anything is recorded (a
        # request recorded before the incident is refused by provisioning: test_one_run.py).
        before = nhi_count(rig, agent_id)
        request = {
            "platform": "aws",
            "kind": "iam_role",
            "scope": ROLE_SCOPE,
            "trust_principal": TRUST,
        }
        single = await http.post(f"/v1/agents/{agent_id}/nhis", headers=owner, json=request)
        assert single.status_code == 409 and "is contained" in single.text, single.text
        assert incident["id"] in single.json()["detail"]
        bundle = await http.post(
            f"/v1/agents/{agent_id}/nhis:batch", headers=owner, json={"nhis": [request]}
        )
        assert bundle.status_code == 409 and "is contained" in bundle.text, bundle.text
        assert nhi_count(rig, agent_id) == before

        # The owner cannot lift it NHI by NHI either: only a release does.
        blocked = await http.post(f"/v1/nhis/{pg.id}/restore", headers=owner, json={"reason": "x"})
        assert blocked.status_code == 409 and "contained" in blocked.text, blocked.text
        assert refused(login_secret)

        # Release: not by the person who contained it, whichever credential they use.
        for who in (security, security_again):
            refused_release = await http.post(
                f"/v1/agents/{agent_id}/release", headers=who, json={"reason": "false alarm"}
            )
            assert refused_release.status_code == 403, refused_release.text
        assert (
            await http.post(
                f"/v1/agents/{agent_id}/release", headers=owner, json={"reason": "mine"}
            )
        ).status_code == 403, "an owner is no approver"
        released = await http.post(
            f"/v1/agents/{agent_id}/release", headers=approver, json={"reason": "false alarm"}
        )
        assert released.status_code == 200, released.text
        body = released.json()
        assert body["status"] == "released" and body["released_by"] == "token:ct-approver"
        assert set(body["report"]["release"].values()) == {"restored"}, body["report"]["release"]

    # The NHIs work again; the task credential stays ended.
    for nhi in (user, role, pg):
        assert nhi_status(rig, nhi.id) == "active"
    assert not refused(login_secret)
    assert refused(task_login)
    assert [
        k["Status"] for k in rig.aws.iam.list_access_keys(UserName=user.name)["AccessKeyMetadata"]
    ] == ["Active"]
    trail = events_of(rig, uuid.UUID(incident["id"]))
    assert trail == ["incident.opened", "incident.contained", "incident.released"]
    with transaction(rig.sessions) as session:
        assert (
            session.get_one(Incident, uuid.UUID(incident["id"])).status is IncidentStatus.RELEASED
        )
    handle = rig.env.client.get_workflow_handle_for(
        ContainAgentWorkflow.run, containment_workflow_id(agent_id)
    )
    keep_history(await handle.fetch_history(), "containment")


async def _quarantined(rig: Rig, nhi_id: uuid.UUID) -> None:
    assert nhi_status(rig, nhi_id) == "quarantined"


@pytest.mark.slow
async def test_a_partial_containment_says_why_and_is_retried_until_it_holds(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The automatic path (a severe finding) opens the incident itself. A platform that cannot
    be reached leaves the incident `partially_contained` with the cause, and the next pass
    contains it once the platform answers again."""
    agent_id, (role, pg) = await agent_with_nhis(
        rig,
        [
            ("iam_role", {"scope": ROLE_SCOPE, "trust_principal": TRUST}),
            ("postgres_role", {"scope": READ_ARTICLES, "target": rig.target}),
        ],
    )
    login_secret = secret(rig, pg)
    monkeypatch.delenv(PASSWORD_ENV)  # the worker can no longer reach the target as admin
    finding = uuid.uuid4()
    handle = await rig.env.client.start_workflow(
        ContainAgentWorkflow.run,
        ContainAgentInput(
            agent_id=agent_id,
            reason="use after quarantine",
            actor="system:auto-contain",
            finding_id=finding,
            retry_seconds=1,
        ),
        id=containment_workflow_id(agent_id),
        task_queue=rig.settings.temporal_task_queue,
    )

    async def partially() -> Incident:
        with transaction(rig.sessions) as session:
            row = session.scalars(
                select(Incident).where(Incident.agent_id == agent_id)
            ).one_or_none()
            assert row is not None, "the workflow opens the incident"
            session.expunge(row)
        assert row.status is IncidentStatus.PARTIALLY_CONTAINED
        return row

    incident = await eventually(partially, timeout=60)
    assert incident.finding_id == finding and incident.opened_by == "system:auto-contain"
    assert PASSWORD_ENV in (incident.report["cause"] or ""), incident.report["cause"]
    proofs = {c["credential"]: c["proven"] for c in incident.report["credentials"]}
    assert proofs[f"role {role.name}"] is True, "what could be contained is"
    assert not refused(login_secret), "the login still works: that is what the cause says"

    monkeypatch.setenv(PASSWORD_ENV, rig.cluster.admin_password)
    assert await handle.result() is IncidentStatus.CONTAINED
    assert refused(login_secret)
    assert events_of(rig, incident.id) == [
        "incident.opened",
        "incident.partially_contained",
        "incident.contained",
    ]
    keep_history(await handle.fetch_history(), "containment_partial")


NHI_CLI = str(Path(sys.executable).parent / "nhi")


async def cli(rig: Rig, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The `nhi` console script as a person runs it (off the loop: the worker runs on it)."""
    env = {**os.environ, "NHI_API_URL": rig.url, "NHI_TOKEN": token}
    return await asyncio.to_thread(
        subprocess.run, [NHI_CLI, *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
async def test_the_cli_contains_shows_and_releases(rig: Rig) -> None:
    agent_id, (pg,) = await agent_with_nhis(
        rig, [("postgres_role", {"scope": READ_ARTICLES, "target": rig.target})]
    )
    security = mint(rig.sessions, "ct-cli-sec", "security", email="sam@example.com")
    approver = mint(rig.sessions, "ct-cli-approver", "approver", email="cho@example.com")
    auditor = mint(rig.sessions, "ct-cli-auditor", "auditor")

    # Its lifecycle is gone (terminated): containment starts a fresh one to hold it.
    await rig.env.client.get_workflow_handle(lifecycle_workflow_id(pg.id)).terminate("test")

    denied = await cli(rig, auditor, "contain", str(agent_id), "--reason", "x")
    assert denied.returncode == 1 and len(denied.stderr.strip().splitlines()) == 1
    assert "security or admin role" in denied.stderr and "403" in denied.stderr
    missing = await cli(rig, security, "contain", str(agent_id))
    assert missing.returncode != 0 and "--reason" in missing.stderr

    opened = await cli(rig, security, "--json", "contain", str(agent_id), "--reason", "leak")
    assert opened.returncode == 0, opened.stderr
    incident = json.loads(opened.stdout)["id"]

    async def contained() -> str:
        shown = await cli(rig, security, "incidents", "show", incident)
        assert shown.returncode == 0, shown.stderr
        assert "contained" in shown.stdout.split("\n")[1], shown.stdout
        return shown.stdout

    shown = await eventually(contained, timeout=60)
    assert f"login {secret(rig, pg)['username']}" in shown and "login refused" in shown
    with transaction(rig.sessions) as session:
        row = session.get_one(Incident, uuid.UUID(incident))
        assert row.report["lifecycles"] == {str(pg.id): "fresh_lifecycle"}
    listed = await cli(rig, security, "incidents", "list", "--agent", str(agent_id))
    assert incident in listed.stdout
    assert refused(secret(rig, pg))

    same = await cli(rig, security, "release", str(agent_id), "--reason", "mine")
    assert same.returncode == 1 and "cannot release it" in same.stderr
    released = await cli(rig, approver, "release", str(agent_id), "--reason", "false alarm")
    assert released.returncode == 0, released.stderr
    assert "released" not in released.stderr and incident in released.stdout
    assert not refused(secret(rig, pg))


def test_a_pass_that_could_not_hold_a_lifecycle_is_partial_and_repeated(
    sessions: sessionmaker[Session],
) -> None:
    """Every credential proven dead, but a lifecycle not held (its hold failed or was not
    answered): the lifecycle could still rotate or restore behind the incident, so the pass is
    partial, says why, and the playbook passes again; once held, contained."""
    with transaction(sessions) as session:
        agent = agents.create_agent(
            session, AgentCreate(**agent_body(owner_email=OWNER)), "test:platform"
        )
        incident, _ = incidents.open_incident(
            session, agent.id, reason="suspicious", actor="api:sam", person="sam"
        )
        incident_id = incident.id
    nhi_a, nhi_b = str(uuid.uuid4()), str(uuid.uuid4())
    dead = [{"credential": "role r", "proof": "deny-all", "proven": True}]

    def record(attempt: int, lifecycles: dict[str, str]) -> tuple[IncidentStatus, Any]:
        with transaction(sessions) as session:
            status = incidents.record_pass(
                session,
                incident_id,
                credentials=dead,
                lifecycles=lifecycles,
                timeline=[],
                attempt=attempt,
                key=f"test/{incident_id}/{attempt}",
            )
            return status, session.get_one(Incident, incident_id).report["cause"]

    status, cause = record(
        1,
        {
            nhi_a: "hold failed: the lifecycle of nhi x is still provisioning it",
            nhi_b: "the lifecycle did not answer within 20s",
        },
    )
    assert status is IncidentStatus.PARTIALLY_CONTAINED
    assert f"lifecycle of nhi {nhi_a} not held: hold failed" in cause
    assert f"lifecycle of nhi {nhi_b} not held: the lifecycle did not answer" in cause
    status, cause = record(2, {nhi_a: "update", nhi_b: "not needed: already quarantined"})
    assert (status, cause) == (IncidentStatus.CONTAINED, None)
