"""Engine and session factory (sync SQLAlchemy on psycopg 3, the one flavour the service uses)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


# The API process pings a pooled connection before handing it out only when it has been idle
# for longer than this (a ping per checkout was one round trip in four of a task credential's
# issue, issue 15); a connection that died within this window fails its request once and the
# pool replaces it. Workers and the CLI keep a ping per checkout: an activity gains nothing from
# the millisecond and would rather not spend a retry on a restarted database.
PING_IDLE_S = 1.0
_USED_AT = "nhi_used_at"


def make_engine(url: str, pool_size: int = 5, ping_idle_s: float | None = None) -> Engine:
    """An engine whose pool survives database restarts (pre-ping, of every checkout or, with
    `ping_idle_s`, of connections idle that long) and never logs parameters."""
    if ping_idle_s is None:
        return create_engine(
            url,
            pool_pre_ping=True,
            pool_size=pool_size,
            max_overflow=pool_size,
            hide_parameters=True,
        )
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, hide_parameters=True)
    dialect = engine.dialect
    idle = ping_idle_s

    @event.listens_for(engine, "checkin")
    def _used(_dbapi: Any, record: ConnectionPoolEntry) -> None:
        record.info[_USED_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        used = record.info.get(_USED_AT)  # None: connected just now, nothing to ping
        if used is None or time.monotonic() - used < idle:
            return
        try:
            dialect.do_ping(dbapi)
        except Exception as err:
            # The pool drops this connection and checks out (or opens) another.
            raise exc.DisconnectionError(f"pre-ping failed: {type(err).__name__}") from err

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions keep loaded values after commit, so activities can return them."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """One session and one transaction: committed on success, rolled back on error."""
    with sessions.begin() as session:
        yield session


def alembic_config(url: str) -> Config:
    """Alembic configured in code; the URL is set on the config object, never in an ini file,
    because socket URLs (`?host=/path`) clash with ini `%` interpolation."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = url
    return cfg


def upgrade_head(url: str) -> None:
    """Apply every migration: the only way the schema is ever built."""
    command.upgrade(alembic_config(url), "head")
