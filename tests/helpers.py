"""Test helpers: real services started for the suite, and small polling utilities."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI

if TYPE_CHECKING:
    from temporalio.client import WorkflowHandle
    from temporalio.testing import WorkflowEnvironment

    from models.contracts import LifecycleView

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(
    port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before opening {port}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def start_moto(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc=proc)
    return proc


async def eventually(
    check: Callable[[], Awaitable[T]], *, timeout: float = 30.0, interval: float = 0.1
) -> T:
    """Poll `check` until it returns without AssertionError; re-raise the last one on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)


class ApiServer:
    """A real uvicorn server for an app, on a free loopback port, in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
            )
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> ApiServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("API server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def unique(prefix: str = "agent") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def agent_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": unique(),
        "category": "rag",
        "environment": "dev",
        "owner_email": "ana@example.com",
        "backup_owner_email": "ben@example.com",
        "team": "search",
        "purpose": "Answers questions from the product knowledge base",
    }
    body.update(overrides)
    return body


ROLE_SCOPE = [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::kb-docs/*"]}]
TRUST = "arn:aws:iam::123456789012:role/agent-runtime"


async def api_json(client: httpx.AsyncClient, method: str, path: str, **kw: Any) -> Any:
    response = await client.request(method, path, **kw)
    assert response.status_code < 400, (response.status_code, response.text)
    return response.json()


def request_nhi(
    sessions: Any,
    settings: Any,
    kind: str,
    *,
    scope: list[dict[str, Any]] | None = None,
    trust_principal: str | None = TRUST,
    environment: str = "dev",
    actor: str = "test:platform",
    owner_email: str = "ana@example.com",
    now: Any = None,
    **nhi_fields: Any,
) -> tuple[uuid.UUID, uuid.UUID, list[str]]:
    """Record an agent and an NHI request exactly as the API does (policy checks included)."""
    from models.enums import PLATFORM_OF, NhiKind
    from models.schemas import AgentCreate, NhiCreate
    from nhi import inventory
    from nhi.db import transaction

    with transaction(sessions) as session:
        agent = inventory.create_agent(
            session,
            AgentCreate(**agent_body(environment=environment, owner_email=owner_email)),
            actor,
        )
        nhi, sensitive = inventory.request_nhi(
            session,
            settings,
            agent.id,
            NhiCreate(
                platform=PLATFORM_OF[NhiKind(kind)],
                kind=kind,
                scope=scope or ROLE_SCOPE,
                trust_principal=trust_principal if kind == "iam_role" else None,
                **nhi_fields,
            ),
            actor,
            now=now,
        )
        return agent.id, nhi.id, sensitive


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Any:
        yield self._body


def inject_aws_error(
    client: Any, operation: str, code: str, status: int = 403
) -> Callable[[], None]:
    """Make every `operation` call on this boto3 client fail with an AWS error `code`; returns
    a function that lifts the fault.

    botocore's before-send hook answers instead of the server, as AWS would (e.g. an SCP
    denying PutRolePolicy); the rest of the client keeps talking to moto.
    """
    from botocore.awsrequest import AWSResponse

    body = (
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>"
        f"<Message>injected {code} on {operation}</Message></Error>"
        "<RequestId>test</RequestId></ErrorResponse>"
    ).encode()

    def answer(request: Any, **_: Any) -> AWSResponse:
        return AWSResponse(request.url, status, {}, _Raw(body))

    service = client.meta.service_model.service_name
    event = f"before-send.{service}.{operation}"
    client.meta.events.register(event, answer)
    return lambda: client.meta.events.unregister(event, answer)


_MINTED: dict[tuple[int, str], str] = {}


def mint(
    sessions: Any,
    name: str,
    role: str,
    *,
    teams: list[str] | None = None,
    email: str | None = None,
    ttl: str = "1d",
) -> str:
    """An API token for tests, issued straight in the database (once per name and database).
    Its audit name is `token:<name>`."""
    from models.enums import Role
    from nhi.auth import issue_token
    from nhi.db import transaction

    key = (id(sessions), name)
    if key not in _MINTED:
        with transaction(sessions) as session:
            _, token = issue_token(
                session,
                name=name,
                role=Role(role),
                ttl=ttl,
                created_by="test:setup",
                teams=teams,
                email=email,
            )
        _MINTED[key] = token
    return _MINTED[key]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def provision(
    env: WorkflowEnvironment, queue: str, nhi_id: uuid.UUID
) -> WorkflowHandle[Any, LifecycleView]:
    """Run provisioning for a recorded request; the handle of the lifecycle it starts.

    The clock stands still while provisioning, so the new lifecycle's timers start at the
    moment the test reads as "born"."""
    from models.contracts import ProvisionInput
    from nhi.temporal import provision_workflow_id
    from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id
    from workflows.provision import ProvisionNhiWorkflow

    with env.auto_time_skipping_disabled():
        await env.client.execute_workflow(
            ProvisionNhiWorkflow.run,
            ProvisionInput(nhi_id=nhi_id),
            id=provision_workflow_id(nhi_id),
            task_queue=queue,
        )
    return env.client.get_workflow_handle_for(
        NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi_id)
    )


async def skip_until(
    env: WorkflowEnvironment, handle: WorkflowHandle[Any, LifecycleView], at: datetime
) -> LifecycleView:
    """Skip virtual time to `at`, then let the lifecycle finish what became due; its view."""
    from workflows.lifecycle import NhiLifecycleWorkflow

    now = await env.get_current_time()
    if at > now:
        await env.sleep(at - now)
    return await handle.query(NhiLifecycleWorkflow.view)
