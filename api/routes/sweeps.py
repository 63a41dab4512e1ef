"""Sweeps: trigger one (dry run or real), and read their reports (security team)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from api.deps import CurrentPrincipal, SessionDep, State, TemporalUnavailable, authenticated
from models.contracts import SweepInput
from models.enums import Role
from models.orm import Sweep
from models.schemas import Body
from nhi.auth import require_role
from nhi.inventory import NotFound
from workflows.sweep import SweepWorkflow

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"], dependencies=[authenticated])
READERS = (Role.SECURITY, Role.AUDITOR, Role.ADMIN)


class SweepRequest(Body):
    """Which provider, and whether only to report."""

    provider: Literal["aws", "postgres"] = "aws"
    dry_run: bool = False


class SweepOut(BaseModel):
    """A sweep's report."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    provider: str
    dry_run: bool
    triggered_by: str
    workflow_id: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    summary: dict[str, Any]
    findings: list[dict[str, Any]]
    error: str | None


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=SweepOut)
async def start_sweep(body: SweepRequest, state: State, p: CurrentPrincipal) -> SweepOut:
    """Sweep a provider now (security role); `dry_run` reports and changes nothing."""
    require_role(p, Role.SECURITY)
    client = await state.temporal()
    sweep_id = uuid.uuid4()
    workflow_id = f"nhi-sweep-{body.provider}-manual-{sweep_id}"

    def record(session: Any) -> Sweep:
        sweep = Sweep(
            id=sweep_id,
            provider=body.provider,
            dry_run=body.dry_run,
            triggered_by=p.actor,
            workflow_id=workflow_id,
            status="running",
            summary={},
            findings=[],
        )
        session.add(sweep)
        session.flush()
        return sweep

    sweep = await state.db(record)
    try:
        await client.start_workflow(
            SweepWorkflow.run,
            SweepInput(
                provider=body.provider,
                dry_run=body.dry_run,
                triggered_by=p.actor,
                sweep_id=sweep_id,
            ),
            id=workflow_id,
            task_queue=state.settings.temporal_task_queue,
        )
    except Exception as err:
        raise TemporalUnavailable("the sweep could not start; nothing was changed") from err
    return SweepOut.model_validate(sweep)


@router.get("", response_model=list[SweepOut])
def list_sweeps(session: SessionDep, p: CurrentPrincipal) -> list[SweepOut]:
    """The latest sweeps, newest first."""
    require_role(p, *READERS)
    rows = session.scalars(select(Sweep).order_by(Sweep.started_at.desc()).limit(100))
    return [SweepOut.model_validate(r) for r in rows]


@router.get("/{sweep_id}", response_model=SweepOut)
def get_sweep(sweep_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal) -> SweepOut:
    """One sweep's findings and actions."""
    require_role(p, *READERS)
    sweep = session.get(Sweep, sweep_id)
    if sweep is None:
        raise NotFound(f"sweep {sweep_id} not found")
    return SweepOut.model_validate(sweep)
