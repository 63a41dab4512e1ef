"""Workload identities (issue 15): a JWT subject of a trusted workload issuer, bound to one
agent, acts as that agent (role `agent`) and issues task credentials for its agent's NHIs and
nothing else. JWTs are minted with a test key and checked by the API as a platform's would be
(signature by JWKS, expiry, issuer, audience); issuance runs against the real scram-sha-256
cluster and moto, reusing the parents of tests/test_task_credentials.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from activities.providers.registry import build_task_providers
from api.app import create_app
from models.orm import AgentWorkload, AuditEvent
from nhi.infra.aws_clients import make_aws_clients
from nhi.infra.config import Settings, WorkloadIssuerSetting
from nhi.infra.db import transaction
from nhi.services.target_registry import TargetRegistry
from tests.conftest import Service
from tests.helpers import ApiServer, agent_body, bearer
from tests.test_task_credentials import (  # noqa: F401 (module-scoped fixtures reused here)
    World,
    _issued_event,
    _login,
    target_password,
    world,
)

K8S = "https://oidc.k8s.example.com"
GITHUB = "https://token.actions.githubusercontent.com"
AUDIENCE = "nhi-workloads"
PEOPLE = "https://idp.example.com"


@dataclass
class Fed:
    """An API that trusts two workload issuers and the company IdP, over the world's
    inventory, with a JWT minter and the world's parents."""

    url: str
    world: World
    key: Any
    other_key: Any
    platform: str
    auditor: str
    admin: str

    def mint(self, sub: str, *, iss: str = K8S, aud: str | list[str] = AUDIENCE,
             exp: int | None = None, signer: Any = None, **extra: Any) -> str:  # fmt: skip
        claims = {"sub": sub, "iss": iss, "aud": aud, "exp": exp or int(time.time()) + 300}
        return jwt.encode(
            claims | extra, signer or self.key, algorithm="RS256", headers={"kid": "k1"}
        )

    async def call(self, method: str, path: str, token: str, **kw: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
            return await http.request(method, path, headers=bearer(token), **kw)

    async def issue(self, token: str, nhi: dict[str, Any], **body: Any) -> httpx.Response:
        return await self.call("POST", f"/v1/nhis/{nhi['id']}/credentials", token, json=body)

    async def bind(self, agent_id: object, subject: str, *, token: str | None = None,
                   issuer: str = K8S, reason: str = "runtime of the agent") -> httpx.Response:  # fmt: skip
        body = {"issuer": issuer, "subject": subject, "reason": reason}
        return await self.call(
            "POST", f"/v1/agents/{agent_id}/workloads", token or self.platform, json=body
        )


@pytest_asyncio.fixture(scope="module")
async def fed(
    world: World,  # noqa: F811 (the imported fixture, by name)
    service: Service,
    sessions: sessionmaker[Session],
) -> AsyncIterator[Fed]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = {"keys": [jwk | {"kid": "k1", "use": "sig", "alg": "RS256"}]}
    settings = service.settings.model_copy(
        update={
            "workload_oidc_issuers": [
                WorkloadIssuerSetting(issuer=K8S, audience=AUDIENCE, jwks=jwks),
                WorkloadIssuerSetting(issuer=GITHUB, audience=AUDIENCE, jwks=jwks),
                # The company IdP may issue workload tokens too, told apart by audience.
                WorkloadIssuerSetting(issuer=PEOPLE, audience=AUDIENCE, jwks=jwks),
            ],
            "oidc_issuer": PEOPLE,
            "oidc_audience": "nhi-lifecycle",
            "oidc_jwks": json.dumps(jwks),
        }
    )
    app = create_app(settings)
    with ApiServer(app) as server:
        aws = make_aws_clients(settings)
        app.state.nhi.task_issuers = build_task_providers(
            aws, TargetRegistry(sessions, settings, aws.secrets)
        )
        yield Fed(
            url=server.url,
            world=world,
            key=key,
            other_key=other,
            platform=service.token("tc-platform", "platform", teams=["search"]),
            auditor=service.token("wl-auditor", "auditor"),
            admin=service.token("wl-admin", "admin"),
        )


def _sub() -> str:
    return f"system:serviceaccount:agents:kb-{uuid.uuid4().hex[:8]}"


def _trail(sessions: sessionmaker[Session], agent_id: object, event: str) -> list[AuditEvent]:
    with transaction(sessions) as s:
        rows = list(
            s.scalars(
                select(AuditEvent).where(
                    AuditEvent.subject_id == str(agent_id), AuditEvent.event == event
                )
            )
        )
        s.expunge_all()
    return rows


# ---- issuing with a workload JWT -------------------------------------------------------------


async def test_a_bound_workload_issues_task_credentials_for_its_agent(fed: Fed) -> None:
    w = fed.world
    sub = _sub()
    bound = await fed.bind(w.agent_id, sub)
    assert bound.status_code == 201, bound.text
    token = fed.mint(sub)

    who = (await fed.call("GET", "/v1/whoami", token)).json()
    assert who == {"actor": f"workload:{K8S}#{sub}", "roles": ["agent"], "teams": [], "email": None}

    answer = await fed.issue(token, w.pg_nhi, ttl="15m", task_id="wl-task-1")
    assert answer.status_code == 201, answer.text
    issued = answer.json()
    assert issued["agent_id"] == str(w.agent_id)
    with await asyncio.to_thread(_login, issued["postgres"]) as conn:
        assert conn.execute("SELECT count(*) FROM docs.articles").fetchone() is not None
    event = _issued_event(w, issued["id"], w.pg_nhi["id"])
    assert event.actor == f"workload:{K8S}#{sub}"

    aws = await fed.issue(token, w.aws_nhi, ttl="15m", task_id="wl-task-2")
    assert aws.status_code == 201, aws.text
    assert aws.json()["aws"]["SourceIdentity"] == f"agent-{w.agent_id}"


async def test_a_workload_issues_only_for_its_own_agent_and_reads_nothing(fed: Fed) -> None:
    w = fed.world
    other = await fed.call("POST", "/v1/agents", fed.platform, json=agent_body())
    assert other.status_code == 201, other.text
    sub = _sub()
    assert (await fed.bind(other.json()["id"], sub)).status_code == 201
    token = fed.mint(sub)
    refused = await fed.issue(token, w.pg_nhi)
    assert refused.status_code == 403, refused.text
    assert "own" in refused.json()["detail"]
    # Like an agent token it reads nothing, not even its own agent or its bindings.
    for path in (f"/v1/nhis/{w.pg_nhi['id']}", f"/v1/agents/{other.json()['id']}",
                 f"/v1/agents/{other.json()['id']}/workloads"):  # fmt: skip
        assert (await fed.call("GET", path, token)).status_code == 404, path
    assert (await fed.call("GET", "/v1/agents", token)).json() == []
    # Nor does it change anything: binding itself to more is refused.
    more = await fed.bind(other.json()["id"], _sub(), token=token)
    assert more.status_code == 404, more.text


async def test_unbound_untrusted_and_malformed_jwts_are_401(fed: Fed) -> None:
    w = fed.world
    sub = _sub()
    assert (await fed.bind(w.agent_id, sub)).status_code == 201
    unbound = await fed.issue(fed.mint(_sub()), w.pg_nhi)
    assert unbound.status_code == 401 and "not bound" in unbound.json()["detail"]
    refused = [
        fed.mint(sub, iss="https://evil.example.com"),  # an issuer nobody trusts
        fed.mint(sub, aud="someone-else"),  # the right issuer, not our audience
        fed.mint(sub, exp=int(time.time()) - 60),
        fed.mint(sub, signer=fed.other_key),
        fed.mint(sub)[:-4] + "AAAA",
        # Bound under one issuer is not bound under another, even with the same subject.
        fed.mint(sub, iss=GITHUB),
    ]
    for token in refused:
        answer = await fed.issue(token, w.pg_nhi)
        assert answer.status_code == 401, answer.text
        assert answer.headers["www-authenticate"] == "Bearer"
    assert (await fed.issue(fed.mint(sub, aud=[AUDIENCE, "x"]), w.pg_nhi)).status_code == 201


async def test_the_company_idp_is_told_apart_by_audience(fed: Fed) -> None:
    """A person's token of the company IdP stays a person (and never an agent, whatever its
    roles claim); the same issuer's token with the workload audience is a workload."""
    w = fed.world
    person = fed.mint("ana-sub", iss=PEOPLE, aud="nhi-lifecycle", roles=["agent", "auditor"])
    who = (await fed.call("GET", "/v1/whoami", person)).json()
    assert who["actor"] == "oidc:ana-sub" and who["roles"] == ["auditor"]
    sub = f"workload-{uuid.uuid4().hex[:8]}"
    assert (await fed.bind(w.agent_id, sub, issuer=PEOPLE)).status_code == 201
    workload = await fed.call("GET", "/v1/whoami", fed.mint(sub, iss=PEOPLE))
    assert workload.json()["actor"] == f"workload:{PEOPLE}#{sub}"


# ---- managing bindings -------------------------------------------------------------------------


async def test_a_subject_is_bound_to_one_agent_only(fed: Fed) -> None:
    w = fed.world
    other = (await fed.call("POST", "/v1/agents", fed.platform, json=agent_body())).json()
    sub = _sub()
    assert (await fed.bind(w.agent_id, sub)).status_code == 201
    for agent_id in (other["id"], w.agent_id):
        again = await fed.bind(agent_id, sub)
        assert again.status_code == 409, again.text
        assert again.json()["field"] == "subject"
    # The same subject under another trusted issuer is another workload.
    assert (await fed.bind(other["id"], sub, issuer=GITHUB)).status_code == 201


async def test_bad_bindings_are_refused_naming_the_field(fed: Fed) -> None:
    w = fed.world
    cases = [
        ({"issuer": "https://evil.example.com", "subject": "x"}, "issuer"),
        ({"issuer": K8S, "subject": "two words"}, "subject"),
        ({"issuer": K8S, "subject": "repo:org/*"}, "subject"),
        ({"issuer": K8S, "subject": ""}, "subject"),
        ({"issuer": K8S, "subject": "a\u202eb"}, "subject"),
        ({"issuer": K8S, "subject": "s" * 240}, "subject"),  # past the actor's 254 characters
    ]
    for body, field in cases:
        answer = await fed.call(
            "POST", f"/v1/agents/{w.agent_id}/workloads", fed.platform, json=body
        )
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["detail"].startswith(field), answer.text
    with transaction(w.sessions) as s:
        assert s.scalar(select(AgentWorkload.id).where(AgentWorkload.subject == "x")) is None


async def test_only_who_may_change_the_agent_binds(fed: Fed, service: Service) -> None:
    w = fed.world
    auditor = await fed.bind(w.agent_id, _sub(), token=fed.auditor)
    assert auditor.status_code == 403, auditor.text
    stranger = service.token("wl-billing", "platform", teams=["billing"])
    assert (await fed.bind(w.agent_id, _sub(), token=stranger)).status_code == 404
    assert (await fed.bind(w.agent_id, _sub(), token=fed.admin)).status_code == 201
    listed = await fed.call("GET", f"/v1/agents/{w.agent_id}/workloads", fed.auditor)
    assert listed.status_code == 200 and listed.json()


async def test_unbinding_refuses_the_next_request_and_both_changes_are_audited(fed: Fed) -> None:
    w = fed.world
    sub = _sub()
    bound = (await fed.bind(w.agent_id, sub, reason="kb-bot runs in agents/kb")).json()
    token = fed.mint(sub)
    assert (await fed.issue(token, w.pg_nhi, ttl="5m")).status_code == 201
    path = f"/v1/agents/{w.agent_id}/workloads/{bound['id']}"
    assert (await fed.call("DELETE", path, fed.auditor)).status_code == 403
    removed = await fed.call("DELETE", path, fed.platform, params={"reason": "moved to prod"})
    assert removed.status_code == 204, removed.text
    after = await fed.issue(token, w.pg_nhi, ttl="5m")
    assert after.status_code == 401 and "not bound" in after.json()["detail"]
    assert (await fed.call("DELETE", path, fed.platform)).status_code == 404

    [added] = [e for e in _trail(w.sessions, w.agent_id, "agent.workload_bound")
               if e.details["workload_id"] == bound["id"]]  # fmt: skip
    [gone] = [e for e in _trail(w.sessions, w.agent_id, "agent.workload_unbound")
              if e.details["workload_id"] == bound["id"]]  # fmt: skip
    assert added.actor == gone.actor == "token:tc-platform"
    assert (added.reason, gone.reason) == ("kb-bot runs in agents/kb", "moved to prod")
    assert added.details == {"workload_id": bound["id"], "issuer": K8S, "subject": sub}


def _cli(fed: Fed, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NHI_API_URL=fed.url, NHI_TOKEN=token or fed.platform)
    nhi = str(Path(sys.executable).parent / "nhi")
    return subprocess.run([nhi, *args], env=env, capture_output=True, text=True, timeout=60)


async def test_the_cli_adds_lists_and_removes(fed: Fed) -> None:
    agent = str(fed.world.agent_id)
    sub = _sub()
    added = await asyncio.to_thread(
        _cli, fed, "--json", "agents", "workloads", "add", agent, "--issuer", K8S, "--subject", sub
    )
    assert added.returncode == 0, added.stderr
    binding = json.loads(added.stdout)["id"]
    listed = await asyncio.to_thread(_cli, fed, "agents", "workloads", "list", agent)
    assert sub in listed.stdout
    # The runtime's own token works wherever an API token does.
    issued = await asyncio.to_thread(
        _cli,
        fed,
        "credentials",
        "issue",
        fed.world.pg_nhi["id"],
        "--ttl",
        "5m",
        token=fed.mint(sub),
    )
    assert issued.returncode == 0 and "PGPASSWORD" in issued.stdout, issued.stderr
    dup = await asyncio.to_thread(
        _cli, fed, "agents", "workloads", "add", agent, "--issuer", K8S, "--subject", sub
    )
    assert dup.returncode == 1 and len(dup.stderr.strip().splitlines()) == 1, dup.stderr
    assert "409" in dup.stderr
    removed = await asyncio.to_thread(
        _cli, fed, "agents", "workloads", "remove", agent, binding, "--reason", "cli test"
    )
    assert removed.returncode == 0 and binding in removed.stdout, removed.stderr


# ---- settings ------------------------------------------------------------------------------------


def test_workload_issuers_are_checked_at_start() -> None:
    jwks: dict[str, Any] = {"keys": []}
    with pytest.raises(ValidationError, match="jwks"):
        WorkloadIssuerSetting(issuer=K8S, audience=AUDIENCE)
    with pytest.raises(ValidationError, match="workload_oidc_issuers"):
        Settings(
            oidc_issuer=PEOPLE,
            oidc_audience="nhi-lifecycle",
            workload_oidc_issuers=[{"issuer": PEOPLE, "audience": "nhi-lifecycle", "jwks": jwks}],
        )
    with pytest.raises(ValidationError, match="listed twice"):
        Settings(
            workload_oidc_issuers=[
                {"issuer": K8S, "audience": "a", "jwks": jwks},
                {"issuer": K8S, "audience": "b", "jwks": jwks},
            ]
        )
    got = Settings(
        workload_oidc_issuers=[{"issuer": K8S, "audience": AUDIENCE, "jwks_url": "https://k/jwks"}]
    )
    assert got.workload_oidc_issuers[0].jwks_url == "https://k/jwks"
