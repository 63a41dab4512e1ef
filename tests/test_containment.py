"""Containment never depends on the lifecycle's health: security's decommission reaches an NHI
whose lifecycle run was terminated, or is stuck (its workflow task keeps failing)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowExecutionStatus

from models.orm import AuditEvent, Nhi
from nhi.infra.aws_clients import AwsClients
from nhi.infra.db import transaction
from tests.conftest import Service
from tests.helpers import ROLE_SCOPE, TRUST, agent_body, api_json, bearer, eventually
from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id


@pytest.fixture
async def owner(service: Service) -> Any:
    token = service.token("contain-ana", "platform", teams=["search"], email="ana@example.com")
    async with httpx.AsyncClient(base_url=service.url, headers=bearer(token), timeout=60) as c:
        yield c


@pytest.fixture
async def security(service: Service) -> Any:
    token = service.token("contain-sec", "security")
    async with httpx.AsyncClient(base_url=service.url, headers=bearer(token), timeout=60) as c:
        yield c


async def _active_role(owner: httpx.AsyncClient) -> dict[str, Any]:
    agent = await api_json(owner, "POST", "/v1/agents", json=agent_body())
    accepted = await api_json(
        owner,
        "POST",
        f"/v1/agents/{agent['id']}/nhis",
        json={"platform": "aws", "kind": "iam_role", "scope": ROLE_SCOPE, "trust_principal": TRUST},
    )

    async def active() -> dict[str, Any]:
        nhi = await api_json(owner, "GET", f"/v1/nhis/{accepted['id']}")
        assert nhi["status"] == "active", nhi
        assert (await owner.get(f"/v1/nhis/{accepted['id']}/lifecycle")).status_code == 200
        return dict(nhi)

    return await eventually(active)


async def _contained(
    service: Service, sessions: sessionmaker[Session], aws: AwsClients, nhi: dict[str, Any]
) -> None:
    async def quarantined() -> None:
        with transaction(sessions) as s:
            assert s.get_one(Nhi, nhi["id"]).status == "quarantined"
        names = aws.iam.list_role_policies(RoleName=nhi["name"])["PolicyNames"]
        assert "nhi-quarantine" in names, names

    await eventually(quarantined, timeout=60)
    handle = service.env.client.get_workflow_handle(lifecycle_workflow_id(nhi["id"]))
    assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING
    view = await handle.query(NhiLifecycleWorkflow.view)
    assert view.phase.value == "quarantined"
    with transaction(sessions) as s:
        events = list(
            s.scalars(
                select(AuditEvent)
                .where(AuditEvent.subject_id == str(nhi["id"]))
                .order_by(AuditEvent.id)
            )
        )
    quarantine = [e for e in events if e.event == "nhi.quarantined"]
    assert len(quarantine) == 1 and quarantine[0].actor == "token:contain-sec"


async def test_a_terminated_lifecycle_is_still_contained_by_security(
    service: Service,
    owner: httpx.AsyncClient,
    security: httpx.AsyncClient,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    nhi = await _active_role(owner)
    await service.env.client.get_workflow_handle(lifecycle_workflow_id(nhi["id"])).terminate(
        reason="operator mistake"
    )
    # Other actions still need a running lifecycle.
    rotate = await owner.post(f"/v1/nhis/{nhi['id']}/rotate", json={})
    assert rotate.status_code == 409, rotate.text
    response = await security.post(
        f"/v1/nhis/{nhi['id']}/decommission", json={"reason": "incident 42"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["path"] == "fresh_lifecycle"
    await _contained(service, sessions, aws, nhi)
    with transaction(sessions) as s:
        requested = s.scalars(
            select(AuditEvent).where(
                AuditEvent.subject_id == str(nhi["id"]),
                AuditEvent.event == "nhi.decommission_requested",
            )
        ).all()
    assert [(e.actor, e.reason, e.details) for e in requested] == [
        ("token:contain-sec", "incident 42", {"path": "fresh_lifecycle"})
    ]


async def test_a_stuck_lifecycle_is_restarted_and_contained(
    service: Service,
    owner: httpx.AsyncClient,
    security: httpx.AsyncClient,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    nhi = await _active_role(owner)
    client = service.env.client
    workflow_id = lifecycle_workflow_id(nhi["id"])
    await client.get_workflow_handle(workflow_id).terminate(reason="replaced below")
    # A run whose workflow task fails on every attempt: its input cannot even be decoded.
    stuck = await client.start_workflow(
        "NhiLifecycleWorkflow",
        {"nhi_id": "not-a-uuid"},
        id=workflow_id,
        task_queue=service.settings.temporal_task_queue,
    )

    async def failing() -> None:
        raw = (await stuck.describe()).raw_description
        assert raw.pending_workflow_task.attempt >= 2, raw.pending_workflow_task

    await eventually(failing, timeout=60)
    response = await security.post(f"/v1/nhis/{nhi['id']}/decommission", json={})
    assert response.status_code == 200, response.text
    assert response.json()["path"] == "restarted_lifecycle"
    stuck_run = client.get_workflow_handle(workflow_id, run_id=stuck.result_run_id)
    assert (await stuck_run.describe()).status is WorkflowExecutionStatus.TERMINATED
    await _contained(service, sessions, aws, nhi)


async def test_a_running_lifecycle_takes_the_update_path(
    service: Service,
    owner: httpx.AsyncClient,
    security: httpx.AsyncClient,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    nhi = await _active_role(owner)
    response = await security.post(f"/v1/nhis/{nhi['id']}/decommission", json={})
    assert response.status_code == 200, response.text
    assert response.json()["path"] == "update"
    assert response.json()["message"] == "decommission started"
    await _contained(service, sessions, aws, nhi)
    # A second one finds it already going: refused, nothing new in the trail.
    again = await security.post(f"/v1/nhis/{nhi['id']}/decommission", json={})
    assert again.status_code == 409, again.text
