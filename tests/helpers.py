"""Test helpers: real services started for the suite, and small polling utilities."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker
    from temporalio.client import Client, WorkflowHandle, WorkflowHistory
    from temporalio.testing import WorkflowEnvironment

    from models.contracts import LifecycleView, ProvisionInput, SweepOutcome
    from models.orm import Nhi
    from nhi.infra.aws_clients import AwsClients
    from nhi.infra.config import Settings

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports below the kernel's ephemeral range, for services started
    later by a child process: a child that itself binds port 0 (the Temporal dev server does,
    for its HTTP API and metrics) can then never be handed one of them meanwhile."""
    low = 20000
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral = int(f.read().split()[0])
    chosen: list[int] = []
    for port in random.sample(range(low, max(ephemeral, low + 1000)), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == n:
            return chosen
    raise RuntimeError(f"no {n} free ports between {low} and {ephemeral}")


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
# A scope with a sensitive action: the request waits for an approver.
SENSITIVE_SCOPE = [{"actions": ["s3:DeleteObject"], "resources": ["arn:aws:s3:::kb-docs/*"]}]
TRUST = "arn:aws:iam::123456789012:role/agent-runtime"


async def api_json(client: httpx.AsyncClient, method: str, path: str, **kw: Any) -> Any:
    response = await client.request(method, path, **kw)
    assert response.status_code < 400, (response.status_code, response.text)
    return response.json()


def request_nhi(
    sessions: sessionmaker[Session],
    settings: Settings,
    kind: str,
    *,
    scope: list[dict[str, Any]] | None = None,
    trust_principal: str | None = TRUST,
    environment: str = "dev",
    actor: str = "test:platform",
    owner_email: str = "ana@example.com",
    now: datetime | None = None,
    **nhi_fields: Any,
) -> tuple[uuid.UUID, uuid.UUID, list[str]]:
    """Record an agent and an NHI request exactly as the API does (policy checks included)."""
    from models.enums import PLATFORM_OF, NhiKind
    from models.schemas import AgentCreate, NhiCreate
    from nhi.infra.db import transaction
    from nhi.services import agents, nhis

    with transaction(sessions) as session:
        agent = agents.create_agent(
            session,
            AgentCreate(**agent_body(environment=environment, owner_email=owner_email)),
            actor,
        )
        nhi, sensitive = nhis.request_nhi(
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
    client: Any, operation: str, code: str, status: int = 403, *, only: bytes | None = None
) -> Callable[[], None]:
    """Make every `operation` call on this boto3 client fail with an AWS error `code` (with
    `only`: those whose request body holds it); returns a function that lifts the fault.

    botocore's before-send hook answers instead of the server, as AWS would (e.g. an SCP
    denying PutRolePolicy); the rest of the client keeps talking to moto.
    """
    from botocore.awsrequest import AWSResponse

    body = (
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>"
        f"<Message>injected {code} on {operation}</Message></Error>"
        "<RequestId>test</RequestId></ErrorResponse>"
    ).encode()

    def answer(request: Any, **_: Any) -> AWSResponse | None:
        sent = request.body or b""
        sent = sent.encode() if isinstance(sent, str) else bytes(sent)
        if only is not None and only not in sent:
            return None  # sent to moto
        return AWSResponse(request.url, status, {}, _Raw(body))

    service = client.meta.service_model.service_name
    event = f"before-send.{service}.{operation}"
    client.meta.events.register(event, answer)
    return lambda: client.meta.events.unregister(event, answer)


def revoked_before(client: Any, what: str, name: str) -> datetime:
    """The session revocation of a role or user (`what`): sessions it issued before this
    time are refused (the `nhi-revoke-older-sessions` deny, read back from IAM)."""
    get = getattr(client, f"get_{what}_policy")
    param = "RoleName" if what == "role" else "UserName"
    document = get(**{param: name}, PolicyName="nhi-revoke-older-sessions")["PolicyDocument"]
    statement = document["Statement"][0]
    assert (statement["Effect"], statement["Action"], statement["Resource"]) == ("Deny", "*", "*")
    before = statement["Condition"]["DateLessThan"]["aws:TokenIssueTime"]
    return datetime.fromisoformat(before.replace("Z", "+00:00"))


@contextmanager
def policy_calls(client: Any) -> Iterator[list[str]]:
    """Every call this IAM client makes meanwhile, as `Operation:PolicyName`, in order."""
    calls: list[str] = []

    def record(model: Any, params: dict[str, Any], **_: Any) -> None:
        calls.append(f"{model.name}:{params.get('PolicyName', '')}")

    client.meta.events.register("before-parameter-build.iam", record)
    try:
        yield calls
    finally:
        client.meta.events.unregister("before-parameter-build.iam", record)


_MINTED: dict[tuple[int, str], str] = {}


def mint(
    sessions: sessionmaker[Session],
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
    from nhi.infra.db import transaction
    from nhi.services.auth import issue_token

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


async def start_one_run(
    client: Client, inp: ProvisionInput, queue: str
) -> WorkflowHandle[Any, LifecycleView]:
    """Start the NHI's one run as the API does: its lifecycle (`nhi-<id>`), with the
    provisioning request as its first phase."""
    from models.contracts import LifecycleInput
    from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id

    return await client.start_workflow(
        NhiLifecycleWorkflow.run,
        LifecycleInput(nhi_id=inp.nhi_id, provision=inp),
        id=lifecycle_workflow_id(inp.nhi_id),
        task_queue=queue,
    )


async def provision(
    env: WorkflowEnvironment, queue: str, nhi_id: uuid.UUID, *, one_run: bool = True
) -> WorkflowHandle[Any, LifecycleView]:
    """Provision a recorded request as the API does: the NHI's one run (its lifecycle, which
    provisions it first, then keeps it); with `one_run=False`, a provisioning run that starts
    the lifecycle (bundles, and runs started before one-run provisioning). The lifecycle's
    handle, once it is past provisioning (its view answers).

    The clock stands still while provisioning, so the lifecycle's timers start at the moment
    the test reads as "born"."""
    from temporalio.client import WorkflowExecutionStatus, WorkflowQueryFailedError

    from models.contracts import ProvisionInput
    from nhi.rules.ids import provision_workflow_id
    from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id
    from workflows.provision import ProvisionNhiWorkflow

    request = ProvisionInput(nhi_id=nhi_id)
    with env.auto_time_skipping_disabled():
        if not one_run:
            await env.client.execute_workflow(
                ProvisionNhiWorkflow.run,
                request,
                id=provision_workflow_id(nhi_id),
                task_queue=queue,
            )
            return env.client.get_workflow_handle_for(
                NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi_id)
            )
        await start_one_run(env.client, request, queue)
        # A plain handle, as for a run started elsewhere: the handle start_workflow returns
        # on the time-skipping server skips time by itself while awaiting a result.
        handle = env.client.get_workflow_handle_for(
            NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi_id)
        )

        async def provisioned() -> None:
            # The view is refused until the run has provisioned the NHI and loaded it.
            try:
                await handle.query(NhiLifecycleWorkflow.view)
            except WorkflowQueryFailedError as err:
                if (await handle.describe()).status is not WorkflowExecutionStatus.RUNNING:
                    await handle.result()  # the run ended while provisioning: its failure
                raise AssertionError(str(err)) from err

        await eventually(provisioned, timeout=60, interval=0.05)
    return handle


async def skip_until(
    env: WorkflowEnvironment, handle: WorkflowHandle[Any, LifecycleView], at: datetime
) -> LifecycleView:
    """Skip virtual time to `at`, then let the lifecycle finish what became due; its view."""
    from workflows.lifecycle import NhiLifecycleWorkflow

    now = await env.get_current_time()
    if at > now:
        await env.sleep(at - now)
    return await handle.query(NhiLifecycleWorkflow.view)


# --- sweeps -------------------------------------------------------------------------------------


def sweep_settings(settings: Settings, label: str, **overrides: object) -> Settings:
    """Settings of one sweep test: its own task queue (`<label>-<tag>`), IAM path and name
    prefix, so it sweeps only what it made; no propagation wait and no pacing, so a sweep
    takes a moment."""
    tag = uuid.uuid4().hex[:6]
    update: dict[str, object] = {
        "temporal_task_queue": f"{label}-{tag}",
        "iam_path": f"/{label}-{tag}/",
        "name_prefix": f"{label[0]}{tag}",
        "sweep_propagation_seconds": 0,
        "sweep_calls_per_second": 1000.0,
    }
    return settings.model_copy(update=update | overrides)


async def run_sweep(
    env: WorkflowEnvironment,
    queue: str,
    *,
    provider: str = "aws",
    dry_run: bool = False,
    workflow_id: str | None = None,
) -> SweepOutcome:
    """One sweep, to its end. The clock stands still meanwhile, so no grace period or expiry
    elsewhere is skipped past while the test looks at what the sweep did."""
    from models.contracts import SweepInput
    from workflows.sweep import SweepWorkflow

    with env.auto_time_skipping_disabled():
        return await env.client.execute_workflow(
            SweepWorkflow.run,
            SweepInput(provider=provider, dry_run=dry_run, triggered_by="test"),
            id=workflow_id or f"sweep-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
        )


def orphan_user(
    aws: AwsClients, settings: Settings, *, with_key: bool = True
) -> tuple[str, str | None]:
    """An orphan made behind the service's back: our tags (and a key and its secret), no
    inventory row. Its user name and the secret's ARN."""
    nhi_id = str(uuid.uuid4())
    name = f"{settings.name_prefix}-ghost-{nhi_id.replace('-', '')}"
    tags = [
        {"Key": "managed-by", "Value": "nhi-lifecycle"},
        {"Key": "nhi:nhi-id", "Value": nhi_id},
    ]
    aws.iam.create_user(UserName=name, Path=settings.iam_path, Tags=tags)
    if not with_key:
        return name, None
    key = aws.iam.create_access_key(UserName=name)["AccessKey"]
    secret = aws.secrets.create_secret(
        Name=f"{settings.secret_prefix}ghost/{nhi_id}",
        SecretString=json.dumps({"AccessKeyId": key["AccessKeyId"]}),
        Tags=tags,
    )["ARN"]
    return name, secret


def nhi_row(sessions: sessionmaker[Session], nhi_id: uuid.UUID) -> Nhi:
    """The NHI's inventory row as it is now."""
    from models.orm import Nhi
    from nhi.infra.db import transaction

    with transaction(sessions) as s:
        return s.get_one(Nhi, nhi_id)


def audit_trail(
    sessions: sessionmaker[Session], subject: object, subject_type: str = "nhi"
) -> list[tuple[str, str]]:
    """(event, actor) of every audit event about a subject, oldest first."""
    from sqlalchemy import select

    from models.orm import AuditEvent
    from nhi.infra.db import transaction

    with transaction(sessions) as s:
        return [
            (e.event, e.actor)
            for e in s.scalars(
                select(AuditEvent)
                .where(
                    AuditEvent.subject_type == subject_type, AuditEvent.subject_id == str(subject)
                )
                .order_by(AuditEvent.id)
            )
        ]


def delete_role(aws: AwsClients, name: str) -> None:
    """Delete an IAM role (and its inline policies) behind the service's back."""
    for policy in aws.iam.list_role_policies(RoleName=name)["PolicyNames"]:
        aws.iam.delete_role_policy(RoleName=name, PolicyName=policy)
    aws.iam.delete_role(RoleName=name)


@dataclass
class SweepRig:
    """A worker on the test's time-skipping server with a sweep test's own settings
    (`sweep_settings`); `aws` are the test's clients, `worker_aws` the worker's own, so a test
    can inject faults into the worker's calls only."""

    env: WorkflowEnvironment
    settings: Settings
    sessions: sessionmaker[Session]
    aws: AwsClients
    worker_aws: AwsClients
    queue: str

    async def sweep(self, dry_run: bool = False) -> SweepOutcome:
        return await run_sweep(self.env, self.queue, dry_run=dry_run)

    def tagged_user(self, *, with_key: bool = True) -> tuple[str, str | None]:
        return orphan_user(self.aws, self.settings, with_key=with_key)

    def nhi(self, nhi_id: uuid.UUID) -> Nhi:
        return nhi_row(self.sessions, nhi_id)

    def events(self, subject: object, subject_type: str = "nhi") -> list[tuple[str, str]]:
        return audit_trail(self.sessions, subject, subject_type)


# --- golden histories ---------------------------------------------------------------------------

HISTORIES = Path(__file__).resolve().parent / "histories"
RECORD_HISTORIES = "NHI_RECORD_HISTORIES"


def keep_history(history: WorkflowHistory, name: str) -> bool:
    """Write `tests/histories/<name>.json` when `NHI_RECORD_HISTORIES` is set (a deliberate,
    patched change of a workflow: README "Changing workflow code"); whether it wrote."""
    if not os.environ.get(RECORD_HISTORIES):
        return False
    (HISTORIES / f"{name}.json").write_text(history.to_json())
    return True
