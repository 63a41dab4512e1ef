"""The provisioning workflow on Temporal's time-skipping test server, with real activities
against Postgres and a moto server over HTTP."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from models.contracts import ApprovalDecision, ProvisionInput, ProvisionResult
from models.enums import NhiStatus
from models.orm import AuditEvent, Nhi, Policy
from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.rules.ids import provision_workflow_id
from tests.helpers import SENSITIVE_SCOPE, TRUST, inject_aws_error, request_nhi, start_one_run
from worker import build_worker
from workflows.provision import ProvisionNhiWorkflow


def _nhi(sessions: sessionmaker[Session], nhi_id: uuid.UUID) -> Nhi:
    with transaction(sessions) as s:
        return s.get_one(Nhi, nhi_id)


def _events(sessions: sessionmaker[Session], nhi_id: uuid.UUID) -> list[str]:
    with transaction(sessions) as s:
        return list(
            s.scalars(
                select(AuditEvent.event)
                .where(AuditEvent.subject_id == str(nhi_id))
                .order_by(AuditEvent.id)
            )
        )


async def _provision(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    inp: ProvisionInput,
    during: Any = None,
) -> ProvisionResult:
    queue = f"q-{uuid.uuid4().hex}"
    async with build_worker(env.client, settings, sessions, aws, task_queue=queue):
        handle = await env.client.start_workflow(
            ProvisionNhiWorkflow.run,
            inp,
            id=provision_workflow_id(inp.nhi_id),
            task_queue=queue,
        )
        if during is not None:
            await during(handle)
        return await handle.result()


async def _fail_provisioning(
    env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    nhi_id: uuid.UUID,
    one_run: bool,
) -> WorkflowFailureError:
    """Provisioning that must fail: as the API starts it (the NHI's one run, whose first phase
    it is) or as a provisioning run (bundles); the run's failure."""
    if not one_run:
        with pytest.raises(WorkflowFailureError) as failure:
            await _provision(env, settings, sessions, aws, ProvisionInput(nhi_id=nhi_id))
        return failure.value
    queue = f"q-{uuid.uuid4().hex}"
    async with build_worker(env.client, settings, sessions, aws, task_queue=queue):
        handle = await start_one_run(env.client, ProvisionInput(nhi_id=nhi_id), queue)
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        return failure.value


async def test_iam_role_is_created_with_scope_trust_tags_and_expiry(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    agent_id, nhi_id, _ = request_nhi(
        sessions, settings, "iam_role", allowed_cidrs=["203.0.113.0/24"]
    )
    result = await _provision(ts_env, settings, sessions, aws, ProvisionInput(nhi_id=nhi_id))

    nhi = _nhi(sessions, nhi_id)
    assert result.status is NhiStatus.ACTIVE
    assert nhi.status == "active" and nhi.activated_at is not None
    role = aws.iam.get_role(RoleName=nhi.name)["Role"]
    assert role["Arn"] == nhi.external_id == nhi.credential_ref == result.external_id
    assert role["Path"] == settings.iam_path
    assert role["MaxSessionDuration"] == 3600
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"] == {"AWS": TRUST}
    tags = {t["Key"]: t["Value"] for t in aws.iam.list_role_tags(RoleName=nhi.name)["Tags"]}
    assert tags["managed-by"] == "nhi-lifecycle"
    assert tags["nhi:nhi-id"] == str(nhi_id)
    assert tags["nhi:agent-id"] == str(agent_id)
    assert tags["nhi:owner"] == "ana@example.com"
    assert tags["nhi:expires-at"] == nhi.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = aws.iam.get_role_policy(RoleName=nhi.name, PolicyName="nhi-scope")["PolicyDocument"]
    doc = json.loads(doc) if isinstance(doc, str) else doc
    (statement,) = doc["Statement"]
    assert statement["Action"] == ["s3:GetObject"]
    assert statement["Resource"] == ["arn:aws:s3:::kb-docs/*"]
    assert statement["Condition"]["IpAddress"] == {"aws:SourceIp": ["203.0.113.0/24"]}
    assert statement["Condition"]["DateLessThan"]["aws:CurrentTime"] == tags["nhi:expires-at"]
    assert _events(sessions, nhi_id) == ["nhi.requested", "nhi.provisioning", "nhi.activated"]


async def test_iam_user_key_is_delivered_by_reference_only(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    _, nhi_id, _ = request_nhi(sessions, settings, "iam_user_key")
    result = await _provision(ts_env, settings, sessions, aws, ProvisionInput(nhi_id=nhi_id))

    nhi = _nhi(sessions, nhi_id)
    keys = aws.iam.list_access_keys(UserName=nhi.name)["AccessKeyMetadata"]
    assert len(keys) == 1
    secret = json.loads(aws.secrets.get_secret_value(SecretId=nhi.credential_ref)["SecretString"])
    assert secret["AccessKeyId"] == keys[0]["AccessKeyId"]
    assert secret["SecretAccessKey"]
    assert nhi.credential_ref == result.credential_ref
    assert nhi.credential_ref.startswith("arn:aws:secretsmanager:")
    assert secret["SecretAccessKey"] not in result.model_dump_json()
    assert aws.iam.get_user_policy(UserName=nhi.name, PolicyName="nhi-scope")["PolicyName"]


SHAPES = pytest.mark.parametrize("one_run", [True, False], ids=["one_run", "two_runs"])


@SHAPES
async def test_permanent_failure_removes_what_was_created(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    one_run: bool,
) -> None:
    aws = make_aws_clients(settings)
    inject_aws_error(aws.iam, "PutRolePolicy", "AccessDenied")
    _, nhi_id, _ = request_nhi(sessions, settings, "iam_role")
    name = _nhi(sessions, nhi_id).name

    failure = await _fail_provisioning(ts_env, settings, sessions, aws, nhi_id, one_run)

    assert "AccessDenied" in str(failure.cause)
    nhi = _nhi(sessions, nhi_id)
    assert nhi.status == "failed"
    assert "AccessDenied" in (nhi.status_reason or "")
    roles = aws.iam.list_roles(PathPrefix=settings.iam_path)["Roles"]
    assert name not in {r["RoleName"] for r in roles}, "the half-made role was left behind"
    assert _events(sessions, nhi_id)[-1] == "nhi.failed"


@SHAPES
async def test_failed_cleanup_is_revoke_failed_not_silent(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    one_run: bool,
) -> None:
    aws = make_aws_clients(settings)
    inject_aws_error(aws.iam, "PutRolePolicy", "AccessDenied")
    inject_aws_error(aws.iam, "DeleteRole", "AccessDenied")
    _, nhi_id, _ = request_nhi(sessions, settings, "iam_role")
    name = _nhi(sessions, nhi_id).name

    await _fail_provisioning(ts_env, settings, sessions, aws, nhi_id, one_run)

    nhi = _nhi(sessions, nhi_id)
    assert nhi.status == "revoke_failed"
    assert "AccessDenied" in (nhi.status_reason or "")
    assert "removing what was created also failed" in (nhi.status_reason or "")
    assert _events(sessions, nhi_id)[-1] == "nhi.revoke_failed"
    # Still there, and the row says so, for the sweep to retry.
    assert aws.iam.get_role(RoleName=name)["Role"]["RoleName"] == name


async def test_policy_tightened_after_request_refuses_before_creating(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    _, nhi_id, _ = request_nhi(
        sessions, settings, "iam_user_key", environment="staging",
        scope=[{"actions": ["dynamodb:Query"], "resources": ["arn:aws:dynamodb:us-east-1:123456789012:table/kb"]}],
    )  # fmt: skip
    with transaction(sessions) as s:
        policy = s.scalars(
            select(Policy).where(Policy.kind == "iam_user_key", Policy.environment == "staging")
        ).one()
        policy.forbidden_actions = [*policy.forbidden_actions, "dynamodb:*"]
    try:
        with pytest.raises(WorkflowFailureError) as failure:
            await _provision(ts_env, settings, sessions, aws, ProvisionInput(nhi_id=nhi_id))
    finally:
        with transaction(sessions) as s:
            policy = s.get_one(Policy, policy.id)
            policy.forbidden_actions = [a for a in policy.forbidden_actions if a != "dynamodb:*"]
    assert "scope[0].actions[0]" in str(failure.value.cause)
    nhi = _nhi(sessions, nhi_id)
    assert nhi.status == "failed"
    users = aws.iam.list_users(PathPrefix=settings.iam_path)["Users"]
    assert nhi.name not in {u["UserName"] for u in users}


async def test_sensitive_scope_waits_for_an_approver_who_is_not_the_requester(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    _, nhi_id, sensitive = request_nhi(
        sessions, settings, "iam_role", scope=SENSITIVE_SCOPE, actor="alice"
    )
    assert sensitive == ["s3:DeleteObject"]
    assert _nhi(sessions, nhi_id).status == "pending_approval"

    async def decide(handle: Any) -> None:
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(
                ProvisionNhiWorkflow.decide,
                ApprovalDecision(approve=True, approver="alice", reason="mine"),
            )
        assert "cannot approve their own" in str(refused.value.cause)
        assert _nhi(sessions, nhi_id).status == "pending_approval"
        outcome = await handle.execute_update(
            ProvisionNhiWorkflow.decide,
            ApprovalDecision(approve=True, approver="bob", reason="needed for cleanup job"),
        )
        assert outcome.approved
        with pytest.raises(WorkflowUpdateFailedError) as again:
            await handle.execute_update(
                ProvisionNhiWorkflow.decide,
                ApprovalDecision(approve=False, approver="carol", reason="too late"),
            )
        assert "already decided by bob" in str(again.value.cause)

    inp = ProvisionInput(nhi_id=nhi_id, requested_by="alice", needs_approval=True)
    result = await _provision(ts_env, settings, sessions, aws, inp, during=decide)
    assert result.status is NhiStatus.ACTIVE
    events = _events(sessions, nhi_id)
    assert events == ["nhi.requested", "nhi.approved", "nhi.provisioning", "nhi.activated"]
    history = await ts_env.client.get_workflow_handle(provision_workflow_id(nhi_id)).fetch_history()
    accepted = [
        e
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]
    assert len(accepted) == 1, "rejected updates must leave no trace in history"


async def test_denied_or_unanswered_request_creates_nothing(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    _, denied_id, _ = request_nhi(
        sessions, settings, "iam_role", scope=SENSITIVE_SCOPE, actor="alice"
    )

    async def deny(handle: Any) -> None:
        await handle.execute_update(
            ProvisionNhiWorkflow.decide,
            ApprovalDecision(approve=False, approver="bob", reason="use a read-only role"),
        )

    with pytest.raises(WorkflowFailureError):
        await _provision(
            ts_env, settings, sessions, aws,
            ProvisionInput(nhi_id=denied_id, requested_by="alice", needs_approval=True),
            during=deny,
        )  # fmt: skip
    denied = _nhi(sessions, denied_id)
    assert denied.status == "failed" and denied.status_reason == "denied by bob"

    # Nobody answers: the time-skipping server jumps the three-day approval window.
    _, silent_id, _ = request_nhi(
        sessions, settings, "iam_role", scope=SENSITIVE_SCOPE, actor="alice"
    )
    with pytest.raises(WorkflowFailureError) as expired:
        await _provision(
            ts_env, settings, sessions, aws,
            ProvisionInput(nhi_id=silent_id, requested_by="alice", needs_approval=True,
                           approval_timeout_seconds=int(timedelta(days=3).total_seconds())),
        )  # fmt: skip
    assert "no approver decided" in str(expired.value.cause)
    assert _nhi(sessions, silent_id).status == "failed"
    names = {r["RoleName"] for r in aws.iam.list_roles(PathPrefix=settings.iam_path)["Roles"]}
    assert _nhi(sessions, denied_id).name not in names
    assert _nhi(sessions, silent_id).name not in names
