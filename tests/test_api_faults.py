"""Requests either start or leave nothing, and lifecycle actions have deadlines.

Faults at the boundary: Temporal stopped (a dev server shut down under a connected API),
unreachable (nothing listening) or hung (a TCP gate that accepts and never answers), and the
worker stopped while the API and Temporal are up.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import String, and_, func, or_, select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from models.orm import AuditEvent, IdempotencyKey, Nhi
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from tests.conftest import binary, dev_address
from tests.helpers import (
    ROLE_SCOPE,
    TRUST,
    ApiServer,
    agent_body,
    api_json,
    bearer,
    eventually,
    free_port,
    mint,
)
from worker import build_worker
from workflows.lifecycle import lifecycle_workflow_id

NHI_REQUEST = {"platform": "aws", "kind": "iam_role", "scope": ROLE_SCOPE, "trust_principal": TRUST}


def counts(sessions: sessionmaker[Session], agent_id: str) -> tuple[int, int, int]:
    """This agent's NHIs, the audit events about it or about an NHI that is not someone
    else's (a rolled-back request's would be), and idempotency keys. Scoped, because
    lifecycles other tests left on the shared dev server keep writing their own events."""
    with transaction(sessions) as s:
        others = select(Nhi.id.cast(String)).where(Nhi.agent_id != uuid.UUID(agent_id))
        return (
            s.scalar(select(func.count()).select_from(Nhi).where(Nhi.agent_id == agent_id)) or 0,
            s.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(
                    or_(
                        AuditEvent.subject_id == agent_id,
                        and_(
                            AuditEvent.subject_type == "nhi", AuditEvent.subject_id.not_in(others)
                        ),
                    )
                )
            )
            or 0,
            s.scalar(select(func.count()).select_from(IdempotencyKey)) or 0,
        )


@contextmanager
def tcp_gate() -> Iterator[int]:
    """A closed gate: accepts connections and never answers (a hung Temporal frontend)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in held:
            conn.close()
        server.close()


@asynccontextmanager
async def api(settings: Settings, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The API alone (no worker) with these settings, over real HTTP."""
    app_settings = settings.model_copy(update=overrides)
    with ApiServer(create_app(app_settings)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            yield client


async def _agent(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    created = await api_json(client, "POST", "/v1/agents", json=agent_body(), headers=headers)
    return str(created["id"])


async def _refused_quickly(
    client: httpx.AsyncClient,
    sessions: sessionmaker[Session],
    agent_id: str,
    headers: dict[str, str],
) -> None:
    before = counts(sessions, agent_id)
    began = time.monotonic()
    response = await client.post(
        f"/v1/agents/{agent_id}/nhis",
        json=NHI_REQUEST,
        headers=headers | {"Idempotency-Key": str(uuid.uuid4())},
    )
    took = time.monotonic() - began
    assert response.status_code == 503, response.text
    assert "nothing was recorded" in response.json()["detail"]
    assert took < 2.0, f"answered after {took:.2f}s"
    # No NHI row, no audit event, and the idempotency key released (a 503 applied nothing).
    assert counts(sessions, agent_id) == before


@pytest.mark.parametrize("fault", ["nothing listening", "hung frontend"])
async def test_provisioning_with_temporal_unreachable_leaves_nothing(
    settings: Settings, sessions: sessionmaker[Session], fault: str
) -> None:
    headers = bearer(mint(sessions, "faults-platform", "platform", teams=["search"]))
    with tcp_gate() as gate_port:
        port = free_port() if fault == "nothing listening" else gate_port
        async with api(settings, temporal_address=f"127.0.0.1:{port}") as client:
            agent_id = await _agent(client, headers)
            for _ in range(2):  # first connect, then a second attempt on the same app
                await _refused_quickly(client, sessions, agent_id, headers)


async def test_provisioning_after_temporal_stopped_leaves_nothing(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """A connected API whose Temporal server is then stopped."""
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter, dev_server_existing_path=binary("temporal")
    )
    headers = bearer(mint(sessions, "faults-platform", "platform", teams=["search"]))
    stopped = False
    try:
        queue = f"faults-{uuid.uuid4().hex[:8]}"
        async with api(settings, temporal_address=dev_address(env), temporal_task_queue=queue) as c:
            agent_id = await _agent(c, headers)
            # While Temporal is up the request is accepted (no worker: it just waits).
            accepted = await api_json(
                c, "POST", f"/v1/agents/{agent_id}/nhis", json=NHI_REQUEST, headers=headers
            )
            with transaction(sessions) as s:
                row = s.get_one(Nhi, uuid.UUID(accepted["id"]))
                assert row.status == "requested" and row.workflow_id == accepted["workflow_id"]
            await env.shutdown()
            stopped = True
            await _refused_quickly(c, sessions, agent_id, headers)
    finally:
        if not stopped:
            await env.shutdown()


async def test_extend_by_out_of_range_is_422_naming_the_field(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    headers = bearer(
        mint(sessions, "faults-owner", "platform", teams=["search"], email="ana@example.com")
    )
    async with api(settings, temporal_address=f"127.0.0.1:{free_port()}") as client:
        for value in (2**63, "999999999d", 0, -5, True, 1.5, "soon"):
            response = await client.post(
                f"/v1/nhis/{uuid.uuid4()}/renew", json={"extend_by": value}, headers=headers
            )
            assert response.status_code == 422, (value, response.text)
            assert response.json()["field"] == "extend_by", value


async def _events(sessions: sessionmaker[Session], nhi_id: object) -> list[str]:
    with transaction(sessions) as s:
        return list(
            s.scalars(
                select(AuditEvent.event)
                .where(AuditEvent.subject_id == str(nhi_id))
                .order_by(AuditEvent.id)
            )
        )


@pytest.mark.slow
async def test_rotate_with_the_worker_down_is_503_and_never_applied_later(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    queue = f"faults-{uuid.uuid4().hex[:8]}"
    timeout = 2.0
    svc = settings.model_copy(
        update={
            "temporal_address": dev_address(dev_env),
            "temporal_task_queue": queue,
            "api_update_timeout_seconds": timeout,
        }
    )
    headers = bearer(
        mint(sessions, "faults-ana", "platform", teams=["search"], email="ana@example.com")
    )
    async with api(svc) as client:
        async with build_worker(dev_env.client, svc, sessions, aws):
            agent_id = await _agent(client, headers)
            accepted = await api_json(
                client,
                "POST",
                f"/v1/agents/{agent_id}/nhis",
                json={"platform": "aws", "kind": "iam_user_key", "scope": ROLE_SCOPE},
                headers=headers,
            )
            nhi_id = accepted["id"]

            async def active() -> dict[str, Any]:
                nhi = await api_json(client, "GET", f"/v1/nhis/{nhi_id}", headers=headers)
                assert nhi["status"] == "active", nhi
                return dict(nhi)

            nhi = await eventually(active)
            lifecycle = dev_env.client.get_workflow_handle(lifecycle_workflow_id(nhi_id))

            async def running() -> None:
                view = await client.get(f"/v1/nhis/{nhi_id}/lifecycle", headers=headers)
                assert view.status_code == 200, view.text

            await eventually(running)
        # The worker is gone; Temporal and the API are up.
        keys_before = aws.iam.list_access_keys(UserName=nhi["name"])["AccessKeyMetadata"]
        began = time.monotonic()
        response = await client.post(
            f"/v1/nhis/{nhi_id}/rotate", json={"reason": "suspected leak"}, headers=headers
        )
        took = time.monotonic() - began
        assert response.status_code == 503, response.text
        assert "will not be applied later" in response.json()["detail"]
        assert timeout <= took < timeout + 3, took

        # The worker comes back: the admitted update reaches the lifecycle after its deadline
        # and is refused there, so no rotation ever happens.
        async with build_worker(dev_env.client, svc, sessions, aws):

            async def caught_up() -> None:
                view = await client.get(f"/v1/nhis/{nhi_id}/lifecycle", headers=headers)
                assert view.status_code == 200, view.text

            await eventually(caught_up)
            # A later action goes through: the lifecycle is healthy and took its tasks.
            renewed = await client.post(
                f"/v1/nhis/{nhi_id}/renew", json={"extend_by": "60d"}, headers=headers
            )
            assert renewed.status_code == 200, renewed.text
            await asyncio.sleep(1.0)
            events = await _events(sessions, nhi_id)
            assert not [e for e in events if "rotat" in e], events
            assert "nhi.renewed" in events
            keys_after = aws.iam.list_access_keys(UserName=nhi["name"])["AccessKeyMetadata"]
            assert [k["AccessKeyId"] for k in keys_after] == [k["AccessKeyId"] for k in keys_before]
            history = await lifecycle.fetch_history()
            accepted_updates = [
                e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
                for e in history.events
                if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
            ]
            assert "rotate" not in accepted_updates and "renew" in accepted_updates
