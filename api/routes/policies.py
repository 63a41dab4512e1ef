"""Policies: what may be created per platform, kind and environment, and for how long."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.orm import Session

from api.deps import CurrentPrincipal, SessionDep, authenticated
from models.enums import Role
from models.orm import Policy
from models.schemas import PolicyApply, PolicyIn, PolicyOut
from nhi import inventory
from nhi.auth import require_role

router = APIRouter(prefix="/v1/policies", tags=["policies"], dependencies=[authenticated])


@router.get("", response_model=list[PolicyOut])
def list_policies(session: SessionDep) -> list[PolicyOut]:
    """Every policy in force."""
    return [PolicyOut.model_validate(p) for p in inventory.list_policies(session)]


def _apply(session: Session, body: PolicyIn, actor: str, index: int) -> Policy:
    policy = inventory.apply_policy(session, body, actor, index)
    # Whom an iam_role may trust (the audit event above records the whole body, these too).
    policy.allowed_trust_accounts = sorted(set(body.allowed_trust_accounts))
    policy.allow_service_principals = body.allow_service_principals
    session.flush()
    return policy


@router.put("", response_model=list[PolicyOut])
def apply_policies(
    body: PolicyApply, session: SessionDep, principal: CurrentPrincipal
) -> list[PolicyOut]:
    """Create or replace policies; all or nothing (admin role)."""
    require_role(principal, Role.ADMIN)
    applied = [_apply(session, p, principal.actor, i) for i, p in enumerate(body.policies)]
    return [PolicyOut.model_validate(p) for p in applied]
