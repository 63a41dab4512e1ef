"""The life of one active NHI: rotation, expiry reminders, renewal, staged decommission.

One run per NHI, id `nhi-<nhi id>`, started by provisioning. Deadlines are durable timers that
updates can move; every change is an update whose validator refuses wrong state, the wrong
person or an extension past the maximum lifetime before anything reaches history.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.db import DbActivities
    from activities.provider import ProviderActivities
    from activities.slack import SlackActivities
    from models.contracts import (
        Alert,
        AuditNote,
        KeyRef,
        LifecycleAction,
        LifecycleConfig,
        LifecycleInput,
        LifecycleState,
        LifecycleView,
        MessageUpdate,
        NhiRef,
        OpenPrompt,
        Phase,
        PromptAnswer,
        PromptAnswerKind,
        PromptDecision,
        PromptKind,
        ProvisionPlan,
        RemoveIdentity,
        RenewRequest,
        RetireKey,
        StatusChange,
    )
    from models.enums import ROTATABLE_KINDS, NhiStatus
    from nhi.slack_messages import decided_text
    from workflows.policies import (
        DB_RETRY,
        DB_TIMEOUT,
        PLATFORM_HEARTBEAT,
        PLATFORM_REMOVAL_RETRY,
        PLATFORM_RETRY,
        PLATFORM_TIMEOUT,
        SLACK_RETRY,
        SLACK_TIMEOUT,
        VERIFY_RETRY,
        VERIFY_TIMEOUT,
        failure_reason,
    )

ISO = "%Y-%m-%dT%H:%M:%SZ"
ROTATION_RETRY_DELAY = timedelta(hours=6)


def lifecycle_workflow_id(nhi_id: object) -> str:
    """Business-keyed id: API, Slack and CLI address the same run."""
    return f"nhi-{nhi_id}"


@workflow.defn
class NhiLifecycleWorkflow:
    """Keeps one NHI alive exactly as long as someone answers for it."""

    @workflow.init
    def __init__(self, inp: LifecycleInput) -> None:
        self._nhi_id = inp.nhi_id
        self._cfg: LifecycleConfig | None = None
        self._state: LifecycleState | None = inp.state
        self._lock = asyncio.Lock()
        self._wake = False
        self._decommission: LifecycleAction | None = None
        self._rotate: LifecycleAction | None = None

    # ---- queries and updates -----------------------------------------------------------------

    @workflow.query
    def view(self) -> LifecycleView:
        """Current phase, deadlines and reminders."""
        return self._view()

    @workflow.update
    async def renew(self, req: RenewRequest) -> LifecycleView:
        """Extend the expiry (default TTL from now, never past the maximum lifetime)."""
        await self._ready(self._check_renew, req)
        async with self._lock:
            self._require(Phase.ACTIVE)
            await self._renew(self._renewed_expiry(req.extend_by_seconds), req, "renew")
        self._wake_after_decision()
        return self._view("renewed")

    @renew.validator
    def _check_renew(self, req: RenewRequest) -> None:
        if not self._loaded():
            return
        self._check_actor(req)
        self._require(Phase.ACTIVE)
        self._renewed_expiry(req.extend_by_seconds)

    @workflow.update
    async def rotate(self, req: LifecycleAction) -> LifecycleView:
        """Rotate the credential now (access keys); recorded as not applicable for roles."""
        await self._ready(self._check_rotate, req)
        cfg = self._config()
        if cfg.kind not in ROTATABLE_KINDS:
            await self._note(
                "nhi.rotation_not_applicable",
                req,
                f"{cfg.kind.value} has no static secret to rotate",
            )
            return self._view(f"rotation not applicable: {cfg.kind.value} has no static secret")
        self._rotate = req
        self._wake = True
        return self._view("rotation started")

    @rotate.validator
    def _check_rotate(self, req: LifecycleAction) -> None:
        if not self._loaded():
            return
        self._check_actor(req, containment=True)
        self._require(Phase.ACTIVE)
        if self._rotate is not None:
            raise ApplicationError("a rotation is already under way", type="InvalidState")

    @workflow.update
    async def decommission(self, req: LifecycleAction) -> LifecycleView:
        """Quarantine now, delete after the grace period."""
        await self._ready(self._check_decommission, req)
        self._decommission = req
        self._wake = True
        return self._view("decommission started")

    @decommission.validator
    def _check_decommission(self, req: LifecycleAction) -> None:
        if not self._loaded():
            return
        self._check_actor(req, containment=True)
        self._require(Phase.ACTIVE)
        if self._decommission is not None:
            raise ApplicationError("a decommission is already under way", type="InvalidState")

    @workflow.update
    async def restore(self, req: LifecycleAction) -> LifecycleView:
        """Undo a quarantine during the grace period (renewing if the NHI had expired)."""
        await self._ready(self._check_restore, req)
        async with self._lock:
            self._require(Phase.QUARANTINED)
            await self._restore(req)
        self._wake_after_decision()
        return self._view("restored")

    @restore.validator
    def _check_restore(self, req: LifecycleAction) -> None:
        if not self._loaded():
            return
        self._check_actor(req)
        self._require(Phase.QUARANTINED)
        if workflow.now() >= self._config().max_lifetime_at:
            raise ApplicationError(
                "past its maximum lifetime: request a new identity instead", type="MaxLifetime"
            )

    @workflow.update
    async def answer(self, ans: PromptAnswer) -> LifecycleView:
        """An owner's answer to a prompt: Renew, Let expire or Decommission now."""
        await self._ready(self._check_answer, ans)
        async with self._lock:
            self._require(Phase.ACTIVE)
            self._wake_after_decision()
            if ans.answer is PromptAnswerKind.RENEW:
                await self._renew(self._renewed_expiry(None), ans, ans.answer.value)
                return self._view("renewed")
            await self._close_prompts(ans, ans.answer.value)
            if ans.answer is PromptAnswerKind.LET_EXPIRE:
                self._update(let_expire=True)
                await self._note(
                    "nhi.let_expire", ans, ans.reason or "owner chose to let it expire"
                )
                return self._view("will expire")
            self._decommission = ans
            self._wake = True
        return self._view("decommission started")

    @answer.validator
    def _check_answer(self, ans: PromptAnswer) -> None:
        if not self._loaded():
            return
        self._check_actor(ans)
        self._require(Phase.ACTIVE)
        if ans.prompt_id not in self._st().open_prompts:
            raise ApplicationError("this prompt has already been answered", type="AlreadyDecided")
        if ans.answer is PromptAnswerKind.RENEW:
            self._renewed_expiry(None)

    # ---- main loop ---------------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: LifecycleInput) -> LifecycleView:
        """Loop until the NHI is decommissioned, continuing as new when history grows long."""
        cfg = await self._db(DbActivities.load_lifecycle, NhiRef(nhi_id=inp.nhi_id))
        self._cfg = cfg
        if self._state is None:
            self._state = self._initial_state(cfg)
        while self._st().phase is not Phase.DECOMMISSIONED:
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(LifecycleInput(nhi_id=inp.nhi_id, state=self._st()))
            async with self._lock:
                deadline = await self._step(workflow.now())
            if deadline is None:
                continue
            self._wake = False
            timeout = max(deadline - workflow.now(), timedelta(0))
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self._wake, timeout=timeout, timeout_summary="next lifecycle deadline"
                )
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._view("decommissioned")

    async def _step(self, now: datetime) -> datetime | None:
        """Do the one piece of work that is due, or return when the next one will be."""
        s, cfg = self._st(), self._config()
        if s.phase is Phase.QUARANTINED:
            grace_end = self._grace_end()
            if now >= grace_end:
                await self._remove()
                return None
            return grace_end
        if s.phase is Phase.REVOKE_FAILED:
            retry_at = (s.quarantined_at or now) + timedelta(seconds=cfg.revoke_retry_seconds)
            if now >= retry_at:
                await self._remove()
                return None
            return retry_at

        if self._decommission is not None:
            await self._quarantine(self._decommission)
            return None
        if now >= s.expires_at:
            self._decommission = LifecycleAction(
                actor="system:expiry",
                channel="system",
                reason=f"expired at {s.expires_at.strftime(ISO)} without renewal",
            )
            return None
        if s.retiring is not None:
            if not s.retiring.deactivated and now >= s.retiring.deactivate_at:
                await self._retire(deactivate=True)
                return None
            if s.retiring.deactivated and now >= s.retiring.delete_at:
                await self._retire(deactivate=False)
                return None
        rotation_due = s.next_rotation_at is not None and now >= s.next_rotation_at
        if self._rotate is not None or (rotation_due and s.retiring is None):
            await self._rotate_key(self._rotate)
            return None
        if not s.let_expire:
            for offset in cfg.reminder_offsets_seconds:
                if offset not in s.reminders_done and now >= s.expires_at - timedelta(
                    seconds=offset
                ):
                    await self._remind(offset)
                    return None

        deadlines = [s.expires_at]
        if s.retiring is not None:
            deadlines.append(
                s.retiring.delete_at if s.retiring.deactivated else s.retiring.deactivate_at
            )
        if s.next_rotation_at is not None:
            deadlines.append(s.next_rotation_at)
        if not s.let_expire:
            deadlines += [
                s.expires_at - timedelta(seconds=o)
                for o in cfg.reminder_offsets_seconds
                if o not in s.reminders_done
            ]
        return min(deadlines)

    # ---- steps ------------------------------------------------------------------------------

    async def _remind(self, offset: int) -> None:
        s, cfg = self._st(), self._config()
        msg = await self._db(
            DbActivities.open_prompt,
            OpenPrompt(
                nhi_id=self._nhi_id,
                kind=PromptKind.REMINDER,
                for_expires_at=s.expires_at,
                offset_seconds=offset,
            ),
        )
        reachable = await self._deliver(msg)
        self._update(
            reminders_done=[*s.reminders_done, offset],
            open_prompts=[*self._st().open_prompts, msg.prompt_id],
        )
        if not reachable:
            await self._escalate(offset, "the owner has no active Slack account")
        elif offset == min(cfg.reminder_offsets_seconds):
            await self._escalate(offset, "no answer by the last reminder")

    async def _escalate(self, offset: int, reason: str) -> None:
        if self._st().escalated:
            return
        msg = await self._db(
            DbActivities.open_prompt,
            OpenPrompt(
                nhi_id=self._nhi_id,
                kind=PromptKind.ESCALATION,
                for_expires_at=self._st().expires_at,
                offset_seconds=offset,
                reason=reason,
            ),
        )
        await self._deliver(msg)
        self._update(escalated=True, open_prompts=[*self._st().open_prompts, msg.prompt_id])

    async def _deliver(self, msg: Any) -> bool:
        """Send a prompt; a Slack outage is logged and never blocks the lifecycle."""
        if msg.already_delivered:
            return True
        try:
            result = await workflow.execute_activity_method(
                SlackActivities.deliver_prompt,
                msg,
                start_to_close_timeout=SLACK_TIMEOUT,
                retry_policy=SLACK_RETRY,
            )
        except ActivityError as err:
            workflow.logger.warning(
                "prompt %s not delivered: %s", msg.prompt_id, failure_reason(err)
            )
            return True
        if result.deliveries:
            await self._db(DbActivities.record_delivery, result)
        return result.owner_reachable

    async def _renew(self, new_expiry: datetime, action: LifecycleAction, decision: str) -> None:
        s, cfg = self._st(), self._config()
        await self._platform(ProviderActivities.update_expiry, self._plan(new_expiry))
        await self._db(
            DbActivities.change_status,
            StatusChange(
                nhi_id=self._nhi_id,
                status=NhiStatus.ACTIVE,
                event="nhi.renewed",
                actor=self._who(action),
                reason=action.reason or f"renewed until {new_expiry.strftime(ISO)}",
                expires_at=new_expiry,
                details={
                    "key": str(workflow.uuid4()),
                    "from": s.expires_at.strftime(ISO),
                    "to": new_expiry.strftime(ISO),
                },
            ),
        )
        await self._close_prompts(action, decision)
        now = workflow.now()
        self._update(
            expires_at=new_expiry,
            reminders_done=self._past_offsets(cfg, new_expiry, now),
            escalated=False,
            let_expire=False,
        )

    async def _close_prompts(self, action: LifecycleAction, decision: str) -> None:
        open_prompts = self._st().open_prompts
        if not open_prompts:
            return
        deliveries = await self._db(
            DbActivities.decide_prompts,
            PromptDecision(
                nhi_id=self._nhi_id,
                prompt_ids=open_prompts,
                decision=decision,
                actor=self._who(action),
            ),
        )
        self._update(open_prompts=[])
        if deliveries:
            text = decided_text(
                self._config().plan.identity_name, decision, action.actor, workflow.now()
            )
            await self._slack(
                SlackActivities.update_messages, MessageUpdate(deliveries=deliveries, text=text)
            )

    async def _rotate_key(self, request: LifecycleAction | None) -> None:
        cfg = self._config()
        action = request or LifecycleAction(
            actor="system:rotation", channel="system", reason="rotation period reached"
        )
        now = workflow.now()
        if cfg.kind not in ROTATABLE_KINDS:
            await self._note(
                "nhi.rotation_not_applicable", action, f"{cfg.kind.value} has no static secret"
            )
            self._update(next_rotation_at=None)
            self._rotate = None
            return
        await self._status(
            NhiStatus.ROTATING, "nhi.rotation_started", action, action.reason or "rotating"
        )
        plan = self._plan(self._st().expires_at)
        try:
            await self._platform(ProviderActivities.stage_new_key, plan)
            await workflow.execute_activity_method(
                ProviderActivities.verify_pending,
                plan,
                start_to_close_timeout=VERIFY_TIMEOUT,
                retry_policy=VERIFY_RETRY,
            )
            promoted = await self._platform(ProviderActivities.promote_pending, plan)
        except ActivityError as err:
            reason = f"rotation failed, the current key stays in use: {failure_reason(err)}"
            await self._status(NhiStatus.ACTIVE, "nhi.rotation_failed", action, reason)
            await self._slack(
                SlackActivities.alert,
                Alert(emails=[cfg.owner_email], text=f"{cfg.plan.identity_name}: {reason}"),
            )
            self._update(next_rotation_at=now + ROTATION_RETRY_DELAY)
            self._rotate = None
            return
        overlap = timedelta(seconds=cfg.rotation_overlap_seconds)
        await self._status(
            NhiStatus.ACTIVE,
            "nhi.rotated",
            action,
            action.reason or "new key proven and promoted",
            rotated=True,
            details={"new_key": promoted.new_key_id, "old_key": promoted.old_key_id or ""},
        )
        retiring = None
        if promoted.old_key_id and promoted.old_key_id != promoted.new_key_id:
            retiring = RetireKey(
                key_id=promoted.old_key_id,
                deactivate_at=now + overlap,
                delete_at=now + 2 * overlap,
            )
        period = cfg.rotation_period_seconds
        self._update(
            retiring=retiring,
            next_rotation_at=now + timedelta(seconds=period) if period else None,
        )
        self._rotate = None

    async def _retire(self, *, deactivate: bool) -> None:
        retiring = self._st().retiring
        if retiring is None:
            return
        plan = self._config().plan
        key = KeyRef(
            user_name=plan.identity_name,
            key_id=retiring.key_id,
            platform=plan.platform,
            target=plan.target,
        )
        if deactivate:
            await self._platform(ProviderActivities.deactivate_key, key)
            self._update(retiring=retiring.model_copy(update={"deactivated": True}))
        else:
            await self._platform(ProviderActivities.delete_key, key)
            await self._note(
                "nhi.old_key_deleted",
                LifecycleAction(actor="system:rotation", channel="system"),
                f"access key {retiring.key_id} deleted after the overlap window",
            )
            self._update(retiring=None)

    async def _quarantine(self, action: LifecycleAction) -> None:
        cfg = self._config()
        plan = self._plan(self._st().expires_at)
        reason = action.reason or "decommission requested"
        try:
            done = await self._platform(ProviderActivities.quarantine, plan)
            await workflow.execute_activity_method(
                ProviderActivities.verify_quarantine,
                plan,
                start_to_close_timeout=VERIFY_TIMEOUT,
                retry_policy=VERIFY_RETRY,
            )
        except ActivityError as err:
            await self._revoke_failed(f"quarantine failed: {failure_reason(err)}")
            return
        await self._status(
            NhiStatus.QUARANTINED,
            "nhi.quarantined",
            action,
            reason,
            details={"done": "; ".join(done), "grace_seconds": str(cfg.grace_period_seconds)},
        )
        await self._close_prompts(
            action, "decommission_now" if action.channel != "system" else "expired"
        )
        self._update(
            phase=Phase.QUARANTINED, quarantined_at=workflow.now(), decommission_reason=reason
        )
        self._decommission = None
        self._rotate = None

    async def _remove(self) -> None:
        plan = self._plan(self._st().expires_at)
        try:
            removed = await workflow.execute_activity_method(
                ProviderActivities.remove_identity,
                RemoveIdentity(plan=plan),
                start_to_close_timeout=PLATFORM_TIMEOUT,
                heartbeat_timeout=PLATFORM_HEARTBEAT,
                retry_policy=PLATFORM_REMOVAL_RETRY,
            )
        except ActivityError as err:
            await self._revoke_failed(f"deletion failed: {failure_reason(err)}")
            return
        system = LifecycleAction(actor="system:decommission", channel="system")
        await self._status(
            NhiStatus.DECOMMISSIONED,
            "nhi.decommissioned",
            system,
            self._st().decommission_reason or "decommissioned",
            details={"removed": "; ".join(removed.removed)},
        )
        self._update(phase=Phase.DECOMMISSIONED)

    async def _revoke_failed(self, reason: str) -> None:
        cfg = self._config()
        system = LifecycleAction(actor="system:decommission", channel="system")
        await self._status(NhiStatus.REVOKE_FAILED, "nhi.revoke_failed", system, reason)
        retry = timedelta(seconds=cfg.revoke_retry_seconds)
        await self._slack(
            SlackActivities.alert,
            Alert(
                emails=[cfg.owner_email],
                channels=[cfg.security_channel],
                text=f"Revocation of {cfg.plan.identity_name} (agent {cfg.agent_name}) keeps "
                f"failing: {reason}. Retrying every {retry}.",
            ),
        )
        self._update(phase=Phase.REVOKE_FAILED, quarantined_at=workflow.now())
        self._decommission = None

    async def _restore(self, action: LifecycleAction) -> None:
        cfg = self._config()
        now = workflow.now()
        expiry = self._st().expires_at
        if expiry <= now:
            expiry = self._renewed_expiry(None)
        await self._platform(ProviderActivities.lift_quarantine, self._plan(expiry))
        if expiry != self._st().expires_at:
            await self._platform(ProviderActivities.update_expiry, self._plan(expiry))
        await self._status(
            NhiStatus.ACTIVE,
            "nhi.restored",
            action,
            action.reason or "restored during the grace period",
            expires_at=expiry,
        )
        self._update(
            phase=Phase.ACTIVE,
            quarantined_at=None,
            decommission_reason=None,
            expires_at=expiry,
            reminders_done=self._past_offsets(cfg, expiry, now),
            escalated=False,
            let_expire=False,
        )

    # ---- helpers -----------------------------------------------------------------------------

    def _initial_state(self, cfg: LifecycleConfig) -> LifecycleState:
        now = workflow.now()
        next_rotation = None
        if cfg.kind in ROTATABLE_KINDS and cfg.rotation_period_seconds:
            base = cfg.last_rotated_at or cfg.activated_at
            next_rotation = base + timedelta(seconds=cfg.rotation_period_seconds)
        phase = {
            NhiStatus.QUARANTINED: Phase.QUARANTINED,
            NhiStatus.REVOKE_FAILED: Phase.REVOKE_FAILED,
            NhiStatus.DECOMMISSIONED: Phase.DECOMMISSIONED,
        }.get(cfg.status, Phase.ACTIVE)
        if cfg.agent_completed and phase is Phase.ACTIVE:
            self._decommission = LifecycleAction(
                actor="system:agent-completed", channel="system", reason="the agent's task ended"
            )
        return LifecycleState(
            phase=phase,
            expires_at=cfg.expires_at,
            reminders_done=self._past_offsets(cfg, cfg.expires_at, now),
            next_rotation_at=next_rotation,
            quarantined_at=now if phase is not Phase.ACTIVE else None,
        )

    @staticmethod
    def _past_offsets(cfg: LifecycleConfig, expires_at: datetime, now: datetime) -> list[int]:
        # Reminders whose moment has already passed when a schedule starts are skipped, not
        # sent in a burst: a 7-day credential gets no "14 days left" message.
        return [o for o in cfg.reminder_offsets_seconds if expires_at - timedelta(seconds=o) <= now]

    def _renewed_expiry(self, extend_by_seconds: int | None) -> datetime:
        cfg = self._config()
        now = workflow.now()
        if now >= cfg.max_lifetime_at:
            raise ApplicationError("already at its maximum lifetime", type="MaxLifetime")
        if extend_by_seconds is None:
            return min(now + timedelta(seconds=cfg.default_ttl_seconds), cfg.max_lifetime_at)
        wanted = now + timedelta(seconds=extend_by_seconds)
        if wanted > cfg.max_lifetime_at:
            raise ApplicationError(
                f"extend_by: would end {wanted.strftime(ISO)}, past the maximum lifetime "
                f"({cfg.max_lifetime_at.strftime(ISO)})",
                type="MaxLifetime",
            )
        return wanted

    def _wake_after_decision(self) -> None:
        # Added after lifecycles were already running: recompute deadlines (and check for
        # continue-as-new) right after a decision instead of at the next timer. Old histories
        # replay without it (tests/histories/lifecycle.json).
        if workflow.patched("wake-after-decision"):
            self._wake = True

    async def _ready(self, check: Callable[[Any], None], request: Any) -> None:
        """Wait until the run has loaded its configuration, then validate for real.

        Validators accept while a run is still starting (first activation, or just after
        continue-as-new) rather than turn people away; the same checks then run here.
        """
        if self._cfg is None or self._state is None:
            await workflow.wait_condition(lambda: self._cfg is not None and self._state is not None)
            check(request)

    def _loaded(self) -> bool:
        return self._cfg is not None and self._state is not None

    def _check_actor(self, action: LifecycleAction, *, containment: bool = False) -> None:
        if action.actor.startswith("system:"):
            return
        if containment and action.actor.startswith("security:"):
            return  # the security team may contain (rotate, decommission) any NHI
        cfg = self._config()
        allowed = {cfg.owner_email.lower()}
        if cfg.backup_owner_email:
            allowed.add(cfg.backup_owner_email.lower())
        if action.actor.lower() not in allowed:
            raise ApplicationError(
                f"{action.actor} is not the owner or backup owner of agent {cfg.agent_name}",
                type="NotOwner",
            )

    def _require(self, phase: Phase) -> None:
        current = self._st().phase
        if current is not phase:
            raise ApplicationError(
                f"the NHI is {current.value}, not {phase.value}", type="InvalidState"
            )

    def _config(self) -> LifecycleConfig:
        if self._cfg is None:
            raise ApplicationError("the lifecycle is still starting; try again", type="NotReady")
        return self._cfg

    def _st(self) -> LifecycleState:
        if self._state is None:
            raise ApplicationError("the lifecycle is still starting; try again", type="NotReady")
        return self._state

    def _update(self, **changes: Any) -> None:
        self._state = self._st().model_copy(update=changes)

    def _grace_end(self) -> datetime:
        start = self._st().quarantined_at or workflow.now()
        return start + timedelta(seconds=self._config().grace_period_seconds)

    def _plan(self, expires_at: datetime) -> ProvisionPlan:
        plan = self._config().plan
        tags = dict(plan.tags) | {"nhi:expires-at": expires_at.strftime(ISO)}
        return plan.model_copy(update={"expires_at": expires_at, "tags": tags})

    @staticmethod
    def _who(action: LifecycleAction) -> str:
        """The audit trail's name for who acted: the authenticated principal when the API
        knows it, else the channel and person."""
        if action.principal:
            return action.principal
        if action.actor.startswith("system:"):
            return action.actor
        return f"{action.channel}:{action.actor}"

    def _view(self, message: str = "") -> LifecycleView:
        s, cfg = self._st(), self._config()
        return LifecycleView(
            nhi_id=self._nhi_id,
            phase=s.phase,
            expires_at=s.expires_at,
            max_lifetime_at=cfg.max_lifetime_at,
            next_rotation_at=s.next_rotation_at,
            reminders_done=s.reminders_done,
            escalated=s.escalated,
            let_expire=s.let_expire,
            quarantined_at=s.quarantined_at,
            grace_ends_at=self._grace_end() if s.phase is Phase.QUARANTINED else None,
            decommission_reason=s.decommission_reason,
            message=message,
        )

    async def _status(
        self,
        status: NhiStatus,
        event: str,
        action: LifecycleAction,
        reason: str,
        *,
        expires_at: datetime | None = None,
        rotated: bool = False,
        details: dict[str, str] | None = None,
    ) -> None:
        await self._db(
            DbActivities.change_status,
            StatusChange(
                nhi_id=self._nhi_id,
                status=status,
                event=event,
                actor=self._who(action),
                reason=reason,
                expires_at=expires_at,
                rotated=rotated,
                details={"key": str(workflow.uuid4()), **(details or {})},
            ),
        )

    async def _note(self, event: str, action: LifecycleAction, reason: str) -> None:
        await self._db(
            DbActivities.note,
            AuditNote(
                subject_id=self._nhi_id,
                event=event,
                actor=self._who(action),
                reason=reason,
                details={"key": str(workflow.uuid4())},
            ),
        )

    async def _db(self, method: Callable[..., Any], arg: Any) -> Any:
        return await workflow.execute_activity_method(
            method, arg, start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY
        )

    async def _platform(self, method: Callable[..., Any], arg: Any) -> Any:
        return await workflow.execute_activity_method(
            method,
            arg,
            start_to_close_timeout=PLATFORM_TIMEOUT,
            heartbeat_timeout=PLATFORM_HEARTBEAT,
            retry_policy=PLATFORM_RETRY,
        )

    async def _slack(self, method: Callable[..., Any], arg: Any) -> None:
        try:
            await workflow.execute_activity_method(
                method, arg, start_to_close_timeout=SLACK_TIMEOUT, retry_policy=SLACK_RETRY
            )
        except ActivityError as err:
            workflow.logger.warning("slack call failed: %s", failure_reason(err))
