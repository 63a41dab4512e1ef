"""`github_app_token` NHIs against the GitHub emulator (tests/github_emulator.py): the token
reaches only its repositories and permissions, is re-issued before it lapses, is revoked at
decommission, and a sweep reports drift when the installation's permissions change. The
lifecycle runs on the time-skipping server with the real worker; the emulator's token clock is
the server's virtual clock, so "lapses after an hour" is GitHub's rule, not ours."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.testing import WorkflowEnvironment

from activities.providers.github_task import GithubTaskProvider
from models.contracts import FindingKind, LifecycleAction, Phase, ScopeStatement
from models.enums import NhiKind
from models.orm import AuditEvent, Nhi
from models.schemas import PolicyIn
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.rules.github_scope import parse_token_scope, validate_github_scope
from nhi.rules.policy import PolicyRules, RuleViolation
from nhi.rules.task_credentials import TaskGrant
from nhi.services.policies import apply_policy
from tests.conftest import GITHUB_APP_PERMISSIONS, GithubApp, Service, dev_address
from tests.github_emulator import GithubEmulator
from tests.helpers import (
    agent_body,
    bearer,
    eventually,
    provision,
    request_nhi,
    run_sweep,
    skip_until,
)
from worker import build_worker
from workflows.lifecycle import NhiLifecycleWorkflow

MINUTE = timedelta(minutes=1)
READ_API = [{"actions": ["contents:read"], "resources": ["acme/api"]}]


def github_policy(sessions: sessionmaker[Session], **overrides: Any) -> None:
    """The dev policy for GitHub tokens: acme's repositories, a month at most."""
    body = {
        "platform": "github",
        "kind": "github_app_token",
        "environment": "dev",
        "allowed": True,
        "default_ttl": "7d",
        "max_lifetime": "30d",
        "allowed_resources": ["acme/*"],
        "forbidden_actions": ["administration:write"],
        "allow_task_credentials": True,
    }
    with transaction(sessions) as session:
        apply_policy(session, PolicyIn.model_validate(body | overrides), "test:platform")


# ---- pure rules ----------------------------------------------------------------------------------


def _rules(**kw: Any) -> PolicyRules:
    return PolicyRules(
        label="github/github_app_token/dev",
        allowed=True,
        default_ttl_seconds=3600,
        max_lifetime_seconds=86400,
        **({"allowed_resources": ("acme/*",)} | kw),
    )


def _scope(*statements: tuple[list[str], list[str]]) -> list[ScopeStatement]:
    return [ScopeStatement(actions=a, resources=r) for a, r in statements]


def test_the_scope_grammar_is_permissions_on_repositories() -> None:
    token = parse_token_scope(
        _scope((["contents:read", "pull_requests:write"], ["acme/api", "acme/web"]))
    )
    assert token.repository_names == ["api", "web"]
    assert token.permission_map == {"contents": "read", "pull_requests": "write"}
    for bad, where in (
        (_scope((["s3:GetObject"], ["acme/api"])), "scope[0].actions[0]"),
        (_scope((["contents:admin"], ["acme/api"])), "scope[0].actions[0]"),
        (_scope((["contents:read"], ["arn:aws:s3:::x"])), "scope[0].resources[0]"),
        (_scope((["contents:read"], ["acme/*"])), "scope[0].resources[0]"),
        (_scope((["contents:read"], ["acme/api", "other/api"])), "scope"),
        # One permission set per token: a second statement may not widen the first.
        (
            _scope((["contents:read"], ["acme/api"]), (["contents:write"], ["acme/web"])),
            "scope[1].actions",
        ),
    ):
        with pytest.raises(RuleViolation) as err:
            parse_token_scope(bad)
        assert err.value.field == where


def test_policy_allows_repositories_forbids_and_flags_sensitive_permissions() -> None:
    rules = _rules(forbidden_actions=("administration:*",))
    assert validate_github_scope(_scope((["contents:read"], ["acme/api"])), rules) == []
    assert validate_github_scope(
        _scope((["workflows:write", "secrets:write"], ["acme/api"])), rules
    ) == ["workflows:write", "secrets:write"]
    with pytest.raises(RuleViolation, match="forbidden"):
        validate_github_scope(_scope((["administration:read"], ["acme/api"])), rules)
    with pytest.raises(RuleViolation, match="allowed_resources") as err:
        validate_github_scope(_scope((["contents:read"], ["evil/api"])), rules)
    assert err.value.field == "scope[0].resources[0]"
    with pytest.raises(RuleViolation, match="allowed_resources"):
        validate_github_scope(
            _scope((["contents:read"], ["acme/api"])), _rules(allowed_resources=())
        )


# ---- the lifecycle against the emulator -----------------------------------------------------------


@dataclass
class Rig:
    env: WorkflowEnvironment
    settings: Settings
    sessions: sessionmaker[Session]
    aws: AwsClients
    gh: GithubEmulator
    app: GithubApp
    queue: str


@pytest_asyncio.fixture
async def rig(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    github_app: GithubApp,
) -> AsyncIterator[Rig]:
    """A worker whose GitHub is an emulator on the test server's virtual clock."""
    loop = asyncio.get_running_loop()

    def virtual_now() -> float:
        # Called from the emulator's request threads while the loop serves the test.
        future = asyncio.run_coroutine_threadsafe(ts_env.get_current_time(), loop)
        return future.result(timeout=10).timestamp()

    gh = GithubEmulator(github_app.app_id, github_app.emulator.public_key, clock=virtual_now)
    gh.add_installation(github_app.installation_id, "acme", dict(GITHUB_APP_PERMISSIONS))
    for name in ("acme/api", "acme/web"):
        gh.add_repository(name, {"README.md": b"# " + name.encode()})
    tag = uuid.uuid4().hex[:6]
    with gh:
        rig_settings = settings.model_copy(
            update={
                "temporal_address": dev_address(ts_env),
                "github_api_url": gh.url,
                "name_prefix": f"g{tag}",
                "sweep_propagation_seconds": 0,
                "sweep_calls_per_second": 1000.0,
                "rotation_overlap_seconds": 600,
            }
        )
        github_policy(sessions)
        queue = f"gh-{tag}"
        async with build_worker(ts_env.client, rig_settings, sessions, aws, task_queue=queue):
            yield Rig(ts_env, rig_settings, sessions, aws, gh, github_app, queue)


async def _gh(rig: Rig, method: str, path: str, token: str, **kw: Any) -> int:
    """One call to the emulator as an agent would make it (async: the emulator's clock asks
    the test server, through this loop, what time it is)."""
    import httpx

    async with httpx.AsyncClient(base_url=rig.gh.url) as http:
        response = await http.request(
            method, path, headers={"Authorization": f"Bearer {token}"}, **kw
        )
    return response.status_code


def _nhi(rig: Rig, nhi_id: uuid.UUID) -> Nhi:
    with transaction(rig.sessions) as s:
        return s.get_one(Nhi, nhi_id)


def _token(rig: Rig, nhi: Nhi, stage: str = "AWSCURRENT") -> dict[str, Any]:
    value = rig.aws.secrets.get_secret_value(SecretId=nhi.credential_ref or "", VersionStage=stage)
    return dict(json.loads(value["SecretString"]))


def _events(rig: Rig, nhi_id: uuid.UUID) -> list[str]:
    with transaction(rig.sessions) as s:
        return list(
            s.scalars(
                select(AuditEvent.event)
                .where(AuditEvent.subject_id == str(nhi_id))
                .order_by(AuditEvent.id)
            )
        )


async def test_a_token_reaches_its_repository_is_reissued_and_revoked(rig: Rig) -> None:
    _, nhi_id, sensitive = request_nhi(
        rig.sessions,
        rig.settings,
        "github_app_token",
        scope=READ_API,
        ttl="1d",
        now=await rig.env.get_current_time(),
    )
    assert sensitive == []
    handle = await provision(rig.env, rig.queue, nhi_id)
    nhi = _nhi(rig, nhi_id)
    assert nhi.status == "active" and nhi.rotation_period_seconds == 45 * 60
    born = nhi.activated_at
    assert born is not None
    first = _token(rig, nhi)
    token = first["token"]
    assert token.startswith("ghs_") and token not in (nhi.external_id or "")

    # Restricted to acme/api, read only: the emulator enforces it as GitHub does.
    assert await _gh(rig, "GET", "/repos/acme/api/contents/README.md", token) == 200
    assert await _gh(rig, "GET", "/repos/acme/web/contents/README.md", token) == 404
    assert await _gh(rig, "GET", "/repos/acme/web", token) == 404
    put = {"message": "x", "content": base64.b64encode(b"hi").decode()}
    assert await _gh(rig, "PUT", "/repos/acme/api/contents/NEW.md", token, json=put) == 403

    # Re-issued before the hour is up; the previous token still works for the overlap.
    await skip_until(rig.env, handle, born + 46 * MINUTE)
    second = _token(rig, _nhi(rig, nhi_id))
    assert second["token"] != token and "nhi.rotated" in _events(rig, nhi_id)
    assert await _gh(rig, "GET", "/repos/acme/api", second["token"]) == 200
    assert await _gh(rig, "GET", "/repos/acme/api", token) == 200
    # Past the first token's hour: it lapsed (or was revoked after the overlap), while the
    # lifecycle kept a working one in the secret at every step, the second re-issue included.
    await skip_until(rig.env, handle, born + 61 * MINUTE)
    assert await _gh(rig, "GET", "/repos/acme/api", token) == 401
    for minutes in (95, 130, 170):
        await skip_until(rig.env, handle, born + minutes * MINUTE)
        current = _token(rig, _nhi(rig, nhi_id))["token"]
        assert await _gh(rig, "GET", "/repos/acme/api/contents/README.md", current) == 200

    # Decommission revokes every delivered token at once: 401 from then on.
    await handle.execute_update(
        NhiLifecycleWorkflow.decommission, LifecycleAction(actor="ana@example.com", reason="done")
    )

    async def quarantined() -> None:
        # The dev policy has no grace period: removal may follow at once.
        assert _nhi(rig, nhi_id).status in ("quarantined", "decommissioned")

    await eventually(quarantined)
    assert await _gh(rig, "GET", "/repos/acme/api", current) == 401
    async with rig.env.time_skipping_unlocked():  # type: ignore[attr-defined]
        result = await handle.result()
    assert result.phase is Phase.DECOMMISSIONED
    assert "DeletedDate" in rig.aws.secrets.describe_secret(SecretId=nhi.credential_ref or "")
    assert ("DELETE", "/installation/token") in rig.gh.calls


async def test_a_failed_reissue_is_retried_before_the_token_in_use_lapses(rig: Rig) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions,
        rig.settings,
        "github_app_token",
        scope=READ_API,
        ttl="1d",
        now=await rig.env.get_current_time(),
    )
    handle = await provision(rig.env, rig.queue, nhi_id)
    born = _nhi(rig, nhi_id).activated_at
    assert born is not None
    first = _token(rig, _nhi(rig, nhi_id))["token"]

    # GitHub refuses tokens when the re-issue falls due (45 min): it fails after its retries.
    rig.gh.token_outage = True
    await skip_until(rig.env, handle, born + 50 * MINUTE)
    assert "nhi.rotation_failed" in _events(rig, nhi_id)
    assert _token(rig, _nhi(rig, nhi_id))["token"] == first, "the token in use stays"

    # GitHub is back: the re-issue is tried again minutes later (a ninth of the 45-minute
    # period), not hours, so a working token is in the secret before the first one's hour.
    rig.gh.token_outage = False
    await skip_until(rig.env, handle, born + 58 * MINUTE)
    current = _token(rig, _nhi(rig, nhi_id))["token"]
    assert current != first and "nhi.rotated" in _events(rig, nhi_id)
    await skip_until(rig.env, handle, born + 61 * MINUTE)
    assert await _gh(rig, "GET", "/repos/acme/api", first) == 401
    assert await _gh(rig, "GET", "/repos/acme/api", current) == 200


async def test_a_sweep_reports_drift_when_the_installation_loses_a_permission(rig: Rig) -> None:
    _, nhi_id, _ = request_nhi(
        rig.sessions,
        rig.settings,
        "github_app_token",
        scope=[{"actions": ["contents:read", "pull_requests:write"], "resources": ["acme/api"]}],
        ttl="1d",
        now=await rig.env.get_current_time(),
    )
    await provision(rig.env, rig.queue, nhi_id)
    name = _nhi(rig, nhi_id).name
    clean = await run_sweep(rig.env, rig.queue, provider="github", dry_run=True)
    assert [f for f in clean.findings if f.identity == name] == []

    # An organisation admin narrows the app: pull requests read only.
    rig.gh.set_permissions(
        rig.app.installation_id, {"contents": "write", "pull_requests": "read", "metadata": "read"}
    )
    outcome = await run_sweep(rig.env, rig.queue, provider="github", dry_run=True)
    drift = [f for f in outcome.findings if f.identity == name]
    assert [f.kind for f in drift] == [FindingKind.DRIFT]
    assert "pull_requests:write" in drift[0].detail

    # And one taken off a repository the grant names.
    rig.gh.set_permissions(rig.app.installation_id, dict(GITHUB_APP_PERMISSIONS))
    rig.gh.select_repositories(rig.app.installation_id, {"acme/web"})
    outcome = await run_sweep(rig.env, rig.queue, provider="github", dry_run=True)
    drift = [f for f in outcome.findings if f.identity == name]
    assert [f.kind for f in drift] == [FindingKind.DRIFT] and "acme/api" in drift[0].detail


async def test_a_task_token_is_narrowed_to_one_repository(rig: Rig) -> None:
    both = [{"actions": ["contents:write"], "resources": ["acme/api", "acme/web"]}]
    issuer = GithubTaskProvider(rig.settings, rig.aws.secrets)
    now = await rig.env.get_current_time()

    def grant(scope: list[dict[str, Any]] | None) -> TaskGrant:
        return TaskGrant(
            credential_id=uuid.uuid4(),
            nhi_id=uuid.uuid4(),
            agent_id=uuid.uuid4(),
            kind=NhiKind.GITHUB_APP_TOKEN,
            identity_name="n",
            external_id="x",
            target=None,
            task_id="t-1",
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            ttl_seconds=3600,
            granted_scope=tuple(ScopeStatement.model_validate(s) for s in both),
            scope=None if scope is None else tuple(ScopeStatement.model_validate(s) for s in scope),
        )

    read_web = [{"actions": ["contents:read"], "resources": ["acme/web"]}]
    issued = await asyncio.to_thread(issuer.issue, grant(read_web))
    token = str(issued.secret["token"])
    assert token not in repr(issued)
    # GitHub's own expiry, reported as it is: an hour, whatever a task might have wished.
    assert abs(issued.expires_at - (now + timedelta(hours=1))) < timedelta(seconds=5)
    assert await _gh(rig, "GET", "/repos/acme/web/contents/README.md", token) == 200
    assert await _gh(rig, "GET", "/repos/acme/api/contents/README.md", token) == 404
    put = {"message": "x", "content": base64.b64encode(b"hi").decode()}
    assert await _gh(rig, "PUT", "/repos/acme/web/contents/T.md", token, json=put) == 403
    assert await asyncio.to_thread(issuer.revoke, token) is True
    assert await _gh(rig, "GET", "/repos/acme/web", token) == 401
    for refused in (
        None,  # the NHI's whole scope names two repositories
        [{"actions": ["contents:read"], "resources": ["acme/other"]}],
        [{"actions": ["pull_requests:read"], "resources": ["acme/web"]}],
    ):
        with pytest.raises(Exception, match=r"one repository|within the NHI"):
            issuer.scope_of(grant(refused))


def test_an_app_jwt_signed_with_another_key_is_refused(github_app: GithubApp) -> None:
    import httpx
    import jwt

    from tests.github_emulator import new_app_key

    other, _ = new_app_key()
    now = int(datetime.now().timestamp())
    forged = jwt.encode(
        {"iat": now - 60, "exp": now + 540, "iss": github_app.app_id}, other, "RS256"
    )
    url = f"{github_app.emulator.url}/app/installations/{github_app.installation_id}/access_tokens"
    response = httpx.post(url, headers={"Authorization": f"Bearer {forged}"}, json={})
    assert response.status_code == 401


async def test_the_api_issues_a_task_token_for_one_repository(
    service: Service, sessions: sessionmaker[Session], github_app: GithubApp
) -> None:
    import httpx

    from models.enums import Role
    from nhi.services.auth import issue_token

    github_policy(sessions)
    token = service.token("gh-task-check", "platform", teams=["search"])
    both = [{"actions": ["contents:read"], "resources": ["acme/api", "acme/web"]}]
    async with httpx.AsyncClient(base_url=service.url, timeout=30, headers=bearer(token)) as http:
        agent = (await http.post("/v1/agents", json=agent_body())).json()
        accepted = await http.post(
            f"/v1/agents/{agent['id']}/nhis",
            json={"platform": "github", "kind": "github_app_token", "scope": both},
        )
        assert accepted.status_code < 300, accepted.text
        nhi_id = accepted.json()["id"]

        async def active() -> None:
            assert (await http.get(f"/v1/nhis/{nhi_id}")).json()["status"] == "active"

        await eventually(active)
        with transaction(sessions) as s:
            _, agent_token = issue_token(
                s,
                name=f"gh-task-agent-{uuid.uuid4().hex[:6]}",
                role=Role.AGENT,
                ttl="1h",
                created_by="test:setup",
                agent_id=uuid.UUID(agent["id"]),
            )
        path = f"/v1/nhis/{nhi_id}/credentials"
        as_agent = bearer(agent_token)
        web = [{"actions": ["contents:read"], "resources": ["acme/web"]}]
        refused = await http.post(path, headers=as_agent, json={"task_id": "t-1"})
        assert refused.status_code == 422 and "one repository" in refused.text
        refused = await http.post(path, headers=as_agent, json={"scope": web, "ttl": "15m"})
        assert refused.status_code == 422 and "ttl" in refused.text
        issued = await http.post(path, headers=as_agent, json={"scope": web, "task_id": "t-1"})
        assert issued.status_code == 201, issued.text
        body = issued.json()
        assert body["platform"] == "github" and body["github"]["repository"] == "acme/web"
        task_token = body["github"]["token"]
        gh = github_app.emulator.url
        headers = {"Authorization": f"Bearer {task_token}"}
        assert (
            httpx.get(f"{gh}/repos/acme/web/contents/README.md", headers=headers).status_code == 200
        )
        assert (
            httpx.get(f"{gh}/repos/acme/api/contents/README.md", headers=headers).status_code == 404
        )


async def test_a_sweep_reports_a_token_the_inventory_does_not_know(rig: Rig) -> None:
    """GitHub lists no installation tokens: what a sweep can see is a delivery secret of ours
    whose NHI is gone from the inventory (restored from an old backup, say)."""
    from activities.providers.github import GithubProvider
    from models.contracts import ProvisionPlan
    from nhi.rules.policy import identity_name

    nhi_id = uuid.uuid4()
    plan = ProvisionPlan(
        nhi_id=nhi_id,
        agent_id=uuid.uuid4(),
        agent_name="lost",
        environment="dev",
        owner_email="ana@example.com",
        platform="github",
        kind=NhiKind.GITHUB_APP_TOKEN,
        identity_name=identity_name(rig.settings.name_prefix, "lost", nhi_id),
        iam_path="/",
        secret_name=f"{rig.settings.secret_prefix}dev/lost/{nhi_id}",
        scope=[ScopeStatement(actions=["contents:read"], resources=["acme/api"])],
        expires_at=await rig.env.get_current_time() + timedelta(days=1),
    )
    provider = GithubProvider(rig.settings, rig.aws.secrets)
    delivered = await asyncio.to_thread(provider.deliver, plan)
    outcome = await run_sweep(rig.env, rig.queue, provider="github", dry_run=True)
    found = [f for f in outcome.findings if f.identity == plan.identity_name]
    assert [f.kind for f in found] == [FindingKind.ORPHAN]
    assert found[0].secret_arn == delivered.credential_ref
    # Removing it (what the orphan workflow runs after its grace) revokes its token.
    token = _token_of(rig, delivered.credential_ref)
    assert await _gh(rig, "GET", "/repos/acme/api", token) == 200
    from models.contracts import IdentityRef

    ref = IdentityRef(
        platform="github",
        kind=NhiKind.GITHUB_APP_TOKEN,
        name=plan.identity_name,
        secret_name=delivered.credential_ref,
    )
    removed = await asyncio.to_thread(provider.delete, ref)
    assert any("revoked" in r for r in removed.removed)
    assert await _gh(rig, "GET", "/repos/acme/api", token) == 401


def _token_of(rig: Rig, arn: str) -> str:
    value = rig.aws.secrets.get_secret_value(SecretId=arn, VersionStage="AWSCURRENT")
    return str(json.loads(value["SecretString"])["token"])


def test_a_github_policy_names_repositories_and_permissions(
    sessions: sessionmaker[Session],
) -> None:
    for field, value, message in (
        ("allowed_resources", ["acme"], "allowed_resources[0]"),
        ("forbidden_actions", ["iam:*"], "forbidden_actions[0]"),
        ("sensitive_actions", ["contents"], "sensitive_actions[0]"),
    ):
        with pytest.raises(RuleViolation) as err:
            github_policy(sessions, **{field: value})
        assert err.value.field == f"policies[0].{message}"
