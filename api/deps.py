"""FastAPI dependencies as typed aliases, and the state one app instance shares."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from slack_sdk import WebClient
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client

from activities.providers.base import TaskCredentialProvider
from activities.providers.registry import close_task_providers
from models.enums import Platform
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.infra.temporal_client import connect
from nhi.services.auth import (
    TOKEN_PREFIX,
    OidcVerifier,
    Principal,
    Unauthenticated,
    WorkloadVerifier,
    principal_from_jwt,
    principal_from_token,
)

T = TypeVar("T")


class TemporalUnavailable(RuntimeError):
    """Temporal could not be reached; the request changed nothing."""


@dataclass
class AppState:
    """What one app instance shares across requests."""

    settings: Settings
    sessions: sessionmaker[Session]
    slack: WebClient | None = None
    oidc: OidcVerifier | None = None
    # Workload identities bound to agents (NHI_WORKLOAD_OIDC_ISSUERS); None: none trusted.
    workloads: WorkloadVerifier | None = None
    client: Client | None = None
    # Task-credential issuers with their platform clients, built on first use
    # (api/routes/credentials.py): an API that never issues holds no platform client.
    task_issuers: dict[Platform, TaskCredentialProvider] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def temporal(self) -> Client:
        """The Temporal client, connected on first use so the API starts while Temporal is down."""
        if self.client is None:
            async with self._lock:
                if self.client is None:
                    try:
                        self.client = await connect(self.settings)
                    except Exception as err:
                        raise TemporalUnavailable(
                            f"Temporal at {self.settings.temporal_address} is unreachable"
                        ) from err
        return self.client

    async def db(self, fn: Callable[[Session], T]) -> T:
        """Run `fn` in one transaction on a worker thread (the DB driver is blocking)."""

        def call() -> T:
            with transaction(self.sessions) as session:
                return fn(session)

        return await run_in_threadpool(call)


def close_task_issuers(state: AppState) -> None:
    """Close the task-credential issuers built for this app, if any (on shutdown)."""
    issuers, state.task_issuers = state.task_issuers, None
    close_task_providers(issuers or {})


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.nhi
    return state


def _session(state: Annotated[AppState, Depends(_state)]) -> Iterator[Session]:
    with transaction(state.sessions) as session:
        yield session


def _principal(request: Request, state: Annotated[AppState, Depends(_state)]) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("send 'Authorization: Bearer <token>' (an nhi_ token or an OIDC JWT)")
    token = token.strip()
    if token.startswith(TOKEN_PREFIX):
        with transaction(state.sessions) as session:
            return principal_from_token(session, token)
    return principal_from_jwt(state.sessions, token, state.oidc, state.workloads)


def principal_of(request: Request, state: AppState) -> Principal:
    """The caller of a request, authenticated as every route does it (for middleware)."""
    return _principal(request, state)


State = Annotated[AppState, Depends(_state)]
CurrentPrincipal = Annotated[Principal, Depends(_principal)]
# On every /v1 router, so no endpoint can forget to authenticate (FastAPI caches the call, so a
# route that also asks for CurrentPrincipal does not authenticate twice).
authenticated = Depends(_principal)
# "function" scope commits before the response is sent: a client that got 201 can read what it
# created at once, and a failed commit is an error response, not a lost write after a 201.
SessionDep = Annotated[Session, Depends(_session, scope="function")]
