"""Activities that read and change the inventory in Postgres."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from models.contracts import (
    MarkFailed,
    NhiRef,
    ProvisionPlan,
    RecordActive,
    RecordApproval,
    ScopeStatement,
)
from models.enums import NhiKind, NhiStatus, Platform
from models.orm import Agent, Nhi
from nhi import MANAGED_BY, audit
from nhi.config import Settings
from nhi.db import transaction
from nhi.inventory import find_policy, rules_of
from nhi.policy import RuleViolation, secret_name, validate_scope

SYSTEM_ACTOR = "system:provisioning"


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

    @activity.defn
    def begin_provisioning(self, ref: NhiRef) -> ProvisionPlan:
        """Move a requested NHI to `provisioning` and derive what to create.

        Idempotent: a retry (or a new worker after a crash) gets the same plan back. The scope
        is checked again against the current policy, which may have tightened since the request.
        """
        with transaction(self._sessions) as session:
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
                validate_scope(scope, rules_of(policy))
            except RuleViolation as err:
                raise ApplicationError(
                    str(err), type="PolicyViolation", non_retryable=True
                ) from None
            if nhi.status == NhiStatus.REQUESTED:
                nhi.status = NhiStatus.PROVISIONING.value
                audit.record(
                    session,
                    subject_type="nhi",
                    subject_id=nhi.id,
                    event="nhi.provisioning",
                    actor=SYSTEM_ACTOR,
                    reason=f"workflow {activity.info().workflow_id} started creating {nhi.name}",
                )
            return ProvisionPlan(
                nhi_id=nhi.id,
                agent_id=agent.id,
                agent_name=agent.name,
                environment=agent.environment,
                owner_email=agent.owner_email,
                platform=Platform(nhi.platform),
                kind=NhiKind(nhi.kind),
                identity_name=nhi.name,
                iam_path=self._settings.iam_path,
                secret_name=secret_name(
                    self._settings.secret_prefix, agent.environment, agent.name, nhi.id
                ),
                scope=scope,
                allowed_cidrs=list(nhi.allowed_cidrs),
                trust_principal=nhi.trust_principal,
                expires_at=nhi.expires_at,
                max_session_duration_seconds=policy.max_session_duration_seconds,
                tags={
                    "managed-by": MANAGED_BY,
                    "nhi:agent-id": str(agent.id),
                    "nhi:nhi-id": str(nhi.id),
                    "nhi:owner": agent.owner_email,
                    "nhi:environment": agent.environment,
                    "nhi:expires-at": nhi.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                },
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
            nhi.status = (NhiStatus.REQUESTED if decision.approve else NhiStatus.FAILED).value
            nhi.status_reason = None if decision.approve else f"denied by {decision.approver}"
            audit.record(
                session,
                subject_type="nhi",
                subject_id=nhi.id,
                event=f"nhi.{verdict}",
                actor=decision.approver,
                reason=decision.reason,
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
            nhi.status = NhiStatus.ACTIVE.value
            nhi.status_reason = None
            nhi.external_id = change.external_id
            nhi.credential_ref = change.credential_ref
            nhi.activated_at = datetime.now(UTC)
            nhi.workflow_id = nhi.workflow_id or change.workflow_id
            audit.record(
                session,
                subject_type="nhi",
                subject_id=nhi.id,
                event="nhi.activated",
                actor=SYSTEM_ACTOR,
                reason=f"{nhi.kind} created and credential delivered by reference",
                details={
                    "external_id": change.external_id,
                    "credential_ref": change.credential_ref,
                },
            )

    @activity.defn
    def mark_failed(self, change: MarkFailed) -> None:
        """Record a permanent failure (idempotent)."""
        with transaction(self._sessions) as session:
            nhi = self._locked(session, change.nhi_id)
            if nhi.status == change.status and nhi.status_reason == change.reason:
                return
            nhi.status = change.status.value
            nhi.status_reason = change.reason
            audit.record(
                session,
                subject_type="nhi",
                subject_id=nhi.id,
                event=f"nhi.{change.status.value}",
                actor=SYSTEM_ACTOR,
                reason=change.reason,
                details={"workflow_id": change.workflow_id},
            )
