"""Benchmark 3: sweep cost as the inventory grows.

Due work: the real `nhis` table (built by `alembic upgrade head`) grows to each size with 1 %
of rows due (active, expiry passed) and the rest alive or dead, bulk-loaded with
generate_series. The due-work query runs against its index `ix_nhis_status_expires_at`; a
fixed-size page of due work and a forced sequential scan are timed alongside, to separate "grows
with the due items" from "grows with the inventory".

Discovery: IAM users under the service's path in moto, listed the way a discovery sweep lists
them (paginated ListUsers with PathPrefix), timed at growing user counts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import psycopg
from botocore.config import Config

from bench.report import (
    HAVE_PLOTS,
    NO_PLOTS,
    Result,
    fmt,
    plt,
    save_plot,
    verdict_at_most,
)
from bench.services import Stack

NAME = "sweep"
TARGET_MS = 50.0
TARGET_GROWTH = 2.0
DUE_LIMIT = 10_000
PAGE_LIMIT = 100
AGENTS = 1_000
CHUNK = 100_000  # rows per INSERT, so progress shows and a slow load stays bounded
REPS, WARMUP, SEQ_REPS = 30, 3, 5
COVERING = "bench_what_if_due_covering"

DUE_SQL = (
    "SELECT id FROM nhis WHERE status = 'active' AND expires_at <= now() "
    "ORDER BY expires_at LIMIT {limit}"
)

# 1 % due (bucket 0), 69 % alive with expiries ahead, 30 % dead or failing with expiries
# behind them: the dead ones share the due rows' deadline range, so only the index's status
# prefix keeps them out. Spreads come from multiplicative hashing, so loads are repeatable.
LOAD_NHIS_SQL = """
WITH a AS (SELECT array_agg(id ORDER BY name) AS ids FROM agents),
rows AS (
    SELECT g, g %% 100 AS bucket FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g
),
shaped AS (
    SELECT g,
           bucket,
           CASE
               WHEN bucket < 70 THEN 'active'
               WHEN bucket < 90 THEN 'decommissioned'
               WHEN bucket < 95 THEN 'quarantined'
               ELSE 'failed'
           END AS status,
           CASE
               WHEN bucket = 0 THEN now() - make_interval(secs => 60 + (g * 7919) %% 604800)
               WHEN bucket < 70 THEN now() + make_interval(secs => 3600 + (g * 7919) %% 7689600)
               ELSE now() - make_interval(secs => (g * 104729) %% 31536000)
           END AS expires_at
    FROM rows
)
INSERT INTO nhis (
    id, agent_id, platform, kind, name, granted_scope, allowed_cidrs, trust_principal,
    status, workflow_id, requested_by, created_at, activated_at, expires_at, max_lifetime_at
)
SELECT gen_random_uuid(),
       a.ids[1 + s.g %% %(agents)s],
       'aws',
       CASE WHEN s.g %% 2 = 0 THEN 'iam_role' ELSE 'iam_user_key' END,
       'nhi-bench-' || s.g,
       '[{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::bench-kb/*"]}]'::jsonb,
       '[]'::jsonb,
       CASE WHEN s.g %% 2 = 0 THEN 'arn:aws:iam::123456789012:role/bench-agent-runtime' END,
       s.status,
       'nhi-bench-wf-' || s.g,
       'bench',
       s.expires_at - interval '30 days',
       s.expires_at - interval '30 days',
       s.expires_at,
       s.expires_at + interval '60 days'
FROM shaped s, a
"""

LOAD_AGENTS_SQL = """
INSERT INTO agents (id, name, category, environment, owner_email, team, purpose, invokers,
                    status, created_by)
SELECT gen_random_uuid(), 'bench-sweep-' || g, 'rag', 'dev', 'owner' || g || '@example.com',
       'bench', 'Sweep benchmark', '[]'::jsonb, 'active', 'bench'
FROM generate_series(1, %(n)s) AS g
"""


# ---- due work ---------------------------------------------------------------------------------


def grow(conn: psycopg.Connection[Any], have: int, size: int) -> float:
    """Add rows have+1..size in chunks and refresh statistics; seconds taken."""
    start = time.perf_counter()
    lo = have + 1
    while lo <= size:
        hi = min(size, lo + CHUNK - 1)
        conn.execute(LOAD_NHIS_SQL, {"lo": lo, "hi": hi, "agents": AGENTS})
        lo = hi + 1
    # Fresh statistics as autovacuum would eventually give them; also sets the visibility map.
    conn.execute("VACUUM ANALYZE nhis")
    return time.perf_counter() - start


def time_query(conn: psycopg.Connection[Any], query: str, reps: int, seqscan: bool) -> list[float]:
    """Milliseconds per execution (client side: send, plan, execute, fetch every row)."""
    times: list[float] = []
    with conn.transaction():
        if seqscan:
            for knob in ("enable_indexscan", "enable_indexonlyscan", "enable_bitmapscan"):
                conn.execute(f"SET LOCAL {knob} = off")
        for i in range(reps + WARMUP):
            start = time.perf_counter()
            conn.execute(query).fetchall()
            if i >= WARMUP:
                times.append((time.perf_counter() - start) * 1000)
    return times


def explain(conn: psycopg.Connection[Any], query: str) -> dict[str, Any]:
    """The plan Postgres chose: top scan node, index, rows, buffers, server-side time."""
    row = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}").fetchone()
    plan = row[0][0] if row else {}
    node = plan.get("Plan", {})
    while node.get("Plans") and node.get("Node Type") in ("Limit", "Sort", "Gather Merge"):
        node = node["Plans"][0]
    # A bitmap heap scan names its index on the bitmap index scan below it.
    index = node.get("Index Name") or next(
        (p.get("Index Name") for p in node.get("Plans", []) if p.get("Index Name")), None
    )
    return {
        "scan": node.get("Node Type"),
        "index": index or "no index",
        "rows": node.get("Actual Rows"),
        "shared_hit_blocks": node.get("Shared Hit Blocks"),
        "shared_read_blocks": node.get("Shared Read Blocks"),
        "execution_ms": plan.get("Execution Time"),
    }


def due_count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM nhis WHERE status = 'active' AND expires_at <= now()"
    ).fetchone()
    return int(row[0]) if row else 0


def measure_size(conn: psycopg.Connection[Any], size: int) -> dict[str, Any]:
    """Every due-work figure at the current inventory size."""
    due_all = DUE_SQL.format(limit=DUE_LIMIT)
    page = DUE_SQL.format(limit=PAGE_LIMIT)
    out: dict[str, Any] = {"inventory": size, "due": due_count(conn)}
    for label, query, reps, seq in (
        ("due_all", due_all, REPS, False),
        ("due_page", page, REPS, False),
        ("due_all_seqscan", due_all, SEQ_REPS, True),
    ):
        times = time_query(conn, query, reps, seq)
        out[label] = {
            "p50_ms": round(statistics.median(times), 3),
            "min_ms": round(min(times), 3),
            "max_ms": round(max(times), 3),
        }
    out["plan_due_all"] = explain(conn, due_all)
    out["plan_due_page"] = explain(conn, page)
    out["covering_what_if"] = covering_what_if(conn, due_all)
    return out


def covering_what_if(conn: psycopg.Connection[Any], query: str) -> dict[str, Any]:
    """The due-work query with a covering index (NOT in the schema), then dropped again.

    `ix_nhis_status_expires_at` holds no `id`, so each due row costs a heap visit; an index
    that includes it allows an index-only scan. Measured so the trade-off has a number.
    """
    conn.execute(f"CREATE INDEX {COVERING} ON nhis (status, expires_at) INCLUDE (id)")
    try:
        times = time_query(conn, query, REPS, seqscan=False)
        plan = explain(conn, query)
    finally:
        conn.execute(f"DROP INDEX {COVERING}")
    return {"p50_ms": round(statistics.median(times), 3), "scan": plan["scan"]}


def due_work(dsn: str, sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Grow the inventory through `sizes`, measuring at each."""
    results: list[dict[str, Any]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(LOAD_AGENTS_SQL, {"n": AGENTS})
        have = 0
        for size in sizes:
            print(f"  [{NAME}] loading nhis to {size:,} rows", flush=True)
            load_s = grow(conn, have, size)
            have = size
            figures = measure_size(conn, size)
            figures["load_s"] = round(load_s, 2)
            table_mb = conn.execute("SELECT pg_total_relation_size('nhis')").fetchone()
            figures["table_and_indexes_mb"] = round(int(table_mb[0]) / 2**20, 1) if table_mb else 0
            results.append(figures)
    return results


# ---- discovery --------------------------------------------------------------------------------


def _iam(stack: Stack, pool: int) -> Any:
    # A connection per creating thread; otherwise the worker's client configuration.
    return boto3.client(
        "iam",
        endpoint_url=stack.moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(
            retries={"mode": "standard", "total_max_attempts": 5}, max_pool_connections=pool
        ),
    )


def create_users(iam: Any, path: str, lo: int, hi: int) -> None:
    """Users lo..hi-1: 9 in 10 under the service's path, 1 in 10 elsewhere (to be skipped)."""

    def one(i: int) -> None:
        if i % 10 == 9:
            iam.create_user(UserName=f"someone-else-{i}", Path="/people/")
        else:
            iam.create_user(UserName=f"nhi-bench-user-{i}", Path=path)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, range(lo, hi)))


def sweep_once(iam: Any, path: str, page_size: int) -> dict[str, Any]:
    """One full paginated listing of the users under `path`."""
    start = time.perf_counter()
    pages = found = 0
    for page in iam.get_paginator("list_users").paginate(
        PathPrefix=path, PaginationConfig={"PageSize": page_size}
    ):
        pages += 1
        found += len(page["Users"])
    return {"seconds": time.perf_counter() - start, "pages": pages, "found": found}


def discovery(stack: Stack, counts: Sequence[int]) -> list[dict[str, Any]]:
    """Grow the IAM user population through `counts`, sweeping at each."""
    iam = _iam(stack, 16)
    path = stack.settings().iam_path
    results: list[dict[str, Any]] = []
    have = 0
    for count in counts:
        print(f"  [{NAME}] creating IAM users up to {count:,}", flush=True)
        start = time.perf_counter()
        create_users(iam, path, have, count)
        created_s = time.perf_counter() - start
        have = count
        figures: dict[str, Any] = {"users": count, "create_s": round(created_s, 2)}
        for page_size in (100, 1000):
            runs = [sweep_once(iam, path, page_size) for _ in range(3)]
            figures[f"page_{page_size}"] = {
                "p50_s": round(statistics.median(r["seconds"] for r in runs), 4),
                "pages": runs[0]["pages"],
                "found": runs[0]["found"],
            }
        results.append(figures)
    return results


# ---- the result -------------------------------------------------------------------------------


def run(stack: Stack, sizes: Sequence[int], users: Sequence[int], out: Path) -> Result:
    """Both sweeps on one stack (Postgres and moto only)."""
    result = Result(name=NAME, title="Sweep cost as the inventory grows")
    due = due_work(stack.dsn, sizes)
    disc = discovery(stack, users)
    result.data = {"due_work": due, "discovery": disc, "due_limit": DUE_LIMIT, "page": PAGE_LIMIT}
    _due_rows(result, due)
    _discovery_rows(result, disc)
    plot = _plot(out, due, disc)
    if plot:
        result.plots.append(plot)
    else:
        result.note(NO_PLOTS)
    return result


def _due_rows(result: Result, due: list[dict[str, Any]]) -> None:
    for d in due:
        plan = d["plan_due_all"]
        result.row(
            f"due work at {d['inventory']:,} NHIs ({d['due']:,} due): LIMIT {DUE_LIMIT:,}, p50",
            f"{fmt(d['due_all']['p50_ms'], 'ms', 2)} ({plan['scan']} on {plan['index']})",
        )
        result.row(
            f"due work at {d['inventory']:,} NHIs: a page of {PAGE_LIMIT}, p50",
            fmt(d["due_page"]["p50_ms"], "ms", 3),
        )
        result.row(
            f"due work at {d['inventory']:,} NHIs: what-if covering index "
            "(status, expires_at) INCLUDE (id), not in the schema, p50",
            f"{fmt(d['covering_what_if']['p50_ms'], 'ms', 2)} ({d['covering_what_if']['scan']})",
        )
        result.row(
            f"due work at {d['inventory']:,} NHIs: same query, index disabled (seq scan), p50",
            fmt(d["due_all_seqscan"]["p50_ms"], "ms", 1),
        )
        result.row(
            f"loading to {d['inventory']:,} NHIs (generate_series, all indexes in place)",
            f"{fmt(d['load_s'], 's', 1)}; "
            f"table + indexes {fmt(d['table_and_indexes_mb'], 'MB', 1)}",
        )
    first, last = due[0], due[-1]
    if last["inventory"] >= 1_000_000:
        ms = last["due_all"]["p50_ms"]
        result.row(
            f"due work at {last['inventory']:,}, LIMIT {DUE_LIMIT:,}",
            fmt(ms, "ms", 2),
            f"<= {TARGET_MS:.0f} ms",
            verdict_at_most(ms, TARGET_MS, "ms"),
        )
    label = f"{last['inventory']:,} vs {first['inventory']:,}"
    whole = last["due_all"]["p50_ms"] / first["due_all"]["p50_ms"]
    page = last["due_page"]["p50_ms"] / first["due_page"]["p50_ms"]
    per_row = (last["due_all"]["p50_ms"] / max(1, last["due"])) / (
        first["due_all"]["p50_ms"] / max(1, first["due"])
    )
    seq = last["due_all_seqscan"]["p50_ms"] / first["due_all_seqscan"]["p50_ms"]
    target = f"<= {TARGET_GROWTH:.0f}x"
    result.row(
        f"growth {label}: whole due set (due rows x{last['due'] / max(1, first['due']):.0f})",
        fmt(whole, "x", 1),
        target + " (literal)",
        verdict_at_most(whole, TARGET_GROWTH, "x"),
    )
    result.row(
        f"growth {label}: a fixed page of {PAGE_LIMIT} due rows",
        fmt(page, "x", 2),
        target,
        verdict_at_most(page, TARGET_GROWTH, "x"),
    )
    result.row(
        f"growth {label}: time per due row",
        fmt(per_row, "x", 2),
        target,
        verdict_at_most(per_row, TARGET_GROWTH, "x"),
    )
    result.row(f"growth {label}: seq scan (for contrast)", fmt(seq, "x", 1))
    result.note(
        f"Inventory: {AGENTS:,} agents; NHIs 1 % due (active, expired 1 min to 7 days ago), "
        "69 % active with expiries 1 h to 90 days ahead, 30 % decommissioned, quarantined or "
        "failed with expiries in the past year. Timed client-side (send, plan, execute, fetch "
        f"every id) over {REPS} runs after {WARMUP} warm-ups, warm cache; `VACUUM ANALYZE` "
        "after each load. The query is the one in the issue: "
        f"`{DUE_SQL.format(limit=DUE_LIMIT)}`."
    )
    result.note(
        f"Each due row costs a heap visit (the index holds no `id`): at {last['inventory']:,} "
        f"NHIs the {last['due']:,} due rows touch ~{last['plan_due_all']['shared_hit_blocks']:,} "
        "buffers. A covering index `(status, expires_at) INCLUDE (id)` (not in the schema; "
        "created and dropped by the benchmark) turns it into an index-only scan: "
        f"{fmt(last['covering_what_if']['p50_ms'], 'ms', 2)} instead of "
        f"{fmt(last['due_all']['p50_ms'], 'ms', 2)}."
    )
    if last["due_all_seqscan"]["p50_ms"] < last["due_all"]["p50_ms"]:
        result.note(
            f"At {last['inventory']:,} NHIs, fetching the whole due set at once through "
            f"`ix_nhis_status_expires_at` ({fmt(last['due_all']['p50_ms'], 'ms', 1)}) is slower "
            f"than a sequential scan ({fmt(last['due_all_seqscan']['p50_ms'], 'ms', 1)}, which "
            "Postgres may run in parallel): at 1 % due, 10,000 scattered heap visits cost more "
            "than reading the cached table. The planner still picks the index (its cost model "
            "assumes uncached random reads). What the index buys is a sweep that works in pages "
            f"(a page of {PAGE_LIMIT} costs {fmt(last['due_page']['p50_ms'], 'ms', 2)} at any "
            "size) and, with `INCLUDE (id)`, an index-only scan."
        )
    if whole > TARGET_GROWTH:
        result.note(
            f"Whole due set grows {fmt(whole, 'x', 1)} from {first['inventory']:,} to "
            f"{last['inventory']:,} NHIs because the due set itself grows "
            f"{last['due'] / max(1, first['due']):.0f}x at a constant 1 % ({first['due']:,} -> "
            f"{last['due']:,} ids returned). The cost per due row stays within "
            f"{fmt(per_row, 'x', 2)} and a fixed page of {PAGE_LIMIT} within {fmt(page, 'x', 2)}: "
            "the index range scan reads only the due entries (status prefix, then expiry), "
            "never the rest of the inventory, while the sequential scan grows with the "
            f"inventory ({fmt(seq, 'x', 1)}). So the 2x target is met in the sense the issue "
            "states ('grow with the due items, not with the inventory') and missed if read "
            "literally on the whole due set, by the growth of the due set."
        )


def _discovery_rows(result: Result, disc: list[dict[str, Any]]) -> None:
    for d in disc:
        for page_size in (100, 1000):
            p = d[f"page_{page_size}"]
            result.row(
                f"discovery sweep, {d['users']:,} IAM users, PageSize {page_size}, p50",
                f"{fmt(p['p50_s'] * 1000, 'ms', 0)} ({p['found']:,} under the path, "
                f"{p['pages']} page(s))",
            )
    last = disc[-1]
    result.note(
        f"Discovery: {last['users']:,} IAM users in moto, 9 in 10 under the service's IAM path "
        "and 1 in 10 elsewhere; swept with boto3's ListUsers paginator and PathPrefix, median "
        "of 3. moto ignores MaxItems/Marker for ListUsers and returns every matching user in "
        "one page (its ListRoles does paginate), so the page counts above are moto's, not "
        "IAM's: real IAM returns at most 1,000 users per call (100 by default), i.e. "
        f"{-(-last['page_1000']['found'] // 1000)} calls at PageSize 1000 or "
        f"{-(-last['page_100']['found'] // 100)} at 100, each with a network round trip and "
        "IAM's API rate limits."
    )


def _plot(out: Path, due: list[dict[str, Any]], disc: list[dict[str, Any]]) -> str | None:
    if not HAVE_PLOTS or plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    sizes = [d["inventory"] for d in due]
    for key, label in (
        ("due_all", f"due set, LIMIT {DUE_LIMIT:,} (index)"),
        ("due_page", f"page of {PAGE_LIMIT} (index)"),
        ("due_all_seqscan", "due set, index disabled (seq scan)"),
    ):
        left.plot(sizes, [d[key]["p50_ms"] for d in due], "o-", label=label)
    left.plot(
        sizes,
        [d["covering_what_if"]["p50_ms"] for d in due],
        "x:",
        label="due set, what-if covering index",
    )
    left.axhline(TARGET_MS, color="red", linestyle=":", label=f"target {TARGET_MS:.0f} ms")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("NHIs in the inventory (1 % due)")
    left.set_ylabel("p50 query time (ms)")
    left.set_title("Due-work selection")
    left.grid(alpha=0.3, which="both")
    left.legend()
    users = [d["users"] for d in disc]
    for page_size in (100, 1000):
        right.plot(
            users,
            [d[f"page_{page_size}"]["p50_s"] * 1000 for d in disc],
            "o-",
            label=f"PageSize {page_size}",
        )
    right.set_xlabel("IAM users in moto")
    right.set_ylabel("p50 full sweep (ms)")
    right.set_title("Discovery sweep (ListUsers, PathPrefix)")
    right.grid(alpha=0.3)
    right.legend()
    return save_plot(fig, out, NAME)
