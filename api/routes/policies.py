"""Policies: what may be created per platform, kind and environment, and for how long."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentPrincipal, SessionDep, authenticated
from models.enums import Role
from models.schemas import PolicyApply, PolicyOut
from nhi.services import policies
from nhi.services.auth import require, require_role

router = APIRouter(prefix="/v1/policies", tags=["policies"], dependencies=[authenticated])


@router.get("", response_model=list[PolicyOut])
def list_policies(session: SessionDep, principal: CurrentPrincipal) -> list[PolicyOut]:
    """Every policy in force (any person's role; an `agent` token reads nothing: 403)."""
    require(
        not principal.has(Role.AGENT),
        f"{principal.actor} is an agent token: it issues task credentials and reads nothing",
    )
    return [PolicyOut.model_validate(p) for p in policies.list_policies(session)]


@router.put("", response_model=list[PolicyOut])
def apply_policies(
    body: PolicyApply, session: SessionDep, principal: CurrentPrincipal
) -> list[PolicyOut]:
    """Create or replace policies; all or nothing (admin role)."""
    require_role(principal, Role.ADMIN)
    applied = [
        policies.apply_policy(session, p, principal.actor, i) for i, p in enumerate(body.policies)
    ]
    return [PolicyOut.model_validate(p) for p in applied]
