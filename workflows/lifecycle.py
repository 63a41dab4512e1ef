"""The life of one active NHI: rotation, expiry reminders, renewal, staged decommission.

One run per NHI, id `nhi-<nhi id>`, started by the API with the provisioning request: the run
provisions the NHI first (workflows/provisioning.py), then keeps it. (NHIs requested before
that, and bundles' NHIs, were provisioned by a run of their own that started this one as a
child.) Deadlines are durable timers that updates can move; every change is an update whose
validator refuses wrong state, the wrong person or an extension past the maximum lifetime
before anything reaches history.

Nothing a caller sends can end a run: an update whose activity fails fails that update only, a
loop step that fails is recorded and tried again later, so a lifecycle never ends FAILED while
its NHI exists (it ends only decommissioned or missing). Only its provisioning phase can fail
the run: the NHI is then `failed`, or `revoke_failed` when removing what was created failed too.

What is due next, and how each step changes the state, is decided by the pure lifecycle core
(nhi/rules/lifecycle.py); this class asks it, runs the activities, and applies the result.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.db import DbActivities
    from activities.provider import ProviderActivities
    from activities.slack import SlackActivities
    from models.contracts import (
        Alert,
        AlertPost,
        ApprovalDecision,
        ApprovalOutcome,
        AuditNote,
        DeleteIdentity,
        DeliveryResult,
        IdentityRef,
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
        PromptMessage,
        PromptPost,
        PromptPosted,
        ProvisionPlan,
        RemoveIdentity,
        RenewRequest,
        StatusChange,
    )
    from models.enums import ROTATABLE_KINDS, NhiStatus
    from nhi.rules import lifecycle as core
    from nhi.rules.ids import LIFECYCLE_WORKFLOW
    from nhi.rules.ids import lifecycle_workflow_id as lifecycle_workflow_id  # re-exported
    from nhi.rules.owners import is_owner
    from nhi.rules.slack_messages import decided_text
    from workflows import tagging
    from workflows.provisioning import IDENTITY_REFS, Provisioning, local_db_step
    from workflows.retry_policies import (
        DB_BEST_EFFORT_RETRY,
        DB_RETRY,
        DB_TIMEOUT,
        PLATFORM_HEARTBEAT,
        PLATFORM_REMOVAL_RETRY,
        PLATFORM_RETRY,
        PLATFORM_TIMEOUT,
        REMOVAL_RETRY,
        SLACK_RETRY,
        SLACK_TIMEOUT,
        STEP_RETRY_DELAY,
        VERIFY_RETRY,
        VERIFY_TIMEOUT,
        failure_reason,
        removal_window,
    )

ISO = core.ISO
ENDED = core.ENDED

# Patches: each changes the commands a run issues, so runs recorded before it replay the old way
# (tests/histories/) and only runs that reach it on new code take the new path.
# Removal retried for NHI_REVOKE_ALERT_SECONDS, then revoke_failed, alerted once per episode.
REMOVAL_ALERT_WINDOW = "removal-alert-window"
# Actions accepted but not yet carried out travel across continue-as-new in the state.
CARRY_PENDING = "carry-pending-actions"
# One Slack activity per recipient: a retry reposts to that recipient only.
SLACK_PER_RECIPIENT = "slack-per-recipient"
# A step or update whose activity fails is recorded and retried (or fails the update only).
CONTAINED = "contained-failures"
# A default renewal never shortens the expiry, and renewals and restores respect the agent's
# expected end as well as the maximum lifetime.
RENEWAL_CAPS = "renewal-caps"
# A rotation during an overlap keeps the keys already retiring (runs before it forgot them).
KEEP_RETIRING = "keep-every-retiring-key"
# The configuration is loaded by a local activity, within the run's first workflow task: a
# lifecycle's start is one workflow task and no activity task (issue 15).
LOCAL_LOAD = "local-lifecycle-load"
# A failed rotation is retried after a ninth of its period (at most 6 h), not always 6 h: a
# short-lived token (GitHub's hour) is re-issued again before the one in use lapses.
ROTATION_RETRY_BY_PERIOD = "rotation-retry-by-period"


def _wall_clock() -> datetime:
    """Now by this worker's clock (validators only: they never run on replay)."""
    with workflow.unsafe.sandbox_unrestricted():
        return datetime.now(UTC)


def clean(text: str) -> str:
    """Caller text as it can be stored and shown: no NUL byte, no lone surrogate."""
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def cleaned(action: Any) -> Any:
    """The same request (any LifecycleAction subclass) with its free text cleaned."""
    return action.model_copy(
        update={
            "actor": clean(action.actor),
            "reason": clean(action.reason),
            "principal": clean(action.principal),
        }
    )


def plain(action: LifecycleAction | None) -> LifecycleAction | None:
    """A pending action as the state carries it (a PromptAnswer loses its prompt fields)."""
    if action is None:
        return None
    return LifecycleAction(
        actor=action.actor, channel=action.channel, reason=action.reason, principal=action.principal
    )


def refused(err: core.ExpiryRefused) -> ApplicationError:
    """A rule's refusal as the update's error (its type is what callers map to HTTP)."""
    return ApplicationError(err.message, type=err.kind)


@workflow.defn(name=LIFECYCLE_WORKFLOW)
class NhiLifecycleWorkflow:
    """Keeps one NHI alive exactly as long as someone answers for it."""

    @workflow.init
    def __init__(self, inp: LifecycleInput) -> None:
        self._nhi_id = inp.nhi_id
        self._cfg: LifecycleConfig | None = None
        self._state: LifecycleState | None = inp.state
        self._lock = asyncio.Lock()
        self._wake = False
        self._step_failures = 0
        # Set while the quarantine step runs: the inventory may already say `quarantined` while
        # the run's own state changes only when the step ends (read only by validators).
        self._quarantining = False
        # A fresh run started to contain the NHI, or actions the previous run had accepted.
        self._decommission: LifecycleAction | None = None
        if inp.pending_decommission is not None:
            self._decommission = cleaned(inp.pending_decommission)
        self._rotate: LifecycleAction | None = None
        if inp.state is not None:
            self._decommission = inp.state.pending_decommission or self._decommission
            self._rotate = inp.state.pending_rotate
            self._state = inp.state.model_copy(
                update={"pending_decommission": None, "pending_rotate": None}
            )
        # A run that provisions its NHI first (one run per NHI, issue 15): built here, since a
        # `decide` update can arrive in the very first activation. Updates that act on an
        # active NHI are refused until it is active; `decide` only until then.
        self._provisioning: Provisioning | None = None
        if inp.provision is not None:
            self._provisioning = Provisioning(inp.provision)

    # ---- queries and updates -----------------------------------------------------------------

    @workflow.query
    def view(self) -> LifecycleView:
        """Current phase, deadlines and reminders."""
        self._refuse_while_provisioning()
        return self._view()

    @workflow.update
    async def decide(self, decision: ApprovalDecision) -> ApprovalOutcome:
        """Approve or deny the pending provisioning of this run's NHI (the same gate and rules
        as `ProvisionNhiWorkflow.decide`)."""
        steps = self._provisioning
        if steps is None:  # unreachable: the validator refused
            raise ApplicationError("this request needs no approval", type="InvalidState")
        return steps.gate.apply(decision, self._nhi_id)

    @decide.validator
    def _check_decision(self, decision: ApprovalDecision) -> None:
        steps = self._provisioning
        if steps is None or steps.handed_over:
            raise ApplicationError("this request needs no approval", type="InvalidState")
        steps.gate.check(decision)

    @workflow.update
    async def renew(self, req: RenewRequest) -> LifecycleView:
        """Extend the expiry (default TTL from now, never past the maximum lifetime)."""
        await self._ready(self._check_renew, req)
        req = cleaned(req)
        async with self._lock:
            self._require(Phase.ACTIVE)
            expiry = self._renewed_expiry(req.extend_by_seconds, strict=self._strict_caps())
            try:
                await self._renew(expiry, req, "renew")
            except ActivityError as err:
                raise await self._update_failed("renewal", err) from None
        self._wake_after_decision()
        return self._view("renewed")

    @renew.validator
    def _check_renew(self, req: RenewRequest) -> None:
        self._check_deadline(req)
        if not self._loaded():
            return
        self._check_actor(req)
        self._require(Phase.ACTIVE)
        self._renewed_expiry(req.extend_by_seconds, strict=True)

    @workflow.update
    async def rotate(self, req: LifecycleAction) -> LifecycleView:
        """Rotate the credential now (access keys); recorded as not applicable for roles."""
        await self._ready(self._check_rotate, req)
        req = cleaned(req)
        cfg = self._config()
        if cfg.kind not in ROTATABLE_KINDS:
            try:
                await self._note(
                    "nhi.rotation_not_applicable",
                    req,
                    f"{cfg.kind.value} has no static secret to rotate",
                )
            except ActivityError as err:
                raise await self._update_failed("recording the rotation request", err) from None
            return self._view(f"rotation not applicable: {cfg.kind.value} has no static secret")
        self._rotate = req
        self._wake = True
        return self._view("rotation started")

    @rotate.validator
    def _check_rotate(self, req: LifecycleAction) -> None:
        self._check_deadline(req)
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
        self._decommission = cleaned(req)
        self._wake = True
        return self._view("decommission started")

    @decommission.validator
    def _check_decommission(self, req: LifecycleAction) -> None:
        self._check_deadline(req)
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
        req = cleaned(req)
        async with self._lock:
            self._require(Phase.QUARANTINED)
            try:
                await self._restore(req)
            except ActivityError as err:
                raise await self._update_failed("restore", err, requarantine=True) from None
        self._wake_after_decision()
        return self._view("restored")

    @restore.validator
    def _check_restore(self, req: LifecycleAction) -> None:
        self._check_deadline(req)
        if not self._loaded():
            return
        self._check_actor(req)
        if not self._quarantining:
            # A restore sent the moment the inventory shows the quarantine is accepted and
            # waits for the step to end; the handler checks the phase again under the lock.
            self._require(Phase.QUARANTINED)
        try:
            core.check_restorable(self._config(), workflow.now())
        except core.ExpiryRefused as err:
            raise refused(err) from None

    @workflow.update
    async def answer(self, ans: PromptAnswer) -> LifecycleView:
        """An owner's answer to a prompt: Renew, Let expire or Decommission now."""
        await self._ready(self._check_answer, ans)
        ans = cleaned(ans)
        async with self._lock:
            self._require(Phase.ACTIVE)
            self._wake_after_decision()
            try:
                return await self._apply_answer(ans)
            except ActivityError as err:
                raise await self._update_failed(f"answer {ans.answer.value}", err) from None

    async def _apply_answer(self, ans: PromptAnswer) -> LifecycleView:
        if ans.answer is PromptAnswerKind.RENEW:
            expiry = self._renewed_expiry(None, strict=self._strict_caps())
            await self._renew(expiry, ans, ans.answer.value)
            return self._view("renewed")
        await self._close_prompts(ans, ans.answer.value)
        if ans.answer is PromptAnswerKind.LET_EXPIRE:
            self._apply(core.after_let_expire(self._snapshot()))
            await self._note("nhi.let_expire", ans, ans.reason or "owner chose to let it expire")
            return self._view("will expire")
        self._decommission = ans
        self._wake = True
        return self._view("decommission started")

    @answer.validator
    def _check_answer(self, ans: PromptAnswer) -> None:
        self._check_deadline(ans)
        if not self._loaded():
            return
        self._check_actor(ans)
        self._require(Phase.ACTIVE)
        if ans.prompt_id not in self._st().open_prompts:
            raise ApplicationError("this prompt has already been answered", type="AlreadyDecided")
        if ans.answer is PromptAnswerKind.RENEW:
            self._renewed_expiry(None, strict=True)

    @workflow.update
    async def mark_missing(self, req: LifecycleAction) -> LifecycleView:
        """The identity is gone from its platform (a sweep found it so): stop for good.

        The sweep records the `missing` status, its audit event and the alert; this only ends
        the run, which never acts on the identity again.
        """
        await self._ready(self._check_mark_missing, req)
        req = cleaned(req)
        async with self._lock:  # let a step under way finish first
            if self._st().phase is Phase.DECOMMISSIONED:
                return self._view("already decommissioned")
            self._apply(
                core.after_missing(self._snapshot(), req.reason or "gone from its platform")
            )
            tagging.tag_status(NhiStatus.MISSING)
            self._wake = True
        return self._view("missing")

    @mark_missing.validator
    def _check_mark_missing(self, req: LifecycleAction) -> None:
        self._check_deadline(req)
        if not req.actor.startswith(("system:", "security:")):
            raise ApplicationError(
                "only a sweep or the security team marks an NHI missing", type="NotOwner"
            )
        if not self._loaded():
            return
        phase = self._st().phase
        if phase in ENDED:
            raise ApplicationError(f"the NHI is already {phase.value}", type="InvalidState")

    # ---- main loop ---------------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: LifecycleInput) -> LifecycleView:
        """Loop until the NHI is decommissioned (or missing), continuing as new when history
        grows long. A run started with a provisioning request provisions the NHI first; if that
        fails, is denied or is cancelled, it compensates and ends as provisioning would."""
        if self._provisioning is not None:
            if self._provisioning.inp.bundled:
                # A bundle's NHIs are handed over by the bundle, in runs of their own.
                raise ApplicationError(
                    "a bundled NHI is provisioned by its bundle", non_retryable=True
                )
            await self._provisioning.run()
        cfg = await self._load(inp.nhi_id)
        self._cfg = cfg
        if self._state is None:
            self._apply(core.initial_state(cfg, workflow.now(), self._decommission))
        tagging.tag_nhi(cfg, self._st().expires_at)
        while True:
            # Only the run-level answers are taken here; the step asks again under the lock,
            # since an update may change the state while the loop waits for it.
            action = core.next_action(
                self._snapshot(),
                cfg,
                workflow.now(),
                history_full=workflow.info().is_continue_as_new_suggested(),
            )
            if isinstance(action, core.Done):
                break
            if isinstance(action, core.ContinueAsNew):
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    LifecycleInput(nhi_id=inp.nhi_id, state=self._carried()),
                    search_attributes=tagging.carried(),
                )
            async with self._lock:
                deadline = await self._contained_step(workflow.now())
            if deadline is None:
                continue
            self._wake = False
            timeout = max(deadline - workflow.now(), timedelta(0))
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self._wake, timeout=timeout, timeout_summary="next lifecycle deadline"
                )
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._view(self._st().phase.value)

    async def _load(self, nhi_id: Any) -> LifecycleConfig:
        """The configuration; a failing load (inventory down, a policy missing) is retried
        rather than ending the run, unless the NHI itself is gone from the inventory."""
        alerted = False
        while True:
            try:
                cfg: LifecycleConfig = await (
                    local_db_step if workflow.patched(LOCAL_LOAD) else self._db
                )(DbActivities.load_lifecycle, NhiRef(nhi_id=nhi_id))
                return cfg
            except ActivityError as err:
                cause = err.cause
                gone = isinstance(cause, ApplicationError) and cause.type == "NotFound"
                if gone or not workflow.patched(CONTAINED):
                    raise
                reason = failure_reason(err)
                workflow.logger.error("lifecycle of nhi %s cannot load: %s", nhi_id, reason)
                if not alerted:
                    alerted = True
                    await self._send_alert(
                        AlertPost(
                            security=True,
                            text=f"The lifecycle of NHI {nhi_id} cannot load its configuration "
                            f"({reason}); it retries every {STEP_RETRY_DELAY}.",
                        )
                    )
                await workflow.sleep(STEP_RETRY_DELAY, summary="retry loading the lifecycle")

    def _carried(self) -> LifecycleState:
        """The state the next run starts from, with the actions accepted but not yet done."""
        state = self._st()
        if not workflow.patched(CARRY_PENDING):
            return state
        return state.model_copy(
            update={
                "pending_decommission": plain(self._decommission),
                "pending_rotate": plain(self._rotate),
            }
        )

    async def _contained_step(self, now: datetime) -> datetime | None:
        """One step; an activity failure is recorded and retried later, never the run's end."""
        try:
            deadline = await self._step(now)
        except ActivityError as err:
            if not workflow.patched(CONTAINED):
                raise
            return await self._step_failed(err)
        self._step_failures = 0
        return deadline

    async def _step_failed(self, err: ActivityError) -> datetime:
        reason = clean(failure_reason(err))[:1000]
        self._step_failures += 1
        workflow.logger.error(
            "lifecycle step of nhi %s failed (%d in a row), retrying in %s: %s",
            self._nhi_id,
            self._step_failures,
            STEP_RETRY_DELAY,
            reason,
        )
        # The only caller-supplied text in a step is an action's reason: retry without it, so
        # a value that poisons a write cannot block a decommission or rotation forever.
        if self._decommission is not None and self._decommission.reason:
            self._decommission = self._decommission.model_copy(update={"reason": ""})
        if self._rotate is not None and self._rotate.reason:
            self._rotate = self._rotate.model_copy(update={"reason": ""})
        if self._step_failures == 1:  # one record and one alert per streak, not per retry
            cfg = self._config()
            with contextlib.suppress(ActivityError):
                await workflow.execute_activity_method(
                    DbActivities.note,
                    AuditNote(
                        subject_id=self._nhi_id,
                        event="nhi.step_failed",
                        actor="system:lifecycle",
                        reason=f"a lifecycle step failed and is retried: {reason}",
                        details={"key": str(workflow.uuid4())},
                    ),
                    start_to_close_timeout=DB_TIMEOUT,
                    retry_policy=DB_BEST_EFFORT_RETRY,
                )
            await self._alert(
                f"The lifecycle of {cfg.plan.identity_name} (agent {cfg.agent_name}) could not "
                f"complete a step: {reason}. It retries every {STEP_RETRY_DELAY}.",
                emails=[cfg.owner_email],
                channels=[cfg.security_channel],
            )
        return workflow.now() + STEP_RETRY_DELAY

    async def _update_failed(
        self, what: str, err: ActivityError, *, requarantine: bool = False
    ) -> ApplicationError:
        """An update whose activity failed fails that update with the reason; the run goes on.

        A restore that failed after lifting the quarantine puts it back (best effort), so the
        identity is never usable while the lifecycle holds it quarantined.
        """
        reason = clean(failure_reason(err))[:1000]
        workflow.logger.error("%s of nhi %s failed: %s", what, self._nhi_id, reason)
        if requarantine and workflow.patched(CONTAINED):
            with contextlib.suppress(ActivityError):
                await self._disable()
        return ApplicationError(f"{what} failed, nothing was changed: {reason}", type="StepFailed")

    async def _step(self, now: datetime) -> datetime | None:
        """Carry out what the lifecycle core says is due, or return when the next thing is."""
        action = core.next_action(self._snapshot(), self._config(), now)
        if isinstance(action, core.Sleep):
            return action.until
        if isinstance(action, core.Delete | core.RetryRemoval):
            await self._remove()
        elif isinstance(action, core.Quarantine):
            await self._quarantine(action.request)
        elif isinstance(action, core.Expire):
            self._apply(core.with_decommission(self._snapshot(), action.request))
        elif isinstance(action, core.RetireOldKey):
            await self._retire(action.key_id, deactivate=action.deactivate)
        elif isinstance(action, core.Rotate):
            await self._rotate_key(action.request)
        elif isinstance(action, core.Remind):
            await self._remind(action.offset)
        # Done and ContinueAsNew belong to the loop, which asks again right away.
        return None

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
        # Open in the state before delivery: the prompt is answerable (its row is open) from
        # the moment the activity commits, and an answer must not be refused as already decided.
        self._apply(core.after_reminder(self._snapshot(), offset, msg.prompt_id))
        reachable = await self._deliver(msg)
        escalation = core.escalation(self._st(), cfg, offset, reachable)
        if escalation is not None:
            await self._escalate(escalation)

    async def _escalate(self, escalation: core.Escalate) -> None:
        msg = await self._db(
            DbActivities.open_prompt,
            OpenPrompt(
                nhi_id=self._nhi_id,
                kind=PromptKind.ESCALATION,
                for_expires_at=self._st().expires_at,
                offset_seconds=escalation.offset,
                reason=escalation.reason,
            ),
        )
        self._apply(core.after_escalation(self._snapshot(), msg.prompt_id))
        await self._deliver(msg)

    async def _deliver(self, msg: PromptMessage) -> bool:
        """Send a prompt; a Slack outage is logged and never blocks the lifecycle."""
        if msg.already_delivered:
            return True
        if workflow.patched(SLACK_PER_RECIPIENT):
            return await self._deliver_each(msg)
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

    async def _deliver_each(self, msg: PromptMessage) -> bool:
        """Reminder: DM the owner. Escalation: the owner, the backup owner and the team channel.

        One activity per recipient, so a retry after one failure never reposts to the others;
        `False` when the owner has no active Slack account (the workflow then escalates).
        """
        posts = [PromptPost(msg=msg, email=msg.owner_email)]
        if msg.kind is PromptKind.ESCALATION:
            if msg.backup_owner_email:
                posts.append(PromptPost(msg=msg, email=msg.backup_owner_email))
            posts.append(PromptPost(msg=msg, channel=msg.team_channel))
        deliveries = []
        owner_reachable = True
        for post in posts:
            try:
                posted: PromptPosted = await workflow.execute_activity_method(
                    SlackActivities.post_prompt,
                    post,
                    start_to_close_timeout=SLACK_TIMEOUT,
                    retry_policy=SLACK_RETRY,
                )
            except ActivityError as err:
                workflow.logger.warning(
                    "prompt %s not delivered to %s: %s",
                    msg.prompt_id,
                    post.email or post.channel,
                    failure_reason(err),
                )
                continue
            if posted.delivery is not None:
                deliveries.append(posted.delivery)
            elif post.email == msg.owner_email:
                owner_reachable = False
                if msg.kind is PromptKind.REMINDER:
                    break
        if deliveries:
            await self._db(
                DbActivities.record_delivery,
                DeliveryResult(
                    prompt_id=msg.prompt_id,
                    deliveries=deliveries,
                    owner_reachable=owner_reachable,
                ),
            )
        return owner_reachable

    async def _renew(self, new_expiry: datetime, action: LifecycleAction, decision: str) -> None:
        s, cfg = self._st(), self._config()
        await self._platform(ProviderActivities.update_expiry, self._plan(new_expiry))
        try:
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
        except ActivityError:
            # Not recorded, so not renewed: the platform's expiry goes back to the recorded one
            # (best effort; the lifecycle quarantines at the recorded expiry either way).
            if workflow.patched(CONTAINED):
                with contextlib.suppress(ActivityError):
                    await self._platform(ProviderActivities.update_expiry, self._plan(s.expires_at))
            raise
        tagging.tag_status(NhiStatus.ACTIVE, new_expiry)
        try:
            await self._close_prompts(action, decision)
        except ActivityError as err:
            # The renewal is recorded; prompts left open must not undo it.
            if not workflow.patched(CONTAINED):
                raise
            workflow.logger.warning(
                "prompts of nhi %s not closed: %s", self._nhi_id, failure_reason(err)
            )
        self._apply(core.after_renewal(self._snapshot(), cfg, new_expiry, workflow.now()))

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
            self._apply(core.after_rotation_not_applicable(self._snapshot()))
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
            await self._alert(f"{cfg.plan.identity_name}: {reason}", emails=[cfg.owner_email])
            delay = (
                core.rotation_retry_delay(cfg)
                if workflow.patched(ROTATION_RETRY_BY_PERIOD)
                else core.ROTATION_RETRY_DELAY
            )
            self._apply(core.after_rotation_failed(self._snapshot(), now, delay))
            return
        await self._status(
            NhiStatus.ACTIVE,
            "nhi.rotated",
            action,
            action.reason or "new key proven and promoted",
            rotated=True,
            details={"new_key": promoted.new_key_id, "old_key": promoted.old_key_id or ""},
        )
        self._apply(
            core.after_rotation(
                self._snapshot(),
                cfg,
                now,
                old_key_id=promoted.old_key_id,
                new_key_id=promoted.new_key_id,
                # Asked only when keys are still retiring: other runs record no marker.
                keep_retiring=not self._st().retiring or workflow.patched(KEEP_RETIRING),
            )
        )

    async def _retire(self, key_id: str, *, deactivate: bool) -> None:
        retiring = next((r for r in self._st().retiring if r.key_id == key_id), None)
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
        else:
            await self._platform(ProviderActivities.delete_key, key)
            await self._note(
                "nhi.old_key_deleted",
                LifecycleAction(actor="system:rotation", channel="system"),
                f"access key {retiring.key_id} deleted after the overlap window",
            )
        self._apply(core.after_retire(self._snapshot(), key_id, deactivate=deactivate))

    async def _quarantine(self, action: LifecycleAction) -> None:
        self._quarantining = True
        try:
            await self._quarantine_steps(action)
        finally:
            self._quarantining = False

    async def _quarantine_steps(self, action: LifecycleAction) -> None:
        cfg = self._config()
        plan = self._plan(self._st().expires_at)
        reason = action.reason or "decommission requested"
        try:
            done = await self._disable()
            if workflow.patched(IDENTITY_REFS):
                await workflow.execute_activity_method(
                    ProviderActivities.verify_identity_quarantined,
                    IdentityRef.of_plan(plan),
                    start_to_close_timeout=VERIFY_TIMEOUT,
                    retry_policy=VERIFY_RETRY,
                )
            else:
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
        self._apply(core.after_quarantine(self._snapshot(), workflow.now(), reason))

    async def _remove(self) -> None:
        plan = self._plan(self._st().expires_at)
        try:
            if workflow.patched(REMOVAL_ALERT_WINDOW) and workflow.patched(IDENTITY_REFS):
                # Retried for the alert window, then revoke_failed and alerted: a removal that
                # keeps failing surfaces within minutes (later retries every revoke period).
                removed = await workflow.execute_activity_method(
                    ProviderActivities.delete_identity,
                    DeleteIdentity(ref=IdentityRef.of_plan(plan)),
                    start_to_close_timeout=PLATFORM_TIMEOUT,
                    schedule_to_close_timeout=removal_window(self._config().revoke_alert_seconds),
                    heartbeat_timeout=PLATFORM_HEARTBEAT,
                    retry_policy=REMOVAL_RETRY,
                )
            elif workflow.patched(REMOVAL_ALERT_WINDOW):
                removed = await workflow.execute_activity_method(
                    ProviderActivities.remove_identity,
                    RemoveIdentity(plan=plan),
                    start_to_close_timeout=PLATFORM_TIMEOUT,
                    schedule_to_close_timeout=removal_window(self._config().revoke_alert_seconds),
                    heartbeat_timeout=PLATFORM_HEARTBEAT,
                    retry_policy=REMOVAL_RETRY,
                )
            else:
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
        self._apply(core.after_removal(self._snapshot()))

    async def _revoke_failed(self, reason: str) -> None:
        cfg = self._config()
        system = LifecycleAction(actor="system:decommission", channel="system")
        if self._st().phase is Phase.REVOKE_FAILED and workflow.patched(REMOVAL_ALERT_WINDOW):
            # The same failure episode: its owner and security were alerted when it began. The
            # inventory keeps the latest reason; the next retry is one retry period away.
            await self._status(NhiStatus.REVOKE_FAILED, "nhi.revoke_retry_failed", system, reason)
            self._apply(
                core.after_revoke_failed(self._snapshot(), workflow.now(), new_episode=False)
            )
            return
        await self._status(NhiStatus.REVOKE_FAILED, "nhi.revoke_failed", system, reason)
        retry = timedelta(seconds=cfg.revoke_retry_seconds)
        await self._alert(
            f"Revocation of {cfg.plan.identity_name} (agent {cfg.agent_name}) keeps "
            f"failing: {reason}. Retrying every {retry}.",
            emails=[cfg.owner_email],
            channels=[cfg.security_channel],
        )
        self._apply(core.after_revoke_failed(self._snapshot(), workflow.now(), new_episode=True))

    async def _restore(self, action: LifecycleAction) -> None:
        cfg = self._config()
        now = workflow.now()
        try:
            expiry = core.restored_expiry(self._st(), cfg, now, strict=self._strict_caps())
        except core.ExpiryRefused as err:
            raise refused(err) from None
        if workflow.patched(IDENTITY_REFS):
            await self._platform(
                ProviderActivities.lift_identity_quarantine, IdentityRef.of_plan(self._plan(expiry))
            )
        else:
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
        self._apply(core.after_restore(self._snapshot(), cfg, expiry, now))

    # ---- helpers -----------------------------------------------------------------------------

    def _strict_caps(self) -> bool:
        return workflow.patched(RENEWAL_CAPS)

    def _renewed_expiry(self, extend_by_seconds: int | None, *, strict: bool = False) -> datetime:
        """The expiry a renewal moves to (see `core.renewed_expiry`), or the update's error."""
        try:
            return core.renewed_expiry(
                self._st(), self._config(), workflow.now(), extend_by_seconds, strict=strict
            )
        except core.ExpiryRefused as err:
            raise refused(err) from None

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
        """Whether the run has its configuration (validators accept a run still starting).
        Raises while the run is still provisioning its NHI: nothing can act on an NHI that
        is not active yet, and the request would otherwise wait for as long as an approval."""
        self._refuse_while_provisioning()
        return self._cfg is not None and self._state is not None

    def _refuse_while_provisioning(self) -> None:
        if self._provisioning is not None and not self._provisioning.handed_over:
            # Validators and queries do not run on replay: the type can change freely.
            raise ApplicationError(
                "the NHI is still being provisioned", type=core.STILL_PROVISIONING
            )

    @staticmethod
    def _check_deadline(action: LifecycleAction) -> None:
        # The API answered 503 once its deadline passed: an update delivered later (the worker
        # was down) must not be applied behind the caller's back. The deadline is the API's
        # wall clock, so it is compared with the wall clock, not the workflow's (which runs
        # days ahead on a time-skipping server). Validators do not run on replay, so reading
        # the clock here cannot affect determinism.
        if action.not_after is not None and _wall_clock() > action.not_after:
            raise ApplicationError(
                f"not delivered before the caller's deadline {action.not_after.strftime(ISO)}; "
                "nothing was applied",
                type="DeadlinePassed",
            )

    def _check_actor(self, action: LifecycleAction, *, containment: bool = False) -> None:
        if action.actor.startswith("system:"):
            return
        if containment and action.actor.startswith("security:"):
            return  # the security team may contain (rotate, decommission) any NHI
        cfg = self._config()
        if not is_owner(action.actor, cfg.owner_email, cfg.backup_owner_email):
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

    def _snapshot(self) -> LifecycleState:
        """The state as the lifecycle core reads it: with the actions accepted, not yet done."""
        return self._st().model_copy(
            update={"pending_decommission": self._decommission, "pending_rotate": self._rotate}
        )

    def _apply(self, state: LifecycleState) -> None:
        """Take a state the core computed from `_snapshot()`.

        The snapshot must be taken after the step's last await: `rotate` and `decommission`
        accept requests without the lock, and an older snapshot would drop them.
        """
        self._decommission = state.pending_decommission
        self._rotate = state.pending_rotate
        self._state = state.model_copy(
            update={"pending_decommission": None, "pending_rotate": None}
        )

    def _plan(self, expires_at: datetime) -> ProvisionPlan:
        # Providers derive their tags (the expiry tag included) from the plan's typed fields.
        return self._config().plan.model_copy(update={"expires_at": expires_at})

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
            grace_ends_at=(
                core.grace_end(s, cfg, workflow.now()) if s.phase is Phase.QUARANTINED else None
            ),
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
        tagging.tag_status(status, expires_at)

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

    async def _disable(self) -> list[str]:
        """The provider's quarantine of this identity; what it did."""
        plan = self._plan(self._st().expires_at)
        if workflow.patched(IDENTITY_REFS):
            done: list[str] = await self._platform(
                ProviderActivities.quarantine_identity, IdentityRef.of_plan(plan)
            )
        else:
            done = await self._platform(ProviderActivities.quarantine, plan)
        return done

    async def _platform(self, method: Callable[..., Any], arg: Any) -> Any:
        return await workflow.execute_activity_method(
            method,
            arg,
            start_to_close_timeout=PLATFORM_TIMEOUT,
            heartbeat_timeout=PLATFORM_HEARTBEAT,
            retry_policy=PLATFORM_RETRY,
        )

    async def _alert(self, text: str, *, emails: list[str], channels: Sequence[str] = ()) -> None:
        """Tell people and channels; one activity per recipient on today's code."""
        if not workflow.patched(SLACK_PER_RECIPIENT):
            await self._slack(
                SlackActivities.alert, Alert(emails=emails, channels=list(channels), text=text)
            )
            return
        for email in emails:
            await self._send_alert(AlertPost(text=text, email=email))
        for channel in channels:
            await self._send_alert(AlertPost(text=text, channel=channel))

    async def _send_alert(self, post: AlertPost) -> None:
        await self._slack(SlackActivities.send_alert, post)

    async def _slack(self, method: Callable[..., Any], arg: Any) -> None:
        try:
            await workflow.execute_activity_method(
                method, arg, start_to_close_timeout=SLACK_TIMEOUT, retry_policy=SLACK_RETRY
            )
        except ActivityError as err:
            workflow.logger.warning("slack call failed: %s", failure_reason(err))
