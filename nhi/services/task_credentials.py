"""Issuing task credentials: short-lived credentials derived from an active NHI, one per task.

Off the workflow path on purpose (issue 15): the API process reads the parent NHI from the
inventory, applies the rules, records the credential (its row and ONE audit event) and then
asks the platform, synchronously. The durable parts are the parent's lifecycle and the reaper.

Order matters for what a crash leaves behind. For Postgres the row and its event commit before
the platform call, so a role that exists on the platform is always in the inventory for the
reaper (and for containment of the parent); a platform call that fails marks the row ended at
once. AWS leaves nothing to reap, so its row is written while STS answers (see `issue`).
The credential itself is only ever in the return value: never in the row, the audit event, a
log line or an exception message.

Speed (issue 15: at least OpenBao's rate). An issue makes two or three inventory round trips:
the row and its event are ONE guarded statement (`_record`) that also proves, at that instant,
that the parent is active, its agent has no open incident and the rows the checks read are
unchanged (`_unchanged`, by a fingerprint of the NHI, agent and policy rows). So the checks can
run on a read of the parent made moments ago (`SNAPSHOT_CACHE_S`) without trusting it: a stale
read records nothing and the issue reads again; a refusal is only answered from a fresh read.
Then the platform call (for AWS beside the write), and the re-read of the parent
(`_still_usable`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Exists,
    Select,
    Table,
    Text,
    Uuid,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal_column,
    select,
)
from sqlalchemy.orm import Session, contains_eager, sessionmaker
from sqlalchemy.sql.dml import ReturningInsert
from temporalio.exceptions import ApplicationError

from models.contracts import ScopeStatement
from models.enums import (
    PLATFORM_OF,
    AgentStatus,
    IncidentStatus,
    NhiKind,
    NhiStatus,
    Platform,
    Role,
)
from models.orm import Agent, AuditEvent, Incident, Nhi, Policy, TaskCredential
from nhi.infra.db import transaction
from nhi.rules.github_scope import check_github_task_scope, github_task_ttl
from nhi.rules.policy import RuleViolation
from nhi.rules.task_credentials import (
    AWS_MIN_TTL_SECONDS,
    QUARANTINED_ON_PLATFORM,
    TASK_KINDS,
    IssuedCredential,
    PreparedCredential,
    TaskGrant,
    TaskIssuer,
    TwoPhaseIssuer,
    check_aws_narrowing,
    check_postgres_narrowing,
    check_task_id,
    parse_task_ttl,
    session_policy,
    session_tags,
    source_identity,
)
from nhi.services.auth import Principal, require, require_visible_nhi
from nhi.services.errors import Conflict, Forbidden, NotFound, PolicyViolation
from nhi.services.policies import check_scope, rules_of
from nhi.services.transitions import note

log = logging.getLogger(__name__)
T = TypeVar("T")

IssuerFor = Callable[[Platform], TaskIssuer]
"""A platform's `TaskCredentialProvider` (activities/providers/base.py)."""

# One audit trail per credential (issued, then ended by the reaper); details name the NHI.
SUBJECT_TYPE = "task_credential"
ISSUED_EVENT = "task_credential.issued"
FAILED_EVENT = "task_credential.issue_failed"


class IssueFailed(RuntimeError):
    """The platform refused or failed to issue (502); nothing usable was left behind, and the
    message names the platform's answer, never the credential."""


@dataclass(frozen=True)
class TaskRequest:
    """What a caller asks for: a TTL (None: the default), the task, a narrowed scope."""

    ttl: int | str | None = None
    task_id: str | None = None
    scope: Sequence[ScopeStatement] | None = None


def authorize(p: Principal, nhi: Nhi) -> None:
    """Who may issue: the agent itself (an `agent` token bound to the NHI's agent) and the
    agent's owner or backup owner. An auditor never (403); another agent's token never (403);
    anyone who cannot even see the NHI gets 404 as for a missing one."""
    if p.has(Role.AGENT):
        require(
            p.agent_id == nhi.agent_id,
            f"{p.actor} acts for another agent: it issues only for its own agent's NHIs",
        )
        return
    require_visible_nhi(p, nhi.id, nhi.agent)
    require(not p.has(Role.AUDITOR), f"{p.actor} is an auditor: auditors issue nothing")
    require(
        p.owns(nhi.agent),
        f"{p.actor} is neither agent {nhi.agent.name} (an agent token) nor its owner or "
        "backup owner",
    )


def _open_incident() -> Exists:
    """Whether the NHI's agent has an unreleased containment incident (issue 17)."""
    return exists().where(
        Incident.agent_id == Nhi.agent_id, Incident.status != IncidentStatus.RELEASED
    )


# Everything the checks read, as the server sees it: the whole NHI, agent and policy rows.
# The recording statement compares it again (`_unchanged`), so checks made on a snapshot that
# changed meanwhile never record anything.
def _fingerprint() -> ColumnElement[str]:
    return func.md5(
        func.concat(
            literal_column("nhis::text"),
            literal_column("agents::text"),
            literal_column("policies::text"),
        )
    )


def _policy_join() -> ColumnElement[bool]:
    return and_(
        Policy.platform == Nhi.platform,
        Policy.kind == Nhi.kind,
        Policy.environment == Agent.environment,
    )


@dataclass(frozen=True)
class _Snapshot:
    """The parent NHI (with its agent), its policy and whether its agent is contained, as
    one read found them; `fingerprint` names that version of the three rows."""

    nhi: Nhi
    policy: Policy | None
    contained: bool
    fingerprint: str


# How long a snapshot that passed every check is reused for the next issue from the same NHI
# (the read is one of an issue's few inventory round trips). Never a weaker check: the
# recording statement records only while the rows still match the snapshot's fingerprint,
# the NHI is active and its agent has no open incident; otherwise the issue reads them again.
SNAPSHOT_CACHE_S = 5.0
_SNAPSHOTS_MAX = 1024


class _Snapshots:
    def __init__(self) -> None:
        self._found: dict[uuid.UUID, tuple[float, _Snapshot]] = {}
        self._lock = threading.Lock()

    def get(self, nhi_id: uuid.UUID) -> _Snapshot | None:
        with self._lock:
            found = self._found.get(nhi_id)
        if found is None or time.monotonic() - found[0] >= SNAPSHOT_CACHE_S:
            return None
        return found[1]

    def put(self, nhi_id: uuid.UUID, snapshot: _Snapshot) -> None:
        with self._lock:
            if len(self._found) >= _SNAPSHOTS_MAX:
                self._found.clear()
            self._found[nhi_id] = (time.monotonic(), snapshot)

    def evict(self, nhi_id: uuid.UUID) -> None:
        with self._lock:
            self._found.pop(nhi_id, None)


_snapshots = _Snapshots()


def _load(session: Session, nhi_id: uuid.UUID) -> _Snapshot | None:
    """The NHI, its agent, its policy and whether its agent is contained (an open incident),
    in one query (one round trip per issue, not four)."""
    found = session.execute(
        select(Nhi, Policy, _open_incident(), _fingerprint())
        .join(Nhi.agent)
        .outerjoin(Policy, _policy_join())
        .options(contains_eager(Nhi.agent))
        .where(Nhi.id == nhi_id)
    ).one_or_none()
    if found is None:
        return None
    return _Snapshot(found[0], found[1], bool(found[2]), str(found[3]))


def _unchanged() -> Exists:
    """The condition every recording is made under: the rows the checks read are as they
    were (`:guard_nhi_id`, `:guard_fingerprint`), the NHI is active and its agent has no open
    incident."""
    return (
        exists()
        .select_from(
            cast(Table, Nhi.__table__)
            .join(cast(Table, Agent.__table__), Agent.id == Nhi.agent_id)
            .outerjoin(cast(Table, Policy.__table__), _policy_join())
        )
        .where(
            Nhi.id == bindparam("guard_nhi_id", type_=Uuid),
            Nhi.status == NhiStatus.ACTIVE.value,
            _fingerprint() == bindparam("guard_fingerprint", type_=Text),
            ~_open_incident(),
        )
    )


def _policy(nhi: Nhi, policy: Policy | None) -> Policy:
    label = f"{nhi.platform}/{nhi.kind}/{nhi.agent.environment}"
    if policy is None or not policy.allow_task_credentials:
        raise PolicyViolation(
            f"the {label} policy does not allow task credentials (allow_task_credentials)"
        )
    return policy


def _ttl(nhi: Nhi, policy: Policy, value: int | str | None) -> int:
    if nhi.platform == Platform.GITHUB:
        return github_task_ttl(value, max_seconds=policy.task_credential_max_ttl_seconds)
    ttl = parse_task_ttl(value, max_seconds=policy.task_credential_max_ttl_seconds)
    if nhi.platform == Platform.AWS:
        if ttl < AWS_MIN_TTL_SECONDS:
            raise RuleViolation(
                "ttl", f"STS sessions last at least {AWS_MIN_TTL_SECONDS} s (15m); ask for that"
            )
        if ttl > policy.max_session_duration_seconds:
            raise RuleViolation(
                "ttl",
                f"{ttl} s exceeds the role's maximum session duration of "
                f"{policy.max_session_duration_seconds} s",
            )
    return ttl


def _narrowed(
    nhi: Nhi, policy: Policy, scope: Sequence[ScopeStatement] | None
) -> tuple[ScopeStatement, ...] | None:
    """The narrowed scope, checked against the policy and within the NHI's own."""
    granted = [ScopeStatement.model_validate(s) for s in nhi.granted_scope]
    if nhi.platform == Platform.GITHUB:
        return check_github_task_scope(scope, granted, rules_of(policy))
    if scope is None:
        return None
    statements = list(scope)
    check_scope(nhi.platform, statements, rules_of(policy))
    if nhi.platform == Platform.POSTGRES:
        check_postgres_narrowing(statements, granted)
    else:
        check_aws_narrowing(statements, granted)
    return tuple(statements)


def _grant(p: Principal, snapshot: _Snapshot, request: TaskRequest, now: datetime) -> TaskGrant:
    """Every check on `snapshot`, and the grant they allow (nothing recorded)."""
    nhi = snapshot.nhi
    authorize(p, nhi)
    if nhi.status != NhiStatus.ACTIVE.value:
        raise Conflict(f"nhi {nhi.id} is {nhi.status}: task credentials come from active NHIs")
    if nhi.agent.status != AgentStatus.ACTIVE:
        raise Conflict(
            f"agent {nhi.agent.name} is {nhi.agent.status}: its task has ended, no task credentials"
        )
    if snapshot.contained:
        # Containment quarantines the agent's NHIs, but not in the same instant it opens the
        # incident: nothing new is issued from the moment it is open until it is released.
        raise Conflict(
            f"agent {nhi.agent.name} is contained (an open incident): no task credentials "
            "until the incident is released"
        )
    kind = NhiKind(nhi.kind)
    if kind not in TASK_KINDS or not nhi.external_id:
        raise Conflict(f"task credentials come from iam_role and postgres_role NHIs, not {kind}")
    policy = _policy(nhi, snapshot.policy)
    ttl = _ttl(nhi, policy, request.ttl)
    expires_at = now + timedelta(seconds=ttl)
    if expires_at > nhi.expires_at:
        raise RuleViolation(
            "ttl", f"would outlive its NHI, which expires at {nhi.expires_at.isoformat()}"
        )
    return TaskGrant(
        credential_id=uuid.uuid4(),
        nhi_id=nhi.id,
        agent_id=nhi.agent_id,
        kind=kind,
        identity_name=nhi.name,
        external_id=nhi.external_id,
        target=nhi.target,
        task_id=check_task_id(request.task_id),
        issued_at=now,
        expires_at=expires_at,
        ttl_seconds=ttl,
        granted_scope=tuple(ScopeStatement.model_validate(s) for s in nhi.granted_scope),
        scope=_narrowed(nhi, policy, request.scope),
        allowed_cidrs=tuple(nhi.allowed_cidrs or ()),
    )


# What the checks raise: on a cached snapshot, any of them is confirmed on a fresh read first.
_REFUSALS = (NotFound, Forbidden, Conflict, PolicyViolation, RuleViolation)


def _checked(
    conn: Connection, p: Principal, nhi_id: uuid.UUID, request: TaskRequest, now: datetime
) -> tuple[TaskGrant, _Snapshot]:
    """The grant, checked on a recent snapshot when there is one, else on a fresh read (and
    a refusal is only ever answered from a fresh read)."""
    cached = _snapshots.get(nhi_id)
    if cached is not None:
        try:
            return _grant(p, cached, request, now), cached
        except _REFUSALS:
            _snapshots.evict(nhi_id)
    with Session(bind=conn, expire_on_commit=False) as session:
        snapshot = _load(session, nhi_id)
    if snapshot is None:
        raise NotFound(f"nhi {nhi_id} not found")
    grant = _grant(p, snapshot, request, now)
    _snapshots.put(nhi_id, snapshot)
    return grant, snapshot


def prepare(
    session: Session, p: Principal, nhi_id: uuid.UUID, request: TaskRequest, now: datetime
) -> TaskGrant:
    """Check everything on a fresh read, then record the credential (row + one audit event)
    in `session`.

    Raises:
        NotFound: no such NHI, or `p` may not see it (404).
        Forbidden: `p` may see it but not issue from it (403).
        Conflict: the NHI is not active, its agent is contained (an open incident), its
            kind has no task credentials, or it changed between the checks and the
            recording (409).
        PolicyViolation: the policy does not allow task credentials (422).
        RuleViolation: a bad TTL, task id or scope, naming the field (422).
    """
    snapshot = _load(session, nhi_id)
    if snapshot is None:
        raise NotFound(f"nhi {nhi_id} not found")
    grant = _grant(p, snapshot, request, now)
    if not _record(session.connection(), p, snapshot, grant):
        raise _changed(nhi_id)
    return grant


def _changed(nhi_id: uuid.UUID) -> Conflict:
    return Conflict(f"nhi {nhi_id} changed while the task credential was checked; try again")


def _record(conn: Connection, p: Principal, snapshot: _Snapshot, grant: TaskGrant) -> bool:
    """The row and its one audit event in ONE statement (a data-modifying CTE): both or
    neither, committed by the time it returns, in a single round trip; and only while the
    snapshot still holds (`_unchanged`). Whether it recorded."""
    nhi = snapshot.nhi
    scope = None if grant.scope is None else [s.model_dump() for s in grant.scope]
    aws = (
        {
            "source_identity": source_identity(grant.agent_id),
            "session_tags": session_tags(grant),
            "session_policy": session_policy(grant),  # refuses one too large for STS
        }
        if nhi.platform == Platform.AWS
        else {}
    )
    row = {
        "id": grant.credential_id,
        "nhi_id": nhi.id,
        "agent_id": nhi.agent_id,
        "platform": nhi.platform,
        "name": grant.name,
        "task_id": grant.task_id,
        "issued_by": p.actor,
        "issued_at": grant.issued_at,
        "expires_at": grant.expires_at,
        "scope": scope,
        "status": "active",
    }
    event = {
        "subject_type": SUBJECT_TYPE,
        "subject_id": str(grant.credential_id),
        "event": ISSUED_EVENT,
        "actor": p.actor,
        "reason": f"task credential {grant.name} for task {grant.task_id or '-'} "
        f"of agent {nhi.agent.name}, {grant.ttl_seconds} s",
        "details": {
            "credential_id": str(grant.credential_id),
            "nhi_id": str(nhi.id),
            "name": grant.name,
            "agent_id": str(nhi.agent_id),
            "task_id": grant.task_id,
            "caller": p.actor,
            "ttl_seconds": grant.ttl_seconds,
            "expires_at": grant.expires_at.isoformat(),
            "scope": scope,
            **aws,
        },
    }
    params = {f"row_{k}": v for k, v in row.items()} | {f"event_{k}": v for k, v in event.items()}
    params |= {"guard_nhi_id": nhi.id, "guard_fingerprint": snapshot.fingerprint}
    # On the connection (Core), not a session: the ORM's insert machinery costs more CPU
    # than the statement does.
    return conn.execute(_RECORD, params).first() is not None


def _values(table: Table, prefix: str, columns: Sequence[str]) -> Select[Any]:
    """`SELECT :<prefix>_<column> AS <column>, ...`: one row of bound values."""
    return select(*(bindparam(f"{prefix}_{c}", type_=table.c[c].type).label(c) for c in columns))


def _record_statement() -> ReturningInsert[Any]:
    """`_record`'s statement, built (and its cache key computed) once: the row inserted only
    `WHERE _unchanged()`, and its event inserted once per row inserted (one or none).
    RETURNING: whether a row was inserted, in the same round trip."""
    rows, events = cast(Table, TaskCredential.__table__), cast(Table, AuditEvent.__table__)
    row_columns = [
        "id", "nhi_id", "agent_id", "platform", "name", "task_id", "issued_by",
        "issued_at", "expires_at", "scope", "status",
    ]  # fmt: skip
    event_columns = ["subject_type", "subject_id", "event", "actor", "reason", "details"]
    row = (
        insert(rows)
        .from_select(row_columns, _values(rows, "row", row_columns).where(_unchanged()))
        .returning(rows.c.id)
        .cte("task_credential")
    )
    event = insert(events).from_select(
        event_columns, _values(events, "event", event_columns).select_from(row)
    )
    return event.add_cte(row).returning(events.c.id)


_RECORD = _record_statement()


def _failed(sessions: sessionmaker[Session], grant: TaskGrant, actor: str, error: str) -> None:
    with transaction(sessions) as session:
        row = session.get(TaskCredential, grant.credential_id, with_for_update=True)
        if row is None or row.status != "active":
            return
        row.status, row.ended_at = "ended", datetime.now(UTC)
        row.end_reason, row.last_error = "issue_failed", error[:2000]
        note(
            session,
            subject_type=SUBJECT_TYPE,
            subject_id=grant.credential_id,
            event=FAILED_EVENT,
            actor=actor,
            reason=f"task credential {grant.name} was not issued: {error}"[:2000],
            details={
                "credential_id": str(grant.credential_id),
                "nhi_id": str(grant.nhi_id),
                "error": error[:2000],
            },
        )


# The parent's and the credential's status, after the platform call (compiled once).
_STILL_USABLE = (
    select(Nhi.status, TaskCredential.status, _open_incident(), Agent.status)
    .join(TaskCredential, TaskCredential.nhi_id == Nhi.id)
    .join(Agent, Agent.id == Nhi.agent_id)
    .where(TaskCredential.id == bindparam("id"))
)


def _still_usable(conn: Connection, grant: TaskGrant) -> None:
    """After the platform call: the parent may have been contained meanwhile. Then the
    credential is not handed out (nobody ever holds it) and the reaper removes it.

    Raises:
        Conflict: the parent NHI or the credential is no longer active.
    """
    # One read in autocommit (as the whole issue): one round trip, no BEGIN/COMMIT.
    found = conn.execute(_STILL_USABLE, {"id": grant.credential_id}).one_or_none()
    status, row, contained, agent = found if found is not None else (None, None, False, None)
    if status != NhiStatus.ACTIVE.value or row != "active":
        raise Conflict(
            f"nhi {grant.nhi_id} is {status} now: task credential {grant.name} was withheld "
            "and will be removed"
        )
    if agent != AgentStatus.ACTIVE.value:
        raise Conflict(
            f"the agent of nhi {grant.nhi_id} is {agent} now (its task ended): task "
            f"credential {grant.name} was withheld and will be removed"
        )
    if contained:
        raise Conflict(
            f"the agent of nhi {grant.nhi_id} was contained meanwhile (an open incident): "
            f"task credential {grant.name} was withheld and will be removed"
        )


@contextmanager
def _inventory(sessions: sessionmaker[Session]) -> Iterator[Connection]:
    """One inventory connection for the whole issue (one pool checkout and pre-ping, not one
    per transaction); idle, outside any transaction, while the platform is called."""
    bind = sessions.kw.get("bind")
    if not isinstance(bind, Engine):
        raise TypeError("task credentials need a sessionmaker bound to an Engine")
    with bind.connect() as conn:
        yield conn


def _on_platform(
    sessions: sessionmaker[Session],
    p: Principal,
    grant: TaskGrant,
    call: Callable[[], T],
    recorded: Callable[[], object] | None = None,
) -> T:
    """A platform call; a failure ends the recorded row as `issue_failed` (once `recorded`
    says the row being written beside the call is there, if it is)."""
    try:
        return call()
    except ApplicationError as err:
        error = f"{err.type or 'Error'}: {err.message}"
        if recorded is not None:
            recorded()
        _failed(sessions, grant, p.actor, error)
        if err.type == QUARANTINED_ON_PLATFORM:
            # The parent's logins are locked out on the platform (its quarantine ran before
            # the inventory says so): a conflict with the parent's state, not a platform fault.
            raise Conflict(
                f"nhi {grant.nhi_id} is quarantined on its platform: {err.message}"
            ) from None
        raise IssueFailed(
            f"the platform did not issue task credential {grant.name}: {error}"
        ) from None
    except Exception as err:
        # Unclassified: its text might quote a request, so only its type is kept.
        log.warning("task credential %s not issued: %s", grant.name, type(err).__name__)
        if recorded is not None:
            recorded()
        _failed(sessions, grant, p.actor, type(err).__name__)
        raise IssueFailed(
            f"the platform did not issue task credential {grant.name} ({type(err).__name__})"
        ) from None


def _rollback(prepared: PreparedCredential, grant: TaskGrant) -> None:
    """Undo a prepared credential; a failure is logged (its connection is closed, so the
    platform rolls back anyway)."""
    try:
        prepared.rollback()
    except Exception as err:
        log.warning("task credential %s: rollback failed: %s", grant.name, type(err).__name__)


def _abandon(preparing: Future[PreparedCredential], grant: TaskGrant) -> None:
    """Wait for a prepare whose row was never written and undo it, whatever it did."""
    try:
        prepared = preparing.result()
    except Exception:
        return
    _rollback(prepared, grant)


def _two_phase(
    sessions: sessionmaker[Session],
    p: Principal,
    conn: Connection,
    grant: TaskGrant,
    issuer: TwoPhaseIssuer,
    record: Callable[[], bool],
) -> IssuedCredential | None:
    """The credential made in an open transaction on the platform WHILE its row is written,
    then the parent read again, then committed: it exists only once its row does (a crash
    before the commit leaves nothing: the platform rolls back), and is never committed for a
    parent found changed. None when the row was refused (the snapshot no longer held)."""
    preparing = _beside.submit(issuer.prepare, grant)
    try:
        recorded = record()
    except BaseException:
        _abandon(preparing, grant)
        raise
    prepared = _on_platform(sessions, p, grant, preparing.result)
    if not recorded:
        _rollback(prepared, grant)
        log.info("task credential %s dropped unseen: its NHI changed", grant.name)
        return None
    try:
        _still_usable(conn, grant)
    except Conflict as err:
        _rollback(prepared, grant)
        _failed(sessions, grant, p.actor, f"withheld: {err}")
        raise
    except BaseException:
        _rollback(prepared, grant)
        raise
    return _on_platform(sessions, p, grant, prepared.commit)


# Runs a platform call beside the row's write: one thread per issue in flight.
_beside = ThreadPoolExecutor(max_workers=16, thread_name_prefix="nhi-task-record")


def issue(
    sessions: sessionmaker[Session],
    p: Principal,
    nhi_id: uuid.UUID,
    request: TaskRequest,
    issuer_for: IssuerFor,
    *,
    now: datetime | None = None,
) -> tuple[TaskGrant, IssuedCredential]:
    """Record, then issue on the platform; the credential is only in the return value.

    Postgres (a two-phase issuer): the role is created in a transaction left open while the
    row and its event are written, then the parent is read again (`_still_usable`), and only
    then is the role committed; so a role that exists is always in the inventory (for the
    reaper and for containment), and one for a parent changed meanwhile never exists. AWS
    creates nothing to reap (a session ends by itself, and containment's deny ends those
    issued before it), so its row is written while STS answers, and the parent read again
    once both are done. Others: the row, then the platform, then the re-read. A credential
    whose row was refused (the parent changed meanwhile) is dropped unseen: never handed out.

    Raises:
        everything `prepare` raises (nothing recorded), and
        Conflict: the parent changed meanwhile, or is quarantined on its platform (the row
            is then ended);
        IssueFailed: the platform refused (the row is then ended as `issue_failed`).
    """
    for attempt in (1, 2):
        with _inventory(sessions) as conn:
            # Autocommit: the checks read (or reuse a recent read), then ONE statement writes
            # the row and its event (no BEGIN/COMMIT round trips); a refusal writes nothing.
            auto = conn.execution_options(isolation_level="AUTOCOMMIT")
            grant, snapshot = _checked(auto, p, nhi_id, request, now or datetime.now(UTC))
            record = partial(_record, auto, p, snapshot, grant)
            issuer = issuer_for(PLATFORM_OF[grant.kind])
            issued: IssuedCredential | None
            if isinstance(issuer, TwoPhaseIssuer):
                issued = _two_phase(sessions, p, conn, grant, issuer, record)
                recorded = issued is not None
            elif PLATFORM_OF[grant.kind] is Platform.AWS:
                # The row is written while STS answers (its WAL flush off the critical path),
                # on this connection, which nothing else uses meanwhile.
                recording = _beside.submit(record)
                issued = _on_platform(
                    sessions, p, grant, partial(issuer.issue, grant), recording.result
                )
                recorded = recording.result()
                if recorded:
                    _still_usable(conn, grant)
                else:
                    log.info("task credential %s dropped unseen: its NHI changed", grant.name)
            else:
                issued = None
                recorded = record()
                if recorded:
                    issued = _on_platform(sessions, p, grant, partial(issuer.issue, grant))
                    _still_usable(conn, grant)
            if not recorded or issued is None:
                # The snapshot no longer held: read again, check again (once).
                _snapshots.evict(nhi_id)
                if attempt == 2:
                    raise _changed(nhi_id)
                continue
        log.info(
            "task credential %s issued from nhi %s until %s",
            grant.name,
            grant.nhi_id,
            grant.expires_at.isoformat(),
        )
        return grant, issued
    raise AssertionError("unreachable")
