"""Orphans removed in batches (issue 19): a sweep removes the orphans whose grace period is
over in `remove_orphans` activities instead of a child workflow each, completely (keys, login
profile, groups, policies, secret), with their audit events; one whose removal fails is
reported and handed to its `OrphanRemovalWorkflow`, which retries it. A retried batch skips
what it removed and records nothing twice.

The sweep test records the golden history `sweep_aws_batched` (tests/test_replay.py replays
every history in tests/histories/)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders
from sqlalchemy.orm import Session, sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Replayer

from activities.providers.registry import build_providers
from activities.sweep import OrphanBatch, SweepActivities
from models.contracts import FindingKind, OrphanInput
from models.enums import NhiKind
from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import Settings
from nhi.rules.ids import orphan_workflow_id
from nhi.services.target_registry import TargetRegistry
from tests.helpers import (
    HISTORIES,
    audit_trail,
    inject_aws_error,
    keep_history,
    orphan_user,
    run_sweep,
    sweep_settings,
)
from worker import WORKFLOWS, build_worker

REFUSED = (
    b"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code>"
    b"<Message>injected: DeleteUser refused</Message></Error>"
    b"<RequestId>test</RequestId></ErrorResponse>"
)


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Any:
        yield self._body


def _refuse_delete_user(client: Any, name: str) -> Callable[[], None]:
    """DeleteUser of `name` (only) refused on this client, as an SCP would; returns the lift."""

    def answer(request: Any, **_: Any) -> AWSResponse | None:
        body = request.body if isinstance(request.body, bytes) else str(request.body).encode()
        if f"UserName={name}".encode() not in body:
            return None
        return AWSResponse(request.url, 403, HTTPHeaders(), _Raw(REFUSED))

    event = "before-send.iam.DeleteUser"
    client.meta.events.register(event, answer)
    return lambda: client.meta.events.unregister(event, answer)


def _counted(client: Any) -> list[str]:
    """Every IAM call this client makes from now on, by operation."""
    calls: list[str] = []

    def seen(model: Any, **_: Any) -> None:
        calls.append(model.name)

    client.meta.events.register("before-call.iam", seen)
    return calls


def _everything(aws: AwsClients, name: str, label: str) -> None:
    """Whatever a user can hold besides its key: a second key, a console password, a group,
    a managed policy, an inline policy."""
    iam = aws.iam
    iam.create_access_key(UserName=name)
    iam.create_login_profile(UserName=name, Password="Not-a-real-one-1!")
    group = f"{label}-group-{uuid.uuid4().hex[:6]}"
    iam.create_group(GroupName=group)
    iam.add_user_to_group(GroupName=group, UserName=name)
    document = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
    )
    arn = iam.create_policy(PolicyName=f"{label}-{uuid.uuid4().hex[:6]}", PolicyDocument=document)[
        "Policy"
    ]["Arn"]
    iam.attach_user_policy(UserName=name, PolicyArn=arn)
    iam.put_user_policy(UserName=name, PolicyName="extra", PolicyDocument=document)


def _gone(aws: AwsClients, name: str) -> bool:
    try:
        aws.iam.get_user(UserName=name)
    except aws.iam.exceptions.NoSuchEntityException:
        return True
    return False


def _activities(history: WorkflowHistory) -> list[str]:
    return [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


async def test_a_batched_sweep_removes_orphans_completely_and_hands_failures_on(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    """Three orphans, grace 0: one holding everything a user can hold, one bare, one whose
    DeleteUser is refused. The first two are removed completely in the batch, with their audit
    events; the third is reported as failed, stays quarantined, and its removal workflow
    removes it once the refusal is lifted."""
    golden = sweep_settings(
        settings, "batch", orphan_grace_seconds=0, aws_max_attempts=1, revoke_alert_seconds=600
    )
    queue = golden.temporal_task_queue
    full, secret = orphan_user(aws, golden)
    _everything(aws, full, golden.name_prefix)
    bare, _ = orphan_user(aws, golden, with_key=False)
    refused, _ = orphan_user(aws, golden)
    stranger = f"{golden.name_prefix}-manual-admin"
    aws.iam.create_user(UserName=stranger, Path=golden.iam_path)
    worker_aws = make_aws_clients(golden)
    lift = _refuse_delete_user(worker_aws.iam, refused)
    sweep_id = f"golden-batch-sweep-{uuid.uuid4().hex[:8]}"
    async with build_worker(ts_env.client, golden, sessions, worker_aws, task_queue=queue):
        outcome = await run_sweep(ts_env, queue, workflow_id=sweep_id)
        lift()
        removal = ts_env.client.get_workflow_handle(orphan_workflow_id("iam_user_key", refused))
        async with ts_env.time_skipping_unlocked():  # type: ignore[attr-defined]
            handed_on = await removal.result()
        history = await ts_env.client.get_workflow_handle(sweep_id).fetch_history()

    actions = {f.identity: f.action for f in outcome.findings if f.kind is FindingKind.ORPHAN}
    assert set(actions) == {full, bare, refused}, outcome.findings
    assert outcome.summary["orphans_removed"] == 2, outcome.summary
    assert outcome.summary["orphan_removals_failed"] == 1
    assert outcome.summary["orphans_handed_off"] == 1
    assert "removed (grace period over)" in actions[full]
    for part in ("access key", "login profile", "group membership", "attached policy", "secret"):
        assert part in actions[full], actions[full]
    assert "removal failed" in actions[refused] and "AccessDenied" in actions[refused]
    assert "removal started" in actions[refused]
    # Nothing left of the removed ones; the untagged stranger untouched.
    assert _gone(aws, full) and _gone(aws, bare) and _gone(aws, refused)
    assert not _gone(aws, stranger)
    assert secret is not None
    assert "DeletedDate" in aws.secrets.describe_secret(SecretId=secret)
    assert any(refused in r for r in handed_on), handed_on
    for name in (full, bare, refused):
        assert [e for e, _ in audit_trail(sessions, name, "orphan")] == [
            "orphan.quarantined",
            "orphan.deleted",
        ], name
    done = _activities(history)
    assert "remove_orphans" in done and "quarantine_orphan" not in done
    await Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter).replay_workflow(
        history, raise_on_replay_failure=True
    )
    keep_history(history, "sweep_aws_batched")


def test_the_batched_golden_history_removes_in_batches() -> None:
    text = (HISTORIES / "sweep_aws_batched.json").read_text()
    done = _activities(WorkflowHistory.from_json("sweep_aws_batched", text))
    assert "remove_orphans" in done and "plan_sweep" in done and "record_sweep" in done


async def test_a_retried_batch_skips_what_it_removed_and_records_each_event_once(
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    """Attempt 1 removes two orphans and heartbeats them; attempt 2 (with those details)
    makes no IAM call; attempt 3 (its heartbeat lost) removes nothing twice and records no
    event twice. An orphan in its grace period, never quarantined, is left to its workflow."""
    own = sweep_settings(settings, "retry", orphan_grace_seconds=0)
    worker_aws = make_aws_clients(own)
    providers = build_providers(own, worker_aws, TargetRegistry(sessions, own, worker_aws.secrets))
    sweeps = SweepActivities(sessions, providers, own)
    first, secret = orphan_user(aws, own)
    second, _ = orphan_user(aws, own, with_key=False)
    waiting, _ = orphan_user(aws, own)

    def orphan(name: str, secret_arn: str | None = None, grace: int = 0) -> OrphanInput:
        return OrphanInput(
            identity=name,
            identity_kind=NhiKind.IAM_USER_KEY,
            secret_arn=secret_arn,
            grace_seconds=grace,
            found_by="system:sweep (test)",
        )

    batch = OrphanBatch(
        orphans=[orphan(first, secret), orphan(second), orphan(waiting, grace=3600)]
    )
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, workflow_id=f"nhi-sweep-batch-{uuid.uuid4().hex[:6]}", workflow_run_id="run-1"
    )
    env.on_heartbeat = lambda *details: beats.append(details)

    result = await asyncio.to_thread(env.run, sweeps.remove_orphans, batch)
    assert [o.status for o in result.outcomes] == ["removed", "removed", "waiting"]
    assert any(f"user {first}" in r for r in result.outcomes[0].removed)
    assert _gone(aws, first) and _gone(aws, second) and not _gone(aws, waiting)
    details = beats[-1][0]
    assert set(details) == {orphan_workflow_id("iam_user_key", n) for n in (first, second)}

    calls = _counted(worker_aws.iam)
    env.info = dataclasses.replace(env.info, heartbeat_details=[details])
    again = await asyncio.to_thread(env.run, sweeps.remove_orphans, batch)
    assert again.outcomes == result.outcomes, "the retry reports what attempt 1 did"
    assert calls == [], "and asks IAM nothing"

    env.info = dataclasses.replace(env.info, heartbeat_details=[])
    lost = await asyncio.to_thread(env.run, sweeps.remove_orphans, batch)
    assert [o.status for o in lost.outcomes] == ["removed", "removed", "waiting"]
    for name in (first, second):
        assert [e for e, _ in audit_trail(sessions, name, "orphan")] == [
            "orphan.quarantined",
            "orphan.deleted",
        ], name
    assert audit_trail(sessions, waiting, "orphan") == [], "nothing done in its grace period"
    assert aws.iam.list_user_policies(UserName=waiting)["PolicyNames"] == []


def _recorded(client: Any) -> list[tuple[str, dict[str, Any]]]:
    """Every IAM call this client makes from now on, with its parameters."""
    calls: list[tuple[str, dict[str, Any]]] = []

    def seen(model: Any, params: Any, **_: Any) -> None:
        calls.append((model.name, dict(params.get("body", {}) or {})))

    client.meta.events.register("before-call.iam", seen)
    return calls


def test_an_orphan_removed_at_once_is_denied_everything_first_and_its_deny_goes_last(
    settings: Settings, sessions: sessionmaker[Session], aws: AwsClients
) -> None:
    """The order that leaves no moment at which a key works: the deny-all is the first call,
    every key is deleted while it stands, and it is deleted only right before the user. A role
    gets the quarantine's two denies first. A refused deny-all fails that orphan alone, with
    the platform's code, and records nothing."""
    own = sweep_settings(settings, "order", orphan_grace_seconds=0)
    worker_aws = make_aws_clients(own)
    providers = build_providers(own, worker_aws, TargetRegistry(sessions, own, worker_aws.secrets))
    sweeps = SweepActivities(sessions, providers, own)
    user, secret = orphan_user(aws, own)
    _everything(aws, user, own.name_prefix)
    role = f"{own.name_prefix}-ghost-role-{uuid.uuid4().hex[:8]}"
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
    aws.iam.create_role(RoleName=role, Path=own.iam_path, AssumeRolePolicyDocument=trust)
    refused, _ = orphan_user(aws, own)
    lift = inject_aws_error(worker_aws.iam, "PutUserPolicy", "AccessDenied")
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, workflow_id=f"nhi-sweep-order-{uuid.uuid4().hex[:6]}", workflow_run_id="run-1"
    )

    def batch(*orphans: OrphanInput) -> list[Any]:
        return list(env.run(sweeps.remove_orphans, OrphanBatch(orphans=list(orphans))).outcomes)

    (failed,) = batch(
        OrphanInput(identity=refused, identity_kind=NhiKind.IAM_USER_KEY, grace_seconds=0)
    )
    lift()
    assert failed.status == "failed" and failed.code == "AccessDenied", failed
    assert not _gone(aws, refused) and audit_trail(sessions, refused, "orphan") == []

    calls = _recorded(worker_aws.iam)
    removed = batch(
        OrphanInput(
            identity=user, identity_kind=NhiKind.IAM_USER_KEY, secret_arn=secret, grace_seconds=0
        ),
        OrphanInput(identity=role, identity_kind=NhiKind.IAM_ROLE, grace_seconds=0),
    )
    assert [o.status for o in removed] == ["removed", "removed"], removed
    assert _gone(aws, user)
    with pytest.raises(aws.iam.exceptions.NoSuchEntityException):
        aws.iam.get_role(RoleName=role)
    mine = [(op, p) for op, p in calls if p.get("UserName") == user]
    ops = [op for op, _ in mine]
    assert mine[0] == ("PutUserPolicy", mine[0][1]) and mine[0][1]["PolicyName"] == "nhi-quarantine"
    deny_gone = next(
        i
        for i, (op, p) in enumerate(mine)
        if op == "DeleteUserPolicy" and p["PolicyName"] == "nhi-quarantine"
    )
    assert all(
        i < deny_gone for i, op in enumerate(ops) if op in ("DeleteAccessKey", "DeleteLoginProfile")
    )
    assert ops[deny_gone + 1 :] == ["DeleteUser", "GetUser"], ops
    assert "UpdateAccessKey" not in ops, "no separate quarantine step"
    roles = [(op, p.get("PolicyName")) for op, p in calls if p.get("RoleName") == role]
    assert roles[:2] == [("PutRolePolicy", "nhi-quarantine"), ("PutRolePolicy", roles[1][1])]
    assert roles[1][1] != "nhi-quarantine"
