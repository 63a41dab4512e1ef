"""Property tests of the pure lifecycle core (nhi/rules/lifecycle.py).

Random lives drive `next_action` and the core's own `after_*` transitions through a tiny
interpreter that does what `NhiLifecycleWorkflow` does with each action (activities succeed or
fail by the faults the sequence switches on), while updates arrive as their validators allow.
The invariants: nothing acts after decommission; each reminder at most once per offset per
term; an expiry never moves past the caps; quarantine always precedes deletion; a pending
decommission is never lost; a sleep never ends in the past; no key a rotation replaced is ever
forgotten before it is deleted, and the current key is never retired.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.contracts import (
    LifecycleAction,
    LifecycleConfig,
    LifecycleInput,
    LifecycleState,
    Phase,
    ProvisionPlan,
    RetireKey,
)
from models.enums import ROTATABLE_KINDS, NhiKind, NhiStatus
from nhi.rules import lifecycle as core

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = 86400
OFFSETS = [14 * DAY, 7 * DAY, 3 * DAY, DAY, 3600]
CHECKS = settings(max_examples=300, deadline=None, derandomize=True)
FEW = settings(max_examples=150, deadline=None, derandomize=True)
MAX_SPIN = 50  # steps at one moment: more means the run would spin without time passing
# Statuses a run may start in (a fresh run started for an NHI that was already contained).
RESUMED = (NhiStatus.QUARANTINED, NhiStatus.REVOKE_FAILED, NhiStatus.DECOMMISSIONED)


def config(**fields: Any) -> LifecycleConfig:
    """A lifecycle configuration (unvalidated: the core reads only these fields)."""
    kind = fields.get("kind", NhiKind.IAM_ROLE)
    base: dict[str, Any] = {
        "nhi_id": uuid.UUID(int=1),
        "agent_name": "agent",
        "team": "team",
        "kind": kind,
        "status": NhiStatus.ACTIVE,
        "owner_email": "owner@example.com",
        "expires_at": T0 + timedelta(days=7),
        "max_lifetime_at": T0 + timedelta(days=30),
        "expected_end_at": None,
        "activated_at": T0,
        "last_rotated_at": None,
        "default_ttl_seconds": DAY,
        "rotation_period_seconds": None,
        "reminder_offsets_seconds": [],
        "grace_period_seconds": 0,
        "rotation_overlap_seconds": 3600,
        "revoke_retry_seconds": 3600,
        "agent_completed": False,
        "plan": ProvisionPlan.model_construct(**{"identity_name": "nhi-agent", "kind": kind}),
    }
    return LifecycleConfig.model_construct(**(base | fields))


@st.composite
def configs(draw: st.DrawFn, kinds: tuple[NhiKind, ...] = tuple(NhiKind)) -> LifecycleConfig:
    ttl = draw(st.integers(3600, 60 * DAY))
    expires_at = T0 + timedelta(seconds=ttl)
    max_lifetime_at = expires_at + timedelta(seconds=draw(st.integers(0, 120 * DAY)))
    expected_end_at = draw(
        st.none() | st.integers(0, 150 * DAY).map(lambda s: expires_at + timedelta(seconds=s))
    )
    kind = draw(st.sampled_from(kinds))
    offsets = draw(st.lists(st.sampled_from(OFFSETS), unique=True, min_size=1, max_size=4))
    offsets.sort(reverse=True)
    return config(
        kind=kind,
        status=draw(st.sampled_from([NhiStatus.ACTIVE] * 9 + list(RESUMED))),
        expires_at=expires_at,
        max_lifetime_at=max_lifetime_at,
        expected_end_at=expected_end_at,
        activated_at=T0 - timedelta(seconds=draw(st.integers(0, 30 * DAY))),
        default_ttl_seconds=draw(st.integers(3600, 90 * DAY)),
        rotation_period_seconds=draw(st.integers(DAY, 30 * DAY) | st.none()),
        reminder_offsets_seconds=offsets,
        grace_period_seconds=draw(st.integers(0, 7 * DAY)),
        rotation_overlap_seconds=draw(st.integers(60, 2 * DAY)),
        revoke_retry_seconds=draw(st.integers(60, DAY)),
        agent_completed=draw(st.sampled_from([False] * 9 + [True])),
    )


# Weighted so most steps let time pass (where reminders, rotations and expiries happen) and
# few end the life at once (`missing`).
KINDS = ["advance"] * 8 + ["renew"] * 3 + ["rotate", "decommission", "restore", "let_expire"]
KINDS += ["history_full", "faults", "reachable", "missing"]


@st.composite
def events(draw: st.DrawFn) -> tuple[Any, ...]:
    kind = draw(st.sampled_from(KINDS))
    if kind == "advance":
        return (kind, draw(st.sampled_from([60, 3600, DAY, 7 * DAY]) | st.integers(1, 20 * DAY)))
    if kind == "renew":
        return (kind, draw(st.none() | st.integers(1, 150 * DAY)))
    if kind == "faults":
        return (kind, draw(st.booleans()), draw(st.booleans()), draw(st.booleans()))
    if kind == "reachable":
        return (kind, draw(st.booleans()))
    return (kind,)


EVENT = events()
PERSON = LifecycleAction(actor="owner@example.com", channel="api", reason="asked")


@dataclass
class Life:
    """One lifecycle run as the workflow executes it, minus the activities."""

    cfg: LifecycleConfig
    now: datetime = T0
    state: LifecycleState = field(init=False)
    quarantine_fails: bool = False
    removal_fails: bool = False
    rotation_fails: bool = False
    owner_reachable: bool = True
    # Keys are `k0`, `k1`, ... (AWS: every rotation makes a new key), or two logins that
    # alternate (Postgres: a rotation re-keys the login that is not current).
    alternating: bool = False
    key: int = 0
    # Keys a rotation replaced that are not deleted yet (nor current again).
    outstanding: set[str] = field(default_factory=set)
    prompts: int = 0
    reminded: set[tuple[datetime, int]] = field(default_factory=set)
    term: int = 0  # renewals and restores start a new term
    escalated_terms: set[int] = field(default_factory=set)
    quarantine_tried: bool = False
    decommission_asked: bool = False
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = core.initial_state(self.cfg, self.now)
        self.quarantine_tried = self.state.phase is not Phase.ACTIVE
        self.decommission_asked = self.state.pending_decommission is not None
        self.check()

    # -- invariants that hold in every state --------------------------------------------------

    def check(self) -> None:
        s = self.state
        assert s.expires_at <= core.cap(self.cfg)[0], "expiry past the cap"
        if self.decommission_asked and s.phase is Phase.ACTIVE:
            assert s.pending_decommission is not None, "a pending decommission was lost"
        if s.phase is not Phase.DECOMMISSIONED:  # until the identity itself is removed
            retiring = [r.key_id for r in s.retiring]
            assert self.outstanding <= set(retiring), "a retiring key was forgotten"
            assert len(retiring) == len(set(retiring)), "a key retires twice"
            assert self.current not in retiring, "the current key is retiring"
        if s.phase in core.ENDED:
            for full in (False, True):
                assert core.next_action(s, self.cfg, self.now, history_full=full) == core.Done()

    def set(self, state: LifecycleState) -> None:
        self.state = state
        self.check()

    # -- the workflow's loop -----------------------------------------------------------------

    def advance(self, seconds: int) -> None:
        """Let time pass: every timer fires at its deadline and the loop steps."""
        target = self.now + timedelta(seconds=seconds)
        spin = 0
        while True:
            action = core.next_action(self.state, self.cfg, self.now)
            if isinstance(action, core.Done):
                self.now = target
                return
            if isinstance(action, core.Sleep):
                assert action.until > self.now, "a deadline in the past with nothing due"
                if action.until > target:
                    self.now = target
                    return
                self.now, spin = action.until, 0
                continue
            spin += 1
            assert spin < MAX_SPIN, f"the loop spins: {self.log[-5:]}"
            self.execute(action)

    def execute(self, action: core.Action) -> None:
        s = self.state
        self.log.append(type(action).__name__)
        acting = core.Remind | core.Rotate | core.RetireOldKey | core.Expire | core.Quarantine
        if isinstance(action, acting):
            assert s.phase is Phase.ACTIVE, f"{action} while {s.phase}"
        if isinstance(action, core.Remind | core.Rotate | core.RetireOldKey | core.Expire):
            assert s.pending_decommission is None, f"{action} with a decommission pending"
        if isinstance(action, core.Remind):
            term = (s.expires_at, action.offset)
            assert term not in self.reminded, f"reminder {action.offset} twice for one term"
            self.reminded.add(term)
            self.set(core.after_reminder(s, action.offset, self.prompt()))
            esc = core.escalation(self.state, self.cfg, action.offset, self.owner_reachable)
            if esc is not None:
                assert self.term not in self.escalated_terms, "escalated twice in one term"
                self.escalated_terms.add(self.term)
                self.set(core.after_escalation(self.state, self.prompt()))
        elif isinstance(action, core.Rotate):
            if self.cfg.kind not in ROTATABLE_KINDS:
                self.set(core.after_rotation_not_applicable(s))
            elif self.rotation_fails:
                self.set(core.after_rotation_failed(s, self.now))
            else:
                old = self.current
                self.key = 1 - self.key if self.alternating else self.key + 1
                self.outstanding = (self.outstanding - {self.current}) | {old}
                self.set(
                    core.after_rotation(
                        s, self.cfg, self.now, old_key_id=old, new_key_id=self.current
                    )
                )
        elif isinstance(action, core.RetireOldKey):
            assert action.key_id != self.current, "retired the key in use"
            assert action.key_id in self.outstanding, f"retired {action.key_id}, not retiring"
            if not action.deactivate:
                self.outstanding.discard(action.key_id)
            self.set(core.after_retire(s, action.key_id, deactivate=action.deactivate))
        elif isinstance(action, core.Expire):
            self.decommission_asked = True
            self.set(core.with_decommission(s, action.request))
        elif isinstance(action, core.Quarantine):
            self.quarantine_tried = True
            if self.quarantine_fails:
                self.set(core.after_revoke_failed(s, self.now, new_episode=True))
            else:
                self.set(core.after_quarantine(s, self.now, action.request.reason))
            self.decommission_asked = False
        elif isinstance(action, core.Delete | core.RetryRemoval):
            assert self.quarantine_tried, f"{action} without a quarantine first"
            if isinstance(action, core.Delete):
                assert s.phase is Phase.QUARANTINED
                assert s.quarantined_at is not None
                grace = timedelta(seconds=self.cfg.grace_period_seconds)
                assert self.now >= s.quarantined_at + grace, "deleted inside the grace period"
            else:
                assert s.phase is Phase.REVOKE_FAILED
            if self.removal_fails:
                new_episode = s.phase is not Phase.REVOKE_FAILED
                self.set(core.after_revoke_failed(s, self.now, new_episode=new_episode))
            else:
                self.set(core.after_removal(s))
        else:
            pytest.fail(f"the loop cannot execute {action}")

    @property
    def current(self) -> str:
        return f"k{self.key}"

    def prompt(self) -> uuid.UUID:
        self.prompts += 1
        return uuid.UUID(int=self.prompts)

    # -- updates, as their validators admit them ----------------------------------------------

    def event(self, ev: tuple[Any, ...]) -> None:
        s, name = self.state, ev[0]
        active = s.phase is Phase.ACTIVE
        if name == "advance":
            self.advance(ev[1])
        elif name == "renew" and active:
            try:
                expiry = core.renewed_expiry(s, self.cfg, self.now, ev[1], strict=True)
            except core.ExpiryRefused as err:
                assert err.kind in ("MaxLifetime", "ShortensExpiry")
                return
            assert expiry >= s.expires_at, "a renewal shortened the expiry"
            self.term += 1
            self.set(core.after_renewal(s, self.cfg, expiry, self.now))
        elif name == "rotate" and active and s.pending_rotate is None:
            if self.cfg.kind in ROTATABLE_KINDS:
                self.set(core.with_rotation(s, PERSON))
        elif name == "decommission" and active and s.pending_decommission is None:
            self.decommission_asked = True
            self.set(core.with_decommission(s, PERSON))
        elif name == "restore" and s.phase is Phase.QUARANTINED:
            try:
                core.check_restorable(self.cfg, self.now)
                expiry = core.restored_expiry(s, self.cfg, self.now, strict=True)
            except core.ExpiryRefused:
                return
            self.term += 1
            self.set(core.after_restore(s, self.cfg, expiry, self.now))
            self.quarantine_tried = False  # a deletion now needs a new quarantine first
        elif name == "let_expire" and active:
            self.set(core.after_let_expire(s))
        elif name == "history_full":
            action = core.next_action(s, self.cfg, self.now, history_full=True)
            if s.phase in core.ENDED:
                return
            assert action == core.ContinueAsNew()
            # The next run starts from the state as history carries it.
            self.set(LifecycleState.model_validate_json(s.model_dump_json()))
        elif name == "faults":
            self.quarantine_fails, self.removal_fails, self.rotation_fails = ev[1:]
        elif name == "reachable":
            self.owner_reachable = ev[1]
        elif name == "missing" and s.phase not in core.ENDED:
            self.decommission_asked = False
            self.set(core.after_missing(s, "gone from its platform"))


@CHECKS
@given(cfg=configs(), events=st.lists(EVENT, min_size=5, max_size=40), alternating=st.booleans())
def test_random_lives_keep_every_invariant(
    cfg: LifecycleConfig, events: list[tuple[Any, ...]], alternating: bool
) -> None:
    life = Life(cfg, alternating=alternating)
    for ev in events:
        life.event(ev)
    # Left alone long enough, every life ends (decommissioned), unless removal keeps failing.
    life.removal_fails = life.quarantine_fails = False
    life.advance(400 * DAY)
    assert life.state.phase in core.ENDED, life.log[-10:]


# Rotations asked for during an overlap, in lives of rotatable kinds, with failures.
ROTATION_EVENT = st.sampled_from(
    [("rotate",)] * 3
    + [("advance", 60), ("advance", 3600), ("advance", DAY), ("advance", 3 * DAY)]
    + [("faults", False, False, True), ("faults", False, False, False), ("history_full",)]
)


@CHECKS
@given(
    cfg=configs(tuple(sorted(ROTATABLE_KINDS))),
    events=st.lists(ROTATION_EVENT, min_size=5, max_size=40),
    alternating=st.booleans(),
)
def test_no_retiring_key_is_ever_forgotten(
    cfg: LifecycleConfig, events: list[tuple[Any, ...]], alternating: bool
) -> None:
    # Only asked-for rotations, so that none is under way when the last overlap has ended.
    life = Life(cfg.model_copy(update={"rotation_period_seconds": None}), alternating=alternating)
    for ev in events:
        life.event(ev)
    life.rotation_fails = False
    life.advance(5 * DAY)  # every overlap has ended (unless the life ended first)
    if life.state.phase is Phase.ACTIVE:
        assert not life.outstanding, "an old key was never deleted"


def test_a_rotation_asked_for_during_an_overlap_keeps_the_older_key_retiring() -> None:
    """The regression: a second rotation during the first one's overlap used to overwrite the
    first old key's retirement, so that key was never deactivated nor deleted."""
    cfg = config(kind=NhiKind.IAM_USER_KEY, expires_at=T0 + timedelta(days=30))
    hour = timedelta(hours=1)
    state = core.initial_state(cfg, T0)
    state = core.after_rotation(state, cfg, T0, old_key_id="k0", new_key_id="k1")
    state = core.with_rotation(state, PERSON)
    assert core.next_action(state, cfg, T0 + hour / 2) == core.Rotate(PERSON)
    state = core.after_rotation(state, cfg, T0 + hour / 2, old_key_id="k1", new_key_id="k2")
    assert [r.key_id for r in state.retiring] == ["k0", "k1"]
    done: list[tuple[str, bool, timedelta]] = []
    now = T0
    while len(done) < 4:
        action = core.next_action(state, cfg, now)
        if isinstance(action, core.Sleep):
            now = action.until
            continue
        assert isinstance(action, core.RetireOldKey)
        done.append((action.key_id, action.deactivate, now - T0))
        state = core.after_retire(state, action.key_id, deactivate=action.deactivate)
    assert done == [
        ("k0", True, hour),
        ("k1", True, hour * 1.5),
        ("k0", False, hour * 2),
        ("k1", False, hour * 2.5),
    ]
    assert state.retiring == []
    # Runs recorded before the fix replay the old way (`keep_retiring=False`).
    old = core.after_rotation(
        core.after_rotation(core.initial_state(cfg, T0), cfg, T0, old_key_id="k0", new_key_id="k1"),
        cfg,
        T0,
        old_key_id="k1",
        new_key_id="k2",
        keep_retiring=False,
    )
    assert [r.key_id for r in old.retiring] == ["k1"]


def test_a_re_keyed_login_stops_retiring() -> None:
    """Two alternating logins (Postgres): the second rotation re-keys the login still retiring,
    which is current again and must not be retired."""
    cfg = config(kind=NhiKind.POSTGRES_ROLE, expires_at=T0 + timedelta(days=30))
    state = core.after_rotation(
        core.initial_state(cfg, T0), cfg, T0, old_key_id="a", new_key_id="b"
    )
    state = core.after_rotation(state, cfg, T0, old_key_id="b", new_key_id="a")
    assert [r.key_id for r in state.retiring] == ["b"]


def test_states_recorded_with_one_retiring_key_still_load() -> None:
    """Histories and continue-as-new inputs written before keys retired in a list."""
    key = {
        "key_id": "k0",
        "deactivate_at": "2026-01-01T01:00:00Z",
        "delete_at": "2026-01-01T02:00:00Z",
    }
    one = LifecycleState.model_validate({"expires_at": "2026-02-01T00:00:00Z", "retiring": key})
    assert [r.key_id for r in one.retiring] == ["k0"] and not one.retiring[0].deactivated
    none = LifecycleState.model_validate({"expires_at": "2026-02-01T00:00:00Z", "retiring": None})
    assert none.retiring == []
    carried = LifecycleInput.model_validate(
        {
            "nhi_id": str(uuid.UUID(int=1)),
            "state": {"expires_at": "2026-02-01T00:00:00Z", "retiring": key},
        }
    )
    assert carried.state is not None and carried.state.retiring == one.retiring
    assert LifecycleState.model_validate_json(one.model_dump_json()) == one


@CHECKS
@given(cfg=configs(), events=st.lists(EVENT, max_size=25), extend=st.none() | st.integers(1))
def test_renewals_never_pass_the_caps_nor_shorten(
    cfg: LifecycleConfig, events: list[tuple[Any, ...]], extend: int | None
) -> None:
    life = Life(cfg)
    for ev in events:
        life.event(ev)
    s, limit = life.state, core.cap(cfg)[0]
    try:
        expiry = core.renewed_expiry(s, cfg, life.now, extend, strict=True)
    except core.ExpiryRefused as err:
        if err.kind == "MaxLifetime":
            assert life.now >= limit or (extend or 0) > (limit - life.now).total_seconds()
        return
    assert s.expires_at <= expiry <= limit
    assert expiry > life.now


@CHECKS
@given(cfg=configs(), at=st.integers(0, 200 * DAY), later=st.integers(0, 7 * DAY))
def test_a_restore_never_passes_the_caps(cfg: LifecycleConfig, at: int, later: int) -> None:
    active = cfg.model_copy(update={"status": NhiStatus.ACTIVE})
    quarantined_at = T0 + timedelta(seconds=at)
    state = core.after_quarantine(core.initial_state(active, T0), quarantined_at, "expired")
    now = quarantined_at + timedelta(seconds=later)
    limit = core.cap(cfg)[0]
    try:
        core.check_restorable(cfg, now)
        expiry = core.restored_expiry(state, cfg, now, strict=True)
    except core.ExpiryRefused as err:
        assert err.kind == "MaxLifetime" and now >= limit
        return
    assert now < expiry <= limit
    restored = core.after_restore(state, cfg, expiry, now)
    assert restored.phase is Phase.ACTIVE and restored.quarantined_at is None
    assert core.next_action(restored, cfg, now) != core.Delete()


@FEW
@given(cfg=configs(), events=st.lists(EVENT, max_size=25))
def test_an_ended_lifecycle_never_acts_again(
    cfg: LifecycleConfig, events: list[tuple[Any, ...]]
) -> None:
    life = Life(cfg)
    for ev in events:
        life.event(ev)
    life.event(("missing",))
    assert life.state.phase in core.ENDED
    before, acted = life.state, len(life.log)
    for ev in [*events, ("advance", 400 * DAY)]:  # whatever arrives afterwards
        life.event(ev)
    assert life.state == before
    assert len(life.log) == acted


@FEW
@given(cfg=configs(), later=st.integers(0, 200 * DAY), full=st.booleans())
def test_a_pending_decommission_comes_before_anything_else(
    cfg: LifecycleConfig, later: int, full: bool
) -> None:
    active = cfg.model_copy(update={"status": NhiStatus.ACTIVE})
    state = core.with_decommission(core.initial_state(active, T0), PERSON)
    now = T0 + timedelta(seconds=later)
    action = core.next_action(state, cfg, now, history_full=full)
    assert action == (core.ContinueAsNew() if full else core.Quarantine(PERSON))
    carried = LifecycleState.model_validate_json(state.model_dump_json())
    assert carried.pending_decommission == PERSON


def test_an_agent_that_completed_starts_with_its_decommission_pending() -> None:
    cfg = config(reminder_offsets_seconds=[14 * DAY, DAY], agent_completed=True)
    state = core.initial_state(cfg, T0, PERSON)
    assert state.pending_decommission is not None
    assert state.pending_decommission.actor == "system:agent-completed"
    # A 7-day credential gets no "14 days left" message.
    assert state.reminders_done == [14 * DAY]


def test_a_scheduled_rotation_waits_for_the_old_key_without_spinning() -> None:
    cfg = config(
        kind=NhiKind.IAM_USER_KEY,
        expires_at=T0 + timedelta(days=30),
        rotation_period_seconds=3600,
        rotation_overlap_seconds=DAY,
    )
    retiring = RetireKey(key_id="k0", deactivate_at=T0 + timedelta(days=1), delete_at=T0)
    state = LifecycleState(
        expires_at=cfg.expires_at, next_rotation_at=T0 - timedelta(hours=1), retiring=retiring
    )
    # The rotation is overdue, but its old key still retires: sleep until that, not a moment
    # already past (the run would wake again at once, forever).
    assert core.next_action(state, cfg, T0) == core.Sleep(retiring.deactivate_at)


def test_refusals_keep_their_wording() -> None:
    cfg = config(expected_end_at=T0 + timedelta(days=10))
    state = LifecycleState(expires_at=cfg.expires_at)
    with pytest.raises(core.ExpiryRefused) as err:
        core.renewed_expiry(state, cfg, T0, 20 * DAY, strict=True)
    assert err.value.kind == "MaxLifetime"
    assert err.value.message == (
        "extend_by: would end 2026-01-21T00:00:00Z, past the agent's expected end "
        "(2026-01-11T00:00:00Z)"
    )
    with pytest.raises(core.ExpiryRefused) as err:
        core.renewed_expiry(state, cfg, T0, DAY, strict=True)
    assert err.value.kind == "ShortensExpiry"
    with pytest.raises(core.ExpiryRefused) as err:
        core.check_restorable(cfg, T0 + timedelta(days=10))
    assert str(err.value) == (
        "past the agent's expected end (2026-01-11T00:00:00Z): request a new identity instead"
    )


def test_a_failed_rotation_is_retried_after_a_ninth_of_its_period() -> None:
    def every(period: int | None) -> LifecycleConfig:
        return config(rotation_period_seconds=period)

    assert core.rotation_retry_delay(every(45 * 60)) == timedelta(minutes=5)
    assert core.rotation_retry_delay(every(5 * 60)) == timedelta(minutes=1)
    assert core.rotation_retry_delay(every(90 * 86400)) == timedelta(hours=6)
    assert core.rotation_retry_delay(every(None)) == timedelta(hours=6)
