"""Footprints, invokers and one identity per agent (issue 16).

The module has a database of its own (the migrations' schema and seeded policies, nothing else
writing to it), so footprints are compared field by field and risk scores exactly. The
footprint reads the inventory only, so NHIs are inserted as rows; invokers go through the
service and the HTTP API; reuse goes through `nhis.request_nhi`, the service the API calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from models.contracts import ScopeStatement
from models.enums import InvokerChannel, InvokerKind
from models.orm import Agent, AgentInvoker, AuditEvent, Nhi, Target, TaskCredential
from models.schemas import InvokerCreate, NhiCreate
from nhi.infra.config import Settings
from nhi.infra.db import make_engine, make_sessionmaker, transaction, upgrade_head
from nhi.rules import risk
from nhi.rules.policy import RuleViolation
from nhi.services import footprint, invokers, nhis
from nhi.services.errors import Conflict
from tests.conftest import Databases
from tests.helpers import ApiServer, bearer, mint, unique

NHI = str(Path(sys.executable).parent / "nhi")
# Real time (whole seconds), so the API's own clock agrees with the inventory's story.
NOW = datetime.now(UTC).replace(microsecond=0)
DAY = timedelta(days=1)
OWNER = "ana@example.com"


# ---- rigs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp_engine(databases: Databases) -> Iterator[Engine]:
    url = databases.new("nhi_fp")
    upgrade_head(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def fp_sessions(fp_engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(fp_engine)


@pytest.fixture(scope="module")
def fp_settings(fp_engine: Engine) -> Settings:
    return Settings(
        database_url=fp_engine.url.render_as_string(hide_password=False),
        dev_mode=True,
        identity_reuse_check=True,
        target_allowed_hosts=["127.0.0.1"],
    )


@pytest.fixture(scope="module")
def api(fp_settings: Settings, fp_sessions: sessionmaker[Session]) -> Iterator[httpx.Client]:
    with (
        ApiServer(create_app(fp_settings, fp_sessions)) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        yield client


def add_agent(
    sessions: sessionmaker[Session],
    *,
    environment: str = "dev",
    team: str = "search",
    backup: str | None = "ben@example.com",
    declared: list[str] | None = None,
) -> Agent:
    with transaction(sessions) as s:
        agent = Agent(
            name=unique("fp"), category="rag", environment=environment, owner_email=OWNER,
            backup_owner_email=backup, team=team, purpose="footprint tests",
            invokers=declared or [], status="active", created_by="test",
        )  # fmt: skip
        s.add(agent)
        s.flush()
        s.expunge(agent)
        return agent


def add_nhi(
    sessions: sessionmaker[Session],
    agent: Agent,
    kind: str,
    scope: list[dict[str, Any]],
    *,
    status: str = "active",
    created: datetime,
    expires: datetime,
    activated: datetime | None = None,
    used: datetime | None = None,
    rotated: datetime | None = None,
    target: str | None = None,
    trust: str | None = None,
) -> uuid.UUID:
    nhi_id = uuid.uuid4()
    with transaction(sessions) as s:
        s.add(
            Nhi(
                id=nhi_id,
                agent_id=agent.id,
                platform="postgres" if target else "aws",
                kind=kind,
                name=f"fp_{nhi_id.hex}",
                granted_scope=scope,
                allowed_cidrs=[],
                trust_principal=trust,
                status=status,
                requested_by="test",
                created_at=created,
                activated_at=activated,
                expires_at=expires,
                max_lifetime_at=expires + 90 * DAY,
                last_used_at=used,
                last_rotated_at=rotated,
                target=target,
            )
        )
    return nhi_id


def add_invoker(
    sessions: sessionmaker[Session],
    agent: Agent,
    kind: str,
    ref: str,
    channel: str,
    expires_at: datetime | None = None,
) -> uuid.UUID:
    body = InvokerCreate(kind=kind, ref=ref, channel=channel, expires_at=expires_at)
    with transaction(sessions) as s:
        return invokers.add_invoker(s, agent.id, body, "test:platform", now=NOW).id


# ---- the five-NHI agent ------------------------------------------------------------------------


class World:
    """Agent A (prod, no backup owner, one declared invoker) with five live NHIs across AWS and
    Postgres, two dead ones, a live and an ended task credential, and two live invokers: a
    person and agent B. B (its own NHI) is invoked by a schedule and by agent C; C by a person
    and by A, which closes a cycle."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        team = unique("team")
        self.team = team
        self.a = add_agent(
            sessions, environment="prod", team=team, backup=None, declared=["legacy-scheduler"]
        )
        self.b = add_agent(sessions, environment="prod", team=team)
        self.c = add_agent(sessions, environment="prod", team=team)
        a = self.a
        self.n1 = add_nhi(
            sessions, a, "iam_role",
            [{"actions": ["s3:GetObject", "s3:PutObject"], "resources": ["arn:aws:s3:::kb-docs/*"]}],
            created=NOW - 5 * DAY, activated=NOW - 2 * DAY, used=NOW - DAY, expires=NOW + 10 * DAY,
            trust="arn:aws:iam::123456789012:role/fp-runtime",
        )  # fmt: skip
        self.n2 = add_nhi(
            sessions, a, "iam_role",
            [
                {"actions": ["s3:DeleteObject"],
                 "resources": ["arn:aws:s3:::kb-docs/*", "arn:aws:s3:::kb-archive/*"]},
                {"actions": ["kms:Decrypt"],
                 "resources": ["arn:aws:kms:us-east-1:123456789012:key/abc"]},
            ],
            created=NOW - 4 * DAY, activated=NOW - 4 * DAY, used=NOW - DAY, expires=NOW + 40 * DAY,
        )  # fmt: skip
        self.n3 = add_nhi(
            sessions, a, "iam_user_key",
            [
                {"actions": ["dynamodb:GetItem", "dynamodb:Query"],
                 "resources": ["arn:aws:dynamodb:us-east-1:123456789012:table/orders"]},
                {"actions": ["s3:GetObject"], "resources": ["*"]},
            ],
            created=NOW - 61 * DAY, activated=NOW - 60 * DAY, expires=NOW + 5 * DAY,
        )  # fmt: skip
        self.n4 = add_nhi(
            sessions, a, "postgres_role",
            [
                {"actions": ["SELECT", "INSERT"], "resources": ["app.orders"]},
                {"actions": ["SELECT"], "resources": ["app.*"]},
            ],
            created=NOW - 3 * DAY, activated=NOW - 3 * DAY, used=NOW - timedelta(hours=1),
            rotated=NOW - DAY, expires=NOW + 20 * DAY, target="fpdb",
        )  # fmt: skip
        self.n5 = add_nhi(
            sessions, a, "postgres_role",
            [
                {"actions": ["USAGE"], "resources": ["reporting"]},
                {"actions": ["SELECT"], "resources": ["reporting.daily"]},
            ],
            status="expiring", created=NOW - 100 * DAY, activated=NOW - 100 * DAY,
            used=NOW - 2 * DAY, expires=NOW + 3 * DAY, target="fpdb",
        )  # fmt: skip
        # Dead: neither counts, however wide.
        for status in ("decommissioned", "failed"):
            add_nhi(
                sessions, a, "iam_role", [{"actions": ["s3:*"], "resources": ["*"]}],
                status=status, created=NOW - 2 * DAY, expires=NOW + 300 * DAY,
            )  # fmt: skip
        self.b_nhi = add_nhi(
            sessions, self.b, "iam_role",
            [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::b-bucket/*"]}],
            created=NOW - DAY, activated=NOW - DAY, used=NOW - DAY, expires=NOW + 7 * DAY,
        )  # fmt: skip
        with transaction(sessions) as s:
            self.tc = TaskCredential(
                nhi_id=self.n4, agent_id=a.id, platform="postgres", name=unique("fp_task"),
                task_id="task-1", issued_by="token:agent", expires_at=NOW + timedelta(hours=1),
                status="active",
            )  # fmt: skip
            ended = TaskCredential(
                nhi_id=self.n1, agent_id=a.id, platform="aws", name=unique("fp_task"),
                issued_by="token:agent", expires_at=NOW + 400 * DAY, status="ended",
            )  # fmt: skip
            s.add_all([self.tc, ended])
            s.flush()
            s.expunge_all()
            # An invoker whose time is up: listed, but no longer in the footprint.
            s.add(
                AgentInvoker(
                    agent_id=a.id,
                    kind="group",
                    ref="old-oncall",
                    channel="slack",
                    expires_at=NOW - DAY,
                    added_by="test",
                )
            )
        self.i_person = add_invoker(sessions, a, "person", "Carl@Example.com", "slack")
        self.i_agent = add_invoker(sessions, a, "agent", str(self.b.id), "api")
        add_invoker(sessions, self.b, "schedule", "0 * * * *", "cron")
        add_invoker(sessions, self.b, "agent", str(self.c.id), "webhook")
        add_invoker(sessions, self.c, "person", "dora@example.com", "slack", NOW + 10 * DAY)
        add_invoker(sessions, self.c, "agent", str(a.id), "api")


@pytest.fixture(scope="module")
def world(fp_sessions: sessionmaker[Session]) -> World:
    return World(fp_sessions)


def _ids(*ids: uuid.UUID) -> list[str]:
    return sorted(str(i) for i in ids)


def test_the_footprint_field_by_field(fp_sessions: sessionmaker[Session], world: World) -> None:
    w = world
    with transaction(fp_sessions) as s:
        fp = footprint.footprint(s, w.a.id, NOW).model_dump(mode="json")

    assert (fp["agent_id"], fp["name"], fp["environment"], fp["team"]) == (
        str(w.a.id), w.a.name, "prod", w.team,
    )  # fmt: skip
    assert [n["id"] for n in fp["nhis"]] == [str(i) for i in (w.n5, w.n3, w.n1, w.n2, w.n4)]
    assert {n["id"]: n["status"] for n in fp["nhis"]}[str(w.n5)] == "expiring"
    assert fp["task_credentials"] == [
        {"id": str(w.tc.id), "nhi_id": str(w.n4), "platform": "postgres", "name": w.tc.name,
         "task_id": "task-1", "expires_at": (NOW + timedelta(hours=1)).isoformat()
         .replace("+00:00", "Z")},
    ]  # fmt: skip

    kb, archive = "arn:aws:s3:::kb-docs/*", "arn:aws:s3:::kb-archive/*"
    orders = "arn:aws:dynamodb:us-east-1:123456789012:table/orders"
    key = "arn:aws:kms:us-east-1:123456789012:key/abc"
    aws = [
        ("dynamodb:GetItem", [orders], _ids(w.n3), False, False),
        ("dynamodb:Query", [orders], _ids(w.n3), False, False),
        ("kms:Decrypt", [key], _ids(w.n2), True, False),
        ("s3:DeleteObject", [archive, kb], _ids(w.n2), True, True),
        ("s3:GetObject", ["*", kb], _ids(w.n1, w.n3), False, False),
        ("s3:PutObject", [kb], _ids(w.n1), False, True),
    ]
    assert [
        (p["action"], p["resources"], p["nhi_ids"], p["sensitive"], p["write"])
        for p in fp["permissions"]["aws"]
    ] == aws
    postgres = [
        ("fpdb", "app", ["USAGE"], [], _ids(w.n4)),
        ("fpdb", "app.*", ["SELECT"], [], _ids(w.n4)),
        ("fpdb", "app.orders", ["INSERT", "SELECT"], ["INSERT"], _ids(w.n4)),
        ("fpdb", "reporting", ["USAGE"], [], _ids(w.n5)),
        ("fpdb", "reporting.daily", ["SELECT"], [], _ids(w.n5)),
    ]
    assert [
        (p["target"], p["object"], p["privileges"], p["sensitive"], p["nhi_ids"])
        for p in fp["permissions"]["postgres"]
    ] == postgres
    # The sensitive subset, by the prod policies' catalogue.
    assert [p["action"] for p in fp["sensitive"]["aws"]] == ["kms:Decrypt", "s3:DeleteObject"]
    assert [(p["object"], p["privileges"]) for p in fp["sensitive"]["postgres"]] == [
        ("app.orders", ["INSERT"])
    ]
    assert fp["data_stores"] == {
        "s3_buckets": ["*", "kb-archive", "kb-docs"],
        "dynamodb_tables": ["orders"],
        "postgres": [
            {"target": "fpdb", "schema_name": "app", "tables": ["*", "orders"]},
            {"target": "fpdb", "schema_name": "reporting", "tables": ["daily"]},
        ],
    }
    # B's own NHI is B's: it reaches A's footprint as an invoker, not as permissions.
    assert "b-bucket" not in str(fp["permissions"])

    # Both were added at NOW: then by id.
    assert [(i["id"], i["kind"], i["ref"], i["channel"]) for i in fp["invokers"]] == sorted([
        (str(w.i_person), "person", "carl@example.com", "slack"),
        (str(w.i_agent), "agent", str(w.b.id), "api"),
    ])  # fmt: skip
    assert fp["declared_invokers"] == ["legacy-scheduler"]
    assert [(a["agent_id"], a["depth"], a["via"]) for a in fp["reachable_agents"]] == [
        (str(w.b.id), 1, str(w.a.id)),
        (str(w.c.id), 2, str(w.b.id)),
    ]
    assert [(i["kind"], i["ref"], i["channel"], i["depth"], i["via"])
            for i in fp["reachable_invokers"]] == [
        ("schedule", "0 * * * *", "cron", 2, str(w.b.id)),
        ("person", "dora@example.com", "slack", 3, str(w.c.id)),
    ]  # fmt: skip
    # A invokes C, C invokes B (and B invokes A: the cycle stops there).
    assert [(a["agent_id"], a["depth"], a["via"]) for a in fp["invokes"]] == [
        (str(w.c.id), 1, str(w.a.id)),
        (str(w.b.id), 2, str(w.c.id)),
    ]
    assert fp["chain_truncated"] is False
    assert fp["expiry_horizon"] == (NOW + 40 * DAY).isoformat().replace("+00:00", "Z")

    assert fp["risk"] == {
        "score": 95,
        "reasons": [
            {"code": "sensitive_write", "points": 20,
             "detail": "2 sensitive write(s): aws s3:DeleteObject, "
                       "postgres INSERT on fpdb:app.orders"},
            {"code": "sensitive_read", "points": 4,
             "detail": "1 sensitive read(s): aws kms:Decrypt"},
            {"code": "production_data", "points": 20,
             "detail": "reaches 6 data store(s) in prod"},
            {"code": "wide_resource", "points": 10,
             "detail": "2 wide resource(s): aws *, postgres fpdb:app.*"},
            {"code": "invokers", "points": 8,
             "detail": "4 invoker(s): declared legacy-scheduler, person carl@example.com, "
                       "person dora@example.com, schedule 0 * * * *"},
            {"code": "chained_agents", "points": 8,
             "detail": f"2 agent(s) in the invoker chain: {', '.join(sorted([w.b.name, w.c.name]))}"},
            {"code": "long_expiry", "points": 5, "detail": "access lasts 40 more days"},
            {"code": "no_backup_owner", "points": 10, "detail": "no backup owner"},
            {"code": "stale_nhi", "points": 10,
             "detail": f"2 stale NHI(s): {', '.join(sorted([f'fp_{w.n3.hex}', f'fp_{w.n5.hex}']))}"},
        ],
    }  # fmt: skip


def test_the_chain_is_depth_limited(fp_sessions: sessionmaker[Session], world: World) -> None:
    with transaction(fp_sessions) as s:
        fp = footprint.footprint(s, world.a.id, NOW, max_depth=1)
    assert [a.agent_id for a in fp.reachable_agents] == [world.b.id]
    assert fp.chain_truncated is True
    assert [r.code for r in fp.risk.reasons if r.code == "chained_agents"] == ["chained_agents"]


def test_the_footprint_and_ranking_through_the_api(
    api: httpx.Client, fp_sessions: sessionmaker[Session], world: World
) -> None:
    auditor = bearer(mint(fp_sessions, "fp-auditor", "auditor"))
    other = bearer(mint(fp_sessions, "fp-other", "platform", teams=["billing"]))
    shown = api.get(f"/v1/agents/{world.a.id}/footprint", headers=auditor)
    assert shown.status_code == 200, shown.text
    with transaction(fp_sessions) as s:
        expected = footprint.footprint(s, world.a.id).model_dump(mode="json")
    body = shown.json()
    assert body["permissions"] == expected["permissions"]
    assert body["data_stores"] == expected["data_stores"]
    assert body["risk"]["score"] == expected["risk"]["score"]
    hidden = api.get(f"/v1/agents/{world.a.id}/footprint", headers=other)
    assert hidden.status_code == 404

    ranked = api.get("/v1/footprints", params={"team": world.team}, headers=auditor)
    assert ranked.status_code == 200, ranked.text
    rows = ranked.json()
    assert {r["agent_id"] for r in rows} == {str(a.id) for a in (world.a, world.b, world.c)}
    assert rows[0]["agent_id"] == str(world.a.id)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    page = api.get(
        "/v1/footprints", params={"team": world.team, "limit": 1, "offset": 1}, headers=auditor
    ).json()
    assert page == rows[1:2]
    assert api.get("/v1/footprints", params={"team": world.team}, headers=other).json() == []
    assert (
        api.get("/v1/footprints", params={"limit": 1001, "team": "x"}, headers=auditor).json()[
            "field"
        ]
        == "limit"
    )


# ---- invokers ----------------------------------------------------------------------------------


def test_invokers_through_the_api(api: httpx.Client, fp_sessions: sessionmaker[Session]) -> None:
    agent = add_agent(fp_sessions)
    platform = bearer(mint(fp_sessions, "fp-platform", "platform", teams=["search"]))
    owner = bearer(mint(fp_sessions, "fp-owner", "platform", teams=["nowhere"], email=OWNER))
    auditor = bearer(mint(fp_sessions, "fp-auditor", "auditor"))
    admin = bearer(mint(fp_sessions, "fp-admin", "admin"))
    path = f"/v1/agents/{agent.id}/invokers"

    added = api.post(path, json={"kind": "person", "ref": "Eve@Example.com", "channel": "slack"},
                     headers=platform)  # fmt: skip
    assert added.status_code == 201, added.text
    assert (added.json()["ref"], added.json()["added_by"]) == (
        "eve@example.com",
        "token:fp-platform",
    )
    by_owner = api.post(path, json={"kind": "group", "ref": "@search-team", "channel": "ui"},
                        headers=owner)  # fmt: skip
    assert by_owner.status_code == 201, by_owner.text
    by_admin = api.post(path, json={"kind": "service", "ref": "ci.example", "channel": "webhook",
                                    "expires_at": "2099-01-01T00:00:00Z"}, headers=admin)  # fmt: skip
    assert by_admin.status_code == 422 and by_admin.json()["field"] == "expires_at"  # > 366 days
    refused = api.post(path, json={"kind": "service", "ref": "ci", "channel": "api"},
                       headers=auditor)  # fmt: skip
    assert refused.status_code == 403

    listed = api.get(path, headers=auditor)
    assert [i["ref"] for i in listed.json()] == ["eve@example.com", "@search-team"]
    invoker_id = added.json()["id"]
    assert api.delete(f"{path}/{invoker_id}", headers=auditor).status_code == 403
    assert api.delete(f"{path}/{invoker_id}", headers=platform).status_code == 204
    assert api.delete(f"{path}/{invoker_id}", headers=platform).status_code == 404
    assert [i["ref"] for i in api.get(path, headers=platform).json()] == ["@search-team"]
    with transaction(fp_sessions) as s:
        events = [
            (e.event, e.actor, e.details.get("invoker_id"))
            for e in s.scalars(
                select(AuditEvent)
                .where(AuditEvent.subject_id == str(agent.id))
                .order_by(AuditEvent.id)
            )
        ]
    assert events == [
        ("agent.invoker_added", "token:fp-platform", invoker_id),
        ("agent.invoker_added", "token:fp-owner", by_owner.json()["id"]),
        ("agent.invoker_removed", "token:fp-platform", invoker_id),
    ]
    # Another agent's invoker is not this agent's to remove.
    elsewhere = add_agent(fp_sessions)
    moved = f"/v1/agents/{elsewhere.id}/invokers/{by_owner.json()['id']}"
    assert api.delete(moved, headers=admin).status_code == 404


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"kind": "person", "ref": "not-an-email", "channel": "slack"}, "ref", "email"),
        ({"kind": "group", "ref": "two words", "channel": "slack"}, "ref", "group name"),
        ({"kind": "service", "ref": "svc\u202e", "channel": "api"}, "ref", "control"),
        ({"kind": "schedule", "ref": "every hour", "channel": "cron"}, "ref", "cron"),
        ({"kind": "schedule", "ref": "@daily", "channel": "slack"}, "channel", "cron"),
        ({"kind": "person", "ref": "eve@example.com", "channel": "cron"}, "channel", "schedule"),
        ({"kind": "agent", "ref": "not-a-uuid", "channel": "api"}, "ref", "UUID"),
        ({"kind": "agent", "ref": str(uuid.uuid4()), "channel": "api"}, "ref", "does not exist"),
        ({"kind": "robot", "ref": "x", "channel": "api"}, "kind", "person"),
        ({"kind": "person", "ref": "eve@example.com", "channel": "fax"}, "channel", "slack"),
        ({"kind": "person", "ref": "x" * 255, "channel": "api"}, "ref", "254"),
        ({"kind": "person", "ref": "eve@example.com", "channel": "api",
          "expires_at": "2020-01-01T00:00:00Z"}, "expires_at", "future"),
        ({"kind": "person", "ref": "eve@example.com", "channel": "api",
          "expires_at": "2030-01-01T00:00:00"}, "expires_at", "timezone"),
        ({"kind": "person", "ref": "eve@example.com", "channel": "api", "role": "x"}, "role",
         "Extra"),
    ],
)  # fmt: skip
def test_invoker_validation_names_the_field(
    api: httpx.Client,
    fp_sessions: sessionmaker[Session],
    body: dict[str, Any],
    field: str,
    words: str,
) -> None:
    agent = add_agent(fp_sessions)
    admin = bearer(mint(fp_sessions, "fp-admin", "admin"))
    refused = api.post(f"/v1/agents/{agent.id}/invokers", json=body, headers=admin)
    assert refused.status_code == 422, refused.text
    assert refused.json()["field"] == field
    assert words.lower() in refused.json()["detail"].lower()
    with transaction(fp_sessions) as s:
        assert s.scalars(select(AgentInvoker).where(AgentInvoker.agent_id == agent.id)).all() == []


def test_agent_invokers_same_environment_not_self_not_twice(
    fp_sessions: sessionmaker[Session],
) -> None:
    agent = add_agent(fp_sessions)
    prod = add_agent(fp_sessions, environment="prod")
    peer = add_agent(fp_sessions)
    with pytest.raises(RuleViolation) as own:
        add_invoker(fp_sessions, agent, "agent", str(agent.id), "api")
    assert own.value.field == "ref" and "own invoker" in own.value.message
    with pytest.raises(RuleViolation) as isolated:
        add_invoker(fp_sessions, agent, "agent", str(prod.id), "api")
    assert isolated.value.field == "ref" and "NHI8" in isolated.value.message
    add_invoker(fp_sessions, agent, "agent", str(peer.id), "api")
    with pytest.raises(Conflict) as twice:
        add_invoker(fp_sessions, agent, "agent", str(peer.id).upper(), "api")
    assert twice.value.field == "ref"
    # The same ref through another channel is another invoker.
    add_invoker(fp_sessions, agent, "agent", str(peer.id), "slack")


def _nhi(url: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NHI_API_URL=url, NHI_TOKEN=token)
    return subprocess.run([NHI, *args], env=env, capture_output=True, text=True, timeout=60)


def test_invokers_and_footprint_through_the_cli(
    api: httpx.Client, fp_sessions: sessionmaker[Session], world: World
) -> None:
    url = str(api.base_url)
    token = mint(fp_sessions, "fp-cli-admin", "admin")
    agent = add_agent(fp_sessions, team=world.team)
    added = _nhi(url, token, "--json", "agents", "invokers", "add", str(agent.id), "--kind",
                 "schedule", "--ref", "*/5 * * * *", "--channel", "cron")  # fmt: skip
    assert added.returncode == 0, added.stderr
    invoker_id = json.loads(added.stdout)["id"]
    listed = _nhi(url, token, "agents", "invokers", "list", str(agent.id))
    assert listed.returncode == 0 and "*/5 * * * *" in listed.stdout and "cron" in listed.stdout
    bad = _nhi(url, token, "agents", "invokers", "add", str(agent.id), "--kind", "person",
               "--ref", "nobody", "--channel", "slack")  # fmt: skip
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "ref" in bad.stderr and "HTTP 422" in bad.stderr
    removed = _nhi(url, token, "agents", "invokers", "remove", str(agent.id), invoker_id)
    assert removed.returncode == 0 and invoker_id in removed.stdout
    assert _nhi(url, token, "agents", "invokers", "list", str(agent.id)).stdout.count("cron") == 0

    shown = _nhi(url, token, "footprint", str(world.a.id))
    assert shown.returncode == 0, shown.stderr
    assert "risk: 95/100" in shown.stdout
    assert "+10 no_backup_owner: no backup owner" in shown.stdout
    assert (
        "aws s3:DeleteObject on arn:aws:s3:::kb-archive/*, arn:aws:s3:::kb-docs/* (sensitive)"
        in (shown.stdout)
    )
    as_json = _nhi(url, token, "footprint", str(world.a.id), "--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["agent_id"] == str(world.a.id)
    missing = _nhi(url, token, "footprint", str(uuid.uuid4()))
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr


# ---- one identity per agent and environment ----------------------------------------------------

ROLE = [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::kb-docs/*"]}]
READ = [{"actions": ["SELECT"], "resources": ["public.documents"]}]


def _request(
    sessions: sessionmaker[Session], settings: Settings, agent: Agent, **fields: Any
) -> uuid.UUID:
    kind = fields.pop("kind", "iam_role")
    body = NhiCreate(
        platform="postgres" if kind == "postgres_role" else "aws",
        kind=kind,
        scope=fields.pop("scope", ROLE),
        **fields,
    )
    with transaction(sessions) as s:
        nhi, _ = nhis.request_nhi(s, settings, agent.id, body, "test:platform")
        return nhi.id


def test_a_trust_principal_is_never_shared(
    fp_sessions: sessionmaker[Session], fp_settings: Settings
) -> None:
    principal = f"arn:aws:iam::123456789012:role/{unique('runtime')}"
    first, second = add_agent(fp_sessions), add_agent(fp_sessions)
    staging = add_agent(fp_sessions, environment="staging")
    _request(fp_sessions, fp_settings, first, trust_principal=principal)
    # The same agent may hold several roles its runtime assumes.
    _request(fp_sessions, fp_settings, first, trust_principal=principal)

    with pytest.raises(Conflict) as reuse:
        _request(fp_sessions, fp_settings, second, trust_principal=principal)
    assert reuse.value.field == "trust_principal"
    assert "NHI9" in str(reuse.value) and first.name in str(reuse.value)
    with pytest.raises(Conflict) as across:
        _request(fp_sessions, fp_settings, staging, trust_principal=principal)
    assert across.value.field == "trust_principal" and "NHI8" in str(across.value)
    with transaction(fp_sessions) as s:
        held = s.scalars(select(Nhi.agent_id).where(Nhi.trust_principal == principal)).all()
    assert set(held) == {first.id}  # the refusals recorded nothing

    # An AWS service principal names a service, not an agent's identity.
    for agent in (first, second):
        _request(fp_sessions, fp_settings, agent, trust_principal="bedrock.amazonaws.com")
    # Once the first agent's roles are gone, the principal is free.
    with transaction(fp_sessions) as s:
        for row in s.scalars(select(Nhi).where(Nhi.trust_principal == principal)):
            row.status = "decommissioned"
    _request(fp_sessions, fp_settings, second, trust_principal=principal)
    # The check can be switched off (the rest of the suite shares one principal).
    off = fp_settings.model_copy(update={"identity_reuse_check": False})
    _request(fp_sessions, off, staging, trust_principal=principal)


def test_a_postgres_target_serves_one_environment(
    fp_sessions: sessionmaker[Session], fp_settings: Settings
) -> None:
    target = unique("fptgt")
    with transaction(fp_sessions) as s:
        s.add(
            Target(
                name=target,
                host="127.0.0.1",
                port=5432,
                dbname="app",
                admin_user="nhi_admin",
                password_ref="env:NHI_FP_PASSWORD",
                created_by="test",
            )
        )
    dev, dev_peer, prod = (
        add_agent(fp_sessions),
        add_agent(fp_sessions),
        add_agent(fp_sessions, environment="prod"),
    )
    _request(fp_sessions, fp_settings, dev, kind="postgres_role", scope=READ, target=target)
    _request(fp_sessions, fp_settings, dev_peer, kind="postgres_role", scope=READ, target=target)
    with pytest.raises(Conflict) as isolated:
        _request(fp_sessions, fp_settings, prod, kind="postgres_role", scope=READ, target=target)
    assert isolated.value.field == "target" and "NHI8" in str(isolated.value)


# ---- the scoring rules -------------------------------------------------------------------------

BASE = risk.RiskFacts(environment="dev", now=NOW)


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (BASE, (0, [])),
        (replace(BASE, has_backup_owner=False), (10, ["no_backup_owner"])),
        (replace(BASE, environment="prod"), (0, [])),  # prod without data: nothing reached
        (replace(BASE, environment="prod", data_stores=1), (20, ["production_data"])),
        (replace(BASE, data_stores=3), (0, [])),
        (replace(BASE, expiry_horizon=NOW + 30 * DAY), (0, [])),
        (replace(BASE, expiry_horizon=NOW + 30 * DAY + timedelta(seconds=1)), (5, ["long_expiry"])),
        (replace(BASE, expiry_horizon=NOW + 90 * DAY + timedelta(seconds=1)),
         (10, ["long_expiry"])),
        (replace(BASE, sensitive_writes=frozenset({"a", "b", "c", "d"})), (30, ["sensitive_write"])),
        (replace(BASE, sensitive_reads=frozenset({"a"})), (4, ["sensitive_read"])),
        (replace(BASE, wide_resources=frozenset("abcd")), (15, ["wide_resource"])),
        (replace(BASE, invokers=frozenset("abcdefg")), (10, ["invokers"])),
        (replace(BASE, chained_agents=frozenset("ab")), (8, ["chained_agents"])),
        (replace(BASE, stale_nhis=frozenset("abcd")), (15, ["stale_nhi"])),
        (risk.RiskFacts(
            environment="prod", now=NOW, sensitive_writes=frozenset("abc"),
            sensitive_reads=frozenset("abc"), wide_resources=frozenset("abc"), data_stores=9,
            invokers=frozenset("abcde"), chained_agents=frozenset("abc"),
            expiry_horizon=NOW + 200 * DAY, has_backup_owner=False, stale_nhis=frozenset("abc"),
        ), (100, list(risk.WEIGHTS))),
    ],
)  # fmt: skip
def test_the_weights_table(facts: risk.RiskFacts, expected: tuple[int, list[str]]) -> None:
    scored = risk.score(facts)
    assert (scored.score, [r.code for r in scored.reasons]) == expected
    assert all(r.points > 0 for r in scored.reasons)


_keys = st.frozensets(st.text("abcdefgh", min_size=1, max_size=3), max_size=8)
_facts = st.builds(
    risk.RiskFacts,
    environment=st.sampled_from(["dev", "staging", "prod"]),
    now=st.just(NOW),
    sensitive_writes=_keys,
    sensitive_reads=_keys,
    wide_resources=_keys,
    data_stores=st.integers(0, 20),
    invokers=_keys,
    chained_agents=_keys,
    expiry_horizon=st.none() | st.integers(0, 400).map(lambda d: NOW + d * DAY),
    has_backup_owner=st.booleans(),
    stale_nhis=_keys,
)


@given(_facts, st.text("xyz", min_size=1, max_size=4))
def test_adding_a_sensitive_write_never_lowers_the_score(facts: risk.RiskFacts, key: str) -> None:
    before = risk.score(facts)
    after = risk.score(replace(facts, sensitive_writes=facts.sensitive_writes | {key}))
    assert after.score >= before.score
    assert 0 <= before.score <= 100 and before.score == min(
        100, sum(r.points for r in before.reasons)
    )
    assert risk.score(facts) == before  # deterministic


@given(_facts, _facts)
def test_every_part_is_monotonic(facts: risk.RiskFacts, more: risk.RiskFacts) -> None:
    grown = replace(
        facts,
        sensitive_reads=facts.sensitive_reads | more.sensitive_reads,
        wide_resources=facts.wide_resources | more.wide_resources,
        invokers=facts.invokers | more.invokers,
        chained_agents=facts.chained_agents | more.chained_agents,
        stale_nhis=facts.stale_nhis | more.stale_nhis,
        data_stores=facts.data_stores + more.data_stores,
        has_backup_owner=facts.has_backup_owner and more.has_backup_owner,
    )
    assert risk.score(grown).score >= risk.score(facts).score


@pytest.mark.parametrize(
    ("activity", "stale"),
    [
        (risk.NhiActivity("a", False, since=NOW - 31 * DAY), True),
        (risk.NhiActivity("a", False, since=NOW - 29 * DAY), False),
        (risk.NhiActivity("a", False, since=NOW - 300 * DAY, last_used_at=NOW - DAY), False),
        (risk.NhiActivity("a", True, since=NOW - 91 * DAY, last_used_at=NOW - DAY), True),
        (risk.NhiActivity("a", True, since=NOW - 91 * DAY, last_used_at=NOW - DAY,
                          last_rotated_at=NOW - 10 * DAY), False),
    ],
)  # fmt: skip
def test_staleness(activity: risk.NhiActivity, stale: bool) -> None:
    assert risk.is_stale(activity, NOW) is stale


@pytest.mark.parametrize(
    ("action", "write"),
    [("s3:GetObject", False), ("s3:List*", False), ("s3:*", True), ("*", True),
     ("s3:PutObject", True), ("kms:Decrypt", False), ("dynamodb:BatchGetItem", False)],
)  # fmt: skip
def test_write_actions(action: str, write: bool) -> None:
    assert risk.is_write_action(action) is write


@pytest.mark.parametrize(
    ("resource", "wide"),
    [("*", True), ("arn:aws:s3:::*", True), ("arn:aws:s3:::kb/*", False),
     ("arn:aws:dynamodb:us-east-1:123456789012:*", True),
     ("arn:aws:dynamodb:us-east-1:123456789012:table/t", False)],
)  # fmt: skip
def test_wide_resources(resource: str, wide: bool) -> None:
    assert risk.is_wide_resource(resource) is wide


def test_actions_merge_case_insensitively() -> None:
    scopes = [
        risk.NhiScope("n1", "aws", [ScopeStatement(actions=["S3:GetObject"], resources=["a"])]),
        risk.NhiScope(
            "n2", "aws", [ScopeStatement(actions=["s3:getobject"], resources=["b"])],
            sensitive_rules=("s3:Get*",),
        ),
    ]  # fmt: skip
    (grant,) = risk.expand_aws(scopes)
    assert (grant.action, grant.resources, grant.nhi_ids, grant.sensitive) == (
        "S3:GetObject", ("a", "b"), ("n1", "n2"), True,
    )  # fmt: skip


def test_invoker_kinds_and_channels_match_the_table() -> None:
    # The migration's CHECK constraints spell these out: keep them in step.
    assert [k.value for k in InvokerKind] == ["person", "group", "service", "schedule", "agent"]
    assert [c.value for c in InvokerChannel] == ["slack", "api", "ui", "webhook", "cron"]
