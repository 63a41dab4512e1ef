"""The AWS provider, through its lifecycle interface, called twice (as a retry would) creates
nothing twice; removal treats "not found" as done. Driven through Temporal's
ActivityEnvironment against moto over HTTP."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.providers.aws import (
    QUARANTINE_POLICY_NAME,
    REVOKE_SESSIONS_POLICY_NAME,
    AwsProvider,
)
from activities.providers.base import Known
from models.contracts import IdentityRef, KeyRef, OrphanInput, ProvisionPlan, ScopeStatement
from models.enums import NhiKind, Platform
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import Settings
from nhi.rules.policy import identity_name, secret_name
from tests.helpers import inject_aws_error, policy_calls, revoked_before


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
    )


def test_create_role_twice_is_one_role(settings: Settings, aws: AwsClients) -> None:
    env, acts = ActivityEnvironment(), AwsProvider(aws, settings.iam_path)
    plan = _plan(settings, NhiKind.IAM_ROLE)
    first = env.run(acts.create, plan)
    second = env.run(acts.create, plan)
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
        ActivityEnvironment().run(AwsProvider(aws, settings.iam_path).create, plan)
    assert err.value.type == "IdentityConflict" and err.value.non_retryable
    assert aws.iam.list_user_policies(UserName=plan.identity_name)["PolicyNames"] == []


def test_deliver_twice_keeps_one_key_and_one_secret(settings: Settings, aws: AwsClients) -> None:
    env, acts = ActivityEnvironment(), AwsProvider(aws, settings.iam_path)
    plan = _plan(settings, NhiKind.IAM_USER_KEY)
    env.run(acts.create, plan)
    first = env.run(acts.deliver, plan)
    second = env.run(acts.deliver, plan)
    assert first == second
    keys = aws.iam.list_access_keys(UserName=plan.identity_name)["AccessKeyMetadata"]
    assert [k["AccessKeyId"] for k in keys] == [first.access_key_id]
    versions = aws.secrets.list_secret_version_ids(SecretId=plan.secret_name)["Versions"]
    assert len(versions) == 1


def test_delete_removes_everything_and_is_repeatable(settings: Settings, aws: AwsClients) -> None:
    env, acts = ActivityEnvironment(), AwsProvider(aws, settings.iam_path)
    plan = _plan(settings, NhiKind.IAM_USER_KEY)
    env.run(acts.create, plan)
    env.run(acts.deliver, plan)
    aws.iam.create_login_profile(UserName=plan.identity_name, Password="Not-used-1234!")
    removed = env.run(acts.delete, IdentityRef.of_plan(plan), force_delete_secret=True)
    assert f"user {plan.identity_name}" in removed.removed
    assert "login profile" in removed.removed
    assert any(r.startswith("access key ") for r in removed.removed)
    with pytest.raises(aws.iam.exceptions.NoSuchEntityException):
        aws.iam.get_user(UserName=plan.identity_name)
    with pytest.raises(aws.secrets.exceptions.ResourceNotFoundException):
        aws.secrets.describe_secret(SecretId=plan.secret_name)
    again = env.run(acts.delete, IdentityRef.of_plan(plan), force_delete_secret=True)
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
    env.run(acts.create, plan)
    env.run(acts.deliver, plan)
    env.run(acts.disable, IdentityRef.of_plan(plan))
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

    removed = env.run(acts.delete, IdentityRef.of_plan(plan), force_delete_secret=True).removed
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


def test_tags_come_from_the_plans_typed_fields_and_renewal_moves_the_expiry(
    settings: Settings, aws: AwsClients
) -> None:
    """The provider derives its tags (IAM and the delivery secret) from the plan's fields: the
    expiry tag follows `expires_at`, with no tag map to keep in step."""
    env, acts = ActivityEnvironment(), AwsProvider(aws, settings.iam_path)
    plan = _plan(settings, NhiKind.IAM_USER_KEY)
    env.run(acts.create, plan)
    env.run(acts.deliver, plan)

    def tags() -> dict[str, str]:
        listed = aws.iam.list_user_tags(UserName=plan.identity_name)["Tags"]
        return {t["Key"]: t["Value"] for t in listed}

    expected = {
        "managed-by": "nhi-lifecycle",
        "nhi:agent-id": str(plan.agent_id),
        "nhi:nhi-id": str(plan.nhi_id),
        "nhi:owner": "ana@example.com",
        "nhi:environment": "dev",
        "nhi:expires-at": plan.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    assert tags() == expected
    secret_tags = aws.secrets.describe_secret(SecretId=plan.secret_name)["Tags"]
    assert {t["Key"]: t["Value"] for t in secret_tags} == expected
    later = plan.expires_at + timedelta(days=2)
    env.run(acts.renew, plan.model_copy(update={"expires_at": later}))
    assert tags()["nhi:expires-at"] == later.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_discovery_judges_drift_against_the_grant(settings: Settings, aws: AwsClients) -> None:
    """The AWS provider compares the scope policy IAM holds with the one the grant makes."""
    acts = AwsProvider(aws, settings.iam_path)
    plan = _plan(settings, NhiKind.IAM_ROLE)
    acts.create(plan)
    granted = Known(
        status="active",
        scope=tuple(plan.scope),
        allowed_cidrs=tuple(plan.allowed_cidrs),
        expires_at=plan.expires_at,
    )

    def drift(known: Known) -> str | None:
        found = acts.discover({plan.identity_name: known}, lambda: None).identities
        return next(i for i in found if i.name == plan.identity_name).drift

    assert drift(granted) is None
    wider = [ScopeStatement(actions=["s3:*"], resources=["*"])]
    assert drift(dataclasses.replace(granted, scope=tuple(wider))) == (
        "platform permissions differ from the granted scope"
    )
    # Someone widens the role by hand: the platform no longer holds the grant.
    aws.iam.put_role_policy(
        RoleName=plan.identity_name,
        PolicyName="nhi-scope",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }
        ),
    )
    assert drift(granted) is not None
    # Only active identities are judged (a quarantined one holds a deny on top).
    assert drift(Known(status="quarantined", scope=tuple(plan.scope))) is None


def test_identity_refs_carry_only_what_the_platform_knows() -> None:
    """What workflows send (a plan, a retiring key, an orphan) becomes the one narrow reference
    providers act on: nothing made up where the sender does not know."""
    orphan = OrphanInput(identity="nhi-x-1", identity_kind=NhiKind.IAM_USER_KEY)
    assert IdentityRef.of_orphan(orphan) == IdentityRef(
        platform=Platform.AWS, kind=NhiKind.IAM_USER_KEY, name="nhi-x-1"
    )
    key = KeyRef(user_name="nhi_x_1", key_id="nhi_x_1_a", platform=Platform.POSTGRES, target="t")
    assert IdentityRef.of_key(key) == IdentityRef(
        platform=Platform.POSTGRES, kind=NhiKind.POSTGRES_ROLE, name="nhi_x_1", target="t"
    )
    aws_key = KeyRef(user_name="nhi-x-1", key_id="AKIA")
    assert IdentityRef.of_key(aws_key).kind is NhiKind.IAM_USER_KEY


def test_a_user_quarantine_revokes_session_tokens_of_its_key_and_a_restore_keeps_them_revoked(
    settings: Settings, aws: AwsClients
) -> None:
    """A session token made with the user's key (GetSessionToken; up to 36 h) outlives the
    key's deactivation and is refused only by the user's policies. moto evaluates no policy,
    so the proof is the policy AWS evaluates: quarantine adds the `aws:TokenIssueTime` deny
    (as a role's), and a restore moves it to its own time before the deny-all goes (a token
    made while quarantined stays refused), once: a repeated restore moves nothing."""
    env, acts = ActivityEnvironment(), AwsProvider(aws, settings.iam_path)
    plan = _plan(settings, NhiKind.IAM_USER_KEY)
    env.run(acts.create, plan)
    delivered = env.run(acts.deliver, plan)
    value = json.loads(aws.secrets.get_secret_value(SecretId=plan.secret_name)["SecretString"])
    signed_as_user = boto3.client(
        "sts",
        region_name="us-east-1",
        endpoint_url=settings.aws_endpoint_url,
        aws_access_key_id=value["AccessKeyId"],
        aws_secret_access_key=value["SecretAccessKey"],
    )

    def token_issued_at() -> datetime:
        token = signed_as_user.get_session_token(DurationSeconds=129600)["Credentials"]
        return token["Expiration"] - timedelta(seconds=129600)

    before_quarantine = token_issued_at()
    ref = IdentityRef(
        platform=Platform.AWS,
        kind=NhiKind.IAM_USER_KEY,
        name=plan.identity_name,
        secret_name=plan.secret_name,
    )
    steps = env.run(acts.disable, ref)
    assert "sessions issued before now revoked" in steps, steps
    env.run(acts.verify_disabled, ref)
    quarantined_at = revoked_before(aws.iam, "user", plan.identity_name)
    assert quarantined_at > before_quarantine
    # A token made while quarantined (moto does not refuse the inactive key; AWS would, but a
    # GetFederationToken made just before the deactivation lands here too), in a later second.
    time.sleep(max(0.0, (quarantined_at - datetime.now(UTC)).total_seconds()) + 0.05)
    during = token_issued_at()

    with policy_calls(aws.iam) as calls:
        env.run(acts.enable, ref)
        restored = revoked_before(aws.iam, "user", plan.identity_name)
        env.run(acts.enable, ref)  # a retry after the restore went through
    assert restored > during, "a token made while quarantined must stay refused"
    assert revoked_before(aws.iam, "user", plan.identity_name) == restored, (
        "a retry revokes nothing more"
    )
    revoke = f"PutUserPolicy:{REVOKE_SESSIONS_POLICY_NAME}"
    lift = f"DeleteUserPolicy:{QUARANTINE_POLICY_NAME}"
    assert calls.index(revoke) < calls.index(lift), calls
    assert calls.count(revoke) == 1 and calls.count(lift) == 1, calls
    policies = aws.iam.list_user_policies(UserName=plan.identity_name)["PolicyNames"]
    assert QUARANTINE_POLICY_NAME not in policies and REVOKE_SESSIONS_POLICY_NAME in policies
    keys = aws.iam.list_access_keys(UserName=plan.identity_name)["AccessKeyMetadata"]
    assert [(k["AccessKeyId"], k["Status"]) for k in keys] == [(delivered.access_key_id, "Active")]
    env.run(acts.delete, ref)
    with pytest.raises(aws.iam.exceptions.NoSuchEntityException):
        aws.iam.get_user(UserName=plan.identity_name)


def test_a_user_too_full_for_the_session_revocation_is_still_quarantined_and_restored(
    settings: Settings, aws: AwsClients
) -> None:
    """A user whose scope was accepted before scopes kept room for the quarantine: IAM
    refuses the revocation policy (LimitExceeded). Its quarantine and restore go on as before
    users had one: keys inactive and deny-all, proven; then lifted, its key active again."""
    env, acts = ActivityEnvironment(), AwsProvider(aws, settings.iam_path)
    plan = _plan(settings, NhiKind.IAM_USER_KEY)
    env.run(acts.create, plan)
    delivered = env.run(acts.deliver, plan)
    ref = IdentityRef(
        platform=Platform.AWS,
        kind=NhiKind.IAM_USER_KEY,
        name=plan.identity_name,
        secret_name=plan.secret_name,
    )
    full = f"PolicyName={REVOKE_SESSIONS_POLICY_NAME}".encode()
    lift = inject_aws_error(aws.iam, "PutUserPolicy", "LimitExceeded", 409, only=full)
    try:
        steps = env.run(acts.disable, ref)
        assert "deny-all policy" in steps and any("sessions not revoked" in s for s in steps)
        env.run(acts.verify_disabled, ref)
        with policy_calls(aws.iam) as calls:
            env.run(acts.enable, ref)
    finally:
        lift()
    assert f"PutUserPolicy:{REVOKE_SESSIONS_POLICY_NAME}" in calls  # tried, refused
    policies = aws.iam.list_user_policies(UserName=plan.identity_name)["PolicyNames"]
    assert QUARANTINE_POLICY_NAME not in policies
    keys = aws.iam.list_access_keys(UserName=plan.identity_name)["AccessKeyMetadata"]
    assert [(k["AccessKeyId"], k["Status"]) for k in keys] == [(delivered.access_key_id, "Active")]
    env.run(acts.delete, ref)
