"""Benchmark 4: worker memory with many open lifecycle workflows.

N active NHIs are written straight into the inventory (one row each, expiring in 80 days, so
every lifecycle's next deadline is a reminder weeks away) and an NhiLifecycleWorkflow is
started for each, exactly as provisioning would start it. Each loads its configuration with the
`load_lifecycle` activity and then waits on a timer. The worker's resident set size (VmRSS) is
then read with the sticky workflow cache at its default, bounded lower, and (in full runs)
large enough for every workflow.

Between settings the worker process is replaced and every workflow is "touched" with the
`view` query, which makes the new worker replay it into its cache (or through it, when the
cache is smaller than N). A successful query also proves the run loaded and is waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import psycopg
from temporalio.client import Client, WorkflowQueryFailedError
from temporalio.service import RPCError

from bench import load
from bench.report import (
    HAVE_PLOTS,
    NO_PLOTS,
    Result,
    fmt,
    plt,
    save_plot,
    verdict_at_most,
)
from bench.services import Proc, Stack
from models.contracts import LifecycleInput
from nhi.config import Settings
from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id

NAME = "memory"
TARGET_MB = 300.0
MB = 2**20
DEFAULT_CACHE = int(Settings.model_fields["worker_max_cached_workflows"].default)
START_CONCURRENCY = 64
QUERY_CONCURRENCY = 32
SAMPLE_EVERY_S = 0.5
SETTLE_S = 5.0

LOAD_SQL = """
WITH a AS (
    INSERT INTO agents (id, name, category, environment, owner_email, backup_owner_email,
                        team, purpose, invokers, status, created_by)
    SELECT gen_random_uuid(), 'bench-mem-' || g, 'rag', 'dev', 'owner' || g || '@example.com',
           'backup@example.com', 'bench', 'Memory benchmark', '[]'::jsonb, 'active', 'bench'
    FROM generate_series(1, 100) AS g
    RETURNING id
),
ids AS (SELECT array_agg(id) AS ids FROM a)
INSERT INTO nhis (id, agent_id, platform, kind, name, granted_scope, allowed_cidrs,
                  trust_principal, status, requested_by, created_at, activated_at, expires_at,
                  max_lifetime_at, external_id, credential_ref)
SELECT gen_random_uuid(), ids.ids[1 + g %% 100], 'aws', 'iam_role', 'nhi-bench-mem-' || g,
       '[{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::bench-kb/*"]}]'::jsonb,
       '[]'::jsonb, 'arn:aws:iam::123456789012:role/bench-agent-runtime', 'active', 'bench',
       now(), now(), now() + interval '80 days', now() + interval '90 days',
       'arn:aws:iam::123456789012:role/nhi-bench-mem-' || g,
       'arn:aws:iam::123456789012:role/nhi-bench-mem-' || g
FROM generate_series(1, %(n)s) AS g, ids
RETURNING id
"""


@dataclass
class Sampler:
    """Samples a process's RSS in the background (peak and a time series for the plot)."""

    proc: Proc
    t0: float
    series: list[tuple[float, float]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.series.append((time.time() - self.t0, self.proc.rss_bytes() / MB))
            await asyncio.sleep(SAMPLE_EVERY_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def peak_mb(self) -> float:
        return max((mb for _, mb in self.series), default=float("nan"))


async def steady_rss(proc: Proc) -> float:
    """Median RSS over a few seconds once the worker is idle (MB)."""
    samples = []
    for _ in range(int(SETTLE_S / SAMPLE_EVERY_S)):
        samples.append(proc.rss_bytes() / MB)
        await asyncio.sleep(SAMPLE_EVERY_S)
    return statistics.median(samples)


def insert_nhis(dsn: str, n: int) -> list[str]:
    """N active NHIs (and 100 agents) in one statement; their ids."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(LOAD_SQL, {"n": n}).fetchall()  # type: ignore[arg-type]
    return [str(r[0]) for r in rows]


async def start_lifecycles(client: Client, task_queue: str, ids: list[str]) -> float:
    """Start one lifecycle per NHI as provisioning does; seconds until all were accepted."""
    start = time.perf_counter()

    async def one(_: int, nhi_id: str) -> bool:
        await client.start_workflow(
            NhiLifecycleWorkflow.run,
            LifecycleInput(nhi_id=uuid.UUID(nhi_id)),
            id=lifecycle_workflow_id(nhi_id),
            task_queue=task_queue,
        )
        return True

    await load.bounded(ids, one, START_CONCURRENCY)
    return time.perf_counter() - start


async def touch_all(client: Client, ids: list[str], timeout: float) -> tuple[float, int]:
    """Query every lifecycle's `view` until each answers; (seconds, queries not answered).

    A run still starting answers NotReady (or the server says it is not ready for queries):
    it goes to the back of the line and is asked again.
    """
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    pending: asyncio.Queue[str] = asyncio.Queue()
    for nhi_id in ids:
        pending.put_nowait(nhi_id)
    unanswered = 0

    async def lane() -> None:
        nonlocal unanswered
        while True:
            try:
                nhi_id = pending.get_nowait()
            except asyncio.QueueEmpty:
                return
            if time.monotonic() > deadline:
                unanswered += 1
                continue
            handle = client.get_workflow_handle_for(
                NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi_id)
            )
            try:
                await handle.query(NhiLifecycleWorkflow.view, rpc_timeout=timedelta(seconds=30))
            except (WorkflowQueryFailedError, RPCError):
                pending.put_nowait(nhi_id)
                await asyncio.sleep(0.5)

    await asyncio.gather(*(lane() for _ in range(QUERY_CONCURRENCY)))
    return time.perf_counter() - start, unanswered


@dataclass
class Setting:
    """One worker configuration and what its RSS did."""

    label: str
    cache: int
    idle_mb: float = float("nan")
    steady_mb: float = float("nan")
    peak_mb: float = float("nan")
    start_s: float = float("nan")
    touch_s: float = float("nan")
    unanswered: int = 0
    worker_cpu_s: float = float("nan")
    temporal_rss_mb: float = float("nan")
    series: list[tuple[float, float]] = field(default_factory=list)


async def measure(
    stack: Stack, setting: Setting, ids: list[str], first: bool, timeout: float, t0: float
) -> None:
    """A fresh worker with `setting.cache`; start (first setting only) and touch every run."""
    worker = stack.start_worker(NHI_WORKER_MAX_CACHED_WORKFLOWS=str(setting.cache))
    await stack.wait_worker_polling()
    await asyncio.sleep(2.0)
    setting.idle_mb = worker.rss_bytes() / MB
    client = await stack.client()
    sampler = Sampler(worker, t0)
    sampler.start()
    cpu0 = worker.cpu_seconds()
    try:
        if first:
            print(f"  [{NAME}] starting {len(ids):,} lifecycles", flush=True)
            setting.start_s = await start_lifecycles(client, stack.task_queue, ids)
        print(f"  [{NAME}] cache {setting.cache:,}: querying {len(ids):,} lifecycles", flush=True)
        setting.touch_s, setting.unanswered = await touch_all(client, ids, timeout)
        setting.steady_mb = await steady_rss(worker)
    finally:
        await sampler.stop()
    stack.check_alive()
    setting.worker_cpu_s = worker.cpu_seconds() - cpu0
    setting.peak_mb = sampler.peak_mb
    setting.series = sampler.series
    temporal = stack.procs.get("temporal")
    setting.temporal_rss_mb = temporal.rss_bytes() / MB if temporal else float("nan")


def settings_for(n: int, bounded: int) -> list[Setting]:
    """Default first (it starts the workflows), then bounded, then all-in-cache if different."""
    out = [
        Setting(f"default ({DEFAULT_CACHE:,})", DEFAULT_CACHE),
        Setting(f"bounded ({bounded:,})", bounded),
    ]
    if n > DEFAULT_CACHE:
        out.append(Setting(f"every workflow cached ({n:,})", n))
    return out


async def run(stack: Stack, n: int, bounded: int, out: Path) -> Result:
    """The whole benchmark on one stack (Postgres, Temporal, moto; no API)."""
    result = Result(name=NAME, title=f"Worker memory with {n:,} open lifecycle workflows")
    print(f"  [{NAME}] inserting {n:,} active NHIs", flush=True)
    ids = await asyncio.to_thread(insert_nhis, stack.dsn, n)
    timeout = 120.0 + n * 0.2
    t0 = time.time()
    settings = settings_for(n, bounded)
    for i, setting in enumerate(settings):
        await measure(stack, setting, ids, first=i == 0, timeout=timeout, t0=t0)
    stack.stop_worker()
    _report(result, n, settings)
    plot = _plot(out, n, settings)
    if plot:
        result.plots.append(plot)
    else:
        result.note(NO_PLOTS)
    return result


def _report(result: Result, n: int, settings: list[Setting]) -> None:
    first = settings[0]
    result.row(
        f"starting {n:,} lifecycles (start -> accepted)",
        f"{fmt(first.start_s, 's', 1)} ({fmt(n / first.start_s, '/s', 0)})",
    )
    for s in settings:
        target = f"<= {TARGET_MB:.0f} MB"
        result.row(
            f"cache {s.label}: worker RSS idle, before any workflow", fmt(s.idle_mb, "MB", 0)
        )
        result.row(
            f"cache {s.label}: worker RSS with {n:,} open lifecycles (steady)",
            fmt(s.steady_mb, "MB", 0),
            target,
            verdict_at_most(s.steady_mb, TARGET_MB, "MB"),
        )
        result.row(
            f"cache {s.label}: worker RSS peak",
            fmt(s.peak_mb, "MB", 0),
            target,
            verdict_at_most(s.peak_mb, TARGET_MB, "MB"),
        )
        cached = min(s.cache, n)
        per = (s.steady_mb - s.idle_mb) * 1024 / cached if cached else float("nan")
        result.row(
            f"cache {s.label}: querying all {n:,} (replays into the cache)",
            f"{fmt(s.touch_s, 's', 1)}, worker CPU {fmt(s.worker_cpu_s, 's', 1)}, "
            f"~{fmt(per, 'KB', 0)} per cached run"
            + (f", {s.unanswered} unanswered" if s.unanswered else ""),
        )
    result.row("Temporal dev server RSS at the end", fmt(settings[-1].temporal_rss_mb, "MB", 0))
    result.data = {
        "n": n,
        "settings": [
            {k: v for k, v in vars(s).items() if k != "series"} | {"series_mb": s.series[::2]}
            for s in settings
        ],
    }
    result.note(
        f"{n:,} NHI rows inserted directly (status active, expiring in 80 days), then one "
        "NhiLifecycleWorkflow each started as provisioning starts it; each ran `load_lifecycle` "
        "and waits on its first reminder timer. Every setting uses a fresh worker process "
        "(`python worker.py` with NHI_WORKER_MAX_CACHED_WORKFLOWS), and every workflow is "
        f"queried once ({QUERY_CONCURRENCY} in flight), which replays it into that worker's "
        f"cache. RSS is VmRSS; 'steady' is the median over {SETTLE_S:.0f} s after the queries, "
        f"'peak' the maximum sampled every {SAMPLE_EVERY_S} s."
    )
    result.note(
        "An open lifecycle costs the worker memory only while it is in the sticky cache: "
        "evicted runs live in Temporal's history and are replayed on their next event (a timer "
        "weeks away, an update or a query), so RSS follows the cache size, not the number of "
        "open lifecycles. A smaller cache trades memory for replay CPU when many runs wake "
        "together (compare the worker CPU of the query passes)."
    )
    missed = [s for s in settings if s.steady_mb > TARGET_MB]
    for s in missed:
        result.note(
            f"Why cache {s.label} misses the target: {min(s.cache, n):,} cached runs at "
            f"~{fmt((s.steady_mb - s.idle_mb) * 1024 / max(1, min(s.cache, n)), 'KB', 0)} each "
            "(a sandboxed workflow instance with its pydantic state and the SDK's per-run "
            f"state) on top of an idle worker of {fmt(s.idle_mb, 'MB', 0)}. Keep the cache at or "
            "below the default to stay under the target."
        )


def _plot(out: Path, n: int, settings: list[Setting]) -> str | None:
    if not HAVE_PLOTS or plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in settings:
        if s.series:
            xs = [t for t, _ in s.series]
            left.plot(xs, [mb for _, mb in s.series], label=f"cache {s.label}")
    left.axhline(TARGET_MB, color="red", linestyle=":", label=f"target {TARGET_MB:.0f} MB")
    left.set_xlabel("seconds since the benchmark started")
    left.set_ylabel("worker RSS (MB)")
    left.set_title(f"Worker RSS while {n:,} lifecycles start and are queried")
    left.grid(alpha=0.3)
    left.legend()
    ordered = sorted(settings, key=lambda s: s.cache)
    right.plot([s.cache for s in ordered], [s.steady_mb for s in ordered], "o-", label="steady")
    right.plot([s.cache for s in ordered], [s.peak_mb for s in ordered], "s--", label="peak")
    right.axhline(TARGET_MB, color="red", linestyle=":", label=f"target {TARGET_MB:.0f} MB")
    right.set_xscale("log")
    right.set_xlabel("NHI_WORKER_MAX_CACHED_WORKFLOWS")
    right.set_ylabel("worker RSS (MB)")
    right.set_title(f"RSS with {n:,} open lifecycles vs cache size")
    right.grid(alpha=0.3, which="both")
    right.legend()
    return save_plot(fig, out, NAME)
