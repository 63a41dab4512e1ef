"""The worker's own small HTTP server: `/healthz`, `/readyz` and `/metrics` on
`NHI_WORKER_HTTP_HOST:NHI_WORKER_HTTP_PORT`.

A few lines of asyncio instead of a web framework: three GET endpoints, answered on the
worker's event loop next to the Temporal worker they report on, one request per connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client
from temporalio.worker import Worker

from nhi.infra import health
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.infra.metrics import MetricsPage

log = logging.getLogger("nhi.worker.http")

# A probe or a scrape sends a few hundred bytes of headers; anything slower or larger is not one.
READ_TIMEOUT = 5.0
MAX_HEAD = 16 * 1024

Answer = tuple[int, str, bytes]


class WorkerHttp:
    """Health and metrics of one worker process."""

    def __init__(
        self,
        settings: Settings,
        worker: Worker,
        client: Client,
        sessions: sessionmaker[Session],
        registry: CollectorRegistry,
        sdk_url: str | None = None,
    ) -> None:
        self._settings = settings
        self._worker = worker
        self._client = client
        self._sessions = sessions
        self._page = MetricsPage(registry, sdk_url)
        self._server: asyncio.Server | None = None
        self._routes: dict[str, Callable[[], Awaitable[Answer]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
        }

    @property
    def port(self) -> int | None:
        """The bound port (useful when configured as an ephemeral one), None when not serving."""
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> bool:
        """Listen; False when turned off (port 0) or the address cannot be bound. A worker that
        cannot serve health still polls: its readiness probe failing says what is wrong."""
        port = self._settings.worker_http_port
        if port == 0:
            return False
        host = self._settings.worker_http_host
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        except OSError as err:
            log.error("worker health/metrics server not started on %s:%s: %s", host, port, err)
            return False
        log.info(
            "worker health and metrics on http://%s:%s (/healthz /readyz /metrics)", host, port
        )
        return True

    async def close(self) -> None:
        """Stop listening and close the page's SDK client."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._page.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            status, content_type, body = await self._answer(method, path)
            reason = HTTPStatus(status).phrase
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a client that hung up or sent no request gets nothing
        except Exception:
            log.exception("worker health/metrics request failed")
        finally:
            writer.close()

    async def _answer(self, method: str, path: str) -> Answer:
        if method not in ("GET", "HEAD"):
            return _json(405, {"detail": "only GET"})
        route = self._routes.get(path)
        if route is None:
            return _json(404, {"detail": "not found; try /healthz, /readyz or /metrics"})
        return await route()

    async def _healthz(self) -> Answer:
        # Liveness: the event loop answers. A worker whose Temporal worker has stopped for good
        # (fatal poll error) is not alive either: restarting it is the fix.
        if self._worker.is_shutdown:
            return _json(503, {"status": "worker stopped"})
        return _json(200, {"status": "ok"})

    async def _readyz(self) -> Answer:
        def select_one() -> None:
            with transaction(self._sessions) as session:
                session.execute(text("SELECT 1"))

        async def database() -> None:
            await asyncio.to_thread(select_one)

        async def temporal() -> None:
            await health.temporal_answers(self._client)

        async def polling() -> str:
            if not self._worker.is_running:
                raise health.NotReady("the Temporal worker is not running")
            fresh = health.poller_window(self._settings)
            found = await health.recent_pollers(
                self._client, self._settings.temporal_task_queue, fresh
            )
            return health.require_pollers(found, fresh, identity=self._client.identity)

        db_check, temporal_check = await asyncio.gather(
            health.timed("database", database), health.timed("temporal", temporal)
        )
        if temporal_check.state == health.UP:
            poll_check = await health.timed("polling", polling)
        else:
            poll_check = health.skipped("polling", "Temporal is unreachable")
        status, body = health.report([db_check, temporal_check, poll_check])
        return _json(status, body)

    async def _metrics(self) -> Answer:
        return 200, CONTENT_TYPE_LATEST, await self._page.render()


def _json(status: int, body: object) -> Answer:
    return status, "application/json", json.dumps(body).encode()
