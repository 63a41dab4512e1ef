"""Activities that read and change the inventory in Postgres.

Every status change goes through `nhi.services.transitions.transition` with an idempotency
key: the lifecycle's keys are chosen by the workflow, provisioning's derive from the workflow id
and the step. An activity retried after its transaction committed changes and records nothing
twice (the key's unique index decides, even between concurrent attempts).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.provider import plan_of
from models.contracts import (
    AuditNote,
    Delivery,
    DeliveryResult,
    LifecycleConfig,
    MarkFailed,
    NhiRef,
    OpenPrompt,
    PromptDecision,
    PromptKind,
    PromptMessage,
    ProvisionPlan,
    RecordActive,
    RecordApproval,
    ScopeStatement,
    StatusChange,
)
from models.enums import AgentStatus, NhiKind, NhiStatus
from models.orm import Agent, Nhi, Prompt
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.rules.github_scope import REISSUE_MIN_SECONDS
from nhi.rules.policy import RuleViolation
from nhi.rules.slack_messages import scope_summary
from nhi.services.incidents import containment_of, hold_agent
from nhi.services.policies import check_scope, find_policy, rules_of
from nhi.services.transitions import note, transition

SYSTEM_ACTOR = "system:provisioning"
# How many times provisioning looks for its lease before calling it gone (DB_RETRY's backoff:
# about 15 s): the API commits it right after the workflow start (api/routes/nhis.py).
LEASE_COMMIT_ATTEMPTS = 5
# The same wait as a local activity (DB_LOCAL_RETRY: 0.1 s doubling, about 25 s in all).
LOCAL_LEASE_COMMIT_ATTEMPTS = 9
# No lifecycle period exceeds a year (policies' maximum lifetime is at most 366 days); a policy
# value past it (say `reminder_offsets: [1e30]`) would overflow the workflow's date arithmetic.
MAX_PERIOD_SECONDS = 366 * 86400

log = logging.getLogger(__name__)


def clean(text: str) -> str:
    """Text as Postgres can store it: no NUL byte, no lone surrogate.

    The API refuses such input, but a value that reaches a workflow some other way must not
    make an audit write fail on every retry (and so stall or poison the lifecycle).
    """
    text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def clean_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """Audit details with every string key and value cleaned (see `clean`)."""
    return {clean(str(k)): clean(v) if isinstance(v, str) else v for k, v in details.items()}


def step_key(step: str) -> str | None:
    """The idempotency key of one step of the workflow run calling this activity: the same
    for every attempt of it, different in another run. None outside an activity (a test
    calling the method directly), where the status checks alone keep it idempotent."""
    if not activity.in_activity():
        return None
    info = activity.info()
    return f"{info.workflow_id}/{info.workflow_run_id}/{step}"


def digest(text: str) -> str:
    """A short stable digest, for keys that depend on free text."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def bounded_offsets(offsets: list[Any]) -> list[int]:
    """Reminder offsets a lifecycle can run with (whole seconds within a year), latest first;
    anything else is dropped with a warning rather than breaking every lifecycle."""
    kept: set[int] = set()
    for offset in offsets:
        number = isinstance(offset, int | float) and not isinstance(offset, bool)
        if number and 0 < offset <= MAX_PERIOD_SECONDS:
            kept.add(int(offset))
            continue
        log.warning("ignoring reminder offset %r: not a number of seconds within a year", offset)
    return sorted(kept, reverse=True)


def bounded(seconds: int | None, low: int, default: int) -> int:
    """A policy period clamped into what a lifecycle can run with."""
    if seconds is None or isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return default
    return int(min(max(seconds, low), MAX_PERIOD_SECONDS))


def _refuse_for_agent(session: Session, nhi: Nhi, agent: Agent) -> None:
    """No new identity for an agent whose task has ended or that is contained: a request
    recorded before is refused before anything is created, or, once created, before it
    becomes active (provisioning then removes what it created).

    Raises:
        ApplicationError: `AgentNotActive` or `Contained`, not retryable (for a contained
            agent the request can be made again once the incident is released).
    """
    if agent.status != AgentStatus.ACTIVE:
        raise ApplicationError(
            f"nhi {nhi.id}: its agent {agent.name} is {agent.status}: no new identities",
            type="AgentNotActive",
            non_retryable=True,
        )
    contained = containment_of(session, nhi.agent_id)
    if contained is not None:
        raise ApplicationError(f"nhi {nhi.id}: {contained}", type="Contained", non_retryable=True)


class DbActivities:
    """Inventory reads and state transitions; one session and transaction per call."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self._sessions = sessions
        self._settings = settings

    def _locked(self, session: Session, nhi_id: object) -> Nhi:
        nhi = session.get(Nhi, nhi_id, with_for_update=True)
        if nhi is None:
            raise ApplicationError(f"nhi {nhi_id} not found", type="NotFound", non_retryable=True)
        return nhi

    def plan_of(
        self, nhi: Nhi, agent: Agent, max_session_duration: int, *, task_credentials: bool = False
    ) -> ProvisionPlan:
        """What the platform needs to know of an NHI (derived, so retries see the same)."""
        return plan_of(
            nhi,
            agent,
            self._settings,
            max_session_duration,
            allow_task_credentials=task_credentials,
        )

    @activity.defn
    def begin_provisioning(self, ref: NhiRef) -> ProvisionPlan:
        """Move a requested NHI to `provisioning` and derive what to create.

        Idempotent: a retry (or a new worker after a crash) gets the same plan back. The scope
        is checked again against the current policy, which may have tightened since the request.
        """
        info = activity.info()
        waits = LOCAL_LEASE_COMMIT_ATTEMPTS if info.is_local else LEASE_COMMIT_ATTEMPTS
        with transaction(self._sessions) as session:
            if session.get(Nhi, ref.nhi_id) is None and info.attempt < waits:
                # The API commits the lease only once this workflow has started (so a refused
                # start leaves nothing); this first step can run before that commit lands.
                raise ApplicationError(
                    f"nhi {ref.nhi_id}: lease not committed yet", type="LeaseNotCommitted"
                )
            nhi = self._locked(session, ref.nhi_id)
            agent = session.get_one(Agent, nhi.agent_id)
            if nhi.status not in (NhiStatus.REQUESTED, NhiStatus.PROVISIONING, NhiStatus.ACTIVE):
                raise ApplicationError(
                    f"nhi {nhi.id} is {nhi.status}, not requested",
                    type="InvalidState",
                    non_retryable=True,
                )
            policy = find_policy(session, nhi.platform, nhi.kind, agent.environment)
            scope = [ScopeStatement.model_validate(s) for s in nhi.granted_scope]
            try:
                if policy is None or not policy.allowed:
                    raise RuleViolation(
                        "kind", f"{nhi.kind} is no longer allowed in {agent.environment}"
                    )
                check_scope(nhi.platform, scope, rules_of(policy))
            except RuleViolation as err:
                raise ApplicationError(
                    str(err), type="PolicyViolation", non_retryable=True
                ) from None
            if nhi.status != NhiStatus.ACTIVE:
                _refuse_for_agent(session, nhi, agent)
            if nhi.status == NhiStatus.REQUESTED:
                workflow_id = activity.info().workflow_id
                transition(
                    session,
                    nhi,
                    status=NhiStatus.PROVISIONING,
                    event="nhi.provisioning",
                    actor=SYSTEM_ACTOR,
                    reason=f"workflow {workflow_id} started creating {nhi.name}",
                    key=step_key("provisioning"),
                )
            return self.plan_of(
                nhi,
                agent,
                policy.max_session_duration_seconds,
                task_credentials=policy.allow_task_credentials,
            )

    @activity.defn
    def record_approval(self, change: RecordApproval) -> None:
        """Apply an approver's decision: back to `requested`, or `failed` when denied."""
        decision = change.decision
        with transaction(self._sessions) as session:
            nhi = self._locked(session, change.nhi_id)
            if nhi.status != NhiStatus.PENDING_APPROVAL:
                return  # already applied by an earlier attempt
            verdict = "approved" if decision.approve else "denied"
            transition(
                session,
                nhi,
                status=NhiStatus.REQUESTED if decision.approve else NhiStatus.FAILED,
                changes={
                    "status_reason": (
                        None if decision.approve else clean(f"denied by {decision.approver}")
                    )
                },
                event=f"nhi.{verdict}",
                actor=clean(decision.approver),
                reason=clean(decision.reason),
                key=step_key("decision"),
            )

    @activity.defn
    def record_active(self, change: RecordActive) -> None:
        """Mark the NHI active with its identity and credential reference (idempotent)."""
        with transaction(self._sessions) as session:
            nhi = self._locked(session, change.nhi_id)
            if nhi.status == NhiStatus.ACTIVE and nhi.external_id == change.external_id:
                return
            if nhi.status != NhiStatus.PROVISIONING:
                raise ApplicationError(
                    f"nhi {nhi.id} is {nhi.status}, not provisioning",
                    type="InvalidState",
                    non_retryable=True,
                )
            # Serialized with opening an incident and with completing the agent (both lock
            # its row exclusively): active before either (and then contained or
            # decommissioned by it), or refused here, and provisioning removes what it made.
            _refuse_for_agent(session, nhi, hold_agent(session, nhi.agent_id, opening=False))
            transition(
                session,
                nhi,
                status=NhiStatus.ACTIVE,
                changes={
                    "status_reason": None,
                    "external_id": change.external_id,
                    "credential_ref": change.credential_ref,
                    "activated_at": change.activated_at or datetime.now(UTC),
                    "workflow_id": nhi.workflow_id or change.workflow_id,
                },
                event="nhi.activated",
                actor=SYSTEM_ACTOR,
                reason=f"{nhi.kind} created and credential delivered by reference",
                details={
                    "external_id": change.external_id,
                    "credential_ref": change.credential_ref,
                },
                key=step_key(f"activated/{change.external_id}"),
            )

    @activity.defn
    def mark_failed(self, change: MarkFailed) -> None:
        """Record a permanent failure (idempotent)."""
        with transaction(self._sessions) as session:
            nhi = self._locked(session, change.nhi_id)
            reason = clean(change.reason)
            if nhi.status == change.status and nhi.status_reason == reason:
                return
            transition(
                session,
                nhi,
                status=change.status,
                changes={"status_reason": reason},
                event=f"nhi.{change.status.value}",
                actor=SYSTEM_ACTOR,
                reason=reason,
                details={"workflow_id": change.workflow_id},
                key=step_key(f"{change.status.value}/{digest(reason)}"),
            )

    @activity.defn
    def load_lifecycle(self, ref: NhiRef) -> LifecycleConfig:
        """The NHI, its agent and its policy as the lifecycle needs them."""
        with transaction(self._sessions) as session:
            nhi = self._locked(session, ref.nhi_id)
            agent = session.get_one(Agent, nhi.agent_id)
            policy = find_policy(session, nhi.platform, nhi.kind, agent.environment)
            if policy is None:
                raise ApplicationError(
                    f"no policy for {nhi.platform}/{nhi.kind}/{agent.environment}",
                    # Not "NotFound": the lifecycle takes that to mean the NHI itself is gone.
                    type="NoPolicy",
                    non_retryable=True,
                )
            return LifecycleConfig(
                nhi_id=nhi.id,
                agent_name=agent.name,
                team=agent.team,
                kind=NhiKind(nhi.kind),
                status=NhiStatus(nhi.status),
                owner_email=agent.owner_email,
                backup_owner_email=agent.backup_owner_email,
                owner_slack_id=agent.owner_slack_id,
                expires_at=nhi.expires_at,
                max_lifetime_at=nhi.max_lifetime_at,
                activated_at=nhi.activated_at or nhi.created_at,
                last_rotated_at=nhi.last_rotated_at,
                # Policy values are bounded here, outside the workflow: a value no lifecycle can
                # run with must not fail the workflow task of every NHI under that policy.
                default_ttl_seconds=bounded(policy.default_ttl_seconds, 60, 30 * 86400),
                rotation_period_seconds=(
                    None
                    if nhi.rotation_period_seconds is None
                    else bounded(
                        nhi.rotation_period_seconds,
                        # A GitHub App token lapses after an hour: it is re-issued sooner.
                        REISSUE_MIN_SECONDS if nhi.kind == NhiKind.GITHUB_APP_TOKEN else 3600,
                        30 * 86400,
                    )
                ),
                reminder_offsets_seconds=bounded_offsets(list(policy.reminder_offsets_seconds)),
                grace_period_seconds=bounded(policy.grace_period_seconds, 0, 86400),
                rotation_overlap_seconds=self._settings.rotation_overlap_seconds,
                revoke_retry_seconds=self._settings.revoke_retry_seconds,
                revoke_alert_seconds=self._settings.revoke_alert_seconds,
                security_channel=self._settings.slack_security_channel,
                agent_completed=agent.status != AgentStatus.ACTIVE,
                expected_end_at=agent.expected_end_at,
                plan=self.plan_of(nhi, agent, policy.max_session_duration_seconds),
            )

    @activity.defn
    def change_status(self, change: StatusChange) -> None:
        """Apply one lifecycle transition with its audit event (once per idempotency key)."""
        with transaction(self._sessions) as session:
            nhi = self._locked(session, change.nhi_id)
            now = datetime.now(UTC)
            reason = clean(change.reason)
            changes: dict[str, Any] = {
                "status_reason": None if change.status is NhiStatus.ACTIVE else reason
            }
            if change.expires_at is not None:
                changes["expires_at"] = change.expires_at
            if change.rotated:
                changes["last_rotated_at"] = now
            if change.status is NhiStatus.DECOMMISSIONED:
                changes["decommissioned_at"] = now
            transition(
                session,
                nhi,
                status=change.status,
                changes=changes,
                event=change.event,
                actor=clean(change.actor),
                reason=reason,
                details=clean_details(change.details),
                key=change.details.get("key") or None,
            )

    @activity.defn
    def note(self, entry: AuditNote) -> None:
        """An audit event without a status change (once per idempotency key)."""
        with transaction(self._sessions) as session:
            note(
                session,
                subject_type="nhi",
                subject_id=entry.subject_id,
                event=entry.event,
                actor=clean(entry.actor),
                reason=clean(entry.reason),
                details=clean_details(entry.details),
                key=entry.details.get("key") or None,
            )

    @activity.defn
    def open_prompt(self, request: OpenPrompt) -> PromptMessage:
        """Create the prompt row for this (NHI, kind, expiry, offset), or find the existing one."""
        with transaction(self._sessions) as session:
            session.execute(
                insert(Prompt)
                .values(
                    nhi_id=request.nhi_id,
                    kind=request.kind.value,
                    for_expires_at=request.for_expires_at,
                    offset_seconds=request.offset_seconds,
                    reason=clean(request.reason),
                    deliveries=[],
                    status="open",
                )
                .on_conflict_do_nothing(constraint="uq_prompts_once")
            )
            prompt = (
                session.query(Prompt)
                .filter_by(
                    nhi_id=request.nhi_id,
                    kind=request.kind.value,
                    for_expires_at=request.for_expires_at,
                    offset_seconds=request.offset_seconds,
                )
                .one()
            )
            nhi = session.get_one(Nhi, request.nhi_id)
            agent = session.get_one(Agent, nhi.agent_id)
            if not prompt.deliveries:
                note(
                    session,
                    subject_type="nhi",
                    subject_id=nhi.id,
                    event=f"nhi.{request.kind.value}",
                    actor="system:lifecycle",
                    reason=clean(request.reason)
                    or f"expires {request.for_expires_at:%Y-%m-%d %H:%M} UTC",
                    details={
                        "prompt_id": str(prompt.id),
                        "offset_seconds": str(request.offset_seconds),
                    },
                    # Once per prompt, also when an attempt dies before it records deliveries.
                    key=f"prompt/{prompt.id}",
                )
            return PromptMessage(
                prompt_id=prompt.id,
                nhi_id=nhi.id,
                kind=PromptKind(prompt.kind),
                agent_name=agent.name,
                nhi_name=nhi.name,
                nhi_kind=nhi.kind,
                environment=agent.environment,
                scope_summary=scope_summary(nhi.granted_scope),
                expires_at=request.for_expires_at,
                owner_email=agent.owner_email,
                backup_owner_email=agent.backup_owner_email,
                owner_slack_id=agent.owner_slack_id,
                team_channel=self._settings.slack_team_channels.get(
                    agent.team, self._settings.slack_default_team_channel
                ),
                reason=request.reason,
                already_delivered=bool(prompt.deliveries),
            )

    @activity.defn
    def record_delivery(self, result: DeliveryResult) -> None:
        """Remember where a prompt was posted, so it can be updated and answered."""
        with transaction(self._sessions) as session:
            prompt = session.get(Prompt, result.prompt_id, with_for_update=True)
            if prompt is None:
                raise ApplicationError("prompt not found", type="NotFound", non_retryable=True)
            prompt.deliveries = [d.model_dump() for d in result.deliveries]

    @activity.defn
    def decide_prompts(self, decision: PromptDecision) -> list[Delivery]:
        """Close open prompts with a decision; returns the messages to rewrite."""
        out: list[Delivery] = []
        with transaction(self._sessions) as session:
            prompts = (
                session.query(Prompt)
                .filter(Prompt.id.in_(decision.prompt_ids), Prompt.status == "open")
                .with_for_update()
                .all()
            )
            now = datetime.now(UTC)
            for prompt in prompts:
                prompt.status = "decided"
                prompt.decision = decision.decision
                prompt.decided_by = clean(decision.actor)
                prompt.decided_at = now
                out += [Delivery.model_validate(d) for d in prompt.deliveries]
        return out
