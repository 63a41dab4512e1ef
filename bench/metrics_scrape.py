"""Benchmark: the cost of the `/metrics` inventory gauges at 1,000,000 NHIs.

A scrape never queries the database: it reads the gauges the API's periodic refresh last set
(`InventoryMetrics.refresh`, every `NHI_METRICS_REFRESH_SECONDS`). What grows with the
inventory is that refresh, so this times it, side by side in the same run with the query the
gauges used before migration 0009 (one GROUP BY over every NHI joined to its agent):

- the inventory fills to the size with INSERT ... SELECT generate_series through the real
  schema (its triggers included), shaped like a service that has run for a while: most NHIs
  decommissioned, a quarter usable with expiries spread over 90 days, a few overdue;
- before each timed refresh, `CHANGES` single-row status transitions (each one statement, so
  each appends its own deltas to `nhi_counts`, as a busy refresh interval would), so every
  timed refresh includes folding them;
- the trigger's cost on writes: the same single-row transitions with the counting triggers
  disabled and enabled.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy.orm import Session

from bench.report import Result, fmt, verdict_at_most
from bench.services import Stack
from nhi.infra.db import make_engine, make_sessionmaker
from nhi.infra.metrics import (
    DIRECT_INVENTORY_SQL,
    EXPIRY_SQL,
    SCALARS_SQL,
    InventoryMetrics,
    fold_counts,
    new_registry,
    read_counts,
    serial_plans,
)

NAME = "metrics_scrape"
TARGET_MS = 50.0
AGENTS = 1_000
CHUNK = 100_000
RUNS = 7
CHANGES = 500

LOAD_AGENTS_SQL = """
INSERT INTO agents (id, name, category, environment, owner_email, team, purpose, invokers,
                    status, created_by)
SELECT gen_random_uuid(), 'bench-metrics-' || g, 'rag',
       (ARRAY['dev', 'staging', 'prod'])[1 + g %% 3], 'owner' || g || '@example.com',
       'bench', 'Metrics benchmark', '[]'::jsonb, 'active', 'bench'
FROM generate_series(1, %(n)s) AS g
"""

# Per 1,000: 600 decommissioned, 250 active, 20 rotating, 20 expiring, 30 failed,
# 30 quarantined, 20 pending_approval, 20 requested/provisioning, 5 revoke_failed, 5 missing.
# One usable NHI in a thousand is overdue; the others expire within the next 90 days.
LOAD_NHIS_SQL = """
WITH a AS (SELECT array_agg(id ORDER BY name) AS ids FROM agents),
rows AS (
    SELECT g, g %% 1000 AS b FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g
),
shaped AS (
    SELECT g,
           CASE
               WHEN b < 600 THEN 'decommissioned'
               WHEN b < 850 THEN 'active'
               WHEN b < 870 THEN 'rotating'
               WHEN b < 890 THEN 'expiring'
               WHEN b < 920 THEN 'failed'
               WHEN b < 950 THEN 'quarantined'
               WHEN b < 970 THEN 'pending_approval'
               WHEN b < 980 THEN 'requested'
               WHEN b < 990 THEN 'provisioning'
               WHEN b < 995 THEN 'revoke_failed'
               ELSE 'missing'
           END AS status,
           CASE
               WHEN b = 600 THEN now() - make_interval(secs => 60 + (g * 7919) %% 86400)
               WHEN b BETWEEN 601 AND 889
                   THEN now() + make_interval(secs => 60 + (g * 7919) %% 7776000)
               WHEN b < 600 THEN now() - make_interval(secs => (g * 104729) %% 31536000)
               ELSE now() + interval '30 days'
           END AS expires_at,
           (ARRAY['iam_role', 'iam_user_key', 'postgres_role'])[1 + g %% 3] AS kind
    FROM rows
)
INSERT INTO nhis (
    id, agent_id, platform, kind, name, granted_scope, allowed_cidrs, status, workflow_id,
    requested_by, created_at, expires_at, max_lifetime_at, target
)
SELECT gen_random_uuid(), a.ids[1 + s.g %% %(agents)s],
       CASE WHEN s.kind = 'postgres_role' THEN 'postgres' ELSE 'aws' END,
       s.kind, 'nhi-bench-' || s.g, '[]'::jsonb, '[]'::jsonb, s.status,
       'nhi-bench-wf-' || s.g, 'bench', s.expires_at - interval '30 days', s.expires_at,
       s.expires_at + interval '60 days',
       CASE WHEN s.kind = 'postgres_role' THEN 'bench' END
FROM shaped s, a
"""

# Open prompts for one usable NHI in fifty; a revoke failure event for each revoke_failed NHI.
LOAD_PROMPTS_SQL = """
INSERT INTO prompts (id, nhi_id, kind, for_expires_at, offset_seconds, reason, deliveries,
                     status)
SELECT gen_random_uuid(), id, 'reminder', expires_at, 86400, '', '[]'::jsonb, 'open'
FROM nhis WHERE status = 'active' AND abs(hashtext(name)) % 50 = 0
"""
LOAD_EVENTS_SQL = """
INSERT INTO audit_events (subject_type, subject_id, event, actor, reason, details, created_at)
SELECT 'nhi', id::text, 'nhi.revoke_failed', 'system:decommission', 'AccessDenied', '{}',
       now() - interval '1 hour'
FROM nhis WHERE status = 'revoke_failed'
"""

# Single-row transitions: active -> expiring and back, one statement each.
FLIP_SQL = "UPDATE nhis SET status = %(to)s WHERE id = %(id)s"


def fill(dsn: str, size: int) -> float:
    """Agents, `size` NHIs, prompts and events; VACUUM ANALYZE as autovacuum would; seconds."""
    start = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(LOAD_AGENTS_SQL, {"n": AGENTS})
        lo = 1
        while lo <= size:
            hi = min(size, lo + CHUNK - 1)
            conn.execute(LOAD_NHIS_SQL, {"lo": lo, "hi": hi, "agents": AGENTS})
            print(f"[{NAME}] loaded {hi:,} NHIs", flush=True)
            lo = hi + 1
        conn.execute(LOAD_PROMPTS_SQL)
        conn.execute(LOAD_EVENTS_SQL)
        for table in ("agents", "nhis", "prompts", "audit_events", "nhi_counts"):
            conn.execute(f"VACUUM ANALYZE {table}")
    return time.perf_counter() - start


def flip(dsn: str, ids: list[str], to: str, triggers: bool = True) -> float:
    """Move each NHI to status `to`, one statement each, in one transaction; seconds."""
    with psycopg.connect(dsn) as conn:
        if not triggers:
            conn.execute("ALTER TABLE nhis DISABLE TRIGGER nhis_counts_update")
        start = time.perf_counter()
        for nhi_id in ids:
            conn.execute(FLIP_SQL, {"to": to, "id": nhi_id})
        took = time.perf_counter() - start
        if not triggers:
            conn.execute("ALTER TABLE nhis ENABLE TRIGGER nhis_counts_update")
        conn.commit()
    return took


def timed(sessions: Any, fn: Callable[[Session], object]) -> float:
    """Milliseconds of `fn` in one transaction (client side: send, plan, execute, fetch)."""
    with sessions() as session, session.begin():
        start = time.perf_counter()
        fn(session)
        return (time.perf_counter() - start) * 1000


def spread(times: list[float]) -> dict[str, float]:
    return {
        "min_ms": round(min(times), 2),
        "median_ms": round(statistics.median(times), 2),
        "max_ms": round(max(times), 2),
    }


def measure(dsn: str, url: str) -> dict[str, Any]:
    """Both ways of computing the gauges, RUNS times each, alternating, on the same data."""
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with psycopg.connect(dsn) as conn:
        ids = [str(r[0]) for r in conn.execute(
            "SELECT id FROM nhis WHERE status = 'active' ORDER BY id LIMIT %(n)s",
            {"n": CHANGES},
        ).fetchall()]  # fmt: skip
    metrics = InventoryMetrics(new_registry(), 86400)
    timed(sessions, metrics.refresh)  # the first refresh sets the audit cursor
    times: dict[str, list[float]] = {k: [] for k in ("refresh", "gauges", "fold", "old")}
    for run in range(RUNS):
        # A busy refresh interval: CHANGES transitions, each appending its deltas.
        flip(dsn, ids, "expiring" if run % 2 == 0 else "active")
        times["fold"].append(timed(sessions, fold_counts))
        flip(dsn, ids, "active" if run % 2 == 0 else "expiring")
        times["gauges"].append(timed(sessions, _new_gauges))
        times["refresh"].append(timed(sessions, metrics.refresh))
        times["old"].append(timed(sessions, _old_gauges))
    with sessions() as session, session.begin():
        same = _agree(session)
    engine.dispose()
    out: dict[str, Any] = {k: spread(v) for k, v in times.items()}
    out["counts_equal_direct_group_by"] = same
    return out


def _new_gauges(session: Session) -> None:
    serial_plans(session)  # as InventoryMetrics.refresh does
    fold_counts(session)
    read_counts(session)
    session.execute(EXPIRY_SQL).all()
    session.execute(SCALARS_SQL).one()


def _old_gauges(session: Session) -> None:
    session.execute(DIRECT_INVENTORY_SQL).all()
    session.execute(SCALARS_SQL).one()


def _agree(session: Session) -> bool:
    direct = {
        (p, k, e, s): int(n) for p, k, e, s, n, *_ in session.execute(DIRECT_INVENTORY_SQL).all()
    }
    return read_counts(session) == direct


def write_cost(dsn: str) -> dict[str, float]:
    """Milliseconds per single-row status change, with the counting trigger off and on."""
    with psycopg.connect(dsn) as conn:
        ids = [str(r[0]) for r in conn.execute(
            "SELECT id FROM nhis WHERE status = 'active' ORDER BY id DESC LIMIT %(n)s",
            {"n": CHANGES},
        ).fetchall()]  # fmt: skip
    out: dict[str, float] = {}
    for label, triggers in (("off", False), ("on", True), ("off_again", False)):
        took = flip(dsn, ids, "rotating", triggers) + flip(dsn, ids, "active", triggers)
        out[label] = round(took * 1000 / (2 * len(ids)), 4)
    # Disabled triggers missed those changes, but each pair went there and back: net zero.
    return out


def explain(dsn: str, query: str) -> str:
    """EXPLAIN ANALYZE of `query`, planned as the refresh plans it (no parallel workers)."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET max_parallel_workers_per_gather = 0")
        rows = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {query}").fetchall()
    return "\n".join(str(r[0]) for r in rows)


def run(stack: Stack, size: int) -> Result:
    """Fill, measure, report."""
    result = Result(name=NAME, title=f"/metrics inventory gauges at {size:,} NHIs")
    load_s = fill(stack.dsn, size)
    figures = measure(stack.dsn, stack.database_url)
    writes = write_cost(stack.dsn)
    plan = explain(stack.dsn, EXPIRY_SQL.text)
    scalars_plan = explain(stack.dsn, SCALARS_SQL.text)
    result.data = {
        "size": size,
        "load_s": round(load_s, 1),
        "changes_per_refresh": CHANGES,
        **figures,
        "write_ms": writes,
        "expiry_plan": plan,
        "scalars_plan": scalars_plan,
    }
    gauges, old = figures["gauges"], figures["old"]
    result.row(
        f"gauges' queries at {size:,} NHIs (fold {CHANGES} transitions' deltas, counts, "
        "overdue/expiring, scalars): min / median / max",
        _mmm(gauges),
        f"< {TARGET_MS:.0f} ms",
        verdict_at_most(gauges["median_ms"], TARGET_MS, "ms"),
    )
    result.row(
        "before migration 0009, same run: direct GROUP BY over every NHI + scalars",
        _mmm(old),
    )
    result.row("a whole refresh (gauges, audit events, sweeps)", _mmm(figures["refresh"]))
    result.row(f"folding {CHANGES} transitions' deltas alone", _mmm(figures["fold"]))
    result.row(
        "single-row status change, counting trigger off / on",
        f"{fmt(writes['off'], 'ms', 3)} / {fmt(writes['on'], 'ms', 3)}",
    )
    result.row("trigger-maintained counts equal the direct GROUP BY", str(figures[
        "counts_equal_direct_group_by"]))  # fmt: skip
    result.row(f"loading {size:,} NHIs (generate_series, triggers and indexes on)",
               fmt(load_s, "s", 1))  # fmt: skip
    result.note(
        "A scrape reads the gauges' last values and never queries the database; the refresh "
        "runs every NHI_METRICS_REFRESH_SECONDS (default 30 s) in the API."
    )
    result.note("Plan of the overdue/expiring query:\n\n```\n" + plan + "\n```")
    result.note("Plan of the scalars (open prompts, oldest revoke_failed, audit head):\n\n```\n"
                + scalars_plan + "\n```")  # fmt: skip
    return result


def _mmm(s: dict[str, float]) -> str:
    return " / ".join(fmt(s[k], "ms", 1) for k in ("min_ms", "median_ms", "max_ms"))
