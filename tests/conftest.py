"""Real services for the suite: Postgres (local server, else embedded), a moto server over HTTP,
the Temporal time-skipping test server and the Temporal dev server."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import Settings
from nhi.infra.db import make_engine, make_sessionmaker, upgrade_head
from nhi.infra.embedded_postgres import LOCAL_ADMIN_DSN, EmbeddedPostgres, local_server_reachable
from nhi.rules import search_attributes
from tests.bao_server import BaoServer
from tests.helpers import free_port, start_moto
from tests.pg_cluster import PgCluster
from worker import build_worker

if TYPE_CHECKING:
    from tests.github_emulator import GithubEmulator


def binary(name: str) -> str:
    import sys

    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(found).exists(), f"{name} missing: `make test` installs it"
    return found


class Databases:
    """Creates throwaway databases on whichever Postgres this machine offers."""

    def __init__(self, tmp: Path) -> None:
        self.embedded: EmbeddedPostgres | None = None
        self.created: list[str] = []
        if not local_server_reachable():
            self.embedded = EmbeddedPostgres(tmp / "pgdata")

    def new(self, prefix: str = "nhi_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        if self.embedded is not None:
            self.embedded.create_database(name)
            return self.embedded.url(name)
        with psycopg.connect(LOCAL_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.created.append(name)
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            return
        with psycopg.connect(LOCAL_ADMIN_DSN, autocommit=True) as conn:
            for name in self.created:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


@pytest.fixture(scope="session")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    dbs = Databases(tmp_path_factory.mktemp("postgres"))
    yield dbs
    dbs.close()


@pytest.fixture(scope="session")
def database_url(databases: Databases) -> str:
    url = databases.new()
    upgrade_head(url)  # the schema only ever comes from the migrations
    return url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    # moto accepts any credentials, but boto3 needs some to sign requests with.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    proc = start_moto(port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def github_app(moto_url: str) -> Iterator[GithubApp]:
    """A GitHub emulator (tests/github_emulator.py) with one app installed on `acme`, its
    private key in moto's Secrets Manager as a deployment keeps it."""
    import boto3

    from tests.github_emulator import GithubEmulator, new_app_key

    private, public = new_app_key()
    app = GithubApp(app_id="4242", installation_id=77, private_key=private)
    boto3.client("secretsmanager", endpoint_url=moto_url, region_name="us-east-1").create_secret(
        Name=app.key_secret, SecretString=private
    )
    with GithubEmulator(app.app_id, public) as emulator:
        emulator.add_installation(app.installation_id, "acme", GITHUB_APP_PERMISSIONS)
        for name in ("acme/api", "acme/web"):
            emulator.add_repository(name, {"README.md": b"# " + name.encode()})
        app.emulator = emulator
        yield app


@pytest.fixture(scope="session")
def settings(database_url: str, moto_url: str, github_app: GithubApp, bao: BaoServer) -> Settings:
    return Settings(
        # Workers get the `vault` platform and `vault_kv` delivery (tests/test_vault.py).
        vault_addr=bao.addr,
        vault_token=SecretStr(bao.token),
        github_api_url=github_app.emulator.url,
        github_app_id=github_app.app_id,
        github_app_private_key_secret=github_app.key_secret,
        github_installation_id=github_app.installation_id,
        database_url=database_url,
        aws_endpoint_url=moto_url,
        aws_region="us-east-1",
        temporal_task_queue=f"nhi-test-{uuid.uuid4().hex[:8]}",
        # The suite's Postgres clusters listen on loopback without TLS, as `nhi dev` does.
        target_allowed_hosts=["127.0.0.1", "localhost", "db", "db.internal"],
        dev_mode=True,
        # The suite's agents share one runtime principal (tests/helpers.TRUST); the reuse
        # check is tested with it on in tests/test_footprint.py.
        identity_reuse_check=False,
        # Every test worker (build_worker with these settings or a copy of them) fails a run
        # whose history no longer replays, instead of retrying its workflow task until the
        # test times out: a nondeterminism fails the test that caused it, loudly.
        worker_fail_on_nondeterminism=True,
    )


@pytest.fixture(scope="session")
def aws(settings: Settings) -> AwsClients:
    return make_aws_clients(settings)


@pytest_asyncio.fixture
async def ts_env() -> AsyncIterator[WorkflowEnvironment]:
    """A fresh Temporal time-skipping test server per test (about 0.1 s to start).

    Time skipping is global to a server, and the lifecycles a test leaves running on a queue
    whose worker has gone would hold its clock back; a fresh server also starts at real time,
    so virtual and inventory timestamps agree."""
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter,
        test_server_existing_path=binary("temporal-test-server"),
    )
    # The test server refuses unregistered search attributes too, and registers them through
    # the operator API (it cannot list them: `nhi temporal setup` needs a real server).
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                k.name: IndexedValueType.ValueType(k.indexed_value_type.value)
                for k in search_attributes.KEYS
            },
        )
    )
    yield env
    await env.shutdown()


@pytest_asyncio.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's dev server in real time (API, CLI, crash and leak tests)."""
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=binary("temporal"),
        search_attributes=search_attributes.KEYS,
    )
    yield env
    await env.shutdown()


def dev_address(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


GITHUB_APP_PERMISSIONS = {"contents": "write", "pull_requests": "write", "metadata": "read"}


@dataclass
class GithubApp:
    """The suite's GitHub App: its id, installation, key (test-only) and emulator."""

    app_id: str
    installation_id: int
    private_key: str = field(repr=False)
    key_secret: str = "nhi-test/github-app-private-key"
    emulator: GithubEmulator = field(init=False, repr=False)


class Service:
    """The API over real HTTP plus a worker, on the Temporal dev server: the service as deployed."""

    def __init__(
        self,
        settings: Settings,
        url: str,
        env: WorkflowEnvironment,
        sessions: sessionmaker[Session],
    ) -> None:
        self.settings = settings
        self.url = url
        self.env = env
        self.sessions = sessions

    def token(
        self,
        name: str,
        role: str = "platform",
        *,
        teams: list[str] | None = None,
        email: str | None = None,
    ) -> str:
        """A bearer token for `name` (created on first use)."""
        from tests.helpers import mint

        return mint(self.sessions, name, role, teams=teams, email=email)


@pytest_asyncio.fixture(scope="session")
async def service(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> AsyncIterator[Service]:
    from api.app import create_app
    from tests.helpers import ApiServer

    svc_settings = settings.model_copy(
        update={
            "temporal_address": dev_address(dev_env),
            "temporal_task_queue": f"nhi-svc-{uuid.uuid4().hex[:8]}",
        }
    )
    worker = build_worker(dev_env.client, svc_settings, sessions, aws)
    async with worker:
        with ApiServer(create_app(svc_settings)) as server:
            yield Service(svc_settings, server.url, dev_env, sessions)


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaoServer]:
    """A real OpenBao dev server (tests/bao_server.py), AppRole enabled, KV v2 at `secret/`."""
    server = BaoServer(binary("bao"), tmp_path_factory.mktemp("bao") / "bao.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster() -> Iterator[PgCluster]:
    """A scram-sha-256 Postgres cluster playing a company database (tests/pg_cluster.py)."""
    pg = PgCluster()
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()
