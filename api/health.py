"""The API's operational endpoints (`/healthz`, `/readyz`, `/metrics`), its request metrics and
the background task that keeps the inventory gauges fresh."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import AppState, State
from nhi.infra import health
from nhi.infra.config import Settings
from nhi.infra.metrics import (
    DatabasePoolMetrics,
    HttpMetrics,
    InventoryMetrics,
    MetricsPage,
    install_sdk_runtime,
    new_registry,
)

log = logging.getLogger("nhi.api.ops")

router = APIRouter(tags=["health"])
# Requests that match no route are counted under one label, not their path: a scanner probing
# random URLs must not create a series per URL.
UNMATCHED = "unmatched"


class ApiOps:
    """Metrics registry, inventory refresher and SDK metrics source of one app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = new_registry()
        self.http = HttpMetrics(self.registry)
        self.inventory = InventoryMetrics(self.registry, settings.sweep_interval_seconds)
        self.page = MetricsPage(self.registry, None)
        self.pool = DatabasePoolMetrics(self.registry)
        self._task: asyncio.Task[None] | None = None

    async def start(self, state: AppState, *, sdk_metrics: bool) -> None:
        """Export the SDK's metrics (before any Temporal client exists) and start refreshing."""
        if sdk_metrics:
            self.page.sdk_url = install_sdk_runtime()
        self._task = asyncio.create_task(self._loop(state), name="nhi-metrics-refresh")

    async def stop(self) -> None:
        """Stop the refresher and close the page's SDK client."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.page.aclose()

    async def _loop(self, state: AppState) -> None:
        while True:
            await self.refresh(state)
            await asyncio.sleep(self.settings.metrics_refresh_seconds)

    async def refresh(self, state: AppState) -> None:
        """Recompute the inventory gauges and the poller counts; failures keep the last values
        and are counted, never raised."""
        up = self.inventory.dependency_up
        try:
            snap = await state.db(self.inventory.refresh)
        except Exception:
            log.warning("inventory metrics refresh failed", exc_info=True)
            self.inventory.refresh_errors.inc()
            up.labels("database").set(0)
        else:
            up.labels("database").set(1)
            log.debug("inventory metrics refreshed in %.3f s", snap.seconds)
        try:
            client = await asyncio.wait_for(state.temporal(), health.CHECK_TIMEOUT)
            found = await health.recent_pollers(
                client, self.settings.temporal_task_queue, health.poller_window(self.settings)
            )
        except Exception as err:
            log.warning("task queue pollers unknown: %s", type(err).__name__)
            up.labels("temporal").set(0)
            # Nothing seen is reported as nothing polling: the alert must fire either way.
            self.inventory.set_pollers(dict.fromkeys(health.TASK_TYPES, 0))
        else:
            up.labels("temporal").set(1)
            self.inventory.set_pollers({kind: len(ids) for kind, ids in found.items()})


def install(app: FastAPI, settings: Settings) -> ApiOps:
    """Add the endpoints and the request-metrics middleware (outermost, so every answer is
    counted); the app's lifespan starts and stops the returned object."""
    ops = ApiOps(settings)
    app.state.ops = ops
    app.add_middleware(RequestMetrics, metrics=ops.http)
    app.include_router(router)
    return ops


class RequestMetrics:
    """Pure ASGI middleware: counts each request by route template and status code."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception that escapes is answered 500 by the server

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            # The router stores the matched route in the scope it was given (this one).
            route: BaseRoute | None = scope.get("route")
            template = str(getattr(route, "path", "")) or UNMATCHED
            self.metrics.observe(scope["method"], template, status, time.perf_counter() - started)


def _ops(request: Request) -> ApiOps:
    ops: ApiOps = request.app.state.ops
    return ops


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process serves requests. No dependency is checked, so a database or
    Temporal outage never gets healthy API processes restarted (`/readyz` reports those)."""
    return {"status": "ok"}


# Out of the OpenAPI schema: operational endpoints, and a 503 here is an answer, not a fault.
@router.get("/readyz", include_in_schema=False)
async def readyz(state: State) -> JSONResponse:
    """Readiness: the inventory database, Temporal, and a worker polling the task queue."""
    settings = state.settings

    async def database() -> None:
        await state.db(lambda s: s.execute(text("SELECT 1")))

    async def temporal() -> None:
        await health.temporal_answers(await state.temporal())

    db_check, temporal_check = await asyncio.gather(
        health.timed("database", database), health.timed("temporal", temporal)
    )
    if temporal_check.state == health.UP:

        async def worker() -> str:
            client = await state.temporal()
            fresh = health.poller_window(settings)
            found = await health.recent_pollers(client, settings.temporal_task_queue, fresh)
            return health.require_pollers(found, fresh)

        worker_check = await health.timed("worker", worker)
    else:
        worker_check = health.skipped("worker", "Temporal is unreachable")
    status, body = health.report([db_check, temporal_check, worker_check])
    return JSONResponse(body, status_code=status)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format: our metrics, then the Temporal SDK's."""
    ops = _ops(request)
    return Response(await ops.page.render(), media_type=CONTENT_TYPE_LATEST)
