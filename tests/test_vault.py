"""OpenBao/Vault: `vault_approle` NHIs and `vault_kv` delivery, against a real OpenBao dev
server (tests/bao_server.py), moto and a real PostgreSQL cluster.

Every point is proven from Vault itself: a real AppRole login with the delivered role id and
secret id, what the login's token may read, KV versions and their staging labels, and reads
that find the role, the policy and the secret gone.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.providers import vault_acl as acl
from activities.providers.aws import AwsProvider
from activities.providers.base import Known, Provider
from activities.providers.postgres import PostgresProvider
from activities.providers.registry import build_providers
from activities.providers.secret_store import SecretStore
from activities.providers.vault import VaultProvider
from activities.providers.vault_client import VaultClient, classify_vault
from models.contracts import FindingKind, IdentityRef, OrphanInput, ProvisionPlan, ScopeStatement
from models.enums import CredentialDelivery, NhiKind, Platform
from models.schemas import PolicyIn
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.rules.findings import Rules, classify
from nhi.rules.ids import orphan_workflow_id
from nhi.rules.pg_grants import group_name
from nhi.rules.policy import (
    PolicyRules,
    RuleViolation,
    identity_name,
    secret_name,
    validate_vault_scope,
)
from nhi.services.policies import apply_policy
from nhi.services.target_registry import TargetConnection
from tests.bao_server import BaoServer
from tests.conftest import Service
from tests.helpers import agent_body, bearer, eventually, run_sweep, sweep_settings
from tests.pg_cluster import ADMIN, DATABASE, PgCluster, login, refused
from worker import build_worker


def vault_policy(sessions: sessionmaker[Session], **overrides: Any) -> None:
    """The dev policy for AppRole NHIs: a day by default, `sudo` needs an approver."""
    body = {
        "platform": "vault",
        "kind": "vault_approle",
        "environment": "dev",
        "allowed": True,
        "default_ttl": "1d",
        "max_lifetime": "30d",
        "rotation_period": "7d",
        "sensitive_actions": ["sudo"],
    }
    with transaction(sessions) as session:
        apply_policy(session, PolicyIn.model_validate(body | overrides), "test:platform")


READ_APP = [ScopeStatement(actions=["read", "list"], resources=["secret/data/app/*"])]
RULES = PolicyRules(
    label="vault/vault_approle/dev",
    allowed=True,
    default_ttl_seconds=3600,
    max_lifetime_seconds=86400,
    sensitive_actions=("sudo",),
)


class Targets:
    """A TargetResolver over the suite's company database."""

    def __init__(self, target: TargetConnection) -> None:
        self._target = target

    def get(self, name: str) -> TargetConnection:
        assert name == self._target.name
        return self._target

    def names(self) -> list[str]:
        return [self._target.name]


@pytest.fixture(scope="module")
def vault_settings(settings: Settings, bao: BaoServer) -> Settings:
    return settings.model_copy(update={"vault_addr": bao.addr, "vault_token": SecretStr(bao.token)})


@pytest.fixture(scope="module")
def company(cluster: PgCluster) -> Targets:
    return Targets(
        TargetConnection(
            name="company",
            host=cluster.host,
            port=cluster.port,
            dbname=DATABASE,
            admin_user=ADMIN,
            password=cluster.admin_password,
            connection_limit=10,
        )
    )


@pytest.fixture(scope="module")
def providers(
    vault_settings: Settings, aws: AwsClients, company: Targets
) -> Iterator[dict[Platform, Provider]]:
    built = build_providers(vault_settings, aws, company)
    yield built


@pytest.fixture
def vault(providers: dict[Platform, Provider]) -> VaultProvider:
    provider = providers[Platform.VAULT]
    assert isinstance(provider, VaultProvider)
    return provider


@pytest.fixture(scope="module")
def client(bao: BaoServer) -> Iterator[VaultClient]:
    c = VaultClient(bao.addr, token=SecretStr(bao.token))
    yield c
    c.close()


def vault_plan(
    settings: Settings,
    *,
    expires_in: float = 3600,
    delivery: CredentialDelivery = CredentialDelivery.AWS_SECRETS_MANAGER,
    scope: list[ScopeStatement] = READ_APP,
    cidrs: list[str] | None = None,
) -> ProvisionPlan:
    nhi_id = uuid.uuid4()
    return ProvisionPlan(
        nhi_id=nhi_id,
        agent_id=uuid.uuid4(),
        agent_name="vault-bot",
        environment="dev",
        owner_email="owner@example.com",
        platform=Platform.VAULT,
        kind=NhiKind.VAULT_APPROLE,
        identity_name=identity_name(settings.name_prefix, "vault-bot", nhi_id),
        iam_path=settings.iam_path,
        secret_name=secret_name(settings.secret_prefix, "dev", "vault-bot", nhi_id, delivery),
        scope=scope,
        allowed_cidrs=cidrs or [],
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
    )


def provisioned(vault: VaultProvider, plan: ProvisionPlan) -> str:
    env = ActivityEnvironment()
    env.run(vault.create, plan)
    return env.run(vault.deliver, plan).credential_ref


def store(aws: AwsClients) -> SecretStore:
    return SecretStore(aws.secrets)  # the registry gave every store the Vault KV store


def token_of(client: VaultClient, value: dict[str, Any]) -> str | None:
    return client.login("approle", str(value["role_id"]), str(value["secret_id"]))


def as_token(bao: BaoServer, token: str, path: str) -> int:
    return httpx.get(
        f"{bao.addr}/v1/{path}", headers={"X-Vault-Token": token}, timeout=10
    ).status_code


# ---- rules ------------------------------------------------------------------------------------


def test_scope_grammar_refuses_what_is_not_a_capability_on_a_path() -> None:
    def refused_at(actions: list[str], resources: list[str]) -> str:
        with pytest.raises(RuleViolation) as err:
            validate_vault_scope([ScopeStatement(actions=actions, resources=resources)], RULES)
        return err.value.field

    assert refused_at(["s3:GetObject"], ["secret/data/x"]) == "scope[0].actions[0]"
    assert refused_at(["deny"], ["secret/data/x"]) == "scope[0].actions[0]"
    assert refused_at(["read"], ['secret/data/x" { capabilities = ["sudo"] }']) == (
        "scope[0].resources[0]"
    )
    assert refused_at(["read"], ["+/data/x"]) == "scope[0].resources[0]"  # a whole mount
    assert refused_at(["read"], ["secret*"]) == "scope[0].resources[0]"
    assert validate_vault_scope(READ_APP, RULES) == []
    sudo = [ScopeStatement(actions=["read", "sudo"], resources=["secret/data/app/x"])]
    assert validate_vault_scope(sudo, RULES) == ["sudo"]
    admin = [ScopeStatement(actions=["read"], resources=["sys/mounts"])]
    assert validate_vault_scope(admin, RULES) == ["read on sys/mounts"]


def test_policy_text_round_trips_and_suspends() -> None:
    text = acl.render(READ_APP, {"managed-by": "nhi-lifecycle", "nhi:nhi-id": "x"}, suspended=False)
    read = acl.parse(text)
    assert read.granted == {"secret/data/app/*": ["list", "read"]} and not read.suspended
    held = acl.parse(acl.suspend(text))
    assert held.suspended and held.granted == {} and held.held == read.granted
    assert held.marks["nhi:nhi-id"] == "x"
    assert acl.parse(acl.restore(acl.suspend(text))).granted == read.granted


def test_vault_errors_are_classified_by_status() -> None:
    denied = classify_vault(403, ["permission denied"], "reading x")
    assert denied.type == "VaultPermissionDenied" and denied.non_retryable
    sealed = classify_vault(503, ["Vault is sealed"], "reading x")
    assert sealed.type == "VaultSealed" and not sealed.non_retryable


def test_unreachable_vault_is_a_retryable_error() -> None:
    from tests.helpers import free_port

    dead = VaultClient(f"http://127.0.0.1:{free_port()}", token=SecretStr("t"))
    with pytest.raises(ApplicationError) as err:
        dead.read("sys/health", doing="probing")
    assert err.value.type == "VaultUnreachable" and not err.value.non_retryable


# ---- vault_approle ----------------------------------------------------------------------------


def test_login_works_with_the_delivered_credential_and_fails_after_decommission(
    vault: VaultProvider,
    vault_settings: Settings,
    aws: AwsClients,
    client: VaultClient,
    bao: BaoServer,
) -> None:
    plan = vault_plan(vault_settings)
    ref = provisioned(vault, plan)
    assert ref.startswith("arn:aws:secretsmanager:")  # delivered by reference, AWS as before
    value = store(aws).read(plan.secret_name)
    assert value is not None
    token = token_of(client, value)
    assert token is not None
    bao.http.post("secret/data/app/config", json={"data": {"k": "v"}}).raise_for_status()
    assert as_token(bao, token, "secret/data/app/config") == 200
    assert as_token(bao, token, "secret/data/other/config") == 403  # only the granted paths
    removed = ActivityEnvironment().run(vault.delete, IdentityRef.of_plan(plan))
    assert f"role {plan.identity_name}" in removed.removed
    assert f"policy {plan.identity_name}" in removed.removed
    assert token_of(client, value) is None
    assert as_token(bao, token, "secret/data/app/config") == 403  # the live token is dead too
    assert bao.http.get(f"auth/approle/role/{plan.identity_name}").status_code == 404
    assert bao.http.get(f"sys/policies/acl/{plan.identity_name}").status_code == 404
    again = ActivityEnvironment().run(vault.delete, IdentityRef.of_plan(plan))
    assert again.removed == []


def test_vault_itself_refuses_the_secret_id_after_the_expiry(
    vault: VaultProvider, vault_settings: Settings, aws: AwsClients, client: VaultClient
) -> None:
    plan = vault_plan(vault_settings, expires_in=4)
    provisioned(vault, plan)
    value = store(aws).read(plan.secret_name)
    assert value is not None and token_of(client, value) is not None
    time.sleep(5)
    assert token_of(client, value) is None


def test_bound_cidrs_refuse_a_login_from_elsewhere(
    vault: VaultProvider,
    vault_settings: Settings,
    aws: AwsClients,
    client: VaultClient,
    bao: BaoServer,
) -> None:
    plan = vault_plan(vault_settings, cidrs=["10.20.0.0/16"])
    provisioned(vault, plan)
    role = bao.http.get(f"auth/approle/role/{plan.identity_name}").json()["data"]
    assert role["secret_id_bound_cidrs"] == ["10.20.0.0/16"]
    assert role["token_bound_cidrs"] == ["10.20.0.0/16"]
    value = store(aws).read(plan.secret_name)
    assert value is not None and token_of(client, value) is None  # we are 127.0.0.1


def test_rotation_keeps_a_working_secret_id_at_every_moment(
    vault: VaultProvider, vault_settings: Settings, aws: AwsClients, client: VaultClient
) -> None:
    plan = vault_plan(vault_settings)
    provisioned(vault, plan)
    first = store(aws).read(plan.secret_name)
    assert first is not None
    stop = threading.Event()
    failures: list[str] = []
    attempts = [0]

    def agent() -> None:
        # An agent that re-reads its credential before each login, as documented.
        while not stop.is_set():
            value = store(aws).read(plan.secret_name)
            if value is None or token_of(client, value) is None:
                failures.append(str(value and value.get("secret_id_accessor")))
            attempts[0] += 1

    thread = threading.Thread(target=agent)
    thread.start()
    env = ActivityEnvironment()
    try:
        time.sleep(0.3)
        staged = env.run(vault.stage_rotation, plan)
        time.sleep(0.3)
        assert token_of(client, first) is not None  # both valid during the overlap
        env.run(vault.verify_pending, plan)
        promoted = env.run(vault.promote, plan)
        assert promoted == staged and promoted.old_key_id == first["secret_id_accessor"]
        time.sleep(0.3)
        assert token_of(client, first) is not None
        env.run(vault.retire, IdentityRef.of_plan(plan), str(promoted.old_key_id), delete=False)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert failures == [] and attempts[0] > 10
    assert token_of(client, first) is None  # destroyed when retired
    current = store(aws).read(plan.secret_name)
    assert current is not None and current["secret_id_accessor"] == promoted.new_key_id
    assert token_of(client, current) is not None
    env.run(vault.retire, IdentityRef.of_plan(plan), str(promoted.old_key_id), delete=True)
    env.run(vault.delete, IdentityRef.of_plan(plan))


def test_quarantine_stops_logins_and_tokens_and_restore_brings_them_back(
    vault: VaultProvider,
    vault_settings: Settings,
    aws: AwsClients,
    client: VaultClient,
    bao: BaoServer,
) -> None:
    plan = vault_plan(vault_settings)
    provisioned(vault, plan)
    value = store(aws).read(plan.secret_name)
    assert value is not None
    token = token_of(client, value)
    assert token is not None
    bao.http.post("secret/data/app/q", json={"data": {"k": "v"}}).raise_for_status()
    env, ref = ActivityEnvironment(), IdentityRef.of_plan(plan)
    with pytest.raises(ApplicationError) as err:
        env.run(vault.verify_disabled, ref)
    assert err.value.type == "NotQuarantined"
    assert env.run(vault.disable, ref)
    env.run(vault.verify_disabled, ref)
    assert token_of(client, value) is None
    assert as_token(bao, token, "secret/data/app/q") == 403
    env.run(vault.enable, ref)
    assert token_of(client, value) is not None
    assert as_token(bao, token, "secret/data/app/q") == 200
    env.run(vault.delete, ref)


def test_renewal_reissues_a_secret_id_that_would_lapse_first(
    vault: VaultProvider, vault_settings: Settings, aws: AwsClients, client: VaultClient
) -> None:
    plan = vault_plan(vault_settings, expires_in=600)
    provisioned(vault, plan)
    before = store(aws).read(plan.secret_name)
    renewed = plan.model_copy(update={"expires_at": plan.expires_at + timedelta(hours=2)})
    ActivityEnvironment().run(vault.renew, renewed)
    after = store(aws).read(plan.secret_name)
    assert before is not None and after is not None
    assert after["secret_id_accessor"] != before["secret_id_accessor"]
    assert token_of(client, after) is not None and token_of(client, before) is not None
    ActivityEnvironment().run(vault.renew, renewed)  # now long enough: kept
    kept = store(aws).read(plan.secret_name)
    assert kept is not None and kept["secret_id_accessor"] == after["secret_id_accessor"]
    ActivityEnvironment().run(vault.delete, IdentityRef.of_plan(plan))


def test_a_role_someone_else_made_is_refused(
    vault: VaultProvider, vault_settings: Settings, bao: BaoServer
) -> None:
    plan = vault_plan(vault_settings)
    bao.http.post(f"auth/approle/role/{plan.identity_name}", json={}).raise_for_status()
    with pytest.raises(ApplicationError) as err:
        ActivityEnvironment().run(vault.create, plan)
    assert err.value.type == "IdentityConflict" and err.value.non_retryable
    assert bao.http.get(f"sys/policies/acl/{plan.identity_name}").status_code == 404


def test_an_orphan_approle_under_our_prefix_is_found_and_removed(
    vault: VaultProvider,
    vault_settings: Settings,
    aws: AwsClients,
    client: VaultClient,
    bao: BaoServer,
) -> None:
    live = vault_plan(vault_settings)
    orphan = vault_plan(vault_settings, delivery=CredentialDelivery.VAULT_KV)
    provisioned(vault, live)
    provisioned(vault, orphan)  # its inventory row never committed, say
    leaked = store(aws).read(orphan.secret_name)
    assert leaked is not None
    # Someone else's role under the same mount, outside our prefix: never listed.
    bao.http.post("auth/approle/role/ci-runner", json={}).raise_for_status()
    found = vault.discover(
        {live.identity_name: Known(status="active", scope=tuple(live.scope))}, lambda: None
    )
    by_name = {i.name: i for i in found.identities}
    assert "ci-runner" not in by_name
    assert by_name[live.identity_name].drift is None
    assert by_name[orphan.identity_name].managed
    assert by_name[orphan.identity_name].secret_arn == orphan.secret_name
    from nhi.rules.findings import InventoryItem

    inventory = [
        InventoryItem(
            nhi_id=live.nhi_id,
            name=live.identity_name,
            kind="vault_approle",
            status="active",
            expires_at=live.expires_at,
            agent_status="active",
            granted_scope=tuple(live.scope),
        )
    ]
    later = datetime.now(UTC) + timedelta(hours=1)
    findings = classify(list(by_name.values()), inventory, later, Rules())
    # (Other tests' leftovers under the prefix are orphans as well.)
    orphans = [f for f in findings if f.kind is FindingKind.ORPHAN]
    assert live.identity_name not in {f.identity for f in orphans}
    orphans = [f for f in orphans if f.identity == orphan.identity_name]
    assert len(orphans) == 1 and orphans[0].nhi_id == orphan.nhi_id
    ref = IdentityRef.of_orphan(
        OrphanInput(
            identity=orphans[0].identity,
            identity_kind=NhiKind.VAULT_APPROLE,
            nhi_id=orphans[0].nhi_id,
            secret_arn=orphans[0].secret_arn,
        )
    )
    env = ActivityEnvironment()
    env.run(vault.disable, ref)
    env.run(vault.verify_disabled, ref)
    env.run(vault.delete, ref)
    assert token_of(client, leaked) is None
    assert (
        bao.http.get(f"secret/metadata/{orphan.secret_name.removeprefix('vault-kv:')}").status_code
        == 404
    )
    left = {i.name for i in vault.discover({}, lambda: None).identities}
    assert orphan.identity_name not in left and live.identity_name in left
    # Drift: someone widened the live NHI's policy by hand.
    text = bao.http.get(f"sys/policies/acl/{live.identity_name}").json()["data"]["policy"]
    widened = text + 'path "secret/data/*" {\n  capabilities = ["read"]\n}\n'
    bao.http.post(f"sys/policies/acl/{live.identity_name}", json={"policy": widened})
    drifted = vault.discover(
        {live.identity_name: Known(status="active", scope=tuple(live.scope))}, lambda: None
    )
    (item,) = [i for i in drifted.identities if i.name == live.identity_name]
    assert item.drift and "secret/data/*" in item.drift
    ActivityEnvironment().run(vault.renew, live)  # a drift revert puts the grant back
    reverted = vault.discover(
        {live.identity_name: Known(status="active", scope=tuple(live.scope))}, lambda: None
    )
    assert [i.drift for i in reverted.identities if i.name == live.identity_name] == [None]
    env.run(vault.delete, IdentityRef.of_plan(live))
    bao.http.delete("auth/approle/role/ci-runner")


# ---- vault_kv delivery ------------------------------------------------------------------------


def kv_labels(bao: BaoServer, name: str) -> dict[str, str]:
    meta = bao.http.get(f"secret/metadata/{name.removeprefix('vault-kv:')}")
    if meta.status_code == 404:
        return {}
    return dict(meta.json()["data"]["custom_metadata"] or {})


def kv_current(bao: BaoServer, name: str) -> dict[str, Any]:
    """What an agent does: the metadata's AWSCURRENT label, then that version."""
    version = kv_labels(bao, name)["AWSCURRENT"]
    path = name.removeprefix("vault-kv:")
    data = bao.http.get(f"secret/data/{path}", params={"version": version})
    return dict(data.json()["data"]["data"])


def test_kv_delivered_approle_credential(
    vault: VaultProvider, vault_settings: Settings, client: VaultClient, bao: BaoServer
) -> None:
    plan = vault_plan(vault_settings, delivery=CredentialDelivery.VAULT_KV)
    ref = provisioned(vault, plan)
    assert ref == f"vault-kv://secret/{plan.secret_name.removeprefix('vault-kv:')}"
    assert token_of(client, kv_current(bao, plan.secret_name)) is not None
    ActivityEnvironment().run(vault.delete, IdentityRef.of_plan(plan))
    assert kv_labels(bao, plan.secret_name) == {}


def test_kv_delivered_iam_user_key_rotates_and_is_deleted(
    providers: dict[Platform, Provider], vault_settings: Settings, aws: AwsClients, bao: BaoServer
) -> None:
    provider = providers[Platform.AWS]
    assert isinstance(provider, AwsProvider)
    nhi_id = uuid.uuid4()
    plan = ProvisionPlan(
        nhi_id=nhi_id,
        agent_id=uuid.uuid4(),
        agent_name="kv-agent",
        environment="dev",
        owner_email="owner@example.com",
        platform=Platform.AWS,
        kind=NhiKind.IAM_USER_KEY,
        identity_name=identity_name("nhi", "kv-agent", nhi_id),
        iam_path=vault_settings.iam_path,
        secret_name=secret_name(
            vault_settings.secret_prefix, "dev", "kv-agent", nhi_id, CredentialDelivery.VAULT_KV
        ),
        scope=[ScopeStatement(actions=["s3:GetObject"], resources=["arn:aws:s3:::kb/*"])],
        expires_at=datetime.now(UTC) + timedelta(days=1),
    )
    env = ActivityEnvironment()
    env.run(provider.create, plan)
    created = env.run(provider.deliver, plan)
    assert created.credential_ref.startswith("vault-kv://secret/")
    with pytest.raises(aws.secrets.exceptions.ResourceNotFoundException):
        aws.secrets.describe_secret(SecretId=plan.secret_name.removeprefix("vault-kv:"))
    first = kv_current(bao, plan.secret_name)
    assert first["AccessKeyId"] == created.access_key_id
    assert set(kv_labels(bao, plan.secret_name)) >= {"AWSCURRENT", "managed-by", "nhi:nhi-id"}
    staged = env.run(provider.stage_rotation, plan)
    labels = kv_labels(bao, plan.secret_name)
    assert labels["AWSPENDING"] != labels["AWSCURRENT"]
    assert kv_current(bao, plan.secret_name)["AccessKeyId"] == first["AccessKeyId"]
    env.run(provider.verify_pending, plan)
    env.run(provider.promote, plan)
    labels = kv_labels(bao, plan.secret_name)
    assert "AWSPENDING" not in labels and labels["AWSPREVIOUS"] == "1"
    assert kv_current(bao, plan.secret_name)["AccessKeyId"] == staged.new_key_id
    env.run(provider.retire, IdentityRef.of_plan(plan), first["AccessKeyId"], delete=True)
    keys = aws.iam.list_access_keys(UserName=plan.identity_name)["AccessKeyMetadata"]
    assert [k["AccessKeyId"] for k in keys] == [staged.new_key_id]
    env.run(provider.delete, IdentityRef.of_plan(plan), force_delete_secret=False)
    assert kv_labels(bao, plan.secret_name) == {}
    with pytest.raises(aws.iam.exceptions.NoSuchEntityException):
        aws.iam.get_user(UserName=plan.identity_name)


def test_kv_delivered_postgres_role_rotates_and_is_deleted(
    providers: dict[Platform, Provider], vault_settings: Settings, bao: BaoServer
) -> None:
    provider = providers[Platform.POSTGRES]
    assert isinstance(provider, PostgresProvider)
    nhi_id = uuid.uuid4()
    plan = ProvisionPlan(
        nhi_id=nhi_id,
        agent_id=uuid.uuid4(),
        agent_name="kv-docs",
        environment="dev",
        owner_email="owner@example.com",
        platform=Platform.POSTGRES,
        kind=NhiKind.POSTGRES_ROLE,
        identity_name=group_name("nhi", "kv-docs", nhi_id),
        iam_path="/nhi-lifecycle/",
        secret_name=secret_name(
            vault_settings.secret_prefix, "dev", "kv-docs", nhi_id, CredentialDelivery.VAULT_KV
        ),
        scope=[ScopeStatement(actions=["SELECT"], resources=["docs.*"])],
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        target="company",
    )
    env = ActivityEnvironment()
    env.run(provider.create, plan)
    created = env.run(provider.deliver, plan)
    assert created.credential_ref.startswith("vault-kv://secret/")
    first = kv_current(bao, plan.secret_name)
    with login(first) as conn:
        assert conn.execute("SELECT count(*) FROM docs.articles").fetchone() is not None
    staged = env.run(provider.stage_rotation, plan)
    env.run(provider.verify_pending, plan)
    env.run(provider.promote, plan)
    second = kv_current(bao, plan.secret_name)
    assert second["username"] == staged.new_key_id != first["username"]
    assert not refused(second) and not refused(first)  # the overlap
    env.run(provider.retire, IdentityRef.of_plan(plan), first["username"], delete=True)
    assert refused(first) and not refused(second)
    env.run(provider.delete, IdentityRef.of_plan(plan))
    assert refused(second)
    assert kv_labels(bao, plan.secret_name) == {}


def test_kv_names_without_a_vault_are_refused(aws: AwsClients) -> None:
    from activities.providers import secret_store

    saved = secret_store._delivery_store
    secret_store.use_delivery_store(None)
    try:
        with pytest.raises(ApplicationError) as err:
            SecretStore(aws.secrets).read("vault-kv:nhi-lifecycle/dev/x/y")
        assert err.value.type == "NoVault" and err.value.non_retryable
    finally:
        secret_store.use_delivery_store(saved)


# ---- through the service: the request chooses the delivery -----------------------------------


async def test_an_approle_delivered_into_vault_through_the_service(
    service: Service, sessions: sessionmaker[Session], bao: BaoServer, client: VaultClient
) -> None:
    vault_policy(sessions)
    token = service.token("vault-e2e", "platform", teams=["search"])
    async with httpx.AsyncClient(base_url=service.url, timeout=30, headers=bearer(token)) as http:

        async def call(method: str, path: str, **kw: Any) -> Any:
            response = await http.request(method, path, **kw)
            assert response.status_code < 400, response.text
            return response.json()

        agent = await call("POST", "/v1/agents", json=agent_body())
        refused = await http.post(
            f"/v1/agents/{agent['id']}/nhis",
            json={
                "platform": "vault",
                "kind": "vault_approle",
                "scope": [{"actions": ["read"], "resources": ["secret/data/app/*"]}],
                "allowed_cidrs": ["127.0.0.1/32"],
                "delivery": "vault_kv",
                "ttl": "999d",
            },
        )
        assert refused.status_code == 422 and "ttl" in refused.text
        accepted = await call(
            "POST",
            f"/v1/agents/{agent['id']}/nhis",
            json={
                "platform": "vault",
                "kind": "vault_approle",
                "scope": [{"actions": ["read"], "resources": ["secret/data/app/*"]}],
                "allowed_cidrs": ["127.0.0.1/32"],
                "delivery": "vault_kv",
            },
        )

        async def active() -> dict[str, Any]:
            nhi = await call("GET", f"/v1/nhis/{accepted['id']}")
            assert nhi["status"] == "active"
            return dict(nhi)

        nhi = await eventually(active)
        assert nhi["credential_ref"].startswith("vault-kv://secret/")
        name = "vault-kv:" + nhi["credential_ref"].removeprefix("vault-kv://secret/")
        value = kv_current(bao, name)
        assert token_of(client, value) is not None  # bound to 127.0.0.1/32: we are inside
        security = service.token("vault-e2e-security", "security")
        decommissioned = await http.post(
            f"/v1/nhis/{accepted['id']}/decommission",
            json={"reason": "end of the test"},
            headers=bearer(security),
        )
        assert decommissioned.status_code < 400, decommissioned.text

        async def gone() -> None:
            nhi = await call("GET", f"/v1/nhis/{accepted['id']}")
            assert nhi["status"] == "decommissioned"

        await eventually(gone)
    assert token_of(client, value) is None
    assert kv_labels(bao, name) == {}
    assert bao.http.get(f"auth/approle/role/{nhi['name']}").status_code == 404


async def test_a_sweep_removes_an_orphan_approle_under_our_prefix(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    company: Targets,
    client: VaultClient,
    bao: BaoServer,
) -> None:
    """The real SweepWorkflow for `vault`: the orphan is quarantined now, removed after the
    grace period with its delivered secret; a role outside our prefix is never listed."""
    rig = sweep_settings(settings, "vsweep", orphan_grace_seconds=3600)
    provider = build_providers(rig, aws, company)[Platform.VAULT]
    assert isinstance(provider, VaultProvider)
    ghost = vault_plan(rig, delivery=CredentialDelivery.VAULT_KV)
    provisioned(provider, ghost)
    leaked = kv_current(bao, ghost.secret_name)
    stranger = f"{rig.name_prefix}x-manual"  # another prefix that merely starts alike
    bao.http.post(f"auth/approle/role/{stranger}", json={}).raise_for_status()
    queue = rig.temporal_task_queue
    async with build_worker(ts_env.client, rig, sessions, aws, task_queue=queue):
        outcome = await run_sweep(ts_env, queue, provider="vault")
        assert [(f.kind.value, f.identity) for f in outcome.findings] == [
            ("orphan", ghost.identity_name)
        ]
        assert outcome.findings[0].secret_arn == ghost.secret_name

        async def quarantined() -> None:
            assert token_of(client, leaked) is None

        await eventually(quarantined)
        orphan = ts_env.client.get_workflow_handle(
            orphan_workflow_id("vault_approle", ghost.identity_name)
        )
        async with ts_env.time_skipping_unlocked():  # type: ignore[attr-defined]
            removed = await orphan.result()  # after the one-hour grace
    assert f"role {ghost.identity_name}" in removed
    assert f"secret {ghost.secret_name}" in removed
    assert bao.http.get(f"auth/approle/role/{ghost.identity_name}").status_code == 404
    assert kv_labels(bao, ghost.secret_name) == {}
    assert bao.http.get(f"auth/approle/role/{stranger}").status_code == 200
    bao.http.delete(f"auth/approle/role/{stranger}")


def test_delivery_comes_from_the_request_else_the_policy(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    from activities.provider import identity_ref_of
    from models.orm import Nhi
    from tests.helpers import request_nhi

    scope = [{"actions": ["read"], "resources": ["secret/data/app/*"]}]
    vault_policy(sessions, delivery="vault_kv")
    try:
        _, by_policy, _ = request_nhi(sessions, settings, "vault_approle", scope=scope)
        _, by_request, _ = request_nhi(
            sessions, settings, "vault_approle", scope=scope, delivery="aws_secrets_manager"
        )
        with transaction(sessions) as session:
            kv = session.get_one(Nhi, by_policy)
            sm = session.get_one(Nhi, by_request)
            assert kv.delivery is CredentialDelivery.VAULT_KV
            assert sm.delivery is CredentialDelivery.AWS_SECRETS_MANAGER
            kv_name = identity_ref_of(kv, kv.agent, settings).secret_name
            sm_name = identity_ref_of(sm, sm.agent, settings).secret_name
        assert kv_name == f"vault-kv:{settings.secret_prefix}dev/{kv.agent.name}/{kv.id}"
        assert sm_name == f"{settings.secret_prefix}dev/{sm.agent.name}/{sm.id}"
    finally:
        vault_policy(sessions)
    # A role has no static credential to deliver; and without a Vault there is nowhere to.
    with pytest.raises(RuleViolation) as err:
        request_nhi(sessions, settings, "iam_role", delivery="vault_kv")
    assert err.value.field == "delivery"
    no_vault = settings.model_copy(update={"vault_addr": None})
    with pytest.raises(RuleViolation) as err:
        request_nhi(sessions, no_vault, "vault_approle", scope=scope, delivery="vault_kv")
    assert err.value.field == "delivery" and "NHI_VAULT_ADDR" in err.value.message
    # A sensitive capability needs an approver, as the policy says.
    _, _, sensitive = request_nhi(
        sessions,
        settings,
        "vault_approle",
        scope=[{"actions": ["read", "sudo"], "resources": ["secret/data/app/x"]}],
    )
    assert sensitive == ["sudo"]


async def test_the_lifecycle_rotates_a_kv_delivered_approle_and_retires_every_old_secret_id(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    client: VaultClient,
    bao: BaoServer,
) -> None:
    """The real lifecycle on the time-skipping server: two rotations (the second during the
    first's overlap), the agent's KV credential working throughout, every old secret id
    destroyed after its overlap, and everything gone at decommission."""
    from models.contracts import LifecycleAction, Phase
    from models.orm import Nhi
    from tests.conftest import dev_address
    from tests.helpers import provision, request_nhi, skip_until
    from workflows.lifecycle import NhiLifecycleWorkflow

    vault_policy(sessions)
    rig = settings.model_copy(update={"temporal_address": dev_address(ts_env)})
    queue = f"vault-life-{uuid.uuid4().hex[:8]}"
    owner = "ana@example.com"
    async with build_worker(ts_env.client, rig, sessions, aws, task_queue=queue):
        now = await ts_env.get_current_time()
        _, nhi_id, _ = request_nhi(
            sessions,
            rig,
            "vault_approle",
            scope=[{"actions": ["read"], "resources": ["secret/data/app/*"]}],
            ttl="30d",
            owner_email=owner,
            now=now,
            delivery="vault_kv",
        )
        handle = await provision(ts_env, queue, nhi_id)
        with transaction(sessions) as s:
            nhi = s.get_one(Nhi, nhi_id)
            name, born = nhi.name, nhi.activated_at
            ref = nhi.credential_ref or ""
        assert born is not None and ref.startswith("vault-kv://secret/")
        secret = "vault-kv:" + ref.split("/", 3)[3]

        def listed() -> set[str]:
            answer = bao.http.request("LIST", f"auth/approle/role/{name}/secret-id")
            return set(answer.json()["data"]["keys"]) if answer.status_code == 200 else set()

        first = kv_current(bao, secret)
        seen = [first["secret_id_accessor"]]
        for _ in range(2):
            with ts_env.auto_time_skipping_disabled():

                async def accepted() -> None:
                    try:
                        view = await handle.execute_update(
                            NhiLifecycleWorkflow.rotate,
                            LifecycleAction(actor=owner, reason="rotate now"),
                        )
                    except WorkflowUpdateFailedError as err:
                        # The first rotation delivers the new secret id before its step ends
                        # (it records the rotation after): asked again until it has ended.
                        assert "already under way" not in str(err.cause), err.cause
                        raise
                    assert view.message == "rotation started"

                await eventually(accepted)

                async def rotated() -> None:
                    assert kv_current(bao, secret)["secret_id_accessor"] not in seen

                await eventually(rotated)
            current = kv_current(bao, secret)
            assert token_of(client, current) is not None
            seen.append(current["secret_id_accessor"])
        # The second rotation retired the first secret id early: two at most, ever.
        assert listed() == {seen[1], seen[2]}
        await skip_until(ts_env, handle, born + timedelta(hours=3))

        async def retired() -> None:
            assert listed() == {seen[2]}

        await eventually(retired)
        assert token_of(client, kv_current(bao, secret)) is not None
        assert token_of(client, first) is None
        with ts_env.auto_time_skipping_disabled():
            await handle.execute_update(
                NhiLifecycleWorkflow.decommission, LifecycleAction(actor=owner, reason="done")
            )
        async with ts_env.time_skipping_unlocked():  # type: ignore[attr-defined]
            view = await handle.result()
    assert view.phase is Phase.DECOMMISSIONED
    assert bao.http.get(f"auth/approle/role/{name}").status_code == 404
    assert bao.http.get(f"sys/policies/acl/{name}").status_code == 404
    assert kv_labels(bao, secret) == {}


def test_the_service_can_log_in_with_its_own_approle_and_again_when_its_token_expires(
    bao: BaoServer,
) -> None:
    bao.http.post(
        "sys/policies/acl/nhi-service-test",
        json={"policy": 'path "secret/*" {\n  capabilities = ["read", "create", "update"]\n}\n'},
    ).raise_for_status()
    bao.http.post(
        "auth/approle/role/svc-test",
        json={"token_policies": ["nhi-service-test"], "token_ttl": "2s", "token_max_ttl": "2s"},
    ).raise_for_status()
    role_id = bao.http.get("auth/approle/role/svc-test/role-id").json()["data"]["role_id"]
    secret_id = bao.http.post("auth/approle/role/svc-test/secret-id").json()["data"]["secret_id"]
    service = VaultClient(bao.addr, role_id=role_id, secret_id=SecretStr(secret_id))
    try:
        service.write("secret/data/svc/probe", {"data": {"ok": "1"}}, doing="probing")
        time.sleep(3)  # its token expired: the next call logs in again
        read = service.read("secret/data/svc/probe", doing="probing")
        assert read is not None and read["data"] == {"ok": "1"}
        with pytest.raises(ApplicationError) as err:
            service.read("sys/mounts", doing="reading mounts")
        assert err.value.type == "VaultPermissionDenied" and err.value.non_retryable
        assert secret_id not in repr(service)
    finally:
        service.close()
        bao.http.delete("auth/approle/role/svc-test")
        bao.http.delete("sys/policies/acl/nhi-service-test")
    wrong = VaultClient(bao.addr, role_id=role_id, secret_id=SecretStr("wrong"))
    with pytest.raises(ApplicationError) as err:
        wrong.read("secret/data/svc/probe", doing="probing")
    assert err.value.type == "VaultPermissionDenied" and secret_id not in str(err.value)
