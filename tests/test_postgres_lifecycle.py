"""A `postgres_role` lives the same life as an AWS identity, through the same workflows: on the
time-skipping server with the real worker, a scram-sha-256 Postgres target and moto's Secrets
Manager. Each step is proven from the database itself: who can log in, what they can read,
which sessions survive."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from activities.providers.postgres import PostgresProvider
from models.contracts import (
    LifecycleAction,
    LifecycleView,
    Phase,
    ProvisionPlan,
    RenewRequest,
    ScopeStatement,
    SweepInput,
)
from models.enums import ActivitySource, NhiKind, Platform
from models.orm import ActivityEvent, AuditEvent, Nhi
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import PostgresTargetSetting, Settings
from nhi.infra.db import make_engine, make_sessionmaker, transaction, upgrade_head
from nhi.infra.slack_client import make_slack_client
from nhi.rules.ids import provision_workflow_id
from nhi.rules.pg_grants import group_name, role_names
from nhi.services.target_registry import TargetRegistry
from tests.conftest import Databases, dev_address
from tests.helpers import eventually, provision, request_nhi, skip_until
from tests.pg_cluster import ADMIN, DATABASE, PgCluster, login, refused
from tests.slack_emulator import SlackEmulator
from worker import build_worker
from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id
from workflows.sweep import SweepWorkflow, orphan_workflow_id

HISTORIES = Path(__file__).resolve().parent / "histories"
DAY = timedelta(days=1)
OWNER = "ana@example.com"
PASSWORD_ENV = "NHI_TEST_COMPANY_ADMIN_PASSWORD"
READ_ARTICLES = [{"actions": ["SELECT"], "resources": ["docs.articles"]}]


@dataclass
class Rig:
    env: WorkflowEnvironment
    settings: Settings
    sessions: sessionmaker[Session]
    aws: AwsClients
    cluster: PgCluster
    queue: str
    target: str


@pytest.fixture
def own_sessions(databases: Databases) -> Iterator[sessionmaker[Session]]:
    """An inventory of the rig's own: its sweeps judge every NHI the inventory holds, and the
    suite's shared inventory holds other tests' NHIs, whose lifecycles run on other servers."""
    url = databases.new("nhi_pglife")
    upgrade_head(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest_asyncio.fixture
async def rig(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    own_sessions: sessionmaker[Session],
    aws: AwsClients,
    cluster: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Rig]:
    """The worker with a target registered in settings, its admin password in the environment
    (as a deployment would have it), never in the inventory."""
    target = f"company{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv(PASSWORD_ENV, cluster.admin_password)
    dsn = f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}"
    rig_settings = settings.model_copy(
        update={
            "temporal_address": dev_address(ts_env),
            "postgres_targets": {
                target: PostgresTargetSetting(dsn=dsn, password_env=PASSWORD_ENV),
                # A target whose admin password the worker cannot find: sweeps report it and
                # still list the others.
                f"{target}-down": PostgresTargetSetting(
                    dsn=dsn, password_env="NHI_TEST_NOT_SET_ANYWHERE"
                ),
            },
            "sweep_propagation_seconds": 0,
            "orphan_grace_seconds": 3600,
        }
    )
    sessions = own_sessions
    queue = f"pg-life-{uuid.uuid4().hex[:8]}"
    async with build_worker(ts_env.client, rig_settings, sessions, aws, task_queue=queue):
        yield Rig(ts_env, rig_settings, sessions, aws, cluster, queue, target)


def _nhi(rig: Rig, nhi_id: uuid.UUID) -> Nhi:
    with transaction(rig.sessions) as s:
        return s.get_one(Nhi, nhi_id)


def _events(rig: Rig, nhi_id: uuid.UUID) -> list[str]:
    with transaction(rig.sessions) as s:
        return list(
            s.scalars(
                select(AuditEvent.event)
                .where(AuditEvent.subject_id == str(nhi_id))
                .order_by(AuditEvent.id)
            )
        )


def _secret(rig: Rig, nhi: Nhi, stage: str = "AWSCURRENT") -> dict[str, Any]:
    value = rig.aws.secrets.get_secret_value(SecretId=nhi.credential_ref or "", VersionStage=stage)
    return dict(json.loads(value["SecretString"]))


def _roles(rig: Rig, group: str) -> dict[str, tuple[bool, datetime | None]]:
    with rig.cluster.connect() as conn:
        rows = conn.execute(
            "SELECT rolname, rolcanlogin, rolvaliduntil FROM pg_roles WHERE rolname LIKE %s",
            (group + "%",),
        ).fetchall()
    return {str(r[0]): (bool(r[1]), r[2]) for r in rows}


@pytest.mark.slow
# As the API provisions (the NHI's one run), and as bundles do (a provisioning run starting the
# lifecycle), whose runs record the golden histories of that shape.
@pytest.mark.parametrize("one_run", [True, False], ids=["one_run", "two_runs"])
async def test_a_postgres_role_lives_rotates_renews_and_is_removed_completely(
    rig: Rig, one_run: bool
) -> None:
    _, nhi_id, sensitive = request_nhi(
        rig.sessions,
        rig.settings,
        "postgres_role",
        scope=READ_ARTICLES,
        target=rig.target,
        ttl="45d",
        owner_email=OWNER,
        now=await rig.env.get_current_time(),
    )
    assert sensitive == [], "read-only grants need no approver"
    handle = await provision(rig.env, rig.queue, nhi_id, one_run=one_run)
    nhi = _nhi(rig, nhi_id)
    assert nhi.status == "active" and nhi.target == rig.target
    born, group = nhi.activated_at, nhi.name
    assert born is not None
    first = _secret(rig, nhi)
    # The inventory holds references only: a DSN without password and the secret's ARN.
    assert nhi.external_id and first["password"] not in nhi.external_id
    assert "password" not in (nhi.external_id or "").lower()
    assert (nhi.credential_ref or "").startswith("arn:aws:secretsmanager:")
    with login(first) as conn:
        assert conn.execute("SELECT count(*) FROM docs.articles").fetchone() == (3,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM hr.salaries")
    login_a, login_b = role_names(group)
    assert first["username"] == login_a
    assert _roles(rig, group)[login_a][1] == nhi.expires_at, "VALID UNTIL is the expiry"

    # A client that connected with the first password keeps its session through rotation.
    old_session = login(first)
    overlap = timedelta(seconds=rig.settings.rotation_overlap_seconds)
    await skip_until(rig.env, handle, born + 30 * DAY + timedelta(minutes=5))
    second = _secret(rig, _nhi(rig, nhi_id))
    assert second["username"] == login_b and second["password"] != first["password"]
    assert old_session.execute("SELECT count(*) FROM docs.articles").fetchone() == (3,)
    assert not refused(first), "the old password still works during the overlap"
    with login(second) as conn:
        assert conn.execute("SELECT count(*) FROM docs.articles").fetchone() == (3,)
    assert "nhi.rotated" in _events(rig, nhi_id)

    # After the overlap the old login is disabled and its session ended; later it is dropped.
    await skip_until(rig.env, handle, born + 30 * DAY + overlap + timedelta(minutes=5))
    assert refused(first)
    with pytest.raises(psycopg.OperationalError):
        old_session.execute("SELECT 1")
    old_session.close()
    await skip_until(rig.env, handle, born + 30 * DAY + 2 * overlap + timedelta(minutes=5))
    assert login_a not in _roles(rig, group), "the retired login role is dropped"
    assert not refused(second)

    # Renewal moves VALID UNTIL in the database itself.
    renewed = await handle.execute_update(
        NhiLifecycleWorkflow.renew,
        RenewRequest(actor=OWNER, reason="still indexing", extend_by_seconds=40 * 86400),
    )
    assert _roles(rig, group)[login_b][1] == renewed.expires_at

    # Decommission: quarantined at once (no login, live sessions ended), removed after grace.
    live = login(second)
    view = await handle.execute_update(
        NhiLifecycleWorkflow.decommission,
        LifecycleAction(actor=OWNER, reason="task finished"),
    )
    assert view.message == "decommission started"

    async def quarantined() -> None:
        assert _nhi(rig, nhi_id).status == "quarantined"

    await eventually(quarantined)
    assert refused(second)
    with pytest.raises(psycopg.OperationalError):
        live.execute("SELECT 1")
    live.close()
    async with rig.env.time_skipping_unlocked():  # type: ignore[attr-defined]
        result = await handle.result()
    assert result.phase is Phase.DECOMMISSIONED
    assert _roles(rig, group) == {}, "group and login roles are gone"
    described = rig.aws.secrets.describe_secret(SecretId=nhi.credential_ref or "")
    assert "DeletedDate" in described, "the secret is scheduled for deletion"
    events = _events(rig, nhi_id)
    assert events[-2:] == ["nhi.quarantined", "nhi.decommissioned"]
    if os.environ.get("NHI_RECORD_HISTORIES") and not one_run:
        # Golden histories of the provider-interface path (tests/test_replay.py replays them).
        for name, wid in (
            ("postgres_provision", provision_workflow_id(nhi_id)),
            ("postgres_lifecycle", lifecycle_workflow_id(nhi_id)),
        ):
            history = await rig.env.client.get_workflow_handle(wid).fetch_history()
            (HISTORIES / f"{name}.json").write_text(history.to_json())


async def test_a_postgres_sweep_removes_an_orphaned_role_and_reports_drift(rig: Rig) -> None:
    # A live NHI that someone widened by hand, through the admin account.
    _, widened_id, _ = request_nhi(
        rig.sessions,
        rig.settings,
        "postgres_role",
        scope=READ_ARTICLES,
        target=rig.target,
        ttl="10d",
        now=await rig.env.get_current_time(),
    )
    await provision(rig.env, rig.queue, widened_id)
    widened = _nhi(rig, widened_id)
    with rig.cluster.connect(ADMIN, rig.cluster.admin_password) as conn:
        conn.execute(f"GRANT SELECT ON docs.faq TO {widened.name}")
    # An identity this service made whose inventory row is gone (restored from an old backup,
    # say): its roles carry our marker, its secret our tags.
    nhi_id = uuid.uuid4()
    plan = ProvisionPlan(
        nhi_id=nhi_id,
        agent_id=uuid.uuid4(),
        agent_name="lost",
        environment="dev",
        owner_email=OWNER,
        platform=Platform.POSTGRES,
        kind=NhiKind.POSTGRES_ROLE,
        identity_name=group_name(rig.settings.name_prefix, "lost", nhi_id),
        iam_path="/",
        secret_name=f"{rig.settings.secret_prefix}dev/lost/{nhi_id}",
        scope=[ScopeStatement(actions=["SELECT"], resources=["docs.articles"])],
        expires_at=datetime.now(UTC) + DAY,
        tags={"managed-by": "nhi-lifecycle", "nhi:nhi-id": str(nhi_id)},
        target=rig.target,
    )
    provider = PostgresProvider(
        TargetRegistry(rig.sessions, rig.settings, rig.aws.secrets), rig.aws.secrets
    )
    provider.create(plan)
    created = provider.deliver(plan)
    delivered = json.loads(
        rig.aws.secrets.get_secret_value(
            SecretId=created.credential_ref, VersionStage="AWSCURRENT"
        )["SecretString"]
    )
    assert not refused(delivered)

    with rig.env.auto_time_skipping_disabled():
        outcome = await rig.env.client.execute_workflow(
            SweepWorkflow.run,
            SweepInput(provider="postgres", triggered_by="test"),
            id=f"pg-sweep-{uuid.uuid4().hex[:8]}",
            task_queue=rig.queue,
        )
    down = [f for f in outcome.findings if f.identity == f"{rig.target}-down"]
    assert [(f.kind.value, f.identity_kind) for f in down] == [("unreachable", "target")]
    assert "NHI_TEST_NOT_SET_ANYWHERE" in down[0].detail
    orphans = [
        f for f in outcome.findings if f.kind.value == "orphan" and f.identity == plan.identity_name
    ]
    assert len(orphans) == 1 and orphans[0].target == rig.target
    assert orphans[0].secret_arn == created.credential_ref
    assert "removal started" in orphans[0].action
    drift = [f for f in outcome.findings if f.kind.value == "drift"]
    assert [(f.identity, f.nhi_id) for f in drift] == [(widened.name, widened_id)]
    assert "beyond the scope: SELECT on docs.faq" in drift[0].detail

    removal = rig.env.client.get_workflow_handle(
        orphan_workflow_id("postgres_role", plan.identity_name, rig.target)
    )

    async def disabled() -> None:
        assert refused(delivered)
        assert not any(can for can, _ in _roles(rig, plan.identity_name).values())

    await eventually(disabled)
    async with rig.env.time_skipping_unlocked():  # type: ignore[attr-defined]
        removed = await removal.result()  # after the grace period
    assert any(plan.identity_name in r for r in removed)
    assert _roles(rig, plan.identity_name) == {}


def test_the_worker_builds_the_postgres_provider_over_registered_targets(
    settings: Settings, sessions: sessionmaker[Session], aws: AwsClients, cluster: PgCluster
) -> None:
    """Settings targets resolve their admin password from the environment at use, and an
    unset variable is a clear error naming the variable, never a value."""
    registry = TargetRegistry(
        sessions,
        settings.model_copy(
            update={
                "postgres_targets": {
                    "elsewhere": PostgresTargetSetting(
                        dsn=f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}",
                        password_env="NHI_TEST_UNSET_PASSWORD_VARIABLE",
                    )
                }
            }
        ),
        aws.secrets,
        environ=dict(os.environ),
    )
    provider = PostgresProvider(registry, aws.secrets)
    assert "elsewhere" in registry.names()
    with pytest.raises(Exception, match="NHI_TEST_UNSET_PASSWORD_VARIABLE"):
        provider.last_used(
            __import__("models.enums").enums.NhiKind.POSTGRES_ROLE, "nhi_x", "elsewhere"
        )


async def test_a_grant_by_another_role_makes_removal_revoke_failed_naming_it_alerted_once(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    cluster: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 11: someone other than the target's admin granted the NHI's role a privilege, so
    `DROP OWNED` cannot finish (SQLSTATE 2BP01). Within the alert window the NHI is
    `revoke_failed` naming the grantor and privilege, the owner and security hear once, the
    logins stay locked, and the removal completes once the grantor revokes."""
    slack = SlackEmulator(token="xoxb-test")
    slack.start()
    try:
        owner_dm = "D" + slack.add_user(OWNER)[1:]
        target = f"company{uuid.uuid4().hex[:6]}"
        monkeypatch.setenv(PASSWORD_ENV, cluster.admin_password)
        dsn = f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}"
        rig_settings = settings.model_copy(
            update={
                "temporal_address": dev_address(ts_env),
                "postgres_targets": {
                    target: PostgresTargetSetting(dsn=dsn, password_env=PASSWORD_ENV)
                },
                "slack_bot_token": SecretStr("xoxb-test"),
                "slack_api_url": slack.url,
            }
        )
        queue = f"pg-blocked-{uuid.uuid4().hex[:8]}"
        worker = build_worker(
            ts_env.client,
            rig_settings,
            sessions,
            aws,
            slack=make_slack_client(rig_settings),
            task_queue=queue,
        )
        async with worker:
            _, nhi_id, _ = request_nhi(
                sessions,
                rig_settings,
                "postgres_role",
                scope=READ_ARTICLES,
                target=target,
                ttl="10d",
                owner_email=OWNER,
                now=await ts_env.get_current_time(),
            )
            handle = await provision(ts_env, queue, nhi_id)
            with transaction(sessions) as s:
                nhi = s.get_one(Nhi, nhi_id)
                group, credential_ref = nhi.name, nhi.credential_ref or ""
            password = json.loads(
                aws.secrets.get_secret_value(SecretId=credential_ref)["SecretString"]
            )
            with cluster.connect() as conn:  # the data owner, not the admin, grants more
                conn.execute("SET ROLE data_owner")
                conn.execute(f'GRANT SELECT ON docs.faq TO "{group}"')

            await handle.execute_update(
                NhiLifecycleWorkflow.decommission,
                LifecycleAction(actor="security:sec-oncall", reason="contain the RAG agent"),
            )

            async def quarantined() -> LifecycleView:
                view = await handle.query(NhiLifecycleWorkflow.view)
                assert view.phase is Phase.QUARANTINED, view.phase
                return view

            grace_end = (await eventually(quarantined)).grace_ends_at
            assert grace_end is not None
            window = timedelta(seconds=rig_settings.revoke_alert_seconds)
            view = await skip_until(ts_env, handle, grace_end + window + timedelta(minutes=2))
            assert view.phase is Phase.REVOKE_FAILED
            with transaction(sessions) as s:
                current = s.get_one(Nhi, nhi_id)
                assert current.status == "revoke_failed"
                reason = current.status_reason or ""
            assert "DependentObjectsStillExist" in reason and "2BP01" in reason, reason
            assert f"SELECT on table docs.faq granted by data_owner to {group}" in reason, reason
            security = [m.text or "" for m in slack.messages_in("#nhi-security")]
            owner = [m.text or "" for m in slack.messages_in(owner_dm)]
            assert len([t for t in security if "keeps failing" in t]) == 1, security
            assert len([t for t in owner if "keeps failing" in t]) == 1, owner
            assert "data_owner" in next(t for t in security if "keeps failing" in t)
            assert refused(password), "the logins stay locked while removal is retried"

            with cluster.connect() as conn:  # the blocker is gone: the next retry finishes
                conn.execute("SET ROLE data_owner")
                conn.execute(f'REVOKE SELECT ON docs.faq FROM "{group}"')
            async with ts_env.time_skipping_unlocked():  # type: ignore[attr-defined]
                result = await handle.result()
            assert result.phase is Phase.DECOMMISSIONED
            with cluster.connect() as conn:
                left = conn.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (f"{group}%",)
                ).fetchall()
            assert left == []
    finally:
        slack.stop()


async def test_a_postgres_sweep_samples_live_sessions_into_activity(rig: Rig) -> None:
    """A Postgres sweep takes one `pg_stat_activity` sample of every target (issue 17): the
    live session of an NHI's login becomes an event of that NHI; a target the worker cannot
    reach is reported in the sample's outcome, not imported."""
    _, nhi_id, _ = request_nhi(
        rig.sessions,
        rig.settings,
        "postgres_role",
        scope=READ_ARTICLES,
        target=rig.target,
        ttl="1d",
        owner_email=OWNER,
        now=await rig.env.get_current_time(),
    )
    await provision(rig.env, rig.queue, nhi_id)
    nhi = _nhi(rig, nhi_id)
    with login(_secret(rig, nhi)) as conn:
        conn.execute("SELECT count(*) FROM docs.articles")
        with rig.env.auto_time_skipping_disabled():
            outcome = await rig.env.client.execute_workflow(
                SweepWorkflow.run,
                SweepInput(provider="postgres", triggered_by="test"),
                id=f"pg-sweep-{uuid.uuid4().hex[:8]}",
                task_queue=rig.queue,
            )
    # The live session, and the target whose admin password is missing reported, not skipped.
    assert outcome.summary["activity_events"] >= 1
    assert outcome.summary["activity_samples_failed"] == 1
    with transaction(rig.sessions) as s:
        seen = list(
            s.scalars(
                select(ActivityEvent.action).where(
                    ActivityEvent.nhi_id == nhi_id,
                    ActivityEvent.source == ActivitySource.POSTGRES,
                )
            )
        )
        assert seen, "the live session is an event of its NHI"
        assert s.get_one(Nhi, nhi_id).last_used_at is not None
