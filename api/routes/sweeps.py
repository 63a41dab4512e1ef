"""Sweeps: trigger one (dry run or real), and read their reports (security team)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, StrictBool

from activities.sweep import START_FAILED
from api.deps import CurrentPrincipal, SessionDep, State, TemporalUnavailable, authenticated
from models.contracts import SweepInput
from models.enums import Role
from models.schemas import Body
from nhi.rules.ids import manual_sweep_workflow_id
from nhi.services import sweeps
from nhi.services.auth import require_role
from workflows.sweep import SweepWorkflow

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"], dependencies=[authenticated])
READERS = (Role.SECURITY, Role.AUDITOR, Role.ADMIN)
# A manual sweep that cannot be started within this answers 503 at once (and is recorded as
# failed) instead of hanging on an unreachable Temporal.
START_RPC_TIMEOUT = timedelta(seconds=5)


class SweepRequest(Body):
    """Which provider, and whether only to report."""

    provider: Literal["aws", "postgres"] = "aws"
    dry_run: StrictBool = False


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
    """Sweep a provider now (security role); `dry_run` reports and changes nothing.

    The report row is written first (so the sweep records into it); if the sweep cannot be
    started, the row is closed as `failed` with the reason and audited, never left `running`,
    and the answer is 503."""
    require_role(p, Role.SECURITY)
    sweep_id = uuid.uuid4()
    workflow_id = manual_sweep_workflow_id(body.provider, sweep_id)

    sweep = await state.db(
        lambda s: sweeps.create_sweep(
            s,
            sweep_id=sweep_id,
            provider=body.provider,
            dry_run=body.dry_run,
            triggered_by=p.actor,
            workflow_id=workflow_id,
        )
    )
    try:
        client = await state.temporal()
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
            rpc_timeout=START_RPC_TIMEOUT,
        )
    except Exception as err:
        reason = f"{START_FAILED}: {type(err).__name__}: {err}"[:2000]
        await state.db(lambda s: sweeps.fail_start(s, sweep_id, p.actor, reason))
        raise TemporalUnavailable(
            "the sweep could not start; nothing was changed (recorded as failed)"
        ) from err
    return SweepOut.model_validate(sweep)


@router.get("", response_model=list[SweepOut])
def list_sweeps(session: SessionDep, p: CurrentPrincipal) -> list[SweepOut]:
    """The latest sweeps, newest first."""
    require_role(p, *READERS)
    return [SweepOut.model_validate(r) for r in sweeps.list_sweeps(session)]


@router.get("/{sweep_id}", response_model=SweepOut)
def get_sweep(sweep_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal) -> SweepOut:
    """One sweep's findings and actions."""
    require_role(p, *READERS)
    return SweepOut.model_validate(sweeps.get_sweep(session, sweep_id))
