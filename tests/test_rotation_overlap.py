"""Rotations asked for while an older key is still retiring, on Temporal's time-skipping
server with real activities (Postgres, moto over HTTP, a Postgres target): every old key is
retired and deleted with its audit event, and the key in use never is."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from models.contracts import LifecycleAction, LifecycleView, Phase
from models.orm import AuditEvent, Nhi
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import PostgresTargetSetting, Settings
from nhi.infra.db import transaction
from nhi.rules.pg_grants import role_names
from tests.conftest import dev_address
from tests.helpers import eventually, keep_history, provision, request_nhi, skip_until
from tests.pg_cluster import ADMIN, DATABASE, PgCluster, login, refused
from worker import build_worker
from workflows.lifecycle import NhiLifecycleWorkflow

OWNER = "ana@example.com"
HOUR = timedelta(hours=1)
PASSWORD_ENV = "NHI_TEST_OVERLAP_ADMIN_PASSWORD"


@dataclass
class Rig:
    env: WorkflowEnvironment
    settings: Settings
    sessions: sessionmaker[Session]
    aws: AwsClients
    queue: str
    target: str = ""
    cluster: PgCluster | None = None


@pytest_asyncio.fixture
async def rig(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> AsyncIterator[Rig]:
    """A worker on the time-skipping server, without Slack (prompts go to the log)."""
    rig_settings = settings.model_copy(update={"temporal_address": dev_address(ts_env)})
    queue = f"overlap-{uuid.uuid4().hex[:8]}"
    async with build_worker(ts_env.client, rig_settings, sessions, aws, task_queue=queue):
        yield Rig(ts_env, rig_settings, sessions, aws, queue)


@pytest_asyncio.fixture
async def pg_rig(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    cluster: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Rig]:
    """The same, with a Postgres target registered in settings."""
    target = f"overlap{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv(PASSWORD_ENV, cluster.admin_password)
    dsn = f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}"
    rig_settings = settings.model_copy(
        update={
            "temporal_address": dev_address(ts_env),
            "postgres_targets": {target: PostgresTargetSetting(dsn=dsn, password_env=PASSWORD_ENV)},
        }
    )
    queue = f"pg-overlap-{uuid.uuid4().hex[:8]}"
    async with build_worker(ts_env.client, rig_settings, sessions, aws, task_queue=queue):
        yield Rig(ts_env, rig_settings, sessions, aws, queue, target, cluster)


def _nhi(rig: Rig, nhi_id: uuid.UUID) -> Nhi:
    with transaction(rig.sessions) as s:
        return s.get_one(Nhi, nhi_id)


def _reasons(rig: Rig, nhi_id: uuid.UUID, event: str) -> list[str]:
    with transaction(rig.sessions) as s:
        rows = s.execute(
            select(AuditEvent.reason)
            .where(AuditEvent.subject_id == str(nhi_id), AuditEvent.event == event)
            .order_by(AuditEvent.id)
        )
        return [r for (r,) in rows]


def _current(rig: Rig, nhi: Nhi) -> dict[str, Any]:
    value = rig.aws.secrets.get_secret_value(
        SecretId=nhi.credential_ref or "", VersionStage="AWSCURRENT"
    )["SecretString"]
    return dict(json.loads(value))


def _current_key(rig: Rig, nhi: Nhi) -> str:
    return str(_current(rig, nhi)["AccessKeyId"])


def _keys(rig: Rig, name: str) -> dict[str, str]:
    meta = rig.aws.iam.list_access_keys(UserName=name)["AccessKeyMetadata"]
    return {k["AccessKeyId"]: k["Status"] for k in meta}


async def _rotate(
    rig: Rig, handle: WorkflowHandle[Any, LifecycleView], nhi: Nhi, rotations: int
) -> str:
    """Ask for a rotation and wait until the lifecycle has promoted the new key; its id."""
    await _ask_rotation(rig, handle, nhi, rotations)
    return _current_key(rig, nhi)


async def _ask_rotation(
    rig: Rig, handle: WorkflowHandle[Any, LifecycleView], nhi: Nhi, rotations: int
) -> None:
    with rig.env.auto_time_skipping_disabled():

        async def accepted() -> None:
            # The previous rotation's audit event is written just before the run marks that
            # rotation done: until then a new request is refused as "already under way".
            try:
                view = await handle.execute_update(
                    NhiLifecycleWorkflow.rotate, LifecycleAction(actor=OWNER, reason="rotate now")
                )
            except WorkflowUpdateFailedError as err:
                assert "already under way" not in str(err.cause), err.cause
                raise
            assert view.message == "rotation started"

        await eventually(accepted)

        async def rotated() -> None:
            assert len(_reasons(rig, nhi.id, "nhi.rotated")) == rotations

        await eventually(rotated)


async def test_rotations_during_an_overlap_retire_every_old_key(rig: Rig) -> None:
    now = await rig.env.get_current_time()
    _, nhi_id, _ = request_nhi(rig.sessions, rig.settings, "iam_user_key", ttl="30d", now=now)
    handle = await provision(rig.env, rig.queue, nhi_id)
    nhi = _nhi(rig, nhi_id)
    born = nhi.activated_at
    assert born is not None
    first = _current_key(rig, nhi)

    second = await _rotate(rig, handle, nhi, 1)
    assert _keys(rig, nhi.name) == {first: "Active", second: "Active"}, "first key overlaps"
    # Asked again while the first key still retires: IAM holds two keys at most, so AWS retires
    # the first one early when staging; the lifecycle must keep both old keys retiring.
    third = await _rotate(rig, handle, nhi, 2)
    assert len({first, second, third}) == 3
    assert _keys(rig, nhi.name) == {second: "Active", third: "Active"}

    # Past both overlaps: only the key in use is left, and each old key's deletion is on record.
    await skip_until(rig.env, handle, born + 3 * HOUR)

    async def retired() -> None:
        assert _keys(rig, nhi.name) == {third: "Active"}
        deleted = _reasons(rig, nhi_id, "nhi.old_key_deleted")
        assert len(deleted) == 2, deleted
        assert first in deleted[0] and second in deleted[1]

    await eventually(retired)
    assert _current_key(rig, nhi) == third

    with rig.env.auto_time_skipping_disabled():
        await handle.execute_update(
            NhiLifecycleWorkflow.decommission, LifecycleAction(actor=OWNER, reason="done")
        )
    # (A handle from get_workflow_handle does not skip time by itself while awaiting a result.)
    async with rig.env.time_skipping_unlocked():  # type: ignore[attr-defined]
        view = await handle.result()
    assert view.phase is Phase.DECOMMISSIONED
    # The golden history of this path (tests/test_replay.py replays it).
    keep_history(await handle.fetch_history(), "lifecycle_rotation_overlap")


async def test_postgres_rotations_during_an_overlap_never_retire_the_login_in_use(
    pg_rig: Rig,
) -> None:
    """Two logins alternate: a rotation during the overlap re-keys the login still retiring,
    which is then the one in use and must keep working; only the other one is dropped."""
    rig, cluster = pg_rig, pg_rig.cluster
    assert cluster is not None
    now = await rig.env.get_current_time()
    _, nhi_id, _ = request_nhi(
        rig.sessions,
        rig.settings,
        "postgres_role",
        scope=[{"actions": ["SELECT"], "resources": ["docs.articles"]}],
        target=rig.target,
        ttl="30d",
        owner_email=OWNER,
        now=now,
    )
    handle = await provision(rig.env, rig.queue, nhi_id)
    nhi = _nhi(rig, nhi_id)
    born = nhi.activated_at
    assert born is not None
    login_a, login_b = role_names(nhi.name)
    assert _current(rig, nhi)["username"] == login_a

    await _ask_rotation(rig, handle, nhi, 1)
    assert _current(rig, nhi)["username"] == login_b
    await _ask_rotation(rig, handle, nhi, 2)
    in_use = _current(rig, nhi)
    assert in_use["username"] == login_a, "the retiring login was re-keyed"

    await skip_until(rig.env, handle, born + 3 * HOUR)

    async def retired() -> None:
        with cluster.connect() as conn:
            roles = {
                str(r[0])
                for r in conn.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", ([login_a, login_b],)
                )
            }
        assert roles == {login_a}, roles
        assert len(_reasons(rig, nhi_id, "nhi.old_key_deleted")) == 1

    await eventually(retired)
    assert not refused(in_use), "the login in use still logs in"
    with login(in_use) as conn:
        assert conn.execute("SELECT count(*) FROM docs.articles").fetchone() == (3,)
