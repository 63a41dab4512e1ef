"""Typed payloads that cross the workflow/activity boundary.

Everything here ends up in Temporal history, so it carries identifiers, names, scopes and
references, never a secret. New fields get defaults so running workflows keep decoding.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.enums import (
    KINDS_BY_PLATFORM,
    PLATFORM_OF,
    ROTATABLE_KINDS,
    NhiKind,
    NhiStatus,
    Platform,
)


class Contract(BaseModel):
    """Base for payloads: immutable, and strict about unknown fields only where we build them."""

    model_config = ConfigDict(frozen=True)


class ScopeStatement(Contract):
    """One Allow statement of an NHI's maximum scope."""

    actions: list[str] = Field(min_length=1, max_length=50)
    resources: list[str] = Field(min_length=1, max_length=50)


class ProvisionInput(Contract):
    """Start provisioning the NHI row that the API already committed."""

    nhi_id: uuid.UUID
    requested_by: str = ""
    # The person behind `requested_by` (`email:<address>`, or the actor when no email is
    # known): four-eyes compares people, not credentials. Empty in runs started before it.
    requested_by_person: str = ""
    needs_approval: bool = False
    approval_timeout_seconds: int = 3 * 86400
    # Approvals where approvers are (issue 16); defaults keep earlier runs replaying as they ran.
    approvals_required: int = 1
    # The agent's owner and backup owner as persons: they may not decide either.
    owner_persons: list[str] = []
    # What the policy's approvers are sent in Slack; None: no Slack message (the API only).
    approval: ApprovalMessage | None = None
    # Run as a child of a bundle: the bundle approves, hands over to lifecycles and compensates.
    bundled: bool = False


class ApprovalItem(Contract):
    """One requested NHI as approvers see it."""

    label: str
    # Scope lines; sensitive entries are marked (see nhi.rules.slack_messages).
    scope: list[str]
    sensitive: list[str] = []


class ApprovalMessage(Contract):
    """What approvers are shown: the agent, the requester, the scope, the footprint change."""

    approval_id: uuid.UUID
    agent_name: str
    environment: str
    requested_by: str
    owner_email: str
    items: list[ApprovalItem]
    risk_before: int
    risk_after: int
    risk_threshold: int | None = None
    # Risk reasons whose points rose with this request (`sensitive_write +10: ...`).
    moved: list[str] = []
    approvals_required: int = 1
    window_seconds: int = 3 * 86400
    # The policy's approvers: Slack user groups, channels, emails.
    recipients: list[str] = []


class ApprovalPost(Contract):
    """Post an approval request to one recipient (a user group, a channel or an email)."""

    msg: ApprovalMessage
    recipient: str


class ApprovalPosted(Contract):
    """Where one approval request went (a user group: every member's DM)."""

    deliveries: list[Delivery] = []


class BundleInput(Contract):
    """Provision several NHIs of one agent together: one approval, all or nothing."""

    bundle_id: uuid.UUID
    nhi_ids: list[uuid.UUID]
    requested_by: str
    requested_by_person: str = ""
    needs_approval: bool = False
    approval_timeout_seconds: int = 3 * 86400
    approvals_required: int = 1
    owner_persons: list[str] = []
    approval: ApprovalMessage | None = None


class BundleResult(Contract):
    """Every NHI active, or none (the reason)."""

    bundle_id: uuid.UUID
    provisioned: list[uuid.UUID] = []
    failed: str | None = None


class ApprovalDecision(Contract):
    """An approver's answer to a request for sensitive actions."""

    approve: bool
    approver: str = Field(min_length=1, max_length=254)
    reason: str = Field(min_length=1, max_length=2000)
    # The person behind `approver` (see ProvisionInput.requested_by_person).
    approver_person: str = ""
    # As LifecycleAction.not_after: a decision the API gave up on is never applied later.
    not_after: datetime | None = None


class ApprovalOutcome(Contract):
    """What the workflow did with a decision."""

    nhi_id: uuid.UUID
    approved: bool
    approver: str
    # False while a second distinct approver is still needed.
    complete: bool = True


class RecordApproval(Contract):
    """Record an approval decision in the inventory and the audit trail."""

    nhi_id: uuid.UUID
    decision: ApprovalDecision


class NhiRef(Contract):
    """Identifies one NHI; activities reload everything else from Postgres."""

    nhi_id: uuid.UUID


class ProvisionPlan(Contract):
    """What to create, derived once from the inventory so retries create the same thing."""

    nhi_id: uuid.UUID
    agent_id: uuid.UUID
    agent_name: str
    environment: str
    owner_email: str
    platform: Platform
    kind: NhiKind
    identity_name: str
    iam_path: str
    secret_name: str
    scope: list[ScopeStatement]
    allowed_cidrs: list[str] = []
    trust_principal: str | None = None
    expires_at: datetime
    max_session_duration_seconds: int = 3600
    tags: dict[str, str] = {}
    # Where the identity lives when a platform has several places (a registered Postgres
    # target's name); None for AWS, whose account comes from the worker's credentials.
    target: str | None = None
    # iam_role: the principal the API issues task credentials as, trusted besides the agent's
    # runtime when the policy allows task credentials (None: not trusted).
    task_principal: str | None = None


class IdentityCreated(Contract):
    """The platform identity exists and its credential is delivered by reference."""

    external_id: str
    credential_ref: str
    access_key_id: str | None = None


class RecordActive(Contract):
    """Mark an NHI active once its identity and credential exist."""

    nhi_id: uuid.UUID
    external_id: str
    credential_ref: str
    workflow_id: str
    activated_at: datetime | None = None


class MarkFailed(Contract):
    """Record a permanent provisioning failure and its reason."""

    nhi_id: uuid.UUID
    status: NhiStatus = NhiStatus.FAILED
    reason: str
    workflow_id: str


class RemovalResult(Contract):
    """What a teardown removed; "not found" counts as removed."""

    removed: list[str] = []


class ProvisionResult(Contract):
    """Outcome of a provisioning run."""

    nhi_id: uuid.UUID
    status: NhiStatus
    external_id: str | None = None
    credential_ref: str | None = None
    # Bundled runs: what a bundle removes if a sibling fails.
    plan: ProvisionPlan | None = None


class RemoveIdentity(Contract):
    """Tear down what a plan created. A credential never delivered is deleted without recovery."""

    plan: ProvisionPlan
    force_delete_secret: bool = False


# ---- lifecycle -------------------------------------------------------------------------------


class Phase(StrEnum):
    """Where the lifecycle workflow is; mirrors the inventory status it maintains."""

    ACTIVE = "active"
    QUARANTINED = "quarantined"
    REVOKE_FAILED = "revoke_failed"
    DECOMMISSIONED = "decommissioned"
    # Gone from its platform (a sweep's `mark_missing`): the run ends and never acts again.
    MISSING = "missing"


class PromptAnswerKind(StrEnum):
    """The three buttons of a renewal prompt."""

    RENEW = "renew"
    LET_EXPIRE = "let_expire"
    DECOMMISSION_NOW = "decommission_now"


class LifecycleConfig(Contract):
    """What the lifecycle needs from the inventory, reloaded at every (continued) run."""

    nhi_id: uuid.UUID
    agent_name: str
    team: str
    kind: NhiKind
    status: NhiStatus
    owner_email: str
    backup_owner_email: str | None = None
    owner_slack_id: str | None = None
    expires_at: datetime
    max_lifetime_at: datetime
    activated_at: datetime
    last_rotated_at: datetime | None = None
    default_ttl_seconds: int
    rotation_period_seconds: int | None = None
    reminder_offsets_seconds: list[int] = []
    grace_period_seconds: int = 0
    rotation_overlap_seconds: int = 3600
    revoke_retry_seconds: int = 21600
    security_channel: str = "#nhi-security"
    agent_completed: bool = False
    plan: ProvisionPlan
    # The agent's planned end: caps every renewal and restore, like the maximum lifetime.
    expected_end_at: datetime | None = None
    # How long a removal may keep failing before the NHI is `revoke_failed` and alerted.
    revoke_alert_seconds: int = 300


class RetireKey(Contract):
    """An old credential (access key, alternate login) on its way out after a rotation."""

    key_id: str
    deactivate_at: datetime
    delete_at: datetime
    deactivated: bool = False

    @property
    def due_at(self) -> datetime:
        """When its next step (deactivate, then delete) is due."""
        return self.delete_at if self.deactivated else self.deactivate_at


class LifecycleState(Contract):
    """Everything the lifecycle carries across continue-as-new."""

    phase: Phase = Phase.ACTIVE
    expires_at: datetime
    reminders_done: list[int] = []
    answered: bool = False
    let_expire: bool = False
    escalated: bool = False
    next_rotation_at: datetime | None = None
    # Every old credential still retiring, oldest first: a rotation asked for during an
    # overlap adds one without dropping the others.
    retiring: list[RetireKey] = []
    quarantined_at: datetime | None = None
    decommission_reason: str | None = None
    open_prompts: list[uuid.UUID] = []
    # Actions an update accepted that the run had not carried out yet when it continued as
    # new: the next run carries them out (an accepted action is never dropped).
    pending_decommission: LifecycleAction | None = None
    pending_rotate: LifecycleAction | None = None

    @field_validator("retiring", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        # Runs recorded before several retirements were kept carry one key or null here
        # (histories and continue-as-new inputs): read them as a list of at most one.
        if value is None:
            return []
        if isinstance(value, dict | RetireKey):
            return [value]
        return value


class LifecycleInput(Contract):
    """Start (or continue) the lifecycle of an active NHI."""

    nhi_id: uuid.UUID
    state: LifecycleState | None = None
    # A fresh run started to contain an NHI whose previous run failed or is gone: the
    # decommission is carried out as if the update had been accepted.
    pending_decommission: LifecycleAction | None = None
    # One run per NHI (issue 15): the run provisions the NHI first, then keeps it. Only the
    # first run of an NHI carries it; continue-as-new never does.
    provision: ProvisionInput | None = None


class LifecycleAction(Contract):
    """Who asks for a lifecycle change, through which channel, and why."""

    actor: str = Field(min_length=1, max_length=254)
    channel: str = "api"
    reason: str = ""
    # The authenticated caller as the audit trail names it (token name or OIDC subject).
    principal: str = ""
    # The API's deadline: an update still undelivered by then is refused by the validator, so
    # a request answered 503 (not accepted in time) is never applied later.
    not_after: datetime | None = None


class RenewRequest(LifecycleAction):
    """Extend the expiry; by the policy's default TTL unless `extend_by_seconds` is given."""

    extend_by_seconds: int | None = Field(default=None, gt=0)


class PromptAnswer(LifecycleAction):
    """An owner's answer to a renewal prompt (Slack button, API or CLI)."""

    prompt_id: uuid.UUID
    answer: PromptAnswerKind


class LifecycleView(Contract):
    """The lifecycle as a query or an update returns it."""

    nhi_id: uuid.UUID
    phase: Phase
    expires_at: datetime
    max_lifetime_at: datetime
    next_rotation_at: datetime | None = None
    reminders_done: list[int] = []
    escalated: bool = False
    let_expire: bool = False
    quarantined_at: datetime | None = None
    grace_ends_at: datetime | None = None
    decommission_reason: str | None = None
    message: str = ""


class StatusChange(Contract):
    """A lifecycle transition recorded in the inventory with one audit event."""

    nhi_id: uuid.UUID
    status: NhiStatus
    event: str
    actor: str
    reason: str
    details: dict[str, str] = {}
    expires_at: datetime | None = None
    rotated: bool = False


class AuditNote(Contract):
    """An audit event that changes no status (a decision, a refusal, a not-applicable)."""

    subject_id: uuid.UUID
    event: str
    actor: str
    reason: str
    details: dict[str, str] = {}


class StagedKey(Contract):
    """A rotation's new key, stored as the pending secret version."""

    new_key_id: str
    old_key_id: str | None = None


class KeyRef(Contract):
    """One retiring credential: an access key of an IAM user, or an alternate login role of a
    Postgres NHI (then `key_id` is that login role's name)."""

    user_name: str
    key_id: str
    platform: Platform = Platform.AWS
    target: str | None = None


class PromptKind(StrEnum):
    """Why a prompt was sent."""

    REMINDER = "reminder"
    ESCALATION = "escalation"


class OpenPrompt(Contract):
    """Create (or find) the prompt row for one reminder or escalation."""

    nhi_id: uuid.UUID
    kind: PromptKind
    for_expires_at: datetime
    offset_seconds: int
    reason: str = ""


class PromptMessage(Contract):
    """What a prompt says and to whom; built from the inventory, holds no secret."""

    prompt_id: uuid.UUID
    nhi_id: uuid.UUID
    kind: PromptKind
    agent_name: str
    nhi_name: str
    nhi_kind: str
    environment: str
    scope_summary: str
    expires_at: datetime
    owner_email: str
    backup_owner_email: str | None = None
    owner_slack_id: str | None = None
    team_channel: str
    reason: str = ""
    already_delivered: bool = False


class Delivery(Contract):
    """One posted message: where it went and who may answer it."""

    channel: str
    ts: str
    email: str | None = None
    slack_user_id: str | None = None


class DeliveryResult(Contract):
    """The outcome of sending a prompt."""

    prompt_id: uuid.UUID
    deliveries: list[Delivery] = []
    owner_reachable: bool = True


class PromptDecision(Contract):
    """Close prompts with a decision, so their messages can show it."""

    nhi_id: uuid.UUID
    prompt_ids: list[uuid.UUID]
    decision: str
    actor: str


class MessageUpdate(Contract):
    """Rewrite posted prompts to show who decided what, and when."""

    deliveries: list[Delivery]
    text: str


class Alert(Contract):
    """A plain message to people and channels (failed revocation, orphan found...)."""

    emails: list[str] = []
    channels: list[str] = []
    security: bool = False  # also the configured security channel
    text: str


class AlertPost(Contract):
    """One alert to one recipient (a person by email, or a channel): a retry reposts to that
    recipient only."""

    text: str
    email: str | None = None
    channel: str | None = None
    security: bool = False  # the configured security channel (when the caller cannot know it)


class PromptPost(Contract):
    """One prompt to one recipient (a person by email, or a channel)."""

    msg: PromptMessage
    email: str | None = None
    channel: str | None = None


class PromptPosted(Contract):
    """Where one prompt was posted; no delivery when the person has no active Slack account."""

    delivery: Delivery | None = None


# ---- sweeps ----------------------------------------------------------------------------------


class FindingKind(StrEnum):
    """What a sweep can find (see nhi/rules/findings.py for the rules)."""

    ORPHAN = "orphan"
    UNTAGGED = "untagged"
    EXPIRED_ALIVE = "expired_alive"
    AGENT_GONE = "agent_gone"
    MISSING = "missing"
    DRIFT = "drift"
    STALE = "stale"
    UNSUPERVISED = "unsupervised"
    UNREACHABLE = "unreachable"
    # Stuck before `active` past NHI_SWEEP_PREACTIVE_SECONDS with no provisioning run.
    PREACTIVE = "preactive"


class PreactiveAction(StrEnum):
    """What a sweep does with an NHI stuck before `active`."""

    REDRIVE = "redrive"  # its run never started: nothing can exist on the platform
    CLEAN_UP = "clean_up"  # its run ended: remove whatever it may have made, mark it failed


class Finding(Contract):
    """One thing a sweep found, and what it will do (or did) about it."""

    kind: FindingKind
    identity: str
    identity_kind: str
    nhi_id: uuid.UUID | None = None
    detail: str = ""
    action: str = ""
    secret_arn: str | None = None
    target: str | None = None
    preactive: PreactiveAction | None = None  # set on `preactive` findings


class SweepInput(Contract):
    """Sweep one provider; a dry run only reports."""

    provider: str = "aws"
    dry_run: bool = False
    triggered_by: str = "system:schedule"
    sweep_id: uuid.UUID | None = None  # set when the API created the row first


class SweepPlan(Contract):
    """What a sweep found: findings (capped, so history stays small) and counts."""

    sweep_id: uuid.UUID
    findings: list[Finding] = []
    counts: dict[str, int] = {}
    truncated: int = 0
    orphan_grace_seconds: int = 86400
    # Settings the sweep's actions need (workflows read no settings themselves).
    revoke_alert_seconds: int = 300
    security_channel: str = "#nhi-security"


class SweepOutcome(Contract):
    """Record a sweep's end."""

    sweep_id: uuid.UUID
    status: str
    summary: dict[str, int] = {}
    findings: list[Finding] = []
    error: str | None = None


class OrphanInput(Contract):
    """Remove an identity this service made that the inventory no longer answers for."""

    identity: str
    identity_kind: NhiKind
    secret_arn: str | None = None
    grace_seconds: int = 86400
    found_by: str = ""
    target: str | None = None
    # The NHI id the platform's own marker names: providers that check markers before acting
    # (Postgres) refuse an identity that is not the one the sweep found.
    nhi_id: uuid.UUID | None = None
    # A removal still failing after this long is recorded and alerted (NHI_REVOKE_ALERT_SECONDS).
    alert_seconds: int = 300
    security_channel: str = "#nhi-security"


class OrphanQuarantined(Contract):
    """When the orphan was first quarantined (since it was last deleted): the grace period
    counts from then, so a removal retried by a later sweep does not wait it out again."""

    first_quarantined_at: datetime


class OrphanEvent(Contract):
    """An audit event about an orphan (subject type `orphan`, subject id its name)."""

    identity: str
    event: str
    actor: str
    reason: str
    details: dict[str, str] = {}
    key: str = ""  # idempotency key: a retried activity records the event once


class OrphanNoted(Contract):
    """Whether the event was the first of its kind since the orphan was last deleted (so a
    failure is alerted once, however many sweeps retry)."""

    first: bool


def orphan_plan(orphan: OrphanInput, nhi_id: uuid.UUID, now: datetime) -> ProvisionPlan:
    """The payload orphan removals have always sent to `remove_identity` (kept so recorded
    histories replay); the activity turns it back into the identity itself, and providers only
    ever see `IdentityRef.of_orphan`. New code builds no plans for orphans."""
    return ProvisionPlan.model_validate(
        {
            "nhi_id": orphan.nhi_id or nhi_id,
            "agent_id": nhi_id,
            "agent_name": "orphan",
            "environment": "unknown",
            "owner_email": "unknown",
            "platform": PLATFORM_OF[orphan.identity_kind],
            "kind": orphan.identity_kind,
            "identity_name": orphan.identity,
            "iam_path": "/",
            "secret_name": orphan.secret_arn or "",
            "scope": [],
            "expires_at": now,
            "target": orphan.target,
        }
    )


class LifecycleNudge(Contract):
    """Ask an NHI's lifecycle to act (decommission, mark_missing), or start it again when none
    runs (restart)."""

    nhi_id: uuid.UUID
    action: str
    reason: str
    # The update id derives from it: one nudge per sweep, so a later sweep's nudge (after a
    # restore, say) is never taken for the earlier one.
    sweep_id: uuid.UUID | None = None


class MissingMarked(Contract):
    """An NHI a sweep marked `missing`, and whom to tell."""

    nhi_id: uuid.UUID
    changed: bool  # False: it was no longer active (nothing marked, nobody told)
    name: str = ""
    agent_name: str = ""
    owner_email: str = ""
    status: str = ""


class PreactiveNhi(Contract):
    """Re-drive or clean up one NHI stuck before `active` (from a `preactive` finding)."""

    nhi_id: uuid.UUID
    action: PreactiveAction
    reason: str
    sweep_id: uuid.UUID | None = None


# ---- identity references ---------------------------------------------------------------------


class IdentityRef(Contract):
    """One identity on its platform, as containment, key retirement and removal need it.

    Narrower than a plan on purpose: no scope, owner, expiry or tags (only creating and
    renewing need those), so an identity a sweep found with no inventory row behind it is
    described exactly, not as a plan with made-up fields. Providers check `nhi_id` against
    their own marker before acting where they keep one (Postgres): None (not known) matches
    no marker, so such an identity is refused rather than taken for someone else's.
    """

    platform: Platform
    kind: NhiKind
    name: str
    # Where the identity lives when a platform has several places (a Postgres target).
    target: str | None = None
    nhi_id: uuid.UUID | None = None
    # The delivery secret's name or ARN; "" when none is known (an orphan whose secret the
    # sweep did not find).
    secret_name: str = ""
    # The platform's own id (an ARN, a DSN#role), when known.
    external_id: str | None = None

    @classmethod
    def of_plan(cls, plan: ProvisionPlan) -> IdentityRef:
        """The identity a plan made."""
        return cls(
            platform=plan.platform,
            kind=plan.kind,
            name=plan.identity_name,
            target=plan.target,
            nhi_id=plan.nhi_id,
            secret_name=plan.secret_name,
        )

    @classmethod
    def of_orphan(cls, orphan: OrphanInput) -> IdentityRef:
        """An identity a sweep found that no inventory row answers for."""
        return cls(
            platform=PLATFORM_OF[orphan.identity_kind],
            kind=orphan.identity_kind,
            name=orphan.identity,
            target=orphan.target,
            nhi_id=orphan.nhi_id,
            secret_name=orphan.secret_arn or "",
        )

    @classmethod
    def of_key(cls, key: KeyRef) -> IdentityRef:
        """The identity a retiring credential belongs to: the platform's one kind with a
        static credential (rotation runs only for those)."""
        (kind,) = KINDS_BY_PLATFORM[key.platform] & ROTATABLE_KINDS
        return cls(platform=key.platform, kind=kind, name=key.user_name, target=key.target)


# ---- containment (one agent, every credential) -----------------------------------------------


class DeleteIdentity(Contract):
    """Tear down one identity, what is attached to it and its delivery secret.

    The narrow form of `RemoveIdentity`: the workflows of today's code send this (patch
    `identity-ref-activities`), so removal never depends on scope, owner or expiry.
    """

    ref: IdentityRef
    # A credential never delivered (a failed provisioning) is deleted without recovery.
    force_delete_secret: bool = False


class ContainAgentInput(Contract):
    """Contain one agent: quarantine every NHI and end every task credential it has, then prove
    each credential dead. Started by `POST /v1/agents/{id}/contain` (a security caller) or
    automatically for a severe finding; the API creates the incident row first."""

    agent_id: uuid.UUID
    reason: str = Field(min_length=1, max_length=2000)
    # Who asked (`token:<name>`, `auto:finding`, ...); the person comparison for release is
    # made on the incident row, not here.
    actor: str = Field(min_length=1, max_length=254)
    finding_id: uuid.UUID | None = None
    # The incident row the run reports into; None when the starter did not create one (the
    # workflow's first activity opens or joins it).
    incident_id: uuid.UUID | None = None
    # Containment passes already made (carried across continue-as-new).
    passes: int = Field(default=0, ge=0)
    # Seconds between passes while partially contained; None: the playbook's default
    # (workflows/retry_policies.py CONTAIN_RETRY_DELAY).
    retry_seconds: int | None = Field(default=None, ge=1, le=86400)


ProvisionInput.model_rebuild()
BundleInput.model_rebuild()
ApprovalPost.model_rebuild()
ApprovalPosted.model_rebuild()
