"""Postgres targets: registering, listing and removing them over the API, resolving their admin
passwords, and how postgres_role requests are checked against them."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from models.enums import NhiKind, Platform
from models.orm import AuditEvent, Nhi, Target
from models.schemas import AgentCreate, NhiCreate, TargetIn
from nhi import inventory
from nhi.aws import AwsClients
from nhi.config import PostgresTargetSetting, Settings
from nhi.db import transaction
from nhi.policy import RuleViolation
from nhi.targets import (
    TargetConnection,
    TargetRegistry,
    UnknownTarget,
    find_target,
    parse_dsn,
    password_ref,
    validate_password_ref,
)
from tests.conftest import Service
from tests.helpers import ROLE_SCOPE, TRUST, ApiServer, agent_body, bearer, unique

# Never stored or shown anywhere: every test below checks for it.
PASSWORD = f"pw-{uuid.uuid4().hex}"
READ = [{"actions": ["SELECT"], "resources": ["docs.articles"]}]


def _name() -> str:
    return unique("tgt")


def _body(name: str, **overrides: Any) -> dict[str, Any]:
    """A valid target body; an override of None leaves that field out."""
    body: dict[str, Any] = {
        "name": name,
        "dsn": "postgresql://nhi_admin@db.internal:6432/app",
        "password_env": "DOCS_DB_PASSWORD",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def _register(sessions: sessionmaker[Session], settings: Settings, **overrides: Any) -> str:
    name = _name()
    with transaction(sessions) as s:
        inventory.add_target(s, settings, TargetIn(**_body(name, **overrides)), "test:setup")
    return name


def _target_state(sessions: sessionmaker[Session]) -> tuple[Any, ...]:
    with transaction(sessions) as s:
        return (
            tuple(s.scalars(select(Target.name).order_by(Target.name))),
            s.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.subject_type == "target")
            ),
        )


def _dump(sessions: sessionmaker[Session], table: str) -> str:
    with transaction(sessions) as s:
        return " ".join(str(r) for r in s.execute(text(f"SELECT t::text FROM {table} t")).scalars())


@pytest.fixture
async def admin(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    token = service.token("targets-admin", "admin")
    async with httpx.AsyncClient(base_url=service.url, headers=bearer(token), timeout=30) as c:
        yield c


@pytest.fixture
async def platform(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    token = service.token("targets-platform", "platform", teams=["search"])
    async with httpx.AsyncClient(base_url=service.url, headers=bearer(token), timeout=30) as c:
        yield c


# ---- the API --------------------------------------------------------------------------------


async def test_target_is_added_listed_and_removed(
    admin: httpx.AsyncClient, platform: httpx.AsyncClient, sessions: sessionmaker[Session]
) -> None:
    name = _name()
    created = await admin.post("/v1/targets", json=_body(name, sslmode="require"))
    assert created.status_code == 201, created.text
    assert created.json() == {
        "name": name,
        "host": "db.internal",
        "port": 6432,
        "dbname": "app",
        "admin_user": "nhi_admin",
        "password_ref": "env:DOCS_DB_PASSWORD",
        "sslmode": "require",
        "connection_limit": 10,
        "source": "inventory",
        "created_by": "token:targets-admin",
        "created_at": created.json()["created_at"],
    }
    listed = await platform.get("/v1/targets")
    assert listed.status_code == 200
    assert name in [t["name"] for t in listed.json()]

    again = await admin.post("/v1/targets", json=_body(name, password_env="OTHER"))
    assert again.status_code == 409 and again.json()["field"] == "name"

    removed = await admin.delete(f"/v1/targets/{name}")
    assert removed.status_code == 200 and removed.json()["name"] == name
    assert name not in [t["name"] for t in (await platform.get("/v1/targets")).json()]
    assert (await admin.delete(f"/v1/targets/{name}")).status_code == 404

    with transaction(sessions) as s:
        trail = [
            (e.event, e.actor)
            for e in s.scalars(
                select(AuditEvent)
                .where(AuditEvent.subject_type == "target", AuditEvent.subject_id == name)
                .order_by(AuditEvent.id)
            )
        ]
    assert trail == [
        ("target.added", "token:targets-admin"),
        ("target.removed", "token:targets-admin"),
    ]


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"dsn": f"postgresql://nhi_admin:{PASSWORD}@db:5432/app"}, "dsn", "--password-env"),
        ({"dsn": f"postgresql://nhi_admin@db:5432/app?password={PASSWORD}"}, "dsn", "password"),
        ({"dsn": f"postgres://nhi_admin:{PASSWORD}@db/app"}, "dsn", "password"),
        ({"dsn": "postgresql://db:5432/app"}, "dsn", "admin user"),
        ({"dsn": "postgresql://nhi_admin@db:5432/"}, "dsn", "one database"),
        ({"dsn": "mysql://nhi_admin@db:3306/app"}, "dsn", "postgresql://"),
        ({"dsn": "postgresql://nhi_admin@db:5432/app?sslmode=require"}, "dsn", "sslmode"),
        ({"name": "Docs"}, "name", "pattern"),
        ({"name": "1docs"}, "name", "pattern"),
        ({"name": "d" * 64}, "name", "pattern"),
        ({"password_secret": "arn:aws:secretsmanager:us-east-1:123456789012:secret:x"},
         "password_secret", "exactly one"),
        ({"password_env": None}, "password_env", "exactly one"),
        ({"password_env": "NOT A VAR"}, "password_env", "environment variable"),
        ({"password_env": None, "password_secret": "bad secret name!"}, "password_secret",
         "Secrets Manager"),
        ({"sslmode": "sometimes"}, "sslmode", ""),
        ({"connection_limit": 0}, "connection_limit", ""),
        ({"connection_limit": 1001}, "connection_limit", ""),
        ({"password": PASSWORD}, "password", ""),
    ],
)  # fmt: skip
async def test_bad_target_is_refused_naming_the_field_and_changes_nothing(
    admin: httpx.AsyncClient,
    sessions: sessionmaker[Session],
    overrides: dict[str, Any],
    field: str,
    words: str,
) -> None:
    before = _target_state(sessions)
    response = await admin.post("/v1/targets", json=_body(_name()) | overrides)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert words in response.json()["detail"]
    assert PASSWORD not in response.text
    assert _target_state(sessions) == before
    assert PASSWORD not in _dump(sessions, "audit_events")


async def test_target_in_use_or_from_settings_is_not_removed(
    admin: httpx.AsyncClient, service: Service, sessions: sessionmaker[Session]
) -> None:
    name = _register(sessions, service.settings)
    now = datetime.now(UTC)
    with transaction(sessions) as s:
        agent = inventory.create_agent(s, AgentCreate(**agent_body()), "test:setup")
        nhi = Nhi(
            agent_id=agent.id, platform="postgres", kind="postgres_role", target=name,
            name=f"nhi_tgt_{uuid.uuid4().hex}", granted_scope=READ, allowed_cidrs=[],
            status="active", requested_by="test", expires_at=now + timedelta(days=5),
            max_lifetime_at=now + timedelta(days=90),
        )  # fmt: skip
        s.add(nhi)
    before = _target_state(sessions)
    refused = await admin.delete(f"/v1/targets/{name}")
    assert refused.status_code == 409 and "decommission them first" in refused.json()["detail"]
    assert _target_state(sessions) == before
    with transaction(sessions) as s:
        s.get_one(Nhi, nhi.id).status = "decommissioned"
    assert (await admin.delete(f"/v1/targets/{name}")).status_code == 200

    # Targets fixed in settings are listed, win over the table, and stay.
    settings = service.settings.model_copy(
        update={
            "postgres_targets": {
                "from-settings": PostgresTargetSetting(
                    dsn="postgresql://ops@10.0.0.7/warehouse",
                    password_secret="arn:aws:secretsmanager:us-east-1:123456789012:secret:wh",
                    connection_limit=3,
                )
            }
        }
    )
    with ApiServer(create_app(settings)) as server:
        token = service.token("targets-admin", "admin")
        async with httpx.AsyncClient(base_url=server.url, headers=bearer(token)) as http:
            listed = {t["name"]: t for t in (await http.get("/v1/targets")).json()}
            assert listed["from-settings"] == {
                "name": "from-settings", "host": "10.0.0.7", "port": 5432, "dbname": "warehouse",
                "admin_user": "ops",
                "password_ref": "secret:arn:aws:secretsmanager:us-east-1:123456789012:secret:wh",
                "sslmode": "prefer", "connection_limit": 3, "source": "settings",
                "created_by": None, "created_at": None,
            }  # fmt: skip
            before = _target_state(sessions)
            removed = await http.delete("/v1/targets/from-settings")
            assert removed.status_code == 409 and "NHI_POSTGRES_TARGETS" in removed.json()["detail"]
            added = await http.post("/v1/targets", json=_body("from-settings"))
            assert added.status_code == 409 and added.json()["field"] == "name"
            assert _target_state(sessions) == before


# ---- password resolution --------------------------------------------------------------------


def test_registry_resolves_the_password_from_the_environment(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    name = _register(sessions, settings, password_env="NHI_TEST_DOCS_PW", sslmode="verify-full")
    registry = TargetRegistry(sessions, settings, None, environ={"NHI_TEST_DOCS_PW": PASSWORD})
    conn = registry.get(name)
    assert conn == TargetConnection(
        name=name, host="db.internal", port=6432, dbname="app", admin_user="nhi_admin",
        password=PASSWORD, sslmode="verify-full", connection_limit=10,
    )  # fmt: skip
    assert PASSWORD not in repr(conn) and PASSWORD not in conn.public_dsn("agent")
    assert name in registry.names()

    unset = TargetRegistry(sessions, settings, None, environ={})
    with pytest.raises(UnknownTarget, match=r"NHI_TEST_DOCS_PW.* is not set"):
        unset.get(name)
    with pytest.raises(UnknownTarget, match="no target named 'never-registered'"):
        registry.get("never-registered")
    assert PASSWORD not in _dump(sessions, "targets")


def test_registry_resolves_the_password_from_secrets_manager(
    sessions: sessionmaker[Session], settings: Settings, aws: AwsClients
) -> None:
    plain = aws.secrets.create_secret(Name=unique("tgt-plain"), SecretString=PASSWORD)
    rds = aws.secrets.create_secret(
        Name=unique("tgt-rds"),
        SecretString=json.dumps({"username": "nhi_admin", "password": PASSWORD, "port": 5432}),
    )
    nopass = aws.secrets.create_secret(
        Name=unique("tgt-nopass"), SecretString=json.dumps({"username": "nhi_admin"})
    )
    registry = TargetRegistry(sessions, settings, aws.secrets)
    by_arn = _register(sessions, settings, password_env=None, password_secret=plain["ARN"])
    by_name = _register(sessions, settings, password_env=None, password_secret=rds["Name"])
    assert registry.get(by_arn).password == PASSWORD
    assert registry.get(by_name).password == PASSWORD

    broken = {
        _register(sessions, settings, password_env=None, password_secret=nopass["ARN"]): "no \"password\" key",
        _register(sessions, settings, password_env=None, password_secret=unique("missing")): "ResourceNotFound",
    }  # fmt: skip
    for name, words in broken.items():
        with pytest.raises(UnknownTarget, match=words) as err:
            registry.get(name)
        assert PASSWORD not in str(err.value)
    without_client = TargetRegistry(sessions, settings, None)
    with pytest.raises(UnknownTarget, match="no client"):
        without_client.get(by_arn)


def test_settings_targets_win_over_the_table(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    name = _register(sessions, settings, password_env="TABLE_PW")
    with_settings = settings.model_copy(
        update={
            "postgres_targets": {
                name: PostgresTargetSetting(
                    dsn="postgresql://ops@settings-db/app", password_env="SETTINGS_PW"
                )
            }
        }
    )
    environ = {"TABLE_PW": "table", "SETTINGS_PW": PASSWORD}
    conn = TargetRegistry(sessions, with_settings, None, environ=environ).get(name)
    assert (conn.host, conn.admin_user, conn.password) == ("settings-db", "ops", PASSWORD)
    assert TargetRegistry(sessions, with_settings, None).names().count(name) == 1
    with transaction(sessions) as s:
        assert find_target(s, with_settings, name) is not None
        assert find_target(s, with_settings, "never-registered") is None


def test_settings_refuse_a_dsn_with_a_password_without_quoting_it() -> None:
    from pydantic import ValidationError

    raw = {"docs": {"dsn": f"postgresql://a:{PASSWORD}@db/app", "password_env": "X"}}
    with pytest.raises(ValidationError) as err:
        Settings(postgres_targets=raw)
    assert "postgres_targets.docs.dsn" in str(err.value) and PASSWORD not in str(err.value)
    with pytest.raises(ValidationError, match="exactly one"):
        Settings(postgres_targets={"docs": {"dsn": "postgresql://a@db/app"}})
    with pytest.raises(ValidationError, match="pattern"):
        Settings(postgres_targets={"Docs": {"dsn": "postgresql://a@db/app", "password_env": "X"}})


def test_dsn_and_password_ref_helpers() -> None:
    parsed = parse_dsn("postgresql://nhi_admin@[::1]/app")
    assert (parsed.host, parsed.port, parsed.dbname, parsed.admin_user) == (
        "::1", 5432, "app", "nhi_admin",
    )  # fmt: skip
    for bad in (
        "postgresql://nhi_admin:@db/app",
        f"postgresql://nhi_admin:{PASSWORD}@db/app",
        f"postgresql://db/app?user=nhi_admin&password={PASSWORD}",
    ):
        with pytest.raises(RuleViolation, match="--password-env") as err:
            parse_dsn(bad)
        assert PASSWORD not in str(err.value)
    with pytest.raises(RuleViolation, match="port"):
        parse_dsn("postgresql://a@db:99999/app")
    # A Unix socket directory, percent-encoded as libpq takes it, and back in the public DSN.
    socket = parse_dsn("postgresql://nhi_admin@%2Fvar%2Frun%2Fpostgresql:5433/app")
    assert (socket.host, socket.port) == ("/var/run/postgresql", 5433)
    public = TargetConnection(
        name="local", host=socket.host, port=5433, dbname="app", admin_user="a", password="x"
    ).public_dsn()
    assert public == "postgresql://%2Fvar%2Frun%2Fpostgresql:5433/app"
    for bad in ("postgresql://a@%2Ftmp%3Bdrop/app", "postgresql://a@%2Ftmp%20x/app"):
        with pytest.raises(RuleViolation, match="absolute path"):
            parse_dsn(bad)
    assert password_ref("DOCS_PW", None) == "env:DOCS_PW"
    assert password_ref(None, "prod/docs-admin") == "secret:prod/docs-admin"
    assert validate_password_ref("env:DOCS_PW") == "env:DOCS_PW"
    for bad in ("DOCS_PW", "env:", f"plain:{PASSWORD}", "secret:has space"):
        with pytest.raises(RuleViolation):
            validate_password_ref(bad)


# ---- postgres_role requests -----------------------------------------------------------------


async def _agent(http: httpx.AsyncClient) -> str:
    response = await http.post("/v1/agents", json=agent_body())
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _pg(target: str | None, scope: list[dict[str, Any]] = READ, **extra: Any) -> dict[str, Any]:
    return {
        "platform": "postgres",
        "kind": "postgres_role",
        "scope": scope,
        "target": target,
    } | extra


@pytest.mark.parametrize(
    ("make_body", "field"),
    [
        (lambda t: _pg(None), "target"),
        (lambda t: _pg("never-registered"), "target"),
        (lambda t: {"platform": "aws", "kind": "iam_role", "scope": ROLE_SCOPE,
                    "trust_principal": TRUST, "target": t}, "target"),
        (lambda t: {"platform": "aws", "kind": "postgres_role", "scope": READ, "target": t}, "kind"),
        (lambda t: _pg(t, allowed_cidrs=["10.0.0.0/8"]), "allowed_cidrs"),
        (lambda t: _pg(t, trust_principal=TRUST), "trust_principal"),
        (lambda t: _pg(t, [{"actions": ["SELECT"], "resources": ["docs.articles; DROP TABLE users"]}]),
         "scope[0].resources[0]"),
        (lambda t: _pg(t, [{"actions": ["SELECT"], "resources": ['docs."Articles"']}]),
         "scope[0].resources[0]"),
        (lambda t: _pg(t, [{"actions": ["SELECT"], "resources": ["pg_catalog.pg_authid"]}]),
         "scope[0].resources[0]"),
        (lambda t: _pg(t, [{"actions": ["SELECT, DELETE"], "resources": ["docs.articles"]}]),
         "scope[0].actions[0]"),
        (lambda t: _pg(t, [{"actions": ["SELECT", "SELECT; ALTER ROLE x SUPERUSER"],
                            "resources": ["docs.articles"]}]), "scope[0].actions[1]"),
        (lambda t: _pg(t, [{"actions": ["SUPERUSER"], "resources": ["docs"]}]), "scope[0].actions[0]"),
        (lambda t: _pg(t, [{"actions": ["ALL"], "resources": ["docs.*"]}]), "scope[0].actions[0]"),
        (lambda t: _pg(t, [{"actions": ["CREATE"], "resources": ["docs"]}]), "scope[0].actions[0]"),
        (lambda t: _pg(t, [{"actions": ["s3:GetObject"], "resources": ["docs.articles"]}]),
         "scope[0].actions[0]"),
    ],
)  # fmt: skip
async def test_refused_postgres_requests_name_the_field_and_create_nothing(
    platform: httpx.AsyncClient,
    service: Service,
    sessions: sessionmaker[Session],
    make_body: Any,
    field: str,
) -> None:
    target = _register(sessions, service.settings)
    agent_id = await _agent(platform)
    response = await platform.post(f"/v1/agents/{agent_id}/nhis", json=make_body(target))
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field, response.json()
    with transaction(sessions) as s:
        assert s.scalar(select(func.count()).select_from(Nhi).where(Nhi.target == target)) == 0
        assert (
            s.scalar(
                select(func.count()).select_from(Nhi).where(Nhi.agent_id == uuid.UUID(agent_id))
            )
            == 0
        )


async def test_write_privileges_wait_for_an_approver(
    platform: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    service: Service,
    sessions: sessionmaker[Session],
) -> None:
    target = _register(sessions, service.settings)
    agent_id = await _agent(platform)
    scope = [
        {"actions": ["USAGE"], "resources": ["docs"]},
        {"actions": ["SELECT", "INSERT"], "resources": ["docs.articles", "docs.*"]},
    ]
    accepted = await platform.post(f"/v1/agents/{agent_id}/nhis", json=_pg(target, scope))
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["status"] == "pending_approval"
    nhi = (await platform.get(f"/v1/nhis/{accepted.json()['id']}")).json()
    assert nhi["target"] == target and nhi["platform"] == "postgres"
    assert "INSERT" in nhi["status_reason"] and "SELECT" not in nhi["status_reason"]
    assert len(nhi["name"]) <= 61 and nhi["name"].replace("_", "").isalnum()
    assert nhi["name"] == nhi["name"].lower() and nhi["allowed_cidrs"] == []
    events = (await platform.get(f"/v1/nhis/{nhi['id']}/events")).json()
    assert events[0]["details"]["target"] == target

    # A request not yet decided keeps its target.
    refused = await admin.delete(f"/v1/targets/{target}")
    assert refused.status_code == 409


def test_read_only_postgres_request_needs_no_approver(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    target = _register(sessions, settings)
    # Rolled back at the end: a requested NHI with no workflow should not outlive the test.
    with sessions() as s:
        agent = inventory.create_agent(s, AgentCreate(**agent_body()), "test:platform")
        nhi, sensitive = inventory.request_nhi(
            s,
            settings,
            agent.id,
            NhiCreate(
                platform=Platform.POSTGRES,
                kind=NhiKind.POSTGRES_ROLE,
                scope=READ,
                target=target,
                ttl="7d",
            ),
            "test:platform",
        )
        assert sensitive == [] and nhi.status == "requested" and nhi.target == target
        assert nhi.name.startswith(f"{settings.name_prefix}_") and len(nhi.name) <= 61
        s.rollback()


# ---- policies -------------------------------------------------------------------------------


async def test_postgres_policies_name_privileges(admin: httpx.AsyncClient) -> None:
    seeded = {(p["kind"], p["environment"]): p for p in (await admin.get("/v1/policies")).json()}
    staging = seeded[("postgres_role", "staging")]
    assert staging["forbidden_actions"] == [
        "SUPERUSER", "CREATEROLE", "CREATEDB", "BYPASSRLS", "REPLICATION", "CREATE", "ALL",
    ]  # fmt: skip
    assert staging["sensitive_actions"] == [
        "INSERT", "UPDATE", "DELETE", "TRUNCATE", "TRIGGER", "REFERENCES",
    ]  # fmt: skip
    assert staging["rotation_period_seconds"] == 30 * 86400
    assert seeded[("postgres_role", "prod")]["grace_period_seconds"] == 7 * 86400

    policy = {
        "platform": "postgres", "kind": "postgres_role", "environment": "staging",
        "allowed": True, "default_ttl": staging["default_ttl_seconds"],
        "max_lifetime": staging["max_lifetime_seconds"],
        "rotation_period": staging["rotation_period_seconds"],
        "reminder_offsets": staging["reminder_offsets_seconds"],
        "grace_period": staging["grace_period_seconds"],
        "forbidden_actions": staging["forbidden_actions"],
        "sensitive_actions": staging["sensitive_actions"],
    }  # fmt: skip
    for bad_field, bad in (("forbidden_actions", "iam:*"), ("sensitive_actions", "insert")):
        response = await admin.put(
            "/v1/policies", json={"policies": [policy | {bad_field: [*policy[bad_field], bad]}]}
        )
        assert response.status_code == 422, response.text
        n = len(policy[bad_field])
        assert response.json()["field"] == f"policies[0].{bad_field}[{n}]"
    # AWS policies keep IAM patterns.
    aws = await admin.put(
        "/v1/policies",
        json={"policies": [{**policy, "platform": "aws", "kind": "iam_role",
                            "forbidden_actions": ["SUPERUSER"], "sensitive_actions": []}]},
    )  # fmt: skip
    assert aws.status_code == 422
    applied = await admin.put("/v1/policies", json={"policies": [policy]})
    assert applied.status_code == 200, applied.text
    assert applied.json()[0]["forbidden_actions"] == staging["forbidden_actions"]
