"""Typed payloads that cross the workflow/activity boundary.

Everything here ends up in Temporal history, so it carries identifiers, names, scopes and
references, never a secret. New fields get defaults so running workflows keep decoding.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from models.enums import NhiKind, NhiStatus, Platform


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
    needs_approval: bool = False
    approval_timeout_seconds: int = 3 * 86400


class ApprovalDecision(Contract):
    """An approver's answer to a request for sensitive actions."""

    approve: bool
    approver: str = Field(min_length=1, max_length=254)
    reason: str = Field(min_length=1, max_length=2000)


class ApprovalOutcome(Contract):
    """What the workflow did with a decision."""

    nhi_id: uuid.UUID
    approved: bool
    approver: str


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


class RemoveIdentity(Contract):
    """Tear down what a plan created. A credential never delivered is deleted without recovery."""

    plan: ProvisionPlan
    force_delete_secret: bool = False
