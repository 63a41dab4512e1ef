"""Append-only audit events: one per state change, with actor and reason."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.orm import AuditEvent


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
    entry = AuditEvent(
        subject_type=subject_type,
        subject_id=str(subject_id),
        event=event,
        actor=actor,
        reason=reason,
        details=details or {},
    )
    session.add(entry)
    return entry


def already_recorded(session: Session, subject_id: object, key: str) -> bool:
    """Whether an event with this idempotency key exists: a retried activity that committed
    before its worker died must not write the same event twice."""
    return (
        session.scalar(
            select(AuditEvent.id)
            .where(
                AuditEvent.subject_id == str(subject_id), AuditEvent.details["key"].astext == key
            )
            .limit(1)
        )
        is not None
    )
