"""Sweeps on a fresh time-skipping server, against moto over HTTP and the real inventory.

Each test gets its own IAM path and name prefix, so it sweeps only what it made."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.testing import WorkflowEnvironment

from models.contracts import ProvisionInput, SweepOutcome
from models.orm import Nhi, Sweep
from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.rules.ids import orphan_workflow_id, provision_workflow_id
from tests.helpers import SweepRig, inject_aws_error, request_nhi, sweep_settings
from worker import build_worker
from workflows.lifecycle import lifecycle_workflow_id
from workflows.provision import ProvisionNhiWorkflow


@pytest_asyncio.fixture
async def rig(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> AsyncIterator[SweepRig]:
    rig_settings = sweep_settings(settings, "sweep", orphan_grace_seconds=3600, aws_max_attempts=2)
    queue = rig_settings.temporal_task_queue
    worker_aws = make_aws_clients(rig_settings)
    async with build_worker(ts_env.client, rig_settings, sessions, worker_aws, task_queue=queue):
        yield SweepRig(ts_env, rig_settings, sessions, aws, worker_aws, queue)


def _kinds(outcome: SweepOutcome) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in outcome.findings:
        out.setdefault(f.kind.value, []).append(f.identity)
    return out


def _status(rig: SweepRig, name: str) -> dict[str, Any]:
    keys = rig.aws.iam.list_access_keys(UserName=name)["AccessKeyMetadata"]
    return {
        "keys": sorted(k["Status"] for k in keys),
        "policies": rig.aws.iam.list_user_policies(UserName=name)["PolicyNames"],
    }


async def test_orphans_are_found_tagged_removed_untagged_untouched(rig: SweepRig) -> None:
    _, legit_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_role", now=await rig.env.get_current_time()
    )
    await rig.env.client.execute_workflow(
        ProvisionNhiWorkflow.run,
        ProvisionInput(nhi_id=legit_id),
        id=provision_workflow_id(legit_id),
        task_queue=rig.queue,
    )
    ghost, ghost_secret = rig.tagged_user()
    stranger = f"{rig.settings.name_prefix}-manual-admin"
    rig.aws.iam.create_user(UserName=stranger, Path=rig.settings.iam_path)
    rig.aws.iam.create_access_key(UserName=stranger)

    dry = await rig.sweep(dry_run=True)
    assert _kinds(dry) == {"orphan": [ghost], "untagged": [stranger]}, dry.findings
    assert dry.findings[0].secret_arn == ghost_secret
    assert _status(rig, ghost) == {"keys": ["Active"], "policies": []}, "a dry run changes nothing"

    real = await rig.sweep()
    assert _kinds(real) == {"orphan": [ghost], "untagged": [stranger]}
    orphan = rig.env.client.get_workflow_handle(orphan_workflow_id("iam_user_key", ghost))

    async def quarantined() -> None:
        assert _status(rig, ghost) == {
            "keys": ["Inactive"],
            "policies": ["nhi-quarantine", "nhi-revoke-older-sessions"],
        }

    from tests.helpers import eventually

    await eventually(quarantined)
    again = await rig.sweep()  # right after: the removal is already under way, nothing new
    assert [f.action for f in again.findings if f.kind.value == "orphan"] == [
        "quarantine now, delete after the grace period: removal already under way"
    ]

    async with rig.env.time_skipping_unlocked():  # type: ignore[attr-defined]
        removed = await orphan.result()  # after the one-hour grace
    assert f"user {ghost}" in removed and any(r.startswith("secret ") for r in removed)
    with pytest.raises(rig.aws.iam.exceptions.NoSuchEntityException):
        rig.aws.iam.get_user(UserName=ghost)
    # Scheduled for deletion with a recovery window, like every secret we remove.
    assert "DeletedDate" in rig.aws.secrets.describe_secret(SecretId=ghost_secret or "")
    assert _status(rig, stranger) == {"keys": ["Active"], "policies": []}, "untagged: never touched"
    final = await rig.sweep()
    assert _kinds(final) == {"untagged": [stranger]}
    with transaction(rig.sessions) as s:
        legit = s.get_one(Nhi, legit_id)
        assert legit.status == "active"
        report = s.get_one(Sweep, final.sweep_id)
        assert report.status == "completed" and report.summary["untagged"] == 1


async def test_throttled_listing_stops_the_sweep_and_deletes_nothing(rig: SweepRig) -> None:
    ghost, _ = rig.tagged_user()
    inject_aws_error(rig.worker_aws.iam, "GetAccountAuthorizationDetails", "Throttling", status=400)
    with pytest.raises(WorkflowFailureError) as failure:
        await rig.sweep()
    assert "sweep stopped, nothing changed" in str(failure.value.cause)
    assert _status(rig, ghost) == {"keys": ["Active"], "policies": []}
    with transaction(rig.sessions) as s:
        report = s.query(Sweep).order_by(Sweep.started_at.desc()).first()
        assert (
            report is not None
            and report.status == "failed"
            and "Throttling" in (report.error or "")
        )


@pytest.mark.slow
async def test_a_listing_of_more_than_a_thousand_is_complete(rig: SweepRig) -> None:
    # Roles: moto pages ListRoles (100 a page by default) but returns every user in one page.
    trust = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": "ec2.amazonaws.com"},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
    )
    for i in range(1050):
        rig.aws.iam.create_role(
            RoleName=f"{rig.settings.name_prefix}-bulk-{i:05d}",
            Path=rig.settings.iam_path,
            AssumeRolePolicyDocument=trust,
            Tags=[
                {"Key": "managed-by", "Value": "nhi-lifecycle"},
                {"Key": "nhi:nhi-id", "Value": str(uuid.uuid4())},
            ],
        )
    first_page = rig.aws.iam.list_roles(PathPrefix=rig.settings.iam_path)
    assert first_page["IsTruncated"] and len(first_page["Roles"]) < 1050, "the listing really pages"
    outcome = await rig.sweep(dry_run=True)
    assert outcome.summary["platform_identities"] == 1050
    assert outcome.summary["orphan"] == 1050
    assert len(outcome.findings) == 500 and outcome.summary["truncated"] == 550


async def test_an_nhi_whose_lifecycle_was_terminated_gets_it_back(rig: SweepRig) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_role", now=await rig.env.get_current_time()
    )
    await rig.env.client.execute_workflow(
        ProvisionNhiWorkflow.run,
        ProvisionInput(nhi_id=nhi_id),
        id=provision_workflow_id(nhi_id),
        task_queue=rig.queue,
    )
    lifecycle = rig.env.client.get_workflow_handle(lifecycle_workflow_id(nhi_id))
    await lifecycle.terminate(reason="operator mistake")
    outcome = await rig.sweep()
    unsupervised = [f for f in outcome.findings if f.kind.value == "unsupervised"]
    assert [f.nhi_id for f in unsupervised] == [nhi_id]
    assert unsupervised[0].action == "restart it: lifecycle started"
    restarted = rig.env.client.get_workflow_handle(lifecycle_workflow_id(nhi_id))
    assert (await restarted.describe()).status is WorkflowExecutionStatus.RUNNING
    from tests.helpers import eventually
    from workflows.lifecycle import NhiLifecycleWorkflow

    async def supervising() -> None:
        try:
            view = await restarted.query(NhiLifecycleWorkflow.view)
        except Exception as err:
            raise AssertionError(err) from err
        assert view.phase.value == "active"

    await eventually(supervising)
    assert _kinds(await rig.sweep()) == {}, "a second sweep finds nothing left to do"


async def test_expired_but_alive_is_decommissioned(rig: SweepRig) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions, rig.settings, "iam_role", now=await rig.env.get_current_time()
    )
    await rig.env.client.execute_workflow(
        ProvisionNhiWorkflow.run,
        ProvisionInput(nhi_id=nhi_id),
        id=provision_workflow_id(nhi_id),
        task_queue=rig.queue,
    )
    # A missed timer: the lifecycle is gone and the expiry passed while nobody watched.
    await rig.env.client.get_workflow_handle(lifecycle_workflow_id(nhi_id)).terminate(reason="lost")
    now = await rig.env.get_current_time()
    with transaction(rig.sessions) as s:
        s.get_one(Nhi, nhi_id).expires_at = now - timedelta(hours=1)
    outcome = await rig.sweep()
    # (The hand-edited expiry also shows as drift: the platform's policy names the old one.)
    assert {f.kind.value for f in outcome.findings} == {"expired_alive", "unsupervised", "drift"}

    from tests.helpers import eventually

    async def quarantined() -> None:
        with transaction(rig.sessions) as s:
            assert s.get_one(Nhi, nhi_id).status == "quarantined"

    await eventually(quarantined)
