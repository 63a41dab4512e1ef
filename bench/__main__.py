"""`python -m bench [--only NAME ...] [--quick]`: run the benchmarks, write bench/results/.

Each benchmark gets its own services (see bench/services.py), so one cannot disturb the next,
and a time budget; the whole run has a watchdog. Every process started is stopped on the way
out, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bench import (
    activity_import,
    containment,
    expiry,
    expiry_postgres,
    memory,
    metrics_scrape,
    overhead,
    provisioning,
    sweep,
    sweep_scale,
    task_credentials,
)
from bench.report import Result, environment, rerender, write_summary
from bench.services import REPO, Databases, Stack, StackSpec, kill_all


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark runs."""

    provisioning: tuple[int, ...]
    expiry_n: int
    expiry_base_ttl: int
    expiry_spread: int
    inventory: tuple[int, ...]
    iam_users: tuple[int, ...]
    lifecycles: int
    bounded_cache: int
    budget_s: dict[str, float]
    # Provisioning with payload encryption (and tracing) on vs off: NHIs per measurement and
    # rounds of every variant (bench/overhead.py; `--overhead-n` overrides the first).
    overhead_n: int = 200
    overhead_rounds: int = 3
    # Credentials per loop of `task_credentials` (bench/task_credentials.py).
    task_credentials_n: int = 200
    # Containments of a fresh 10-NHI agent (bench/containment.py): p50/p99 over these.
    containment_runs: int = 20
    # Users, orphans and repetitions of `sweep_scale` (bench/sweep_scale.py).
    sweep_scale: tuple[int, int, int] = (5_000, 500, 3)
    # Events in the generated CloudTrail file of `activity_import` (bench/activity_import.py).
    activity_events: int = 1_000_000


# The sizes. The expiry TTLs leave time to provision all 200 before the first expiry.
FULL = Sizes(
    provisioning=(200, 1_000),
    expiry_n=200,
    expiry_base_ttl=60,
    expiry_spread=30,
    inventory=(10_000, 100_000, 1_000_000),
    iam_users=(500, 1_000, 2_000, 5_000),
    lifecycles=10_000,
    bounded_cache=100,
    budget_s={
        "provisioning": 1200,
        "expiry": 480,
        "expiry_postgres": 480,
        "sweep": 600,
        "memory": 1500,
        "metrics_scrape": 900,
        "overhead": 900,
        "task_credentials": 900,
        "containment": 900,
        "sweep_scale": 3600,
        "activity_import": 1800,
    },
)
# Small enough to smoke-test the harness end to end in a few minutes.
QUICK = Sizes(
    provisioning=(50,),
    expiry_n=20,
    expiry_base_ttl=30,
    expiry_spread=10,
    inventory=(10_000, 100_000),
    iam_users=(100, 500),
    lifecycles=1_000,
    bounded_cache=100,
    budget_s={
        "provisioning": 300,
        "expiry": 240,
        "expiry_postgres": 240,
        "sweep": 240,
        "memory": 400,
        "metrics_scrape": 300,
        "overhead": 300,
        "task_credentials": 400,
        "containment": 400,
        "sweep_scale": 600,
        "activity_import": 600,
    },
    overhead_n=30,
    overhead_rounds=1,
    task_credentials_n=50,
    containment_runs=3,
    sweep_scale=(500, 50, 1),
    activity_events=100_000,
)
NAMES = (
    "provisioning",
    "expiry",
    "sweep",
    "memory",
    "metrics_scrape",
    "overhead",
    "task_credentials",
    "containment",
    "sweep_scale",
    "activity_import",
)
# The results a benchmark writes, one after the other on its services, each within its own
# budget (a failed part is written as failed; the next part still runs).
PARTS = {"expiry": ("expiry", "expiry_postgres")}
PROVISIONING_TARGET_SIZE = 1_000


def specs(store: str, bytecode: bool) -> dict[str, StackSpec]:
    """Which services each benchmark needs."""
    full = StackSpec(temporal_store=store, bytecode_cache=bytecode)
    return {
        "provisioning": full,
        "expiry": full,
        "sweep": replace(full, temporal=False, worker=False, api=False),
        # The memory benchmark starts (and replaces) its worker itself.
        "memory": replace(full, worker=False, api=False),
        "metrics_scrape": replace(full, temporal=False, moto=False, worker=False, api=False),
        "overhead": full,
        "task_credentials": full,
        "containment": full,
        # It starts its worker itself, in front of a counting proxy.
        "sweep_scale": replace(full, worker=False, api=False),
        "activity_import": replace(full, temporal=False, moto=False, worker=False, api=False),
    }


def parts(name: str) -> tuple[str, ...]:
    """The results benchmark `name` writes."""
    return PARTS.get(name, (name,))


def runner(part: str, sizes: Sizes, out: Path) -> Callable[[Stack], Awaitable[Result]]:
    """The coroutine function that runs one part of a benchmark on a started stack."""

    async def run(stack: Stack) -> Result:
        if part == "provisioning":
            return await provisioning.run(
                stack, list(sizes.provisioning), out, PROVISIONING_TARGET_SIZE
            )
        if part == "expiry":
            return await expiry.run(
                stack, sizes.expiry_n, sizes.expiry_base_ttl, sizes.expiry_spread, out
            )
        if part == "expiry_postgres":
            return await expiry_postgres.run(
                stack, sizes.expiry_n, sizes.expiry_base_ttl, sizes.expiry_spread, out
            )
        if part == "sweep":
            return await asyncio.to_thread(sweep.run, stack, sizes.inventory, sizes.iam_users, out)
        if part == "metrics_scrape":  # at the largest inventory size (1,000,000 in full)
            return await asyncio.to_thread(metrics_scrape.run, stack, sizes.inventory[-1])
        if part == "overhead":
            return await overhead.run(stack, sizes.overhead_n, sizes.overhead_rounds)
        if part == "task_credentials":
            return await task_credentials.run(stack, sizes.task_credentials_n, out)
        if part == "containment":
            return await containment.run(stack, sizes.containment_runs, out)
        if part == "sweep_scale":
            users, orphans, reps = sizes.sweep_scale
            return await sweep_scale.run(
                stack, users, orphans, reps, ("ours", "custodian", "floor"), out
            )
        if part == "activity_import":
            return await activity_import.run(stack, sizes.activity_events, out)
        return await memory.run(stack, sizes.lifecycles, sizes.bounded_cache, out)

    return run


def _failed(part: str, err: Exception, stack: Stack) -> Result:
    traceback.print_exc()
    result = Result(name=part, title=f"{part} (failed)")
    result.status = f"failed: {type(err).__name__}: {err}"[:500]
    result.note(f"Service logs were under {stack.dir} (kept: see the console).")
    result.note("Service processes at the failure: " + stack.describe_processes() + ".")
    for line in stack.last_errors():
        result.note(f"From the logs: `{line}`")
    return result


async def run_one(
    name: str, sizes: Sizes, out: Path, dbs: Databases, root: Path, args: argparse.Namespace
) -> list[Result]:
    """Start the benchmark's stack, run each of its parts within its budget, stop the stack;
    their results."""
    store = args.temporal_store
    spec = specs(store, not args.no_bytecode_cache)[name]
    mode = "quick" if args.quick else "full"
    started = time.monotonic()
    print(f"[{name}] starting services", flush=True)
    stack = Stack(name, dbs, root, spec)
    results: list[Result] = []
    try:
        try:
            await asyncio.to_thread(stack.start)
        except Exception as err:
            results = [_failed(part, err, stack) for part in parts(name)]
        else:
            for part in parts(name):
                budget = sizes.budget_s[part]
                print(f"[{part}] running (budget {budget:.0f} s)", flush=True)
                try:
                    result = await asyncio.wait_for(runner(part, sizes, out)(stack), budget)
                except Exception as err:
                    result = _failed(part, err, stack)
                # The first part's time includes starting the services.
                result.duration_s = time.monotonic() - started
                started = time.monotonic()
                results.append(result)
    finally:
        await asyncio.to_thread(stack.stop)
    for result in results:
        result.environment = environment(mode, dbs.kind, store, spec.bytecode_cache)
        result.write(out)
        print(f"[{result.name}] done in {result.duration_s:.0f} s: {result.status}", flush=True)
    return results


async def main_async(args: argparse.Namespace) -> int:
    """Run the selected benchmarks one after the other; 0 when all produced results."""
    sizes = QUICK if args.quick else FULL
    if args.overhead_n:
        sizes = replace(sizes, overhead_n=args.overhead_n)
    out: Path = args.out or (REPO / "bench" / "results" / ("quick" if args.quick else ""))
    root = Path(tempfile.mkdtemp(prefix="nhi-bench-"))
    dbs = await asyncio.to_thread(Databases, root)
    failed = False
    try:
        for name in args.only or NAMES:
            for result in await run_one(name, sizes, out, dbs, root, args):
                failed |= result.status != "ok"
                print(result.markdown(), flush=True)
    finally:
        await asyncio.to_thread(dbs.drop_all)
        _tidy(root, keep_logs=failed or args.keep)
    summary = write_summary(out)
    print(f"results: {out} (summary: {summary})", flush=True)
    return 1 if failed else 0


def _tidy(root: Path, keep_logs: bool) -> None:
    """Remove the run's temporary directory, or keep only its logs for a post-mortem."""
    if not keep_logs:
        shutil.rmtree(root, ignore_errors=True)
        return
    for path in root.rglob("*"):
        if path.is_file() and path.suffix != ".log":
            path.unlink(missing_ok=True)
    print(f"service logs kept in {root}", flush=True)


def watchdog(seconds: float) -> None:
    """If the run overstays its budget: stop it (SIGTERM), then end it hard."""

    def fire() -> None:
        print(f"watchdog: the run exceeded {seconds:.0f} s; stopping", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        kill_all()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only", nargs="+", choices=NAMES, metavar="NAME", help=f"one or more of {NAMES}"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, for a smoke test in a few minutes"
    )
    parser.add_argument(
        "--out", type=Path, help="results directory (default bench/results, or .../quick)"
    )
    parser.add_argument(
        "--temporal-store",
        choices=("file", "memory"),
        default="file",
        help="Temporal dev server persistence: a SQLite file like `nhi dev` (default) or memory",
    )
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="run the services with PYTHONDONTWRITEBYTECODE=1 (as deploy/Dockerfile does)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the service logs")
    parser.add_argument(
        "--overhead-n", type=int, metavar="N", help="NHIs per measurement of `overhead`"
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rewrite the markdown files and SUMMARY.md from the JSON results",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.render_only:
        out = args.out or (REPO / "bench" / "results" / ("quick" if args.quick else ""))
        for path in rerender(out):
            print(f"wrote {path}")
        print(f"wrote {write_summary(out)}")
        return 0
    sizes = QUICK if args.quick else FULL
    selected = args.only or NAMES
    budget = sum(sizes.budget_s[p] for n in selected for p in parts(n)) + 120 * len(selected)
    atexit.register(kill_all)
    watchdog(budget)
    loop = asyncio.new_event_loop()
    task = loop.create_task(main_async(args))
    # SIGTERM and SIGINT cancel the run, so every `finally` stops its services.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        print("interrupted; services stopped", file=sys.stderr)
        return 130
    finally:
        kill_all()
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
