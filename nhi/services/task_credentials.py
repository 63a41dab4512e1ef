"""Issuing task credentials: short-lived credentials derived from an active NHI, one per task.

Off the workflow path on purpose (issue 15): the API process reads the parent NHI from the
inventory, applies the rules, records the credential (its row and ONE audit event) and then
asks the platform, synchronously. The durable parts are the parent's lifecycle and the reaper.

Order matters for what a crash leaves behind. The row and its event commit before the platform
call, so a credential that exists on the platform is always in the inventory for the reaper
(and for containment of the parent); a platform call that fails marks the row ended at once.
The credential itself is only ever in the return value: never in the row, the audit event, a
log line or an exception message.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from sqlalchemy import Connection, Engine, Table, and_, bindparam, insert, select
from sqlalchemy.orm import Session, contains_eager, sessionmaker
from temporalio.exceptions import ApplicationError

from models.contracts import ScopeStatement
from models.enums import PLATFORM_OF, NhiKind, NhiStatus, Platform, Role
from models.orm import Agent, AuditEvent, Nhi, Policy, TaskCredential
from nhi.infra.db import transaction
from nhi.rules.github_scope import check_github_task_scope, github_task_ttl
from nhi.rules.policy import RuleViolation
from nhi.rules.task_credentials import (
    AWS_MIN_TTL_SECONDS,
    TASK_KINDS,
    IssuedCredential,
    TaskGrant,
    check_aws_narrowing,
    check_postgres_narrowing,
    check_task_id,
    parse_task_ttl,
    session_policy,
    session_tags,
    source_identity,
)
from nhi.services.auth import Principal, require, require_visible_nhi
from nhi.services.errors import Conflict, NotFound, PolicyViolation
from nhi.services.policies import check_scope, rules_of
from nhi.services.transitions import note

log = logging.getLogger(__name__)

Issuer = Callable[[TaskGrant], IssuedCredential]
"""A platform's `TaskCredentialProvider.issue` (activities/providers/base.py)."""

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
            f"{p.actor} is an agent token of another agent: it issues only for its own NHIs",
        )
        return
    require_visible_nhi(p, nhi.id, nhi.agent)
    require(not p.has(Role.AUDITOR), f"{p.actor} is an auditor: auditors issue nothing")
    require(
        p.owns(nhi.agent),
        f"{p.actor} is neither agent {nhi.agent.name} (an agent token) nor its owner or "
        "backup owner",
    )


def _load(session: Session, nhi_id: uuid.UUID) -> tuple[Nhi, Policy | None] | None:
    """The NHI, its agent and its policy in one query (one round trip per issue, not three)."""
    found = session.execute(
        select(Nhi, Policy)
        .join(Nhi.agent)
        .outerjoin(
            Policy,
            and_(
                Policy.platform == Nhi.platform,
                Policy.kind == Nhi.kind,
                Policy.environment == Agent.environment,
            ),
        )
        .options(contains_eager(Nhi.agent))
        .where(Nhi.id == nhi_id)
    ).one_or_none()
    return None if found is None else (found[0], found[1])


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


def prepare(
    session: Session, p: Principal, nhi_id: uuid.UUID, request: TaskRequest, now: datetime
) -> TaskGrant:
    """Check everything, then record the credential (row + one audit event) in `session`.

    Raises:
        NotFound: no such NHI, or `p` may not see it (404).
        Forbidden: `p` may see it but not issue from it (403).
        Conflict: the NHI is not active, or its kind has no task credentials (409).
        PolicyViolation: the policy does not allow task credentials (422).
        RuleViolation: a bad TTL, task id or scope, naming the field (422).
    """
    loaded = _load(session, nhi_id)
    if loaded is None:
        raise NotFound(f"nhi {nhi_id} not found")
    nhi, found_policy = loaded
    authorize(p, nhi)
    if nhi.status != NhiStatus.ACTIVE.value:
        raise Conflict(f"nhi {nhi_id} is {nhi.status}: task credentials come from active NHIs")
    kind = NhiKind(nhi.kind)
    if kind not in TASK_KINDS or not nhi.external_id:
        raise Conflict(f"task credentials come from iam_role and postgres_role NHIs, not {kind}")
    policy = _policy(nhi, found_policy)
    ttl = _ttl(nhi, policy, request.ttl)
    expires_at = now + timedelta(seconds=ttl)
    if expires_at > nhi.expires_at:
        raise RuleViolation(
            "ttl", f"would outlive its NHI, which expires at {nhi.expires_at.isoformat()}"
        )
    grant = TaskGrant(
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
    _record(session, p, nhi, grant)
    return grant


def _record(session: Session, p: Principal, nhi: Nhi, grant: TaskGrant) -> None:
    """The row and its one audit event in ONE statement (a data-modifying CTE): both or
    neither, committed by the time it returns, in a single round trip."""
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
    row = insert(cast(Table, TaskCredential.__table__)).values(
        id=grant.credential_id,
        nhi_id=nhi.id,
        agent_id=nhi.agent_id,
        platform=nhi.platform,
        name=grant.name,
        task_id=grant.task_id,
        issued_by=p.actor,
        issued_at=grant.issued_at,
        expires_at=grant.expires_at,
        scope=scope,
        status="active",
    )
    event = insert(cast(Table, AuditEvent.__table__)).values(
        subject_type=SUBJECT_TYPE,
        subject_id=str(grant.credential_id),
        event=ISSUED_EVENT,
        actor=p.actor,
        reason=f"task credential {grant.name} for task {grant.task_id or '-'} "
        f"of agent {nhi.agent.name}, {grant.ttl_seconds} s",
        details={
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
    )
    session.execute(event.add_cte(row.cte("task_credential")))


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
    select(Nhi.status, TaskCredential.status)
    .join(TaskCredential, TaskCredential.nhi_id == Nhi.id)
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
    status, row = found if found is not None else (None, None)
    if status != NhiStatus.ACTIVE.value or row != "active":
        raise Conflict(
            f"nhi {grant.nhi_id} is {status} now: task credential {grant.name} was withheld "
            "and will be removed"
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
    issuer_for: Callable[[Platform], Issuer],
) -> IssuedCredential:
    """The platform call; a failure ends the recorded row as `issue_failed`."""
    platform = PLATFORM_OF[grant.kind]
    try:
        return issuer_for(platform)(grant)
    except ApplicationError as err:
        error = f"{err.type or 'Error'}: {err.message}"
        _failed(sessions, grant, p.actor, error)
        raise IssueFailed(
            f"the platform did not issue task credential {grant.name}: {error}"
        ) from None
    except Exception as err:
        # Unclassified: its text might quote a request, so only its type is kept.
        log.warning("task credential %s not issued: %s", grant.name, type(err).__name__)
        _failed(sessions, grant, p.actor, type(err).__name__)
        raise IssueFailed(
            f"the platform did not issue task credential {grant.name} ({type(err).__name__})"
        ) from None


def issue(
    sessions: sessionmaker[Session],
    p: Principal,
    nhi_id: uuid.UUID,
    request: TaskRequest,
    issuer_for: Callable[[Platform], Issuer],
    *,
    now: datetime | None = None,
) -> tuple[TaskGrant, IssuedCredential]:
    """Record, then issue on the platform; the credential is only in the return value.

    Raises:
        everything `prepare` raises (nothing recorded), and
        IssueFailed: the platform refused (the row is then ended as `issue_failed`).
    """
    with _inventory(sessions) as conn:
        # Autocommit: the checks read, then ONE statement writes the row and its event (no
        # BEGIN/COMMIT round trips); a refusal writes nothing.
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        with Session(bind=auto, expire_on_commit=False) as session:
            grant = prepare(session, p, nhi_id, request, now or datetime.now(UTC))
        issued = _on_platform(sessions, p, grant, issuer_for)
        _still_usable(conn, grant)
    log.info(
        "task credential %s issued from nhi %s until %s",
        grant.name,
        grant.nhi_id,
        grant.expires_at.isoformat(),
    )
    return grant, issued
