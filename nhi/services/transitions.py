"""The one way to change an inventory row's state: the change and its audit event together.

`transition` sets the new status (and any other fields that go with it) and writes the audit
event, with actor and reason, in the caller's transaction, so both commit or neither does.
With an idempotency key the event is inserted first, `ON CONFLICT DO NOTHING` on the unique
`audit_events.idempotency_key`: an attempt whose key is already recorded (a retried activity
whose first attempt committed, or a concurrent one that got there first) changes nothing and
returns False. Keys are scoped to their subject; callers derive them from what identifies the
step, e.g. the workflow id and the step's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from models.orm import Agent, ApiToken, Base, Incident, Nhi, Prompt, Sweep, TaskCredential
from nhi.services import audit

# How the audit trail names each kind of subject.
SUBJECT_TYPES: dict[type[Base], str] = {
    Nhi: "nhi",
    Agent: "agent",
    Sweep: "sweep",
    ApiToken: "token",
    Prompt: "prompt",
    TaskCredential: "task_credential",
    Incident: "incident",
}


def subject_type_of(row: Base) -> str:
    """The audit `subject_type` of an inventory row."""
    return SUBJECT_TYPES[type(row)]


def transition(
    session: Session,
    row: Base,
    *,
    event: str,
    actor: str,
    reason: str,
    status: StrEnum | str | None = None,
    changes: Mapping[str, Any] | None = None,
    details: dict[str, Any] | None = None,
    key: str | None = None,
) -> bool:
    """Set `row.status` to `status` and each of `changes`, and write `event`; True when applied.

    With `key`, at most once per (subject, key): False, and `row` untouched, when an event
    with that key exists. `row` should be locked (`with_for_update`) by the caller when two
    writers may race on it; the key alone already keeps their events to one.
    """
    for name in changes or {}:
        if not hasattr(row, name):
            raise AttributeError(f"{type(row).__name__} has no field {name!r}")
    # The event first: with a key, its insert is what decides whether this attempt applies.
    if not note(
        session,
        subject_type=subject_type_of(row),
        subject_id=row.id,  # type: ignore[attr-defined]
        event=event,
        actor=actor,
        reason=reason,
        details=details,
        key=key,
    ):
        return False
    if status is not None:
        row.status = status.value if isinstance(status, StrEnum) else status  # type: ignore[attr-defined]
    for name, value in (changes or {}).items():
        setattr(row, name, value)
    return True


def note(
    session: Session,
    *,
    subject_type: str,
    subject_id: object,
    event: str,
    actor: str,
    reason: str,
    details: dict[str, Any] | None = None,
    key: str | None = None,
) -> bool:
    """An audit event without a state change (a decision refused, how a request was routed);
    at most once per key when `key` is given. True when written."""
    return audit.record_once(
        session,
        subject_type=subject_type,
        subject_id=subject_id,
        event=event,
        actor=actor,
        reason=reason,
        details=details,
        key=key,
    )
