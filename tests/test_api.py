"""The HTTP API over real HTTP: agents, provisioning end to end, inventory, errors."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowQueryFailedError

from models.contracts import Phase, ScopeStatement
from models.enums import NhiKind
from models.orm import AuditEvent, Nhi
from nhi.infra.aws_clients import AwsClients
from nhi.infra.db import transaction
from nhi.rules.policy import (
    INLINE_POLICY_LIMIT,
    identity_policy_document,
    policy_size,
    scope_policy_limit,
)
from tests.conftest import Service
from tests.helpers import (
    ROLE_SCOPE,
    SENSITIVE_SCOPE,
    TRUST,
    agent_body,
    api_json,
    bearer,
    eventually,
)
from workflows.lifecycle import NhiLifecycleWorkflow


@pytest.fixture
async def http(service: Service) -> Any:
    token = service.token("platform-bot", "platform", teams=["search"])
    async with httpx.AsyncClient(base_url=service.url, headers=bearer(token), timeout=30) as client:
        yield client


def _counts(sessions: sessionmaker[Session]) -> tuple[int, int]:
    with transaction(sessions) as s:
        return (
            s.scalar(select(func.count()).select_from(Nhi)) or 0,
            s.scalar(select(func.count()).select_from(AuditEvent)) or 0,
        )


async def _agent(http: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    response = await http.post("/v1/agents", json=agent_body(**overrides))
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_health_and_openapi(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    spec = (await http.get("/openapi.json")).json()
    for path in (
        "/v1/agents",
        "/v1/agents/{agent_id}",
        "/v1/agents/{agent_id}/nhis",
        "/v1/nhis",
        "/v1/nhis/{nhi_id}",
    ):
        assert path in spec["paths"], path


async def test_agent_is_created_listed_and_shown(http: httpx.AsyncClient) -> None:
    agent = await _agent(
        http, category="browser_agent", invokers=["arn:aws:iam::123456789012:role/ops"]
    )
    assert agent["status"] == "active" and agent["created_by"] == "token:platform-bot"
    listed = await api_json(http, "GET", "/v1/agents", params={"owner": "ana@example.com"})
    assert agent["id"] in {a["id"] for a in listed}
    shown = await api_json(http, "GET", f"/v1/agents/{agent['id']}")
    assert shown["name"] == agent["name"] and shown["nhis"] == []
    assert shown["invokers"] == ["arn:aws:iam::123456789012:role/ops"]


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"owner_email": "not-an-email"}, 422, "owner_email"),
        ({"category": "toaster"}, 422, "category"),
        ({"name": "Bad Name!"}, 422, "name"),
        ({"environment": "qa"}, 422, "environment"),
        ({"colour": "blue"}, 422, "colour"),
        ({"backup_owner_email": "ana@example.com"}, 422, "backup_owner_email"),
        ({"expected_end_at": "2020-01-01T00:00:00Z"}, 422, "expected_end_at"),
    ],
)
async def test_bad_agent_is_refused_naming_the_field(
    http: httpx.AsyncClient,
    sessions: sessionmaker[Session],
    change: dict[str, Any],
    status: int,
    field: str,
) -> None:
    before = await api_json(http, "GET", "/v1/agents", params={"limit": 1000})
    response = await http.post("/v1/agents", json=agent_body(**change))
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field
    assert body["detail"].startswith(f"{field}:")
    after = await api_json(http, "GET", "/v1/agents", params={"limit": 1000})
    assert len(after) == len(before)


async def test_malformed_json_is_400_and_duplicate_name_is_409(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/agents", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    agent = await _agent(http)
    again = await http.post("/v1/agents", json=agent_body(name=agent["name"]))
    assert again.status_code == 409
    assert again.json()["field"] == "name"
    # Same name in another environment is a different agent.
    assert (
        await http.post("/v1/agents", json=agent_body(name=agent["name"], environment="staging"))
    ).status_code == 201


async def test_unknown_ids_are_404(http: httpx.AsyncClient) -> None:
    missing = uuid.uuid4()
    assert (await http.get(f"/v1/agents/{missing}")).status_code == 404
    assert (await http.get(f"/v1/nhis/{missing}")).status_code == 404
    response = await http.post(
        f"/v1/agents/{missing}/nhis",
        json={"platform": "aws", "kind": "iam_role", "scope": ROLE_SCOPE, "trust_principal": TRUST},
    )
    assert response.status_code == 404
    assert (await http.get("/v1/agents/not-a-uuid")).status_code == 422


async def test_provision_role_end_to_end(
    http: httpx.AsyncClient, service: Service, aws: AwsClients
) -> None:
    agent = await _agent(http)
    response = await http.post(
        f"/v1/agents/{agent['id']}/nhis",
        json={
            "platform": "aws",
            "kind": "iam_role",
            "scope": ROLE_SCOPE,
            "ttl": "12h",
            "trust_principal": TRUST,
        },
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    # One run per NHI: its lifecycle provisions it, then keeps it.
    assert accepted["workflow_id"] == f"nhi-{accepted['id']}"

    async def active() -> dict[str, Any]:
        nhi = await api_json(http, "GET", f"/v1/nhis/{accepted['id']}")
        assert nhi["status"] == "active", nhi
        return dict(nhi)

    nhi = await eventually(active)
    assert aws.iam.get_role(RoleName=nhi["name"])["Role"]["Arn"] == nhi["credential_ref"]
    assert nhi["workflow_id"] == accepted["workflow_id"]
    assert nhi["requested_by"] == "token:platform-bot"
    seconds = (
        __import__("datetime").datetime.fromisoformat(nhi["expires_at"])
        - __import__("datetime").datetime.fromisoformat(nhi["created_at"])
    ).total_seconds()
    assert abs(seconds - 12 * 3600) < 5
    # The workflow is visible in Temporal, where the Web UI shows it, keeping the NHI.
    handle = service.env.client.get_workflow_handle_for(
        NhiLifecycleWorkflow.run, accepted["workflow_id"]
    )

    async def keeping() -> None:
        status = (await handle.describe()).status
        assert status is not None and status.name == "RUNNING"
        try:
            view = await handle.query(NhiLifecycleWorkflow.view)
        except WorkflowQueryFailedError as err:  # still loading what it provisioned
            raise AssertionError(str(err)) from err
        assert view.phase is Phase.ACTIVE

    await eventually(keeping)

    footprint = await api_json(http, "GET", f"/v1/agents/{agent['id']}")
    assert [n["id"] for n in footprint["nhis"]] == [accepted["id"]]
    for params in ({"agent_id": agent["id"]}, {"status": "active", "owner": "ana@example.com"}):
        listed = await api_json(http, "GET", "/v1/nhis", params=params)
        assert accepted["id"] in {n["id"] for n in listed}
    assert (
        await api_json(
            http, "GET", "/v1/nhis", params={"agent_id": agent["id"], "status": "failed"}
        )
        == []
    )
    events = await api_json(http, "GET", f"/v1/nhis/{accepted['id']}/events")
    assert [e["event"] for e in events] == ["nhi.requested", "nhi.provisioning", "nhi.activated"]
    assert events[0]["actor"] == "token:platform-bot"


async def test_lifecycle_calls_on_an_nhi_still_being_provisioned_are_409(
    http: httpx.AsyncClient, service: Service
) -> None:
    """The NHI's one run exists from the request on, waiting here for an approver: its view
    and its updates answer 409 naming why, never a 500 or an action applied early."""
    agent = await _agent(http)
    accepted = await api_json(
        http,
        "POST",
        f"/v1/agents/{agent['id']}/nhis",
        json={
            "platform": "aws",
            "kind": "iam_role",
            "scope": SENSITIVE_SCOPE,
            "trust_principal": TRUST,
        },
    )
    assert accepted["status"] == "pending_approval"
    handle = service.env.client.get_workflow_handle(accepted["workflow_id"])

    async def waiting() -> None:  # on its approval window's timer
        events = (await handle.fetch_history()).events
        assert any(e.HasField("timer_started_event_attributes") for e in events)

    await eventually(waiting)
    view = await http.get(f"/v1/nhis/{accepted['id']}/lifecycle")
    assert view.status_code == 409, view.text
    assert "still being provisioned" in view.json()["detail"]
    owner = bearer(
        service.token("api-owner", "platform", teams=["search"], email="ana@example.com")
    )
    renew = await http.post(
        f"/v1/nhis/{accepted['id']}/renew", json={"extend_by": "1d"}, headers=owner
    )
    assert renew.status_code == 409, renew.text
    assert "still being provisioned" in renew.json()["detail"]
    history = await handle.fetch_history()
    assert not [
        e
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ], "a refused update leaves no trace"


@pytest.mark.parametrize(
    ("request_body", "environment", "field", "words"),
    [
        ({"kind": "iam_role", "scope": [{"actions": ["iam:*"], "resources": ["arn:aws:iam::123456789012:role/x"]}]},
         "dev", "scope[0].actions[0]", "forbidden"),
        ({"kind": "iam_role", "scope": [ROLE_SCOPE[0], {"actions": ["s3:GetObject"], "resources": ["*"]}]},
         "dev", "scope[1].resources[0]", "wildcard"),
        ({"kind": "iam_user_key", "scope": ROLE_SCOPE}, "prod", "kind", "not allowed in prod"),
        ({"kind": "iam_role", "scope": ROLE_SCOPE, "ttl": "400d"}, "dev", "ttl", "maximum lifetime"),
        ({"kind": "iam_role", "scope": ROLE_SCOPE, "ttl": "soon"}, "dev", "ttl", "duration"),
        ({"kind": "iam_role", "scope": ROLE_SCOPE, "trust_principal": None}, "dev", "trust_principal", "required"),
        ({"kind": "iam_role", "scope": ROLE_SCOPE, "allowed_cidrs": ["10.0.0.0/33"]}, "dev", "allowed_cidrs[0]", "CIDR"),
        ({"kind": "iam_role", "scope": []}, "dev", "scope", "at least 1"),
        ({"kind": "oauth_app", "scope": ROLE_SCOPE}, "dev", "kind", "Input should be"),
    ],
)  # fmt: skip
async def test_bad_provisioning_request_creates_nothing(
    http: httpx.AsyncClient,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    service: Service,
    request_body: dict[str, Any],
    environment: str,
    field: str,
    words: str,
) -> None:
    agent = await _agent(http, environment=environment)
    body = {"platform": "aws", "trust_principal": TRUST} | request_body
    if body.get("trust_principal") is None or body["kind"] != "iam_role":
        body.pop("trust_principal")
    before = _counts(sessions)
    users_before = len(aws.iam.list_users(PathPrefix=service.settings.iam_path)["Users"])
    response = await http.post(f"/v1/agents/{agent['id']}/nhis", json=body)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == field
    assert words in error["detail"]
    assert _counts(sessions) == before
    assert len(aws.iam.list_users(PathPrefix=service.settings.iam_path)["Users"]) == users_before


async def test_a_scope_that_leaves_no_room_for_the_quarantine_is_refused(
    http: httpx.AsyncClient, sessions: sessionmaker[Session]
) -> None:
    """IAM's 2,048 characters hold for all of a user's inline policies together: a scope
    within them but not within them less the quarantine's reserve would make IAM refuse the
    quarantine's deny policies when they are needed. Refused naming `scope`, nothing made;
    the same scope one resource shorter is accepted."""
    agent = await _agent(http)

    def body(resources: int) -> dict[str, Any]:
        arns = [f"arn:aws:s3:::kb-docs-{i:02d}/articles/*" for i in range(resources)]
        scope = [{"actions": ["s3:GetObject"], "resources": arns}]
        return {"platform": "aws", "kind": "iam_user_key", "scope": scope, "ttl": "1d"}

    def size(resources: int) -> int:
        # The policy the service writes for it (expiry condition included, no CIDRs).
        document = identity_policy_document(
            [ScopeStatement(**body(resources)["scope"][0])], [], datetime.now(UTC)
        )
        return policy_size(document)

    kind = NhiKind.IAM_USER_KEY
    n = 1
    while size(n + 1) <= scope_policy_limit(kind):
        n += 1
    assert size(n + 1) <= INLINE_POLICY_LIMIT[kind], "fits IAM's limit, not the reserve"
    before = _counts(sessions)
    refused = await http.post(f"/v1/agents/{agent['id']}/nhis", json=body(n + 1))
    assert refused.status_code == 422, refused.text
    error = refused.json()
    assert error["field"] == "scope" and "kept for its quarantine" in error["detail"], error
    assert _counts(sessions) == before
    accepted = await http.post(f"/v1/agents/{agent['id']}/nhis", json=body(n))
    assert accepted.status_code == 202, accepted.text


async def test_agent_expected_end_caps_every_nhi(http: httpx.AsyncClient) -> None:
    from datetime import UTC, datetime, timedelta

    end = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    agent = await _agent(http, expected_end_at=end.isoformat())
    accepted = await api_json(
        http, "POST", f"/v1/agents/{agent['id']}/nhis",
        json={"platform": "aws", "kind": "iam_role", "scope": ROLE_SCOPE, "ttl": "30d", "trust_principal": TRUST},
    )  # fmt: skip
    assert datetime.fromisoformat(accepted["expires_at"]) == end


@pytest.mark.parametrize(
    ("kind", "status", "field"),
    [
        ("NotOwner", 403, None),
        ("SelfApproval", 403, None),
        ("InvalidState", 409, None),
        ("AlreadyDecided", 409, None),
        ("MaxLifetime", 422, "extend_by"),
        ("ShortensExpiry", 422, "extend_by"),
        ("DeadlinePassed", 503, None),
        ("NotReady", 503, None),
        ("StepFailed", 409, None),
        ("", 409, None),
    ],
)
async def test_workflow_refusals_map_to_one_status_each(
    kind: str, status: int, field: str | None
) -> None:
    """A lifecycle's refusal becomes a domain error, answered by the one error mapping; the
    field is the error's attribute, and the message is the workflow's (untyped: withheld)."""
    from temporalio.client import WorkflowUpdateFailedError
    from temporalio.exceptions import ApplicationError

    from api.errors import _domain, refusal

    error = refusal(WorkflowUpdateFailedError(ApplicationError("refused: because", type=kind)))
    response = await _domain(None, error)  # type: ignore[arg-type]
    body = json.loads(bytes(response.body))
    assert response.status_code == status
    assert body.get("field") == field
    assert body["detail"] == (
        "refused: because" if kind else "the lifecycle could not carry out this action"
    )


@pytest.mark.parametrize(
    ("email", "expected"),
    [
        ("ana@example.com", True),
        ("ANA@Example.com", True),
        ("ben@example.com", True),
        ("carla@example.com", False),
        (None, False),
        ("", False),
    ],
)
def test_the_owner_rule(email: str | None, expected: bool) -> None:
    """One owner rule for API principals, Slack clicks and the lifecycle: owner or backup
    owner, by email, case-blind; an auditor's credential never has owner rights."""
    from models.enums import Role
    from models.orm import Agent
    from nhi.rules.owners import is_owner
    from nhi.services.auth import Principal

    assert is_owner(email, "ana@example.com", "Ben@example.com") is expected
    agent = Agent(owner_email="ana@example.com", backup_owner_email="Ben@example.com")
    for role, owns in ((Role.PLATFORM, expected), (Role.AUDITOR, False)):
        principal = Principal(name="x", kind="token", roles=frozenset({role}), email=email)
        assert principal.owns(agent) is owns
