"""Authentication and authorization: bad credentials, OIDC, teams, four-eyes by person, trust
accounts, and 404 for what a caller may not see. (Every operation for every role:
tests/test_authz_matrix.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from api.app import create_app
from models.contracts import ApprovalDecision
from models.enums import Role
from models.orm import ApiToken, AuditEvent, Nhi
from nhi.infra.db import transaction
from nhi.services.auth import hash_token, issue_token
from tests.conftest import Service
from tests.helpers import ROLE_SCOPE, TRUST, ApiServer, agent_body, bearer, eventually, unique
from workflows.provision import ProvisionNhiWorkflow


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
        # Team B's agent is invisible to team A: 404, worded exactly like a missing agent.
        refused = await http.post(
            f"/v1/agents/{agent['id']}/nhis", json=body, headers=bearer(team_a)
        )
        assert refused.status_code == 404, refused.text
        assert refused.json()["detail"] == f"agent {agent['id']} not found"
        assert (
            await http.get(f"/v1/agents/{agent['id']}", headers=bearer(team_a))
        ).status_code == 404
        listed = (
            await http.get("/v1/agents", headers=bearer(team_a), params={"limit": 1000})
        ).json()
        assert agent["id"] not in {a["id"] for a in listed}
        assert (await http.get(f"/v1/agents/{agent['id']}", headers=bearer(team_b))).json()[
            "nhis"
        ] == []


# ---- teams, persons, trust accounts ---------------------------------------------------------


async def test_platform_tokens_name_their_teams(
    service: Service, sessions: sessionmaker[Session]
) -> None:
    admin = service.token("auth-admin", "admin")
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
        for teams in (None, []):
            body: dict[str, Any] = {"name": unique("tok"), "role": "platform", "ttl": "1d"}
            if teams is not None:
                body["teams"] = teams
            response = await http.post("/v1/tokens", json=body, headers=bearer(admin))
            assert response.status_code == 422, response.text
            assert response.json()["field"] == "teams"
        # A token issued before teams were required (teams NULL) acts for no team at all.
        legacy = "nhi_" + uuid.uuid4().hex
        with transaction(sessions) as s:
            s.add(
                ApiToken(
                    name=unique("legacy"), role="platform", teams=None, email=None,
                    token_hash=hash_token(legacy), created_by="test:legacy",
                    expires_at=datetime.now(UTC) + timedelta(days=1),
                )
            )  # fmt: skip
        search = service.token("auth-search", "platform", teams=["search"])
        agent = (await http.post("/v1/agents", json=agent_body(), headers=bearer(search))).json()
        created = await http.post("/v1/agents", json=agent_body(), headers=bearer(legacy))
        assert created.status_code == 403 and "not platform for team search" in created.text
        listed = await http.get("/v1/agents", params={"limit": 1000}, headers=bearer(legacy))
        assert listed.status_code == 200 and listed.json() == []
        shown = await http.get(f"/v1/agents/{agent['id']}", headers=bearer(legacy))
        assert shown.status_code == 404
        who = (await http.get("/v1/whoami", headers=bearer(legacy))).json()
        assert who["teams"] == []


SENSITIVE = [{"actions": ["s3:DeleteObject"], "resources": ["arn:aws:s3:::tmp/*"]}]


async def test_four_eyes_compares_people_not_credentials(
    service: Service, sessions: sessionmaker[Session]
) -> None:
    ana = service.token("ana-platform", "platform", teams=["search"], email="ana@example.com")
    # Ana again, with the approver token she also holds: the same person.
    ana_approver = service.token("ana-approver", "approver", email="Ana@Example.com")
    bo = service.token("bo-approver", "approver", email="bo@example.com")
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
        agent = (await http.post("/v1/agents", json=agent_body(), headers=bearer(ana))).json()
        body = {"platform": "aws", "kind": "iam_role", "trust_principal": TRUST, "scope": SENSITIVE}
        accepted = await http.post(f"/v1/agents/{agent['id']}/nhis", json=body, headers=bearer(ana))
        assert accepted.status_code == 202 and accepted.json()["status"] == "pending_approval"
        nhi_id = accepted.json()["id"]
        for decision in ("approve", "deny"):
            own = await http.post(
                f"/v1/nhis/{nhi_id}/{decision}", json={"reason": "mine"},
                headers=bearer(ana_approver),
            )  # fmt: skip
            assert own.status_code == 403, own.text
            assert "cannot decide" in own.json()["detail"]

        # The workflow's validator compares people as well, whatever reaches it.
        handle = service.env.client.get_workflow_handle_for(
            ProvisionNhiWorkflow.run, accepted.json()["workflow_id"]
        )
        with pytest.raises(WorkflowUpdateFailedError) as err:
            await handle.execute_update(
                ProvisionNhiWorkflow.decide,
                ApprovalDecision(
                    approve=True, approver="token:someone-else", reason="sneaky",
                    approver_person="email:ana@example.com",
                ),
            )  # fmt: skip
        cause = err.value.cause
        assert isinstance(cause, ApplicationError) and cause.type == "SelfApproval"
        with transaction(sessions) as s:
            assert s.get_one(Nhi, uuid.UUID(nhi_id)).status == "pending_approval"

        async def approved() -> None:
            response = await http.post(
                f"/v1/nhis/{nhi_id}/approve", json={"reason": "fine"}, headers=bearer(bo)
            )
            assert response.status_code == 200, response.text

        await eventually(approved)


OTHER_ACCOUNT, PARTNER_ACCOUNT = "999999999999", "210987654321"


def _policy_in(out: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A policy as PUT takes it, from a policy as GET shows it."""
    keep = ("platform", "kind", "environment", "allowed", "allow_resource_wildcard",
            "forbidden_actions", "sensitive_actions", "allowed_trust_accounts",
            "allow_service_principals")  # fmt: skip
    body = {k: out[k] for k in keep} | {
        "default_ttl": out["default_ttl_seconds"],
        "max_lifetime": out["max_lifetime_seconds"],
        "rotation_period": out["rotation_period_seconds"],
        "reminder_offsets": out["reminder_offsets_seconds"],
        "grace_period": out["grace_period_seconds"],
        "max_session_duration": out["max_session_duration_seconds"],
    }
    return body | changes


async def test_trust_principals_stay_within_the_policys_accounts(
    service: Service, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    platform = service.token("trust-platform", "platform", teams=["search"])
    admin = service.token("auth-admin", "admin")
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:

        async def request(env: str, principal: str) -> httpx.Response:
            agent = await http.post(
                "/v1/agents", json=agent_body(environment=env), headers=bearer(platform)
            )
            assert agent.status_code == 201, agent.text
            return await http.post(
                f"/v1/agents/{agent.json()['id']}/nhis",
                json={"platform": "aws", "kind": "iam_role", "scope": ROLE_SCOPE,
                      "trust_principal": principal},
                headers=bearer(platform),
            )  # fmt: skip

        def nhi_count() -> int:
            with transaction(sessions) as s:
                return int(s.scalar(select(func.count()).select_from(Nhi)) or 0)

        # The README's example: a role of this service's own account (moto's 123456789012).
        own = await request("dev", "arn:aws:iam::123456789012:role/support-bot-runtime")
        assert own.status_code == 202, own.text
        before = nhi_count()
        for principal, words in (
            (f"arn:aws:iam::{OTHER_ACCOUNT}:root", f"account {OTHER_ACCOUNT}"),
            (f"arn:aws:iam::{PARTNER_ACCOUNT}:role/agent", "allowed_trust_accounts"),
            ("bedrock.amazonaws.com", "allow_service_principals"),
        ):
            refused = await request("dev", principal)
            assert refused.status_code == 422, refused.text
            assert refused.json()["field"] == "trust_principal" and words in refused.text
        assert nhi_count() == before

        # A policy names a partner account and allows service principals (staging only).
        shown = (await http.get("/v1/policies", headers=bearer(admin))).json()
        staging = next(
            p for p in shown
            if (p["platform"], p["kind"], p["environment"]) == ("aws", "iam_role", "staging")
        )  # fmt: skip
        assert staging["allowed_trust_accounts"] == [] and not staging["allow_service_principals"]
        bad = await http.put(
            "/v1/policies", headers=bearer(admin),
            json={"policies": [_policy_in(staging, allowed_trust_accounts=[210987654321])]},
        )  # fmt: skip
        assert bad.status_code == 422 and bad.json()["field"] == (
            "policies[0].allowed_trust_accounts[0]"
        )
        # Through `nhi policies apply FILE`, as an operator would (account ids quoted in YAML).
        opened = _policy_in(
            staging, allowed_trust_accounts=[PARTNER_ACCOUNT], allow_service_principals=True
        )
        (tmp_path / "policy.yaml").write_text(yaml.safe_dump([opened]))
        assert f"- '{PARTNER_ACCOUNT}'" in (tmp_path / "policy.yaml").read_text()
        env = dict(os.environ, NHI_API_URL=service.url, NHI_TOKEN=admin)
        applied = await asyncio.to_thread(
            subprocess.run,
            [str(Path(sys.executable).parent / "nhi"), "--json", "policies", "apply",
             str(tmp_path / "policy.yaml")],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        try:
            assert applied.returncode == 0, applied.stderr
            assert json.loads(applied.stdout)[0]["allowed_trust_accounts"] == [PARTNER_ACCOUNT]
            partner = await request("staging", f"arn:aws:iam::{PARTNER_ACCOUNT}:role/agent")
            assert partner.status_code == 202, partner.text
            assert (await request("staging", "bedrock.amazonaws.com")).status_code == 202
            stranger = await request("staging", f"arn:aws:iam::{OTHER_ACCOUNT}:root")
            assert stranger.status_code == 422 and stranger.json()["field"] == "trust_principal"
        finally:
            restored = await http.put(
                "/v1/policies", json={"policies": [_policy_in(staging)]}, headers=bearer(admin)
            )
            assert restored.status_code == 200, restored.text
