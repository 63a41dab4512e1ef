"""Approvals where approvers are (issue 16): which requests need one, who may decide, and the
record of what they decided.

A request needs approval when its scope asks for something the policy calls sensitive, or when
it would raise the agent's risk score past the policy's `risk_threshold`. The policy names the
approvers (Slack user groups, channels, emails), how many distinct ones must approve, and how
long they have. The workflow holds the authoritative wait (and refuses a second decision, the
requester and the owner again in its validator); the `approvals` row is what the API, the CLI
and Slack clicks read.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.contracts import ApprovalDecision, ApprovalItem, ApprovalMessage
from models.enums import NhiStatus, Role
from models.orm import Agent, Approval, Nhi, Policy
from models.schemas import ApprovalNeeded, NhiCreate, RiskOut
from nhi.infra.config import Settings
from nhi.rules.owners import is_owner
from nhi.rules.policy import RuleViolation
from nhi.rules.slack_messages import mark_scope
from nhi.services import nhis
from nhi.services.agents import get_agent
from nhi.services.auth import Principal, person_key
from nhi.services.errors import Conflict, Forbidden, NotFound
from nhi.services.footprint import footprint
from nhi.services.policies import find_policy
from nhi.services.transitions import note

PENDING, APPROVED, DENIED = "pending", "approved", "denied"
DEFAULT_WINDOW_SECONDS = 3 * 86400


@dataclass
class Gate:
    """What the API needs to start the run: whether it waits, and for whom."""

    needed: ApprovalNeeded | None = None
    message: ApprovalMessage | None = None
    owner_persons: list[str] = field(default_factory=list)
    window_seconds: int = DEFAULT_WINDOW_SECONDS
    required: int = 1

    @property
    def needs_approval(self) -> bool:
        return self.needed is not None


@dataclass(frozen=True)
class _Item:
    nhi: Nhi
    sensitive: list[str]
    policy: Policy | None


def moved_reasons(before: RiskOut, after: RiskOut) -> list[str]:
    """The risk reasons whose points this request raises (`sensitive_write +10: ...`)."""
    old = {r.code: r.points for r in before.reasons}
    return [
        f"{r.code} +{r.points - old.get(r.code, 0)}: {r.detail}"
        for r in after.reasons
        if r.points > old.get(r.code, 0)
    ]


def _risk(
    session: Session, agent_id: uuid.UUID, now: datetime, excluding: Sequence[uuid.UUID] = ()
) -> RiskOut:
    session.flush()
    return footprint(session, agent_id, now, excluding=excluding).risk


def request_one(
    session: Session,
    settings: Settings,
    agent_id: uuid.UUID,
    body: NhiCreate,
    p: Principal,
    own_account: str | None,
    workflow_id: Callable[[uuid.UUID], str],
) -> tuple[Nhi, list[str], Gate]:
    """`nhis.request_checked`, then whether it needs approval (sensitive entries, or the
    footprint past the policy's threshold); a needed approval is recorded with the request."""
    now = datetime.now(UTC)
    nhi, sensitive = nhis.request_checked(session, settings, agent_id, body, p.actor, own_account)
    item = _Item(nhi, sensitive, find_policy(session, nhi.platform, nhi.kind, environment(nhi)))
    gate = _gate(session, [item], p, workflow_id(nhi.id), bundle=False, now=now)
    return nhi, sensitive, gate


def request_bundle(
    session: Session,
    settings: Settings,
    agent_id: uuid.UUID,
    bodies: Sequence[NhiCreate],
    p: Principal,
    own_account: str | None,
    workflow_id: str,
) -> tuple[list[Nhi], Gate]:
    """Every request of a bundle checked and recorded, or none: the first one refused raises
    with its field under `nhis[<index>]` (the caller's transaction is rolled back)."""
    now = datetime.now(UTC)
    items: list[_Item] = []
    for index, body in enumerate(bodies):
        where = f"nhis[{index}]"
        try:
            nhi, sensitive = nhis.request_checked(
                session, settings, agent_id, body, p.actor, own_account
            )
        except RuleViolation as err:
            raise RuleViolation(f"{where}.{err.field}", err.message) from None
        except Conflict as err:
            raise Conflict(
                f"{where}.{err}", field=f"{where}.{err.field}" if err.field else where
            ) from None
        items.append(
            _Item(nhi, sensitive, find_policy(session, nhi.platform, nhi.kind, environment(nhi)))
        )
    gate = _gate(session, items, p, workflow_id, bundle=True, now=now)
    return [i.nhi for i in items], gate


def environment(nhi: Nhi) -> str:
    return str(nhi.agent.environment)


def _gate(
    session: Session,
    items: list[_Item],
    p: Principal,
    workflow_id: str,
    *,
    bundle: bool,
    now: datetime,
) -> Gate:
    agent = items[0].nhi.agent
    policies = [i.policy for i in items if i.policy is not None]
    thresholds = [q.risk_threshold for q in policies if q.risk_threshold is not None]
    threshold = min(thresholds) if thresholds else None
    sensitive = [s for i in items for s in i.sensitive]
    owners = [person_key(agent.owner_email, "")]
    if agent.backup_owner_email:
        owners.append(person_key(agent.backup_owner_email, ""))
    if not sensitive and threshold is None:
        # Nothing to decide (the default): the footprint, the costliest read of a request, is
        # not needed, neither before nor after it.
        return Gate(owner_persons=owners)
    # The footprint before the request is the agent's without the NHIs it adds (all a request
    # writes besides its audit events, which the footprint does not read).
    before = _risk(session, agent.id, now, excluding=[i.nhi.id for i in items])
    after = _risk(session, agent.id, now)
    moved = moved_reasons(before, after)
    over = threshold is not None and after.score > threshold and after.score > before.score
    if not sensitive and not over:
        return Gate(owner_persons=owners)
    reasons = [f"sensitive: {s}" for s in dict.fromkeys(sensitive)]
    if over:
        reasons.append(
            f"risk score {before.score} -> {after.score} passes the threshold {threshold}"
        )
        reasons.extend(moved)
        for i in items:
            i.nhi.status = NhiStatus.PENDING_APPROVAL
            i.nhi.status_reason = (i.nhi.status_reason + "; " if i.nhi.status_reason else "") + (
                f"the agent's risk score would rise from {before.score} to {after.score}, "
                f"past the threshold {threshold} (moved by: "
                + ", ".join(m.split(":", 1)[0] for m in moved)
                + ")"
            )
    else:
        # One approval for a bundle: every NHI waits, not only the sensitive ones.
        for i in items:
            if i.nhi.status != NhiStatus.PENDING_APPROVAL:
                i.nhi.status = NhiStatus.PENDING_APPROVAL
                i.nhi.status_reason = "waits for the bundle's approval"
    approvers = list(dict.fromkeys(a for q in policies for a in q.approvers))
    required = max((q.approvals_required for q in policies), default=1)
    window = min((q.approval_window_seconds for q in policies), default=DEFAULT_WINDOW_SECONDS)
    approval_id = uuid.uuid4()
    message = ApprovalMessage(
        approval_id=approval_id,
        agent_name=agent.name,
        environment=str(agent.environment),
        requested_by=p.email or p.actor,
        owner_email=agent.owner_email,
        items=[
            ApprovalItem(
                label=f"{i.nhi.kind} {i.nhi.name}"
                + (f" on {i.nhi.target}" if i.nhi.target else ""),
                scope=mark_scope(i.nhi.granted_scope, i.sensitive),
                sensitive=i.sensitive,
            )
            for i in items
        ],
        risk_before=before.score,
        risk_after=after.score,
        risk_threshold=threshold,
        moved=moved,
        approvals_required=required,
        window_seconds=window,
        recipients=approvers,
    )
    row = Approval(
        id=approval_id,
        agent_id=agent.id,
        workflow_id=workflow_id,
        bundle=bundle,
        nhi_ids=[str(i.nhi.id) for i in items],
        approvers=approvers,
        approvals_required=required,
        requested_by=p.actor,
        requested_by_person=p.person,
        status=PENDING,
        reasons=reasons,
        summary=message.model_dump(mode="json"),
        decisions=[],
        created_at=now,
        expires_at=now + timedelta(seconds=window),
    )
    session.add(row)
    session.flush()
    note(
        session,
        subject_type="approval",
        subject_id=approval_id,
        event="approval.requested",
        actor=p.actor,
        reason="; ".join(reasons)[:2000],
        details={
            "nhi_ids": row.nhi_ids,
            "approvers": approvers,
            "approvals_required": required,
            "risk_before": before.score,
            "risk_after": after.score,
        },
    )
    needed = ApprovalNeeded(
        approval_id=approval_id,
        approvers=approvers,
        approvals_required=required,
        expires_at=row.expires_at,
        reasons=reasons,
        risk_before=before.score,
        risk_after=after.score,
        risk_threshold=threshold,
    )
    return Gate(
        needed=needed,
        message=message if approvers else None,
        owner_persons=owners,
        window_seconds=window,
        required=required,
    )


# ---- who may decide -----------------------------------------------------------------------------


def get_approval(session: Session, approval_id: uuid.UUID) -> Approval:
    row = session.get(Approval, approval_id)
    if row is None:
        raise NotFound(f"approval {approval_id} not found")
    return row


def approval_of_nhi(session: Session, nhi_id: uuid.UUID) -> Approval | None:
    """The approval an NHI waits for, if one was recorded."""
    return session.scalar(
        select(Approval)
        .where(Approval.nhi_ids.contains([str(nhi_id)]))
        .order_by(Approval.created_at.desc())
        .limit(1)
    )


def _slack_user(slack: WebClient | None, email: str) -> str | None:
    if slack is None:
        return None
    try:
        user = slack.users_lookupByEmail(email=email)["user"]
    except SlackApiError:
        return None
    return None if user.get("deleted") else str(user["id"])


def _member(slack: WebClient | None, approver: str, user_id: str | None) -> bool:
    """Whether a Slack user is in a listed user group or channel (asked of Slack now, so a
    person who left the group no longer decides)."""
    if slack is None or user_id is None:
        return False
    try:
        if approver.startswith(("@", "S")):
            group = approver
            if approver.startswith("@"):
                groups = slack.usergroups_list()["usergroups"]
                found = [g["id"] for g in groups if g.get("handle") == approver[1:]]
                if not found:
                    return False
                group = str(found[0])
            return user_id in slack.usergroups_users_list(usergroup=group)["users"]
        if approver.startswith(("#", "C", "G")):
            return user_id in slack.conversations_members(channel=approver)["members"]
    except SlackApiError:
        return False
    return False


def listed(
    approval: Approval, email: str | None, user_id: str | None, slack: WebClient | None
) -> bool:
    """Whether the person is one of the approval's approvers (by email, user group or channel)."""
    if email and email.lower() in approval.approvers:
        return True
    if user_id is None and email:
        user_id = _slack_user(slack, email)
    return any(_member(slack, a, user_id) for a in approval.approvers if "@" not in a[1:])


def require_pending(session: Session, row: Approval) -> None:
    """Conflict unless the approval still waits: a second decision is refused, naming who
    decided."""
    shown = shown_status(session, row)
    if shown == PENDING:
        return
    deciders = [str(d.get("approver")) for d in row.decisions]
    if deciders and row.status != PENDING:
        raise Conflict(f"already decided ({row.status}) by {' and '.join(deciders)}")
    raise Conflict(f"status: approval {row.id} is {shown}")


def check_decider(
    session: Session,
    approval: Approval,
    *,
    email: str | None,
    person: str,
    actor: str,
    user_id: str | None,
    slack: WebClient | None,
    role_approver: bool,
) -> None:
    """Forbidden unless the person may decide: a listed approver (any `approver` when the
    policy lists none), neither the requester nor the agent's owner, compared by person."""
    agent = session.get_one(Agent, approval.agent_id)
    if person == approval.requested_by_person or actor == approval.requested_by:
        raise Forbidden("the requester cannot decide their own request")
    if is_owner(email, agent.owner_email, agent.backup_owner_email):
        raise Forbidden("the agent's owner cannot decide a request for their own agent")
    if approval.approvers:
        if not listed(approval, email, user_id, slack):
            raise Forbidden(
                "only the policy's approvers decide this request: " + ", ".join(approval.approvers)
            )
    elif not role_approver:
        raise Forbidden("deciding needs the approver role")


def check_api_decider(
    session: Session, p: Principal, approval: Approval, slack: WebClient | None
) -> None:
    """`check_decider` for an API caller (approver role required either way)."""
    if not p.has(Role.APPROVER):
        raise Forbidden("deciding needs the approver role")
    check_decider(
        session,
        approval,
        email=p.email,
        person=p.person,
        actor=p.actor,
        user_id=None,
        slack=slack,
        role_approver=True,
    )


def record_decision(
    session: Session,
    approval_id: uuid.UUID,
    decision: ApprovalDecision,
    complete: bool,
    via: str,
) -> Approval:
    """Record a decision the workflow accepted: one audit event; the row decided once the
    last approval needed (or a denial) arrived."""
    row = session.get(Approval, approval_id, with_for_update=True)
    if row is None:
        raise NotFound(f"approval {approval_id} not found")
    verdict = APPROVED if decision.approve else DENIED
    entry: dict[str, Any] = {
        "approver": decision.approver,
        "approve": decision.approve,
        "reason": decision.reason,
        "via": via,
        "at": datetime.now(UTC).isoformat(),
    }
    if any(d.get("approver") == decision.approver for d in row.decisions):
        return row  # a redelivered decision (same update id): recorded once
    row.decisions = [*row.decisions, entry]
    if complete:
        row.status = verdict
        row.decided_at = datetime.now(UTC)
    note(
        session,
        subject_type="approval",
        subject_id=approval_id,
        event=f"approval.{verdict}" if complete else "approval.first_approval",
        actor=decision.approver,
        reason=decision.reason,
        details={"via": via, "complete": complete},
    )
    return row


def list_for(
    session: Session,
    p: Principal,
    slack: WebClient | None,
    *,
    everything: bool = False,
    now: datetime | None = None,
) -> list[Approval]:
    """Pending approvals the caller may decide; every pending one for security and admin (or
    all, decided too, with `everything`)."""
    now = now or datetime.now(UTC)
    query = select(Approval).order_by(Approval.created_at.desc())
    if not everything:
        query = query.where(Approval.status == PENDING, Approval.expires_at > now)
    rows = list(session.scalars(query.limit(500)))
    if not everything:
        rows = [r for r in rows if shown_status(session, r, now) == PENDING]
    if p.has(Role.SECURITY, Role.ADMIN):
        return rows
    if everything or not p.has(Role.APPROVER):
        return []
    mine = []
    for row in rows:
        try:
            check_api_decider(session, p, row, slack)
        except Forbidden:
            continue
        mine.append(row)
    return mine


def shown_status(session: Session, row: Approval, now: datetime | None = None) -> str:
    """The row's status, except for one still `pending` that no longer is: `expired` past
    its window, `closed` when its NHIs stopped waiting (the workflow's own window, which
    decides, ran out; or the request was cancelled or cleaned up)."""
    if row.status != PENDING:
        return row.status
    if row.expires_at <= (now or datetime.now(UTC)):
        return "expired"
    waiting = session.scalar(
        select(Nhi.id)
        .where(
            Nhi.id.in_([uuid.UUID(i) for i in row.nhi_ids]),
            Nhi.status == NhiStatus.PENDING_APPROVAL,
        )
        .limit(1)
    )
    return PENDING if waiting is not None else "closed"


def agent_of(session: Session, approval: Approval) -> Agent:
    return get_agent(session, approval.agent_id)
