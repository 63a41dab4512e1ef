"""FastAPI dependencies as typed aliases, and the state one app instance shares."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from slack_sdk import WebClient
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client

from nhi.config import Settings
from nhi.db import transaction
from nhi.policy import RuleViolation
from nhi.temporal import connect

T = TypeVar("T")


class TemporalUnavailable(RuntimeError):
    """Temporal could not be reached; the request changed nothing."""


@dataclass
class AppState:
    """What one app instance shares across requests."""

    settings: Settings
    sessions: sessionmaker[Session]
    slack: WebClient | None = None
    client: Client | None = None
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


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.nhi
    return state


def _session(state: Annotated[AppState, Depends(_state)]) -> Iterator[Session]:
    with transaction(state.sessions) as session:
        yield session


def _actor(
    x_nhi_actor: Annotated[
        str | None,
        Header(
            max_length=200,
            description="Who is acting, for the audit trail (until API authentication lands).",
        ),
    ] = None,
) -> str:
    return f"api:{x_nhi_actor}" if x_nhi_actor else "api:anonymous"


def _person(
    x_nhi_actor: Annotated[
        str | None,
        Header(
            max_length=254,
            description="Email of the person acting; lifecycle changes are theirs to make.",
        ),
    ] = None,
) -> str:
    if not x_nhi_actor or "@" not in x_nhi_actor:
        raise RuleViolation(
            "X-NHI-Actor", "name the person acting by their email (the owner or backup owner)"
        )
    return x_nhi_actor.strip().lower()


State = Annotated[AppState, Depends(_state)]
Person = Annotated[str, Depends(_person)]
# "function" scope commits before the response is sent: a client that got 201 can read what it
# created at once, and a failed commit is an error response, not a lost write after a 201.
SessionDep = Annotated[Session, Depends(_session, scope="function")]
Actor = Annotated[str, Depends(_actor)]
