"""The HTTP API: `create_app(settings)` builds it; `uvicorn api.app:app` serves it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from api import errors, health
from api.deps import AppState, close_task_issuers
from api.idempotency import IdempotencyMiddleware
from api.routes import (
    activity,
    agents,
    approvals,
    codec,
    credentials,
    findings,
    footprint,
    incidents,
    invokers,
    lifecycle,
    nhis,
    policies,
    slack,
    sweeps,
    targets,
    tokens,
    workloads,
)
from api.ui import install as install_ui
from nhi.infra.config import Settings, get_settings
from nhi.infra.db import PING_IDLE_S, make_engine, make_sessionmaker
from nhi.infra.logging import configure
from nhi.infra.slack_client import make_slack_client
from nhi.infra.tracing import flush_tracing, instrument_app, setup_tracing
from nhi.services.auth import OidcVerifier, WorkloadVerifier


def create_app(
    settings: Settings | None = None,
    sessions: sessionmaker[Session] | None = None,
    *,
    sdk_metrics: bool = False,
) -> FastAPI:
    """An app bound to `settings`; tests may pass their own sessionmaker. `sdk_metrics`
    exports the Temporal SDK's metrics on `/metrics` (it sets the process's default Temporal
    runtime, so only the served app asks for it)."""
    settings = settings or get_settings()
    # Before the app's Temporal client exists: it gets the tracing interceptor only then.
    setup_tracing(settings, "nhi-api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = None
        own_sessions = sessions
        if own_sessions is None:
            engine = make_engine(
                settings.require_database_url(),
                pool_size=settings.api_database_pool_size,
                ping_idle_s=PING_IDLE_S,
            )
            own_sessions = make_sessionmaker(engine)
            # Only the engine this app made itself: tests that hand the app their own
            # sessions keep their engine's pool off its page.
            app.state.ops.pool.watch(engine)
        app.state.nhi = AppState(
            settings=settings,
            sessions=own_sessions,
            slack=make_slack_client(settings),
            oidc=OidcVerifier(settings) if settings.oidc_issuer else None,
            workloads=WorkloadVerifier(settings) if settings.workload_oidc_issuers else None,
        )
        await app.state.ops.start(app.state.nhi, sdk_metrics=sdk_metrics)
        yield
        await app.state.ops.stop()
        # Task issuers drop what they keep on the platforms (Postgres stock roles).
        await run_in_threadpool(close_task_issuers, app.state.nhi)
        flush_tracing()
        if engine is not None:
            engine.dispose()

    app = FastAPI(
        title="nhi-lifecycle",
        version="0.1.0",
        summary="Governed lifecycle for the non-human identities AI agents use.",
        lifespan=lifespan,
    )
    # A retried state-changing request is answered, not applied twice (api/idempotency.py).
    app.add_middleware(IdempotencyMiddleware)
    # After it, so the body limit and the JSON 500 wrap it too (the last added is outermost).
    errors.install(app)
    app.include_router(agents.router)
    app.include_router(nhis.router)
    app.include_router(credentials.router)
    app.include_router(policies.router)
    app.include_router(lifecycle.router)
    app.include_router(slack.router)
    app.include_router(tokens.router)
    app.include_router(sweeps.router)
    app.include_router(targets.router)
    app.include_router(invokers.router)
    app.include_router(workloads.router)
    app.include_router(footprint.router)
    app.include_router(activity.router)
    app.include_router(findings.router)
    app.include_router(approvals.router)
    app.include_router(incidents.router)
    # The web dashboard at /ui/ (issue 18): the same services and auth rules as /v1.
    install_ui(app)
    # /codec/encode and /codec/decode for the Temporal Web UI (and their CORS, when configured).
    codec.install(app, settings)

    # /healthz, /readyz, /metrics and the request metrics (outermost middleware: added last).
    health.install(app, settings)
    # A span per request (when NHI_OTEL_EXPORTER_OTLP_ENDPOINT is set), parent of the
    # workflow starts and updates the request makes.
    instrument_app(app)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn api.app:app` resolves the app lazily, so importing this module has no side effects.
    if name == "app":
        settings = get_settings()
        configure(settings.log_level, settings.log_format)
        return create_app(settings, sdk_metrics=True)
    raise AttributeError(name)
