"""Postgres targets: registering, listing and removing them over the API, resolving their admin
passwords, and how postgres_role requests are checked against them."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from models.enums import NhiKind, Platform
from models.orm import AuditEvent, Nhi, Target
from models.schemas import AgentCreate, NhiCreate, TargetIn
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import PostgresTargetSetting, Settings
from nhi.infra.db import transaction
from nhi.rules.policy import RuleViolation
from nhi.rules.targets import (
    host_allowed,
    parse_dsn,
    password_ref,
    secret_name,
    validate_password_ref,
)
from nhi.services import agents, nhis, targets
from nhi.services.target_registry import (
    TargetConnection,
    TargetRefused,
    TargetRegistry,
    UnknownTarget,
    find_target,
)
from tests.conftest import Service
from tests.helpers import (
    ROLE_SCOPE,
    TRUST,
    ApiServer,
    agent_body,
    bearer,
    eventually,
    unique,
)
from tests.slack_emulator import SlackEmulator

# Never stored or shown anywhere: every test below checks for it.
PASSWORD = f"pw-{uuid.uuid4().hex}"
READ = [{"actions": ["SELECT"], "resources": ["docs.articles"]}]


def _name() -> str:
    return unique("tgt")


# Where targets may point in these tests (NHI_TARGET_ALLOWED_HOSTS).
ALLOWED_HOSTS = ["db.internal", "*.db.example.com", "10.0.0.*", "/var/run/postgresql"]
SECURITY_CHANNEL = "#nhi-security"


def _ruled(settings: Settings, **more: Any) -> Settings:
    """The suite's settings with these tests' target hosts allowed, outside dev mode."""
    return settings.model_copy(
        update={"target_allowed_hosts": ALLOWED_HOSTS, "dev_mode": False} | more
    )


def _body(name: str, **overrides: Any) -> dict[str, Any]:
    """A valid target body; an override of None leaves that field out."""
    body: dict[str, Any] = {
        "name": name,
        "dsn": "postgresql://nhi_admin@db.internal:6432/app",
        "password_env": "NHI_TARGET_PASSWORD_DOCS",
        "sslmode": "verify-full",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def _register(sessions: sessionmaker[Session], settings: Settings, **overrides: Any) -> str:
    """A target row written straight through the inventory (no API rules), as before them."""
    name = _name()
    with transaction(sessions) as s:
        targets.add_target(s, settings, TargetIn(**_body(name, **overrides)), "test:setup")
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


@pytest.fixture(scope="module")
def slack() -> Iterator[SlackEmulator]:
    with SlackEmulator(token="xoxb-test") as emulator:
        yield emulator


@pytest.fixture(scope="module")
def ruled_api(service: Service, slack: SlackEmulator) -> Iterator[str]:
    """The API with target hosts allowed and Slack configured (alerts land in the emulator)."""
    settings = _ruled(
        service.settings,
        slack_bot_token=SecretStr("xoxb-test"),
        slack_api_url=slack.url,
        slack_security_channel=SECURITY_CHANNEL,
    )
    with ApiServer(create_app(settings)) as server:
        yield server.url


@pytest.fixture
async def admin(service: Service, ruled_api: str) -> AsyncIterator[httpx.AsyncClient]:
    token = service.token("targets-admin", "admin")
    async with httpx.AsyncClient(base_url=ruled_api, headers=bearer(token), timeout=30) as c:
        yield c


@pytest.fixture
async def platform(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    token = service.token("targets-platform", "platform", teams=["search"])
    async with httpx.AsyncClient(base_url=service.url, headers=bearer(token), timeout=30) as c:
        yield c


# ---- the API --------------------------------------------------------------------------------


async def test_target_is_added_listed_and_removed(
    admin: httpx.AsyncClient,
    platform: httpx.AsyncClient,
    sessions: sessionmaker[Session],
    slack: SlackEmulator,
) -> None:
    name = _name()
    # Without an sslmode, the server is verified (verify-full) outside dev mode.
    created = await admin.post("/v1/targets", json=_body(name, sslmode=None))
    assert created.status_code == 201, created.text
    assert created.json() == {
        "name": name,
        "host": "db.internal",
        "port": 6432,
        "dbname": "app",
        "admin_user": "nhi_admin",
        "password_ref": "env:NHI_TARGET_PASSWORD_DOCS",
        "sslmode": "verify-full",
        "connection_limit": 10,
        "source": "inventory",
        "created_by": "token:targets-admin",
        "created_at": created.json()["created_at"],
    }
    listed = await platform.get("/v1/targets")
    assert listed.status_code == 200
    assert name in [t["name"] for t in listed.json()]

    again = await admin.post(
        "/v1/targets", json=_body(name, password_env="NHI_TARGET_PASSWORD_OTHER")
    )
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
    # Both were alerted to the security channel, naming the target, who and the password's
    # source (never a password).
    alerts = [
        c.args["text"]
        for c in slack.calls_to("chat.postMessage")
        if c.args.get("channel") == SECURITY_CHANNEL and name in c.args.get("text", "")
    ]
    assert len(alerts) == 2, alerts
    assert "registered by token:targets-admin" in alerts[0] and "removed" in alerts[1]
    assert "env:NHI_TARGET_PASSWORD_DOCS" in alerts[0] and "db.internal:6432/app" in alerts[0]


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"dsn": f"postgresql://nhi_admin:{PASSWORD}@db:5432/app"}, "dsn", "--password-env"),
        ({"dsn": f"postgresql://nhi_admin@db:5432/app?password={PASSWORD}"}, "dsn", "password"),
        ({"dsn": f"postgres://nhi_admin:{PASSWORD}@db/app"}, "dsn", "password"),
        ({"dsn": "postgresql://db:5432/app"}, "dsn", "admin user"),
        ({"dsn": "postgresql://nhi_admin@db:5432/"}, "dsn", "one database"),
        ({"dsn": "mysql://nhi_admin@db:3306/app"}, "dsn", ""),
        ({"dsn": "postgresql://nhi_admin@db:5432/app?sslmode=require"}, "dsn", "sslmode"),
        ({"name": "Docs"}, "name", "pattern"),
        ({"name": "1docs"}, "name", "pattern"),
        ({"name": "d" * 64}, "name", "pattern"),
        ({"password_secret": "arn:aws:secretsmanager:us-east-1:123456789012:secret:x"},
         "password_secret", "exactly one"),
        ({"password_env": None}, "password_env", "exactly one"),
        ({"password_env": "NOT A VAR"}, "password_env", ""),
        ({"password_env": None, "password_secret": "bad secret name!"}, "password_secret", ""),
        ({"sslmode": "sometimes"}, "sslmode", ""),
        ({"connection_limit": 0}, "connection_limit", ""),
        ({"connection_limit": 1001}, "connection_limit", ""),
        ({"password": PASSWORD}, "password", ""),
        # Targets cannot exfiltrate: hosts only from NHI_TARGET_ALLOWED_HOSTS...
        ({"dsn": "postgresql://nhi_admin@evil.example.net:5432/app"}, "dsn", "not allowed"),
        ({"dsn": "postgresql://nhi_admin@db.internal.evil.example.net/app"}, "dsn", "not allowed"),
        ({"dsn": "postgresql://nhi_admin@10.0.1.5/app"}, "dsn", "NHI_TARGET_ALLOWED_HOSTS"),
        ({"dsn": "postgresql://nhi_admin@%2Ftmp:5432/app"}, "dsn", "not allowed"),
        ({"dsn": "postgresql://nhi_admin@localhost:5432/app"}, "dsn", "not allowed"),
        # ... passwords only from the target prefix or NHI_TARGET_PASSWORD_* ...
        ({"password_env": None, "password_secret": "prod/docs-admin"}, "password_secret",
         "NHI_TARGET_SECRET_PREFIX"),
        ({"password_env": None,
          "password_secret": "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/x-AbCdEf"},
         "password_secret", "NHI_TARGET_SECRET_PREFIX"),
        ({"password_env": None,
          "password_secret": "arn:aws:secretsmanager:us-east-1:123456789012:secret:nhi-targets"},
         "password_secret", "NHI_TARGET_SECRET_PREFIX"),
        ({"password_env": None, "password_secret": "nhi-lifecycle/dev/kb-rag/x"},
         "password_secret", "delivery prefix"),
        ({"password_env": None, "password_secret": "NHI-Lifecycle/dev/kb-rag/x"},
         "password_secret", "delivery prefix"),
        ({"password_env": "AWS_SECRET_ACCESS_KEY"}, "password_env", "NHI_TARGET_PASSWORD_"),
        ({"password_env": "NHI_SLACK_BOT_TOKEN"}, "password_env", "NHI_TARGET_PASSWORD_"),
        ({"password_env": "NHI_TARGET_PASSWORD_"}, "password_env", "NHI_TARGET_PASSWORD_"),
        ({"password_env": "nhi_target_password_docs"}, "password_env", "NHI_TARGET_PASSWORD_"),
        # ... and a verified server outside dev mode.
        ({"sslmode": "require"}, "sslmode", "verify-full"),
        ({"sslmode": "prefer"}, "sslmode", "verify-full"),
        ({"sslmode": "disable"}, "sslmode", "verify-full"),
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
        agent = agents.create_agent(s, AgentCreate(**agent_body()), "test:setup")
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
    with ApiServer(create_app(_ruled(settings))) as server:
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
    settings = _ruled(settings)
    var = "NHI_TARGET_PASSWORD_TEST_DOCS"
    name = _register(sessions, settings, password_env=var)
    registry = TargetRegistry(sessions, settings, None, environ={var: PASSWORD})
    conn = registry.get(name)
    assert conn == TargetConnection(
        name=name, host="db.internal", port=6432, dbname="app", admin_user="nhi_admin",
        password=PASSWORD, sslmode="verify-full", connection_limit=10,
    )  # fmt: skip
    assert PASSWORD not in repr(conn) and PASSWORD not in conn.public_dsn("agent")
    assert name in registry.names()

    unset = TargetRegistry(sessions, settings, None, environ={})
    with pytest.raises(UnknownTarget, match=rf"{var}.* is not set"):
        unset.get(name)
    with pytest.raises(UnknownTarget, match="no target named 'never-registered'"):
        registry.get("never-registered")
    assert PASSWORD not in _dump(sessions, "targets")


def test_registry_resolves_the_password_from_secrets_manager(
    sessions: sessionmaker[Session], settings: Settings, aws: AwsClients
) -> None:
    settings = _ruled(settings)
    under = settings.target_secret_prefix
    plain = aws.secrets.create_secret(Name=under + unique("tgt-plain"), SecretString=PASSWORD)
    rds = aws.secrets.create_secret(
        Name=under + unique("tgt-rds"),
        SecretString=json.dumps({"username": "nhi_admin", "password": PASSWORD, "port": 5432}),
    )
    nopass = aws.secrets.create_secret(
        Name=under + unique("tgt-nopass"), SecretString=json.dumps({"username": "nhi_admin"})
    )
    registry = TargetRegistry(sessions, settings, aws.secrets)
    by_arn = _register(sessions, settings, password_env=None, password_secret=plain["ARN"])
    by_name = _register(sessions, settings, password_env=None, password_secret=rds["Name"])
    assert registry.get(by_arn).password == PASSWORD
    assert registry.get(by_name).password == PASSWORD

    broken = {
        _register(sessions, settings, password_env=None, password_secret=nopass["ARN"]): "no \"password\" key",
        _register(sessions, settings, password_env=None, password_secret=under + unique("missing")): "ResourceNotFound",
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
        agent = agents.create_agent(s, AgentCreate(**agent_body()), "test:platform")
        nhi, sensitive = nhis.request_nhi(
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


# ---- targets cannot exfiltrate --------------------------------------------------------------


def test_host_patterns_and_secret_names() -> None:
    assert host_allowed("db.internal", ALLOWED_HOSTS)
    assert host_allowed("EU-1.DB.example.com", ALLOWED_HOSTS)
    assert host_allowed("10.0.0.7", ALLOWED_HOSTS) and not host_allowed("10.0.1.7", ALLOWED_HOSTS)
    assert not host_allowed("db.internal.evil.net", ALLOWED_HOSTS)
    # A socket directory matches only a pattern that is a path, never a host name.
    assert host_allowed("/var/run/postgresql", ALLOWED_HOSTS)
    assert not host_allowed("/tmp", [*ALLOWED_HOSTS, "localhost", "*"])
    assert not host_allowed("anything", [])
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:nhi-targets/docs-AbCdEf"
    assert secret_name(arn) == "nhi-targets/docs-AbCdEf" and secret_name("a/b") == "a/b"
    assert secret_name("arn:aws:secretsmanager:us-east-1:123456789012:nope") == ""


def test_the_target_prefix_is_never_the_delivery_prefix() -> None:
    for target_prefix in ("nhi-lifecycle/", "nhi-lifecycle/targets/", "NHI-LIFECYCLE/"):
        with pytest.raises(ValidationError, match="target_secret_prefix"):
            Settings(target_secret_prefix=target_prefix)
    with pytest.raises(ValidationError, match="target_secret_prefix"):
        Settings(secret_prefix="nhi-targets/docs/")
    assert Settings(target_secret_prefix="ops/db-admins/").target_secret_prefix == "ops/db-admins/"


async def test_dev_mode_relaxes_tls_and_logs_alerts_without_slack(
    service: Service, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    settings = _ruled(service.settings, dev_mode=True)
    token = service.token("targets-admin", "admin")
    with ApiServer(create_app(settings)) as server:
        async with httpx.AsyncClient(base_url=server.url, headers=bearer(token)) as http:
            name = _name()
            with caplog.at_level(logging.WARNING, logger="api.routes.targets"):
                created = await http.post(
                    "/v1/targets",
                    json=_body(
                        name, dsn="postgresql://nhi_admin@%2Fvar%2Frun%2Fpostgresql/app",
                        sslmode=None,
                    ),
                )  # fmt: skip
            assert created.status_code == 201, created.text
            assert created.json()["sslmode"] == "prefer"  # libpq's default, in dev mode only
            assert f"ALERT to {SECURITY_CHANNEL}: Postgres target {name} registered" in caplog.text
            # Hosts and password sources are checked in dev mode too.
            refused = await http.post(
                "/v1/targets", json=_body(_name(), password_env="HOME", sslmode="disable")
            )
            assert refused.status_code == 422 and refused.json()["field"] == "password_env"
            assert (await http.delete(f"/v1/targets/{name}")).status_code == 200


def _row(sessions: sessionmaker[Session], **fields: Any) -> str:
    """A target row written straight into the table: one from before the rules, or edited."""
    values: dict[str, Any] = {
        "name": _name(), "host": "db.internal", "port": 5432, "dbname": "app",
        "admin_user": "nhi_admin", "password_ref": "env:NHI_TARGET_PASSWORD_DOCS",
        "sslmode": "verify-full", "created_by": "test:legacy",
    } | fields  # fmt: skip
    with transaction(sessions) as s:
        s.add(Target(**values))
    return str(values["name"])


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"host": "evil.example.net"}, "dsn: host 'evil.example.net' is not allowed"),
        ({"host": "/tmp"}, "dsn: host '/tmp' is not allowed"),
        ({"password_ref": "env:AWS_SECRET_ACCESS_KEY"}, "password_env"),
        ({"password_ref": "secret:nhi-lifecycle/dev/kb-rag/1"}, "delivery prefix"),
        ({"password_ref": "secret:prod/docs-admin"}, "NHI_TARGET_SECRET_PREFIX"),
        ({"sslmode": "prefer"}, "sslmode: must be verify-full"),
    ],
)  # fmt: skip
def test_the_worker_refuses_a_stored_target_that_breaks_the_rules(
    sessions: sessionmaker[Session], settings: Settings, fields: dict[str, Any], words: str
) -> None:
    name = _row(sessions, **fields)
    environ = {"NHI_TARGET_PASSWORD_DOCS": PASSWORD, "AWS_SECRET_ACCESS_KEY": PASSWORD}
    registry = TargetRegistry(sessions, _ruled(settings), None, environ=environ)
    with pytest.raises(TargetRefused, match=words) as err:
        registry.get(name)
    assert PASSWORD not in str(err.value)
    # The same row meeting the rules resolves.
    good = _row(sessions)
    assert registry.get(good).password == PASSWORD


FOREIGN_HOST = "127.0.0.2"


class _Listener:
    """A TCP server standing in for a host an attacker controls: it counts who connects."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        # 127.0.0.2: loopback on Linux, and a host no allowed-hosts list of the suite names.
        self.sock.bind((FOREIGN_HOST, 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


async def test_a_stored_target_on_a_foreign_host_never_gets_the_password(
    service: Service,
    platform: httpx.AsyncClient,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A row from before the rules (or edited in the database): a host nobody allowed, a valid
    # password variable set on the worker. The worker refuses before connecting.
    monkeypatch.setenv("NHI_TARGET_PASSWORD_FOREIGN", PASSWORD)
    listener = _Listener()
    try:
        target = _row(
            sessions, host=FOREIGN_HOST, port=listener.port,
            password_ref="env:NHI_TARGET_PASSWORD_FOREIGN", sslmode="prefer",
        )  # fmt: skip
        agent_id = await _agent(platform)
        accepted = await platform.post(f"/v1/agents/{agent_id}/nhis", json=_pg(target))
        assert accepted.status_code == 202, accepted.text

        async def failed() -> dict[str, Any]:
            nhi = (await platform.get(f"/v1/nhis/{accepted.json()['id']}")).json()
            # Nothing was created; removing "it" cannot reach the target either, so the
            # compensation may leave the NHI revoke_failed (visible, never silently dropped).
            assert nhi["status"] in ("failed", "revoke_failed"), nhi
            return dict(nhi)

        nhi = await eventually(failed, timeout=60)
        assert "refused" in nhi["status_reason"] and "not allowed" in nhi["status_reason"]
        await asyncio.sleep(0.3)
        assert listener.connections == 0
    finally:
        listener.close()


async def test_a_delivered_secret_is_never_a_target_password(
    service: Service,
    platform: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    # A real NHI's delivered credential (an access key, under NHI_SECRET_PREFIX).
    agent_id = await _agent(platform)
    accepted = await platform.post(
        f"/v1/agents/{agent_id}/nhis",
        json={"platform": "aws", "kind": "iam_user_key", "scope": ROLE_SCOPE, "ttl": "1d"},
    )
    assert accepted.status_code == 202, accepted.text

    async def delivered() -> str:
        nhi = (await platform.get(f"/v1/nhis/{accepted.json()['id']}")).json()
        assert nhi["status"] == "active" and nhi["credential_ref"], nhi
        return str(nhi["credential_ref"])

    arn = await eventually(delivered, timeout=60)
    name = aws.secrets.describe_secret(SecretId=arn)["Name"]
    assert name.startswith(service.settings.secret_prefix)

    # Refused at registration, by ARN and by name, with 422 naming the field.
    before = _target_state(sessions)
    for ref in (arn, name):
        response = await admin.post(
            "/v1/targets", json=_body(_name(), password_env=None, password_secret=ref)
        )
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "password_secret"
        assert "delivery prefix" in response.json()["detail"]
    assert _target_state(sessions) == before

    # Refused in settings at start...
    entry = {"dsn": "postgresql://ops@db.internal/app", "password_secret": arn}
    with pytest.raises(ValidationError, match=r"postgres_targets\.leak\.password_secret"):
        Settings(postgres_targets={"leak": entry})
    # ... and by the worker-side check should settings get past that (they are trusted for
    # hosts and TLS, never for this): the secret is not even read.
    leaky = service.settings.model_copy(
        update={"postgres_targets": {"leak": PostgresTargetSetting(**entry)}}
    )
    reads: list[str] = []

    def count(**kwargs: Any) -> None:
        reads.append(str(kwargs.get("params", {}).get("SecretId", "")))

    event = "before-call.secrets-manager.GetSecretValue"
    aws.secrets.meta.events.register(event, count)
    try:
        with pytest.raises(TargetRefused, match="delivery prefix"):
            TargetRegistry(sessions, leaky, aws.secrets).get("leak")
    finally:
        aws.secrets.meta.events.unregister(event, count)
    assert reads == []
