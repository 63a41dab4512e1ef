"""Engine and session factory (sync SQLAlchemy on psycopg 3, the one flavour the service uses)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """An engine whose pool survives database restarts (pre-ping) and never logs parameters."""
    return create_engine(
        url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size, hide_parameters=True
    )


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
