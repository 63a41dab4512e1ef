"""Kill the worker process in the middle of provisioning an access key, start a new one, and
show that exactly one user, one key and one secret exist and the NHI is active: in the one run
the API starts (the NHI's lifecycle, provisioning first) and in a provisioning run (bundles,
and runs started before one-run provisioning)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from models.contracts import ProvisionInput
from models.orm import Nhi
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.rules.ids import lifecycle_workflow_id, provision_workflow_id
from tests.conftest import dev_address
from tests.gate_proxy import GateProxy
from tests.helpers import eventually, nhi_row, request_nhi, start_one_run
from workflows.lifecycle import NhiLifecycleWorkflow
from workflows.provision import ProvisionNhiWorkflow

ROOT = Path(__file__).resolve().parent.parent


def _worker(
    settings: Settings, temporal: str, aws_endpoint: str, queue: str, **extra: str
) -> subprocess.Popen[bytes]:
    env = dict(os.environ) | extra
    env.update(
        NHI_DATABASE_URL=settings.require_database_url(),
        NHI_TEMPORAL_ADDRESS=temporal,
        NHI_TEMPORAL_TASK_QUEUE=queue,
        NHI_AWS_ENDPOINT_URL=aws_endpoint,
        NHI_AWS_REGION=settings.aws_region,
        # As every test worker: a run that no longer replays fails instead of retrying.
        NHI_WORKER_FAIL_ON_NONDETERMINISM="true",
    )
    return subprocess.Popen([sys.executable, str(ROOT / "worker.py")], env=env, cwd=ROOT)


async def _start(
    env: WorkflowEnvironment, sessions: sessionmaker[Session], shape: str, nhi_id: Any, queue: str
) -> WorkflowHandle[Any, Any]:
    """Provisioning as the API starts it (`one_run`: the NHI's lifecycle, which the row then
    names), or as a provisioning run (`two_runs`)."""
    if shape == "two_runs":
        return await env.client.start_workflow(
            ProvisionNhiWorkflow.run,
            ProvisionInput(nhi_id=nhi_id),
            id=provision_workflow_id(nhi_id),
            task_queue=queue,
        )
    with transaction(sessions) as s:
        s.get_one(Nhi, nhi_id).workflow_id = lifecycle_workflow_id(nhi_id)
    return await start_one_run(env.client, ProvisionInput(nhi_id=nhi_id), queue)


async def _provisioned(
    sessions: sessionmaker[Session], shape: str, nhi_id: Any, handle: WorkflowHandle[Any, Any]
) -> None:
    """Until provisioning is over: the provisioning run ends `active`; the one run keeps the
    NHI, so its row says `active` while the run goes on."""
    if shape == "two_runs":
        result = await asyncio.wait_for(handle.result(), timeout=120)
        assert result.status == "active"
        return

    async def active() -> None:
        assert nhi_row(sessions, nhi_id).status == "active"

    await eventually(active, timeout=120)
    assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["one_run", "two_runs"])
async def test_worker_killed_between_key_creation_and_delivery(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    shape: str,
) -> None:
    queue = f"crash-{os.getpid()}-{id(settings)}-{shape}"
    _, nhi_id, _ = request_nhi(sessions, settings, "iam_user_key")
    with transaction(sessions) as s:
        name = s.get_one(Nhi, nhi_id).name

    with GateProxy(settings.aws_endpoint_url or "", hold_on=b"Action=CreateAccessKey") as gate:
        first = _worker(settings, dev_address(dev_env), gate.url, queue)
        try:
            handle = await _start(dev_env, sessions, shape, nhi_id, queue)
            assert await asyncio.to_thread(gate.reached.wait, 60), "never reached CreateAccessKey"
            # The user exists, the key request is on the wire: kill the worker right there.
            assert aws.iam.get_user(UserName=name)["User"]["UserName"] == name
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        finally:
            if first.poll() is None:
                first.kill()
        # The held request still reaches AWS: a key now exists whose secret nobody holds.
        gate.release()
        assert await asyncio.to_thread(gate.forwarded.wait, 30)
        orphan = aws.iam.list_access_keys(UserName=name)["AccessKeyMetadata"]
        assert len(orphan) == 1
        with pytest.raises(aws.secrets.exceptions.ResourceNotFoundException):
            aws.secrets.describe_secret(SecretId=f"{settings.secret_prefix}dev")

        second = _worker(settings, dev_address(dev_env), settings.aws_endpoint_url or "", queue)
        try:
            await _provisioned(sessions, shape, nhi_id, handle)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=30)

    users = [
        u["UserName"]
        for page in aws.iam.get_paginator("list_users").paginate(PathPrefix=settings.iam_path)
        for u in page["Users"]
    ]
    assert users.count(name) == 1
    keys = aws.iam.list_access_keys(UserName=name)["AccessKeyMetadata"]
    assert len(keys) == 1, keys
    assert keys[0]["AccessKeyId"] != orphan[0]["AccessKeyId"], "the undelivered key must go"
    secrets = aws.secrets.list_secrets(
        Filters=[{"Key": "name", "Values": [f"{settings.secret_prefix}dev/"]}]
    )
    ours = [s for s in secrets["SecretList"] if s["Name"].endswith(str(nhi_id))]
    assert len(ours) == 1
    delivered = json.loads(
        aws.secrets.get_secret_value(SecretId=ours[0]["ARN"], VersionStage="AWSCURRENT")[
            "SecretString"
        ]
    )
    assert delivered["AccessKeyId"] == keys[0]["AccessKeyId"]
    with transaction(sessions) as s:
        nhi = s.get_one(Nhi, nhi_id)
        assert nhi.status == "active"
        assert nhi.credential_ref == ours[0]["ARN"]


def _events(sessions: sessionmaker[Session], nhi_id: object) -> list[str]:
    from sqlalchemy import select

    from models.orm import AuditEvent

    with transaction(sessions) as s:
        return list(
            s.scalars(
                select(AuditEvent.event)
                .where(AuditEvent.subject_id == str(nhi_id))
                .order_by(AuditEvent.id)
            )
        )


@pytest.mark.slow
async def test_worker_killed_during_rotation_leaves_one_working_key(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    from models.contracts import LifecycleAction

    queue = f"crash-rot-{os.getpid()}-{id(sessions)}"
    fast = {"NHI_ROTATION_OVERLAP_SECONDS": "2"}
    _, nhi_id, _ = request_nhi(sessions, settings, "iam_user_key")
    temporal = dev_address(dev_env)
    with GateProxy(
        settings.aws_endpoint_url or "", hold_on=b"Action=CreateAccessKey", armed=False
    ) as gate:
        first = _worker(settings, temporal, gate.url, queue, **fast)
        try:
            # As the API provisions: the NHI's one run, which then rotates it.
            lifecycle = await _start(dev_env, sessions, "one_run", nhi_id, queue)
            await _provisioned(sessions, "one_run", nhi_id, lifecycle)
            with transaction(sessions) as s:
                nhi = s.get_one(Nhi, nhi_id)
            original = json.loads(
                aws.secrets.get_secret_value(
                    SecretId=nhi.credential_ref or "", VersionStage="AWSCURRENT"
                )["SecretString"]
            )["AccessKeyId"]

            async def ready() -> None:
                try:
                    await lifecycle.query(NhiLifecycleWorkflow.view)
                except Exception as err:
                    raise AssertionError(err) from err

            await eventually(ready)
            gate.armed = True
            await lifecycle.execute_update(
                NhiLifecycleWorkflow.rotate,
                LifecycleAction(actor="system:test", channel="system", reason="crash test"),
            )
            assert await asyncio.to_thread(gate.reached.wait, 60), "rotation never created a key"
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        finally:
            if first.poll() is None:
                first.kill()
        gate.release()
        assert await asyncio.to_thread(gate.forwarded.wait, 30)
        assert len(aws.iam.list_access_keys(UserName=nhi.name)["AccessKeyMetadata"]) == 2

        second = _worker(settings, temporal, settings.aws_endpoint_url or "", queue, **fast)
        try:

            async def rotated_and_retired() -> None:
                events = _events(sessions, nhi_id)
                assert "nhi.rotated" in events and "nhi.old_key_deleted" in events, events

            await eventually(rotated_and_retired, timeout=120, interval=0.5)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=30)

    keys = aws.iam.list_access_keys(UserName=nhi.name)["AccessKeyMetadata"]
    delivered = json.loads(
        aws.secrets.get_secret_value(SecretId=nhi.credential_ref or "", VersionStage="AWSCURRENT")[
            "SecretString"
        ]
    )
    assert [(k["AccessKeyId"], k["Status"]) for k in keys] == [(delivered["AccessKeyId"], "Active")]
    assert delivered["AccessKeyId"] != original
    events = _events(sessions, nhi_id)
    assert events.count("nhi.rotated") == 1
