"""The task reaper's activity: end task credentials that expired or whose NHI stopped being
usable, a batch at a time.

A task credential (issue 15) is issued off the workflow path and never renewed; what is
durable about it is this: every `NHI_TASK_REAPER_INTERVAL_SECONDS` the `TaskReaperWorkflow`
(a Temporal Schedule) calls `reap_task_credentials` until no batch is left. A call takes
batches one after the other while they are full and none fails, for up to CALL_BUDGET_S (one
round trip through the workflow per call, not per batch). One batch:

* claims up to `batch_size` live rows (`active` or `reap_failed`) past their expiry, or whose
  NHI is quarantined or gone, `FOR UPDATE SKIP LOCKED`, so two reapers never take the same
  rows; the rows stay locked until the call commits;
* drops their Postgres login roles, one admin connection and one transaction per target
  (activities/providers/postgres_reap.py), and proves them gone from pg_roles. AWS task
  credentials are STS sessions: they lapse on their own (and the NHI's quarantine deny already
  refuses them), so their rows are only ended;
* ends each row (`ended`, with `end_reason` `expired`, `parent_quarantined` or
  `parent_removed`) or, when its role could not be dropped, makes it `reap_failed` with the
  cause in `last_error`; one audit event per state change. A `reap_failed` row stays live and
  is tried again every run; only its first failure is returned for an alert.

Only ids, names, targets and error texts leave: a task credential's secret never existed here.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import Field
from sqlalchemy import Select, func, literal, or_, select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._support import heartbeating
from activities.providers import postgres_ddl as ddl
from activities.providers.postgres_reap import Reaped, reap_task_roles, reason
from models.contracts import Contract
from models.enums import NhiStatus, Platform
from models.orm import Nhi, TaskCredential
from nhi.infra.db import transaction
from nhi.rules.task_credentials import is_task_role_name
from nhi.services import audit
from nhi.services.target_registry import TargetResolver
from nhi.services.transitions import subject_type_of, transition

log = logging.getLogger(__name__)

REAPER_ACTOR = "system:reaper"
# NHI statuses in which a task credential of it may live on until its own expiry.
USABLE = frozenset({NhiStatus.ACTIVE, NhiStatus.ROTATING, NhiStatus.EXPIRING})
# Contained but still there (restorable, or its removal under way): its credentials were
# locked out by the quarantine.
CONTAINED = frozenset({NhiStatus.QUARANTINED, NhiStatus.REVOKE_FAILED})
# How long one call goes on taking full batches (see `reap_task_credentials`).
CALL_BUDGET_S = 5.0
MAX_REPORTED_FAILURES = 20  # first failures returned per batch (for the alert); the rest counted


# ---- payloads ---------------------------------------------------------------------------------


class ReapCursor(Contract):
    """Where the previous batch of this run stopped (rows are taken in (expires_at, id)
    order), so a run never takes the same `reap_failed` rows twice."""

    expires_at: datetime
    id: uuid.UUID


class ReapInput(Contract):
    """One batch of the reaper."""

    batch_size: int = Field(default=200, ge=1, le=1000)
    after: ReapCursor | None = None


class ReapFailure(Contract):
    """A task credential whose login role could not be dropped for the first time."""

    credential_id: uuid.UUID
    nhi_id: uuid.UUID
    name: str
    target: str | None = None
    error: str


class ReapBatch(Contract):
    """What one batch did: counts per platform, new failures, and where to go on (None: this
    was the last batch)."""

    ended: dict[str, int] = {}
    reap_failed: dict[str, int] = {}
    reasons: dict[str, int] = {}
    failures: list[ReapFailure] = []
    next: ReapCursor | None = None


class ReaperInput(Contract):
    """One reaper run (what the Schedule starts)."""

    batch_size: int = Field(default=200, ge=1, le=1000)
    # A run's history stays small: anything beyond is left for the next run.
    max_batches: int = Field(default=50, ge=1, le=500)
    triggered_by: str = "system:schedule"


class ReaperOutcome(Contract):
    """A reaper run's totals."""

    batches: int = 0
    ended: dict[str, int] = {}
    reap_failed: dict[str, int] = {}
    reasons: dict[str, int] = {}
    new_failures: int = 0


# ---- the activity -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Claimed:
    row: TaskCredential
    nhi_status: str
    target: str | None


@dataclass(frozen=True)
class _Result:
    """A row's platform outcome: gone (and how), or the error that kept it."""

    done: str | None = None
    error: str | None = None


class ReaperActivities:
    """Claim, drop, record: the durable half of task credentials."""

    def __init__(self, sessions: sessionmaker[Session], targets: TargetResolver) -> None:
        self._sessions = sessions
        # Reused for a few seconds, as the task issuer does: a run's batches, one after the
        # other, read the registry and the admin secret once, not once per batch.
        self._targets = ddl.ResolvedTargets(targets)

    @activity.defn
    def reap_task_credentials(self, inp: ReapInput) -> ReapBatch:
        """End expired (or orphaned-by-containment) task credentials, a batch (one
        transaction) at a time: the next full batch follows in the same call while none
        failed, for up to CALL_BUDGET_S. Under a mass expiry that spares the run an activity
        round trip per batch (a workflow task and a poll each, most of a batch's time once
        the batch itself was fast), and a failure still returns at once for the alert."""
        started = time.monotonic()
        total = ReapBatch()
        after = inp.after
        with heartbeating():
            while True:
                batch = self._batch(inp.model_copy(update={"after": after}))
                total = ReapBatch(
                    ended=merge(total.ended, batch.ended.items()),
                    reap_failed=merge(total.reap_failed, batch.reap_failed.items()),
                    reasons=merge(total.reasons, batch.reasons.items()),
                    failures=batch.failures,
                    next=batch.next,
                )
                if (
                    batch.next is None
                    or batch.failures
                    or time.monotonic() - started >= CALL_BUDGET_S
                ):
                    return total
                after = batch.next

    def _batch(self, inp: ReapInput) -> ReapBatch:
        """One batch: claim, drop, record, in one inventory transaction."""
        with transaction(self._sessions) as session:
            claimed = [
                _Claimed(row, str(status), target)
                for row, status, target in session.execute(_claim(inp)).all()
            ]
            results = self._drop(claimed)
            batch = _record(session, claimed, results)
        if len(claimed) == inp.batch_size:
            last = claimed[-1].row
            batch = batch.model_copy(
                update={"next": ReapCursor(expires_at=last.expires_at, id=last.id)}
            )
        return batch

    def _drop(self, claimed: list[_Claimed]) -> dict[uuid.UUID, _Result]:
        results: dict[uuid.UUID, _Result] = {}
        by_target: dict[str, list[TaskCredential]] = {}
        for c in claimed:
            if c.row.platform == Platform.AWS.value:
                results[c.row.id] = _Result(done="its STS session lapses on its own")
            elif c.row.platform == Platform.GITHUB.value:
                results[c.row.id] = _Result(done="its GitHub token lapses on its own (one hour)")
            elif c.row.platform != Platform.POSTGRES.value:
                results[c.row.id] = _Result(error=f"UnknownPlatform: {c.row.platform!r}")
            elif not is_task_role_name(c.row.name):
                # Never DROP a role a row merely names: only `nhit_<credential id>` roles.
                results[c.row.id] = _Result(
                    error=f"InvalidName: {c.row.name!r} is not a task credential's role name"
                )
            elif not c.target:
                results[c.row.id] = _Result(error="InvalidPlan: its NHI names no target")
            else:
                by_target.setdefault(c.target, []).append(c.row)
        for target, rows in sorted(by_target.items()):
            results |= self._drop_on(target, rows)
        return results

    def _drop_on(self, target: str, rows: list[TaskCredential]) -> dict[uuid.UUID, _Result]:
        try:
            reaped = reap_task_roles(self._targets.get(target), {r.name: r.id for r in rows})
        except ApplicationError as err:  # the target cannot be reached: every row waits
            self._targets.forget(target)  # resolved afresh next time
            log.warning("task roles on target %s not reaped: %s", target, err.message)
            reaped = Reaped(failed={r.name: reason(err) for r in rows})
        gone = set(reaped.gone)
        return {
            r.id: _Result(done="its login role is dropped")
            if r.name in gone
            else _Result(error=reaped.failed.get(r.name, "NotRemoved: unknown"))
            for r in rows
        }


def _claim(inp: ReapInput) -> Select[TaskCredential, str, str | None]:
    """Live rows past expiry, or whose NHI is no longer usable, oldest expiry first. The
    partial index on live rows' `expires_at` serves it: live rows are few (a task credential
    lives an hour at most), ended ones are never read."""
    query = (
        select(TaskCredential, Nhi.status, Nhi.target)
        .join(Nhi, Nhi.id == TaskCredential.nhi_id)
        .where(
            TaskCredential.status != "ended",
            or_(
                TaskCredential.expires_at <= func.now(),
                Nhi.status.not_in(sorted(s.value for s in USABLE)),
            ),
        )
        .order_by(TaskCredential.expires_at, TaskCredential.id)
        .limit(inp.batch_size)
        .with_for_update(of=TaskCredential, skip_locked=True)
    )
    if inp.after is not None:
        query = query.where(
            tuple_(TaskCredential.expires_at, TaskCredential.id)
            > tuple_(
                literal(inp.after.expires_at, TaskCredential.expires_at.type),
                literal(inp.after.id, TaskCredential.id.type),
            )
        )
    return query


def end_reason(nhi_status: str) -> str:
    """Why a task credential ended: its NHI's state when that is no longer usable (it ended
    the credential at once), else the clock."""
    if nhi_status in USABLE:
        return "expired"
    if nhi_status in CONTAINED:
        return "parent_quarantined"
    return "parent_removed"


def _record(
    session: Session, claimed: list[_Claimed], results: dict[uuid.UUID, _Result]
) -> ReapBatch:
    now = datetime.now(UTC)
    ended: dict[str, int] = {}
    failing: dict[str, int] = {}
    reasons: dict[str, int] = {}
    failures: list[ReapFailure] = []
    ending: list[tuple[TaskCredential, str, str, str]] = []
    for c in claimed:
        row, result = c.row, results[c.row.id]
        if result.error is None:
            why = end_reason(c.nhi_status)
            ending.append((row, why, c.nhi_status, result.done or ""))
            ended[row.platform] = ended.get(row.platform, 0) + 1
            reasons[why] = reasons.get(why, 0) + 1
            continue
        failing[row.platform] = failing.get(row.platform, 0) + 1
        if _fail(session, row, result.error) and len(failures) < MAX_REPORTED_FAILURES:
            failures.append(
                ReapFailure(
                    credential_id=row.id,
                    nhi_id=row.nhi_id,
                    name=row.name,
                    target=c.target,
                    error=result.error,
                )
            )
    _end_all(session, ending, now)
    return ReapBatch(ended=ended, reap_failed=failing, reasons=reasons, failures=failures)


def _end_all(
    session: Session, ending: list[tuple[TaskCredential, str, str, str]], now: datetime
) -> None:
    """End the batch's rows as `transition` would one by one (an event each, at most once
    per row; a row whose event exists is left as it is), in one INSERT of their events and
    one UPDATE per end reason: per row, the event's insert and the row's update were two
    round trips each, most of a batch's time."""
    events = []
    for row, why, nhi_status, done in ending:
        cause = (
            f"expired at {row.expires_at:%Y-%m-%d %H:%M:%S} UTC"
            if why == "expired"
            else f"its NHI is {nhi_status}"
        )
        events.append(
            audit.Once(
                subject_type=subject_type_of(row),
                subject_id=row.id,
                event="task_credential.ended",
                actor=REAPER_ACTOR,
                reason=f"{cause}; {done}",
                key="reaper/ended",
                details={"end_reason": why, "platform": row.platform, "name": row.name},
            )
        )
    written = audit.record_once_many(session, events)
    by_reason: dict[str, list[uuid.UUID]] = {}
    for row, why, _, _ in ending:
        if str(row.id) in written:
            by_reason.setdefault(why, []).append(row.id)
    for why, ids in sorted(by_reason.items()):
        # Not synchronized with the loaded rows (matching them in Python cost more than the
        # UPDATE): nothing reads them after this but the batch's cursor (id, expires_at).
        session.execute(
            update(TaskCredential)
            .where(TaskCredential.id.in_(ids))
            .values(status="ended", ended_at=now, end_reason=why, last_error=None)
            .execution_options(synchronize_session=False)
        )


def _fail(session: Session, row: TaskCredential, error: str) -> bool:
    """`reap_failed` with the cause; True on the first failure (the state change, with its
    audit event). Later failures only refresh `last_error`."""
    if row.status == "reap_failed":
        row.last_error = error
        return False
    return transition(
        session,
        row,
        event="task_credential.reap_failed",
        actor=REAPER_ACTOR,
        reason=error,
        status="reap_failed",
        changes={"last_error": error},
        details={"platform": row.platform, "name": row.name},
        key="reaper/reap_failed",
    )


def merge(total: dict[str, int], more: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Counts added up (the workflow's totals over batches)."""
    out = dict(total)
    for key, count in more:
        out[key] = out.get(key, 0) + count
    return out
