"""Containment of an agent and its incidents (issue 17).

`POST /v1/agents/{id}/contain` (security or admin) opens the agent's incident, or joins the one
still open, and starts (or joins) its `ContainAgentWorkflow`: every NHI and task credential of
the agent quarantined in parallel and each credential tried until proven dead. The answer is
202 with the incident; `GET /v1/incidents/{id}` shows the per-credential report as it fills.

`POST /v1/agents/{id}/release` needs an approver, security or admin who is not the person who
contained it: it stops the playbook, restores each NHI whose lifecycle the incident held (the
lifecycle's own restore; NHIs quarantined before the incident stay so, task credentials stay
ended) and marks the incident released.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session
from temporalio.client import Client, WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import FailureError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import CurrentPrincipal, SessionDep, State, TemporalUnavailable, authenticated
from api.routes.lifecycle import TEMPORAL_CALL_BUDGET, temporal_client, temporal_deadline
from models.contracts import ContainAgentInput, LifecycleAction
from models.enums import IncidentStatus, Role
from models.orm import Incident
from models.schemas import ContainBody, IncidentOut, ReleaseBody
from nhi.rules.ids import containment_workflow_id, lifecycle_workflow_id, release_update_id
from nhi.services import incidents
from nhi.services.auth import Principal, require_read, require_role
from nhi.services.errors import Conflict
from workflows.contain import ContainAgentWorkflow
from workflows.lifecycle import NhiLifecycleWorkflow

router = APIRouter(tags=["incidents"], dependencies=[authenticated])

# How the lifecycle sees a release: system actors pass its owner check; the person who
# released is the audit trail's `principal`.
RELEASE_ACTOR = "system:incident-release"
# How long a release waits for a containment pass under way to finish before ending the run.
PASS_WAIT = 30.0
# A lifecycle asked to restore while its decommission is still being carried out refuses
# (not quarantined yet): asked again this often, this many times.
RESTORE_TRIES = 20
RESTORE_PAUSE = 0.5


@router.post("/v1/agents/{agent_id}/contain", status_code=202, response_model=IncidentOut)
async def contain(agent_id: uuid.UUID, body: ContainBody, state: State, p: CurrentPrincipal) -> Any:
    """Contain the agent now (security or admin); a second contain joins the open incident."""

    def open_incident(session: Session) -> IncidentOut:
        agent = incidents.get_agent(session, agent_id)
        incidents.authorize_contain(p, agent)
        incident, _ = incidents.open_incident(
            session, agent_id, reason=body.reason, actor=p.actor, person=p.person
        )
        return IncidentOut.model_validate(incident)

    out = await state.db(open_incident)
    client = await temporal_client(state)
    try:
        async with temporal_deadline(TEMPORAL_CALL_BUDGET, "starting the containment"):
            await client.start_workflow(
                ContainAgentWorkflow.run,
                ContainAgentInput(
                    agent_id=agent_id, reason=out.reason, actor=p.actor, incident_id=out.id
                ),
                id=containment_workflow_id(agent_id),
                task_queue=state.settings.temporal_task_queue,
                # A run under way is joined; a finished one (contained) is passed again, so
                # a second contain re-proves every credential.
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            )
    except (RPCError, FailureError) as err:
        raise TemporalUnavailable(
            f"incident {out.id} is open but its containment could not start ({err}); "
            "contain again to retry"
        ) from err
    return out


@router.post("/v1/agents/{agent_id}/release", response_model=IncidentOut)
async def release(agent_id: uuid.UUID, body: ReleaseBody, state: State, p: CurrentPrincipal) -> Any:
    """Lift the containment (approver, security or admin; not the person who contained it)."""

    def check(session: Session) -> tuple[uuid.UUID, dict[str, str]]:
        require_read(p, incidents.get_agent(session, agent_id))
        require_role(p, Role.APPROVER, Role.SECURITY, Role.ADMIN)  # 403 before any 409
        incident = incidents.open_incident_of(session, agent_id)
        if incident is None:
            raise Conflict(f"status: agent {agent_id} has no open incident to release")
        incidents.authorize_release(session, p, incident)
        return incident.id, dict((incident.report or {}).get("lifecycles", {}))

    incident_id, lifecycles = await state.db(check)
    client = await temporal_client(state)
    await _stop_passes(client, agent_id)
    held = sorted(n for n, how in lifecycles.items() if how in incidents.HELD)
    restored = await asyncio.gather(
        *(_restore(client, uuid.UUID(n), incident_id, p, body.reason) for n in held)
    )
    results = dict(zip(held, restored, strict=True))

    def done(session: Session) -> IncidentOut:
        incident = session.get_one(Incident, incident_id, with_for_update=True)
        return IncidentOut.model_validate(
            incidents.release(session, incident, p, body.reason, results)
        )

    return await state.db(done)


async def _stop_passes(client: Client, agent_id: uuid.UUID) -> None:
    """Stop the playbook before restoring, so no pass re-quarantines what the release lifts."""
    handle = client.get_workflow_handle_for(
        ContainAgentWorkflow.run, containment_workflow_id(agent_id)
    )
    try:
        async with temporal_deadline(TEMPORAL_CALL_BUDGET, "stopping the containment"):
            await handle.signal(ContainAgentWorkflow.release)
    except RPCError as err:
        if err.status is RPCStatusCode.NOT_FOUND:
            return  # no run under way
        if "already completed" in err.message or err.status is RPCStatusCode.FAILED_PRECONDITION:
            return
        raise TemporalUnavailable(f"Temporal refused the request: {err.message}") from err
    try:
        await asyncio.wait_for(handle.result(), PASS_WAIT)
    except (WorkflowFailureError, RPCError):
        return
    except TimeoutError:
        async with temporal_deadline(TEMPORAL_CALL_BUDGET, "ending the containment"):
            await handle.terminate(reason="incident released")


async def _restore(
    client: Client, nhi_id: uuid.UUID, incident_id: uuid.UUID, p: Principal, reason: str
) -> str:
    """The lifecycle's own restore (lift the quarantine, renew if it had expired)."""
    handle = client.get_workflow_handle_for(NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi_id))
    action = LifecycleAction(
        actor=RELEASE_ACTOR,
        channel="system",
        principal=p.actor,
        reason=f"incident {incident_id} released: {reason}"[:2000],
    )
    last = ""
    for _ in range(RESTORE_TRIES):
        try:
            await handle.execute_update(
                NhiLifecycleWorkflow.restore,
                action,
                id=release_update_id(nhi_id, incident_id),
                rpc_timeout=timedelta(seconds=30),
            )
        except WorkflowUpdateFailedError as err:
            last = str(err.cause)
            if "not quarantined" not in last:  # anything but "not yet quarantined" is final
                return f"not restored: {last}"[:500]
        except RPCError as err:
            return f"not restored: {err.message}"[:500]
        else:
            return "restored"
        await asyncio.sleep(RESTORE_PAUSE)
    return f"not restored: {last}"[:500]


@router.get("/v1/incidents", response_model=list[IncidentOut])
def list_incidents(
    session: SessionDep,
    p: CurrentPrincipal,
    agent_id: uuid.UUID | None = None,
    status: IncidentStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[IncidentOut]:
    """Incidents of the agents the caller may see, newest first."""
    return [
        IncidentOut.model_validate(i)
        for i in incidents.list_incidents(session, p, agent_id=agent_id, status=status, limit=limit)
    ]


@router.get("/v1/incidents/{incident_id}", response_model=IncidentOut)
def get_incident(incident_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal) -> IncidentOut:
    """One incident with its per-credential report and timeline."""
    return IncidentOut.model_validate(incidents.get_incident(session, incident_id, p))
