"""Benchmark 2, Postgres half: when does a `postgres_role` login stop working, against its expiry?

The target is a throwaway scram-sha-256 cluster (`tests.pg_cluster.PgCluster`): the machine's
own server trusts every local login, ignoring passwords and `VALID UNTIL`, so it could not show
a refusal. It is registered through the API like any target (`POST /v1/targets`), its admin
password in a Secrets Manager secret (moto) that the worker reads when it connects, so the
running worker needs no new environment. NHIs with short staggered TTLs are requested on it,
one per agent, each allowed to read one table.

Each login role carries `VALID UNTIL` = `expires_at`, so Postgres itself refuses the login from
that instant; the lifecycle also quarantines the NHI at expiry (NOLOGIN, sessions ended). The
benchmark reads each NHI's secret once, right after it becomes active (the password stays in
memory, never in results or logs), and from shortly before the expiry tries to log in with it
until the server refuses. The figure is (first refused attempt) - `expires_at`, an upper bound;
the last accepted attempt gives the lower bound.

The server says "password authentication failed" for an expired password and "is not permitted
to log in" for a NOLOGIN role whose password is still valid, so the client sees which one
refused it; its log adds the cause of each failed password ("has an expired password").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from botocore.exceptions import ClientError

from bench import load
from bench.expiry import LEAD_S, POLL_GAP_S, POLL_THREADS, TARGET_P99_S, Bounds, outcome
from bench.report import (
    HAVE_PLOTS,
    NO_PLOTS,
    Result,
    fmt,
    percentile,
    plt,
    save_plot,
    summary,
    verdict_at_most,
)
from bench.services import Stack, cleanup_on_kill
from nhi.infra.aws_clients import AwsClients

if TYPE_CHECKING:
    from tests.pg_cluster import PgCluster

NAME = "expiry_postgres"
KIND = "postgres_role"
# libpq's smallest connect_timeout; a refusal takes milliseconds, so only a stall waits this.
CONNECT_TIMEOUT_S = 2
# How often the inventory is asked which NHIs became active (to read their secrets).
ACTIVE_POLL_S = 0.2
ACCEPTED, REFUSED, ERROR = "accepted", "refused", "error"
EXPIRED = "password authentication failed (VALID UNTIL passed)"
NOLOGIN = "not permitted to log in (NOLOGIN)"
# The server's words, as libpq reports them, for each way of refusing a login.
REFUSALS = (("password authentication failed", EXPIRED), ("is not permitted to log in", NOLOGIN))
LIVE_STATUSES = frozenset({"active", "rotating", "expiring", "quarantined"})
FAILED_STATUSES = frozenset({"failed", "revoke_failed", "decommissioned"})


@dataclass(frozen=True)
class Login:
    """What the NHI's secret holds: where to log in and as whom."""

    host: str
    port: int
    dbname: str
    user: str
    password: str = field(repr=False)


@dataclass
class Watch(Bounds):
    """One NHI being watched around its expiry, by logging in with its delivered password."""

    login: Login | None = None
    read_at: float | None = None
    final_status: str = ""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    errors: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class Attempt:
    """One login attempt: its outcome and when it started and got its answer."""

    state: str
    how: str
    sent: float
    seen: float


def attempt(login: Login) -> Attempt:
    """One login with the delivered password (timed in the thread, so queueing for a thread
    does not widen the bounds)."""
    sent = time.time()
    try:
        conn = psycopg.connect(
            host=login.host,
            port=login.port,
            dbname=login.dbname,
            user=login.user,
            password=login.password,
            connect_timeout=CONNECT_TIMEOUT_S,
            autocommit=True,
        )
    except psycopg.OperationalError as err:
        # libpq's message names the host, port and user, never the password.
        seen = time.time()
        text = str(err)
        for needle, how in REFUSALS:
            if needle in text:
                return Attempt(REFUSED, how, sent, seen)
        lines = text.strip().splitlines()
        return Attempt(ERROR, (lines[-1] if lines else type(err).__name__)[:200], sent, seen)
    seen = time.time()
    conn.close()
    return Attempt(ACCEPTED, "", sent, seen)


def read_login(aws: AwsClients, arn: str) -> Login:
    """The NHI's current credential, from its RDS-style JSON secret."""
    value = aws.secrets.get_secret_value(SecretId=arn, VersionStage="AWSCURRENT")
    doc = json.loads(value["SecretString"])
    return Login(
        host=str(doc["host"]),
        port=int(doc["port"]),
        dbname=str(doc["dbname"]),
        user=str(doc["username"]),
        password=str(doc["password"]),
    )


def states(dsn: str, ids: list[str]) -> list[tuple[str, str, str | None]]:
    """(id, status, credential_ref) of each NHI, from the inventory."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id::text, status, credential_ref FROM nhis WHERE id = ANY(%s::uuid[])",
            (ids,),
        ).fetchall()
    return [(str(r[0]), str(r[1]), None if r[2] is None else str(r[2])) for r in rows]


async def collect_logins(
    watches: list[Watch], dsn: str, aws: AwsClients, pool: ThreadPoolExecutor, deadline: float
) -> None:
    """Read each NHI's secret once, as soon as the inventory says it is active."""
    loop = asyncio.get_running_loop()
    pending = {w.nhi.id: w for w in watches}

    async def read(w: Watch, arn: str) -> None:
        try:
            w.login = await loop.run_in_executor(pool, read_login, aws, arn)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "?")
            w.final_status = f"secret unreadable: {code}"
            return
        w.read_at = time.time()

    try:
        while pending and time.time() < deadline:
            rows = await asyncio.to_thread(states, dsn, list(pending))
            ready: list[tuple[Watch, str]] = []
            for nhi_id, status, ref in rows:
                w = pending[nhi_id]
                if status in LIVE_STATUSES and ref:
                    ready.append((w, ref))
                elif status in FAILED_STATUSES:
                    w.final_status = status
                    w.ready.set()
                    del pending[nhi_id]
            await asyncio.gather(*(read(w, ref) for w, ref in ready))
            for w, _ in ready:
                w.ready.set()
                del pending[w.nhi.id]
            await asyncio.sleep(ACTIVE_POLL_S)
    finally:
        for w in pending.values():
            w.final_status = w.final_status or "never active"
            w.ready.set()


async def follow(watch: Watch, pool: ThreadPoolExecutor, deadline: float) -> None:
    """Try the login from just before its expiry until the server refuses it.

    The first attempt's moment is jittered by up to one poll gap, so the attempts of different
    NHIs fall at every phase of the gap relative to their expiry instead of all at the same one.
    """
    loop = asyncio.get_running_loop()
    start = watch.nhi.expires_at - LEAD_S - random.uniform(0.0, POLL_GAP_S)
    await asyncio.sleep(max(0.0, start - time.time()))
    await watch.ready.wait()
    login = watch.login
    if login is None:
        return
    while time.time() < deadline:
        done = await loop.run_in_executor(pool, attempt, login)
        watch.polls += 1
        if done.state == ACCEPTED:
            watch.seen_usable = True
            watch.last_usable_sent = done.sent
        elif done.state == REFUSED:
            watch.unusable_sent, watch.unusable_seen, watch.how = done.sent, done.seen, done.how
            return
        else:
            watch.errors += 1
            watch.last_error = done.how
        await asyncio.sleep(POLL_GAP_S)


def stop_cluster(cluster: PgCluster) -> None:
    """Stop the cluster and remove its files, even if it was caught half started."""
    from tests.pg_cluster import BIN, OS_USER

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        cluster.stop()
    if (cluster.data / "postmaster.pid").exists():
        pg_ctl = [str(BIN / "pg_ctl"), "-D", str(cluster.data), "-m", "immediate", "stop"]
        subprocess.run(
            ["runuser", "-u", OS_USER, "--", *pg_ctl],
            capture_output=True,
            timeout=60,
            check=False,
        )
    shutil.rmtree(cluster.base, ignore_errors=True)


def refusal_causes(server_log: str, users: dict[str, str]) -> dict[str, Counter[str]]:
    """Per NHI, what the server logged when it refused its login role (user -> NHI id)."""
    found: dict[str, Counter[str]] = {}
    patterns = (
        (re.compile(r'User "([^"]+)" has an expired password'), "expired password"),
        (re.compile(r'role "([^"]+)" is not permitted to log in'), "NOLOGIN"),
    )
    for pattern, cause in patterns:
        for match in pattern.finditer(server_log):
            nhi_id = users.get(match.group(1))
            if nhi_id is not None:
                found.setdefault(nhi_id, Counter())[cause] += 1
    return found


async def run(stack: Stack, n: int, base_ttl: int, spread: int, out: Path) -> Result:
    """Provision N `postgres_role` NHIs with TTLs base..base+spread s; watch each one expire."""
    # The test suite's cluster, imported here so a broken import fails only this half.
    from tests.pg_cluster import ADMIN, DATABASE, PgCluster

    result = Result(name=NAME, title="Expiry precision (Postgres)")
    cluster = PgCluster()
    with cleanup_on_kill(lambda: stop_cluster(cluster)):
        print(f"  [{NAME}] starting a scram-sha-256 cluster", flush=True)
        await asyncio.to_thread(cluster.start)
        await stack.wait_worker_polling()
        creds = await asyncio.to_thread(load.credentials, stack.database_url)
        aws = stack.aws()
        tag = load.run_tag()
        target = f"bench-{tag}"
        secret = await asyncio.to_thread(
            aws.secrets.create_secret,
            Name=f"nhi-targets/bench-pg-admin-{tag}",
            SecretString=cluster.admin_password,
        )
        async with load.http_client(stack.api_url, creds.platform) as http:
            await load.register_target(
                http,
                target,
                f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}",
                secret["ARN"],
                creds.admin,
            )
            agents = await load.create_agents(http, n, tag)
            print(
                f"  [{NAME}] requesting {n} NHIs, TTL {base_ttl}-{base_ttl + spread}s", flush=True
            )
            requested = await load.request_nhis(
                http,
                stack.dsn,
                agents,
                kind_of=lambda _: KIND,
                ttl_of=lambda i: base_ttl + round(i * spread / max(1, n)),
                target=target,
            )
        watches = [Watch(r) for r in requested]
        deadline = max(r.expires_at for r in requested) + 60.0
        with ThreadPoolExecutor(max_workers=POLL_THREADS, thread_name_prefix="login") as pool:
            collector = asyncio.create_task(collect_logins(watches, stack.dsn, aws, pool, deadline))
            try:
                await asyncio.gather(*(follow(w, pool, deadline) for w in watches))
            finally:
                collector.cancel()
                (collected,) = await asyncio.gather(collector, return_exceptions=True)
            if isinstance(collected, Exception):
                raise collected
        ids = [r.id for r in requested]
        # The quarantine usually lands after the refusal (VALID UNTIL needs no one): wait for
        # it, to report when the service itself acted.
        await load.wait_for_status(
            stack.dsn, ids, {"quarantined"}, timeout=60, failed=frozenset(FAILED_STATUSES)
        )
        stack.check_alive()
        users = {w.login.user: w.nhi.id for w in watches if w.login is not None}
        causes = refusal_causes(await asyncio.to_thread(cluster.server_log), users)
    activated = load.event_times(stack.dsn, ids, "nhi.activated")
    quarantined = load.event_times(stack.dsn, ids, "nhi.quarantined")
    _report(result, watches, activated, quarantined, causes, base_ttl, spread)
    plot = _plot(out, [w for w in watches if not _late(w, activated)])
    if plot:
        result.plots.append(plot)
    else:
        result.note(NO_PLOTS)
    return result


def _late(w: Watch, activated: dict[str, float]) -> bool:
    # Active (and its secret read) only after, or just before, its expiry: the figure would
    # measure provisioning lag, not expiry precision.
    at = activated.get(w.nhi.id)
    edge = w.nhi.expires_at - LEAD_S
    return at is None or at > edge or w.read_at is None or w.read_at > edge


def _pair(values: list[float], a: float, b: float) -> str:
    return f"{fmt(percentile(values, a), 's', 3)} / {fmt(percentile(values, b), 's', 3)}"


def _report(
    result: Result,
    watches: list[Watch],
    activated: dict[str, float],
    quarantined: dict[str, float],
    causes: dict[str, Counter[str]],
    base_ttl: int,
    spread: int,
) -> None:
    o = outcome(watches, lambda w: _late(w, activated), quarantined)
    on_time, late, seen = o.on_time, o.late, o.seen
    upper, lower, gaps, db = o.upper, o.lower, o.gaps, o.quarantine_lag
    never_accepted = [w for w in seen if not w.seen_usable]
    how = Counter(w.how for w in seen)
    logged = Counter(cause for w in seen for cause in causes.get(w.nhi.id, Counter()))
    n = len(watches)
    p99 = percentile(upper, 99)
    result.row(
        "NHIs (`postgres_role`, SELECT on one table)", f"{n}, TTL {base_ttl}-{base_ttl + spread} s"
    )
    result.row("active and secret read before their expiry (measured)", f"{len(on_time)} of {n}")
    result.row("login refused", f"{len(seen)} of {len(on_time)}")
    result.row("refused - expires_at, p50 / p90 (upper bound)", _pair(upper, 50, 90))
    result.row(
        "refused - expires_at, p99 (upper bound)",
        fmt(p99, "s", 3),
        f"<= {TARGET_P99_S} s",
        verdict_at_most(p99, TARGET_P99_S, "s"),
    )
    result.row(
        "refused - expires_at, max (upper bound)", fmt(max(upper, default=float("nan")), "s", 3)
    )
    result.row("last accepted - expires_at, p50 / p99 (lower bound)", _pair(lower, 50, 99))
    result.row("poll resolution (gap between the two), p50", fmt(percentile(gaps, 50), "s", 3))
    result.row(
        "how the server refused (first refusal)",
        ", ".join(f"{k}: {v}" for k, v in how.most_common()) or "n/a",
    )
    result.row(
        "server log, NHIs with each cause",
        ", ".join(f"{k}: {v}" for k, v in sorted(logged.items())) or "n/a",
    )
    result.row("refused before ever being accepted", f"{len(never_accepted)} of {len(seen)}")
    result.row(
        "attempts that failed otherwise (timeouts, errors)",
        str(sum(w.errors for w in watches)),
    )
    result.row("inventory `quarantined` - expires_at, p50 / p99", _pair(db, 50, 99))
    result.data = {
        "n": n,
        "ttl_s": [base_ttl, base_ttl + spread],
        "lead_s": LEAD_S,
        "poll_gap_s": POLL_GAP_S,
        "connect_timeout_s": CONNECT_TIMEOUT_S,
        "upper_s": {k: round(v, 4) for k, v in summary(upper).items()},
        "lower_s": {k: round(v, 4) for k, v in summary(lower).items()},
        "inventory_quarantined_s": {k: round(v, 4) for k, v in summary(db).items()},
        "refused_how": dict(how),
        "server_log_causes": dict(logged),
        "late": len(late),
        "never_refused": [w.nhi.id for w in on_time if w.upper_s is None],
        "never_accepted": [w.nhi.id for w in never_accepted],
        "errors": {w.nhi.id: w.last_error for w in watches if w.errors},
        "per_nhi": [_watch_dict(w, activated, quarantined) for w in watches],
    }
    _explain(result, p99, late, never_accepted)


def _watch_dict(
    w: Watch, activated: dict[str, float], quarantined: dict[str, float]
) -> dict[str, Any]:
    exp = w.nhi.expires_at

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - exp, 4)

    return {
        "id": w.nhi.id,
        "expires_at": exp,
        "activated_s": rel(activated.get(w.nhi.id)),
        "secret_read_s": rel(w.read_at),
        "last_accepted_s": rel(w.last_usable_sent),
        "refused_s": rel(w.unusable_seen),
        "inventory_quarantined_s": rel(quarantined.get(w.nhi.id)),
        "how": w.how,
        "polls": w.polls,
        "errors": w.errors,
        "status_if_never_active": w.final_status,
    }


def _explain(result: Result, p99: float, late: list[Watch], never_accepted: list[Watch]) -> None:
    result.note(
        "Target: a throwaway PostgreSQL 15 cluster with scram-sha-256 authentication "
        "(`tests/pg_cluster.py`), registered through `POST /v1/targets` with its admin password "
        "in a Secrets Manager secret (moto). The machine's own server trusts local logins, which "
        "ignores passwords and `VALID UNTIL`, so it could not refuse anyone."
    )
    result.note(
        f"Method: each NHI's secret is read once, as soon as the inventory shows it active; from "
        f"{LEAD_S} s (plus a random fraction of the poll gap, so attempts fall at every phase "
        "relative to the expiry) before its expiry the benchmark logs in with the delivered "
        f"password (psycopg, connect_timeout {CONNECT_TIMEOUT_S} s) every {POLL_GAP_S} s per NHI "
        f"on {POLL_THREADS} threads until the server refuses. The figure is the moment the first "
        "refusal arrived minus `expires_at` (upper bound); the start of the last accepted "
        "attempt gives the lower bound. Passwords stay in memory only."
    )
    result.note(
        "Who refuses: every login role carries `VALID UNTIL` = `expires_at` (to the "
        "microsecond), so Postgres itself refuses the password from that instant, whether or "
        "not the service acts; that is the figure above, and it is bounded by the poll "
        "resolution. The lifecycle's quarantine (NOLOGIN on both login roles, their sessions "
        "ended) follows, shown as inventory `quarantined`: it is the backstop, and what ends "
        "sessions already open (`VALID UNTIL` only applies at login). A NOLOGIN refusal would "
        "mean the quarantine came first; with the password already expired the server answers "
        "'password authentication failed' and logs 'has an expired password'."
    )
    if late:
        result.note(
            f"{len(late)} NHI(s) became active (or had their secret read) only after, or within "
            f"{LEAD_S} s of, their expiry and are left out of the distribution: their figure would "
            "measure provisioning lag. Raise the base TTL if this happens."
        )
    if never_accepted:
        result.note(
            f"{len(never_accepted)} NHI(s) were refused on the first attempt, before their expiry "
            "was reached: the delivered credential never worked. See never_accepted in the JSON."
        )
    if p99 > TARGET_P99_S:
        result.note(
            f"Why the target is missed: p99 is {fmt(p99, 's', 3)}, "
            f"{fmt(p99 - TARGET_P99_S, 's', 3)} over. See per_nhi in the JSON for which NHIs were "
            "late and how they were refused."
        )


def _plot(out: Path, watches: list[Watch]) -> str | None:
    if not HAVE_PLOTS or plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    upper = sorted(w.upper_s for w in watches if w.upper_s is not None)
    lower = sorted(w.lower_s for w in watches if w.lower_s is not None)
    for values, label in ((upper, "first refused (upper bound)"), (lower, "last accepted")):
        if values:
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, fractions, where="post", label=f"{label} (n={len(values)})")
    ax.axvline(TARGET_P99_S, color="red", linestyle=":", label=f"target p99 {TARGET_P99_S} s")
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("login attempt - expires_at (s)")
    ax.set_ylabel("fraction of NHIs")
    ax.set_title("Expiry precision (Postgres): when logins are refused")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_plot(fig, out, NAME)
