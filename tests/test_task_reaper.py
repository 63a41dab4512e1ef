"""Task credentials' durable half: the reaper, containment by the parent NHI, and sweeps.

Task roles are made here exactly as issuing makes them (the contract in
nhi/rules/task_credentials.py and nhi/rules/pg_grants.py): a LOGIN role `nhit_<credential id>`,
IN ROLE the NHI's group, VALID UNTIL its expiry, a client-computed SCRAM verifier, and the
managed COMMENT with `part=task` and its credential's id, plus its `task_credentials` row. Each
test proves its point from a scram-sha-256 cluster of its own module (so the server checks
passwords and VALID UNTIL) and an inventory database of its own (so the reaper, which takes
every due row, sees only these tests' rows).
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import ScheduleIntervalSpec, ScheduleOverlapPolicy, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Replayer

from activities.providers import postgres_ddl as ddl
from activities.providers.aws import REVOKE_SESSIONS_POLICY_NAME as REVOKE_SESSIONS
from activities.providers.aws import AwsProvider
from activities.providers.postgres import PostgresProvider
from activities.providers.postgres_task import PasswordStock, RoleStock
from activities.reaper import (
    ReapBatch,
    ReaperActivities,
    ReaperInput,
    ReaperOutcome,
    ReapInput,
    end_reason,
)
from models.contracts import (
    FindingKind,
    IdentityRef,
    LifecycleAction,
    OrphanInput,
    Phase,
    ProvisionPlan,
    ScopeStatement,
)
from models.enums import NhiKind, Platform
from models.orm import Agent, AuditEvent, Nhi, TaskCredential
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import PostgresTargetSetting, Settings
from nhi.infra.db import make_engine, make_sessionmaker, transaction, upgrade_head
from nhi.infra.metrics import ActivityMetrics, new_registry
from nhi.infra.slack_client import make_slack_client
from nhi.rules import ids
from nhi.rules.pg_grants import group_name, managed_comment, role_names
from nhi.rules.task_credentials import STOCK_NHI_ID, task_role_name, task_session_name
from nhi.schedules import schedule_id_of, schedule_ids, task_reaper_schedule
from nhi.services.target_registry import TargetRegistry
from tests.conftest import Databases, dev_address
from tests.helpers import (
    TRUST,
    eventually,
    keep_history,
    policy_calls,
    provision,
    request_nhi,
    revoked_before,
    run_sweep,
    unique,
)
from tests.pg_cluster import ADMIN, DATABASE, PgCluster, login, refused
from tests.slack_emulator import SlackEmulator
from worker import WORKFLOWS, build_worker
from workflows.lifecycle import NhiLifecycleWorkflow
from workflows.reaper import TaskReaperWorkflow

PASSWORD_ENV = "NHI_TEST_REAPER_ADMIN_PASSWORD"
TARGET = "company"
OWNER = "ana@example.com"
READ_ARTICLES = [ScopeStatement(actions=["SELECT"], resources=["docs.articles"])]
SECURITY = "#nhi-security"


# ---- rig ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def inventory(databases: Databases) -> Iterator[sessionmaker[Session]]:
    url = databases.new("nhi_reaper")
    upgrade_head(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


@dataclass
class Rig:
    settings: Settings
    sessions: sessionmaker[Session]
    aws: AwsClients
    pg: PgCluster
    targets: TargetRegistry
    provider: PostgresProvider

    def reap(self, batch_size: int = 200) -> ReapBatch:
        """One batch, run as the worker runs it (heartbeats included)."""
        reaper = ReaperActivities(self.sessions, self.targets)
        result: ReapBatch = ActivityEnvironment().run(
            reaper.reap_task_credentials, ReapInput(batch_size=batch_size)
        )
        return result

    def row(self, credential_id: uuid.UUID) -> TaskCredential:
        with transaction(self.sessions) as s:
            return s.get_one(TaskCredential, credential_id)

    def events(self, subject: uuid.UUID) -> list[tuple[str, str]]:
        with transaction(self.sessions) as s:
            return [
                (str(e), str(r))
                for e, r in s.execute(
                    select(AuditEvent.event, AuditEvent.reason)
                    .where(
                        AuditEvent.subject_type == "task_credential",
                        AuditEvent.subject_id == str(subject),
                    )
                    .order_by(AuditEvent.id)
                )
            ]

    def set_status(self, nhi_id: uuid.UUID, status: str) -> None:
        with transaction(self.sessions) as s:
            s.get_one(Nhi, nhi_id).status = status

    def roles(self, names: list[str]) -> dict[str, bool]:
        """Which of `names` exist, and whether each can log in."""
        with self.pg.connect() as conn:
            rows = conn.execute(
                "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY(%s)", (names,)
            ).fetchall()
        return {str(n): bool(can) for n, can in rows}


def _rig(
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    cluster: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
    **overrides: Any,
) -> Rig:
    monkeypatch.setenv(PASSWORD_ENV, cluster.admin_password)
    dsn = f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}"
    rig_settings = settings.model_copy(
        update={
            "postgres_targets": {TARGET: PostgresTargetSetting(dsn=dsn, password_env=PASSWORD_ENV)},
            "sweep_propagation_seconds": 0,
            "orphan_grace_seconds": 3600,
            "temporal_task_queue": f"reaper-{uuid.uuid4().hex[:8]}",
        }
        | overrides
    )
    targets = TargetRegistry(sessions, rig_settings, aws.secrets)
    provider = PostgresProvider(targets, aws.secrets, name_prefix=rig_settings.name_prefix)
    return Rig(rig_settings, sessions, aws, cluster, targets, provider)


@pytest.fixture
def rig(
    settings: Settings,
    inventory: sessionmaker[Session],
    aws: AwsClients,
    pg: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> Rig:
    return _rig(settings, inventory, aws, pg, monkeypatch)


@dataclass(frozen=True)
class Parent:
    nhi_id: uuid.UUID
    agent_id: uuid.UUID
    name: str

    def ref(self) -> IdentityRef:
        return IdentityRef(
            platform=Platform.POSTGRES,
            kind=NhiKind.POSTGRES_ROLE,
            name=self.name,
            target=TARGET,
            nhi_id=self.nhi_id,
        )


@dataclass(frozen=True)
class Task:
    credential_id: uuid.UUID
    name: str
    password: str
    expires_at: datetime

    def secret(self, cluster: PgCluster) -> dict[str, Any]:
        return {
            "host": cluster.host,
            "port": cluster.port,
            "dbname": DATABASE,
            "username": self.name,
            "password": self.password,
        }


def _agent() -> Agent:
    return Agent(
        name=unique(),
        category="rag",
        environment="dev",
        owner_email=OWNER,
        team="search",
        purpose="Runs short tasks against the docs database",
        created_by="test:platform",
    )


def make_parent(rig: Rig, status: str = "active", *, on_platform: bool = True) -> Parent:
    """An NHI in the inventory and, unless told otherwise, its group role on the target."""
    now = datetime.now(UTC)
    nhi_id = uuid.uuid4()
    name = group_name(rig.settings.name_prefix, "tasks", nhi_id)
    agent = _agent()
    with transaction(rig.sessions) as s:
        s.add(agent)
        s.flush()
        s.add(
            Nhi(
                id=nhi_id,
                agent_id=agent.id,
                platform=Platform.POSTGRES.value,
                kind=NhiKind.POSTGRES_ROLE.value,
                name=name,
                granted_scope=[st.model_dump() for st in READ_ARTICLES],
                status=status,
                requested_by="test:platform",
                expires_at=now + timedelta(days=1),
                max_lifetime_at=now + timedelta(days=30),
                activated_at=now - timedelta(hours=1),
                target=TARGET,
            )
        )
        agent_id = agent.id
    if on_platform:
        rig.provider.create(
            ProvisionPlan(
                nhi_id=nhi_id,
                agent_id=agent_id,
                agent_name="tasks",
                environment="dev",
                owner_email=OWNER,
                platform=Platform.POSTGRES,
                kind=NhiKind.POSTGRES_ROLE,
                identity_name=name,
                iam_path="/",
                secret_name="",
                scope=READ_ARTICLES,
                expires_at=now + timedelta(days=1),
                target=TARGET,
            )
        )
    return Parent(nhi_id, agent_id, name)


def issue(rig: Rig, parent: Parent, ttl: float) -> Task:
    """A Postgres task credential, made as issuing makes it (see the module docstring)."""
    credential_id = uuid.uuid4()
    name = task_role_name(credential_id)
    password = secrets.token_urlsafe(24)
    expires_at = datetime.now(UTC) + timedelta(seconds=ttl)
    with rig.pg.connect(ADMIN, rig.pg.admin_password) as conn:
        verifier = conn.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256")
        conn.execute(
            sql.SQL(
                "CREATE ROLE {} LOGIN PASSWORD {} VALID UNTIL {} CONNECTION LIMIT 10 IN ROLE {}"
            ).format(
                sql.Identifier(name),
                sql.Literal(verifier.decode()),
                sql.Literal(expires_at.isoformat()),
                sql.Identifier(parent.name),
            )
        )
        comment = managed_comment(
            nhi_id=parent.nhi_id,
            agent_id=parent.agent_id,
            part="task",
            created_at=datetime.now(UTC),
            task_credential_id=credential_id,
        )
        conn.execute(
            sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(name), sql.Literal(comment))
        )
    with transaction(rig.sessions) as s:
        s.add(
            TaskCredential(
                id=credential_id,
                nhi_id=parent.nhi_id,
                agent_id=parent.agent_id,
                platform=Platform.POSTGRES.value,
                name=name,
                task_id="task-1",
                issued_by="agent:tasks",
                expires_at=expires_at,
                status="active",
            )
        )
    return Task(credential_id, name, password, expires_at)


def drop_by_hand(cluster: PgCluster, role: str, *, logins: bool = False) -> None:
    """A group (and with `logins` its two login roles) dropped behind the service's back, by
    someone with the admin's password (the admin granted its privileges, so only the admin can
    revoke them)."""
    with cluster.connect(ADMIN, cluster.admin_password) as conn:
        name = sql.Identifier(role)
        conn.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA docs FROM {}").format(name))
        conn.execute(sql.SQL("REVOKE ALL ON SCHEMA docs FROM {}").format(name))
        doomed = [role, *(role_names(role) if logins else ())]
        conn.execute(
            sql.SQL("DROP ROLE {}").format(sql.SQL(", ").join(sql.Identifier(n) for n in doomed))
        )


def read_articles(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM docs.articles").fetchone()
    return int(row[0]) if row else -1


def session_ended(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    return False


# ---- expiry and the reaper ------------------------------------------------------------------


def test_an_expired_task_role_is_refused_at_once_then_dropped_with_nothing_left(rig: Rig) -> None:
    parent = make_parent(rig)
    task = issue(rig, parent, ttl=3)
    held = login(task.secret(rig.pg))  # a session opened while the credential lived
    assert read_articles(held) == 3, "the task credential reads what its NHI may"
    assert rig.reap().ended == {}, "nothing is due before the expiry"
    assert rig.row(task.credential_id).status == "active"

    # Postgres itself refuses the login right after the expiry, whatever the reaper does.
    time.sleep(max(0.0, (task.expires_at - datetime.now(UTC)).total_seconds()) + 0.2)
    assert refused(task.secret(rig.pg))
    assert not session_ended(held), "VALID UNTIL stops new logins only"

    batch = rig.reap()
    assert batch.ended.get("postgres", 0) >= 1 and batch.reasons.get("expired", 0) >= 1
    assert rig.roles([task.name]) == {}, "nothing remains in pg_roles"
    assert session_ended(held), "the session outliving the expiry was ended"
    row = rig.row(task.credential_id)
    assert (row.status, row.end_reason, row.last_error) == ("ended", "expired", None)
    assert row.ended_at is not None and row.ended_at >= task.expires_at
    events = rig.events(task.credential_id)
    assert [e for e, _ in events] == ["task_credential.ended"]
    assert "login role is dropped" in events[0][1]
    assert rig.roles([parent.name]) == {parent.name: False}, "the NHI's own group stays"

    again = rig.reap()  # an ended credential is never taken again
    assert task.name not in {f.name for f in again.failures}
    assert len(rig.events(task.credential_id)) == 1


def test_an_aws_task_credential_is_ended_at_expiry_without_a_platform_call(rig: Rig) -> None:
    now = datetime.now(UTC)
    agent = _agent()
    credential_id = uuid.uuid4()
    with transaction(rig.sessions) as s:
        s.add(agent)
        s.flush()
        nhi = Nhi(
            agent_id=agent.id,
            platform=Platform.AWS.value,
            kind=NhiKind.IAM_ROLE.value,
            name=f"nhi-tasks-{uuid.uuid4().hex}",
            granted_scope=[],
            status="active",
            requested_by="test:platform",
            expires_at=now + timedelta(days=1),
            max_lifetime_at=now + timedelta(days=30),
        )
        s.add(nhi)
        s.flush()
        s.add(
            TaskCredential(
                id=credential_id,
                nhi_id=nhi.id,
                agent_id=agent.id,
                platform=Platform.AWS.value,
                name=task_session_name(credential_id),
                issued_by="agent:tasks",
                expires_at=now - timedelta(seconds=1),
                status="active",
            )
        )
    batch = rig.reap()
    assert batch.ended.get("aws", 0) >= 1
    row = rig.row(credential_id)
    assert (row.status, row.end_reason) == ("ended", "expired")
    assert "STS session lapses on its own" in rig.events(credential_id)[0][1]


def test_batches_take_every_due_row_once_and_leave_live_ones(rig: Rig) -> None:
    parent = make_parent(rig)
    due = [issue(rig, parent, ttl=-60) for _ in range(5)]
    live = issue(rig, parent, ttl=3600)
    while rig.reap(batch_size=2).next is not None:
        pass
    assert rig.roles([t.name for t in due]) == {}
    assert {rig.row(t.credential_id).status for t in due} == {"ended"}
    assert rig.row(live.credential_id).status == "active"
    assert rig.roles([live.name]) == {live.name: True}
    assert read_articles(login(live.secret(rig.pg))) == 3


def test_one_call_takes_full_batches_until_none_is_left(rig: Rig) -> None:
    """Full batches follow one another in the same activity call (no round trip through the
    workflow per batch under a mass expiry): five due rows, batches of two, one call."""
    parent = make_parent(rig)
    due = [issue(rig, parent, ttl=-60) for _ in range(5)]
    batch = rig.reap(batch_size=2)
    assert batch.next is None and batch.ended.get("postgres", 0) >= 5
    assert {rig.row(t.credential_id).status for t in due} == {"ended"}
    assert rig.roles([t.name for t in due]) == {}


def test_the_end_reason_follows_the_parent() -> None:
    assert end_reason("active") == end_reason("rotating") == end_reason("expiring") == "expired"
    assert end_reason("quarantined") == end_reason("revoke_failed") == "parent_quarantined"
    assert end_reason("decommissioned") == end_reason("missing") == "parent_removed"


def test_a_role_not_marked_as_its_credentials_is_never_dropped(rig: Rig) -> None:
    parent = make_parent(rig)
    task = issue(rig, parent, ttl=-1)
    with rig.pg.connect(ADMIN, rig.pg.admin_password) as conn:  # someone re-marked it by hand
        conn.execute(
            sql.SQL("COMMENT ON ROLE {} IS 'made by hand'").format(sql.Identifier(task.name))
        )
    rig.reap()
    assert rig.roles([task.name]) == {task.name: True}
    row = rig.row(task.credential_id)
    assert row.status == "reap_failed"
    assert row.last_error and "not marked as a task credential's role" in row.last_error


# ---- a role that cannot be dropped ------------------------------------------------------------


@pytest_asyncio.fixture
async def slack() -> AsyncIterator[SlackEmulator]:
    emulator = SlackEmulator(token="xoxb-test")
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


async def test_a_role_that_cannot_be_dropped_is_reap_failed_with_its_cause_alerted_once(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    inventory: sessionmaker[Session],
    aws: AwsClients,
    pg: PgCluster,
    slack: SlackEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = _rig(
        settings,
        inventory,
        aws,
        pg,
        monkeypatch,
        temporal_address=dev_address(ts_env),
        slack_bot_token=SecretStr("xoxb-test"),
        slack_api_url=slack.url,
    )
    parent = make_parent(rig)
    blocked, fine = issue(rig, parent, ttl=-5), issue(rig, parent, ttl=-5)
    # The blocked task's session made a table in a database the admin cannot reach: DROP ROLE
    # fails there (2BP01) whatever the admin does in the target's database.
    other = f"scratch_{uuid.uuid4().hex[:8]}"
    with pg.connect(dbname="postgres") as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    with pg.connect(dbname=other) as conn:
        conn.execute("CREATE TABLE notes (id int)")
        conn.execute(sql.SQL("ALTER TABLE notes OWNER TO {}").format(sql.Identifier(blocked.name)))
    metrics = ActivityMetrics(new_registry())
    queue = rig.settings.temporal_task_queue
    worker = build_worker(
        ts_env.client,
        rig.settings,
        inventory,
        aws,
        slack=make_slack_client(rig.settings),
        task_queue=queue,
        metrics=metrics,
    )

    async def run() -> ReaperOutcome:
        handle = await ts_env.client.start_workflow(
            TaskReaperWorkflow.run,
            ReaperInput(triggered_by="test"),
            id=f"reaper-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
        )
        outcome = await handle.result()
        if outcome.new_failures:  # the path with an alert: the golden history
            history = await handle.fetch_history()
            await _replay(history)
            keep_history(history, "task_reaper")
        return outcome

    async with worker:
        first = await run()
        assert first.new_failures >= 1 and first.reap_failed.get("postgres", 0) >= 1
        assert rig.roles([fine.name, blocked.name]) == {blocked.name: False}, (
            "the others went; the blocked one stays, NOLOGIN"
        )
        row = rig.row(blocked.credential_id)
        assert row.status == "reap_failed"
        assert row.last_error and "DependentObjectsStillExist" in row.last_error
        assert f"database {other}" in row.last_error, "the cause names where the blocker is"
        assert rig.row(fine.credential_id).status == "ended"
        alerts = [m.text or "" for m in slack.messages_in(SECURITY)]
        assert len([a for a in alerts if blocked.name in a]) == 1
        assert f"database {other}" in next(a for a in alerts if blocked.name in a)
        reaped = metrics.task_reaped.labels("postgres", "reap_failed")._value.get()
        assert reaped >= 1

        second = await run()  # still blocked: retried, not alerted again, no new event
        assert second.new_failures == 0
        assert len([m for m in slack.messages_in(SECURITY) if blocked.name in (m.text or "")]) == 1
        assert [e for e, _ in rig.events(blocked.credential_id)] == ["task_credential.reap_failed"]

        with pg.connect(dbname=other) as conn:  # the operator clears the blocker
            conn.execute("DROP TABLE notes")
        third = await run()
        assert third.reasons.get("expired", 0) >= 1
    assert rig.roles([blocked.name]) == {}
    row = rig.row(blocked.credential_id)
    assert (row.status, row.end_reason) == ("ended", "expired")
    assert [e for e, _ in rig.events(blocked.credential_id)] == [
        "task_credential.reap_failed",
        "task_credential.ended",
    ]


def test_a_role_held_locked_elsewhere_waits_for_the_next_run_without_stalling_the_batch(
    rig: Rig,
) -> None:
    parent = make_parent(rig)
    locked, free = issue(rig, parent, ttl=-1), issue(rig, parent, ttl=-1)
    holder = rig.pg.connect(ADMIN, rig.pg.admin_password)
    holder.autocommit = False  # an open transaction that has updated the role
    holder.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 3").format(sql.Identifier(locked.name)))
    try:
        started = time.monotonic()
        rig.reap()
        assert time.monotonic() - started < 30, "the lock timeout bounds the wait"
        assert rig.row(free.credential_id).status == "ended"
        row = rig.row(locked.credential_id)
        assert row.status == "reap_failed"
        assert row.last_error and "LockNotAvailable" in row.last_error
    finally:
        holder.rollback()
        holder.close()
    rig.reap()
    assert rig.row(locked.credential_id).status == "ended"
    assert rig.roles([locked.name, free.name]) == {}


# ---- containment by the parent ----------------------------------------------------------------


def test_quarantining_the_parent_ends_every_task_credential_of_it_at_once(rig: Rig) -> None:
    parent, bystander = make_parent(rig), make_parent(rig)
    tasks = [issue(rig, parent, ttl=3600) for _ in range(3)]
    other = issue(rig, bystander, ttl=3600)
    held = [login(t.secret(rig.pg)) for t in tasks]
    assert all(read_articles(conn) == 3 for conn in held)

    done = rig.provider.disable(parent.ref())
    assert {f"task role {t.name} NOLOGIN" for t in tasks} <= set(done)
    assert all(session_ended(conn) for conn in held), "every live session ended at once"
    assert all(refused(t.secret(rig.pg)) for t in tasks), "and no new login"
    rig.provider.verify_disabled(parent.ref())
    assert not refused(other.secret(rig.pg)), "another NHI's task credential is untouched"

    # Task roles are not restored with their NHI: their credentials ended with the quarantine.
    rig.set_status(parent.nhi_id, "quarantined")
    rig.reap()
    for task in tasks:
        row = rig.row(task.credential_id)
        assert (row.status, row.end_reason) == ("ended", "parent_quarantined")
    assert rig.roles([t.name for t in tasks]) == {}
    assert rig.row(other.credential_id).status == "active"


async def test_decommissioning_through_the_lifecycle_ends_every_task_credential_at_once(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    inventory: sessionmaker[Session],
    aws: AwsClients,
    pg: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real path: the NHI's lifecycle quarantines it (no workflow change: the Postgres
    provider's containment covers its task roles), the reaper ends the rows, and the removal
    after the grace period leaves nothing of the NHI."""
    rig = _rig(settings, inventory, aws, pg, monkeypatch, temporal_address=dev_address(ts_env))
    queue = rig.settings.temporal_task_queue
    async with build_worker(ts_env.client, rig.settings, inventory, aws, task_queue=queue):
        agent_id, nhi_id, _ = request_nhi(
            inventory,
            rig.settings,
            "postgres_role",
            scope=[{"actions": ["SELECT"], "resources": ["docs.articles"]}],
            target=TARGET,
            ttl="10d",
            owner_email=OWNER,
            now=await ts_env.get_current_time(),
        )
        handle = await provision(ts_env, queue, nhi_id)
        with transaction(inventory) as s:
            parent = Parent(nhi_id, agent_id, s.get_one(Nhi, nhi_id).name)
        tasks = [issue(rig, parent, ttl=3600) for _ in range(2)]
        held = [login(t.secret(pg)) for t in tasks]
        assert all(read_articles(conn) == 3 for conn in held)

        await handle.execute_update(
            NhiLifecycleWorkflow.decommission, LifecycleAction(actor=OWNER, reason="incident")
        )

        async def quarantined() -> None:
            with transaction(inventory) as s:
                assert s.get_one(Nhi, nhi_id).status == "quarantined"

        await eventually(quarantined)
        assert all(session_ended(conn) for conn in held), "every task session ended at once"
        assert all(refused(t.secret(pg)) for t in tasks), "and no task credential logs in"

        rig.reap()
        for task in tasks:
            row = rig.row(task.credential_id)
            assert (row.status, row.end_reason) == ("ended", "parent_quarantined")
        assert rig.roles([t.name for t in tasks]) == {}
        async with ts_env.time_skipping_unlocked():  # type: ignore[attr-defined]
            assert (await handle.result()).phase is Phase.DECOMMISSIONED
    assert rig.roles([parent.name, *role_names(parent.name)]) == {}


def test_verify_disabled_fails_while_a_task_role_can_still_log_in(rig: Rig) -> None:
    parent = make_parent(rig)
    rig.provider.disable(parent.ref())
    issue(rig, parent, ttl=3600)  # issued behind containment's back
    with pytest.raises(Exception, match="not contained"):
        rig.provider.verify_disabled(parent.ref())


def test_removing_the_parent_drops_its_task_roles_first_and_proves_them_gone(rig: Rig) -> None:
    parent = make_parent(rig)
    tasks = [issue(rig, parent, ttl=3600) for _ in range(2)]
    held = login(tasks[0].secret(rig.pg))
    removed = rig.provider.delete(parent.ref()).removed
    assert {f"task role {t.name}" for t in tasks} <= set(removed)
    assert f"group role {parent.name}" in removed
    assert session_ended(held)
    assert rig.roles([parent.name, *(t.name for t in tasks)]) == {}

    rig.set_status(parent.nhi_id, "decommissioned")
    rig.reap()
    for task in tasks:
        row = rig.row(task.credential_id)
        assert (row.status, row.end_reason) == ("ended", "parent_removed")
        assert "already" not in (row.last_error or "")


# ---- sweeps -----------------------------------------------------------------------------------


async def test_a_sweep_leaves_a_live_parents_task_roles_and_removes_an_orphaned_one(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    inventory: sessionmaker[Session],
    aws: AwsClients,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = PgCluster()  # its own: a sweep lists every role on the cluster
    cluster.start()
    stock: RoleStock | None = None
    try:
        rig = _rig(
            settings,
            inventory,
            aws,
            cluster,
            monkeypatch,
            temporal_address=dev_address(ts_env),
            name_prefix=f"s{uuid.uuid4().hex[:6]}",
            orphan_grace_seconds=60,
        )
        alive = make_parent(rig)
        alive_task = issue(rig, alive, ttl=3600)
        # Alive in the inventory, but its group was dropped by hand: the NHI is missing, its
        # task role is still its parent's business, not an orphan.
        lost = make_parent(rig)
        lost_task = issue(rig, lost, ttl=3600)
        # Decommissioned, and everything but a task role is gone: the task role is the orphan.
        gone = make_parent(rig, status="decommissioned")
        gone_task = issue(rig, gone, ttl=3600)
        for group in (lost.name, gone.name):
            drop_by_hand(cluster, group, logins=True)
        # Decommissioned, but its group survived: the group is the orphan, and removing it
        # removes its task role too.
        stale = make_parent(rig, status="decommissioned")
        stale_task = issue(rig, stale, ttl=3600)
        # Another deployment (another name prefix) on the same target: not ours to judge.
        other = _rig(settings, inventory, aws, cluster, monkeypatch, name_prefix="zother")
        foreign = make_parent(other, status="decommissioned")
        foreign_task = issue(other, foreign, ttl=3600)
        # A role made ahead by an API process that then died (never dropped): a task role of
        # no NHI, removed like a task role whose parent is gone.
        stock = RoleStock(ddl.resolve(rig.targets, TARGET), PasswordStock(), size=1)
        assert stock.take() is None
        await eventually(lambda: _assert(stock.made == 1), timeout=20)
        [leftover] = stock_roles(cluster)
        queue = rig.settings.temporal_task_queue
        async with build_worker(ts_env.client, rig.settings, inventory, aws, task_queue=queue):
            outcome = await run_sweep(ts_env, queue, provider="postgres")
            by_identity = {(f.kind, f.identity) for f in outcome.findings}
            assert (FindingKind.ORPHAN, gone_task.name) in by_identity
            orphan = next(f for f in outcome.findings if f.identity == gone_task.name)
            assert orphan.nhi_id == gone.nhi_id and orphan.target == TARGET
            assert "removal started" in orphan.action
            made_ahead = next(f for f in outcome.findings if f.identity == leftover)
            assert made_ahead.kind == FindingKind.ORPHAN and "made ahead" in made_ahead.detail
            for task in (alive_task, lost_task, stale_task, foreign_task):
                assert not [f for f in outcome.findings if f.identity == task.name]
            assert (FindingKind.MISSING, lost.name) in by_identity
            assert (FindingKind.ORPHAN, stale.name) in by_identity
            assert not [f for f in outcome.findings if f.identity == alive.name]

            removals = [
                ts_env.client.get_workflow_handle(
                    ids.orphan_workflow_id("postgres_role", name, TARGET)
                )
                for name in (gone_task.name, stale.name, leftover)
            ]
            for task in (gone_task, stale_task):  # quarantined at once
                await eventually(lambda task=task: _assert(refused(task.secret(cluster))))
            assert not refused(alive_task.secret(cluster))
            async with ts_env.time_skipping_unlocked():  # type: ignore[attr-defined]
                removed = [await r.result() for r in removals]  # after the grace period
        assert any(gone_task.name in r for r in removed[0])
        assert f"task role {stale_task.name}" in removed[1]
        names = [alive.name, alive_task.name, lost_task.name, gone_task.name, stale.name]
        present = rig.roles([*names, stale_task.name])
        assert present == {alive.name: False, alive_task.name: True, lost_task.name: True}
        assert rig.roles([foreign_task.name]) == {foreign_task.name: True}
        assert stock_roles(cluster) == [], "the leftover stock role was removed"
    finally:
        if stock is not None:
            stock.close()
        cluster.stop()


def stock_roles(cluster: PgCluster) -> list[str]:
    """The roles made ahead (marked as task roles of the nil NHI) on `cluster`."""
    with cluster.connect() as conn:
        rows = conn.execute(
            "SELECT rolname FROM pg_roles WHERE shobj_description(oid, 'pg_authid') LIKE %s",
            (f"%;nhi-id={STOCK_NHI_ID};%",),
        ).fetchall()
    return [str(r[0]) for r in rows]


async def _replay(history: WorkflowHistory) -> None:
    """Today's path replays from scratch (no worker cache): no hidden nondeterminism."""
    await Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter).replay_workflow(
        history
    )


async def _assert(condition: bool) -> None:
    assert condition


def test_an_orphaned_task_role_is_removed_like_any_orphan(rig: Rig) -> None:
    parent = make_parent(rig, status="decommissioned")
    task = issue(rig, parent, ttl=3600)
    held = login(task.secret(rig.pg))
    drop_by_hand(rig.pg, parent.name)
    ref = IdentityRef.of_orphan(
        OrphanInput(
            identity=task.name,
            identity_kind=NhiKind.POSTGRES_ROLE,
            grace_seconds=0,
            target=TARGET,
            nhi_id=parent.nhi_id,
        )
    )
    assert f"task role {task.name} NOLOGIN" in rig.provider.disable(ref)
    assert session_ended(held)
    assert any(task.name in r for r in rig.provider.delete(ref).removed)
    assert rig.roles([task.name]) == {}


# ---- the schedule -----------------------------------------------------------------------------


def test_the_reaper_runs_on_its_own_schedule(settings: Settings) -> None:
    assert ids.task_reaper_workflow_id() == "nhi-task-reaper"
    assert ids.task_reaper_schedule_id() == "nhi-task-reaper"
    assert schedule_id_of("task-reaper") == "nhi-task-reaper"
    assert schedule_id_of("aws") == "nhi-sweep-aws"
    assert "nhi-task-reaper" in schedule_ids()
    schedule = task_reaper_schedule(
        settings.model_copy(update={"task_reaper_interval_seconds": 30})
    )
    assert schedule.spec.intervals == [ScheduleIntervalSpec(every=timedelta(seconds=30))]
    assert schedule.policy.overlap is ScheduleOverlapPolicy.SKIP
    assert settings.task_reaper_interval_seconds == 60, "the default"


async def test_a_fired_schedule_reaps(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    inventory: sessionmaker[Session],
    aws: AwsClients,
    pg: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = _rig(settings, inventory, aws, pg, monkeypatch, temporal_address=dev_address(dev_env))
    parent = make_parent(rig)
    task = issue(rig, parent, ttl=-1)
    queue = rig.settings.temporal_task_queue
    schedule_id = f"{ids.task_reaper_schedule_id()}-{uuid.uuid4().hex[:8]}"
    handle = await dev_env.client.create_schedule(schedule_id, task_reaper_schedule(rig.settings))
    try:
        async with build_worker(dev_env.client, rig.settings, inventory, aws, task_queue=queue):
            await handle.trigger()

            async def reaped() -> None:
                assert rig.row(task.credential_id).status == "ended"

            await eventually(reaped)
    finally:
        await handle.delete()
    assert rig.roles([task.name]) == {}


# ---- AWS: the quarantine's session deny covers task sessions ------------------------------------


def test_the_aws_quarantine_denies_task_sessions_issued_before_it(
    settings: Settings, aws: AwsClients
) -> None:
    """moto does not evaluate IAM policies, so the proof is the policy AWS evaluates: the
    quarantine's `aws:TokenIssueTime` deny covers a task session issued just before it, and
    stays after the quarantine is lifted (deny-all goes, the session revocation does not).
    A session issued WHILE quarantined (AssumeRole still answers; only the deny-all refuses
    it) is revoked by the restore, before the deny-all goes; a repeated restore moves
    nothing."""
    provider = AwsProvider(aws, settings.iam_path)
    nhi_id = uuid.uuid4()
    plan = ProvisionPlan(
        nhi_id=nhi_id,
        agent_id=uuid.uuid4(),
        agent_name="tasks",
        environment="dev",
        owner_email=OWNER,
        platform=Platform.AWS,
        kind=NhiKind.IAM_ROLE,
        identity_name=f"nhi-tasks-{nhi_id.hex}",
        iam_path=settings.iam_path,
        secret_name="",
        scope=[ScopeStatement(actions=["s3:GetObject"], resources=["arn:aws:s3:::kb-docs/*"])],
        trust_principal=TRUST,
        expires_at=datetime.now(UTC) + timedelta(days=1),
    )
    arn = provider.create(plan).external_id
    role = plan.identity_name

    def session_issued_at() -> datetime:
        session = aws.sts.assume_role(
            RoleArn=arn, RoleSessionName=task_session_name(uuid.uuid4()), DurationSeconds=900
        )["Credentials"]
        return session["Expiration"] - timedelta(seconds=900)

    issued_at = session_issued_at()
    ref = IdentityRef(platform=Platform.AWS, kind=NhiKind.IAM_ROLE, name=role)
    provider.disable(ref)
    provider.verify_disabled(ref)
    quarantined_at = revoked_before(aws.iam, "role", role)
    assert quarantined_at > issued_at
    # A session issued while quarantined, in a later second than the quarantine's revocation.
    time.sleep(max(0.0, (quarantined_at - datetime.now(UTC)).total_seconds()) + 0.05)
    during = session_issued_at()
    assert during >= quarantined_at, "issued after the quarantine's revocation time"

    with policy_calls(aws.iam) as calls:
        provider.enable(ref)  # lifted: the deny-all goes, the session revocation moves to now
        restored = revoked_before(aws.iam, "role", role)
        provider.enable(ref)  # a retry after the restore went through
    assert restored > during, "a session issued while quarantined must stay refused"
    assert revoked_before(aws.iam, "role", role) == restored, (
        "a repeated restore revokes nothing more"
    )
    revoke = f"PutRolePolicy:{REVOKE_SESSIONS}"
    lift = "DeleteRolePolicy:nhi-quarantine"
    assert calls.index(revoke) < calls.index(lift), calls
    assert calls.count(revoke) == 1 and calls.count(lift) == 1, calls
    assert "nhi-quarantine" not in aws.iam.list_role_policies(RoleName=role)["PolicyNames"]
    provider.delete(ref)
