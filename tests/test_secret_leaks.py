"""After provisioning an access key or a Postgres login, its secret appears nowhere but Secrets
Manager (and, for Postgres, as a SCRAM verifier in the target): not in workflow history, the
inventory database, API responses or logs."""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from google.protobuf.json_format import MessageToDict
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from nhi.infra.aws_clients import AwsClients
from nhi.infra.db import transaction
from nhi.infra.logging import configure
from tests.bao_server import BaoServer
from tests.conftest import GithubApp, Service
from tests.helpers import ROLE_SCOPE, agent_body, bearer, eventually
from tests.pg_cluster import ADMIN, DATABASE, PgCluster, refused
from tests.test_github import github_policy
from tests.test_vault import kv_current, vault_policy


def _decoded_strings(node: Any) -> Iterator[str]:
    """Every string in a JSON tree, plus the decoded form of base64 payload data."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, str):
                try:
                    decoded = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    decoded = b""
                yield decoded.decode("utf-8", "replace")
            yield from _decoded_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _decoded_strings(item)
    elif isinstance(node, str):
        yield node


def _hits(secret: str, haystacks: list[str]) -> int:
    return sum(h.count(secret) for h in haystacks)


@pytest.mark.parametrize(
    "kind",
    ["iam_user_key", "postgres_role", "github_app_token", "vault_approle", "iam_user_key@vault_kv"],
)
async def test_the_secret_never_leaves_secrets_manager(
    kind: str,
    service: Service,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    cluster: PgCluster,
    github_app: GithubApp,
    bao: BaoServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `@vault_kv`: the same kind delivered into OpenBao's KV instead of Secrets Manager.
    kind, _, delivery = kind.partition("@")
    # The target's admin password reaches the worker through its environment, as deployed.
    monkeypatch.setenv("NHI_TARGET_PASSWORD_LEAK", cluster.admin_password)
    configure("DEBUG")  # the most verbose production setting, libraries included
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    responses: list[str] = []
    try:
        token = service.token("leak-check", "platform", teams=["search"])
        async with httpx.AsyncClient(
            base_url=service.url, timeout=30, headers=bearer(token)
        ) as http:

            async def call(method: str, path: str, **kw: Any) -> Any:
                response = await http.request(method, path, **kw)
                responses.append(response.text)
                assert response.status_code < 400, response.text
                return response.json()

            agent = await call("POST", "/v1/agents", json=agent_body())
            request: dict[str, Any] = {"platform": "aws", "kind": kind, "scope": ROLE_SCOPE}
            if kind == "postgres_role":
                target = f"leak{uuid.uuid4().hex[:8]}"
                admin = service.token("leak-admin", "admin")
                created = await http.post(
                    "/v1/targets",
                    headers=bearer(admin),
                    json={
                        "name": target,
                        "dsn": f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}",
                        "password_env": "NHI_TARGET_PASSWORD_LEAK",
                    },
                )
                responses.append(created.text)
                assert created.status_code == 201, created.text
                request = {
                    "platform": "postgres",
                    "kind": kind,
                    "target": target,
                    "scope": [{"actions": ["SELECT"], "resources": ["docs.articles"]}],
                }
            if kind == "github_app_token":
                github_policy(sessions)
                request = {
                    "platform": "github",
                    "kind": kind,
                    "scope": [{"actions": ["contents:read"], "resources": ["acme/api"]}],
                }
            if kind == "vault_approle":
                vault_policy(sessions)
                request = {
                    "platform": "vault",
                    "kind": kind,
                    "scope": [{"actions": ["read"], "resources": ["secret/data/app/*"]}],
                }
            if delivery:
                request["delivery"] = delivery
            accepted = await call("POST", f"/v1/agents/{agent['id']}/nhis", json=request)

            async def active() -> dict[str, Any]:
                nhi = await call("GET", f"/v1/nhis/{accepted['id']}")
                assert nhi["status"] == "active"
                return dict(nhi)

            nhi = await eventually(active)
            await call("GET", f"/v1/agents/{agent['id']}")
            await call("GET", "/v1/nhis", params={"limit": 1000})
            await call("GET", f"/v1/nhis/{accepted['id']}/events")
            await call("GET", "/openapi.json")
    finally:
        logging.getLogger().removeHandler(handler)
        configure("WARNING")

    if delivery:
        assert nhi["credential_ref"].startswith("vault-kv://secret/")
        delivered = kv_current(bao, "vault-kv:" + nhi["credential_ref"].split("/", 3)[3])
    else:
        delivered = json.loads(
            aws.secrets.get_secret_value(SecretId=nhi["credential_ref"], VersionStage="AWSCURRENT")[
                "SecretString"
            ]
        )
    postgres, github = kind == "postgres_role", kind == "github_app_token"
    vault = kind == "vault_approle"
    secret = delivered[
        "token"
        if github
        else "password"
        if postgres
        else "secret_id"
        if vault
        else "SecretAccessKey"
    ]
    # Not secret, and must be seen (a GitHub token's or a secret id's only trace in logs is
    # its request line).
    visible = (
        "/access_tokens"
        if github
        else "/secret-id"
        if vault
        else delivered["username" if postgres else "AccessKeyId"]
    )
    assert len(secret) >= 20
    if postgres:
        assert not refused(delivered), "the delivered login works"

    history = await service.env.client.get_workflow_handle(accepted["workflow_id"]).fetch_history()
    history_text = [json.dumps(MessageToDict(e)) for e in history.events]
    history_text += list(_decoded_strings([MessageToDict(e) for e in history.events]))
    assert any(nhi["name"] in h for h in history_text), "scan sees payloads"
    if not postgres and not github and not vault:
        assert any(visible in h for h in history_text)

    with transaction(sessions) as s:
        tables = s.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ).scalars()
        rows = [
            str(r)
            for table in tables
            for r in s.execute(text(f'SELECT t::text FROM "{table}" t')).scalars()
        ]
    assert any(str(nhi["id"]) in r for r in rows), "scan sees the inventory"

    logs = captured.getvalue()
    assert visible in logs, "scan sees the worker's logs"

    # The scanner finds the secret where it is, so zero hits below means absent, not unseen.
    assert _hits(secret, [json.dumps(delivered)]) == 1
    assert _hits(secret, history_text) == 0
    assert _hits(secret, rows) == 0
    assert _hits(secret, responses) == 0
    assert _hits(secret, [logs]) == 0
    # The GitHub App's private key (read by reference at every signing) is nowhere either:
    # any one line of its PEM body would do, the longest is checked.
    key_line = max(github_app.private_key.splitlines(), key=len)
    assert _hits(key_line, [github_app.private_key]) == 1
    for haystack in (history_text, rows, responses, [logs]):
        assert _hits(key_line, haystack) == 0
    # Nor is the token the service acts with in Vault.
    assert service.settings.vault_token is not None
    vault_token = service.settings.vault_token.get_secret_value()
    for haystack in (history_text, rows, responses, [logs]):
        assert _hits(vault_token, haystack) == 0


async def test_a_task_credential_appears_only_in_its_one_response(
    service: Service,
    sessions: sessionmaker[Session],
    cluster: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Task credentials (issue 15) are issued by the API process itself: the password and the
    STS secret key and session token are in the issuing response and nowhere else, not in the
    inventory (task_credentials rows, audit events, idempotency keys), the logs, the target's
    statement log, or the parents' workflow histories."""
    from models.enums import Role
    from nhi.rules.ids import lifecycle_workflow_id
    from nhi.services.auth import issue_token
    from tests.helpers import TRUST

    monkeypatch.setenv("NHI_TARGET_PASSWORD_TASKLEAK", cluster.admin_password)
    with transaction(sessions) as s:
        s.execute(
            text(
                "UPDATE policies SET allow_task_credentials = true WHERE environment = 'dev' "
                "AND kind IN ('postgres_role', 'iam_role')"
            )
        )
    configure("DEBUG")
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    responses: list[str] = []
    issued: list[dict[str, Any]] = []
    try:
        token = service.token("task-leak-check", "platform", teams=["search"])
        admin = service.token("task-leak-admin", "admin")
        async with httpx.AsyncClient(
            base_url=service.url, timeout=30, headers=bearer(token)
        ) as http:

            async def call(method: str, path: str, **kw: Any) -> Any:
                response = await http.request(method, path, **kw)
                responses.append(response.text)
                assert response.status_code < 400, response.text
                return response.json()

            target = f"tleak{uuid.uuid4().hex[:8]}"
            await call(
                "POST",
                "/v1/targets",
                headers=bearer(admin),
                json={
                    "name": target,
                    "dsn": f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}",
                    "password_env": "NHI_TARGET_PASSWORD_TASKLEAK",
                },
            )
            agent = await call("POST", "/v1/agents", json=agent_body())
            with transaction(sessions) as s:
                _, agent_token = issue_token(
                    s,
                    name=f"task-leak-agent-{uuid.uuid4().hex[:6]}",
                    role=Role.AGENT,
                    ttl="1h",
                    created_by="test:setup",
                    agent_id=uuid.UUID(agent["id"]),
                )
            parents = []
            for request in (
                {
                    "platform": "postgres",
                    "kind": "postgres_role",
                    "target": target,
                    "scope": [{"actions": ["SELECT"], "resources": ["docs.articles"]}],
                },
                {
                    "platform": "aws",
                    "kind": "iam_role",
                    "scope": ROLE_SCOPE,
                    "trust_principal": TRUST,
                },
            ):
                accepted = await call("POST", f"/v1/agents/{agent['id']}/nhis", json=request)

                async def active(nhi_id: str = accepted["id"]) -> dict[str, Any]:
                    nhi = await call("GET", f"/v1/nhis/{nhi_id}")
                    assert nhi["status"] == "active"
                    return dict(nhi)

                parents.append((accepted, await eventually(active)))
            for _, nhi in parents:
                # The one response that holds it (kept apart from the scanned responses).
                answer = await http.post(
                    f"/v1/nhis/{nhi['id']}/credentials",
                    headers={**bearer(agent_token), "Idempotency-Key": str(uuid.uuid4())},
                    json={"ttl": "15m", "task_id": "leak-task"},
                )
                assert answer.status_code == 201, answer.text
                issued.append(answer.json())
                await call("GET", f"/v1/nhis/{nhi['id']}/events")
            await call("GET", "/v1/nhis", params={"limit": 1000})
    finally:
        logging.getLogger().removeHandler(handler)
        configure("WARNING")
        with transaction(sessions) as s:
            s.execute(text("UPDATE policies SET allow_task_credentials = false"))

    pg, aws = issued[0]["postgres"], issued[1]["aws"]
    secrets = [pg["password"], aws["SecretAccessKey"], aws["SessionToken"]]
    assert all(len(secret) >= 20 for secret in secrets)
    assert not refused(pg), "the task credential works"

    history_text: list[str] = []
    for accepted, _ in parents:
        for wid in (accepted["workflow_id"], lifecycle_workflow_id(accepted["id"])):
            history = await service.env.client.get_workflow_handle(wid).fetch_history()
            events = [MessageToDict(e) for e in history.events]
            history_text += [json.dumps(e) for e in events] + list(_decoded_strings(events))
    assert any(parents[0][1]["name"] in h for h in history_text), "scan sees payloads"

    with transaction(sessions) as s:
        tables = s.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ).scalars()
        rows = [
            str(r)
            for table in tables
            for r in s.execute(text(f'SELECT t::text FROM "{table}" t')).scalars()
        ]
    assert any(issued[0]["name"] in r for r in rows), "scan sees task_credentials and audit"
    logs = captured.getvalue()
    assert issued[0]["name"] in logs, "scan sees the API's logs"
    target_log = cluster.server_log()
    assert issued[0]["name"] in target_log, "scan sees the target's statement log"

    for secret in secrets:
        assert _hits(secret, [json.dumps(issued)]) == 1
        assert _hits(secret, history_text) == 0
        assert _hits(secret, rows) == 0
        assert _hits(secret, responses) == 0
        assert _hits(secret, [logs]) == 0
        assert _hits(secret, [target_log]) == 0
