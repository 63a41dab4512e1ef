"""The transition helper: a status change and its audit event, together and once per key.

Real Postgres throughout: the unique index of migration 0007 is what keeps retried and
concurrent attempts to one event, so these tests exercise it, not a stand-in.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from models.enums import AgentStatus, NhiStatus
from models.orm import Agent, AuditEvent, Nhi
from models.schemas import AgentCreate
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.services import agents, audit
from nhi.services.transitions import note, transition
from tests.helpers import agent_body, request_nhi


def _agent(sessions: sessionmaker[Session]) -> uuid.UUID:
    with transaction(sessions) as session:
        return agents.create_agent(session, AgentCreate(**agent_body()), "test:platform").id


def _events(sessions: sessionmaker[Session], subject_id: object, event: str) -> int:
    with transaction(sessions) as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.subject_id == str(subject_id), AuditEvent.event == event)
            )
            or 0
        )


def _complete(session: Session, agent_id: uuid.UUID, key: str | None) -> bool:
    return transition(
        session,
        session.get_one(Agent, agent_id),
        status=AgentStatus.COMPLETED,
        event="agent.completed",
        actor="test:transitions",
        reason="the task ended",
        key=key,
    )


def test_a_retry_with_the_same_key_writes_one_event_and_changes_nothing(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    _, nhi_id, _ = request_nhi(sessions, settings, "iam_role")
    key = "wf-1/quarantine"
    applied = []
    for attempt in range(3):  # the first attempt commits; the retries find its key
        with transaction(sessions) as session:
            nhi = session.get_one(Nhi, nhi_id, with_for_update=True)
            applied.append(
                transition(
                    session,
                    nhi,
                    status=NhiStatus.QUARANTINED,
                    changes={"status_reason": f"attempt {attempt}"},
                    event="nhi.quarantined",
                    actor="system:lifecycle",
                    reason="expired",
                    details={"key": key},
                    key=key,
                )
            )
    assert applied == [True, False, False]
    with transaction(sessions) as session:
        nhi = session.get_one(Nhi, nhi_id)
        assert (nhi.status, nhi.status_reason) == ("quarantined", "attempt 0")
        stored = session.scalar(
            select(AuditEvent.idempotency_key).where(
                AuditEvent.subject_id == str(nhi_id), AuditEvent.event == "nhi.quarantined"
            )
        )
    assert stored == f"nhi:{nhi_id}:{key}"
    assert _events(sessions, nhi_id, "nhi.quarantined") == 1


def test_the_same_key_on_another_subject_is_another_event(
    sessions: sessionmaker[Session],
) -> None:
    first, second = _agent(sessions), _agent(sessions)
    for agent_id in (first, second):
        with transaction(sessions) as session:
            assert _complete(session, agent_id, "step-1")
    assert _events(sessions, first, "agent.completed") == 1
    assert _events(sessions, second, "agent.completed") == 1


def test_without_a_key_every_call_is_recorded(sessions: sessionmaker[Session]) -> None:
    agent_id = _agent(sessions)
    for _ in range(2):
        with transaction(sessions) as session:
            assert _complete(session, agent_id, None)
    assert _events(sessions, agent_id, "agent.completed") == 2


def _race(
    sessions: sessionmaker[Session], agent_id: uuid.UUID, finish_first: Callable[[Session], None]
) -> bool:
    """Two sessions apply the same key: the first holds its uncommitted event while the second
    tries; `finish_first` then commits or rolls back the first. Returns the second's result."""
    first = sessions()
    try:
        assert _complete(first, agent_id, "race")  # inserted, not committed
        result: list[bool] = []
        failure: list[BaseException] = []

        def second() -> None:
            try:
                with transaction(sessions) as session:
                    result.append(_complete(session, agent_id, "race"))
            except BaseException as err:  # reported by the main thread
                failure.append(err)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the second attempt must wait on the first one's key"
        finish_first(first)
        thread.join(10)
        assert not thread.is_alive() and not failure, failure
        return result[0]
    finally:
        first.close()


def test_concurrent_attempts_with_one_key_write_one_event(
    sessions: sessionmaker[Session],
) -> None:
    agent_id = _agent(sessions)
    assert _race(sessions, agent_id, lambda s: s.commit()) is False
    assert _events(sessions, agent_id, "agent.completed") == 1


def test_a_concurrent_attempt_applies_when_the_first_rolls_back(
    sessions: sessionmaker[Session],
) -> None:
    agent_id = _agent(sessions)
    assert _race(sessions, agent_id, lambda s: s.rollback()) is True
    assert _events(sessions, agent_id, "agent.completed") == 1
    with transaction(sessions) as session:
        assert session.get_one(Agent, agent_id).status == "completed"


@pytest.mark.parametrize("key", [None, "step-1"])
def test_a_failure_after_the_change_leaves_neither_status_nor_event(
    sessions: sessionmaker[Session], key: str | None
) -> None:
    agent_id = _agent(sessions)
    with pytest.raises(IntegrityError), transaction(sessions) as session:
        assert _complete(session, agent_id, key)
        session.flush()
        # A later write in the same transaction fails (a second agent with the same name in
        # the same environment breaks a real unique constraint): everything rolls back.
        agent = session.get_one(Agent, agent_id)
        session.add(
            Agent(
                **{
                    c: getattr(agent, c)
                    for c in ("name", "category", "environment", "owner_email", "team")
                },
                purpose="duplicate",
                invokers=[],
                status="active",
                created_by="test",
            )
        )
        session.flush()
    with transaction(sessions) as session:
        assert session.get_one(Agent, agent_id).status == "active"
    assert _events(sessions, agent_id, "agent.completed") == 0
    if key is not None:  # the key was released with the rollback: a retry applies
        with transaction(sessions) as session:
            assert _complete(session, agent_id, key)
        assert _events(sessions, agent_id, "agent.completed") == 1


def test_a_long_key_is_stored_hashed_and_still_once(sessions: sessionmaker[Session]) -> None:
    agent_id = _agent(sessions)
    key = "k" * 400
    for written in (True, False):  # the second call is a retry
        with transaction(sessions) as session:
            assert (
                note(
                    session,
                    subject_type="agent",
                    subject_id=agent_id,
                    event="agent.noted",
                    actor="test",
                    reason="long key",
                    key=key,
                )
                is written
            )
    with transaction(sessions) as session:
        stored = session.scalar(
            select(AuditEvent.idempotency_key).where(
                AuditEvent.subject_id == str(agent_id), AuditEvent.event == "agent.noted"
            )
        )
    assert stored is not None and stored.startswith("sha256:") and len(stored) <= 255
    assert _events(sessions, agent_id, "agent.noted") == 1


def test_an_unknown_field_is_refused_before_anything_is_written(
    sessions: sessionmaker[Session],
) -> None:
    agent_id = _agent(sessions)
    with pytest.raises(AttributeError, match="no field"), transaction(sessions) as session:
        transition(
            session,
            session.get_one(Agent, agent_id),
            status=AgentStatus.COMPLETED,
            changes={"not_a_column": 1},
            event="agent.completed",
            actor="test",
            reason="typo",
        )
    assert _events(sessions, agent_id, "agent.completed") == 0


def test_a_retried_lifecycle_activity_applies_its_step_once(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    """`change_status` through the helper: a retry of a step that committed (here after a later
    step moved the NHI on) neither writes its event again nor moves the status back."""
    from temporalio.testing import ActivityEnvironment

    from activities.db import DbActivities
    from models.contracts import StatusChange

    _, nhi_id, _ = request_nhi(sessions, settings, "iam_role")
    db = DbActivities(sessions, settings)
    env = ActivityEnvironment()

    def change(status: NhiStatus, event: str, key: str) -> None:
        env.run(
            db.change_status,
            StatusChange(
                nhi_id=nhi_id,
                status=status,
                event=event,
                actor="system:lifecycle",
                reason=event,
                details={"key": key},
            ),
        )

    change(NhiStatus.QUARANTINED, "nhi.quarantined", "term-1/quarantine")
    change(NhiStatus.DECOMMISSIONED, "nhi.decommissioned", "term-1/delete")
    change(NhiStatus.QUARANTINED, "nhi.quarantined", "term-1/quarantine")  # a late retry
    with transaction(sessions) as session:
        assert session.get_one(Nhi, nhi_id).status == "decommissioned"
    assert _events(sessions, nhi_id, "nhi.quarantined") == 1
    assert _events(sessions, nhi_id, "nhi.decommissioned") == 1


def test_many_events_at_once_write_each_key_once(sessions: sessionmaker[Session]) -> None:
    """`audit.record_once_many` (the reaper's batch): one statement for many events, each
    written once per key; an entry whose key already has its event is skipped and its
    subject left out of the answer, so the caller leaves that row alone."""
    entries = [
        audit.Once(
            subject_type="task_credential",
            subject_id=uuid.uuid4(),
            event="task_credential.ended",
            actor="test:reaper",
            reason="expired",
            key="reaper/ended",
            details={"n": n},
        )
        for n in range(3)
    ]
    with transaction(sessions) as session:
        first = audit.record_once_many(session, entries[:2])
    with transaction(sessions) as session:
        again = audit.record_once_many(session, entries)
    assert first == {str(e.subject_id) for e in entries[:2]}
    assert again == {str(entries[2].subject_id)}
    for entry in entries:
        assert _events(sessions, entry.subject_id, "task_credential.ended") == 1
