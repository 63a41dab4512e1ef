"""Append-only audit events: one per state change, with actor and reason."""

from __future__ import annotations

from typing import Any

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
