"""Alembic environment: the URL comes from the caller (`nhi.infra.db.alembic_config`) or settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from models.orm import Base
from nhi.infra.config import Settings

config = context.config


def _url() -> str:
    url = config.attributes.get("database_url")
    return str(url) if url else Settings().require_database_url()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
