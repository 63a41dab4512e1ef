"""The Postgres provider against a real scram-sha-256 PostgreSQL 15 cluster and the moto server.

Every test proves its point from the database itself: what a delivered login can and cannot
read or write, that VALID UNTIL, rotation and decommissioning refuse the old password, that
open sessions are ended, and that a bad scope never reaches SQL.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import errors
from temporalio.exceptions import ApplicationError

from activities.providers.base import Known
from activities.providers.postgres import PostgresProvider
from activities.providers.secret_store import SecretStore
from models.contracts import IdentityRef, ProvisionPlan, ScopeStatement
from models.enums import NhiKind, Platform
from nhi.infra.aws_clients import AwsClients
from nhi.rules.pg_grants import (
    group_name,
    is_read_only,
    parse_comment,
    parse_grants,
    role_names,
    validate_grants,
)
from nhi.rules.policy import PolicyRules, RuleViolation
from nhi.services.target_registry import TargetConnection, UnknownTarget
from tests.pg_cluster import ADMIN, DATABASE, PgCluster, login, refused, server_binaries

TARGET = "company"
RULES = PolicyRules(
    label="test", allowed=True, default_ttl_seconds=3600, max_lifetime_seconds=86400
)


class Targets:
    """A TargetResolver over fixed targets that counts lookups (a lookup precedes any connection)."""

    def __init__(self, targets: dict[str, TargetConnection]) -> None:
        self._targets = targets
        self.gets = 0

    def get(self, name: str) -> TargetConnection:
        self.gets += 1
        try:
            return self._targets[name]
        except KeyError:
            raise UnknownTarget(name) from None

    def names(self) -> list[str]:
        return sorted(self._targets)


@pytest.fixture(scope="module", params=sorted(server_binaries()))
def cluster(request: pytest.FixtureRequest) -> Iterator[PgCluster]:
    """Every server build on the machine (Debian's 15 and the wheel's 16 here): role
    membership rules changed in 16, and companies run both."""
    pg = PgCluster(server_binaries()[request.param])
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def targets(cluster: PgCluster) -> Targets:
    return Targets(
        {
            TARGET: TargetConnection(
                name=TARGET,
                host=cluster.host,
                port=cluster.port,
                dbname=DATABASE,
                admin_user=ADMIN,
                password=cluster.admin_password,
                connection_limit=10,
            )
        }
    )


@pytest.fixture
def provider(targets: Targets, aws: AwsClients) -> PostgresProvider:
    return PostgresProvider(targets, aws.secrets)


def scope(*statements: tuple[list[str], list[str]]) -> list[ScopeStatement]:
    return [ScopeStatement(actions=a, resources=r) for a, r in statements]


def make_plan(
    statements: list[ScopeStatement], *, expires_in: float = 3600, agent: str = "docs-bot"
) -> ProvisionPlan:
    nhi_id, agent_id = uuid.uuid4(), uuid.uuid4()
    expires_at = datetime.now(UTC) + timedelta(seconds=expires_in)
    return ProvisionPlan(
        nhi_id=nhi_id,
        agent_id=agent_id,
        agent_name=agent,
        environment="dev",
        owner_email="owner@example.com",
        platform=Platform.POSTGRES,
        kind=NhiKind.POSTGRES_ROLE,
        identity_name=group_name("nhi", agent, nhi_id),
        iam_path="/nhi-lifecycle/",
        secret_name=f"nhi-lifecycle/dev/{agent}/{nhi_id}",
        scope=statements,
        expires_at=expires_at,
        tags={"managed-by": "nhi-lifecycle", "nhi:nhi-id": str(nhi_id)},
        target=TARGET,
    )


READ_DOCS = scope((["SELECT"], ["docs.*"]))


def secret(aws: AwsClients, plan: ProvisionPlan, stage: str = "AWSCURRENT") -> dict[str, Any]:
    value = aws.secrets.get_secret_value(SecretId=plan.secret_name, VersionStage=stage)
    return dict(json.loads(value["SecretString"]))


def secret_versions(aws: AwsClients, plan: ProvisionPlan) -> list[tuple[str, list[str]]]:
    """Each version of the secret and its labels (moto stamps listed dates with the time of
    the listing, so whole entries of two listings a second apart never compare equal)."""
    versions = aws.secrets.list_secret_version_ids(SecretId=plan.secret_name)["Versions"]
    return sorted((v["VersionId"], sorted(v.get("VersionStages", []))) for v in versions)


def roles(cluster: PgCluster, like: str) -> dict[str, bool]:
    with cluster.connect() as conn:
        rows = conn.execute(
            "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE %s", (like + "%",)
        ).fetchall()
    return {str(n): bool(c) for n, c in rows}


def provisioned(provider: PostgresProvider, plan: ProvisionPlan) -> str:
    provider.create(plan)
    return provider.deliver(plan).credential_ref


def app_error(excinfo: pytest.ExceptionInfo[ApplicationError]) -> tuple[str | None, bool]:
    return excinfo.value.type, excinfo.value.non_retryable


# ---- access ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statements", "faq_readable"),
    [
        (scope((["SELECT"], ["docs.articles"])), False),
        (scope((["select"], ["docs.*"]), (["USAGE"], ["docs"])), True),
    ],
    ids=["one-table", "schema-wildcard"],
)
def test_login_reads_what_was_granted_and_nothing_else(
    provider: PostgresProvider,
    aws: AwsClients,
    cluster: PgCluster,
    statements: list[ScopeStatement],
    faq_readable: bool,
) -> None:
    plan = make_plan(statements)
    provisioned(provider, plan)
    value = secret(aws, plan)
    group = plan.identity_name
    assert value["username"] == role_names(group)[0]
    assert set(value) == {"engine", "host", "port", "dbname", "username", "password"}
    assert roles(cluster, group)[group] is False  # the group itself never logs in

    with login(value) as conn:
        assert conn.execute("SELECT count(*) FROM docs.articles").fetchone() == (3,)
        if faq_readable:
            assert conn.execute("SELECT count(*) FROM docs.faq").fetchone() == (1,)
        else:
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("SELECT count(*) FROM docs.faq")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM hr.salaries")
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        with pytest.raises(errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO docs.articles VALUES (9, 'x')")
        # Read-only is a default the agent can switch off; the grants are what hold.
        conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("INSERT INTO docs.articles VALUES (9, 'x')")
    with cluster.connect() as conn:
        assert conn.execute("SELECT count(*) FROM docs.articles").fetchone() == (3,)


def test_writer_scope_can_write_only_what_it_names(
    provider: PostgresProvider, aws: AwsClients
) -> None:
    plan = make_plan(scope((["SELECT", "INSERT"], ["docs.faq"])))
    provisioned(provider, plan)
    with login(secret(aws, plan)) as conn:
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("off",)
        conn.execute("INSERT INTO docs.faq VALUES (100, 'Written by an agent?')")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("DELETE FROM docs.faq")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("INSERT INTO docs.articles VALUES (100, 'x')")
    provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)


def test_grant_the_admin_cannot_pass_on_is_refused_and_nothing_is_left(
    provider: PostgresProvider, cluster: PgCluster
) -> None:
    plan = make_plan(scope((["SELECT"], ["hr.salaries"])))
    with pytest.raises(ApplicationError) as excinfo:
        provider.create(plan)
    assert app_error(excinfo) == ("InsufficientPrivilege", True)
    assert "hr" in str(excinfo.value)
    assert roles(cluster, plan.identity_name) == {}  # one transaction: rolled back

    # A table grant where the admin holds the privilege without GRANT OPTION only warns in
    # Postgres; the provider must notice and refuse.
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE docs.drafts (id int)")
        conn.execute("ALTER TABLE docs.drafts OWNER TO data_owner")
        conn.execute("SET ROLE data_owner")
        conn.execute("GRANT SELECT ON docs.drafts TO nhi_admin")  # no grant option
    plan = make_plan(scope((["SELECT"], ["docs.drafts"])))
    with pytest.raises(ApplicationError) as excinfo:
        provider.create(plan)
    assert app_error(excinfo) == ("GrantRefused", True)
    assert "SELECT on docs.drafts" in str(excinfo.value)
    assert roles(cluster, plan.identity_name) == {}
    with cluster.connect() as conn:
        conn.execute("DROP TABLE docs.drafts")


# ---- expiry ----------------------------------------------------------------------------------


def test_valid_until_refuses_login_after_expiry_with_nothing_running(
    provider: PostgresProvider, aws: AwsClients
) -> None:
    plan = make_plan(READ_DOCS, expires_in=3)
    provisioned(provider, plan)
    value = secret(aws, plan)
    assert not refused(value)
    # Nothing of the service runs from here on: only the database enforces the expiry.
    deadline = plan.expires_at + timedelta(seconds=2)
    while not refused(value):
        assert datetime.now(UTC) < deadline, "login still works 2 s after VALID UNTIL"
        time.sleep(0.1)
    assert datetime.now(UTC) >= plan.expires_at - timedelta(milliseconds=200)


def test_passwords_never_reach_sql_text_or_the_server_log(
    provider: PostgresProvider, aws: AwsClients, cluster: PgCluster
) -> None:
    plan = make_plan(READ_DOCS)
    provisioned(provider, plan)
    provider.stage_rotation(plan)
    passwords = [secret(aws, plan)["password"], secret(aws, plan, "AWSPENDING")["password"]]
    log = cluster.server_log()
    first, second = role_names(plan.identity_name)
    for login_role in (first, second):
        assert f'ALTER ROLE "{login_role}" LOGIN PASSWORD \'SCRAM-SHA-256$' in log
    for password in passwords:
        assert password not in log


def test_concurrent_creates_granting_on_one_table_all_succeed(
    provider: PostgresProvider, cluster: PgCluster
) -> None:
    # Unserialised, concurrent GRANTs on one table fail with "tuple concurrently updated".
    plans = [make_plan(scope((["SELECT"], ["docs.articles", "docs.*"]))) for _ in range(6)]
    failures: list[BaseException] = []

    def create(plan: ProvisionPlan) -> None:
        try:
            provider.create(plan)
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=create, args=(p,)) for p in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    with cluster.connect() as conn:
        for plan in plans:
            row = conn.execute(
                "SELECT has_table_privilege(%s, 'docs.faq', 'SELECT')", (plan.identity_name,)
            ).fetchone()
            assert row == (True,)


def test_renew_moves_valid_until_of_both_logins(
    provider: PostgresProvider, cluster: PgCluster
) -> None:
    plan = make_plan(READ_DOCS, expires_in=600)
    provisioned(provider, plan)
    later = plan.model_copy(update={"expires_at": plan.expires_at + timedelta(days=1)})
    provider.renew(later)
    with cluster.connect() as conn:
        rows = conn.execute(
            "SELECT rolname, rolvaliduntil FROM pg_roles WHERE rolname = ANY(%s)",
            (list(role_names(plan.identity_name)),),
        ).fetchall()
    assert len(rows) == 2
    assert all(until == later.expires_at for _, until in rows)


# ---- rotation --------------------------------------------------------------------------------


class Pool:
    """Connections opened with the old password, queried from a background thread, plus fresh
    connections opened the way a client does it: with whatever the secret holds now."""

    def __init__(self, aws: AwsClients, plan: ProvisionPlan, size: int = 4) -> None:
        value = secret(aws, plan)
        self._aws, self._plan = aws, plan
        self.conns = [login(value) for _ in range(size)]
        self.errors: list[str] = []
        self.queries = 0
        self.fresh_users: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            for conn in self.conns:
                try:
                    conn.execute("SELECT count(*) FROM docs.articles").fetchone()
                    self.queries += 1
                except psycopg.Error as err:
                    self.errors.append(type(err).__name__)
            if tick % 5 == 0:
                try:
                    with login(secret(self._aws, self._plan)) as fresh:
                        row = fresh.execute("SELECT current_user").fetchone()
                        self.fresh_users.append(str(row[0]) if row else "")
                except psycopg.Error as err:
                    self.errors.append(f"fresh: {type(err).__name__}")
            tick += 1
            time.sleep(0.01)

    def __enter__(self) -> Pool:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_rotation_keeps_an_open_pool_working_then_retires_the_old_login(
    provider: PostgresProvider, aws: AwsClients, cluster: PgCluster
) -> None:
    plan = make_plan(READ_DOCS)
    provisioned(provider, plan)
    old_value = secret(aws, plan)
    first, second = role_names(plan.identity_name)

    with Pool(aws, plan) as pool:
        staged = provider.stage_rotation(plan)
        assert (staged.new_key_id, staged.old_key_id) == (second, first)
        assert provider.stage_rotation(plan) == staged  # a working pending one is reused
        provider.verify_pending(plan)
        promoted = provider.promote(plan)
        assert promoted == staged
        assert provider.promote(plan) == staged  # already promoted: same pair
        deadline = time.monotonic() + 10
        while second not in pool.fresh_users or pool.queries < 40:
            assert time.monotonic() < deadline, "the pool thread made no progress"
            time.sleep(0.02)
    assert pool.errors == []
    assert first in pool.fresh_users  # fresh connections used the old login before promotion
    new_value = secret(aws, plan)
    assert new_value["username"] == second
    assert secret(aws, plan, "AWSPREVIOUS")["username"] == first
    assert not refused(old_value)  # the overlap: the old password still works

    provider.retire(IdentityRef.of_plan(plan), first, delete=False)
    assert refused(old_value)
    with pytest.raises(psycopg.OperationalError):
        pool.conns[0].execute("SELECT 1")  # sessions of the retired login were ended
    with login(new_value) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (second,)
        assert conn.execute("SELECT count(*) FROM docs.articles").fetchone() == (3,)
    for conn in pool.conns:
        conn.close()

    provider.retire(IdentityRef.of_plan(plan), first, delete=True)
    assert first not in roles(cluster, plan.identity_name)
    provider.retire(IdentityRef.of_plan(plan), first, delete=True)  # gone counts as done
    assert not refused(new_value)

    # The next rotation recreates the dropped login role and alternates back to it.
    again = provider.stage_rotation(plan)
    assert (again.new_key_id, again.old_key_id) == (first, second)
    provider.verify_pending(plan)
    assert provider.promote(plan) == again
    with login(secret(aws, plan)) as conn:
        assert conn.execute("SELECT count(*) FROM docs.articles").fetchone() == (3,)


def test_verify_pending_refuses_a_pending_credential_that_does_not_log_in(
    provider: PostgresProvider, aws: AwsClients
) -> None:
    plan = make_plan(READ_DOCS)
    provisioned(provider, plan)
    provider.stage_rotation(plan)
    pending = secret(aws, plan, "AWSPENDING")
    stored = SecretStore(aws.secrets).read(plan.secret_name, "AWSPENDING")
    assert stored == pending
    assert pending["password"] not in repr(stored) + str(stored)
    SecretStore(aws.secrets).put_pending(plan.secret_name, {**pending, "password": "wrong"})
    with pytest.raises(ApplicationError) as excinfo:
        provider.verify_pending(plan)
    assert app_error(excinfo) == ("NotYetValid", False)
    assert "wrong" not in str(excinfo.value)
    SecretStore(aws.secrets).put_pending(plan.secret_name, {**pending, "username": "postgres"})
    with pytest.raises(ApplicationError) as excinfo:
        provider.verify_pending(plan)
    assert app_error(excinfo) == ("WrongIdentity", True)


# ---- decommission ----------------------------------------------------------------------------


def test_decommission_ends_open_sessions_drops_roles_and_deletes_the_secret(
    provider: PostgresProvider, aws: AwsClients, cluster: PgCluster
) -> None:
    plan = make_plan(READ_DOCS)
    provisioned(provider, plan)
    value = secret(aws, plan)
    session = login(value)
    assert session.execute("SELECT count(*) FROM docs.articles").fetchone() == (3,)

    done = provider.disable(IdentityRef.of_plan(plan))
    assert f"login role {value['username']} NOLOGIN" in done
    assert "1 sessions ended" in done
    provider.verify_disabled(IdentityRef.of_plan(plan))
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()
    assert refused(value)

    provider.enable(IdentityRef.of_plan(plan))  # restorable: the delivered credential works again
    assert not refused(value)
    provider.disable(IdentityRef.of_plan(plan))
    provider.verify_disabled(IdentityRef.of_plan(plan))
    assert refused(value)

    result = provider.delete(IdentityRef.of_plan(plan))
    first, second = role_names(plan.identity_name)
    assert result.removed == [
        f"login role {first}",
        f"login role {second}",
        f"group role {plan.identity_name}",
        f"secret {plan.secret_name}",
    ]
    assert roles(cluster, plan.identity_name) == {}
    assert refused(value)
    assert "DeletedDate" in aws.secrets.describe_secret(SecretId=plan.secret_name)
    assert provider.delete(IdentityRef.of_plan(plan)).removed == []  # already gone


def test_an_identity_whose_nhi_is_unknown_is_never_acted_on(
    provider: PostgresProvider, cluster: PgCluster
) -> None:
    """An orphan's reference without an NHI id (its marker unread) matches no marker: the
    provider refuses it rather than take someone else's roles for it."""
    plan = make_plan(READ_DOCS)
    provisioned(provider, plan)
    unknown = IdentityRef(
        platform=Platform.POSTGRES,
        kind=NhiKind.POSTGRES_ROLE,
        name=plan.identity_name,
        target=TARGET,
    )
    for act in (provider.disable, provider.delete):
        with pytest.raises(ApplicationError) as excinfo:
            act(unknown)
        assert app_error(excinfo) == ("IdentityConflict", True)
    found = roles(cluster, plan.identity_name)
    assert plan.identity_name in found and any(found.values())  # nothing dropped or locked
    assert IdentityRef.of_plan(plan).model_copy(update={"nhi_id": None}) == unknown.model_copy(
        update={"secret_name": plan.secret_name}
    )


def test_verify_disabled_refuses_while_a_login_can_log_in(provider: PostgresProvider) -> None:
    plan = make_plan(READ_DOCS)
    provisioned(provider, plan)
    with pytest.raises(ApplicationError) as excinfo:
        provider.verify_disabled(IdentityRef.of_plan(plan))
    assert app_error(excinfo) == ("NotQuarantined", False)


def test_delete_ends_a_live_session_without_a_prior_disable(
    provider: PostgresProvider, aws: AwsClients, cluster: PgCluster
) -> None:
    plan = make_plan(READ_DOCS)
    provisioned(provider, plan)
    value = secret(aws, plan)
    session = login(value)
    result = provider.delete(IdentityRef.of_plan(plan), force_delete_secret=True)
    assert "1 sessions" in result.removed
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()
    assert roles(cluster, plan.identity_name) == {}
    assert SecretStore(aws.secrets).arn(plan.secret_name) is None  # no recovery window


# ---- injection -------------------------------------------------------------------------------

INJECTIONS = [
    (["SELECT"], ["docs.articles; DROP TABLE hr.salaries"], "scope[0].resources[0]"),
    (["SELECT"], ['"docs".x'], "scope[0].resources[0]"),
    (["SELECT, DELETE"], ["docs.articles"], "scope[0].actions[0]"),
    (["ALL PRIVILEGES"], ["docs.articles"], "scope[0].actions[0]"),
    (["ALL"], ["docs.*"], "scope[0].actions[0]"),
    (["SUPERUSER"], ["docs.articles"], "scope[0].actions[0]"),
    (["CREATEROLE"], ["docs"], "scope[0].actions[0]"),
    (["SELECT"], ["docs.*--"], "scope[0].resources[0]"),
    (["SELECT"], ["docs.articles", "hr.salaries --"], "scope[0].resources[1]"),
    (["SELECT"], ["Docs.articles"], "scope[0].resources[0]"),
    (["SELECT"], ["docs. articles"], "scope[0].resources[0]"),
    (["SELECT"], ["docs.articles.x"], "scope[0].resources[0]"),
    (["SELECT"], ["*.*"], "scope[0].resources[0]"),
    (["SELECT"], ["pg_catalog.pg_authid"], "scope[0].resources[0]"),
    (["SELECT"], ["docs"], "scope[0].resources[0]"),
    (["OWNERSHIP"], ["docs.articles"], "scope[0].actions[0]"),
    (["CREATE"], ["docs"], "scope[0].actions[0]"),
    (["SELECT; DROP TABLE hr.salaries"], ["docs.articles"], "scope[0].actions[0]"),
    (["GRANT"], ["docs.articles"], "scope[0].actions[0]"),
]


@pytest.mark.parametrize(("actions", "resources", "field"), INJECTIONS)
def test_injection_is_refused_before_any_connection(
    provider: PostgresProvider,
    targets: Targets,
    cluster: PgCluster,
    actions: list[str],
    resources: list[str],
    field: str,
) -> None:
    statements = scope((actions, resources))
    with pytest.raises(RuleViolation) as violation:
        validate_grants(statements, RULES)
    assert violation.value.field == field

    plan = make_plan(statements)
    with pytest.raises(ApplicationError) as excinfo:
        provider.create(plan)
    assert app_error(excinfo) == ("InvalidScope", True)
    assert field in str(excinfo.value)
    assert targets.gets == 0  # no target resolved, so no connection was opened
    with cluster.connect() as conn:
        assert conn.execute("SELECT to_regclass('hr.salaries') IS NOT NULL").fetchone() == (True,)
    assert roles(cluster, plan.identity_name) == {}


@pytest.mark.parametrize(
    "name",
    ['nhi_x"; DROP TABLE hr.salaries; --', "nhi_UPPER", "nhi-with-dash", "n" * 62, ""],
)
def test_bad_role_names_are_refused_before_any_connection(
    provider: PostgresProvider, targets: Targets, name: str
) -> None:
    plan = make_plan(READ_DOCS).model_copy(update={"identity_name": name})
    for call in (provider.create, provider.deliver, provider.renew):
        with pytest.raises(ApplicationError) as excinfo:
            call(plan)
        assert app_error(excinfo) == ("InvalidPlan", True)
    ref = IdentityRef.of_plan(plan)
    for act in (provider.disable, provider.verify_disabled, provider.enable, provider.delete):
        with pytest.raises(ApplicationError) as excinfo:
            act(ref)
        assert app_error(excinfo) == ("InvalidPlan", True)
    assert targets.gets == 0


def test_unknown_target_is_a_permanent_error(provider: PostgresProvider) -> None:
    plan = make_plan(READ_DOCS).model_copy(update={"target": "nowhere"})
    with pytest.raises(ApplicationError) as excinfo:
        provider.create(plan)
    assert app_error(excinfo) == ("UnknownTarget", True)


def test_unreachable_target_stays_retryable(aws: AwsClients) -> None:
    dead = TargetConnection(
        name=TARGET, host="127.0.0.1", port=1, dbname="x", admin_user="a", password="secret-pw"
    )
    with pytest.raises(ApplicationError) as excinfo:
        PostgresProvider(Targets({TARGET: dead}), aws.secrets).create(make_plan(READ_DOCS))
    assert excinfo.value.non_retryable is False
    assert "Connection refused" in str(excinfo.value)
    assert "secret-pw" not in str(excinfo.value)


def test_grant_rules_and_policy() -> None:
    statements = scope((["select", "Insert"], ["docs.articles", "docs.*"]), (["USAGE"], ["hr"]))
    rules = PolicyRules(
        label="prod",
        allowed=True,
        default_ttl_seconds=1,
        max_lifetime_seconds=1,
        forbidden_actions=("TRUNCATE",),
        sensitive_actions=("insert", "iam:*"),
    )
    assert validate_grants(statements, rules) == ["INSERT"]
    grants = parse_grants(statements)
    assert [(g.privilege, g.schema, g.table) for g in grants] == [
        ("SELECT", "docs", "articles"),
        ("INSERT", "docs", "articles"),
        ("SELECT", "docs", None),
        ("INSERT", "docs", None),
        ("USAGE", "hr", None),
    ]
    assert not is_read_only(statements)
    assert is_read_only(scope((["SELECT", "REFERENCES"], ["docs.*"])))
    with pytest.raises(RuleViolation) as violation:
        validate_grants(scope((["truncate"], ["docs.faq"])), rules)
    assert violation.value.field == "scope[0].actions[0]"
    assert "forbidden by the prod policy" in violation.value.message
    everything = PolicyRules(label="x", allowed=True, default_ttl_seconds=1, max_lifetime_seconds=1)
    assert validate_grants(statements, everything) == []
    assert validate_grants(statements, PolicyRules("x", True, 1, 1, sensitive_actions=("*",))) == [
        "SELECT",
        "INSERT",
        "USAGE",
    ]
    with pytest.raises(RuleViolation):
        validate_grants(statements, PolicyRules("x", True, 1, 1, forbidden_actions=("*",)))
    with pytest.raises(RuleViolation) as violation:
        validate_grants([], rules)
    assert violation.value.field == "scope"
    with pytest.raises(RuleViolation):
        validate_grants(scope(*[(["SELECT"], ["docs.faq"])] * 21), rules)
    name = group_name("nhi", "A Very-Long Agent.Name " * 5, uuid.uuid4())
    assert len(name) <= 61
    assert all(len(r) <= 63 for r in role_names(name))
    assert parse_comment("managed-by=someone-else;nhi-id=x") is None
    assert parse_comment(None) is None


# ---- idempotency -----------------------------------------------------------------------------


def test_create_and_deliver_twice_give_the_same_result(
    provider: PostgresProvider, aws: AwsClients, cluster: PgCluster
) -> None:
    plan = make_plan(READ_DOCS)
    created = provider.create(plan)
    assert provider.create(plan) == created
    assert created.external_id.endswith(f"/{DATABASE}#{plan.identity_name}")
    assert ":" + ADMIN not in created.external_id
    first, second = role_names(plan.identity_name)
    assert roles(cluster, plan.identity_name) == {
        plan.identity_name: False,
        first: False,
        second: False,
    }

    delivered = provider.deliver(plan)
    versions = secret_versions(aws, plan)
    value = secret(aws, plan)
    assert provider.deliver(plan) == delivered
    assert delivered.credential_ref.startswith("arn:aws:secretsmanager:")
    assert secret_versions(aws, plan) == versions
    assert secret(aws, plan) == value
    listed = aws.secrets.list_secrets(Filters=[{"Key": "name", "Values": [plan.secret_name]}])
    assert len(listed["SecretList"]) == 1
    assert roles(cluster, plan.identity_name) == {
        plan.identity_name: False,
        first: True,
        second: False,
    }

    # A secret whose password no longer works (a crash between the two writes) is replaced.
    SecretStore(aws.secrets).put_current(plan.secret_name, {**value, "password": "stale"}, tags={})
    assert provider.deliver(plan) == delivered
    assert not refused(secret(aws, plan))


def test_existing_role_that_is_not_ours_is_a_conflict(
    provider: PostgresProvider, cluster: PgCluster
) -> None:
    plan = make_plan(READ_DOCS)
    with cluster.connect() as conn:
        conn.execute(f"CREATE ROLE {plan.identity_name} NOLOGIN")
        conn.execute(f"COMMENT ON ROLE {plan.identity_name} IS 'finance reporting'")
    with pytest.raises(ApplicationError) as excinfo:
        provider.create(plan)
    assert app_error(excinfo) == ("IdentityConflict", True)
    # Nor is a role marked as another NHI's.
    other = make_plan(READ_DOCS)
    provider.create(other)
    stolen = plan.model_copy(update={"identity_name": other.identity_name})
    with pytest.raises(ApplicationError) as excinfo:
        provider.create(stolen)
    assert app_error(excinfo) == ("IdentityConflict", True)
    with pytest.raises(ApplicationError) as excinfo:
        provider.delete(IdentityRef.of_plan(stolen))
    assert app_error(excinfo) == ("IdentityConflict", True)
    assert other.identity_name in roles(cluster, other.identity_name)


# ---- sweeps ----------------------------------------------------------------------------------


def test_discover_reports_managed_and_unmanaged_roles_and_last_used(
    provider: PostgresProvider, aws: AwsClients, cluster: PgCluster
) -> None:
    plan = make_plan(READ_DOCS)
    arn = provisioned(provider, plan)
    # Named like ours but made by hand (reported), and merely starting with our prefix (not
    # ours to mention, like the cluster's own `nhi_admin`).
    lookalike = f"nhi_manual_{uuid.uuid4().hex}"
    with cluster.connect() as conn:
        conn.execute(f"CREATE ROLE {lookalike} LOGIN")
        conn.execute("DROP ROLE IF EXISTS nhi_manual_reports")
        conn.execute("CREATE ROLE nhi_manual_reports LOGIN")
    paced: list[int] = []

    found = {p.name: p for p in provider.discover({}, lambda: paced.append(1)).identities}
    ours = found[plan.identity_name]
    assert ours.managed and ours.kind == "postgres_role"
    assert (ours.target, ours.nhi_id, ours.secret_arn) == (TARGET, str(plan.nhi_id), arn)
    assert abs(datetime.now(UTC) - ours.created_at) < timedelta(minutes=1)
    manual = found[lookalike]
    assert not manual.managed and manual.target == TARGET
    assert "nhi_manual_reports" not in found and ADMIN not in found
    assert not set(role_names(plan.identity_name)) & set(found)  # logins are part of the group
    assert len(paced) >= 3
    known = provider.discover(
        {plan.identity_name: Known("active", tuple(plan.scope))}, lambda: None
    ).identities
    assert next(p for p in known if p.name == plan.identity_name).secret_arn is None

    assert provider.last_used(NhiKind.POSTGRES_ROLE, plan.identity_name, TARGET) is None
    with login(secret(aws, plan)):
        used = provider.last_used(NhiKind.POSTGRES_ROLE, plan.identity_name, TARGET)
        assert used is not None and abs(datetime.now(UTC) - used) < timedelta(seconds=5)
        live = {p.name: p for p in provider.discover({}, lambda: None).identities}
        assert live[plan.identity_name].last_used_at is not None


def test_discover_reports_drift_from_the_granted_scope_and_renew_reverts_it(
    provider: PostgresProvider, cluster: PgCluster
) -> None:
    plan = make_plan(scope((["SELECT"], ["docs.articles"])))
    provisioned(provider, plan)
    known = {plan.identity_name: Known("active", tuple(plan.scope))}

    def drift() -> str | None:
        found = provider.discover(known, lambda: None).identities
        return next(p for p in found if p.name == plan.identity_name).drift

    assert drift() is None, "exactly the scope: no drift"
    # Someone uses the admin account to widen the NHI by hand, and the data owner adds more.
    with cluster.connect(ADMIN, cluster.admin_password) as conn:
        conn.execute(f"GRANT INSERT ON docs.articles TO {plan.identity_name}")
    with cluster.connect() as conn:
        conn.execute(f"GRANT SELECT ON hr.salaries TO {plan.identity_name}")
        conn.execute(f"GRANT USAGE ON SCHEMA hr TO {plan.identity_name}")
    found = drift()
    assert found is not None
    assert "INSERT on docs.articles" in found and "SELECT on hr.salaries" in found
    assert "USAGE on schema hr" in found
    # A status other than active is not judged (a quarantined NHI holds its grants).
    quiet = provider.discover(
        {plan.identity_name: Known("quarantined", tuple(plan.scope))}, lambda: None
    ).identities
    assert next(p for p in quiet if p.name == plan.identity_name).drift is None

    # Renewal (what a sweep's revert runs) puts back exactly the scope, where the admin may:
    # its own grant goes; another grantor's stays, and is reported again by the next sweep.
    provider.renew(plan)
    after = drift()
    assert after is not None and "INSERT on docs.articles" not in after
    assert "SELECT on hr.salaries" in after
    with cluster.connect() as conn:
        conn.execute(f"REVOKE SELECT ON hr.salaries FROM {plan.identity_name}")
        conn.execute(f"REVOKE USAGE ON SCHEMA hr FROM {plan.identity_name}")
    assert drift() is None


class Silent:
    """A TCP listener that accepts connections and never answers: a target whose host takes
    the connection and then hangs (a wedged server, a half-open firewall), so a client waits
    for its connect timeout. It remembers which accepted connections the client still holds."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            conn.setblocking(False)
            self.accepted.append(conn)

    def held(self) -> int:
        """Accepted connections the client has not given up on (no EOF from its side)."""
        open_ = 0
        for conn in list(self.accepted):
            try:
                while conn.recv(4096):  # its startup or SSL request, unanswered
                    pass
            except BlockingIOError:
                open_ += 1  # nothing more to read and no EOF: still waiting on us
            except OSError:
                pass
        return open_

    def close(self) -> None:
        self._server.close()
        for conn in self.accepted:
            conn.close()


def test_a_sweep_lists_targets_at_once_so_hanging_ones_do_not_add_up(
    cluster: PgCluster, targets: Targets, aws: AwsClients
) -> None:
    """Two targets that take the connection and never answer, beside a healthy one: both are
    held open at the same moment (listed at once, not one connect timeout after the other),
    both are reported unreachable once they drop the connections, and the healthy target is
    listed all the same."""
    provider_for_test = PostgresProvider(targets, aws.secrets)
    plan = make_plan(READ_DOCS)
    provisioned(provider_for_test, plan)
    silent = Silent()
    hanging = {
        f"hang{i}": TargetConnection(
            name=f"hang{i}",
            host="127.0.0.1",
            port=silent.port,
            dbname=DATABASE,
            admin_user=ADMIN,
            password="unused",
            connection_limit=10,
        )
        for i in (1, 2)
    }
    every = Targets({TARGET: targets.get(TARGET), **hanging})
    provider = PostgresProvider(every, aws.secrets)
    result: dict[str, Any] = {}
    sweep = threading.Thread(
        target=lambda: result.update(found=provider.discover({}, lambda: None)), daemon=True
    )
    try:
        sweep.start()
        deadline = time.monotonic() + 8  # under the 10 s connect timeout: one at a time fails
        while silent.held() < 2:
            assert time.monotonic() < deadline, (
                f"the hanging targets were not listed at once ({len(silent.accepted)} accepted)"
            )
            time.sleep(0.05)
    finally:
        silent.close()  # both listings fail now, at once
        sweep.join(timeout=30)
    found = result["found"]
    assert set(found.unreachable) == set(hanging), found.unreachable
    listed = {p.name: p for p in found.identities}
    assert listed[plan.identity_name].target == TARGET
