"""Sweeps under faults, on a fresh time-skipping server against moto over HTTP, the real
inventory and the Slack emulator: an NHI deleted behind the service's back becomes `missing`
(never on a partial listing), orphan deletions are audited and a removal that keeps failing is
alerted once, and a later sweep's nudge is not taken for an earlier one's.

Each test gets its own IAM path and name prefix, so it sweeps only what it made."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from pydantic import SecretStr
from slack_sdk import WebClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import (
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowQueryFailedError,
)
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.providers.registry import build_providers
from activities.sweep import SweepActivities
from api.app import create_app
from models.contracts import (
    Finding,
    FindingKind,
    LifecycleAction,
    ProvisionInput,
    SweepInput,
    SweepOutcome,
)
from models.orm import Agent, AuditEvent, Nhi, Sweep
from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import PostgresTargetSetting, Settings
from nhi.infra.db import make_engine, make_sessionmaker, transaction, upgrade_head
from nhi.infra.slack_client import make_slack_client
from nhi.rules.ids import provision_workflow_id
from nhi.services.policies import find_policy
from nhi.services.target_registry import TargetRegistry
from tests.conftest import Databases, dev_address
from tests.helpers import (
    ApiServer,
    SweepRig,
    bearer,
    delete_role,
    eventually,
    inject_aws_error,
    mint,
    provision,
    request_nhi,
    sweep_settings,
)
from tests.pg_cluster import ADMIN, DATABASE, PgCluster
from tests.slack_emulator import SlackEmulator
from worker import build_worker
from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id
from workflows.provision import ProvisionNhiWorkflow
from workflows.sweep import SweepWorkflow, orphan_workflow_id

OWNER = "ana@example.com"
SECURITY = "#nhi-security"


@dataclass
class Rig(SweepRig):
    slack: SlackEmulator
    owner_dm: str

    async def active_nhi(self, kind: str = "iam_role") -> uuid.UUID:
        _, nhi_id, _ = request_nhi(
            self.sessions, self.settings, kind, now=await self.env.get_current_time()
        )
        await provision(self.env, self.queue, nhi_id)
        return nhi_id

    def texts(self, channel: str) -> list[str]:
        return [m.text or "" for m in self.slack.messages_in(channel)]


@pytest.fixture(scope="module")
def slack() -> Iterator[SlackEmulator]:
    with SlackEmulator(token="xoxb-test") as emulator:
        yield emulator


@pytest.fixture
def own_sessions(databases: Databases) -> Iterator[sessionmaker[Session]]:
    """An inventory of the rig's own: a sweep judges every NHI the inventory holds (and keeps
    at most its 500 most urgent findings), and the suite's shared inventory holds thousands."""
    url = databases.new("nhi_sweepfaults")
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
    slack: SlackEmulator,
) -> AsyncIterator[Rig]:
    sessions = own_sessions
    try:
        owner = slack.add_user(OWNER)
    except ValueError:  # added by an earlier test of this module
        owner = str(
            WebClient(token="xoxb-test", base_url=slack.url).users_lookupByEmail(email=OWNER)[
                "user"
            ]["id"]
        )
    slack.clear()
    rig_settings = sweep_settings(
        settings,
        "faults",
        orphan_grace_seconds=3600,
        revoke_alert_seconds=30,
        aws_max_attempts=1,
        slack_bot_token=SecretStr("xoxb-test"),
        slack_api_url=slack.url,
        slack_security_channel=SECURITY,
    )
    queue = rig_settings.temporal_task_queue
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
        yield Rig(ts_env, rig_settings, sessions, aws, worker_aws, queue, slack, "D" + owner[1:])


async def test_an_nhi_deleted_behind_our_back_is_missing_alerted_and_its_lifecycle_stops(
    rig: Rig,
) -> None:
    nhi_id = await rig.active_nhi()
    name = rig.nhi(nhi_id).name
    delete_role(rig.aws, name)  # someone in the console
    rig.slack.clear()

    outcome = await rig.sweep()
    (missing,) = [f for f in outcome.findings if f.kind.value == "missing"]
    assert missing.nhi_id == nhi_id
    assert "marked missing" in missing.action and "lifecycle stopped" in missing.action, missing

    nhi = rig.nhi(nhi_id)
    assert nhi.status == "missing" and "gone from the platform" in (nhi.status_reason or "")
    assert ("nhi.missing", "system:sweep") in rig.events(nhi_id)
    alerts = [t for t in rig.texts(SECURITY) if name in t and "gone from its platform" in t]
    assert len(alerts) == 1, rig.texts(SECURITY)
    assert len([t for t in rig.texts(rig.owner_dm) if name in t]) == 1, "the owner is told"

    lifecycle = rig.env.client.get_workflow_handle(lifecycle_workflow_id(nhi_id))

    async def stopped() -> None:
        status = (await lifecycle.describe()).status
        assert status is WorkflowExecutionStatus.COMPLETED, status

    await eventually(stopped)
    # A second sweep finds nothing new to do about it, and tells nobody again.
    again = await rig.sweep()
    assert [f for f in again.findings if f.nhi_id == nhi_id] == []
    assert len([t for t in rig.texts(SECURITY) if "gone from its platform" in t]) == 1
    assert rig.events(nhi_id).count(("nhi.missing", "system:sweep")) == 1


async def test_a_partial_listing_never_marks_missing(rig: Rig) -> None:
    nhi_id = await rig.active_nhi()
    delete_role(rig.aws, rig.nhi(nhi_id).name)
    # The bulk listing keeps being throttled: the listing is incomplete.
    lift = inject_aws_error(
        rig.worker_aws.iam, "GetAccountAuthorizationDetails", "Throttling", status=400
    )
    with pytest.raises(WorkflowFailureError):
        await rig.sweep()
    assert rig.nhi(nhi_id).status == "active"
    assert "nhi.missing" not in [e for e, _ in rig.events(nhi_id)]
    lifecycle = rig.env.client.get_workflow_handle(lifecycle_workflow_id(nhi_id))
    assert (await lifecycle.describe()).status is WorkflowExecutionStatus.RUNNING
    lift()
    outcome = await rig.sweep()  # complete again: now it is missing
    assert [f.nhi_id for f in outcome.findings if f.kind.value == "missing"] == [nhi_id]
    assert rig.nhi(nhi_id).status == "missing"


def _tagged_user(rig: Rig) -> tuple[str, str]:
    """An orphan made behind the service's back: our tags, a key and a secret, no row."""
    name, secret = rig.tagged_user()
    assert secret is not None
    return name, secret


async def _orphan_result(rig: Rig, name: str) -> Any:
    workflow_id = orphan_workflow_id("iam_user_key", name)
    # The latest run: a later sweep starts a new one under the same id.
    latest = (await rig.env.client.get_workflow_handle(workflow_id).describe()).run_id
    handle = rig.env.client.get_workflow_handle(workflow_id, run_id=latest)
    async with rig.env.time_skipping_unlocked():  # type: ignore[attr-defined]
        return await handle.result()


async def test_a_failing_orphan_removal_is_alerted_once_and_retried_by_the_next_sweep(
    rig: Rig,
) -> None:
    ghost, _ = _tagged_user(rig)
    # Someone else's policy keeps the user from being deleted (IAM's DeleteConflict).
    lift = inject_aws_error(rig.worker_aws.iam, "DeleteUser", "DeleteConflict", status=409)
    first = await rig.sweep()
    assert [f.identity for f in first.findings if f.kind.value == "orphan"] == [ghost]
    with pytest.raises(WorkflowFailureError) as failed:
        await _orphan_result(rig, ghost)  # after the grace period and the alert window
    assert "DeleteConflict" in str(failed.value.cause)
    with transaction(rig.sessions) as s:
        (event,) = s.scalars(
            select(AuditEvent).where(
                AuditEvent.subject_type == "orphan",
                AuditEvent.subject_id == ghost,
                AuditEvent.event == "orphan.removal_failed",
            )
        )
        assert event.details["code"] == "DeleteConflict" and "DeleteConflict" in event.reason
    alerts = [t for t in rig.texts(SECURITY) if t.startswith(f"Removing orphan {ghost}")]
    assert len(alerts) == 1 and "DeleteConflict" in alerts[0], rig.texts(SECURITY)

    # The next sweep records the failure in its finding and tries again, without a new grace
    # period; failing again is not alerted again.
    second = await rig.sweep()
    (finding,) = [f for f in second.findings if f.kind.value == "orphan"]
    assert "last removal failed: DeleteConflict" in finding.detail, finding
    assert finding.action.endswith("removal started")
    with pytest.raises(WorkflowFailureError):
        await _orphan_result(rig, ghost)
    assert len([t for t in rig.texts(SECURITY) if t.startswith(f"Removing orphan {ghost}")]) == 1

    lift()  # the blocker is gone: the next sweep's removal completes, and is audited
    await rig.sweep()
    removed = await _orphan_result(rig, ghost)
    assert f"user {ghost}" in removed
    with pytest.raises(rig.aws.iam.exceptions.NoSuchEntityException):
        rig.aws.iam.get_user(UserName=ghost)
    events = rig.events(ghost, "orphan")
    assert [e for e, _ in events] == [
        "orphan.quarantined",
        "orphan.removal_failed",
        "orphan.removal_failed",
        "orphan.deleted",
    ]
    assert all(actor.startswith("system:sweep") for _, actor in events)


async def test_orphan_deletion_is_audited(rig: Rig) -> None:
    ghost, secret = _tagged_user(rig)
    await rig.sweep()
    removed = await _orphan_result(rig, ghost)
    assert f"user {ghost}" in removed
    with transaction(rig.sessions) as s:
        deleted = s.scalars(
            select(AuditEvent).where(
                AuditEvent.subject_type == "orphan",
                AuditEvent.subject_id == ghost,
                AuditEvent.event == "orphan.deleted",
            )
        ).one()
    assert deleted.actor.startswith("system:sweep") and "not in the inventory" in deleted.reason
    assert f"user {ghost}" in deleted.details["removed"]
    assert "DeletedDate" in rig.aws.secrets.describe_secret(SecretId=secret)


async def test_a_later_sweep_nudge_after_a_restore_is_applied(rig: Rig) -> None:
    nhi_id = await rig.active_nhi()
    lifecycle = rig.env.client.get_workflow_handle_for(
        NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi_id)
    )

    async def loaded() -> None:
        # A lifecycle that loads its configuration after the agent is marked completed
        # decommissions on its own (as it should), leaving the sweep nothing to nudge: the
        # missed API call must come after the load. The view answers only once loaded.
        try:
            await lifecycle.query(NhiLifecycleWorkflow.view)
        except (WorkflowQueryFailedError, RPCError) as err:
            raise AssertionError(f"lifecycle not loaded yet: {err}") from err

    await eventually(loaded)
    # The agent's task ended without anyone telling the lifecycle (a missed API call).
    with transaction(rig.sessions) as s:
        s.get_one(Agent, s.get_one(Nhi, nhi_id).agent_id).status = "completed"

    async def quarantined() -> None:
        assert rig.nhi(nhi_id).status == "quarantined"

    first = await rig.sweep()
    nhi = rig.nhi(nhi_id)
    assert [f.nhi_id for f in first.findings if f.kind.value == "agent_gone"] == [nhi_id], (
        f"inventory: {nhi.status}; findings: "
        f"{[(f.kind.value, f.detail) for f in first.findings][:10]}; {first.summary}"
    )
    await eventually(quarantined)
    await lifecycle.execute_update(
        NhiLifecycleWorkflow.restore,
        LifecycleAction(actor=OWNER, channel="api", reason="still needed for the migration"),
    )
    assert rig.nhi(nhi_id).status == "active"

    second = await rig.sweep()  # a new term: this sweep's nudge is its own request
    (gone,) = [f for f in second.findings if f.kind.value == "agent_gone"]
    assert gone.action.endswith("decommission started"), gone
    await eventually(quarantined)
    assert [e for e, _ in rig.events(nhi_id)].count("nhi.quarantined") == 2


async def test_a_sweep_whose_start_was_given_up_on_still_reports(rig: Rig) -> None:
    # The API answered 503 and closed the row, but the start had reached Temporal after all.
    sweep_id, workflow_id = uuid.uuid4(), f"nhi-sweep-aws-manual-{uuid.uuid4()}"
    with transaction(rig.sessions) as s:
        s.add(
            Sweep(
                id=sweep_id,
                provider="aws",
                dry_run=True,
                triggered_by="token:late",
                workflow_id=workflow_id,
                status="failed",
                error="the sweep could not start: RPCError: deadline exceeded",
                summary={},
                findings=[],
            )
        )
    with rig.env.auto_time_skipping_disabled():
        await rig.env.client.execute_workflow(
            SweepWorkflow.run,
            SweepInput(dry_run=True, triggered_by="token:late", sweep_id=sweep_id),
            id=workflow_id,
            task_queue=rig.queue,
        )
    with transaction(rig.sessions) as s:
        row = s.get_one(Sweep, sweep_id)
        assert (row.status, row.error) == ("completed", None)
    assert [e for e, _ in rig.events(sweep_id, "sweep")] == ["sweep.started", "sweep.completed"]


# ---- on the Temporal dev server (visibility; the API in front of it) -------------------------


class TcpGate:
    """A TCP relay in front of Temporal's frontend that can be closed: existing connections
    are cut and new ones refused, as when Temporal goes down."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._open = True
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self._open:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open:
                client.close()
                return
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._open = False
        # (shutdown wakes the accepting thread; close alone would leave the socket listening)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


async def test_a_manual_sweep_that_cannot_start_leaves_no_running_row(
    dev_env: WorkflowEnvironment, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    tag = uuid.uuid4().hex[:8]
    gate = TcpGate(dev_address(dev_env))
    api_settings = settings.model_copy(
        update={"temporal_address": gate.address, "temporal_task_queue": f"gate-{tag}"}
    )
    token = mint(sessions, f"sweeper-{tag}", "security")
    try:
        with ApiServer(create_app(api_settings)) as server:
            async with httpx.AsyncClient(
                base_url=server.url, headers=bearer(token), timeout=60
            ) as http:
                # Connected: a sweep starts (no worker polls this queue, so it only waits).
                started = await http.post("/v1/sweeps", json={"provider": "aws", "dry_run": True})
                assert started.status_code == 202, started.text
                gate.close()  # Temporal goes away
                began = time.monotonic()
                refused = await http.post("/v1/sweeps", json={"provider": "aws", "dry_run": True})
                assert refused.status_code == 503, refused.text
                assert time.monotonic() - began < 15
    finally:
        gate.close()
        await dev_env.client.get_workflow_handle(started.json()["workflow_id"]).terminate()
    with transaction(sessions) as s:
        rows = s.scalars(
            select(Sweep).where(
                Sweep.triggered_by == f"token:sweeper-{tag}", Sweep.id != started.json()["id"]
            )
        ).all()
        assert [r.status for r in rows] == ["failed"], "no `running` row is left behind"
        assert "could not start" in (rows[0].error or "")
        (event,) = s.scalars(
            select(AuditEvent).where(
                AuditEvent.subject_type == "sweep", AuditEvent.subject_id == str(rows[0].id)
            )
        )
        assert (event.event, event.actor) == ("sweep.start_failed", f"token:sweeper-{tag}")


async def test_unsupervised_nhis_are_found_through_visibility(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    tag = uuid.uuid4().hex[:6]
    queue = f"vis-{tag}"
    dev_settings = settings.model_copy(
        update={
            "temporal_task_queue": queue,
            "iam_path": f"/vis-{tag}/",
            "name_prefix": f"v{tag}",
            "sweep_propagation_seconds": 0,
            "sweep_calls_per_second": 1000.0,
        }
    )
    client = dev_env.client
    async with build_worker(client, dev_settings, sessions, aws, task_queue=queue):
        ids = []
        for _ in range(2):
            _, nhi_id, _ = request_nhi(sessions, dev_settings, "iam_role")
            await client.execute_workflow(
                ProvisionNhiWorkflow.run,
                ProvisionInput(nhi_id=nhi_id),
                id=provision_workflow_id(nhi_id),
                task_queue=queue,
            )
            ids.append(nhi_id)
        lost, kept = ids
        await client.get_workflow_handle(lifecycle_workflow_id(lost)).terminate(reason="lost")
        outcome = await client.execute_workflow(
            SweepWorkflow.run,
            SweepInput(triggered_by="test"),
            id=f"sweep-{tag}",
            task_queue=queue,
        )
        unsupervised = [f for f in outcome.findings if f.kind.value == "unsupervised"]
        assert [f.nhi_id for f in unsupervised] == [lost]
        assert unsupervised[0].action.endswith("lifecycle started")
        for nhi_id in ids:  # leave nothing running on the shared dev server
            await client.get_workflow_handle(lifecycle_workflow_id(nhi_id)).terminate()
        assert kept != lost


async def test_an_unreachable_postgres_target_never_marks_its_nhis_missing(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    own_sessions: sessionmaker[Session],
    aws: AwsClients,
    cluster: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Roles dropped by hand while the target cannot be listed (its admin password is not
    found): reported unreachable, its NHI stays active; once listed again, it is missing.

    On an inventory of its own: the suite's shared one names other tests' targets, long gone,
    and a sweep would wait for each of them to refuse."""
    sessions = own_sessions
    target, password_env = f"gone{uuid.uuid4().hex[:6]}", f"NHI_TEST_PW_{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv(password_env, cluster.admin_password)  # the deployment's environment
    queue = f"pg-missing-{target}"
    pg_settings = settings.model_copy(
        update={
            "postgres_targets": {
                target: PostgresTargetSetting(
                    dsn=f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}",
                    password_env=password_env,
                )
            },
            "temporal_task_queue": queue,
            "sweep_propagation_seconds": 0,
        }
    )

    async def sweep() -> SweepOutcome:
        with ts_env.auto_time_skipping_disabled():
            return await ts_env.client.execute_workflow(
                SweepWorkflow.run,
                SweepInput(provider="postgres", triggered_by="test"),
                id=f"pg-sweep-{uuid.uuid4().hex[:8]}",
                task_queue=queue,
            )

    async with build_worker(ts_env.client, pg_settings, sessions, aws, task_queue=queue):
        _, nhi_id, _ = request_nhi(
            sessions,
            pg_settings,
            "postgres_role",
            scope=[{"actions": ["SELECT"], "resources": ["docs.articles"]}],
            target=target,
            now=await ts_env.get_current_time(),
        )
        await provision(ts_env, queue, nhi_id)
        with transaction(sessions) as s:
            group = s.get_one(Nhi, nhi_id).name
        # Someone drops the roles by hand (revoking what the admin granted them first).
        with cluster.connect(ADMIN, cluster.admin_password) as conn:
            conn.execute(f'REVOKE ALL ON ALL TABLES IN SCHEMA docs FROM "{group}"')
            conn.execute(f'REVOKE ALL ON SCHEMA docs FROM "{group}"')
        with cluster.connect() as conn:
            for role in (f"{group}_a", f"{group}_b", group):
                conn.execute(f'DROP ROLE "{role}"')
        monkeypatch.delenv(password_env)  # and the target cannot be listed
        blind = await sweep()
        assert [f.identity for f in blind.findings if f.kind.value == "unreachable"] == [target]
        assert [f for f in blind.findings if f.kind.value == "missing" and f.nhi_id == nhi_id] == []
        with transaction(sessions) as s:
            assert s.get_one(Nhi, nhi_id).status == "active"
        monkeypatch.setenv(password_env, cluster.admin_password)
        seeing = await sweep()
        assert [f.nhi_id for f in seeing.findings if f.kind.value == "missing"] == [nhi_id]
        with transaction(sessions) as s:
            assert s.get_one(Nhi, nhi_id).status == "missing"


async def test_a_retried_drift_revert_writes_its_event_once(rig: Rig) -> None:
    """Two attempts of one `revert_drift` (same workflow run, e.g. a retry after the first
    attempt committed but its completion was lost) write one `nhi.drift_reverted`: the event's
    idempotency key is the workflow run's plus the step's."""
    nhi_id = await rig.active_nhi()
    row = rig.nhi(nhi_id)
    with transaction(rig.sessions) as session:
        agent = session.get_one(Agent, row.agent_id)
        policy = find_policy(session, row.platform, row.kind, agent.environment)
        assert policy is not None
        was, policy.revert_drift = policy.revert_drift, True
    try:
        providers = build_providers(
            rig.settings,
            rig.worker_aws,
            TargetRegistry(rig.sessions, rig.settings, rig.worker_aws.secrets),
        )
        sweeps = SweepActivities(rig.sessions, providers, rig.settings)
        env = ActivityEnvironment()
        env.info = dataclasses.replace(
            env.info, workflow_id=f"nhi-sweep-retry-{nhi_id}", workflow_run_id="run-1"
        )
        finding = Finding(
            kind=FindingKind.DRIFT, identity=row.name, identity_kind=row.kind, nhi_id=nhi_id
        )
        for _ in range(2):
            assert await asyncio.to_thread(env.run, sweeps.revert_drift, finding) is True
    finally:
        with transaction(rig.sessions) as session:
            restored = find_policy(session, row.platform, row.kind, agent.environment)
            assert restored is not None
            restored.revert_drift = was
    reverted = [e for e, _ in rig.events(nhi_id) if e == "nhi.drift_reverted"]
    assert reverted == ["nhi.drift_reverted"]
