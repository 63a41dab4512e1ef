"""Migration gate: one head, upgrade on an empty database, no drift, and a downgrade round trip."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from models.orm import Base
from nhi.infra.db import alembic_config, upgrade_head
from tests.conftest import Databases


def test_exactly_one_head(database_url: str) -> None:
    script = ScriptDirectory.from_config(alembic_config(database_url))
    assert len(script.get_heads()) == 1


def _schema(engine: Engine) -> set[tuple[str, str]]:
    """Every (table, column) and (table, index) of the database."""
    inspector = inspect(engine)
    out: set[tuple[str, str]] = set()
    for table in inspector.get_table_names():
        out |= {(table, c["name"]) for c in inspector.get_columns(table)}
        out |= {(table, f"index:{i['name']}") for i in inspector.get_indexes(table)}
    return out


def test_upgrade_check_downgrade_round_trip(databases: Databases) -> None:
    url = databases.new("nhi_migrate")
    cfg = alembic_config(url)
    upgrade_head(url)
    engine = create_engine(url)
    try:
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
        at_head = _schema(engine)
        command.check(cfg)  # raises if the models and the migrated schema differ
        # Down one revision at a time to the empty database: no downgrade adds anything, and
        # together they remove everything the upgrades made (a downgrade that forgot a column
        # or an index leaves it behind at base).
        script = ScriptDirectory.from_config(cfg)
        steps = [r.revision for r in script.walk_revisions()]  # head first
        before = at_head
        for revision in steps:
            command.downgrade(cfg, f"{revision}-1" if revision != steps[-1] else "base")
            now = _schema(engine)
            assert now <= before, (revision, before - now, now - before)
            before = now
        assert {table for table, _ in before} <= {"alembic_version"}, before
        command.upgrade(cfg, "head")
        assert _schema(engine) == at_head
        command.check(cfg)
        with engine.connect() as conn:
            seeded = conn.execute(text("SELECT count(*) FROM policies")).scalar_one()
        assert seeded == 9  # aws: 2 kinds x 3 environments; postgres: 1 kind x 3
    finally:
        engine.dispose()


def test_audit_events_are_append_only(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        session.execute(
            text(
                "INSERT INTO audit_events (subject_type, subject_id, event, actor, reason, details)"
                " VALUES ('test', 'x', 'test.event', 'test', 'append-only check', '{}')"
            )
        )
    for statement in (
        "UPDATE audit_events SET reason = 'rewritten'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ):
        with pytest.raises(DBAPIError, match="append-only"), sessions.begin() as session:
            session.execute(text(statement))
