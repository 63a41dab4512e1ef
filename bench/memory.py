"""Benchmark 4: worker memory with many open lifecycle workflows.

N active NHIs are written straight into the inventory (expiring in 80 days, so every
lifecycle's next deadline is a reminder weeks away) and an NhiLifecycleWorkflow is started for
each, exactly as provisioning starts it. Each loads its configuration with the
`load_lifecycle` activity, then waits on a timer. The worker's resident set size (VmRSS) is
read once all N are waiting:

- default cache: the worker that started all N lifecycles, with
  NHI_WORKER_MAX_CACHED_WORKFLOWS at its default;
- bounded cache: a fresh worker with a small cache, after it has replayed ten times its cache
  size in lifecycles (through the `view` query), so its cache is full and has churned.

Starts are paced in batches (the next batch when the worker is idle): provisioning starts
lifecycles at provisioning speed, far below what the worker can load, so a flood of starts
that evicts runs between their first and second workflow task would measure an artefact.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
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
from bench.services import Proc, Stack, wait_idle
from models.contracts import LifecycleInput
from nhi.infra.config import Settings
from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id

NAME = "memory"
TARGET_MB = 300.0
MB = 2**20
DEFAULT_CACHE = int(Settings.model_fields["worker_max_cached_workflows"].default)
START_CONCURRENCY = 64
QUERY_CONCURRENCY = 32
SAMPLE_EVERY_S = 0.5
SETTLE_S = 5.0
VERIFY_SAMPLE = 500  # lifecycles queried to prove they loaded and wait (random, per setting)
BYTECODE_PROBE = 200  # lifecycles started by an extra worker without a bytecode cache

LOAD_SQL = """
WITH a AS (
    INSERT INTO agents (id, name, category, environment, owner_email, backup_owner_email,
                        team, purpose, invokers, status, created_by)
    SELECT gen_random_uuid(), 'bench-mem-' || %(tag)s || '-' || g, 'rag', 'dev',
           'owner' || g || '@example.com', 'backup@example.com', 'bench', 'Memory benchmark',
           '[]'::jsonb, 'active', 'bench'
    FROM generate_series(1, 100) AS g
    RETURNING id
),
ids AS (SELECT array_agg(id) AS ids FROM a)
INSERT INTO nhis (id, agent_id, platform, kind, name, granted_scope, allowed_cidrs,
                  trust_principal, status, requested_by, created_at, activated_at, expires_at,
                  max_lifetime_at, external_id, credential_ref)
SELECT gen_random_uuid(), ids.ids[1 + g %% 100], 'aws', 'iam_role',
       'nhi-bench-mem-' || %(tag)s || '-' || g,
       '[{"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::bench-kb/*"]}]'::jsonb,
       '[]'::jsonb, 'arn:aws:iam::123456789012:role/bench-agent-runtime', 'active', 'bench',
       now(), now(), now() + interval '80 days', now() + interval '90 days',
       'arn:aws:iam::123456789012:role/nhi-bench-mem-' || g,
       'arn:aws:iam::123456789012:role/nhi-bench-mem-' || g
FROM generate_series(1, %(n)s) AS g, ids
RETURNING id
"""


# ---- measuring a worker -----------------------------------------------------------------------


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
    """Median RSS over a few seconds of an idle worker (MB)."""
    samples = []
    for _ in range(int(SETTLE_S / SAMPLE_EVERY_S)):
        samples.append(proc.rss_bytes() / MB)
        await asyncio.sleep(SAMPLE_EVERY_S)
    return statistics.median(samples)


# ---- driving lifecycles -----------------------------------------------------------------------


def insert_nhis(dsn: str, n: int) -> list[str]:
    """N active NHIs (and 100 agents) in one statement; their ids."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(LOAD_SQL, {"n": n, "tag": load.run_tag()}).fetchall()
    return [str(r[0]) for r in rows]


async def start_lifecycles(client: Client, task_queue: str, ids: list[str]) -> None:
    """Start one lifecycle per NHI exactly as ProvisionNhiWorkflow does (same id, same input)."""

    async def one(_: int, nhi_id: str) -> bool:
        await client.start_workflow(
            NhiLifecycleWorkflow.run,
            LifecycleInput(nhi_id=uuid.UUID(nhi_id)),
            id=lifecycle_workflow_id(nhi_id),
            task_queue=task_queue,
        )
        return True

    await load.bounded(ids, one, START_CONCURRENCY)


async def start_paced(
    client: Client, task_queue: str, worker: Proc, ids: list[str], batch: int, timeout: float
) -> float:
    """Start every lifecycle, a batch at a time, each once the worker is idle; seconds taken."""
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    for i in range(0, len(ids), batch):
        await start_lifecycles(client, task_queue, ids[i : i + batch])
        if not await wait_idle(worker, max(1.0, deadline - time.monotonic())):
            raise TimeoutError(f"lifecycles still starting after {timeout:.0f}s")
        print(f"  [{NAME}] {min(len(ids), i + batch):,} of {len(ids):,} started", flush=True)
    return time.perf_counter() - start


async def query_all(client: Client, ids: list[str], timeout: float) -> tuple[float, int]:
    """Query every lifecycle's `view` until each answers; (seconds, not answered in time).

    A run still starting answers NotReady (or the server says it cannot be queried yet): it
    goes to the back of the line.
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


# ---- the settings -----------------------------------------------------------------------------


@dataclass
class Setting:
    """One worker configuration and what its RSS did."""

    label: str
    cache: int
    idle_mb: float = float("nan")
    steady_mb: float = float("nan")
    peak_mb: float = float("nan")
    start_s: float = float("nan")
    started: int = 0
    queried: int = 0
    query_s: float = float("nan")
    unanswered: int = 0
    worker_cpu_s: float = float("nan")
    temporal_rss_mb: float = float("nan")
    series: list[tuple[float, float]] = field(default_factory=list)


async def fresh_worker(stack: Stack, setting: Setting, **env: str) -> Proc:
    """Replace the worker; its idle RSS once it polls."""
    worker = stack.start_worker(NHI_WORKER_MAX_CACHED_WORKFLOWS=str(setting.cache), **env)
    await stack.wait_worker_polling()
    await asyncio.sleep(2.0)
    setting.idle_mb = worker.rss_bytes() / MB
    return worker


async def measure(
    stack: Stack,
    setting: Setting,
    start_ids: list[str],
    query_ids: list[str],
    t0: float,
    timeout: float,
) -> None:
    """A fresh worker with `setting.cache`: start `start_ids`, query `query_ids`, read RSS."""
    worker = await fresh_worker(stack, setting)
    client = await stack.client()
    sampler = Sampler(worker, t0)
    sampler.start()
    cpu0 = worker.cpu_seconds()
    try:
        if start_ids:
            print(f"  [{NAME}] cache {setting.cache:,}: starting {len(start_ids):,}", flush=True)
            batch = max(100, setting.cache // 2)
            setting.start_s = await start_paced(
                client, stack.task_queue, worker, start_ids, batch, timeout
            )
            setting.started = len(start_ids)
        print(f"  [{NAME}] cache {setting.cache:,}: querying {len(query_ids):,}", flush=True)
        setting.query_s, setting.unanswered = await query_all(client, query_ids, timeout)
        setting.queried = len(query_ids)
        await wait_idle(worker, 30.0)
        setting.steady_mb = await steady_rss(worker)
    finally:
        await sampler.stop()
    stack.check_alive()
    setting.worker_cpu_s = worker.cpu_seconds() - cpu0
    setting.peak_mb = sampler.peak_mb
    setting.series = sampler.series
    temporal = stack.procs.get("temporal")
    setting.temporal_rss_mb = temporal.rss_bytes() / MB if temporal else float("nan")


async def bytecode_probe(stack: Stack, n: int, timeout: float) -> dict[str, float]:
    """Worker CPU per lifecycle start with and without a bytecode cache (N fresh lifecycles
    each), so the cost of PYTHONDONTWRITEBYTECODE=1 has a number."""
    client = await stack.client()
    out: dict[str, float] = {}
    for label, env in (
        ("with bytecode cache", {}),
        ("without (PYTHONDONTWRITEBYTECODE=1)", {"PYTHONDONTWRITEBYTECODE": "1"}),
    ):
        ids = await asyncio.to_thread(insert_nhis, stack.dsn, n)
        setting = Setting(label, DEFAULT_CACHE)
        if "PYTHONDONTWRITEBYTECODE" in env:
            env["PYTHONPYCACHEPREFIX"] = ""  # empty: no prefix, nothing written anywhere
        worker = await fresh_worker(stack, setting, **env)
        cpu0 = worker.cpu_seconds()
        await start_paced(client, stack.task_queue, worker, ids, n, timeout)
        out[label] = (worker.cpu_seconds() - cpu0) * 1000 / n
    return out


async def run(stack: Stack, n: int, bounded: int, out: Path) -> Result:
    """The whole benchmark on one stack (Postgres, Temporal, moto; no API)."""
    result = Result(name=NAME, title=f"Worker memory with {n:,} open lifecycle workflows")
    print(f"  [{NAME}] inserting {n:,} active NHIs", flush=True)
    ids = await asyncio.to_thread(insert_nhis, stack.dsn, n)
    timeout = 120.0 + n * 0.15
    t0 = time.time()
    rng = random.Random(7)
    default = Setting(f"default ({DEFAULT_CACHE:,})", DEFAULT_CACHE)
    small = Setting(f"bounded ({bounded:,})", bounded)
    await measure(stack, default, ids, rng.sample(ids, min(n, VERIFY_SAMPLE)), t0, timeout)
    churn = rng.sample(ids, min(n, max(VERIFY_SAMPLE, 10 * bounded)))
    await measure(stack, small, [], churn, t0, timeout)
    print(f"  [{NAME}] bytecode probe ({BYTECODE_PROBE} lifecycles twice)", flush=True)
    probe = await bytecode_probe(stack, BYTECODE_PROBE, timeout)
    stack.stop_worker()
    settings = [default, small]
    _report(result, n, settings, probe, stack.spec.bytecode_cache)
    plot = _plot(out, n, settings)
    if plot:
        result.plots.append(plot)
    else:
        result.note(NO_PLOTS)
    return result


# ---- the result -------------------------------------------------------------------------------


def _report(
    result: Result,
    n: int,
    settings: list[Setting],
    probe: dict[str, float],
    bytecode_cache: bool,
) -> None:
    default, small = settings
    target = f"<= {TARGET_MB:.0f} MB"
    result.row(
        f"starting {n:,} lifecycles, paced (until every one waits on its timer)",
        f"{fmt(default.start_s, 's', 0)} ({fmt(n / default.start_s, '/s', 1)}), "
        f"worker CPU {fmt(default.worker_cpu_s * 1000 / max(1, n), 'ms', 0)} per lifecycle",
    )
    for s in settings:
        held = min(s.cache, n)
        result.row(
            f"cache {s.label}: worker RSS idle, before any workflow", fmt(s.idle_mb, "MB", 0)
        )
        result.row(
            f"cache {s.label}: worker RSS with {n:,} open lifecycles (steady, "
            f"up to {held:,} cached)",
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
        result.row(
            f"cache {s.label}: {s.queried:,} queried (random), all answered",
            f"{'yes' if not s.unanswered else f'no, {s.unanswered} unanswered'}, "
            f"{fmt(s.query_s, 's', 1)}",
        )
    per_run = (default.steady_mb - default.idle_mb) * 1024 / max(1, min(default.cache, n))
    result.row("RSS per cached lifecycle run (default cache, steady - idle)", fmt(per_run, "KB", 0))
    if n > DEFAULT_CACHE:
        every = default.idle_mb + n * per_run / 1024
        result.row(
            f"cache holding all {n:,} (extrapolated, not measured)",
            fmt(every, "MB", 0),
            target,
            verdict_at_most(every, TARGET_MB, "MB") + " (extrapolated)",
        )
    for label, ms in probe.items():
        result.row(f"worker CPU per lifecycle start, {label}", fmt(ms, "ms", 1))
    result.row("Temporal dev server RSS at the end", fmt(settings[-1].temporal_rss_mb, "MB", 0))
    result.data = {
        "n": n,
        "bytecode_cache": bytecode_cache,
        "bytecode_probe_ms_per_start": probe,
        "per_cached_run_kb": per_run,
        "settings": [
            {k: v for k, v in vars(s).items() if k != "series"} | {"series_mb": s.series[::2]}
            for s in settings
        ],
    }
    _explain(result, n, default, small, per_run, probe, bytecode_cache)


def _explain(
    result: Result,
    n: int,
    default: Setting,
    small: Setting,
    per_run: float,
    probe: dict[str, float],
    bytecode_cache: bool,
) -> None:
    result.note(
        f"{n:,} NHI rows inserted directly (active, expiring in 80 days), then one "
        "NhiLifecycleWorkflow each, started as provisioning starts it, in batches of half the "
        "cache once the worker is idle. Each setting runs a fresh `python worker.py` with "
        "NHI_WORKER_MAX_CACHED_WORKFLOWS. A random sample is queried (`view`) to prove the "
        "runs loaded and wait; for the bounded cache the sample is 10x its size, so the cache "
        f"is full and has churned. RSS is VmRSS; 'steady' is the median over {SETTLE_S:.0f} s "
        f"once the worker is idle, 'peak' the maximum sampled every {SAMPLE_EVERY_S} s."
    )
    result.note(
        "An open lifecycle costs worker memory only while it is in the sticky cache: evicted "
        "runs live in Temporal's history and are replayed on their next event (a timer weeks "
        "away, an update, a query). So RSS follows the cache size, not the number of open "
        "lifecycles; a smaller cache trades memory for replay CPU when many runs wake at once."
    )
    result.note(
        f"The idle worker alone is {fmt(default.idle_mb, 'MB', 0)}: the worker imports the "
        "whole service (SQLAlchemy, boto3 with its service models, the Slack SDK, pydantic, "
        "the Temporal SDK and its Rust core). Each cached lifecycle run adds "
        f"~{fmt(per_run, 'KB', 0)} (steady - idle, divided by the runs cached): a sandboxed "
        "workflow instance with its own copy of the workflow module, its pydantic state and "
        "the SDK's per-run state"
        + (
            f", plus memory the allocator kept from the {n - default.cache:,} runs evicted "
            "on the way (the quick run, where every run stays cached, measures less per run)."
            if n > default.cache
            else "."
        )
    )
    if default.steady_mb > TARGET_MB:
        room = (TARGET_MB - default.idle_mb) * 1024 / per_run if per_run > 0 else float("nan")
        result.note(
            f"Why the default cache misses the target: idle {fmt(default.idle_mb, 'MB', 0)} "
            f"+ {min(default.cache, n):,} cached runs x ~{fmt(per_run, 'KB', 0)} = "
            f"{fmt(default.steady_mb, 'MB', 0)}, {fmt(default.steady_mb - TARGET_MB, 'MB', 0)} "
            f"over. Under {TARGET_MB:.0f} MB the cache can hold about {room:,.0f} runs; the "
            f"bounded setting ({small.cache:,}) stays at {fmt(small.steady_mb, 'MB', 0)}."
        )
    without = probe.get("without (PYTHONDONTWRITEBYTECODE=1)", float("nan"))
    with_cache = probe.get("with bytecode cache", float("nan"))
    result.note(
        f"Bytecode: without a bytecode cache a lifecycle start costs the worker "
        f"{fmt(without, 'ms', 1)} of CPU instead of {fmt(with_cache, 'ms', 1)}, because the "
        "workflow sandbox re-imports `workflows.lifecycle` for every new run and, with no "
        ".pyc to read, compiles it from source each time (a py-spy profile of the worker, taken "
        "while building this benchmark, shows that time in SourceLoader.source_to_code). "
        "This machine sets PYTHONDONTWRITEBYTECODE=1 and so "
        "does deploy/Dockerfile, whose /app sources are never compiled (the worker runs from "
        "/app, not from site-packages). "
        + (
            "The services in this run had a bytecode cache (PYTHONPYCACHEPREFIX in the run's "
            "temporary directory)."
            if bytecode_cache
            else "This run used no bytecode cache (--no-bytecode-cache)."
        )
    )


def _plot(out: Path, n: int, settings: list[Setting]) -> str | None:
    if not HAVE_PLOTS or plt is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for s in settings:
        if s.series:
            ax.plot([t for t, _ in s.series], [mb for _, mb in s.series], label=f"cache {s.label}")
    ax.axhline(TARGET_MB, color="red", linestyle=":", label=f"target {TARGET_MB:.0f} MB")
    ax.set_xlabel("seconds since the benchmark started")
    ax.set_ylabel("worker RSS (MB)")
    ax.set_title(f"Worker RSS while {n:,} lifecycles start, wait and are queried")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_plot(fig, out, NAME)
