"""Benchmark: what payload encryption (and tracing, where the build has it) cost provisioning.

The same provisioning load as bench/provisioning.py (`iam_role` requests through the API until
`active`), on one stack, with the worker and the API restarted between variants:

- `off`: no `NHI_PAYLOAD_KEYS`, no tracing (`make dev`);
- `encryption`: `NHI_PAYLOAD_KEYS` set, so every payload the worker and the API send through
  Temporal is AES-256-GCM encrypted and every failure's message and stack trace with it;
- `tracing` and `encryption + tracing`: `NHI_OTEL_EXPORTER_OTLP_ENDPOINT` pointed at a local
  OTLP/HTTP sink that accepts and counts spans (only when Settings has that field, i.e. the
  build ships tracing; otherwise the variants are reported as not available).

Variants alternate within each round, in a rotated order, so drift on a shared machine (other
processes, Temporal's growing SQLite file) spreads over all of them; the figure per variant is
the median over rounds. Target: encryption and tracing together at most 10 % slower than off.
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from bench import load, provisioning
from bench.phase import Phase
from bench.report import Result, fmt, verdict_at_most
from bench.services import MACHINE, REPO, Stack, spawn, wait_idle, wait_port
from nhi.infra.config import Settings
from nhi.rules.ids import lifecycle_workflow_id

NAME = "overhead"
TARGET_SLOWDOWN = 0.10
TRACING_SETTING = "otel_exporter_otlp_endpoint"


@dataclass(frozen=True)
class Variant:
    name: str
    encryption: bool
    tracing: bool


VARIANTS = (
    Variant("off", False, False),
    Variant("encryption", True, False),
    Variant("tracing", False, True),
    Variant("encryption + tracing", True, True),
)


def tracing_available() -> bool:
    """Whether this build has the tracing setting (added with the OpenTelemetry support)."""
    return TRACING_SETTING in Settings.model_fields


class OtlpSink:
    """An OTLP/HTTP endpoint that accepts every export (an empty 200 is a valid answer) and
    counts requests and bytes, so tracing really exports during the measurement."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.requests += 1
                sink.bytes += len(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @contextmanager
    def running(self) -> Iterator[OtlpSink]:
        self._thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()


def variant_env(variant: Variant, keys: str, sink_url: str) -> dict[str, str]:
    """NHI_* settings of the worker and the API for a variant; an empty value unsets (the
    environment the benchmark runs in might set them)."""
    env = {"NHI_PAYLOAD_KEYS": keys if variant.encryption else ""}
    if tracing_available():
        env["NHI_OTEL_EXPORTER_OTLP_ENDPOINT"] = sink_url if variant.tracing else ""
    return env


def service_env(stack: Stack, env: dict[str, str]) -> dict[str, str]:
    """The stack's environment for its services with `env` on top; empty values removed."""
    merged = stack.env(**{k: v for k, v in env.items() if v})
    for key in (k for k, v in env.items() if not v):
        merged.pop(key, None)
    return merged


def restart_services(stack: Stack, env: dict[str, str]) -> None:
    """Restart the worker and the API (on the same port) with `env`."""
    stack.stop_worker()
    api = stack.procs.pop("api", None)
    if api is not None:
        api.stop()
    merged = service_env(stack, env)
    worker = [sys.executable, str(REPO / "worker.py")]
    stack.procs["worker"] = spawn("worker", worker, merged, stack.dir)
    cmd = [
        sys.executable, "-m", "uvicorn", "api.app:app",
        "--host", "127.0.0.1", "--port", str(stack.api_port), "--log-level", "warning",
    ]  # fmt: skip
    proc = spawn("api", cmd, merged, stack.dir)
    stack.procs["api"] = proc
    wait_port(proc, stack.api_port)
    httpx.get(f"{stack.api_url}/healthz", timeout=10).raise_for_status()


async def input_encoding(stack: Stack, nhi_id: str) -> str:
    """The encoding of an NHI's run input as the server stores it (read without the codec):
    proof that a variant really encrypted."""
    client = await stack.client()
    history = await client.get_workflow_handle(lifecycle_workflow_id(nhi_id)).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    return started.input.payloads[0].metadata.get("encoding", b"").decode()


async def measure(
    stack: Stack, creds: load.Credentials, variant: Variant, env: dict[str, str], n: int
) -> Phase:
    """Restart the services as `variant`, warm them up untimed, then provision N."""
    await asyncio.to_thread(restart_services, stack, env)
    await stack.wait_worker_polling()
    # Untimed: the API's first Temporal connection and the worker's first sandboxes.
    await provisioning.ours_provision(stack, creds, WARM_UP)
    phase, requested = await provisioning.ours_provision(stack, creds, n)
    phase.label = variant.name
    stack.check_alive()
    if requested:
        phase.extra["input_encoding"] = await input_encoding(stack, requested[0].id)
    return phase


WARM_UP = 5


def _cpu_per_nhi(phase: Phase) -> float:
    """CPU of the worker, the API and Temporal per completed NHI, in ms."""
    ours = sum(v for k, v in phase.cpu_s.items() if k in ("worker", "api", "temporal"))
    return ours * 1000 / phase.done if phase.done else float("nan")


async def run(stack: Stack, n: int, rounds: int) -> Result:
    """Every variant `rounds` times on one stack; the median throughput of each against off."""
    result = Result(name=NAME, title="Provisioning with payload encryption and tracing on vs off")
    variants = [v for v in VARIANTS if tracing_available() or not v.tracing]
    keys = f"bench:{base64.b64encode(os.urandom(32)).decode()}"
    creds = await asyncio.to_thread(load.credentials, stack.database_url)
    await asyncio.to_thread(provisioning.warm_up, stack.aws(), stack.settings().iam_path)
    phases: dict[str, list[Phase]] = {v.name: [] for v in variants}
    sink = OtlpSink()
    with sink.running():
        for r in range(rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for variant in order:
                print(f"  [{NAME}] round {r + 1}/{rounds}: {variant.name}, n={n}", flush=True)
                env = variant_env(variant, keys, sink.url)
                phases[variant.name].append(await measure(stack, creds, variant, env, n))
                await wait_idle(stack.procs["worker"], 60.0)
    # Leave the stack as it was started (no keys, no tracing) for whatever runs next.
    await asyncio.to_thread(restart_services, stack, variant_env(VARIANTS[0], keys, sink.url))
    _report(result, phases, n, rounds, sink)
    return result


def _median(values: list[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def _report(
    result: Result, phases: dict[str, list[Phase]], n: int, rounds: int, sink: OtlpSink
) -> None:
    base = _median([p.throughput for p in phases["off"]])
    for name, runs in phases.items():
        rates = [p.throughput for p in runs]
        median = _median(rates)
        each = ", ".join(fmt(r, "", 2) for r in rates)
        result.row(
            f"provisioning {n}, {name}: NHI/s (median of {rounds}: {each})", fmt(median, "NHI/s")
        )
        encodings = sorted({str(p.extra.get("input_encoding", "?")) for p in runs})
        result.row(
            f"provisioning {n}, {name}: CPU per NHI (worker + API + Temporal), input stored as",
            f"{fmt(_median([_cpu_per_nhi(p) for p in runs]), 'ms', 0)}, {' / '.join(encodings)}",
        )
        for p in runs:
            if p.failed or p.timed_out or p.done < n:
                result.row(
                    f"provisioning {n}, {name}: incomplete", f"{p.done}/{n}, {p.failed} failed"
                )
        if name == "off":
            continue
        slowdown = 1 - median / base if base == base and base else float("nan")
        target = f"<= {TARGET_SLOWDOWN:.0%}" if "encryption" in name else ""
        verdict = verdict_at_most(slowdown * 100, TARGET_SLOWDOWN * 100, "%") if target else ""
        result.row(
            f"provisioning {n}, {name}: slower than off by",
            fmt(slowdown * 100, "%", 1),
            target,
            verdict,
        )
    if not tracing_available():
        result.note(
            "Tracing variants not measured: this build has no NHI_OTEL_EXPORTER_OTLP_ENDPOINT "
            "setting. They run as soon as it exists (exporting to a local OTLP/HTTP sink)."
        )
    else:
        result.note(
            f"Tracing exported to a local OTLP/HTTP sink that accepted {sink.requests} export "
            f"requests ({sink.bytes:,} bytes) during the run."
        )
    result.note(
        "Load: bench/provisioning.py's (`iam_role` requests through the API, "
        f"{load.CONCURRENCY} in flight, request -> `active` from the audit trail). Before each "
        "measurement the worker and the API are restarted with the variant's settings and "
        f"warmed up with {WARM_UP} untimed NHIs. Variants alternate within each round in a "
        "rotated order; the figure is the median over rounds. On a 2-core machine shared with "
        "other work, differences under about 10 % between single rounds are noise: compare "
        "the medians, and CPU per NHI, which moves less."
    )
    result.note(
        "`input stored as`: the encoding of a provisioning run's input in Temporal's history, "
        "read back without the codec (`binary/encrypted` when encryption was on)."
    )
    result.data = {
        "n": n,
        "rounds": rounds,
        "variants": {k: [p.as_dict() for p in v] for k, v in phases.items()},
        "otlp_sink": {"requests": sink.requests, "bytes": sink.bytes},
        "machine_cpu_key": MACHINE,
    }
