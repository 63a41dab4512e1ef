"""Authentication and authorization: every /v1 endpoint for every role, bad credentials, OIDC."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from models.enums import Role
from models.orm import Agent, ApiToken, AuditEvent, Nhi, Policy, Prompt, Sweep, Target
from nhi.auth import issue_token
from nhi.aws import AwsClients
from nhi.db import transaction
from tests.conftest import Service
from tests.helpers import ROLE_SCOPE, TRUST, ApiServer, agent_body, bearer, eventually, unique

OWNER = "owner@example.com"
PRINCIPALS: dict[str, tuple[str, list[str] | None, str | None]] = {
    "platform": ("platform", ["search"], "plat@example.com"),
    "platform_other_team": ("platform", ["billing"], "other@example.com"),
    "owner": ("platform", ["nowhere"], OWNER),  # owner rights come from the email alone
    "approver": ("approver", None, "appr@example.com"),
    "security": ("security", None, "sec@example.com"),
    "auditor": ("auditor", None, "aud@example.com"),
    "admin": ("admin", None, "adm@example.com"),
}
ALL = frozenset(PRINCIPALS)
READERS = frozenset({"platform", "owner", "security", "auditor", "admin"})

# (method, path template, body maker, who may) for every /v1 endpoint.
Case = tuple[str, str, Any, frozenset[str]]
CASES: list[Case] = [
    ("GET", "/v1/whoami", None, ALL),
    ("GET", "/v1/agents", None, ALL),
    ("POST", "/v1/agents", lambda w: agent_body(owner_email=OWNER), frozenset({"platform"})),
    ("GET", "/v1/agents/{agent}", None, READERS),
    ("POST", "/v1/agents/{agent}/nhis",
     lambda w: {"platform": "aws", "kind": "iam_role", "scope": ROLE_SCOPE, "trust_principal": TRUST},
     frozenset({"platform"})),
    ("POST", "/v1/agents/{agent}/complete", lambda w: {"reason": "matrix"}, frozenset({"platform", "owner", "security"})),
    ("GET", "/v1/nhis", None, ALL),
    ("GET", "/v1/nhis/{nhi}", None, READERS),
    ("GET", "/v1/nhis/{nhi}/events", None, READERS),
    ("GET", "/v1/nhis/{nhi}/lifecycle", None, READERS),
    ("POST", "/v1/nhis/{nhi}/approve", lambda w: {"reason": "ok"}, frozenset({"approver"})),
    ("POST", "/v1/nhis/{nhi}/deny", lambda w: {"reason": "no"}, frozenset({"approver"})),
    ("POST", "/v1/nhis/{nhi}/renew", lambda w: {}, frozenset({"owner"})),
    ("POST", "/v1/nhis/{nhi}/rotate", lambda w: {}, frozenset({"owner", "security"})),
    ("POST", "/v1/nhis/{nhi}/decommission", lambda w: {}, frozenset({"owner", "security"})),
    ("POST", "/v1/nhis/{nhi}/restore", lambda w: {}, frozenset({"owner"})),
    ("GET", "/v1/policies", None, ALL),
    ("PUT", "/v1/policies",
     lambda w: {"policies": [{"platform": "aws", "kind": "iam_role", "environment": "staging", "allowed": True,
                              "default_ttl": "30d", "max_lifetime": "90d"}]},
     frozenset({"admin"})),
    ("GET", "/v1/prompts", None, ALL),
    ("POST", "/v1/prompts/{prompt}/answer", lambda w: {"answer": "renew"}, frozenset({"owner"})),
    ("GET", "/v1/tokens", None, frozenset({"admin", "security", "auditor"})),
    ("POST", "/v1/tokens", lambda w: {"name": unique("tok"), "role": "auditor", "ttl": "1d"}, frozenset({"admin"})),
    ("POST", "/v1/tokens/{token}/revoke", None, frozenset({"admin"})),
    ("POST", "/v1/sweeps", lambda w: {"dry_run": True}, frozenset({"security"})),
    ("GET", "/v1/sweeps", None, frozenset({"security", "auditor", "admin"})),
    ("GET", "/v1/sweeps/{sweep}", None, frozenset({"security", "auditor", "admin"})),
    ("GET", "/v1/targets", None,
     frozenset({"platform", "platform_other_team", "owner", "security", "auditor", "admin"})),
    ("POST", "/v1/targets",
     lambda w: {"name": unique("tgt"), "dsn": "postgresql://nhi_admin@db:5432/app", "password_env": "PW"},
     frozenset({"admin"})),
    ("DELETE", "/v1/targets/{target}", None, frozenset({"admin"})),
]  # fmt: skip


def _world(sessions: sessionmaker[Session]) -> dict[str, str]:
    """An agent of team `search` owned by OWNER, an active NHI (no workflow), an open prompt,
    and a token to revoke: straight in the database."""
    now = datetime.now(UTC)
    with transaction(sessions) as s:
        agent = Agent(
            name=unique("authz"), category="rag", environment="dev", owner_email=OWNER,
            team="search", purpose="matrix", invokers=[], status="active", created_by="test",
        )  # fmt: skip
        s.add(agent)
        s.flush()
        nhi_id = uuid.uuid4()
        nhi = Nhi(
            id=nhi_id, agent_id=agent.id, platform="aws", kind="iam_role", name=f"nhi-authz-{nhi_id.hex}",
            granted_scope=ROLE_SCOPE, allowed_cidrs=[], status="active", requested_by="test",
            expires_at=now + timedelta(days=5), max_lifetime_at=now + timedelta(days=90),
        )  # fmt: skip
        s.add(nhi)
        s.flush()
        prompt = Prompt(
            nhi_id=nhi_id,
            kind="reminder",
            for_expires_at=nhi.expires_at,
            offset_seconds=86400,
            deliveries=[],
        )
        s.add(prompt)
        sweep = Sweep(
            provider="aws",
            dry_run=True,
            triggered_by="test",
            workflow_id=unique("sweep-wf"),
            status="completed",
            summary={},
            findings=[],
        )
        s.add(sweep)
        target = Target(
            name=unique("tgt"), host="db", port=5432, dbname="app", admin_user="nhi_admin",
            password_ref="env:PW", created_by="test",
        )  # fmt: skip
        s.add(target)
        row, _ = issue_token(
            s,
            name=unique("victim"),
            role=__import__("models.enums", fromlist=["Role"]).Role.AUDITOR,
            ttl="1d",
            created_by="test",
        )
        s.flush()
        return {
            "agent": str(agent.id),
            "nhi": str(nhi_id),
            "prompt": str(prompt.id),
            "token": row.name,
            "token_id": str(row.id),
            "agent_name": agent.name,
            "sweep": str(sweep.id),
            "target": target.name,
        }


def _snapshot(
    sessions: sessionmaker[Session], aws: AwsClients, iam_path: str, world: dict[str, str]
) -> tuple[Any, ...]:
    """Everything a call on this world could change (other tests' workflows may still be
    writing elsewhere)."""
    subjects = [world["agent"], world["nhi"], world["token_id"], world["target"]]
    with transaction(sessions) as s:
        state = (
            s.scalar(select(func.count()).select_from(Agent)),
            s.scalar(select(func.count()).select_from(ApiToken)),
            s.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.subject_id.in_(subjects))
            ),
            s.scalar(
                select(func.count())
                .select_from(Nhi)
                .where(Nhi.agent_id == uuid.UUID(world["agent"]))
            ),
            s.scalar(select(Agent.status).where(Agent.id == uuid.UUID(world["agent"]))),
            s.scalar(select(Nhi.status).where(Nhi.id == uuid.UUID(world["nhi"]))),
            s.scalar(select(Prompt.status).where(Prompt.id == uuid.UUID(world["prompt"]))),
            s.scalar(select(ApiToken.revoked_at).where(ApiToken.name == world["token"])),
            tuple(s.scalars(select(Policy.updated_at).order_by(Policy.id))),
            tuple(s.scalars(select(Target.name).order_by(Target.name))),
        )
    roles = [
        r
        for r in aws.iam.list_roles(PathPrefix=iam_path)["Roles"]
        if world["agent_name"] in r["RoleName"]
    ]
    return state, len(roles)


def _tokens(service: Service) -> dict[str, str]:
    return {
        who: service.token(f"matrix-{who.replace('_', '-')}", role, teams=teams, email=email)
        for who, (role, teams, email) in PRINCIPALS.items()
    }


@pytest.mark.parametrize(
    ("method", "path", "body", "allowed"), CASES, ids=[f"{m} {p}" for m, p, _, _ in CASES]
)
async def test_every_endpoint_for_every_role(
    service: Service, sessions: sessionmaker[Session], aws: AwsClients,
    method: str, path: str, body: Any, allowed: frozenset[str],
) -> None:  # fmt: skip
    tokens = _tokens(service)
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
        # Refusals first: an allowed call may start work that changes the database later.
        order = (
            [None]
            + [w for w in PRINCIPALS if w not in allowed]
            + [w for w in PRINCIPALS if w in allowed]
        )
        for who in order:
            world = _world(sessions)
            url = path.format(**world)
            payload = body(world) if body else None
            before = _snapshot(sessions, aws, service.settings.iam_path, world)
            headers = bearer(tokens[who]) if who else {}
            response = await http.request(method, url, json=payload, headers=headers)
            if who is None:
                assert response.status_code == 401, (url, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
            elif who in allowed:
                assert response.status_code not in (401, 403), (who, url, response.text)
                assert response.status_code < 500, (who, url, response.text)
                continue
            else:
                assert response.status_code == 403, (who, url, response.status_code, response.text)
                assert response.json()["detail"]
            assert _snapshot(sessions, aws, service.settings.iam_path, world) == before, (
                f"{who} {method} {url} changed something"
            )


def test_the_matrix_covers_every_v1_endpoint() -> None:
    paths = create_app().openapi()["paths"]
    routes = {
        (method.upper(), path)
        for path, ops in paths.items()
        if path.startswith("/v1")
        for method in ops
    }
    covered = {(m, p.replace("{agent}", "{agent_id}").replace("{nhi}", "{nhi_id}")
                .replace("{prompt}", "{prompt_id}").replace("{token}", "{name}").replace("{sweep}", "{sweep_id}")
                .replace("{target}", "{name}")) for m, p, _, _ in CASES}  # fmt: skip
    assert routes == covered


async def test_bad_api_tokens_are_refused(
    service: Service, sessions: sessionmaker[Session]
) -> None:

    with transaction(sessions) as s:
        _, expired = issue_token(
            s, name=unique("expired"), role=Role.AUDITOR, ttl="1h", created_by="test",
            now=datetime.now(UTC) - timedelta(hours=2),
        )  # fmt: skip
    good = service.token(unique("good"), "auditor")
    revoked_name = unique("revoked")
    revoked = service.token(revoked_name, "auditor")
    admin = service.token("matrix-admin", "admin")
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
        assert (await http.get("/v1/whoami", headers=bearer(good))).status_code == 200
        assert (await http.get("/v1/whoami", headers=bearer(revoked))).status_code == 200
        assert (
            await http.post(f"/v1/tokens/{revoked_name}/revoke", headers=bearer(admin))
        ).status_code == 200
        tampered = good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1]
        for token in (expired, revoked, tampered, "nhi_not-a-token", "garbage"):
            response = await http.get("/v1/agents", headers=bearer(token))
            assert response.status_code == 401, token
        for header in ({"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}, {}):
            assert (await http.get("/v1/agents", headers=header)).status_code == 401
        # Open endpoints stay open.
        assert (await http.get("/healthz")).status_code == 200


def test_tokens_are_stored_only_as_hashes(
    service: Service, sessions: sessionmaker[Session]
) -> None:
    token = service.token(unique("hashed"), "auditor")
    with transaction(sessions) as s:
        dump = " ".join(
            str(r) for r in s.execute(text("SELECT t::text FROM api_tokens t")).scalars()
        )
        trail = " ".join(
            str(r) for r in s.execute(text("SELECT t::text FROM audit_events t")).scalars()
        )
    assert token not in dump and token not in trail


# ---- OIDC ------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def oidc(service: Service) -> AsyncIterator[dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk |= {"kid": "k1", "use": "sig", "alg": "RS256"}
    settings = service.settings.model_copy(
        update={
            "oidc_issuer": "https://idp.example.com",
            "oidc_audience": "nhi-lifecycle",
            "oidc_jwks": json.dumps({"keys": [jwk]}),
        }
    )

    def mint_jwt(sub: str, *, roles: list[str], teams: list[str] | None = None, email: str | None = None,
                 aud: str = "nhi-lifecycle", iss: str = "https://idp.example.com", exp: int | None = None,
                 signer: Any = key) -> str:  # fmt: skip
        claims = {"sub": sub, "iss": iss, "aud": aud, "exp": exp or int(time.time()) + 300,
                  "roles": roles, "teams": teams or [], "email": email}  # fmt: skip
        return jwt.encode(claims, signer, algorithm="RS256", headers={"kid": "k1"})

    with ApiServer(create_app(settings)) as server:
        yield {"url": server.url, "mint": mint_jwt, "other": other}


async def test_oidc_tokens_are_checked_and_mapped(
    oidc: dict[str, Any], sessions: sessionmaker[Session]
) -> None:
    mint_jwt = oidc["mint"]
    async with httpx.AsyncClient(base_url=oidc["url"], timeout=30) as http:
        good = mint_jwt(
            "ana-sub", roles=["platform", "approver"], teams=["search"], email="Ana@Example.com"
        )
        who = (await http.get("/v1/whoami", headers=bearer(good))).json()
        assert who == {
            "actor": "oidc:ana-sub",
            "roles": ["approver", "platform"],
            "teams": ["search"],
            "email": "ana@example.com",
        }
        refused = [
            mint_jwt("x", roles=["admin"], aud="someone-else"),
            mint_jwt("x", roles=["admin"], iss="https://evil.example.com"),
            mint_jwt("x", roles=["admin"], exp=int(time.time()) - 60),
            mint_jwt("x", roles=["admin"], signer=oidc["other"]),
            good[:-4] + "AAAA",
        ]
        for token in refused:
            assert (await http.get("/v1/whoami", headers=bearer(token))).status_code == 401

        # A platform user of team search cannot act for team billing.
        billing = agent_body(team="billing")
        assert (
            await http.post("/v1/agents", json=billing, headers=bearer(good))
        ).status_code == 403
        created = await http.post("/v1/agents", json=agent_body(), headers=bearer(good))
        assert created.status_code == 201 and created.json()["created_by"] == "oidc:ana-sub"

        # Someone who is both platform and approver still cannot approve their own request.
        sensitive = {"platform": "aws", "kind": "iam_role", "trust_principal": TRUST,
                     "scope": [{"actions": ["s3:DeleteObject"], "resources": ["arn:aws:s3:::tmp/*"]}]}  # fmt: skip
        accepted = await http.post(
            f"/v1/agents/{created.json()['id']}/nhis", json=sensitive, headers=bearer(good)
        )
        assert accepted.status_code == 202 and accepted.json()["status"] == "pending_approval"
        nhi_id = accepted.json()["id"]
        own = await http.post(
            f"/v1/nhis/{nhi_id}/approve", json={"reason": "mine"}, headers=bearer(good)
        )
        assert own.status_code == 403 and "cannot decide" in own.json()["detail"]
        other_approver = mint_jwt("bo-sub", roles=["approver"], email="bo@example.com")

        async def approved() -> None:
            response = await http.post(
                f"/v1/nhis/{nhi_id}/approve",
                json={"reason": "fine"},
                headers=bearer(other_approver),
            )
            assert response.status_code == 200, response.text

        await eventually(approved)

        async def audited() -> None:
            with transaction(sessions) as s:
                actors = set(
                    s.scalars(select(AuditEvent.actor).where(AuditEvent.subject_id == nhi_id))
                )
            assert {"oidc:ana-sub", "oidc:bo-sub"} <= actors
            assert not any(a == "api" or a.startswith("api:") for a in actors)

        await eventually(audited)


async def test_platform_of_team_a_cannot_provision_for_team_b(service: Service) -> None:
    team_a = service.token("team-a-platform", "platform", teams=["team-a"])
    team_b = service.token("team-b-platform", "platform", teams=["team-b"])
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
        agent = (
            await http.post("/v1/agents", json=agent_body(team="team-b"), headers=bearer(team_b))
        ).json()
        body = {
            "platform": "aws",
            "kind": "iam_role",
            "scope": ROLE_SCOPE,
            "trust_principal": TRUST,
        }
        refused = await http.post(
            f"/v1/agents/{agent['id']}/nhis", json=body, headers=bearer(team_a)
        )
        assert (
            refused.status_code == 403
            and "not platform for team team-b" in refused.json()["detail"]
        )
        assert (
            await http.get(f"/v1/agents/{agent['id']}", headers=bearer(team_a))
        ).status_code == 403
        listed = (
            await http.get("/v1/agents", headers=bearer(team_a), params={"limit": 1000})
        ).json()
        assert agent["id"] not in {a["id"] for a in listed}
        assert (await http.get(f"/v1/agents/{agent['id']}", headers=bearer(team_b))).json()[
            "nhis"
        ] == []
