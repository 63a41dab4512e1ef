"""`/healthz` and `/readyz` of the API and the worker follow their dependencies: a Temporal
server of the test's own that is stopped and started again, and a real `python worker.py` that
starts, polls and is killed."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from nhi.infra.config import Settings
from tests.conftest import binary
from tests.helpers import ApiServer, eventually, free_port
from tests.ops_procs import worker_process

LONG_POLL_S = 5
POLL_FRESH_S = 3 * LONG_POLL_S


class OwnTemporal:
    """A dev server on a fixed port that the test can stop and start again (its state kept in
    a database file, as a real cluster keeps it across a restart)."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._db = str(tmp / "temporal.db")
        self.env: WorkflowEnvironment | None = None

    async def start(self) -> None:
        self.env = await WorkflowEnvironment.start_local(
            port=self.port,
            data_converter=pydantic_data_converter,
            dev_server_existing_path=binary("temporal"),
            dev_server_database_filename=self._db,
            # Idle polls end after 5 s instead of a minute, so a live worker's last poll is at
            # most 5 s old and a killed one is told apart in seconds (NHI_WORKER_POLL_FRESH_SECONDS).
            dev_server_extra_args=[
                "--dynamic-config-value",
                f'matching.longPollExpirationInterval="{LONG_POLL_S}s"',
            ],
        )

    async def stop(self) -> None:
        if self.env is not None:
            await self.env.shutdown()
            self.env = None


@pytest_asyncio.fixture
async def temporal(tmp_path: Path) -> AsyncIterator[OwnTemporal]:
    server = OwnTemporal(tmp_path)
    await server.start()
    yield server
    await server.stop()


async def _ready(url: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=15) as http:
        response = await http.get(url + "/readyz")
        return response.status_code, response.json()


def _state(body: dict[str, Any], name: str) -> str:
    return str(body["checks"][name]["state"])


async def _expect(url: str, status: int, **states: str) -> dict[str, Any]:
    """Poll /readyz until it answers `status` with the named checks in the given states."""

    async def check() -> dict[str, Any]:
        code, body = await _ready(url)
        assert code == status, (code, body)
        for name, state in states.items():
            assert _state(body, name) == state, (name, body)
        return body

    return await eventually(check, timeout=POLL_FRESH_S + 60, interval=1.0)


async def _alive(url: str) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(url + "/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.slow
async def test_readyz_follows_temporal_and_the_worker(
    temporal: OwnTemporal, settings: Settings, database_url: str, moto_url: str
) -> None:
    queue = f"nhi-ready-{uuid.uuid4().hex[:8]}"
    api_settings = settings.model_copy(
        update={
            "temporal_address": temporal.address,
            "temporal_task_queue": queue,
            "worker_poll_fresh_seconds": POLL_FRESH_S,
        }
    )
    with ApiServer(create_app(api_settings)) as api:
        # Temporal answers, but nothing polls the queue: not ready, and the worker is named.
        body = await _expect(api.url, 503, database="up", temporal="up", worker="down")
        assert body["down"] == ["worker"]
        assert "no worker polled" in body["checks"]["worker"]["detail"]
        for check in body["checks"].values():
            assert isinstance(check["latency_ms"], float) and check["latency_ms"] >= 0
        await _alive(api.url)

        with worker_process(
            NHI_DATABASE_URL=database_url,
            NHI_TEMPORAL_ADDRESS=temporal.address,
            NHI_TEMPORAL_TASK_QUEUE=queue,
            NHI_AWS_ENDPOINT_URL=moto_url,
            NHI_WORKER_POLL_FRESH_SECONDS=str(POLL_FRESH_S),
        ) as worker:
            # A worker polls: both are ready.
            await _expect(api.url, 200, database="up", temporal="up", worker="up")
            body = await _expect(worker.url, 200, database="up", temporal="up", polling="up")
            await _alive(worker.url)

            # Temporal stops: both say so, by name, and both are still alive.
            await temporal.stop()
            body = await _expect(api.url, 503, temporal="down", worker="unknown")
            assert body["down"] == ["temporal", "worker"]
            assert _state(body, "database") == "up"
            body = await _expect(worker.url, 503, temporal="down", polling="unknown")
            await _alive(api.url)
            await _alive(worker.url)

            # Temporal is back: the same processes recover without a restart.
            await temporal.start()
            await _expect(worker.url, 200, temporal="up", polling="up")
            await _expect(api.url, 200, temporal="up", worker="up")

            # The worker dies without a goodbye: once its last poll is older than a live
            # worker's can be, the API names the worker again.
            worker.stop(signal.SIGKILL)
            body = await _expect(api.url, 503, temporal="up", worker="down")
            assert body["down"] == ["worker"]

        # And a worker that returns makes it ready again.
        with worker_process(
            NHI_DATABASE_URL=database_url,
            NHI_TEMPORAL_ADDRESS=temporal.address,
            NHI_TEMPORAL_TASK_QUEUE=queue,
            NHI_AWS_ENDPOINT_URL=moto_url,
            NHI_WORKER_POLL_FRESH_SECONDS=str(POLL_FRESH_S),
        ):
            await _expect(api.url, 200, worker="up")


async def test_readyz_names_the_database_when_it_refuses(
    temporal: OwnTemporal, settings: Settings
) -> None:
    # A database nobody listens on: the API still starts and lives, and /readyz names it.
    dead = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/nothing"
    api_settings = settings.model_copy(
        update={"database_url": dead, "temporal_address": temporal.address}
    )
    with ApiServer(create_app(api_settings)) as api:
        code, body = await _ready(api.url)
        assert code == 503
        assert _state(body, "database") == "down"
        assert _state(body, "temporal") == "up"
        assert "database" in body["down"]
        # The answer is unauthenticated: it names the failure, never the host or the user.
        assert "nobody" not in str(body) and "127.0.0.1" not in str(body)
        await _alive(api.url)


async def test_worker_http_answers_only_its_three_paths(
    temporal: OwnTemporal, database_url: str, moto_url: str
) -> None:
    with worker_process(
        NHI_DATABASE_URL=database_url,
        NHI_TEMPORAL_ADDRESS=temporal.address,
        NHI_TEMPORAL_TASK_QUEUE=f"nhi-http-{uuid.uuid4().hex[:8]}",
        NHI_AWS_ENDPOINT_URL=moto_url,
    ) as worker:
        assert (await asyncio.to_thread(worker.get, "/nope")).status_code == 404
        response = await asyncio.to_thread(lambda: httpx.post(worker.url + "/healthz", timeout=10))
        assert response.status_code == 405
        metrics = await asyncio.to_thread(worker.get, "/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert "nhi_activity" in metrics.text
