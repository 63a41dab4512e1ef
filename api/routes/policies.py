"""Policies: what may be created per platform, kind and environment, and for how long."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import Actor, SessionDep
from models.schemas import PolicyApply, PolicyOut
from nhi import inventory

router = APIRouter(prefix="/v1/policies", tags=["policies"])


@router.get("", response_model=list[PolicyOut])
def list_policies(session: SessionDep) -> list[PolicyOut]:
    """Every policy in force."""
    return [PolicyOut.model_validate(p) for p in inventory.list_policies(session)]


@router.put("", response_model=list[PolicyOut])
def apply_policies(body: PolicyApply, session: SessionDep, actor: Actor) -> list[PolicyOut]:
    """Create or replace policies; all or nothing."""
    applied = [inventory.apply_policy(session, p, actor, i) for i, p in enumerate(body.policies)]
    return [PolicyOut.model_validate(p) for p in applied]
