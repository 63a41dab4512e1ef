"""`nhi dev`: the whole service on one machine, on embedded defaults.

Starts (or uses, where configured) Postgres, the Temporal dev server with its Web UI, a moto
server standing in for AWS, applies migrations, then runs the worker and the API as child
processes with the same settings production uses. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO
from urllib.parse import quote

import httpx
import psycopg
from sqlalchemy import select

from models.enums import Role
from models.orm import ApiToken
from nhi.infra.config import Settings
from nhi.infra.db import make_engine, make_sessionmaker, transaction, upgrade_head
from nhi.infra.embedded_postgres import EmbeddedPostgres
from nhi.infra.logging import configure
from nhi.rules import search_attributes
from nhi.services.auth import issue_token, revoke_token

READY_TIMEOUT = 60.0

# A demo database for `postgres_role`, set up like a company database on the embedded server:
# an admin role with CREATEROLE (not superuser) that may pass on read and write on `docs`.
DEMO_TARGET = "demo"
DEMO_DATABASE = "nhi_demo"
# The variable holding its admin password: target passwords come only from NHI_TARGET_PASSWORD_*.
DEMO_ADMIN_VAR = "NHI_TARGET_PASSWORD_DEMO"
DEMO_SQL = """
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'nhi_admin') THEN
    CREATE ROLE nhi_admin LOGIN CREATEROLE;
  END IF;
END $$;
GRANT pg_signal_backend TO nhi_admin;
GRANT pg_read_all_stats TO nhi_admin;
CREATE SCHEMA IF NOT EXISTS docs;
CREATE TABLE IF NOT EXISTS docs.articles (id int PRIMARY KEY, title text NOT NULL);
CREATE TABLE IF NOT EXISTS docs.faq (id int PRIMARY KEY, question text NOT NULL);
INSERT INTO docs.articles VALUES (1, 'Onboarding'), (2, 'Security policy') ON CONFLICT DO NOTHING;
INSERT INTO docs.faq VALUES (1, 'How do I reset my password?') ON CONFLICT DO NOTHING;
GRANT USAGE ON SCHEMA docs TO nhi_admin WITH GRANT OPTION;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA docs TO nhi_admin WITH GRANT OPTION;
"""


class DevError(RuntimeError):
    """Something `nhi dev` needs is missing or busy."""


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def _require_free(host: str, port: int, what: str) -> None:
    if _port_open(host, port):
        raise DevError(
            f"{what}: {host}:{port} is already in use (stop what runs there, or set its NHI_ port)"
        )


def _require_distinct(ports: dict[str, int]) -> None:
    """Two services given one port would start, one of them would fail to bind, and the
    other would answer in its place (a 404 from moto for the API's /healthz): say so first."""
    seen: dict[int, str] = {}
    for what, port in ports.items():
        if port in seen:
            raise DevError(
                f"{seen[port]} and {what} are both set to port {port}: give each its own"
            )
        seen[port] = what


def _wait_port(
    host: str, port: int, what: str, proc: subprocess.Popen[bytes], deadline: float
) -> None:
    while not _port_open(host, port):
        if proc.poll() is not None:
            raise DevError(
                f"{what} exited with code {proc.returncode} during start-up (see its log)"
            )
        if time.monotonic() > deadline:
            raise DevError(f"{what} did not open {host}:{port} in time")
        time.sleep(0.1)


def _wait_api(url: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Until the API answers its own /healthz. Something else on its port (a port one of the
    services picked for itself after the free-port check: the Temporal dev server takes
    random free ports for its HTTP API and metrics) answers too, while the API exits unable
    to bind: say that, not a 404."""
    while True:
        if proc.poll() is not None:
            raise DevError(
                f"API exited with code {proc.returncode} during start-up: is {url} taken by "
                "another process? (see its log)"
            )
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise DevError(f"API did not answer {url}/healthz in time")
        time.sleep(0.1)


def _tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        raise DevError(f"`{name}` not found: run `make dev` (it installs the dev extras)")
    return found


class Children:
    """Child processes in their own sessions, stopped in reverse start order."""

    def __init__(self, log_dir: Path) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._log_dir = log_dir
        self._logs: list[IO[bytes]] = []

    def start(
        self, name: str, cmd: list[str], env: dict[str, str], to_file: bool
    ) -> subprocess.Popen[bytes]:
        out: IO[bytes] | None = None
        if to_file:
            out = (self._log_dir / f"{name}.log").open("ab")
            self._logs.append(out)
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        self._procs.append((name, proc))
        return proc

    def first_exited(self) -> tuple[str, int] | None:
        for name, proc in self._procs:
            if proc.poll() is not None:
                return name, proc.returncode
        return None

    def stop(self) -> None:
        for _, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self._procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()


def _banner(
    settings: Settings, api_url: str, ui_url: str, aws: str, db: str, admin_token: str
) -> str:
    return f"""
nhi-lifecycle is running
  API            {api_url}   (OpenAPI: {api_url}/docs)
  Temporal UI    {ui_url}
  Temporal       {settings.temporal_address}
  AWS (moto)     {aws}
  Postgres       {db}
  logs           {settings.data_dir / "logs"}

Admin token for this instance (policies, tokens), also in {settings.data_dir / "admin-token"}:
  {admin_token}

Try it (in another terminal, from this directory):
  . .venv/bin/activate
  export NHI_TOKEN=$(cat {settings.data_dir / "admin-token"})
  export NHI_TOKEN=$(nhi tokens create -q --name "ana-$(date +%s)" --role platform \\
      --team support --email ana@example.com --ttl 7d)
  AGENT=$(nhi agents create -q --name support-bot --category chatbot --env dev \\
      --owner ana@example.com --backup-owner ben@example.com --team support \\
      --purpose "Answers customer tickets")
  nhi provision "$AGENT" --kind iam_role --ttl 30d \\
      --action s3:GetObject --resource 'arn:aws:s3:::support-kb/*' \\
      --trust-principal arn:aws:iam::123456789012:role/support-bot-runtime
  nhi provision "$AGENT" --kind postgres_role --target demo --ttl 7d \\
      --action SELECT --resource 'docs.*'
  nhi agents show "$AGENT"

Ctrl-C stops everything.
"""


def _demo_target(embedded: EmbeddedPostgres, env: dict[str, str]) -> None:
    """Create the demo database (idempotent) and register it as target `demo` for the worker
    and the API, unless NHI_POSTGRES_TARGETS already names one. The embedded server trusts
    local connections, so passwords (and VALID UNTIL) are not checked there: a demo of the
    shapes, not of the enforcement, which the tests prove on a scram-sha-256 cluster."""
    embedded.create_database(DEMO_DATABASE)
    with psycopg.connect(
        embedded.url(DEMO_DATABASE).replace("+psycopg", ""), autocommit=True
    ) as conn:
        conn.execute(DEMO_SQL)
        host, port = conn.info.host, conn.info.port
    targets = json.loads(env.get("NHI_POSTGRES_TARGETS") or "{}")
    targets.setdefault(
        DEMO_TARGET,
        {
            "dsn": f"postgresql://nhi_admin@{quote(host, safe='')}:{port}/{DEMO_DATABASE}",
            "password_env": DEMO_ADMIN_VAR,
        },
    )
    env["NHI_POSTGRES_TARGETS"] = json.dumps(targets)
    env.setdefault(DEMO_ADMIN_VAR, secrets.token_urlsafe(16))
    # Targets an admin registers locally may point at this machine: its loopback names and the
    # embedded server's socket directory (dev mode also lets them skip verify-full).
    env.setdefault(
        "NHI_TARGET_ALLOWED_HOSTS", json.dumps(["localhost", "127.0.0.1", "::1", str(host)])
    )


DEV_BAO_ADDRESS = "127.0.0.1:8200"


def _start_bao(children: Children, settings: Settings, env: dict[str, str], deadline: float) -> str:
    """`NHI_VAULT_DEV`: an OpenBao dev server (in memory, loopback only) with the AppRole
    auth method enabled, and the children pointed at it. Returns its address."""
    host, port = _split(DEV_BAO_ADDRESS)
    _require_free(host, port, "OpenBao")
    token = secrets.token_urlsafe(24)
    bao = children.start(
        "openbao",
        [
            _tool("bao"), "server", "-dev",
            f"-dev-root-token-id={token}", f"-dev-listen-address={DEV_BAO_ADDRESS}",
        ],
        env,
        to_file=True,
    )  # fmt: skip
    _wait_port(host, port, "OpenBao", bao, deadline)
    addr = f"http://{DEV_BAO_ADDRESS}"
    response = httpx.post(
        f"{addr}/v1/sys/auth/{settings.vault_approle_mount}",
        json={"type": "approle"},
        headers={"X-Vault-Token": token},
        timeout=10,
    )
    if response.status_code >= 400 and "already in use" not in response.text:
        raise DevError(f"OpenBao refused to enable AppRole: HTTP {response.status_code}")
    env.update(NHI_VAULT_ADDR=addr, NHI_VAULT_TOKEN=token)
    return addr


def _admin_token(db_url: str, data_dir: Path) -> str:
    """A fresh admin token for this local instance (earlier dev tokens are revoked), kept in
    `<data dir>/admin-token` with mode 0600."""
    engine = make_engine(db_url, pool_size=1)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            for old in session.scalars(
                select(ApiToken.name).where(
                    ApiToken.name.like("dev-admin-%"), ApiToken.revoked_at.is_(None)
                )
            ).all():
                revoke_token(session, old, "system:nhi-dev")
            _, token = issue_token(
                session,
                name=f"dev-admin-{int(time.time())}",
                role=Role.ADMIN,
                ttl="7d",
                created_by="system:nhi-dev",
            )
    finally:
        engine.dispose()
    path = data_dir / "admin-token"
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(token + "\n")
    return token


def run_dev(settings: Settings) -> int:
    """Start everything, wait for Ctrl-C or a child's exit, stop everything; the exit code."""
    configure(settings.log_level, settings.log_format)
    data_dir = settings.data_dir.resolve()
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    children = Children(log_dir)
    embedded: EmbeddedPostgres | None = None
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    deadline = started + READY_TIMEOUT
    try:
        t_host, t_port = _split(settings.temporal_address)
        _require_distinct(
            {
                "NHI_TEMPORAL_ADDRESS": t_port,
                "NHI_DEV_TEMPORAL_UI_PORT": settings.dev_temporal_ui_port,
                "NHI_API_PORT": settings.api_port,
                **(
                    {}
                    if settings.aws_endpoint_url
                    else {"NHI_DEV_MOTO_PORT": settings.dev_moto_port}
                ),
            }
        )
        _require_free(t_host, t_port, "Temporal")
        _require_free(t_host, settings.dev_temporal_ui_port, "Temporal Web UI")
        _require_free(settings.api_host, settings.api_port, "API")
        env = dict(os.environ)

        if settings.database_url:
            db_url = settings.database_url
            db_label = "NHI_DATABASE_URL"
        else:
            embedded = EmbeddedPostgres(data_dir / "pgdata")
            embedded.create_database("nhi")
            db_url = embedded.url("nhi")
            db_label = f"embedded, {data_dir / 'pgdata'}"

        temporal = children.start(
            "temporal",
            [
                _tool("temporal"), "server", "start-dev",
                "--ip", t_host, "--port", str(t_port),
                "--ui-port", str(settings.dev_temporal_ui_port),
                "--namespace", settings.temporal_namespace,
                # File-backed, so workflows survive a restart of `nhi dev`.
                "--db-filename", str(data_dir / "temporal.db"),
                "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=1",
                "--log-level", "warn",
                # The workflows' search attributes, so the Web UI can query them.
                *search_attributes.dev_server_flags(),
            ],
            env,
            to_file=True,
        )  # fmt: skip

        aws_endpoint = settings.aws_endpoint_url
        moto = None
        if aws_endpoint is None:
            _require_free("127.0.0.1", settings.dev_moto_port, "moto")
            moto = children.start(
                "moto",
                [
                    sys.executable,
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    str(settings.dev_moto_port),
                ],
                env,
                to_file=True,
            )
            aws_endpoint = f"http://127.0.0.1:{settings.dev_moto_port}"
            # moto accepts any credentials; boto3 still wants some to sign with.
            env.setdefault("AWS_ACCESS_KEY_ID", "testing")
            env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")

        if settings.vault_dev:
            _start_bao(children, settings, env, deadline)
        upgrade_head(db_url)
        if embedded is not None:
            _demo_target(embedded, env)
        env.update(
            NHI_DEV_MODE="true",
            NHI_DATABASE_URL=db_url,
            NHI_AWS_ENDPOINT_URL=aws_endpoint,
            NHI_AWS_REGION=settings.aws_region,
            NHI_LOG_LEVEL=settings.log_level,
        )
        _wait_port(t_host, t_port, "Temporal", temporal, deadline)
        if moto is not None:
            _wait_port("127.0.0.1", settings.dev_moto_port, "moto", moto, deadline)

        repo = Path(__file__).resolve().parent.parent
        children.start("worker", [sys.executable, str(repo / "worker.py")], env, to_file=False)
        api = children.start(
            "api",
            [
                sys.executable, "-m", "uvicorn", "api.app:app",
                "--host", settings.api_host, "--port", str(settings.api_port),
                "--log-level", settings.log_level.lower(),
            ],
            env,
            to_file=False,
        )  # fmt: skip
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        _wait_api(api_url, api, deadline)
        ui_url = f"http://{t_host}:{settings.dev_temporal_ui_port}"
        admin_token = _admin_token(db_url, data_dir)
        print(_banner(settings, api_url, ui_url, aws_endpoint, db_label, admin_token), flush=True)
        print(f"ready in {time.monotonic() - started:.1f}s", flush=True)

        while not stopping:
            exited = children.first_exited()
            if exited:
                print(f"{exited[0]} exited with code {exited[1]}; stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except DevError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        children.stop()
        if embedded is not None:
            with contextlib.suppress(Exception):
                embedded.stop()
