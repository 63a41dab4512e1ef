"""Append-only audit events: one per state change, with actor and reason."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from models.orm import AuditEvent

# The stored key's column width (migration 0007).
KEY_LENGTH = 255


def record(
    session: Session,
    *,
    subject_type: str,
    subject_id: object,
    event: str,
    actor: str,
    reason: str,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add an event to the caller's transaction, so it commits (or not) with the change."""
    entry = AuditEvent(**_fields(subject_type, subject_id, event, actor, reason, details))
    session.add(entry)
    return entry


def _fields(
    subject_type: str,
    subject_id: object,
    event: str,
    actor: str,
    reason: str,
    details: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "subject_type": subject_type,
        "subject_id": str(subject_id),
        "event": event,
        "actor": actor,
        "reason": reason,
        "details": details or {},
    }


def stored_key(subject_type: str, subject_id: object, key: str) -> str:
    """The key as stored: scoped to its subject (a workflow's keys are only unique per NHI),
    and hashed when it would not fit the column."""
    scoped = f"{subject_type}:{subject_id}:{key}"
    if len(scoped) <= KEY_LENGTH:
        return scoped
    return "sha256:" + hashlib.sha256(scoped.encode()).hexdigest()


def record_once(
    session: Session,
    *,
    subject_type: str,
    subject_id: object,
    event: str,
    actor: str,
    reason: str,
    key: str | None,
    details: dict[str, Any] | None = None,
) -> bool:
    """Write the event unless one with this idempotency key exists; True when written (always,
    without a key).

    `INSERT ... ON CONFLICT DO NOTHING` on the unique key: a concurrent attempt with the same
    key waits for the first transaction and then writes nothing (or writes, if that one rolled
    back). The insert runs at once (after flushing pending changes), in the caller's
    transaction.
    """
    if key is None:
        record(
            session,
            subject_type=subject_type,
            subject_id=subject_id,
            event=event,
            actor=actor,
            reason=reason,
            details=details,
        )
        return True
    written = session.execute(
        insert(AuditEvent)
        .values(
            **_fields(subject_type, subject_id, event, actor, reason, details),
            idempotency_key=stored_key(subject_type, subject_id, key),
        )
        .on_conflict_do_nothing(
            index_elements=[AuditEvent.idempotency_key],
            index_where=AuditEvent.idempotency_key.is_not(None),
        )
        .returning(AuditEvent.id)
    ).scalar_one_or_none()
    return written is not None


@dataclass(frozen=True)
class Once:
    """One event for `record_once_many`: written unless its subject has one with `key`."""

    subject_type: str
    subject_id: object
    event: str
    actor: str
    reason: str
    key: str
    details: dict[str, Any] | None = None


def record_once_many(session: Session, entries: Sequence[Once]) -> set[str]:
    """`record_once` for many events in ONE statement (a batch ending hundreds of rows wrote
    one event per round trip); the subject ids, as stored, whose event was written now.

    Entries whose key already has an event are skipped, as `record_once` skips them: their
    subjects are not in the answer, so the caller leaves those rows untouched."""
    if not entries:
        return set()
    values = [
        {
            **_fields(e.subject_type, e.subject_id, e.event, e.actor, e.reason, e.details),
            "idempotency_key": stored_key(e.subject_type, e.subject_id, e.key),
        }
        for e in entries
    ]
    # Pending ORM changes first (what `session.execute` would flush), then the events as an
    # executemany on the connection: one statement compiled once (and cached), sent as
    # multi-row INSERTs in one round trip per page, where `.values([...])` compiled a new
    # statement for every batch (most of a reaper batch's CPU).
    session.flush()
    written = session.connection().execute(_ONCE_MANY, values).scalars()
    return {str(subject) for subject in written}


_ONCE_MANY = (
    insert(cast(Table, AuditEvent.__table__))
    .on_conflict_do_nothing(
        index_elements=[AuditEvent.idempotency_key],
        index_where=AuditEvent.idempotency_key.is_not(None),
    )
    .returning(AuditEvent.subject_id)
)
