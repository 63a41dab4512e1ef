"""Task credentials (issue 15): short-lived credentials issued from an active NHI for one task,
proven on the platforms themselves: a real SCRAM login and SELECTs on a scram-sha-256 cluster,
the STS identity of the assumed-role session on moto (over HTTP), and what the API refuses.

The parents are provisioned as deployed (API + worker on the Temporal dev server); issuance
then runs in a second API server of our own over the same inventory, whose STS client the test
can watch (moto keeps neither session tags nor SourceIdentity, so the AssumeRole request is
read where it leaves the process).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import psycopg
import pytest
import pytest_asyncio
from fastapi import FastAPI
from psycopg import sql
from sqlalchemy import event, select, text
from sqlalchemy.orm import Session, sessionmaker

from activities.providers import postgres_ddl as ddl
from activities.providers.postgres_task import (
    IDLE_IN_TRANSACTION_MS,
    PasswordStock,
    PostgresTaskProvider,
    RoleStock,
)
from activities.providers.registry import build_task_providers
from api.app import create_app
from models.enums import IncidentStatus, Platform, Role
from models.orm import AuditEvent, IdempotencyKey, Incident, TaskCredential
from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.rules.pg_grants import parse_comment
from nhi.rules.task_credentials import (
    STOCK_NHI_ID,
    IssuedCredential,
    PreparedCredential,
    TaskGrant,
    TwoPhaseIssuer,
    check_aws_narrowing,
    scram_verifier,
    task_role_name,
)
from nhi.services import task_credentials
from nhi.services.auth import Principal, issue_token, revoke_token
from nhi.services.errors import Conflict
from nhi.services.target_registry import TargetRegistry
from tests.conftest import Service
from tests.helpers import TRUST, ApiServer, agent_body, bearer, eventually, request_nhi
from tests.pg_cluster import ADMIN, DATABASE, PgCluster

PASSWORD_ENV = "NHI_TARGET_PASSWORD_TASKCREDS"
PG_SCOPE = [{"actions": ["SELECT"], "resources": ["docs.articles", "docs.faq"]}]
AWS_SCOPE = [
    {"actions": ["s3:GetObject", "s3:ListBucket"], "resources": ["arn:aws:s3:::kb-docs/*"]},
    {
        "actions": ["dynamodb:GetItem"],
        "resources": ["arn:aws:dynamodb:us-east-1:123456789012:table/kb"],
    },
]


@dataclass
class World:
    """Two parents (Postgres and AWS) of one agent, tokens for every kind of caller, and the
    issuing API server with the AssumeRole requests it sent."""

    url: str
    sessions: sessionmaker[Session]
    cluster: PgCluster
    app: FastAPI
    agent_id: uuid.UUID
    pg_nhi: dict[str, Any]
    aws_nhi: dict[str, Any]
    agent_token: str
    other_agent_token: str
    owner_token: str
    auditor_token: str
    teammate_token: str
    assume_role_calls: list[dict[str, Any]] = field(default_factory=list)


def _token(sessions: sessionmaker[Session], role: Role, **kw: Any) -> str:
    with transaction(sessions) as session:
        _, plaintext = issue_token(
            session,
            name=f"tc-{role.value}-{uuid.uuid4().hex[:8]}",
            role=role,
            ttl="1d",
            created_by="test:setup",
            **kw,
        )
    return plaintext


def _allow_task_credentials(sessions: sessionmaker[Session], allow: bool) -> None:
    with transaction(sessions) as session:
        session.execute(
            text(
                "UPDATE policies SET allow_task_credentials = :allow, "
                "task_credential_max_ttl_seconds = 3600 "
                "WHERE environment = 'dev' AND kind IN ('postgres_role', 'iam_role')"
            ),
            {"allow": allow},
        )


@pytest.fixture(scope="module")
def target_password(cluster: PgCluster) -> Iterator[None]:
    os.environ[PASSWORD_ENV] = cluster.admin_password
    yield
    os.environ.pop(PASSWORD_ENV, None)


@pytest_asyncio.fixture(scope="module")
async def world(
    service: Service, sessions: sessionmaker[Session], cluster: PgCluster, target_password: None
) -> AsyncIterator[World]:
    _allow_task_credentials(sessions, True)
    owner = f"owner-{uuid.uuid4().hex[:8]}@example.com"
    platform = service.token("tc-platform", "platform", teams=["search"])
    admin = service.token("tc-admin", "admin")
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
        target = f"tc{uuid.uuid4().hex[:8]}"
        created = await http.post(
            "/v1/targets",
            headers=bearer(admin),
            json={
                "name": target,
                "dsn": f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}",
                "password_env": PASSWORD_ENV,
            },
        )
        assert created.status_code == 201, created.text
        agent = (
            await http.post(
                "/v1/agents", headers=bearer(platform), json=agent_body(owner_email=owner)
            )
        ).json()
        other = (await http.post("/v1/agents", headers=bearer(platform), json=agent_body())).json()
        requests = [
            {"platform": "postgres", "kind": "postgres_role", "target": target, "scope": PG_SCOPE},
            {"platform": "aws", "kind": "iam_role", "scope": AWS_SCOPE, "trust_principal": TRUST},
        ]
        accepted = []
        for body in requests:
            answer = await http.post(
                f"/v1/agents/{agent['id']}/nhis", headers=bearer(platform), json=body
            )
            assert answer.status_code == 202, answer.text
            accepted.append(answer.json())

        async def active(nhi_id: str) -> dict[str, Any]:
            nhi = (await http.get(f"/v1/nhis/{nhi_id}", headers=bearer(platform))).json()
            assert nhi["status"] == "active", nhi
            return dict(nhi)

        pg_nhi = await eventually(lambda: active(accepted[0]["id"]), timeout=60)
        aws_nhi = await eventually(lambda: active(accepted[1]["id"]), timeout=60)

    # The issuing API: same settings and inventory, its STS requests observed where they leave.
    app = create_app(service.settings)
    calls: list[dict[str, Any]] = []
    aws = make_aws_clients(service.settings)
    aws.sts.meta.events.register(
        "provide-client-params.sts.AssumeRole", lambda params, **_: calls.append(dict(params))
    )
    with ApiServer(app) as server:
        app.state.nhi.task_issuers = build_task_providers(
            aws, TargetRegistry(sessions, service.settings, aws.secrets)
        )
        agent_id = uuid.UUID(agent["id"])
        yield World(
            url=server.url,
            sessions=sessions,
            cluster=cluster,
            app=app,
            agent_id=agent_id,
            pg_nhi=pg_nhi,
            aws_nhi=aws_nhi,
            agent_token=_token(sessions, Role.AGENT, agent_id=agent_id),
            other_agent_token=_token(sessions, Role.AGENT, agent_id=uuid.UUID(other["id"])),
            owner_token=_token(sessions, Role.APPROVER, email=owner),
            auditor_token=_token(sessions, Role.AUDITOR, email=owner),
            teammate_token=_token(sessions, Role.PLATFORM, teams=["search"]),
            assume_role_calls=calls,
        )
    _allow_task_credentials(sessions, False)


async def _issue(
    world: World, token: str, nhi: dict[str, Any], key: str | None = None, **body: Any
) -> httpx.Response:
    headers = bearer(token) | ({"Idempotency-Key": key} if key else {})
    async with httpx.AsyncClient(base_url=world.url, timeout=30) as http:
        return await http.post(f"/v1/nhis/{nhi['id']}/credentials", headers=headers, json=body)


def _login(pg: dict[str, Any]) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(
        host=pg["host"],
        port=pg["port"],
        dbname=pg["dbname"],
        user=pg["username"],
        password=pg["password"],
        connect_timeout=5,
        autocommit=True,
    )


def _row(world: World, credential_id: str) -> TaskCredential:
    with transaction(world.sessions) as s:
        row = s.get_one(TaskCredential, uuid.UUID(credential_id))
        s.expunge(row)
        return row


def _issued_event(world: World, credential_id: str, nhi_id: str) -> AuditEvent:
    """The one audit event of an issuance: on the credential's own trail, naming its NHI."""
    with transaction(world.sessions) as s:
        [event] = s.scalars(select(AuditEvent).where(AuditEvent.subject_id == credential_id))
        s.expunge_all()
    assert (event.subject_type, event.event) == ("task_credential", task_credentials.ISSUED_EVENT)
    assert event.details["nhi_id"] == nhi_id
    return event


def _ended_unissued(world: World, task_id: str) -> TaskCredential:
    """The one row of `task_id`, ended as `issue_failed`, whose role is not on the target."""
    with transaction(world.sessions) as s:
        row = s.scalars(select(TaskCredential).where(TaskCredential.task_id == task_id)).one()
    assert (row.status, row.end_reason) == ("ended", "issue_failed")
    with world.cluster.connect() as conn:
        found = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (row.name,)).fetchone()
    assert found is None, f"role {row.name} was never committed"
    return row


def _count(world: World) -> int:
    with transaction(world.sessions) as s:
        return len(list(s.scalars(select(TaskCredential.id))))


# ---- Postgres --------------------------------------------------------------------------------


async def test_a_postgres_task_credential_logs_in_with_scram_and_reads(world: World) -> None:
    answer = await _issue(world, world.agent_token, world.pg_nhi, ttl="15m", task_id="task-1")
    assert answer.status_code == 201, answer.text
    assert answer.headers["cache-control"] == "no-store"
    issued = answer.json()
    pg = issued["postgres"]
    assert issued["aws"] is None and issued["task_id"] == "task-1"
    assert pg["username"] == task_role_name(uuid.UUID(issued["id"])) == issued["name"]
    assert pg["password"] not in pg["dsn"]
    expires_at = datetime.fromisoformat(issued["expires_at"])
    assert abs((expires_at - datetime.now(UTC)) - timedelta(minutes=15)) < timedelta(seconds=30)

    with _login(pg) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (pg["username"],)
        assert conn.execute("SELECT count(*) FROM docs.articles").fetchone() == (3,)
        assert conn.execute("SELECT count(*) FROM docs.faq").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM hr.salaries")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM docs.articles")

    with world.cluster.connect() as conn:
        row = conn.execute(
            "SELECT rolcanlogin, rolvaliduntil, rolconnlimit, rolpassword, "
            "shobj_description(oid, 'pg_authid') FROM pg_authid WHERE rolname = %s",
            (pg["username"],),
        ).fetchone()
    assert row is not None
    can_login, valid_until, conn_limit, verifier, comment = row
    assert can_login and valid_until == expires_at, "VALID UNTIL is the expiry exactly"
    assert conn_limit == 10, "the target's connection limit"
    assert str(verifier).startswith("SCRAM-SHA-256$4096:") and pg["password"] not in verifier
    marker = parse_comment(str(comment))
    assert marker is not None and marker["part"] == "task"
    assert marker["task-credential-id"] == issued["id"]
    assert marker["nhi-id"] == world.pg_nhi["id"]

    stored = _row(world, issued["id"])
    assert (stored.status, stored.name, stored.task_id) == ("active", pg["username"], "task-1")
    assert stored.scope is None and stored.expires_at == expires_at
    assert stored.issued_by.startswith("token:tc-agent-")
    event = _issued_event(world, issued["id"], world.pg_nhi["id"])
    assert event.actor == stored.issued_by
    assert event.details["agent_id"] == str(world.agent_id)
    assert event.details["task_id"] == "task-1" and event.details["ttl_seconds"] == 900
    assert pg["password"] not in str(event.details) + event.reason


async def test_a_narrowed_postgres_scope_is_enforced_by_the_database(world: World) -> None:
    narrowed = [{"actions": ["SELECT"], "resources": ["docs.articles"]}]
    answer = await _issue(world, world.owner_token, world.pg_nhi, ttl="10m", scope=narrowed)
    assert answer.status_code == 201, answer.text
    issued = answer.json()
    assert issued["scope"] == narrowed
    with _login(issued["postgres"]) as conn:
        assert conn.execute("SELECT count(*) FROM docs.articles").fetchone() == (3,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM docs.faq")
    with _login(issued["postgres"]) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        # Not a member of the NHI's group: the whole scope is out of reach.
        conn.execute(f'SET ROLE "{world.pg_nhi["name"]}"')
    assert _row(world, issued["id"]).scope == narrowed


@pytest.mark.parametrize(
    ("scope", "field"),
    [
        ([{"actions": ["SELECT"], "resources": ["hr.salaries"]}], "scope[0].resources[0]"),
        ([{"actions": ["INSERT"], "resources": ["docs.articles"]}], "scope[0].actions[0]"),
        ([{"actions": ["SELECT"], "resources": ["docs.*"]}], "scope[0].resources[0]"),
        (
            [
                {"actions": ["SELECT"], "resources": ["docs.faq"]},
                {"actions": ["SELECT"], "resources": ["docs.articles", "hr.salaries"]},
            ],
            "scope[1].resources[1]",
        ),
        ([{"actions": ["SUPERUSER"], "resources": ["docs.articles"]}], "scope[0].actions[0]"),
    ],
)
async def test_a_widening_scope_is_refused_naming_the_field(
    world: World, scope: list[dict[str, Any]], field: str
) -> None:
    before = _count(world)
    answer = await _issue(world, world.agent_token, world.pg_nhi, scope=scope)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
    assert _count(world) == before, "nothing recorded"


async def test_a_ttl_over_the_policy_maximum_is_refused(world: World) -> None:
    answer = await _issue(world, world.agent_token, world.pg_nhi, ttl="2h")
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "ttl"
    assert "task_credential_max_ttl" in answer.json()["detail"]
    assert (await _issue(world, world.agent_token, world.pg_nhi, ttl="soon")).status_code == 422


async def test_postgres_refuses_the_login_right_after_expiry(world: World) -> None:
    """Issued through the service with a clock 55 s back, so the 60 s credential expires in
    about 5 s: the database's own VALID UNTIL refuses it, reaper or not."""
    principal = Principal(
        name="tc-expiry",
        kind="token",
        roles=frozenset({Role.AGENT}),
        agent_id=world.agent_id,
    )
    issuers = world.app.state.nhi.task_issuers
    grant, issued = await asyncio.to_thread(
        task_credentials.issue,
        world.sessions,
        principal,
        uuid.UUID(world.pg_nhi["id"]),
        task_credentials.TaskRequest(ttl="60s", task_id="short"),
        issuers.__getitem__,
        now=datetime.now(UTC) - timedelta(seconds=55),
    )
    pg = {**issued.public, **issued.secret}
    with _login(pg) as conn:
        assert conn.execute("SELECT count(*) FROM docs.articles").fetchone() == (3,)
    wait = (grant.expires_at - datetime.now(UTC)).total_seconds()
    assert 0 < wait < 10
    await asyncio.sleep(wait + 0.2)
    with pytest.raises(psycopg.OperationalError):
        _login(pg).close()


async def test_a_platform_failure_is_a_502_and_ends_the_row(world: World) -> None:
    """The target refuses (its admin lost CREATEROLE; the fault is injected on the platform,
    where the issuer's pooled admin session meets it): nothing is issued, the row is ended as
    `issue_failed` with the reason, and the answer says what failed (never a secret)."""
    with world.cluster.connect() as conn:
        conn.execute(f"ALTER ROLE {ADMIN} NOCREATEROLE")
    try:
        answer = await _issue(world, world.agent_token, world.pg_nhi, task_id="doomed")
    finally:
        with world.cluster.connect() as conn:
            conn.execute(f"ALTER ROLE {ADMIN} CREATEROLE")
    assert answer.status_code == 502, answer.text
    assert "permission denied to create role" in answer.json()["detail"]
    with transaction(world.sessions) as s:
        row = s.scalars(select(TaskCredential).where(TaskCredential.task_id == "doomed")).one()
        assert (row.status, row.end_reason) == ("ended", "issue_failed")
        assert row.last_error and "InsufficientPrivilege" in row.last_error
        events = list(
            s.scalars(select(AuditEvent.event).where(AuditEvent.subject_id == str(row.id)))
        )
    assert events == [task_credentials.ISSUED_EVENT, task_credentials.FAILED_EVENT]
    with world.cluster.connect() as conn:
        assert (
            conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (row.name,)).fetchone()
            is None
        )
    # The pool kept no broken session: the next issue works.
    again = await _issue(world, world.agent_token, world.pg_nhi, task_id="after-doomed")
    assert again.status_code == 201, again.text


async def test_a_missing_admin_password_fails_the_issue_and_ends_the_row(
    world: World, service: Service
) -> None:
    """An issuer with no pooled session and nothing cached (a fresh API process) resolves
    the target's admin password: a missing one fails the issue with the registry's refusal,
    naming the variable, and the row is ended as `issue_failed`."""
    aws = make_aws_clients(service.settings)
    issuers = build_task_providers(
        aws, TargetRegistry(world.sessions, service.settings, aws.secrets)
    )
    principal = Principal(
        name="tc-env", kind="token", roles=frozenset({Role.AGENT}), agent_id=world.agent_id
    )
    saved = os.environ.pop(PASSWORD_ENV)
    try:
        with pytest.raises(task_credentials.IssueFailed, match=PASSWORD_ENV):
            await asyncio.to_thread(
                task_credentials.issue,
                world.sessions,
                principal,
                uuid.UUID(world.pg_nhi["id"]),
                task_credentials.TaskRequest(task_id="doomed-env"),
                issuers.__getitem__,
            )
    finally:
        os.environ[PASSWORD_ENV] = saved
    with transaction(world.sessions) as s:
        row = s.scalars(select(TaskCredential).where(TaskCredential.task_id == "doomed-env")).one()
        assert (row.status, row.end_reason) == ("ended", "issue_failed")
        assert row.last_error and "UnknownTarget" in row.last_error


async def test_a_killed_pooled_admin_connection_is_replaced(world: World) -> None:
    """The issuer keeps its admin sessions open between issues (no SCRAM handshake per issue).
    One killed on the server (restart, idle kill, pg_terminate_backend) is found dead on the
    next issue, replaced, and that issue still succeeds, once, with a working login."""
    first = await _issue(world, world.agent_token, world.pg_nhi, task_id="pool-1")
    assert first.status_code == 201, first.text
    provider = world.app.state.nhi.task_issuers[Platform.POSTGRES]
    pool = provider.pools()[world.pg_nhi["target"]]
    reused = await _issue(world, world.agent_token, world.pg_nhi, task_id="pool-2")
    assert reused.status_code == 201, reused.text
    opened = pool.opened
    with world.cluster.connect() as conn:
        killed = conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) "
            "FROM pg_stat_activity WHERE application_name = 'nhi-lifecycle-tasks'"
        ).fetchone()
    assert killed is not None and int(str(killed[0])) >= 1
    answer = await _issue(world, world.agent_token, world.pg_nhi, task_id="pool-3")
    assert answer.status_code == 201, answer.text
    assert pool.opened == opened + 1, "the dead session was replaced by one new connection"
    with _login(answer.json()["postgres"]) as conn:
        assert conn.execute("SELECT count(*) FROM docs.articles").fetchone() == (3,)
    with transaction(world.sessions) as s:
        rows = list(s.scalars(select(TaskCredential).where(TaskCredential.task_id == "pool-3")))
    assert [r.status for r in rows] == ["active"], "issued once, not twice"


# What changes while a Postgres role is being made, and how it is undone afterwards.
MEANWHILE = {
    "quarantined": (
        "UPDATE nhis SET status = 'quarantined' WHERE id = :nhi",
        "UPDATE nhis SET status = 'active' WHERE id = :nhi",
    ),
    "agent_completed": (
        "UPDATE agents SET status = 'completed' WHERE id = :agent",
        "UPDATE agents SET status = 'active' WHERE id = :agent",
    ),
}


@pytest.mark.parametrize("meanwhile", sorted(MEANWHILE))
async def test_a_parent_contained_during_issuance_never_hands_the_credential_out(
    world: World, meanwhile: str
) -> None:
    """The parent is quarantined, or its agent completed, while the role is being made (the
    fault is injected at that boundary, after the platform's prepare): the caller gets 409
    and never the credential, the role is never committed (nothing on the target), and the
    row is ended at once."""
    change, undo = MEANWHILE[meanwhile]
    keys = {"nhi": uuid.UUID(world.pg_nhi["id"]), "agent": world.agent_id}
    task_id = f"raced-{meanwhile}"
    provider = world.app.state.nhi.task_issuers[Platform.POSTGRES]
    assert isinstance(provider, TwoPhaseIssuer)

    class ContainedMeanwhile:
        def issue(self, grant: TaskGrant) -> IssuedCredential:
            raise AssertionError("Postgres issues in two phases")

        def prepare(self, grant: TaskGrant) -> PreparedCredential:
            prepared = provider.prepare(grant)
            # Once the row is written beside this prepare (the quarantine comes after it: a
            # quarantine before it is the row's guard's case, not this one).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with transaction(world.sessions) as s:
                    if s.get(TaskCredential, grant.credential_id) is not None:
                        break
                time.sleep(0.005)
            with transaction(world.sessions) as s:
                s.execute(text(change), keys)
            return prepared

    principal = Principal(
        name="tc-race", kind="token", roles=frozenset({Role.AGENT}), agent_id=world.agent_id
    )
    try:
        with pytest.raises(Conflict, match="withheld"):
            await asyncio.to_thread(
                task_credentials.issue,
                world.sessions,
                principal,
                uuid.UUID(world.pg_nhi["id"]),
                task_credentials.TaskRequest(ttl="5m", task_id=task_id),
                lambda platform: ContainedMeanwhile(),
            )
    finally:
        with transaction(world.sessions) as s:
            s.execute(text(undo), keys)
    row = _ended_unissued(world, task_id)
    assert row.last_error and "withheld" in row.last_error


async def test_a_prepared_role_the_service_stalls_on_is_ended_by_the_target(
    world: World,
) -> None:
    """The service stalls between the platform's prepare and its commit (the fault is injected
    at that boundary): the target ends the idle transaction itself, so nothing is committed
    and the group's lock is not held on; the late COMMIT fails and the row is ended."""
    provider = world.app.state.nhi.task_issuers[Platform.POSTGRES]
    assert isinstance(provider, TwoPhaseIssuer)

    class Stalled:
        def issue(self, grant: TaskGrant) -> IssuedCredential:
            raise AssertionError("Postgres issues in two phases")

        def prepare(self, grant: TaskGrant) -> PreparedCredential:
            prepared = provider.prepare(grant)
            time.sleep(IDLE_IN_TRANSACTION_MS / 1000 + 1)
            return prepared

    principal = Principal(
        name="tc-stalled", kind="token", roles=frozenset({Role.AGENT}), agent_id=world.agent_id
    )
    with pytest.raises(task_credentials.IssueFailed):
        await asyncio.to_thread(
            task_credentials.issue,
            world.sessions,
            principal,
            uuid.UUID(world.pg_nhi["id"]),
            task_credentials.TaskRequest(ttl="5m", task_id="stalled"),
            lambda platform: Stalled(),
        )
    _ended_unissued(world, "stalled")
    again = await _issue(world, world.agent_token, world.pg_nhi, task_id="after-stalled")
    assert again.status_code == 201, again.text


async def test_a_parent_quarantined_on_the_target_first_gets_no_task_role(world: World) -> None:
    """The lifecycle records `quarantined` only after the platform's lock-out: in between,
    the inventory still says active. The target itself refuses (the parent's logins are
    locked out, checked under the same lock the quarantine holds): 409, nothing on the
    target, the row ended."""
    group = world.pg_nhi["name"]
    logins = [f"{group}_a", f"{group}_b"]
    with world.cluster.connect() as conn:
        live = [
            str(r[0])
            for r in conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s) AND rolcanlogin", (logins,)
            ).fetchall()
        ]
        assert live, "an active NHI has a login that can log in"
        for login in live:
            conn.execute(f"ALTER ROLE {login} NOLOGIN")
    try:
        answer = await _issue(world, world.agent_token, world.pg_nhi, task_id="locked-out")
    finally:
        with world.cluster.connect() as conn:
            for login in live:
                conn.execute(f"ALTER ROLE {login} LOGIN")
    assert answer.status_code == 409, answer.text
    assert "quarantined on its platform" in answer.json()["detail"]
    row = _ended_unissued(world, "locked-out")
    assert row.last_error and "IdentityQuarantined" in row.last_error
    again = await _issue(world, world.agent_token, world.pg_nhi, task_id="unlocked")
    assert again.status_code == 201, again.text


async def test_an_aws_parent_contained_during_sts_never_hands_the_session_out(
    world: World,
) -> None:
    """AWS writes the row while STS answers, and reads the parent again after both: one
    quarantined while STS answers never gets its session handed out (409); whatever row was
    written stays active for the reaper, as for Postgres."""
    issuers = world.app.state.nhi.task_issuers
    nhi_id = uuid.UUID(world.aws_nhi["id"])
    warm = await _issue(world, world.agent_token, world.aws_nhi, ttl="15m")
    assert warm.status_code == 201, warm.text  # a recent read of the parent is cached

    class ContainedMeanwhile:
        def issue(self, grant: TaskGrant) -> IssuedCredential:
            issued: IssuedCredential = issuers[Platform.AWS].issue(grant)
            with transaction(world.sessions) as s:
                s.execute(
                    text("UPDATE nhis SET status = 'quarantined' WHERE id = :id"), {"id": nhi_id}
                )
            return issued

    principal = Principal(
        name="tc-race-aws", kind="token", roles=frozenset({Role.AGENT}), agent_id=world.agent_id
    )
    try:
        with pytest.raises(Conflict, match="quarantined"):
            await asyncio.to_thread(
                task_credentials.issue,
                world.sessions,
                principal,
                nhi_id,
                task_credentials.TaskRequest(ttl="15m", task_id="raced-aws"),
                lambda platform: ContainedMeanwhile(),
            )
    finally:
        with transaction(world.sessions) as s:
            s.execute(text("UPDATE nhis SET status = 'active' WHERE id = :id"), {"id": nhi_id})
    with transaction(world.sessions) as s:
        rows = s.scalars(select(TaskCredential).where(TaskCredential.task_id == "raced-aws"))
        assert [r.status for r in rows] in ([], ["active"]), "never issued twice"


# ---- who may issue ---------------------------------------------------------------------------


async def test_only_the_agent_itself_and_its_owner_may_issue(world: World) -> None:
    before = _count(world)
    other = await _issue(world, world.other_agent_token, world.pg_nhi)
    assert other.status_code == 403, other.text
    assert "own" in other.json()["detail"]
    auditor = await _issue(world, world.auditor_token, world.pg_nhi)
    assert auditor.status_code == 403, auditor.text
    assert "auditor" in auditor.json()["detail"]
    teammate = await _issue(world, world.teammate_token, world.pg_nhi)
    assert teammate.status_code == 403, teammate.text
    assert _count(world) == before
    owner = await _issue(world, world.owner_token, world.aws_nhi)
    assert owner.status_code == 201, owner.text
    # An agent token reads nothing, not even its own agent's inventory.
    async with httpx.AsyncClient(base_url=world.url, timeout=30) as http:
        listed = await http.get(f"/v1/nhis/{world.pg_nhi['id']}", headers=bearer(world.agent_token))
    assert listed.status_code == 404


async def test_a_parent_that_is_not_active_is_refused(world: World, service: Service) -> None:
    agent_id, nhi_id, _ = request_nhi(
        world.sessions,
        service.settings,
        "postgres_role",
        scope=PG_SCOPE,
        target=world.pg_nhi["target"],
    )
    token = _token(world.sessions, Role.AGENT, agent_id=agent_id)
    answer = await _issue(world, token, {"id": str(nhi_id)})
    assert answer.status_code == 409, answer.text
    assert "requested" in answer.json()["detail"]


@pytest.mark.parametrize("parent", ["pg_nhi", "aws_nhi"])
@pytest.mark.parametrize("ended", ["contained", "completed"])
async def test_a_contained_or_completed_agent_gets_no_task_credential(
    world: World, parent: str, ended: str
) -> None:
    """From the moment its agent has an open incident (containment opens it before it
    quarantines the NHIs) or is completed (before its lifecycles quarantine them), no task
    credential is issued from any of its NHIs, even right after one was (a recent read of the
    parent is never trusted over the agent's state): 409, nothing recorded. Released, or the
    agent active again, issuance works again."""
    nhi = getattr(world, parent)
    warm = await _issue(world, world.agent_token, nhi, ttl="15m")
    assert warm.status_code == 201, warm.text
    keys = {"agent": world.agent_id, "id": uuid.uuid4()}
    with transaction(world.sessions) as s:
        if ended == "contained":
            s.add(
                Incident(
                    id=keys["id"],
                    agent_id=world.agent_id,
                    status=IncidentStatus.CONTAINING,
                    reason="test: contained while issuing",
                    opened_by="test:security",
                    opened_by_person="test:security",
                )
            )
        else:
            s.execute(text("UPDATE agents SET status = 'completed' WHERE id = :agent"), keys)
    before = _count(world)
    try:
        answer = await _issue(world, world.agent_token, nhi, ttl="15m")
        assert answer.status_code == 409, answer.text
        said = "contained" if ended == "contained" else "task has ended"
        assert said in answer.json()["detail"]
        assert _count(world) == before, "nothing recorded"
    finally:
        with transaction(world.sessions) as s:
            s.execute(text("UPDATE incidents SET status = 'released' WHERE id = :id"), keys)
            s.execute(text("UPDATE agents SET status = 'active' WHERE id = :agent"), keys)
    again = await _issue(world, world.agent_token, nhi, ttl="15m")
    assert again.status_code == 201, again.text


async def test_a_token_revoked_in_the_api_stops_issuing_at_once(world: World) -> None:
    """Issuance reuses a token's principal for a few seconds (nhi/services/auth.py); a
    revocation in the same process ends that at once."""
    name = f"tc-revoked-{uuid.uuid4().hex[:8]}"
    with transaction(world.sessions) as s:
        _, token = issue_token(
            s, name=name, role=Role.AGENT, ttl="1d", created_by="test", agent_id=world.agent_id
        )
    first = await _issue(world, token, world.aws_nhi, ttl="15m")
    assert first.status_code == 201, first.text
    with transaction(world.sessions) as s:
        revoke_token(s, name, "test:revoke")
    answer = await _issue(world, token, world.aws_nhi, ttl="15m")
    assert answer.status_code == 401, answer.text


async def test_a_policy_that_does_not_allow_task_credentials_refuses(world: World) -> None:
    _allow_task_credentials(world.sessions, False)
    try:
        answer = await _issue(world, world.agent_token, world.pg_nhi)
    finally:
        _allow_task_credentials(world.sessions, True)
    assert answer.status_code == 422, answer.text
    assert "allow_task_credentials" in answer.json()["detail"]


async def test_an_idempotent_retry_never_gets_the_credential_again(world: World) -> None:
    key = f"tc-{uuid.uuid4()}"
    first = await _issue(world, world.agent_token, world.pg_nhi, key=key, ttl="5m")
    assert first.status_code == 201, first.text
    again = await _issue(world, world.agent_token, world.pg_nhi, key=key, ttl="5m")
    assert again.status_code == 409, again.text
    assert first.json()["postgres"]["password"] not in again.text
    with transaction(world.sessions) as s:
        kept = s.scalars(select(IdempotencyKey).where(IdempotencyKey.key == key)).one()
        assert kept.response == {"secret": True}


async def test_concurrent_issues_reuse_the_apis_pooled_connections(world: World) -> None:
    """Four bursts of eight issues at once: every inventory connection the API opens for them
    is kept in its pool, none is closed after one use. (An issue holds its connection through
    its round trips to the target; with a pool smaller than the concurrency, each connection
    beyond it is opened for one checkout and closed on return: a new Postgres backend for
    about every third issue.)"""
    engine = world.app.state.nhi.sessions.kw["bind"]
    opened: list[object] = []
    closed: list[object] = []

    def connected(dbapi_connection: object, _record: object) -> None:
        opened.append(dbapi_connection)

    def gone(dbapi_connection: object, _record: object) -> None:
        closed.append(dbapi_connection)

    async def burst(r: int) -> None:
        answers = await asyncio.gather(
            *(
                _issue(world, world.agent_token, world.pg_nhi, ttl="5m", task_id=f"b{r}-{i}")
                for i in range(8)
            )
        )
        assert [a.status_code for a in answers] == [201] * 8, [a.text for a in answers]

    event.listen(engine, "connect", connected)
    event.listen(engine, "close", gone)
    try:
        for r in range(4):
            await burst(r)
    finally:
        event.remove(engine, "connect", connected)
        event.remove(engine, "close", gone)
    assert closed == [], f"{len(closed)} of {len(opened)} connections opened were closed again"
    assert len(opened) <= world.app.state.nhi.settings.api_database_pool_size


async def test_an_agent_token_is_bound_to_exactly_one_agent(world: World, service: Service) -> None:
    admin = service.token("tc-admin", "admin")
    async with httpx.AsyncClient(base_url=world.url, timeout=30, headers=bearer(admin)) as http:
        body = {"name": f"tc-bound-{uuid.uuid4().hex[:6]}", "role": "agent", "ttl": "1d"}
        unbound = await http.post("/v1/tokens", json=body)
        assert unbound.status_code == 422 and unbound.json()["field"] == "agent_id"
        stray = await http.post(
            "/v1/tokens", json=body | {"role": "platform", "teams": ["search"],
                                       "agent_id": str(world.agent_id)},
        )  # fmt: skip
        assert stray.status_code == 422 and stray.json()["field"] == "agent_id"
        nowhere = await http.post("/v1/tokens", json=body | {"agent_id": str(uuid.uuid4())})
        assert nowhere.status_code == 422 and nowhere.json()["field"] == "agent_id"
        created = await http.post("/v1/tokens", json=body | {"agent_id": str(world.agent_id)})
        assert created.status_code == 201, created.text
        assert created.json()["agent_id"] == str(world.agent_id)
    answer = await _issue(world, created.json()["token"], world.pg_nhi, ttl="5m")
    assert answer.status_code == 201, answer.text


# ---- AWS -------------------------------------------------------------------------------------


async def test_an_aws_task_credential_is_an_assumed_role_session(world: World) -> None:
    narrowed = [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::kb-docs/reports/*"]}]
    answer = await _issue(
        world, world.agent_token, world.aws_nhi, ttl="15m", task_id="t-aws", scope=narrowed
    )
    assert answer.status_code == 201, answer.text
    assert answer.headers["cache-control"] == "no-store"
    issued = answer.json()
    creds = issued["aws"]
    session = boto3.client(
        "sts",
        region_name="us-east-1",
        endpoint_url=world.app.state.nhi.settings.aws_endpoint_url,
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
    )
    identity = session.get_caller_identity()
    role_name = world.aws_nhi["name"]
    assert identity["Arn"] == creds["AssumedRoleArn"]
    assert identity["Arn"].endswith(f":assumed-role/{role_name}/{issued['name']}")

    # What AWS was asked for (moto keeps neither tags nor SourceIdentity).
    [call] = [c for c in world.assume_role_calls if c["RoleSessionName"] == issued["name"]]
    assert call["RoleArn"] == world.aws_nhi["external_id"]
    assert call["DurationSeconds"] == 900
    assert call["SourceIdentity"] == f"agent-{world.agent_id}"
    tags = {t["Key"]: t["Value"] for t in call["Tags"]}
    assert tags["nhi:agent-id"] == str(world.agent_id)
    assert tags["nhi:task-id"] == "t-aws"
    assert tags["nhi:task-credential-id"] == issued["id"]
    assert creds["SessionTags"] == tags and creds["SourceIdentity"] == call["SourceIdentity"]
    policy = json.loads(call["Policy"])
    assert [s["Action"] for s in policy["Statement"]] == [["s3:GetObject"]]
    assert [s["Resource"] for s in policy["Statement"]] == [["arn:aws:s3:::kb-docs/reports/*"]]

    event = _issued_event(world, issued["id"], world.aws_nhi["id"])
    assert event.details["source_identity"] == call["SourceIdentity"]
    assert event.details["session_tags"] == tags
    assert creds["SecretAccessKey"] not in str(event.details)
    stored = _row(world, issued["id"])
    assert (stored.platform, stored.name, stored.status) == ("aws", issued["name"], "active")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ttl": "5m"}, "ttl"),
        (
            {"scope": [{"actions": ["s3:PutObject"], "resources": ["arn:aws:s3:::kb-docs/*"]}]},
            "scope[0].actions[0]",
        ),
        (
            {"scope": [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::other/*"]}]},
            "scope[0].resources[0]",
        ),
        (
            # Each action with its own statement's resources: no mixing across statements.
            {"scope": [{"actions": ["dynamodb:GetItem"], "resources": ["arn:aws:s3:::kb-docs/x"]}]},
            "scope[0].resources[0]",
        ),
        ({"scope": [{"actions": ["s3:*"], "resources": ["arn:aws:s3:::kb-docs/*"]}]}, None),
    ],
)
async def test_aws_refusals(world: World, body: dict[str, Any], field: str | None) -> None:
    answer = await _issue(world, world.agent_token, world.aws_nhi, **body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == (field or "scope[0].actions[0]")


# ---- the CLI --------------------------------------------------------------------------------


def _nhi_cli(world: World, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NHI_API_URL=world.url, NHI_TOKEN=token)
    nhi = str(Path(sys.executable).parent / "nhi")
    return subprocess.run([nhi, *args], env=env, capture_output=True, text=True, timeout=60)


async def test_the_cli_prints_the_credential_once_as_exports(world: World) -> None:
    done = await asyncio.to_thread(
        _nhi_cli,
        world,
        world.agent_token,
        "credentials",
        "issue",
        world.pg_nhi["id"],
        "--ttl",
        "5m",
        "--task",
        "cli-task",
        "--action",
        "SELECT",
        "--resource",
        "docs.faq",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("# task credential ")
    exports = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in lines[1:])
    assert set(exports) == {"PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGSSLMODE"}
    pg = {
        "host": exports["PGHOST"],
        "port": int(exports["PGPORT"]),
        "dbname": exports["PGDATABASE"],
        "username": exports["PGUSER"],
        "password": exports["PGPASSWORD"],
    }
    with _login(pg) as conn:
        assert conn.execute("SELECT count(*) FROM docs.faq").fetchone() == (1,)
    refused = await asyncio.to_thread(
        _nhi_cli, world, world.auditor_token, "credentials", "issue", world.pg_nhi["id"]
    )
    assert refused.returncode == 1 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1 and "auditor" in refused.stderr


# ---- pure rules ------------------------------------------------------------------------------


def test_the_scram_verifier_matches_libpq(cluster: PgCluster) -> None:
    """With libpq's salt, our verifier is libpq's own (RFC 7677: StoredKey, ServerKey)."""
    with cluster.connect() as conn:
        theirs = conn.pgconn.encrypt_password(b"pencil", b"user", b"scram-sha-256").decode()
    salt = theirs.split("$")[1].split(":")[1]
    assert scram_verifier("pencil", salt=base64.b64decode(salt)) == theirs
    assert scram_verifier("pencil") != scram_verifier("pencil"), "a fresh salt each time"


def test_aws_narrowing_treats_wildcards_as_wider() -> None:
    from models.contracts import ScopeStatement

    granted = [ScopeStatement(actions=["s3:Get*"], resources=["arn:aws:s3:::kb/*"])]
    check_aws_narrowing(
        [ScopeStatement(actions=["s3:GetObject"], resources=["arn:aws:s3:::kb/a/*"])], granted
    )
    with pytest.raises(ValueError, match=r"scope\[0\]\.actions\[0\]"):
        check_aws_narrowing(
            [ScopeStatement(actions=["s3:G?tObject"], resources=["arn:aws:s3:::kb/a"])],
            [ScopeStatement(actions=["s3:GetObject"], resources=["arn:aws:s3:::kb/a"])],
        )


def test_provisioning_trusts_the_issuing_principal_where_the_policy_allows(
    aws: AwsClients, settings: Settings
) -> None:
    """An iam_role's trust names the API's task-credential principal, with the rights AWS
    requires for session tags and SourceIdentity, only where the policy allows."""
    from activities.provider import plan_of
    from activities.providers.aws import AwsProvider
    from models.orm import Agent, Nhi

    api = "arn:aws:iam::123456789012:role/nhi-api"
    configured = settings.model_copy(update={"task_credential_principal": api})
    agent = Agent(
        id=uuid.uuid4(), name=f"trust-{uuid.uuid4().hex[:6]}", environment="dev",
        owner_email="ana@example.com",
    )  # fmt: skip
    nhi = Nhi(
        id=uuid.uuid4(), agent_id=agent.id, platform="aws", kind="iam_role",
        name=f"nhi-trust-{uuid.uuid4().hex}"[:64], granted_scope=AWS_SCOPE, allowed_cidrs=[],
        trust_principal=TRUST, expires_at=datetime.now(UTC) + timedelta(days=1), target=None,
    )  # fmt: skip
    assert plan_of(nhi, agent, configured, 3600).task_principal is None
    assert plan_of(nhi, agent, settings, 3600, allow_task_credentials=True).task_principal is None
    plan = plan_of(nhi, agent, configured, 3600, allow_task_credentials=True)
    assert plan.task_principal == api
    AwsProvider(aws, configured.iam_path).create(plan)
    trust = aws.iam.get_role(RoleName=nhi.name)["Role"]["AssumeRolePolicyDocument"]
    if isinstance(trust, str):
        trust = json.loads(trust)
    runtime, task = trust["Statement"]
    assert runtime["Principal"] == {"AWS": TRUST}
    assert task["Principal"] == {"AWS": api}
    assert set(task["Action"]) == {"sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"}


# ---- roles made ahead (the stock) --------------------------------------------------------------


def _stock_roles(world: World) -> dict[str, bool]:
    """The stock roles on the target (marked as task roles of the nil NHI): name -> can log in."""
    with world.cluster.connect() as conn:
        rows = conn.execute(
            "SELECT rolname, rolcanlogin FROM pg_roles "
            "WHERE shobj_description(oid, 'pg_authid') LIKE %s",
            (f"%;nhi-id={STOCK_NHI_ID};%",),
        ).fetchall()
    return {str(n): bool(can) for n, can in rows}


def _admin_sessions(world: World) -> int:
    """Sessions the task issuers hold on the target (their application name)."""
    with world.cluster.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'nhi-lifecycle-tasks'"
        ).fetchone()
    return int(row[0]) if row else 0


def _stocked_provider(world: World, size: int, **kw: Any) -> tuple[PostgresTaskProvider, str]:
    """A new issuer with a stock of `size`, the only stock on the target (the API's own issuer
    is closed first: it drops its stock, and starts a new one when next used)."""
    world.app.state.nhi.task_issuers[Platform.POSTGRES].close()
    aws = make_aws_clients(world.app.state.nhi.settings)
    targets = TargetRegistry(world.sessions, world.app.state.nhi.settings, aws.secrets)
    return PostgresTaskProvider(targets, role_stock=size, **kw), str(world.pg_nhi["target"])


def _issue_with(world: World, provider: PostgresTaskProvider, task_id: str) -> IssuedCredential:
    principal = Principal(
        name="tc-stock", kind="token", roles=frozenset({Role.AGENT}), agent_id=world.agent_id
    )
    grant, issued = task_credentials.issue(
        world.sessions,
        principal,
        uuid.UUID(world.pg_nhi["id"]),
        task_credentials.TaskRequest(ttl="10m", task_id=task_id),
        lambda platform: provider,
    )
    assert issued.public["username"] == grant.name == task_role_name(grant.credential_id)
    return issued


async def test_a_stock_role_becomes_the_credential_and_closing_drops_the_rest(
    world: World,
) -> None:
    """The first issue makes its role (the stock is empty) and starts the stock; the next takes
    a stock role, which becomes exactly the credential a made one is: its own name and marker,
    LOGIN until the expiry, the group's member, a SCRAM login that reads. Closing the issuer
    drops the stock roles not handed out, and only them."""
    provider, target = _stocked_provider(world, 2)
    try:
        made_here = await asyncio.to_thread(_issue_with, world, provider, "stock-1")
        stock = provider.pools()[target].stock
        assert stock is not None
        await eventually(lambda: _assert(stock.made == 2), timeout=20)
        ahead = _stock_roles(world)
        assert len(ahead) == 2 and not any(ahead.values()), "made ahead NOLOGIN"
        taken = await asyncio.to_thread(_issue_with, world, provider, "stock-2")
        left = _stock_roles(world)
        assert len(set(ahead) - set(left)) == 1, "one stock role became the credential"
        for issued in (made_here, taken):
            pg = issued.public | issued.secret
            with _login(pg) as conn:
                assert conn.execute("SELECT count(*) FROM docs.articles").fetchone()
            with world.cluster.connect() as conn:
                row = conn.execute(
                    "SELECT r.rolcanlogin, r.rolvaliduntil, shobj_description(r.oid, "
                    "'pg_authid'), pg_has_role(r.oid, %s, 'MEMBER') "
                    "FROM pg_roles r WHERE rolname = %s",
                    (pg["member_of"], pg["username"]),
                ).fetchone()
            assert row is not None
            can_login, until, comment, member = row
            assert can_login and member and until == issued.expires_at
            fields = parse_comment(comment)
            assert fields is not None and fields["nhi-id"] == world.pg_nhi["id"]
            assert fields["part"] == "task"
    finally:
        await asyncio.to_thread(provider.close)
    assert _stock_roles(world) == {}, "closing dropped the stock"
    with _login(taken.public | taken.secret) as conn:
        assert conn.execute("SELECT 1").fetchone(), "and never a credential"


async def test_a_stock_role_dropped_by_hand_still_issues(world: World) -> None:
    """The batch fails on a stock role that is gone (dropped by hand, or by a sweep): the issue
    is made again with its own role, and succeeds."""
    provider, target = _stocked_provider(world, 1)
    try:
        await asyncio.to_thread(_issue_with, world, provider, "stock-gone-1")
        stock = provider.pools()[target].stock
        assert stock is not None
        await eventually(lambda: _assert(stock.made == 1), timeout=20)
        [name] = _stock_roles(world)
        with world.cluster.connect() as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
        issued = await asyncio.to_thread(_issue_with, world, provider, "stock-gone-2")
        with _login(issued.public | issued.secret) as conn:
            assert conn.execute("SELECT count(*) FROM docs.articles").fetchone()
    finally:
        await asyncio.to_thread(provider.close)
    assert _stock_roles(world) == {}


async def test_an_idle_stock_leaves_nothing_on_the_target(world: World) -> None:
    """A stock role lives at most its maximum age, and an idle stock is not refilled: with no
    issue for that long, the target holds no stock role and none is made again."""
    provider, target = _stocked_provider(world, 0)
    settings = world.app.state.nhi.settings
    registry = TargetRegistry(world.sessions, settings, make_aws_clients(settings).secrets)
    conn_target = ddl.resolve(registry, target)
    stock = RoleStock(conn_target, PasswordStock(), size=2, max_age_s=1.0)
    try:
        assert stock.take() is None  # nothing ready yet: this starts it
        await eventually(lambda: _assert(stock.made == 2), timeout=20)
        assert len(_stock_roles(world)) == 2
        await eventually(lambda: _assert(_stock_roles(world) == {}), timeout=20)
        await asyncio.sleep(1.5)
        assert stock.made == 2 and _stock_roles(world) == {}, "not refilled while idle"
        assert _admin_sessions(world) == 0, "nor is its admin connection held open"
    finally:
        await asyncio.to_thread(stock.close)
        provider.close()


async def _assert(condition: bool) -> None:
    assert condition
