"""Sweep reports: the row a sweep records into, and its one transition the API drives (a
start that failed is closed as `failed`, never left `running`). The sweep activities record
findings and the end of a run themselves."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.orm import Sweep
from nhi.services.errors import NotFound
from nhi.services.transitions import transition

RUNNING = "running"


def create_sweep(
    session: Session,
    *,
    sweep_id: uuid.UUID,
    provider: str,
    dry_run: bool,
    triggered_by: str,
    workflow_id: str,
) -> Sweep:
    """The report row of a sweep about to start (the workflow records into it)."""
    sweep = Sweep(
        id=sweep_id,
        provider=provider,
        dry_run=dry_run,
        triggered_by=triggered_by,
        workflow_id=workflow_id,
        status=RUNNING,
        summary={},
        findings=[],
    )
    session.add(sweep)
    session.flush()
    return sweep


def fail_start(session: Session, sweep_id: uuid.UUID, actor: str, reason: str) -> bool:
    """Close a sweep whose workflow could not be started; False when it is no longer running
    (the workflow started after all and is recording into it)."""
    row = session.get(Sweep, sweep_id, with_for_update=True)
    if row is None or row.status != RUNNING:
        return False
    return transition(
        session,
        row,
        status="failed",
        changes={"finished_at": datetime.now(UTC), "error": reason},
        event="sweep.start_failed",
        actor=actor,
        reason=reason,
        details={"provider": row.provider, "dry_run": str(row.dry_run).lower()},
    )


def list_sweeps(session: Session, limit: int = 100) -> list[Sweep]:
    """The latest sweeps, newest first."""
    return list(session.scalars(select(Sweep).order_by(Sweep.started_at.desc()).limit(limit)))


def get_sweep(session: Session, sweep_id: uuid.UUID) -> Sweep:
    """One sweep, or NotFound."""
    sweep = session.get(Sweep, sweep_id)
    if sweep is None:
        raise NotFound(f"sweep {sweep_id} not found")
    return sweep
