"""The AWS provider called twice (as a retry would) create nothing twice; removal treats
"not found" as done. Driven through Temporal's ActivityEnvironment against moto over HTTP."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.providers.aws import AwsProvider
from models.contracts import ProvisionPlan, RemoveIdentity, ScopeStatement
from models.enums import NhiKind, Platform
from nhi.aws import AwsClients
from nhi.config import Settings
from nhi.policy import identity_name, secret_name


def _plan(settings: Settings, kind: NhiKind) -> ProvisionPlan:
    nhi_id = uuid.uuid4()
    return ProvisionPlan(
        nhi_id=nhi_id,
        agent_id=uuid.uuid4(),
        agent_name="idem-agent",
        environment="dev",
        owner_email="ana@example.com",
        platform=Platform.AWS,
        kind=kind,
        identity_name=identity_name("nhi", "idem-agent", nhi_id),
        iam_path=settings.iam_path,
        secret_name=secret_name(settings.secret_prefix, "dev", "idem-agent", nhi_id),
        scope=[ScopeStatement(actions=["s3:GetObject"], resources=["arn:aws:s3:::kb/*"])],
        trust_principal="bedrock.amazonaws.com" if kind is NhiKind.IAM_ROLE else None,
        expires_at=datetime.now(UTC) + timedelta(days=1),
        tags={"managed-by": "nhi-lifecycle", "nhi:nhi-id": str(nhi_id)},
    )


def test_ensure_role_twice_is_one_role(settings: Settings, aws: AwsClients) -> None:
    env, acts = ActivityEnvironment(), AwsProvider(aws, settings.iam_path)
    plan = _plan(settings, NhiKind.IAM_ROLE)
    first = env.run(acts.ensure_role, plan)
    second = env.run(acts.ensure_role, plan)
    assert first == second
    roles = [
        r
        for r in aws.iam.list_roles(PathPrefix=settings.iam_path)["Roles"]
        if r["RoleName"] == plan.identity_name
    ]
    assert len(roles) == 1
    trust = roles[0]["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"] == {"Service": "bedrock.amazonaws.com"}


def test_name_taken_by_someone_else_is_a_permanent_conflict(
    settings: Settings, aws: AwsClients
) -> None:
    plan = _plan(settings, NhiKind.IAM_USER_KEY)
    aws.iam.create_user(UserName=plan.identity_name, Path=settings.iam_path)
    with pytest.raises(ApplicationError) as err:
        ActivityEnvironment().run(AwsProvider(aws, settings.iam_path).ensure_user, plan)
    assert err.value.type == "IdentityConflict" and err.value.non_retryable
    assert aws.iam.list_user_policies(UserName=plan.identity_name)["PolicyNames"] == []


def test_issue_access_key_twice_keeps_one_key_and_one_secret(
    settings: Settings, aws: AwsClients
) -> None:
    env, acts = ActivityEnvironment(), AwsProvider(aws, settings.iam_path)
    plan = _plan(settings, NhiKind.IAM_USER_KEY)
    env.run(acts.ensure_user, plan)
    first = env.run(acts.issue_access_key, plan)
    second = env.run(acts.issue_access_key, plan)
    assert first == second
    keys = aws.iam.list_access_keys(UserName=plan.identity_name)["AccessKeyMetadata"]
    assert [k["AccessKeyId"] for k in keys] == [first.access_key_id]
    versions = aws.secrets.list_secret_version_ids(SecretId=plan.secret_name)["Versions"]
    assert len(versions) == 1


def test_remove_identity_removes_everything_and_is_repeatable(
    settings: Settings, aws: AwsClients
) -> None:
    env, acts = ActivityEnvironment(), AwsProvider(aws, settings.iam_path)
    plan = _plan(settings, NhiKind.IAM_USER_KEY)
    env.run(acts.ensure_user, plan)
    env.run(acts.issue_access_key, plan)
    aws.iam.create_login_profile(UserName=plan.identity_name, Password="Not-used-1234!")
    removed = env.run(acts.delete, RemoveIdentity(plan=plan, force_delete_secret=True))
    assert f"user {plan.identity_name}" in removed.removed
    assert "login profile" in removed.removed
    assert any(r.startswith("access key ") for r in removed.removed)
    with pytest.raises(aws.iam.exceptions.NoSuchEntityException):
        aws.iam.get_user(UserName=plan.identity_name)
    with pytest.raises(aws.secrets.exceptions.ResourceNotFoundException):
        aws.secrets.describe_secret(SecretId=plan.secret_name)
    again = env.run(acts.delete, RemoveIdentity(plan=plan, force_delete_secret=True))
    assert again.removed == []


def _ssh_key_and_certificate(user: str) -> tuple[str, str]:
    """An SSH public key and a self-signed signing certificate, as a person might upload."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ssh = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return ssh.decode(), cert.public_bytes(serialization.Encoding.PEM).decode()


def test_user_removal_takes_every_credential_first_and_its_deny_last(
    settings: Settings, aws: AwsClients
) -> None:
    """What AWS's DeleteUser refuses to delete around (console password, keys, certificates,
    SSH keys, groups, policies) goes, the quarantine's deny-all last of the policies."""
    env, acts = ActivityEnvironment(), AwsProvider(aws, settings.iam_path)
    plan = _plan(settings, NhiKind.IAM_USER_KEY)
    user = plan.identity_name
    env.run(acts.ensure_user, plan)
    env.run(acts.issue_access_key, plan)
    env.run(acts.disable, plan)
    ssh, cert = _ssh_key_and_certificate(user)
    ssh_id = aws.iam.upload_ssh_public_key(UserName=user, SSHPublicKeyBody=ssh)["SSHPublicKey"][
        "SSHPublicKeyId"
    ]
    cert_id = aws.iam.upload_signing_certificate(UserName=user, CertificateBody=cert)[
        "Certificate"
    ]["CertificateId"]
    group = f"outside-{uuid.uuid4().hex[:8]}"
    aws.iam.create_group(GroupName=group)
    aws.iam.add_user_to_group(GroupName=group, UserName=user)

    removed = env.run(acts.delete, RemoveIdentity(plan=plan, force_delete_secret=True)).removed
    assert f"ssh public key {ssh_id}" in removed
    assert f"signing certificate {cert_id}" in removed
    assert f"group membership {group}" in removed
    assert removed[-3:] == [
        "inline policy nhi-quarantine",
        f"user {user}",
        f"secret {plan.secret_name}",
    ]
    with pytest.raises(aws.iam.exceptions.NoSuchEntityException):
        aws.iam.get_user(UserName=user)
