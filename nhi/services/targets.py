"""Postgres targets in the inventory: register and remove (audited), and list.

The rules a target must meet (allowed hosts, password sources, TLS) and the lookups that also
see targets from settings stay in `nhi.rules.targets` and `nhi.services.target_registry`.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.orm import Nhi, Target
from models.schemas import TargetIn
from nhi.infra.config import Settings
from nhi.rules.targets import parse_dsn, password_ref
from nhi.services.agents import FINAL_STATUSES
from nhi.services.errors import Conflict, NotFound
from nhi.services.target_registry import (
    TargetSpec,
    all_targets,
    find_target,
    target_spec,
)
from nhi.services.transitions import note


def list_targets(session: Session, settings: Settings) -> list[TargetSpec]:
    """Every registered target, from the table and from settings, by name."""
    return all_targets(session, settings)


def add_target(session: Session, settings: Settings, body: TargetIn, actor: str) -> TargetSpec:
    """Register a target in the inventory: where it is and where its admin password is.

    Raises:
        RuleViolation: the DSN holds a password or is malformed, or not exactly one password
            reference is given.
        Conflict: the name is taken (in the table or in settings).
    """
    parsed = parse_dsn(body.dsn)
    ref = password_ref(body.password_env, body.password_secret)
    existing = find_target(session, settings, body.name)
    if existing is not None:
        where = "in settings (NHI_POSTGRES_TARGETS)" if existing.source == "settings" else ""
        raise Conflict(
            f"name: a target named {body.name!r} already exists {where}".rstrip(), field="name"
        )
    row = Target(
        name=body.name,
        host=parsed.host,
        port=parsed.port,
        dbname=parsed.dbname,
        admin_user=parsed.admin_user,
        password_ref=ref,
        sslmode=body.sslmode,
        connection_limit=body.connection_limit,
        created_by=actor,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        # Registered concurrently, between the check above and this insert.
        raise Conflict(f"name: a target named {body.name!r} already exists", field="name") from None
    session.refresh(row)
    spec = target_spec(row)
    note(
        session,
        subject_type="target",
        subject_id=row.name,
        event="target.added",
        actor=actor,
        reason=f"target {row.name} registered",
        details={
            "dsn": spec.dsn,
            "password_ref": row.password_ref,
            "sslmode": row.sslmode,
            "connection_limit": row.connection_limit,
        },
    )
    return spec


def remove_target(session: Session, settings: Settings, name: str, actor: str) -> TargetSpec:
    """Remove a target from the inventory once no living NHI uses it.

    Raises:
        NotFound: no such target.
        Conflict: it is defined in settings, or NHIs that are not yet decommissioned use it.
    """
    spec = find_target(session, settings, name)
    if spec is None:
        raise NotFound(f"target {name} not found")
    if spec.source == "settings":
        raise Conflict(
            f"target {name} is defined in settings (NHI_POSTGRES_TARGETS): remove it there"
        )
    row = session.scalar(select(Target).where(Target.name == name).with_for_update())
    if row is None:
        raise NotFound(f"target {name} not found")
    in_use = session.scalar(
        select(func.count())
        .select_from(Nhi)
        .where(Nhi.target == name, Nhi.status.not_in(sorted(FINAL_STATUSES)))
    )
    if in_use:
        raise Conflict(
            f"target {name} is used by {in_use} NHI(s) not yet decommissioned: "
            "decommission them first"
        )
    session.delete(row)
    note(
        session,
        subject_type="target",
        subject_id=name,
        event="target.removed",
        actor=actor,
        reason=f"target {name} removed",
        details={"dsn": spec.dsn},
    )
    return spec
