"""The worker and the API as real processes, started the way a deployment starts them
(`python worker.py`, `uvicorn api.app:app`), for the health and metrics tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.helpers import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent


def service_env(**values: str) -> dict[str, str]:
    """This process's environment plus `values` (NHI_* settings), without stray NHI_* ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHI_")}
    env.update(values)
    return env


class Proc:
    """A child process listening on `port`."""

    def __init__(self, popen: subprocess.Popen[bytes], port: int) -> None:
        self.popen = popen
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


@contextmanager
def worker_process(**settings: str) -> Iterator[Proc]:
    """`python worker.py` with its health and metrics server on a free port."""
    port = free_port()
    env = service_env(NHI_WORKER_HTTP_PORT=str(port), **settings)
    popen = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], env=env, cwd=ROOT)
    proc = Proc(popen, port)
    try:
        wait_port(port, timeout=60, proc=popen)
        yield proc
    finally:
        proc.stop()


@contextmanager
def api_process(**settings: str) -> Iterator[Proc]:
    """`uvicorn api.app:app`, the deployed entrypoint, on a free port."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--log-level", "warning"]
    popen = subprocess.Popen(argv, env=service_env(**settings), cwd=ROOT)
    proc = Proc(popen, port)
    try:
        wait_port(port, timeout=60, proc=popen)
        yield proc
    finally:
        proc.stop()


# ---- reading the Prometheus text format -------------------------------------------------------
# Label values may hold braces (route templates), so a label set ends only outside quotes.
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{((?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_SUFFIXES = ("", "_total", "_created", "_bucket", "_count", "_sum")


def samples(page: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) per sample line."""
    found = []
    for line in page.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        labels = dict(_LABEL.findall(match.group(3) or ""))
        found.append((match.group(1), labels, float(match.group(4))))
    return found


def value(page: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there is none)."""
    return sum(
        v
        for n, ls, v in samples(page)
        if n == name and all(ls.get(k) == w for k, w in labels.items())
    )


def names(page: str) -> set[str]:
    """Every metric name the page exposes: sampled ones, and declared ones with every suffix
    their samples could carry (a labelled counter has no sample before its first event)."""
    exposed = {n for n, _, _ in samples(page)}
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            declared = line.split()[2]
            exposed |= {declared + suffix for suffix in _SUFFIXES}
    return exposed
