"""Removal under faults: containment is monotonic and removal proves absence.

AWS faults are injected at the boundary, with botocore event hooks on the worker's own IAM
client (moto over HTTP answers everything else); Postgres faults are real grants made by a
role other than the target's admin, on a real scram-sha-256 cluster of every server build.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from temporalio.exceptions import ApplicationError

from activities.providers.aws import (
    QUARANTINE_POLICY_NAME,
    REVOKE_SESSIONS_POLICY_NAME,
    SCOPE_POLICY_NAME,
    AwsProvider,
)
from activities.providers.postgres import PostgresProvider
from models.contracts import IdentityRef, ProvisionPlan, ScopeStatement
from models.enums import NhiKind, Platform
from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import Settings
from nhi.rules.pg_grants import group_name, role_names
from nhi.rules.policy import identity_name, secret_name
from nhi.services.target_registry import TargetConnection
from tests.helpers import inject_aws_error
from tests.pg_cluster import ADMIN, DATABASE, PgCluster, refused, server_binaries
from tests.test_postgres_provider import Targets

QUARANTINE = {QUARANTINE_POLICY_NAME, REVOKE_SESSIONS_POLICY_NAME}


# ---- AWS ---------------------------------------------------------------------------------------


@pytest.fixture
def worker_aws(settings: Settings) -> AwsClients:
    """The provider's own clients: hooks registered on them never reach other tests."""
    return make_aws_clients(settings)


@pytest.fixture
def provider(worker_aws: AwsClients, settings: Settings) -> AwsProvider:
    return AwsProvider(worker_aws, settings.iam_path)


def aws_plan(settings: Settings, kind: NhiKind) -> ProvisionPlan:
    nhi_id = uuid.uuid4()
    return ProvisionPlan(
        nhi_id=nhi_id,
        agent_id=uuid.uuid4(),
        agent_name="fault-agent",
        environment="dev",
        owner_email="ana@example.com",
        platform=Platform.AWS,
        kind=kind,
        identity_name=identity_name("nhi", "fault-agent", nhi_id),
        iam_path=settings.iam_path,
        secret_name=secret_name(settings.secret_prefix, "dev", "fault-agent", nhi_id),
        scope=[ScopeStatement(actions=["s3:GetObject"], resources=["arn:aws:s3:::kb/*"])],
        trust_principal="arn:aws:iam::123456789012:role/agent-runtime"
        if kind is NhiKind.IAM_ROLE
        else None,
        expires_at=datetime.now(UTC) + timedelta(days=1),
        tags={"managed-by": "nhi-lifecycle", "nhi:nhi-id": str(nhi_id)},
    )


def managed_policy(aws: AwsClients) -> str:
    """A customer-managed policy made outside nhi-lifecycle (what an admin might attach)."""
    document = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "*"}],
    }
    return str(
        aws.iam.create_policy(
            PolicyName=f"outside-{uuid.uuid4().hex[:8]}", PolicyDocument=json.dumps(document)
        )["Policy"]["Arn"]
    )


def role_state(aws: AwsClients, name: str) -> dict[str, Any]:
    """What grants or denies the role anything: trust, inline and managed policies."""
    role = aws.iam.get_role(RoleName=name)["Role"]
    trust = role["AssumeRolePolicyDocument"]
    inline = set(aws.iam.list_role_policies(RoleName=name)["PolicyNames"])
    return {
        "trust": json.loads(trust) if isinstance(trust, str) else trust,
        "inline": inline,
        "attached": {
            a["PolicyArn"]
            for a in aws.iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]
        },
        "denies": {
            p: _document(aws.iam.get_role_policy(RoleName=name, PolicyName=p)["PolicyDocument"])
            for p in inline & QUARANTINE
        },
    }


def _document(doc: Any) -> dict[str, Any]:
    return dict(json.loads(doc) if isinstance(doc, str) else doc)


def assert_no_more_open_than(after: dict[str, Any], quarantined: dict[str, Any]) -> None:
    """Still denied as in quarantine, and granting nothing quarantine did not."""
    assert after["inline"] >= QUARANTINE, after["inline"]
    for name in QUARANTINE:
        statement = after["denies"][name]["Statement"][0]
        assert (statement["Effect"], statement["Action"], statement["Resource"]) == (
            "Deny",
            "*",
            "*",
        )
    assert after["trust"] == quarantined["trust"]
    assert after["inline"] - QUARANTINE <= quarantined["inline"] - QUARANTINE
    assert after["attached"] <= quarantined["attached"]


def gone(aws: AwsClients, kind: NhiKind, name: str) -> bool:
    try:
        if kind is NhiKind.IAM_ROLE:
            aws.iam.get_role(RoleName=name)
        else:
            aws.iam.get_user(UserName=name)
    except aws.iam.exceptions.NoSuchEntityException:
        return True
    return False


@pytest.mark.parametrize(("code", "status"), [("AccessDenied", 403), ("DeleteConflict", 409)])
@pytest.mark.parametrize("quarantined_first", [True, False], ids=["quarantined", "compensation"])
def test_refused_detach_leaves_the_role_no_more_open_than_quarantined(
    provider: AwsProvider,
    worker_aws: AwsClients,
    aws: AwsClients,
    settings: Settings,
    code: str,
    status: int,
    quarantined_first: bool,
) -> None:
    plan = aws_plan(settings, NhiKind.IAM_ROLE)
    provider.create(plan)
    arn = managed_policy(aws)
    aws.iam.attach_role_policy(RoleName=plan.identity_name, PolicyArn=arn)
    if quarantined_first:
        provider.disable(IdentityRef.of_plan(plan))
    before = role_state(aws, plan.identity_name)
    if not quarantined_first:  # a compensation: what it held, plus the quarantine it gets
        before = {**before, "inline": before["inline"] | QUARANTINE}

    lift = inject_aws_error(worker_aws.iam, "DetachRolePolicy", code, status)
    try:
        with pytest.raises(ApplicationError) as excinfo:
            provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
    finally:
        lift()
    err = excinfo.value
    assert err.type == code and err.non_retryable is (code == "AccessDenied")
    assert str(err).startswith(f"{code}: injected {code} on DetachRolePolicy")
    assert f"detach {arn} from role {plan.identity_name}" in err.message  # the operator's fix
    assert err.__cause__ is not err and err.__cause__ is not None

    after = role_state(aws, plan.identity_name)
    assert_no_more_open_than(after, before)
    assert arn in after["attached"]  # refused, so still there: and still denied

    removed = provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
    assert f"attached policy {arn}" in removed.removed
    assert f"role {plan.identity_name}" in removed.removed
    assert gone(aws, NhiKind.IAM_ROLE, plan.identity_name)


def test_persistent_delete_conflict_keeps_the_quarantine_then_completes(
    provider: AwsProvider, worker_aws: AwsClients, aws: AwsClients, settings: Settings
) -> None:
    plan = aws_plan(settings, NhiKind.IAM_ROLE)
    provider.create(plan)
    provider.disable(IdentityRef.of_plan(plan))
    quarantined = role_state(aws, plan.identity_name)

    lift = inject_aws_error(worker_aws.iam, "DeleteRole", "DeleteConflict", 409)
    try:
        for _ in range(2):  # every retry fails the same way, and says why
            with pytest.raises(ApplicationError) as excinfo:
                provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
            err = excinfo.value
            assert err.type == "DeleteConflict" and not err.non_retryable
            assert str(err).startswith("DeleteConflict: injected DeleteConflict on DeleteRole")
            assert "its quarantine was re-applied" in err.message
            assert "Operator:" in err.message
            assert err.details[0]["code"] == "DeleteConflict"
            after = role_state(aws, plan.identity_name)
            # The denies went last, the delete failed: they are back, the scope is gone.
            assert_no_more_open_than(after, quarantined)
            assert SCOPE_POLICY_NAME not in after["inline"]
    finally:
        lift()

    removed = provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
    assert removed.removed[-1] == f"role {plan.identity_name}"
    # The quarantine's denies were the last things taken off.
    assert removed.removed[-3:-1] == [
        f"inline policy {REVOKE_SESSIONS_POLICY_NAME}",
        f"inline policy {QUARANTINE_POLICY_NAME}",
    ]
    assert gone(aws, NhiKind.IAM_ROLE, plan.identity_name)


def fake_success(client: Any, operation: str) -> Callable[[], None]:
    """Answer `operation` with HTTP 200 and do nothing: a delete that did not take."""
    body = (
        f"<{operation}Response><ResponseMetadata><RequestId>fake</RequestId>"
        f"</ResponseMetadata></{operation}Response>"
    ).encode()

    class Raw:
        def stream(self, **_: Any) -> Iterator[bytes]:
            yield body

    def answer(request: Any, **_: Any) -> AWSResponse:
        return AWSResponse(request.url, 200, {}, Raw())

    event = f"before-send.iam.{operation}"
    client.meta.events.register(event, answer)
    return lambda: client.meta.events.unregister(event, answer)


def test_a_role_still_there_after_delete_role_is_not_removed(
    provider: AwsProvider, worker_aws: AwsClients, aws: AwsClients, settings: Settings
) -> None:
    plan = aws_plan(settings, NhiKind.IAM_ROLE)
    provider.create(plan)
    provider.disable(IdentityRef.of_plan(plan))
    quarantined = role_state(aws, plan.identity_name)
    lift = fake_success(worker_aws.iam, "DeleteRole")
    try:
        with pytest.raises(ApplicationError) as excinfo:
            provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
    finally:
        lift()
    err = excinfo.value
    assert err.type == "NotRemoved" and not err.non_retryable
    assert f"role {plan.identity_name} still exists" in err.message
    assert_no_more_open_than(role_state(aws, plan.identity_name), quarantined)
    # The secret is not deleted before the identity is proven gone.
    provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
    assert gone(aws, NhiKind.IAM_ROLE, plan.identity_name)


def delete_first(client: Any, operation: str, other: Callable[..., Any]) -> Callable[[], None]:
    """Before each `operation` call, do the same thing through another client: the
    sub-resource vanishes between the listing and the call (a concurrent removal)."""

    def race(params: dict[str, Any], **_: Any) -> None:
        other(**params)

    event = f"before-parameter-build.iam.{operation}"  # `params` as the caller passed them
    client.meta.events.register(event, race)
    return lambda: client.meta.events.unregister(event, race)


def test_a_key_deleted_concurrently_still_deletes_the_user(
    provider: AwsProvider, worker_aws: AwsClients, aws: AwsClients, settings: Settings
) -> None:
    plan = aws_plan(settings, NhiKind.IAM_USER_KEY)
    provider.create(plan)
    delivered = provider.deliver(plan).access_key_id
    second = aws.iam.create_access_key(UserName=plan.identity_name)["AccessKey"]["AccessKeyId"]
    lift = delete_first(worker_aws.iam, "DeleteAccessKey", aws.iam.delete_access_key)
    try:
        removed = provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
    finally:
        lift()
    # Neither key was deleted by this removal (someone else was first), the user was.
    assert not {f"access key {delivered}", f"access key {second}"} & set(removed.removed)
    assert f"user {plan.identity_name}" in removed.removed
    assert gone(aws, NhiKind.IAM_USER_KEY, plan.identity_name)


def test_a_policy_detached_concurrently_still_deletes_the_role(
    provider: AwsProvider, worker_aws: AwsClients, aws: AwsClients, settings: Settings
) -> None:
    plan = aws_plan(settings, NhiKind.IAM_ROLE)
    provider.create(plan)
    arn = managed_policy(aws)
    aws.iam.attach_role_policy(RoleName=plan.identity_name, PolicyArn=arn)
    provider.disable(IdentityRef.of_plan(plan))
    lifts = [
        delete_first(worker_aws.iam, "DetachRolePolicy", aws.iam.detach_role_policy),
        delete_first(worker_aws.iam, "DeleteRolePolicy", aws.iam.delete_role_policy),
    ]
    try:
        removed = provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
    finally:
        for lift in lifts:
            lift()
    assert removed.removed == [f"role {plan.identity_name}"]
    assert gone(aws, NhiKind.IAM_ROLE, plan.identity_name)


# ---- Postgres ----------------------------------------------------------------------------------

TARGET = "company"
READ_DOCS = [ScopeStatement(actions=["SELECT"], resources=["docs.*"])]


@pytest.fixture(scope="module", params=sorted(server_binaries()))
def pg(request: pytest.FixtureRequest) -> Iterator[PgCluster]:
    """Every server build on the machine: role rules changed in PostgreSQL 16."""
    cluster = PgCluster(server_binaries()[request.param])
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_provider(pg: PgCluster, aws: AwsClients) -> PostgresProvider:
    target = TargetConnection(
        name=TARGET,
        host=pg.host,
        port=pg.port,
        dbname=DATABASE,
        admin_user=ADMIN,
        password=pg.admin_password,
        connection_limit=10,
    )
    return PostgresProvider(Targets({TARGET: target}), aws.secrets)


def pg_plan() -> ProvisionPlan:
    nhi_id = uuid.uuid4()
    return ProvisionPlan(
        nhi_id=nhi_id,
        agent_id=uuid.uuid4(),
        agent_name="docs-bot",
        environment="dev",
        owner_email="owner@example.com",
        platform=Platform.POSTGRES,
        kind=NhiKind.POSTGRES_ROLE,
        identity_name=group_name("nhi", "docs-bot", nhi_id),
        iam_path="/nhi-lifecycle/",
        secret_name=f"nhi-lifecycle/dev/docs-bot/{nhi_id}",
        scope=READ_DOCS,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        tags={"managed-by": "nhi-lifecycle", "nhi:nhi-id": str(nhi_id)},
        target=TARGET,
    )


def pg_roles(pg: PgCluster, names: list[str]) -> dict[str, bool]:
    with pg.connect() as conn:
        rows = conn.execute(
            "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY(%s)", (names,)
        ).fetchall()
    return {str(n): bool(c) for n, c in rows}


def as_data_owner(pg: PgCluster, statement: str) -> None:
    with pg.connect() as conn:
        conn.execute("SET ROLE data_owner")
        conn.execute(statement)


def test_a_grant_by_another_role_blocks_removal_names_it_and_keeps_logins_locked(
    pg_provider: PostgresProvider, pg: PgCluster, aws: AwsClients
) -> None:
    plan = pg_plan()
    pg_provider.create(plan)
    pg_provider.deliver(plan)
    value = json.loads(
        aws.secrets.get_secret_value(SecretId=plan.secret_name, VersionStage="AWSCURRENT")[
            "SecretString"
        ]
    )
    group = plan.identity_name
    first, second = role_names(group)
    everyone = [first, second, group]
    # The data owner, not the target's admin, grants the NHI's group and a login more.
    as_data_owner(pg, f'GRANT SELECT ON docs.faq TO "{group}"')
    as_data_owner(pg, f'GRANT UPDATE ON docs.articles TO "{first}"')

    with pytest.raises(ApplicationError) as excinfo:
        pg_provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
    err = excinfo.value
    assert err.type == "DependentObjectsStillExist" and not err.non_retryable
    assert str(err).startswith("DependentObjectsStillExist: ")
    assert "(SQLSTATE 2BP01, dropping the roles of" in err.message
    assert f"privilege SELECT on table docs.faq granted by data_owner to {group}" in err.message
    assert f"privilege UPDATE on table docs.articles granted by data_owner to {first}" in (
        err.message
    )
    assert f"`REVOKE SELECT ON TABLE docs.faq FROM {group}` as role data_owner" in err.message
    assert err.details[0]["code"] == "2BP01"
    # Nothing dropped, and nothing can log in: NOLOGIN holds until the drop.
    assert pg_roles(pg, everyone) == {first: False, second: False, group: False}
    assert refused(value)

    as_data_owner(pg, f'REVOKE SELECT ON docs.faq FROM "{group}"')
    with pytest.raises(ApplicationError) as excinfo:  # one blocker left: named alone
        pg_provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
    assert "docs.faq" not in excinfo.value.message
    assert f"UPDATE on table docs.articles granted by data_owner to {first}" in (
        excinfo.value.message
    )
    as_data_owner(pg, f'REVOKE UPDATE ON docs.articles FROM "{first}"')

    removed = pg_provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
    assert f"group role {group}" in removed.removed
    assert pg_roles(pg, everyone) == {}


def test_a_privilege_in_another_database_is_named_by_the_server(
    pg_provider: PostgresProvider, pg: PgCluster
) -> None:
    plan = pg_plan()
    pg_provider.create(plan)
    group = plan.identity_name
    other = f"other_{uuid.uuid4().hex[:8]}"
    with pg.connect() as conn:
        conn.execute(f"CREATE DATABASE {other}")
    with pg.connect(dbname=other) as conn:
        conn.execute("CREATE TABLE notes (id int)")
        conn.execute(f'GRANT SELECT ON notes TO "{group}"')

    with pytest.raises(ApplicationError) as excinfo:
        pg_provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
    err = excinfo.value
    assert err.type == "DependentObjectsStillExist" and not err.non_retryable
    assert f"in database {other}" in err.message
    assert "Operator: for " in err.message
    assert all(can is False for can in pg_roles(pg, list(role_names(group))).values())

    with pg.connect(dbname=other) as conn:
        conn.execute(f'REVOKE SELECT ON notes FROM "{group}"')
    pg_provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
    assert pg_roles(pg, [group, *role_names(group)]) == {}
    with pg.connect() as conn:
        conn.execute(f"DROP DATABASE {other}")
