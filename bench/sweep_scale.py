"""Benchmark: an orphan sweep at account scale, side by side with Cloud Custodian and a plain
boto3 floor, on one moto server (issue 19).

The account: USERS IAM users under the service's path; all but ORPHANS are in the inventory
(active rows whose lifecycle workflows are parked, running, on a task queue nobody polls, so
the sweep's supervision finds them running), with exactly their granted scope policy; the
ORPHANS carry our tags (and one access key each) but no inventory row. Every tool must remove
exactly the orphans; after each repetition the users left under the path are checked against
the inventory.

- nhi-lifecycle: a `SweepWorkflow` on the running worker (grace 0: the orphans are removed
  in `remove_orphans` batches), timed until the last orphan is gone from IAM.
- Cloud Custodian (`custodian run`): an iam-user policy filtering on the path and on a tag
  only the orphans carry (Custodian cannot read our inventory), with the `delete` action.
  moto lacks ListServiceSpecificCredentials, which that action calls: the counting proxy
  answers it with an empty list.
- floor: one thread of plain boto3 that reads the inventory's names, lists users by path and
  deletes each orphan's keys and then the user.

Every tool talks to moto through one counting proxy (calls per user); CPU is per process. The
proxy pages GetAccountAuthorizationDetails as IAM does (moto answers it in one page whatever
MaxItems says), so our sweep holds a page at a time, as it would against AWS.

`python -m bench.sweep_scale --users 2000 --orphans 200 [--reps 1] [--tools ours,custodian,floor]`
(the issue's size: `--users 5000 --orphans 500 --reps 3`; memory at 50,000 users:
`--users 50000 --orphans 500 --tools ours --reps 1`, which reports the worker's peak RSS).
`python -m bench --only sweep_scale` runs the issue's size.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import psycopg
from botocore.config import Config

from bench.report import Result, fmt
from bench.services import REPO, Stack
from models.contracts import ScopeStatement, SweepInput
from nhi.rules.ids import lifecycle_workflow_id
from nhi.rules.policy import identity_policy_document

NAME = "sweep_scale"
PATH = "/nhi-lifecycle/"
PARKED = "bench-parked"  # a task queue nobody polls: lifecycles there stay "running"
ORPHAN_TAG = "bench:orphan"
SCOPE = [{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::bench-kb/*"]}]
WORKER_ENV = {
    "NHI_ORPHAN_GRACE_SECONDS": "0",
    "NHI_SWEEP_PROPAGATION_SECONDS": "0",
    "NHI_SWEEP_CALLS_PER_SECOND": "1000",
}
EMPTY_SSC = (
    b'<ListServiceSpecificCredentialsResponse xmlns="https://iam.amazonaws.com/doc/2010-05-08/">'
    b"<ListServiceSpecificCredentialsResult><ServiceSpecificCredentials/>"
    b"</ListServiceSpecificCredentialsResult><ResponseMetadata><RequestId>bench</RequestId>"
    b"</ResponseMetadata></ListServiceSpecificCredentialsResponse>"
)


DETAILS = "GetAccountAuthorizationDetails"
DETAIL_LISTS = ("UserDetailList", "GroupDetailList", "RoleDetailList", "Policies")


# ---- a counting proxy in front of moto ----------------------------------------------------------


class DetailsPaging:
    """IAM's paging of GetAccountAuthorizationDetails, which moto answers in one page whatever
    MaxItems says: the first request of a listing (no Marker) fetches moto's whole answer and
    keeps its entries; each page is then MaxItems of them, Marker the offset, as IAM would
    send it. So the sweep holds a page at a time, as against AWS (the 50,000-user memory run
    measures the sweep, not moto's one-page answer)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[str, dict[str, list[bytes]]]] = {}

    @staticmethod
    def listing(params: dict[str, list[str]]) -> str:
        return ",".join(
            sorted(v for k, vs in params.items() if k.startswith("Filter.") for v in vs)
        )

    def keep(self, listing: str, full: bytes) -> None:
        root = ET.fromstring(full)
        ns = root.tag[1 : root.tag.index("}")] if root.tag.startswith("{") else ""
        if ns:
            ET.register_namespace("", ns)  # members serialised without an ns0: prefix
        result = root.find(f"{{{ns}}}GetAccountAuthorizationDetailsResult")
        lists: dict[str, list[bytes]] = {}
        for name in DETAIL_LISTS:
            found = result.find(f"{{{ns}}}{name}") if result is not None else None
            lists[name] = [ET.tostring(m) for m in found] if found is not None else []
        with self._lock:
            self._kept[listing] = (ns, lists)

    def page(self, listing: str, start: int, size: int) -> bytes:
        with self._lock:
            ns, lists = self._kept[listing]
        total = max(len(v) for v in lists.values())
        truncated = start + size < total
        parts = [f'<GetAccountAuthorizationDetailsResponse xmlns="{ns}">'.encode()]
        parts.append(b"<GetAccountAuthorizationDetailsResult>")
        parts.append(b"<IsTruncated>" + (b"true" if truncated else b"false") + b"</IsTruncated>")
        if truncated:
            parts.append(f"<Marker>{start + size}</Marker>".encode())
        for name, members in lists.items():
            parts.append(f"<{name}>".encode())
            parts.extend(members[start : start + size])
            parts.append(f"</{name}>".encode())
        parts.append(b"</GetAccountAuthorizationDetailsResult>")
        parts.append(b"<ResponseMetadata><RequestId>bench</RequestId></ResponseMetadata>")
        parts.append(b"</GetAccountAuthorizationDetailsResponse>")
        return b"".join(parts)


class CountingProxy:
    """Relays to moto, counting each call by its Action; answers ListServiceSpecificCredentials
    (which moto lacks) with an empty list."""

    def __init__(self, upstream: str) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        paging = DetailsPaging()
        target = urlsplit(upstream)
        proxy = self
        local = threading.local()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body in one segment: no Nagle / delayed-ACK stall per call.
            wbufsize = 1 << 16
            disable_nagle_algorithm = True

            def log_message(self, *_: object) -> None:
                pass

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                params = parse_qs(body.decode(errors="replace"))
                action = params.get("Action", ["?"])[0]
                if action == "?":
                    action = self.headers.get("X-Amz-Target", "?").split(".")[-1]
                with proxy._lock:
                    proxy.calls[action] += 1
                if action == "ListServiceSpecificCredentials":
                    self._answer(200, [("Content-Type", "text/xml")], EMPTY_SSC)
                    return
                marker = params.get("Marker", [""])[0]
                if action == DETAILS and marker:  # a later page: from the kept answer
                    size = int(params.get("MaxItems", ["100"])[0])
                    page = paging.page(paging.listing(params), int(marker), size)
                    self._answer(200, [("Content-Type", "text/xml")], page)
                    return
                conn = getattr(local, "conn", None)
                if conn is None:
                    conn = local.conn = http.client.HTTPConnection(
                        target.hostname or "127.0.0.1", target.port, timeout=120
                    )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = local.conn = http.client.HTTPConnection(
                        target.hostname or "127.0.0.1", target.port, timeout=120
                    )
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                payload = response.read()
                if action == DETAILS and response.status == 200:  # a listing's first page
                    paging.keep(paging.listing(params), payload)
                    size = int(params.get("MaxItems", ["100"])[0])
                    payload = paging.page(paging.listing(params), 0, size)
                self._answer(response.status, response.getheaders(), payload)

            def _answer(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def take(self) -> Counter[str]:
        """The calls counted since the last take."""
        with self._lock:
            out, self.calls = self.calls, Counter()
        return out

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---- the account ----------------------------------------------------------------------------


def iam(endpoint: str) -> Any:
    config = Config(retries={"mode": "standard", "max_attempts": 5}, max_pool_connections=32)
    return boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=config,
    )


@dataclass
class Account:
    known: dict[str, uuid.UUID] = field(default_factory=dict)  # IAM user name -> NHI id
    expires_at: datetime = field(
        default_factory=lambda: (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    )


def load_inventory(dsn: str, account: Account, n: int) -> None:
    """`n` active NHIs (one agent), their names those of the known IAM users."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        agent = conn.execute(
            "INSERT INTO agents (id, name, category, environment, owner_email, team, purpose,"
            " invokers, status, created_by) VALUES (gen_random_uuid(), %s, 'rag', 'dev',"
            " 'owner@example.com', 'bench', 'Sweep at scale', '[]'::jsonb, 'active', 'bench')"
            " RETURNING id",
            (f"bench-scale-{uuid.uuid4().hex[:6]}",),
        ).fetchone()
        assert agent is not None
        rows = []
        for i in range(n):
            nhi_id = uuid.uuid4()
            name = f"nhi-bscale-k{i:06d}"
            account.known[name] = nhi_id
            rows.append((nhi_id, agent[0], name, f"bench-wf-{nhi_id}"))
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY nhis (id, agent_id, platform, kind, name, granted_scope, allowed_cidrs,"
                " status, workflow_id, requested_by, created_at, activated_at, expires_at,"
                " max_lifetime_at) FROM STDIN"
            ) as copy,
        ):
            now = datetime.now(UTC)
            for nhi_id, agent_id, name, wf in rows:
                copy.write_row(
                    (
                        nhi_id,
                        agent_id,
                        "aws",
                        "iam_user_key",
                        name,
                        json.dumps(SCOPE),
                        "[]",
                        "active",
                        wf,
                        "bench",
                        now - timedelta(days=1),
                        now - timedelta(days=1),
                        account.expires_at,
                        account.expires_at + timedelta(days=60),
                    )
                )


def create_known(endpoint: str, account: Account) -> None:
    """The known users in IAM, tagged, with exactly their granted scope (no drift)."""
    client = iam(endpoint)
    doc = json.dumps(
        identity_policy_document(
            [ScopeStatement.model_validate(s) for s in SCOPE], [], account.expires_at
        )
    )

    def one(item: tuple[str, uuid.UUID]) -> None:
        name, nhi_id = item
        client.create_user(
            UserName=name,
            Path=PATH,
            Tags=[
                {"Key": "managed-by", "Value": "nhi-lifecycle"},
                {"Key": "nhi:nhi-id", "Value": str(nhi_id)},
            ],
        )
        client.put_user_policy(UserName=name, PolicyName="nhi-scope", PolicyDocument=doc)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, account.known.items()))


def create_orphans(endpoint: str, label: str, n: int) -> set[str]:
    """`n` orphans: our tags plus one only they carry, one access key each."""
    client = iam(endpoint)

    def one(i: int) -> str:
        name = f"nhi-bscale-o{label}-{i:06d}"
        client.create_user(
            UserName=name,
            Path=PATH,
            Tags=[
                {"Key": "managed-by", "Value": "nhi-lifecycle"},
                {"Key": "nhi:nhi-id", "Value": str(uuid.uuid4())},
                {"Key": ORPHAN_TAG, "Value": "yes"},
            ],
        )
        client.create_access_key(UserName=name)
        return name

    with ThreadPoolExecutor(8) as pool:
        return set(pool.map(one, range(n)))


def users_under_path(endpoint: str) -> set[str]:
    pages = iam(endpoint).get_paginator("list_users").paginate(PathPrefix=PATH)
    return {u["UserName"] for page in pages for u in page["Users"]}


async def park_lifecycles(stack: Stack, account: Account) -> None:
    """A running lifecycle per known NHI, on a queue nobody polls: supervised, inert."""
    client = await stack.client()
    slots = asyncio.Semaphore(32)

    async def one(nhi_id: uuid.UUID) -> None:
        async with slots:
            await client.start_workflow(
                "NhiLifecycleWorkflow",
                {"nhi_id": str(nhi_id)},
                id=lifecycle_workflow_id(nhi_id),
                task_queue=PARKED,
            )

    await asyncio.gather(*(one(i) for i in account.known.values()))


# ---- the tools ------------------------------------------------------------------------------


@dataclass
class Run:
    tool: str
    seconds: float
    calls: int
    cpu: dict[str, float]
    exact: bool
    extra: dict[str, Any] = field(default_factory=dict)


@contextmanager
def sampled_rss(stack: Stack) -> Iterator[list[int]]:
    """The worker's peak RSS while the block runs (sampled every 0.2 s)."""
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            if "worker" in stack.procs:
                peak[0] = max(peak[0], stack.procs["worker"].rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def cpu(stack: Stack) -> dict[str, float]:
    return {name: proc.cpu_seconds() for name, proc in stack.procs.items()}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def ours(stack: Stack, proxy: CountingProxy, account: Account, orphans: set[str]) -> Run:
    from workflows.sweep import SweepWorkflow

    client = await stack.client()
    before = cpu(stack)
    proxy.take()
    start = time.monotonic()
    with sampled_rss(stack) as peak:
        handle = await client.start_workflow(
            SweepWorkflow.run,
            SweepInput(provider="aws", triggered_by="bench"),
            id=f"bench-sweep-{uuid.uuid4().hex[:8]}",
            task_queue=stack.task_queue,
        )
        outcome = await handle.result()
        found = time.monotonic() - start
        planned = await _planned_after(handle)
        left = await asyncio.to_thread(_wait_removed, stack.moto_url, orphans)
    seconds = time.monotonic() - start
    after = cpu(stack)
    return Run(
        "nhi-lifecycle",
        seconds,
        sum(proxy.take().values()),
        {k: after[k] - before.get(k, 0.0) for k in after},
        left == set(account.known),
        {
            "orphans_found_s": planned,
            "sweep_done_s": found,
            "history_events": outcome.summary.get("history_events"),
            "discovery_pages": outcome.summary.get("discovery_pages"),
            "throttled": outcome.summary.get("throttled"),
            # Removed in `remove_orphans` batches / handed to a removal workflow each.
            "orphans_removed_in_batches": outcome.summary.get("orphans_removed"),
            "orphans_handed_off": outcome.summary.get("orphans_handed_off"),
            "worker_peak_rss_mb": peak[0] / 2**20,
        },
    )


async def _planned_after(handle: Any) -> float:
    """Seconds from the sweep's start to its plan (every orphan found), from its history."""
    history = await handle.fetch_history()
    started = history.events[0].event_time.ToDatetime()
    for event in history.events:
        if event.HasField("activity_task_completed_event_attributes"):
            return float((event.event_time.ToDatetime() - started).total_seconds())
    return float("nan")


def _wait_removed(endpoint: str, orphans: set[str], timeout: float = 3600) -> set[str]:
    """Poll (once a second) until no orphan is left under the path; what is left then."""
    deadline = time.monotonic() + timeout
    while True:
        left = users_under_path(endpoint)
        if not (left & orphans) or time.monotonic() > deadline:
            return left
        time.sleep(1.0)


def custodian(stack: Stack, proxy: CountingProxy, account: Account, orphans: set[str]) -> Run:
    del orphans  # Custodian finds them by their tag
    policy = {
        "policies": [
            {
                "name": "nhi-orphans",
                "resource": "iam-user",
                "filters": [
                    {"type": "value", "key": "Path", "value": PATH},
                    {f"tag:{ORPHAN_TAG}": "yes"},
                    {"tag:managed-by": "nhi-lifecycle"},
                ],
                "actions": [{"type": "delete"}],
            }
        ]
    }
    with tempfile.TemporaryDirectory(prefix="bench-c7n-") as tmp:
        path = Path(tmp) / "policy.json"
        path.write_text(json.dumps(policy))
        env = dict(os.environ) | {
            "AWS_ENDPOINT_URL": proxy.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        before, child = cpu(stack), children_cpu()
        proxy.take()
        start = time.monotonic()
        exe = Path(sys.executable).with_name("custodian")
        # No resource cache: a cached listing from an earlier run would name deleted users.
        args = ["run", "--cache-period", "0", "-s", str(Path(tmp) / "out"), "--region"]
        done = subprocess.run(
            [str(exe), *args, "us-east-1", str(path)], env=env, capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(f"custodian failed: {done.stderr[-2000:]}")
        seconds = time.monotonic() - start
        calls = sum(proxy.take().values())
        after = cpu(stack)
    spent = {k: after[k] - before.get(k, 0.0) for k in ("moto",) if k in after}
    spent["custodian"] = children_cpu() - child
    left = users_under_path(stack.moto_url)
    return Run("Cloud Custodian", seconds, calls, spent, left == set(account.known))


def floor(stack: Stack, proxy: CountingProxy, account: Account, orphans: set[str]) -> Run:
    del orphans  # the floor finds them by the inventory
    before, child = cpu(stack), children_cpu()
    proxy.take()
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "bench.sweep_scale", "--floor", proxy.url, stack.dsn],
        cwd=REPO,
        check=True,
    )
    seconds = time.monotonic() - start
    calls = sum(proxy.take().values())
    after = cpu(stack)
    spent = {k: after[k] - before.get(k, 0.0) for k in ("moto",) if k in after}
    spent["boto3"] = children_cpu() - child
    left = users_under_path(stack.moto_url)
    return Run("boto3, 1 thread", seconds, calls, spent, left == set(account.known))


def floor_main(endpoint: str, dsn: str) -> None:
    """The floor itself: inventory names from the database, users by path, orphans deleted."""
    with psycopg.connect(dsn) as conn:
        known = {
            r[0]
            for r in conn.execute(
                "SELECT name FROM nhis WHERE platform = 'aws' AND status IN"
                " ('active', 'rotating', 'quarantined', 'revoke_failed', 'expiring')"
            )
        }
    client = iam(endpoint)
    for page in client.get_paginator("list_users").paginate(PathPrefix=PATH):
        for user in page["Users"]:
            name = user["UserName"]
            if name in known:
                continue
            tags = {t["Key"]: t["Value"] for t in client.list_user_tags(UserName=name)["Tags"]}
            if tags.get("managed-by") != "nhi-lifecycle":
                continue
            for key in client.list_access_keys(UserName=name)["AccessKeyMetadata"]:
                client.delete_access_key(UserName=name, AccessKeyId=key["AccessKeyId"])
            for policy in client.list_user_policies(UserName=name)["PolicyNames"]:
                client.delete_user_policy(UserName=name, PolicyName=policy)
            client.delete_user(UserName=name)


# ---- the benchmark ------------------------------------------------------------------------------


async def run(
    stack: Stack, users: int, orphans: int, reps: int, tools: tuple[str, ...], out: Path
) -> Result:
    """Every tool `reps` times on one account; a result with medians and checks."""
    del out
    result = Result(name=NAME, title=f"Orphan sweep at {users:,} users, {orphans:,} orphans")
    account = Account()
    known = users - orphans
    t0 = time.monotonic()
    await asyncio.to_thread(load_inventory, stack.dsn, account, known)
    await asyncio.to_thread(create_known, stack.moto_url, account)
    await park_lifecycles(stack, account)
    result.note(
        f"Set-up ({known:,} known users, parked lifecycles): {time.monotonic() - t0:.0f} s."
    )
    proxy = CountingProxy(stack.moto_url)
    stack.start_worker(NHI_AWS_ENDPOINT_URL=proxy.url, **WORKER_ENV)
    await asyncio.sleep(5)  # the worker connects and polls
    runs: list[Run] = []
    try:
        for rep in range(reps):
            for tool in tools:
                made = await asyncio.to_thread(
                    create_orphans, stack.moto_url, f"{rep}{tool[0]}", orphans
                )
                print(f"[{NAME}] rep {rep + 1}: {tool}", flush=True)
                if tool == "ours":
                    done = await ours(stack, proxy, account, made)
                elif tool == "custodian":
                    done = await asyncio.to_thread(custodian, stack, proxy, account, made)
                else:
                    done = await asyncio.to_thread(floor, stack, proxy, account, made)
                runs.append(done)
                print(f"[{NAME}]   {done}", flush=True)
                if not done.exact:
                    result.status = f"failed: {done.tool} did not remove exactly the orphans"
    finally:
        proxy.close()
    for tool in dict.fromkeys(r.tool for r in runs):
        mine = [r for r in runs if r.tool == tool]
        secs = statistics.median(r.seconds for r in mine)
        calls = mine[-1].calls
        cpu_text = ", ".join(f"{k} {v:.0f} s" for k, v in mine[-1].cpu.items() if v >= 0.5)
        result.row(f"{tool}: all orphans removed", f"{fmt(secs)} s (median of {len(mine)})")
        result.row(f"{tool}: API calls", f"{calls:,} ({calls / users:.2f} per user)")
        result.row(f"{tool}: CPU", cpu_text)
        result.row(f"{tool}: exactly the orphans removed", str(all(r.exact for r in mine)))
        if mine[-1].extra:
            extra = ", ".join(
                f"{k} {fmt(v) if isinstance(v, float) else v}" for k, v in mine[-1].extra.items()
            )
            result.row(f"{tool}: detail", extra)
    result.data = {"runs": [r.__dict__ for r in runs], "users": users, "orphans": orphans}
    result.note(
        "One moto server for all tools, every call through one counting proxy (it answers "
        "ListServiceSpecificCredentials, which moto lacks, and pages "
        "GetAccountAuthorizationDetails as IAM does). NHI_SWEEP_CALLS_PER_SECOND=1000."
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep_scale", description=__doc__)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--orphans", type=int, default=200)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--tools", default="ours,custodian,floor")
    parser.add_argument("--floor", nargs=2, metavar=("ENDPOINT", "DSN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor:
        floor_main(*args.floor)
        return 0
    return asyncio.run(_standalone(args))


async def _standalone(args: argparse.Namespace) -> int:
    from bench.services import Databases, StackSpec

    root = Path(tempfile.mkdtemp(prefix="nhi-bench-scale-"))
    dbs = await asyncio.to_thread(Databases, root)
    stack = Stack(NAME, dbs, root, StackSpec(api=False, worker=False))
    try:
        await asyncio.to_thread(stack.start)
        tools = tuple(t.strip() for t in args.tools.split(",") if t.strip())
        result = await run(stack, args.users, args.orphans, args.reps, tools, root)
        print(result.markdown(), flush=True)
        return 0 if result.status == "ok" else 1
    finally:
        await asyncio.to_thread(stack.stop)
        await asyncio.to_thread(dbs.drop_all)


if __name__ == "__main__":
    sys.exit(main())
