"""Postgres targets: the databases `postgres_role` NHIs are created in (admin registers them)."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import CurrentPrincipal, SessionDep, State, authenticated
from models.enums import Role
from models.schemas import TargetIn, TargetOut
from nhi import inventory
from nhi.auth import require_role

router = APIRouter(prefix="/v1/targets", tags=["targets"], dependencies=[authenticated])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TargetOut)
def add_target(body: TargetIn, session: SessionDep, state: State, p: CurrentPrincipal) -> TargetOut:
    """Register a target (admin role). The DSN carries no password: `password_env` or
    `password_secret` says where the worker finds it."""
    require_role(p, Role.ADMIN)
    return TargetOut.model_validate(inventory.add_target(session, state.settings, body, p.actor))


@router.get("", response_model=list[TargetOut])
def list_targets(session: SessionDep, state: State, p: CurrentPrincipal) -> list[TargetOut]:
    """Every target, registered here or in settings (platform, security, auditor, admin)."""
    require_role(p, Role.PLATFORM, Role.SECURITY, Role.AUDITOR, Role.ADMIN)
    return [TargetOut.model_validate(t) for t in inventory.list_targets(session, state.settings)]


@router.delete("/{name}", response_model=TargetOut)
def remove_target(name: str, session: SessionDep, state: State, p: CurrentPrincipal) -> TargetOut:
    """Remove a target no living NHI uses (admin role); targets from settings stay."""
    require_role(p, Role.ADMIN)
    return TargetOut.model_validate(inventory.remove_target(session, state.settings, name, p.actor))
