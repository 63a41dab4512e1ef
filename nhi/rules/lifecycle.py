"""The lifecycle core: what one NHI's lifecycle must do next, and how each step changes its state.

Pure rules over the workflow's state: no I/O, no clock (the caller passes `now`), no settings,
no workflow API, so the lifecycle workflow imports them through its sandbox and property tests
drive them directly (tests/test_lifecycle_core.py). The workflow asks `next_action`, carries
the action out with activities, then applies the matching `after_*` transition; both sides use
the same functions, so a rule lives in one place.

The state given to `next_action` carries the actions accepted but not yet carried out in its
`pending_decommission` and `pending_rotate` fields (the form it crosses continue-as-new in).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from models.contracts import LifecycleAction, LifecycleConfig, LifecycleState, Phase, RetireKey
from models.enums import ROTATABLE_KINDS, NhiStatus

ISO = "%Y-%m-%dT%H:%M:%SZ"
ENDED = (Phase.DECOMMISSIONED, Phase.MISSING)
# The type of a lifecycle update's refusal while its run is still provisioning the NHI: "not
# yet", not "not allowed" (containment asks again until the run takes the NHI over).
STILL_PROVISIONING = "StillProvisioning"
# How a containment pass reports a lifecycle it could not hold yet (workflows/contain.py for a
# hold that failed, `hold_lifecycle` for one not answered): the pass is then partial and
# repeated (nhi/services/incidents.record_pass), since a lifecycle left running could rotate
# or restore behind the incident.
HOLD_FAILED = "hold failed"
HOLD_NOT_ANSWERED = "the lifecycle did not answer"
# No extension is ever longer than a policy's maximum lifetime can be.
MAX_EXTENSION_SECONDS = 366 * 86400
# A rotation that failed is tried again this much later; the current key stays in use.
ROTATION_RETRY_DELAY = timedelta(hours=6)
MIN_ROTATION_RETRY_DELAY = timedelta(minutes=1)

# ---- actions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sleep:
    """Nothing is due: wait until `until` (or until an update changes the state)."""

    until: datetime


@dataclass(frozen=True)
class Remind:
    """Send the reminder for this offset (seconds before the expiry) of the current term."""

    offset: int


@dataclass(frozen=True)
class Escalate:
    """Tell the backup owner and the team too (decided after a reminder was delivered)."""

    offset: int
    reason: str


@dataclass(frozen=True)
class Rotate:
    """Stage, prove and promote a new key; `request` is who asked, None for the period."""

    request: LifecycleAction | None


@dataclass(frozen=True)
class RetireOldKey:
    """Deactivate (then, one overlap later, delete) `key_id`, a key a rotation replaced."""

    key_id: str
    deactivate: bool


@dataclass(frozen=True)
class Expire:
    """The expiry passed without renewal: the decommission `request` becomes pending (and is
    carried out, like any pending decommission, by a `Quarantine` on the next step)."""

    request: LifecycleAction


@dataclass(frozen=True)
class Quarantine:
    """Carry out the pending decommission: quarantine now, delete after the grace period."""

    request: LifecycleAction


@dataclass(frozen=True)
class Delete:
    """The grace period is over: remove the identity for good."""


@dataclass(frozen=True)
class RetryRemoval:
    """A removal failed (`revoke_failed`) and its retry period has passed: try again."""


@dataclass(frozen=True)
class ContinueAsNew:
    """History is long: start the next run with the state (and pending actions) carried."""


@dataclass(frozen=True)
class Done:
    """Decommissioned or missing: the run ends and never acts on the identity again."""


Action = (
    Sleep
    | Remind
    | Rotate
    | RetireOldKey
    | Expire
    | Quarantine
    | Delete
    | RetryRemoval
    | ContinueAsNew
    | Done
)


class ExpiryRefused(Exception):
    """A renewal or restore the rules refuse; `kind` is the error type callers see."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


# ---- what is due ---------------------------------------------------------------------------


def next_action(
    state: LifecycleState, config: LifecycleConfig, now: datetime, *, history_full: bool = False
) -> Action:
    """The one thing that is due now, in priority order, or how long to sleep.

    `history_full` is the workflow's "continue-as-new suggested"; it wins over any step so the
    next run starts before history grows further (the pending actions travel with the state).
    """
    if state.phase in ENDED:
        return Done()
    if history_full:
        return ContinueAsNew()
    if state.phase is Phase.QUARANTINED:
        end = grace_end(state, config, now)
        return Delete() if now >= end else Sleep(end)
    if state.phase is Phase.REVOKE_FAILED:
        retry_at = (state.quarantined_at or now) + timedelta(seconds=config.revoke_retry_seconds)
        return RetryRemoval() if now >= retry_at else Sleep(retry_at)

    # Active. A decommission someone asked for comes first, then the expiry.
    if state.pending_decommission is not None:
        return Quarantine(state.pending_decommission)
    if now >= state.expires_at:
        return Expire(
            LifecycleAction(
                actor="system:expiry",
                channel="system",
                reason=f"expired at {state.expires_at.strftime(ISO)} without renewal",
            )
        )
    for retiring in state.retiring:  # oldest first
        if now >= retiring.due_at:
            return RetireOldKey(retiring.key_id, deactivate=not retiring.deactivated)
    # A scheduled rotation waits until the previous ones' old keys are gone; a request does not.
    rotation_due = state.next_rotation_at is not None and now >= state.next_rotation_at
    if state.pending_rotate is not None or (rotation_due and not state.retiring):
        return Rotate(state.pending_rotate)
    offset = due_reminder(state, config, now)
    if offset is not None:
        return Remind(offset)
    return Sleep(next_deadline(state, config))


def due_reminder(state: LifecycleState, config: LifecycleConfig, now: datetime) -> int | None:
    """The first reminder offset (in the policy's order) whose moment has come in this term."""
    if state.let_expire:
        return None
    for offset in config.reminder_offsets_seconds:
        if offset not in state.reminders_done and now >= reminder_at(state, offset):
            return offset
    return None


def reminder_at(state: LifecycleState, offset: int) -> datetime:
    return state.expires_at - timedelta(seconds=offset)


def next_deadline(state: LifecycleState, config: LifecycleConfig) -> datetime:
    """When something next becomes due in an active lifecycle with nothing due now."""
    deadlines = [state.expires_at]
    deadlines += [retiring.due_at for retiring in state.retiring]
    if not state.retiring and state.next_rotation_at is not None:
        # While an old key retires the rotation waits for it (see `next_action`), so its past
        # moment is no deadline: counting it would wake the run in a loop with nothing to do.
        deadlines.append(state.next_rotation_at)
    if not state.let_expire:
        deadlines += [
            reminder_at(state, o)
            for o in config.reminder_offsets_seconds
            if o not in state.reminders_done
        ]
    return min(deadlines)


def escalation(
    state: LifecycleState, config: LifecycleConfig, offset: int, owner_reachable: bool
) -> Escalate | None:
    """After a reminder: escalate (once per term) when the owner cannot be reached, or when
    this was the last reminder before the expiry."""
    if state.escalated:
        return None
    if not owner_reachable:
        return Escalate(offset, "the owner has no active Slack account")
    if offset == min(config.reminder_offsets_seconds):
        return Escalate(offset, "no answer by the last reminder")
    return None


# ---- expiry rules --------------------------------------------------------------------------


def past_offsets(config: LifecycleConfig, expires_at: datetime, now: datetime) -> list[int]:
    # Reminders whose moment has already passed when a term starts are skipped, not sent in a
    # burst: a 7-day credential gets no "14 days left" message.
    return [o for o in config.reminder_offsets_seconds if expires_at - timedelta(seconds=o) <= now]


def grace_end(state: LifecycleState, config: LifecycleConfig, now: datetime) -> datetime:
    """When a quarantined NHI is deleted."""
    start = state.quarantined_at or now
    return start + timedelta(seconds=config.grace_period_seconds)


def cap(config: LifecycleConfig) -> tuple[datetime, str]:
    """The latest an expiry may move to, and what sets it: the maximum lifetime, or the
    agent's expected end when that comes first."""
    end = config.expected_end_at
    if end is not None and end < config.max_lifetime_at:
        return end, f"the agent's expected end ({end.strftime(ISO)})"
    return config.max_lifetime_at, f"the maximum lifetime ({config.max_lifetime_at.strftime(ISO)})"


def renewed_expiry(
    state: LifecycleState,
    config: LifecycleConfig,
    now: datetime,
    extend_by_seconds: int | None,
    *,
    strict: bool = False,
) -> datetime:
    """The expiry a renewal moves to, or `ExpiryRefused`.

    `strict` (validators, and handlers of runs on today's code): never past the maximum
    lifetime nor the agent's expected end; a default renewal never shortens the expiry;
    `extend_by` counts from now and is refused when it would end before the current expiry
    (an extension never shortens). Without it, the rules runs recorded earlier replay with.
    """
    if strict:
        return capped_expiry(state, config, now, extend_by_seconds)
    if now >= config.max_lifetime_at:
        raise ExpiryRefused("already at its maximum lifetime", "MaxLifetime")
    if extend_by_seconds is None:
        return min(now + timedelta(seconds=config.default_ttl_seconds), config.max_lifetime_at)
    wanted = now + timedelta(seconds=extend_by_seconds)
    if wanted > config.max_lifetime_at:
        raise ExpiryRefused(
            f"extend_by: would end {wanted.strftime(ISO)}, past the maximum lifetime "
            f"({config.max_lifetime_at.strftime(ISO)})",
            "MaxLifetime",
        )
    return wanted


def capped_expiry(
    state: LifecycleState, config: LifecycleConfig, now: datetime, extend_by_seconds: int | None
) -> datetime:
    limit, what = cap(config)
    if now >= limit:
        raise ExpiryRefused(f"already at {what}", "MaxLifetime")
    current = state.expires_at
    if extend_by_seconds is None:
        return min(max(now + timedelta(seconds=config.default_ttl_seconds), current), limit)
    # Compared in seconds first: a huge value must be refused, not overflow a datetime.
    if extend_by_seconds > (limit - now).total_seconds():
        wanted = "after " + limit.strftime(ISO)
        if extend_by_seconds <= MAX_EXTENSION_SECONDS:
            wanted = (now + timedelta(seconds=extend_by_seconds)).strftime(ISO)
        raise ExpiryRefused(f"extend_by: would end {wanted}, past {what}", "MaxLifetime")
    wanted_at = now + timedelta(seconds=extend_by_seconds)
    if wanted_at < current:
        raise ExpiryRefused(
            f"extend_by: would end {wanted_at.strftime(ISO)}, before the current expiry "
            f"({current.strftime(ISO)}); extend_by counts from now and never shortens an "
            "expiry",
            "ShortensExpiry",
        )
    return wanted_at


def check_restorable(config: LifecycleConfig, now: datetime) -> None:
    """A quarantined NHI can be restored only before its cap."""
    limit, what = cap(config)
    if now >= limit:
        raise ExpiryRefused(f"past {what}: request a new identity instead", "MaxLifetime")


def restored_expiry(
    state: LifecycleState, config: LifecycleConfig, now: datetime, *, strict: bool
) -> datetime:
    """The expiry a restore leaves: the current one, renewed if it has passed, never past the
    cap (`strict`, today's code)."""
    expiry = state.expires_at
    if expiry <= now:
        expiry = renewed_expiry(state, config, now, None, strict=strict)
    if strict:
        expiry = min(expiry, cap(config)[0])
    return expiry


# ---- state transitions (applied by the workflow after an action's activities succeed) -------

_PHASE_OF_STATUS = {
    NhiStatus.QUARANTINED: Phase.QUARANTINED,
    NhiStatus.REVOKE_FAILED: Phase.REVOKE_FAILED,
    NhiStatus.DECOMMISSIONED: Phase.DECOMMISSIONED,
    NhiStatus.MISSING: Phase.MISSING,
}


def initial_state(
    config: LifecycleConfig, now: datetime, pending_decommission: LifecycleAction | None = None
) -> LifecycleState:
    """The state a fresh run starts from (the inventory's view), with a decommission pending
    when the agent's task has ended."""
    next_rotation = None
    if config.kind in ROTATABLE_KINDS and config.rotation_period_seconds:
        base = config.last_rotated_at or config.activated_at
        next_rotation = base + timedelta(seconds=config.rotation_period_seconds)
    phase = _PHASE_OF_STATUS.get(config.status, Phase.ACTIVE)
    if config.agent_completed and phase is Phase.ACTIVE:
        pending_decommission = LifecycleAction(
            actor="system:agent-completed", channel="system", reason="the agent's task ended"
        )
    return LifecycleState(
        phase=phase,
        expires_at=config.expires_at,
        reminders_done=past_offsets(config, config.expires_at, now),
        next_rotation_at=next_rotation,
        quarantined_at=now if phase is not Phase.ACTIVE else None,
        pending_decommission=pending_decommission,
    )


def after_reminder(state: LifecycleState, offset: int, prompt_id: uuid.UUID) -> LifecycleState:
    return state.model_copy(
        update={
            "reminders_done": [*state.reminders_done, offset],
            "open_prompts": [*state.open_prompts, prompt_id],
        }
    )


def after_escalation(state: LifecycleState, prompt_id: uuid.UUID) -> LifecycleState:
    return state.model_copy(
        update={"escalated": True, "open_prompts": [*state.open_prompts, prompt_id]}
    )


def after_renewal(
    state: LifecycleState, config: LifecycleConfig, expiry: datetime, now: datetime
) -> LifecycleState:
    """A new term: reminders already past for it are skipped, escalation starts over."""
    return state.model_copy(
        update={
            "expires_at": expiry,
            "reminders_done": past_offsets(config, expiry, now),
            "escalated": False,
            "let_expire": False,
        }
    )


def after_let_expire(state: LifecycleState) -> LifecycleState:
    return state.model_copy(update={"let_expire": True})


def with_decommission(state: LifecycleState, request: LifecycleAction) -> LifecycleState:
    return state.model_copy(update={"pending_decommission": request})


def with_rotation(state: LifecycleState, request: LifecycleAction) -> LifecycleState:
    return state.model_copy(update={"pending_rotate": request})


def after_rotation(
    state: LifecycleState,
    config: LifecycleConfig,
    started: datetime,
    *,
    old_key_id: str | None,
    new_key_id: str,
    keep_retiring: bool = True,
) -> LifecycleState:
    """A new key is promoted: the old one retires over two overlaps; the period restarts.

    Keys already retiring keep retiring (`keep_retiring`; runs recorded before it dropped
    them), except the new key itself: a platform with two alternating credentials (Postgres
    logins) re-keys the one still retiring, and that one must not be retired now it is current.
    """
    retiring = [r for r in state.retiring if r.key_id not in (new_key_id, old_key_id)]
    if not keep_retiring:
        retiring = []
    if old_key_id and old_key_id != new_key_id:
        overlap = timedelta(seconds=config.rotation_overlap_seconds)
        retiring.append(
            RetireKey(
                key_id=old_key_id, deactivate_at=started + overlap, delete_at=started + 2 * overlap
            )
        )
    period = config.rotation_period_seconds
    return state.model_copy(
        update={
            "retiring": retiring,
            "next_rotation_at": started + timedelta(seconds=period) if period else None,
            "pending_rotate": None,
        }
    )


def rotation_retry_delay(config: LifecycleConfig) -> timedelta:
    """When a failed rotation is tried again: a ninth of the rotation period, between a minute
    and ROTATION_RETRY_DELAY. A GitHub token re-issued every 45 minutes gets two more tries
    (after 5 and 10 minutes) before the one in use lapses at its hour; a 90-day AWS key waits
    the full 6 h (the current key stays in use meanwhile)."""
    period = config.rotation_period_seconds
    if not period:
        return ROTATION_RETRY_DELAY
    return min(ROTATION_RETRY_DELAY, max(MIN_ROTATION_RETRY_DELAY, timedelta(seconds=period) / 9))


def after_rotation_failed(
    state: LifecycleState, started: datetime, delay: timedelta = ROTATION_RETRY_DELAY
) -> LifecycleState:
    return state.model_copy(update={"next_rotation_at": started + delay, "pending_rotate": None})


def after_rotation_not_applicable(state: LifecycleState) -> LifecycleState:
    return state.model_copy(update={"next_rotation_at": None, "pending_rotate": None})


def after_retire(state: LifecycleState, key_id: str, *, deactivate: bool) -> LifecycleState:
    """The old key `key_id` was deactivated (it is deleted one overlap later), or deleted."""
    retiring: list[RetireKey] = []
    for r in state.retiring:
        if r.key_id != key_id:
            retiring.append(r)
        elif deactivate:
            retiring.append(r.model_copy(update={"deactivated": True}))
    return state.model_copy(update={"retiring": retiring})


def after_quarantine(state: LifecycleState, now: datetime, reason: str) -> LifecycleState:
    """Quarantined: the grace period starts; the pending actions are done with."""
    return state.model_copy(
        update={
            "phase": Phase.QUARANTINED,
            "quarantined_at": now,
            "decommission_reason": reason,
            "pending_decommission": None,
            "pending_rotate": None,
        }
    )


def after_revoke_failed(
    state: LifecycleState, now: datetime, *, new_episode: bool
) -> LifecycleState:
    """A quarantine or removal failed: retried one retry period from now. Within the same
    failure episode only the retry clock moves."""
    if not new_episode:
        return state.model_copy(update={"quarantined_at": now})
    return state.model_copy(
        update={
            "phase": Phase.REVOKE_FAILED,
            "quarantined_at": now,
            "pending_decommission": None,
        }
    )


def after_removal(state: LifecycleState) -> LifecycleState:
    return state.model_copy(update={"phase": Phase.DECOMMISSIONED})


def after_restore(
    state: LifecycleState, config: LifecycleConfig, expiry: datetime, now: datetime
) -> LifecycleState:
    """Back to active for a new term (the grace clock and the reason are cleared)."""
    return after_renewal(state, config, expiry, now).model_copy(
        update={"phase": Phase.ACTIVE, "quarantined_at": None, "decommission_reason": None}
    )


def after_missing(state: LifecycleState, reason: str) -> LifecycleState:
    return state.model_copy(
        update={
            "phase": Phase.MISSING,
            "decommission_reason": reason,
            "pending_decommission": None,
            "pending_rotate": None,
        }
    )
