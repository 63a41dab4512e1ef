"""The authorization matrix: every /v1 operation the app serves (read from its OpenAPI document,
so a new operation fails here until it is given a row) for every role and for bad credentials.

Each cell is the README's access-control table: allowed (anything but 401/403/404), 403 (the
caller can see the object but may not do this) or 404 (the caller may not see it, answered
exactly like a missing id). Every refusal changes nothing: row counts of agents, NHIs,
policies, targets and tokens, the audit trail, the objects' states and the IAM identities in
moto are compared before and after each refused call.
"""

from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import httpx
import pytest
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from models.enums import Role
from models.orm import (
    ActivityEvent,
    ActivityFinding,
    Agent,
    AgentInvoker,
    AgentWorkload,
    ApiToken,
    Approval,
    AuditEvent,
    Incident,
    Nhi,
    Policy,
    Prompt,
    Sweep,
    Target,
)
from nhi.infra.aws_clients import AwsClients
from nhi.infra.db import transaction
from nhi.services.auth import issue_token, revoke_token
from tests.conftest import Service
from tests.helpers import ROLE_SCOPE, TRUST, agent_body, bearer, unique

OWNER, BACKUP = "owner@example.com", "backup@example.com"
# Role, teams, email of every principal the matrix calls with.
PRINCIPALS: dict[str, tuple[str, list[str] | None, str | None]] = {
    "admin": ("admin", None, "adm@example.com"),
    "platform": ("platform", ["search"], "plat@example.com"),  # the agent's team
    "platform_other": ("platform", ["billing"], "other@example.com"),  # another team
    "approver": ("approver", None, "appr@example.com"),
    "security": ("security", None, "sec@example.com"),
    "auditor": ("auditor", None, "aud@example.com"),
    "owner": ("platform", ["nowhere"], OWNER),  # owner rights by email alone
    "auditor_owner": ("auditor", None, BACKUP),  # the backup owner, holding an auditor token
    # An `agent` token (issue 15) bound to another agent than the world's: it acts for that
    # agent only, reads nothing and sees none of the world's objects. (Its own agent's task
    # credentials: tests/test_task_credentials.py and tests/test_workload_identity.py.)
    "agent_other": ("agent", None, None),
}
BAD_CREDENTIALS = ("no token", "forged", "expired", "revoked")
ALL = frozenset(PRINCIPALS)
HIDDEN = frozenset({"platform_other", "agent_other"})  # who may not see the world's agent: 404
SEES = ALL - HIDDEN
SWEEP_READERS = frozenset({"security", "auditor", "auditor_owner", "admin"})
# An approval nobody waits on any more: only readers see it (anyone else: 404).
APPROVAL_READERS = SWEEP_READERS

# The README's table as data: (allowed, hidden) per operation; everyone else gets 403.
Cell = tuple[frozenset[str], frozenset[str]]
TABLE: dict[tuple[str, str], Cell] = {
    ("GET", "/v1/whoami"): (ALL, frozenset()),
    ("GET", "/v1/agents"): (ALL, frozenset()),
    ("POST", "/v1/agents"): (frozenset({"platform"}), frozenset()),
    ("GET", "/v1/agents/{agent_id}"): (SEES, HIDDEN),
    ("POST", "/v1/agents/{agent_id}/nhis"): (frozenset({"platform"}), HIDDEN),
    ("POST", "/v1/agents/{agent_id}/complete"): (
        frozenset({"platform", "owner", "security"}),
        HIDDEN,
    ),
    ("GET", "/v1/nhis"): (ALL, frozenset()),
    ("GET", "/v1/nhis/{nhi_id}"): (SEES, HIDDEN),
    ("GET", "/v1/nhis/{nhi_id}/events"): (SEES, HIDDEN),
    ("GET", "/v1/nhis/{nhi_id}/lifecycle"): (SEES, HIDDEN),
    ("POST", "/v1/nhis/{nhi_id}/approve"): (frozenset({"approver"}), HIDDEN),
    ("POST", "/v1/nhis/{nhi_id}/deny"): (frozenset({"approver"}), HIDDEN),
    ("POST", "/v1/nhis/{nhi_id}/renew"): (frozenset({"owner"}), HIDDEN),
    ("POST", "/v1/nhis/{nhi_id}/rotate"): (frozenset({"owner", "security"}), HIDDEN),
    ("POST", "/v1/nhis/{nhi_id}/decommission"): (frozenset({"owner", "security"}), HIDDEN),
    ("POST", "/v1/nhis/{nhi_id}/restore"): (frozenset({"owner"}), HIDDEN),
    # Task credentials: the owner (and the agent's own `agent` token: tests/test_task_credentials.py).
    # Another agent's token is told so (403, as the README's table says), not 404.
    ("POST", "/v1/nhis/{nhi_id}/credentials"): (
        frozenset({"owner"}), HIDDEN - {"agent_other"},
    ),
    # Invokers change with the agent (its platform team, owner, admin); footprints are reads.
    ("GET", "/v1/agents/{agent_id}/invokers"): (SEES, HIDDEN),
    ("POST", "/v1/agents/{agent_id}/invokers"): (frozenset({"platform", "owner", "admin"}), HIDDEN),
    ("DELETE", "/v1/agents/{agent_id}/invokers/{invoker_id}"): (
        frozenset({"platform", "owner", "admin"}),
        HIDDEN,
    ),
    # Workload identities (issue 15) are bound and unbound like invokers, read like the agent.
    ("GET", "/v1/agents/{agent_id}/workloads"): (SEES, HIDDEN),
    ("POST", "/v1/agents/{agent_id}/workloads"): (frozenset({"platform", "owner", "admin"}), HIDDEN),
    ("DELETE", "/v1/agents/{agent_id}/workloads/{workload_id}"): (
        frozenset({"platform", "owner", "admin"}),
        HIDDEN,
    ),
    ("GET", "/v1/agents/{agent_id}/footprint"): (SEES, HIDDEN),
    ("GET", "/v1/footprints"): (ALL, frozenset()),
    # Approvals (issue 16): bundles are requests; approvers decide; readers see every one.
    ("POST", "/v1/agents/{agent_id}/nhis:batch"): (frozenset({"platform"}), HIDDEN),
    ("GET", "/v1/approvals"): (ALL, frozenset()),
    ("GET", "/v1/approvals/{approval_id}"): (
        APPROVAL_READERS, ALL - APPROVAL_READERS,
    ),
    ("POST", "/v1/approvals/{approval_id}/approve"): (frozenset({"approver"}), frozenset()),
    ("POST", "/v1/approvals/{approval_id}/deny"): (frozenset({"approver"}), frozenset()),
    # Containment (issue 17): security or admin contain; a second person (approver, security,
    # admin) releases; incidents are read like their agent.
    ("POST", "/v1/agents/{agent_id}/contain"): (frozenset({"security", "admin"}), HIDDEN),
    ("POST", "/v1/agents/{agent_id}/release"): (
        frozenset({"approver", "security", "admin"}), HIDDEN,
    ),
    ("GET", "/v1/incidents"): (ALL, frozenset()),
    ("GET", "/v1/incidents/{incident_id}"): (SEES, HIDDEN),
    # Activity (issue 17): events can contain an agent, so only those who may contain post or
    # import them; findings are read like their agent and acknowledged by security or admin.
    ("POST", "/v1/activity"): (frozenset({"security", "admin"}), frozenset()),
    ("POST", "/v1/activity/imports"): (frozenset({"security", "admin"}), frozenset()),
    ("GET", "/v1/activity/imports/{workflow_id}"): (
        frozenset({"security", "admin", "auditor", "auditor_owner"}), frozenset(),
    ),
    ("GET", "/v1/findings"): (ALL, frozenset()),
    ("GET", "/v1/findings/{finding_id}"): (SEES, HIDDEN),
    ("POST", "/v1/findings/{finding_id}/ack"): (frozenset({"security", "admin"}), frozenset()),
    ("GET", "/v1/policies"): (ALL - {"agent_other"}, frozenset()),
    ("PUT", "/v1/policies"): (frozenset({"admin"}), frozenset()),
    ("GET", "/v1/prompts"): (ALL, frozenset()),
    ("POST", "/v1/prompts/{prompt_id}/answer"): (frozenset({"owner"}), HIDDEN),
    ("GET", "/v1/tokens"): (frozenset({"admin", "security", "auditor", "auditor_owner"}), frozenset()),
    ("POST", "/v1/tokens"): (frozenset({"admin"}), frozenset()),
    ("POST", "/v1/tokens/{name}/revoke"): (frozenset({"admin"}), frozenset()),
    ("POST", "/v1/sweeps"): (frozenset({"security"}), frozenset()),
    ("GET", "/v1/sweeps"): (SWEEP_READERS, frozenset()),
    ("GET", "/v1/sweeps/{sweep_id}"): (SWEEP_READERS, frozenset()),
    ("GET", "/v1/targets"): (ALL - {"approver", "agent_other"}, frozenset()),
    ("POST", "/v1/targets"): (frozenset({"admin"}), frozenset()),
    ("DELETE", "/v1/targets/{name}"): (frozenset({"admin"}), frozenset()),
}  # fmt: skip


def _served() -> set[tuple[str, str]]:
    paths = create_app().openapi()["paths"]
    return {(m.upper(), p) for p, ops in paths.items() if p.startswith("/v1") for m in ops}


def test_the_table_covers_every_v1_operation() -> None:
    assert _served() == set(TABLE), "give every /v1 operation a row in TABLE (and the README)"


# ---- the world each call acts on -------------------------------------------------------------

World = dict[str, str]


def _world(sessions: sessionmaker[Session], import_id: str) -> World:
    """An agent of team `search` (owner OWNER, backup BACKUP), an active NHI with no workflow,
    an open prompt, a sweep, a target, a token to revoke, an incident of the agent opened by
    someone else (so any releaser is a second person) and an unacknowledged finding: straight
    in the database. `import_id` is an activity import started through the API. Each world has
    an agent of its own, so a contain or release acts on that world only."""
    now = datetime.now(UTC)
    with transaction(sessions) as s:
        agent = Agent(
            name=unique("authz"), category="rag", environment="dev", owner_email=OWNER,
            backup_owner_email=BACKUP, team="search", purpose="matrix", invokers=[],
            status="active", created_by="test",
        )  # fmt: skip
        s.add(agent)
        s.flush()
        nhi_id = uuid.uuid4()
        nhi = Nhi(
            id=nhi_id, agent_id=agent.id, platform="aws", kind="iam_role",
            name=f"nhi-authz-{nhi_id.hex}", granted_scope=ROLE_SCOPE, allowed_cidrs=[],
            status="active", requested_by="test", expires_at=now + timedelta(days=5),
            max_lifetime_at=now + timedelta(days=90),
        )  # fmt: skip
        s.add(nhi)
        s.flush()
        prompt = Prompt(
            nhi_id=nhi_id, kind="reminder", for_expires_at=nhi.expires_at,
            offset_seconds=86400, deliveries=[],
        )  # fmt: skip
        sweep = Sweep(
            provider="aws", dry_run=True, triggered_by="test", workflow_id=unique("sweep-wf"),
            status="completed", summary={}, findings=[],
        )  # fmt: skip
        target = Target(
            name=unique("tgt"), host="db.internal", port=5432, dbname="app",
            admin_user="nhi_admin", password_ref="env:NHI_TARGET_PASSWORD_MATRIX",
            sslmode="verify-full", created_by="test",
        )  # fmt: skip
        invoker = AgentInvoker(agent_id=agent.id, kind="service", ref="matrix", channel="api",
                               added_by="test")  # fmt: skip
        workload = AgentWorkload(agent_id=agent.id, issuer="https://matrix.example.com",
                                 subject=unique("matrix-sub"), created_by="test")  # fmt: skip
        approval = Approval(
            agent_id=agent.id, workflow_id=unique("approval-wf"), bundle=False,
            nhi_ids=[str(nhi_id)], approvers=[], approvals_required=1, requested_by="test",
            requested_by_person="test", status="pending", reasons=[], summary={}, decisions=[],
            expires_at=now + timedelta(days=3),
        )  # fmt: skip
        incident = Incident(
            agent_id=agent.id, status="contained", reason="matrix", opened_by="token:matrix-opener",
            opened_by_person="email:opener@example.com", report={},
        )  # fmt: skip
        finding = ActivityFinding(
            nhi_id=nhi_id, agent_id=agent.id, kind="out_of_scope", severity="high",
            summary="matrix", evidence={}, occurred_at=now,
        )  # fmt: skip
        s.add_all([prompt, sweep, target, invoker, workload, approval, incident, finding])
        row, _ = issue_token(
            s, name=unique("victim"), role=Role.AUDITOR, ttl="1d", created_by="test"
        )
        s.flush()
        return {
            "agent_id": str(agent.id),
            "agent_name": agent.name,
            "nhi_id": str(nhi_id),
            "prompt_id": str(prompt.id),
            "invoker_id": str(invoker.id),
            "workload_id": str(workload.id),
            "approval_id": str(approval.id),
            "incident_id": str(incident.id),
            "finding_id": str(finding.id),
            "workflow_id": import_id,
            "sweep_id": str(sweep.id),
            "token": row.name,
            "token_id": str(row.id),
            "target": target.name,
        }


def _url(path: str, world: World) -> str:
    name = world["token"] if path.startswith("/v1/tokens") else world["target"]
    return path.format(name=name, **world)


_IDS = ("agent_id", "nhi_id", "prompt_id", "invoker_id", "workload_id", "incident_id", "finding_id")


def _missing(path: str, world: World) -> World:
    """The same world with every id in the path replaced by one that does not exist."""
    return world | {k: str(uuid.uuid4()) for k in _IDS if k in path}


def _snapshot(
    sessions: sessionmaker[Session], aws: AwsClients, iam_path: str, world: World, actors: list[str]
) -> tuple[Any, ...]:
    """Everything a call could have changed. The audit trail is counted for the world's
    subjects and for the matrix's own callers (a change always records its actor); other
    tests' workflows may write elsewhere meanwhile."""
    subjects = [world["agent_id"], world["nhi_id"], world["token_id"], world["target"]]
    with transaction(sessions) as s:

        def count(model: Any) -> int:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)

        state = (
            count(Agent), count(Nhi), count(Policy), count(Target), count(ApiToken),
            count(AgentInvoker), count(AgentWorkload), count(Incident), count(ActivityEvent),
            s.scalar(select(func.max(Policy.updated_at))),
            s.scalar(
                select(func.count()).select_from(AuditEvent).where(
                    or_(AuditEvent.subject_id.in_(subjects), AuditEvent.actor.in_(actors))
                )
            ),
            s.scalar(select(Agent.status).where(Agent.id == uuid.UUID(world["agent_id"]))),
            s.scalar(select(Nhi.status).where(Nhi.id == uuid.UUID(world["nhi_id"]))),
            s.scalar(select(Prompt.status).where(Prompt.id == uuid.UUID(world["prompt_id"]))),
            s.scalar(select(ApiToken.revoked_at).where(ApiToken.name == world["token"])),
            s.scalar(select(Incident.status).where(Incident.id == uuid.UUID(world["incident_id"]))),
            s.scalar(
                select(ActivityFinding.acked_at).where(
                    ActivityFinding.id == uuid.UUID(world["finding_id"])
                )
            ),
        )  # fmt: skip
    identities = []
    for operation, key in (("list_roles", "Roles"), ("list_users", "Users")):
        for page in aws.iam.get_paginator(operation).paginate(PathPrefix=iam_path):  # type: ignore[call-overload]
            identities += [i["Arn"] for i in page[key] if world["agent_name"][:20] in i["Arn"]]
    return state, sorted(identities)


# ---- credentials ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def credentials(service: Service) -> dict[str, str]:
    """Two tokens per principal (one for refused calls, one for allowed ones: work an allowed
    call starts may still be writing audit events under its name later), plus forged,
    expired and revoked ones."""
    tokens = {}
    with transaction(service.sessions) as s:
        # The agent an `agent` principal acts for: never any world's.
        elsewhere = Agent(
            name=unique("authz-elsewhere"), category="rag", environment="dev",
            owner_email="elsewhere@example.com", team="elsewhere", purpose="matrix",
            invokers=[], status="active", created_by="test",
        )  # fmt: skip
        s.add(elsewhere)
        s.flush()
        for who, (role, teams, email) in PRINCIPALS.items():
            for use in ("refused", "allowed"):
                if role != Role.AGENT.value:
                    tokens[f"{use}:{who}"] = service.token(
                        f"matrix-{use}-{who.replace('_', '-')}", role, teams=teams, email=email
                    )
                    continue
                _, tokens[f"{use}:{who}"] = issue_token(
                    s, name=f"matrix-{use}-{who.replace('_', '-')}", role=Role.AGENT,
                    ttl="1d", created_by="test", agent_id=elsewhere.id,
                )  # fmt: skip
    with transaction(service.sessions) as s:
        _, tokens["expired"] = issue_token(
            s, name=unique("matrix-expired"), role=Role.ADMIN, ttl="1h", created_by="test",
            now=datetime.now(UTC) - timedelta(hours=2),
        )  # fmt: skip
        revoked_name = unique("matrix-revoked")
        _, tokens["revoked"] = issue_token(
            s, name=revoked_name, role=Role.ADMIN, ttl="1d", created_by="test"
        )
        revoke_token(s, revoked_name, "test")
    tokens["forged"] = "nhi_" + secrets.token_urlsafe(32)
    return tokens


@pytest.fixture(scope="module")
def actors(credentials: dict[str, str]) -> list[str]:
    """The audit names of the callers whose calls must change nothing."""
    return [f"token:matrix-refused-{w.replace('_', '-')}" for w in PRINCIPALS]


@pytest.fixture(scope="module")
def staging_policy(service: Service, credentials: dict[str, str]) -> Iterator[dict[str, Any]]:
    """The aws/iam_role/staging policy as PUT takes it: the admin's allowed call re-applies
    what is in force, so the matrix leaves policies as it found them."""
    shown = httpx.get(
        f"{service.url}/v1/policies", headers=bearer(credentials["allowed:admin"]), timeout=30
    ).json()
    out = next(
        p for p in shown
        if (p["platform"], p["kind"], p["environment"]) == ("aws", "iam_role", "staging")
    )  # fmt: skip
    keep = ("platform", "kind", "environment", "allowed", "allow_resource_wildcard",
            "forbidden_actions", "sensitive_actions", "allowed_trust_accounts",
            "allow_service_principals")  # fmt: skip
    yield {k: out[k] for k in keep} | {
        "default_ttl": out["default_ttl_seconds"],
        "max_lifetime": out["max_lifetime_seconds"],
        "rotation_period": out["rotation_period_seconds"],
        "reminder_offsets": out["reminder_offsets_seconds"],
        "grace_period": out["grace_period_seconds"],
        "max_session_duration": out["max_session_duration_seconds"],
    }


@pytest.fixture(scope="module")
def import_location(aws: AwsClients) -> str:
    """An existing (empty) bucket for activity imports: the import finds nothing and ends."""
    s3 = boto3.client("s3", region_name=aws.region, endpoint_url=aws.endpoint_url)
    bucket = "nhi-matrix-activity"
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/logs/"


@pytest.fixture(scope="module")
def import_id(service: Service, credentials: dict[str, str], import_location: str) -> str:
    """A real import started through the API, so its readers are answered about it."""
    response = httpx.post(
        f"{service.url}/v1/activity/imports", json={"location": import_location},
        headers=bearer(credentials["allowed:admin"]), timeout=30,
    )  # fmt: skip
    assert response.status_code == 202, response.text
    return str(response.json()["workflow_id"])


def _bodies(policy: dict[str, Any], location: str) -> dict[tuple[str, str], Callable[[], Any]]:
    """A valid body per operation, so a refusal is about the caller, never the input."""
    reason = lambda: {"reason": "matrix"}  # noqa: E731
    return {
        ("POST", "/v1/agents"): lambda: agent_body(owner_email=OWNER, team="search"),
        ("POST", "/v1/agents/{agent_id}/nhis"): lambda: {
            "platform": "aws", "kind": "iam_role", "scope": ROLE_SCOPE, "trust_principal": TRUST,
        },
        ("POST", "/v1/agents/{agent_id}/complete"): reason,
        ("POST", "/v1/agents/{agent_id}/invokers"): lambda: {
            "kind": "person", "ref": "eve@example.com", "channel": "slack",
        },
        # No issuer is trusted for workloads here: an allowed caller gets 422 (issuer), after
        # the authorization this matrix is about (tests/test_workload_identity.py binds).
        ("POST", "/v1/agents/{agent_id}/workloads"): lambda: {
            "issuer": "https://matrix.example.com", "subject": unique("matrix-sub"),
        },
        ("POST", "/v1/nhis/{nhi_id}/approve"): reason,
        ("POST", "/v1/approvals/{approval_id}/approve"): reason,
        ("POST", "/v1/approvals/{approval_id}/deny"): reason,
        ("POST", "/v1/agents/{agent_id}/nhis:batch"): lambda: {"nhis": [{
            "platform": "aws", "kind": "iam_role", "scope": ROLE_SCOPE, "trust_principal": TRUST,
        }]},
        ("POST", "/v1/nhis/{nhi_id}/deny"): reason,
        ("POST", "/v1/agents/{agent_id}/contain"): reason,
        ("POST", "/v1/agents/{agent_id}/release"): reason,
        ("POST", "/v1/findings/{finding_id}/ack"): reason,
        ("POST", "/v1/activity"): lambda: {"events": [{
            "time": datetime.now(UTC).isoformat(), "identity": "matrix-nobody",
            "action": "s3:GetObject",
        }]},
        ("POST", "/v1/activity/imports"): lambda: {"location": location},
        ("POST", "/v1/nhis/{nhi_id}/renew"): reason,
        ("POST", "/v1/nhis/{nhi_id}/rotate"): reason,
        ("POST", "/v1/nhis/{nhi_id}/decommission"): reason,
        ("POST", "/v1/nhis/{nhi_id}/restore"): reason,
        ("POST", "/v1/nhis/{nhi_id}/credentials"): lambda: {"ttl": "15m", "task_id": "matrix"},
        ("PUT", "/v1/policies"): lambda: {"policies": [policy]},
        ("POST", "/v1/prompts/{prompt_id}/answer"): lambda: {"answer": "renew"},
        ("POST", "/v1/tokens"): lambda: {"name": unique("tok"), "role": "auditor", "ttl": "1d"},
        ("POST", "/v1/sweeps"): lambda: {"provider": "aws", "dry_run": True},
        ("POST", "/v1/targets"): lambda: {
            "name": unique("tgt"), "dsn": "postgresql://nhi_admin@db.internal:5432/app",
            "password_env": "NHI_TARGET_PASSWORD_MATRIX", "sslmode": "verify-full",
        },
    }  # fmt: skip


# ---- the matrix ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"), sorted(TABLE), ids=[f"{m} {p}" for m, p in sorted(TABLE)]
)
async def test_every_role_gets_the_tables_answer_and_refusals_change_nothing(
    service: Service,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    credentials: dict[str, str],
    actors: list[str],
    staging_policy: dict[str, Any],
    import_location: str,
    import_id: str,
    method: str,
    path: str,
) -> None:
    allowed, hidden = TABLE[(method, path)]
    make_body = _bodies(staging_policy, import_location).get((method, path))
    iam_path = service.settings.iam_path

    async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:

        async def call(who: str, world: World, use: str = "refused") -> httpx.Response:
            token = credentials.get(who) or credentials.get(f"{use}:{who}")
            headers = bearer(token) if token else {}
            body = make_body() if make_body else None
            return await http.request(method, _url(path, world), json=body, headers=headers)

        # Refusals first, on one world they must leave exactly as it was.
        world = _world(sessions, import_id)
        for who in [*BAD_CREDENTIALS, *sorted(ALL - allowed)]:
            before = _snapshot(sessions, aws, iam_path, world, actors)
            response = await call(who, world)
            expected = 401 if who in BAD_CREDENTIALS else 404 if who in hidden else 403
            assert response.status_code == expected, (who, response.status_code, response.text)
            assert response.json()["detail"]
            if expected == 401:
                assert response.headers["www-authenticate"] == "Bearer"
            if expected == 404:
                # Exactly what a missing id gets: nothing tells the two apart.
                missing = _missing(path, world)
                absent = await call(who, missing)
                assert absent.status_code == 404, absent.text
                shown, gone = response.json()["detail"], absent.json()["detail"]
                for k in [k for k in missing if missing[k] != world[k]]:
                    shown = shown.replace(world[k], "<id>")
                    gone = gone.replace(missing[k], "<id>")
                assert shown == gone, (who, shown, gone)
            after = _snapshot(sessions, aws, iam_path, world, actors)
            assert after == before, f"{who} {method} {path} changed something"

        # Then every allowed caller, each on a world of its own (its call may change it).
        for who in sorted(allowed):
            response = await call(who, _world(sessions, import_id), "allowed")
            assert response.status_code not in (401, 403, 404), (who, response.text)
            assert response.status_code < 500, (who, response.status_code, response.text)
