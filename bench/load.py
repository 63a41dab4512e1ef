"""Load generation through the public API, and observation through the inventory.

Requests go over real HTTP with a fixed number in flight (a closed loop, like a platform team's
automation). Completion moments come from the audit trail: every transition writes one
`audit_events` row whose `created_at` is Postgres's `now()` in the transition's transaction,
on the same machine clock as the benchmark's `time.time()`. So latencies need no polling
resolution and the observer adds no load while a run is in flight.
"""

from __future__ import annotations

import asyncio
import importlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import httpx
import psycopg

from nhi.infra.db import make_engine, make_sessionmaker, transaction

ACTOR = "bench@example.com"
# Every benchmark agent has the same owner, so one owner credential can decommission them all.
OWNER = "owner@example.com"
TEAM = "bench"
TRUST = "arn:aws:iam::123456789012:role/bench-agent-runtime"
SCOPE = [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::bench-kb/*"]}]
# What a `postgres_role` gets on the target (read-only: no approval needed).
PG_SCOPE = [{"actions": ["SELECT"], "resources": ["docs.articles"]}]
# As many requests in flight as the worker has activity slots
# (NHI_WORKER_MAX_CONCURRENT_ACTIVITIES).
CONCURRENCY = 32
# Attempts per request when the connection drops before an answer (see each caller for why a
# retry is safe).
RETRIES = 3
STALL_S = 90.0


class Stalled(RuntimeError):
    """The service stopped making progress (see the worker's log)."""


T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Credentials:
    """Request headers per kind of caller.

    With API authentication (`nhi.services.auth`), tokens are issued straight in the stack's
    database, as `nhi dev` issues its admin token: an admin (policies) and a platform caller for
    team `bench` whose email is the agents' owner (so it may also decommission). Without it, the
    caller is named in `X-NHI-Actor`.
    """

    platform: dict[str, str]
    admin: dict[str, str]
    owner: dict[str, str]
    mode: str


def credentials(database_url: str) -> Credentials:
    """Credentials that work with the API as it is in this tree."""
    try:
        auth = importlib.import_module("nhi.services.auth")
        roles = importlib.import_module("models.enums").Role
    except (ImportError, AttributeError):
        return Credentials(
            platform={"X-NHI-Actor": ACTOR},
            admin={"X-NHI-Actor": ACTOR},
            owner={"X-NHI-Actor": OWNER},
            mode="X-NHI-Actor header (no API authentication in this tree)",
        )
    engine = make_engine(database_url, pool_size=1)
    tag = run_tag()
    try:
        with transaction(make_sessionmaker(engine)) as session:
            _, admin = auth.issue_token(
                session, name=f"bench-admin-{tag}", role=roles("admin"), ttl="1d",
                created_by="system:bench",
            )  # fmt: skip
            _, platform = auth.issue_token(
                session, name=f"bench-platform-{tag}", role=roles("platform"), ttl="1d",
                created_by="system:bench", teams=[TEAM], email=OWNER,
            )  # fmt: skip
    finally:
        engine.dispose()
    bearer = {"Authorization": f"Bearer {platform}"}
    return Credentials(
        platform=bearer,
        admin={"Authorization": f"Bearer {admin}"},
        owner=bearer,
        mode="API tokens issued in the database (admin; platform for team bench, owner email)",
    )


@dataclass(frozen=True)
class Agent:
    """An agent registered for the benchmark."""

    id: str
    name: str
    owner: str


@dataclass
class Requested:
    """One NHI request: when it was sent and what the API answered."""

    id: str
    agent: Agent
    kind: str
    sent_at: float
    answered_at: float
    expires_at: float


async def bounded(
    items: Sequence[T], fn: Callable[[int, T], Awaitable[R]], concurrency: int
) -> list[R]:
    """`fn(i, item)` for every item with at most `concurrency` running; results in order."""
    results: list[R | None] = [None] * len(items)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(items)):
        queue.put_nowait(i)

    async def lane() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results[i] = await fn(i, items[i])

    await asyncio.gather(*(lane() for _ in range(min(concurrency, len(items)) or 1)))
    return [r for r in results if r is not None]


def http_client(
    api_url: str, headers: dict[str, str], concurrency: int = CONCURRENCY
) -> httpx.AsyncClient:
    """One connection per request in flight; long timeouts (the benchmark bounds time itself)."""
    return httpx.AsyncClient(
        base_url=api_url,
        headers=headers,
        timeout=httpx.Timeout(60.0),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: "
            f"HTTP {response.status_code} {response.text[:300]}"
        )
    return response.json()


async def create_agents(http: httpx.AsyncClient, n: int, tag: str) -> list[Agent]:
    """Register `n` agents with unique names (all owned by OWNER, team TEAM)."""

    async def one(i: int, _: None) -> Agent:
        for attempt in range(RETRIES):
            # A retry takes a new name: the lost attempt may have created its agent, which then
            # just stays unused instead of clashing.
            name = f"bench-{tag}-{i}" + (f"-r{attempt}" if attempt else "")
            body = {
                "name": name,
                "category": "rag",
                "environment": "dev",
                "owner_email": OWNER,
                "backup_owner_email": "backup@example.com",
                "team": TEAM,
                "purpose": "Benchmark agent",
            }
            try:
                data = _check(await http.post("/v1/agents", json=body))
            except httpx.TransportError:
                if attempt == RETRIES - 1:
                    raise
                await asyncio.sleep(0.5)
                continue
            return Agent(id=data["id"], name=name, owner=OWNER)
        raise AssertionError("unreachable")

    return await bounded([None] * n, one, CONCURRENCY)


def nhi_body(
    kind: str, ttl: int | str, target: str | None = None, agent: str = ""
) -> dict[str, Any]:
    """A valid request: an `iam_role` or an `iam_user_key` with a small S3 read scope, or a
    `postgres_role` on `target` that may read one table. An `iam_role` trusts its agent's own
    runtime principal: one principal is never shared between agents (OWASP NHI9)."""
    if kind == "postgres_role":
        return {
            "platform": "postgres",
            "kind": kind,
            "ttl": ttl,
            "scope": PG_SCOPE,
            "target": target,
        }
    body: dict[str, Any] = {"platform": "aws", "kind": kind, "ttl": ttl, "scope": SCOPE}
    if kind == "iam_role":
        body["trust_principal"] = f"{TRUST}-{agent}" if agent else TRUST
    return body


def nhi_of_agent(dsn: str, agent_id: str) -> tuple[str, str, float] | None:
    """(id, kind, expires_at epoch) of the agent's NHI, if a request for it was recorded."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT id, kind, extract(epoch FROM expires_at) FROM nhis WHERE agent_id = %s",
            (agent_id,),
        ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]), float(row[2]))


async def request_nhis(
    http: httpx.AsyncClient,
    dsn: str,
    agents: Sequence[Agent],
    kind_of: Callable[[int], str],
    ttl_of: Callable[[int], int | str],
    target: str | None = None,
) -> list[Requested]:
    """One NHI per agent through `POST /v1/agents/{id}/nhis`, CONCURRENCY in flight
    (`target`: the Postgres target of `postgres_role` requests).

    If the connection drops before the answer, the inventory says whether the request was
    recorded (then it is running and counts from its first send) or must be sent again.
    """

    async def one(i: int, agent: Agent) -> Requested:
        kind = kind_of(i)
        sent = time.time()
        for attempt in range(RETRIES):
            try:
                body = nhi_body(kind, ttl_of(i), target, agent.name)
                response = await http.post(f"/v1/agents/{agent.id}/nhis", json=body)
            except httpx.TransportError:
                recorded = await asyncio.to_thread(nhi_of_agent, dsn, agent.id)
                if recorded is not None:
                    nhi_id, kind, expires = recorded
                    return Requested(nhi_id, agent, kind, sent, time.time(), expires)
                if attempt == RETRIES - 1:
                    raise
                continue
            data = _check(response)
            expires = datetime.fromisoformat(data["expires_at"]).timestamp()
            return Requested(data["id"], agent, kind, sent, time.time(), expires)
        raise AssertionError("unreachable")

    return await bounded(agents, one, CONCURRENCY)


async def decommission(
    http: httpx.AsyncClient, nhis: Sequence[Requested], owner: dict[str, str]
) -> dict[str, float]:
    """`POST /v1/nhis/{id}/decommission` as the agents' owner; when each request was sent.

    A 409/503 right after activation means the lifecycle run is still starting (the provisioning
    workflow starts it after recording `active`): retried, and the retry's send time counts.
    After a dropped connection, a 409 saying the decommission is under way (or the NHI is no
    longer active) means the lost request went through.
    """

    async def one(_: int, nhi: Requested) -> tuple[str, float]:
        lost_at: float | None = None
        for attempt in range(60):
            sent = time.time()
            try:
                response = await http.post(
                    f"/v1/nhis/{nhi.id}/decommission", json={"reason": "benchmark"}, headers=owner
                )
            except httpx.TransportError:
                lost_at = lost_at or sent
                await asyncio.sleep(0.5)
                continue
            if (
                lost_at is not None
                and response.status_code == 409
                and ("under way" in response.text or "not active" in response.text)
            ):
                return nhi.id, lost_at
            if response.status_code in (409, 503) and attempt < 59:
                await asyncio.sleep(0.5)
                continue
            _check(response)
            return nhi.id, sent
        raise RuntimeError(f"decommission of {nhi.id} kept being refused")

    return dict(await bounded(nhis, one, CONCURRENCY))


async def set_grace_period(
    http: httpx.AsyncClient, kind: str, seconds: int, admin: dict[str, str]
) -> None:
    """Replace the aws/<kind>/dev policy with the same one but another grace period.

    With 0, a decommissioned or expired NHI is deleted right after its quarantine, so the
    benchmark can measure deletion and leaves no identities behind.
    """
    policies = _check(await http.get("/v1/policies", headers=admin))
    current = next(
        p
        for p in policies
        if p["platform"] == "aws" and p["kind"] == kind and p["environment"] == "dev"
    )
    body = {
        "platform": "aws",
        "kind": kind,
        "environment": "dev",
        "allowed": current["allowed"],
        "default_ttl": current["default_ttl_seconds"],
        "max_lifetime": current["max_lifetime_seconds"],
        "rotation_period": current["rotation_period_seconds"],
        "reminder_offsets": current["reminder_offsets_seconds"],
        "grace_period": seconds,
        "max_session_duration": current["max_session_duration_seconds"],
        "allow_resource_wildcard": current["allow_resource_wildcard"],
        "forbidden_actions": current["forbidden_actions"],
        "sensitive_actions": current["sensitive_actions"],
    }
    _check(await http.put("/v1/policies", json={"policies": [body]}, headers=admin))


async def register_target(
    http: httpx.AsyncClient, name: str, dsn: str, password_secret: str, admin: dict[str, str]
) -> None:
    """`POST /v1/targets` as an admin: a Postgres target whose admin password the worker reads
    from the Secrets Manager secret `password_secret`."""
    body = {"name": name, "dsn": dsn, "password_secret": password_secret}
    _check(await http.post("/v1/targets", json=body, headers=admin))


def status_counts(dsn: str, ids: Sequence[str]) -> dict[str, int]:
    """How many of the NHIs are in each status right now."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT status, count(*) FROM nhis WHERE id = ANY(%s::uuid[]) GROUP BY status",
            (list(ids),),
        ).fetchall()
    return {str(status): int(count) for status, count in rows}


async def wait_for_status(
    dsn: str,
    ids: Sequence[str],
    done: set[str],
    timeout: float,
    failed: frozenset[str] = frozenset({"failed", "revoke_failed"}),
    stall_s: float = STALL_S,
) -> tuple[dict[str, int], bool]:
    """Poll until every NHI is in a `done` (or failed) status; (final counts, finished?).

    Raises Stalled when no NHI changed status for `stall_s` (a broken worker would otherwise
    keep the benchmark waiting for its whole budget).
    """
    deadline = time.monotonic() + timeout
    last: dict[str, int] = {}
    changed = time.monotonic()
    while True:
        counts = await asyncio.to_thread(status_counts, dsn, ids)
        settled = sum(c for s, c in counts.items() if s in done or s in failed)
        if settled >= len(ids):
            return counts, True
        now = time.monotonic()
        if counts != last:
            last, changed = counts, now
        elif now - changed > stall_s:
            raise Stalled(f"no NHI changed status for {stall_s:.0f}s: {counts}")
        if now > deadline:
            return counts, False
        await asyncio.sleep(0.5)


def event_times(dsn: str, ids: Sequence[str], event: str) -> dict[str, float]:
    """Epoch seconds of the first `event` in each NHI's audit trail."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT subject_id, extract(epoch FROM min(created_at)) FROM audit_events "
            "WHERE event = %s AND subject_id = ANY(%s) GROUP BY subject_id",
            (event, list(ids)),
        ).fetchall()
    return {str(subject): float(epoch) for subject, epoch in rows}


def run_tag() -> str:
    """A short tag that keeps this run's names unique."""
    return uuid.uuid4().hex[:6]
