"""Agents and the NHIs requested for them."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from api.deps import CurrentPrincipal, SessionDep, State, TemporalUnavailable, authenticated
from api.routes.approvals import start_bundle
from api.routes.nhis import start_provisioning
from models.contracts import ProvisionInput
from models.enums import AgentStatus, Environment, NhiKind
from models.orm import Nhi
from models.schemas import (
    AgentCreate,
    AgentDetail,
    AgentOut,
    BundleAccepted,
    Email,
    Limit,
    NhiAccepted,
    NhiBatch,
    NhiCreate,
    Offset,
    Team,
)
from nhi.infra.aws_clients import make_aws_clients
from nhi.infra.config import Settings
from nhi.rules.ids import lifecycle_workflow_id
from nhi.rules.policy import principal_account
from nhi.services import agents, approvals
from nhi.services.auth import require_read, require_team

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/agents", tags=["agents"], dependencies=[authenticated])


class AwsUnavailable(TemporalUnavailable):
    """AWS could not say which account this service runs in (503); nothing was created."""


# This service's own AWS account per (endpoint, region): it never changes while a process runs.
_OWN_ACCOUNTS: dict[tuple[str | None, str], str] = {}
# One caller asks; the others wait for its answer (a burst of first requests would otherwise
# each build AWS clients, tens of milliseconds of CPU apiece).
_OWN_ACCOUNT_LOCK = threading.Lock()


def own_account(settings: Settings) -> str:
    """`NHI_AWS_ACCOUNT_ID`, else the account of the credentials this process runs with
    (`sts:GetCallerIdentity`, which needs no permission), asked once."""
    if settings.aws_account_id:
        return settings.aws_account_id
    key = (settings.aws_endpoint_url, settings.aws_region)
    found = _OWN_ACCOUNTS.get(key)
    if found is not None:
        return found
    with _OWN_ACCOUNT_LOCK:
        if key not in _OWN_ACCOUNTS:
            _OWN_ACCOUNTS[key] = _ask_own_account(settings)
    return _OWN_ACCOUNTS[key]


def _ask_own_account(settings: Settings) -> str:
    try:
        identity = make_aws_clients(settings).sts.get_caller_identity()
    except Exception as err:
        raise AwsUnavailable(
            "this service's AWS account is unknown (set NHI_AWS_ACCOUNT_ID, or give the API "
            "AWS credentials); nothing was created"
        ) from err
    return str(identity["Account"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=AgentOut)
def create_agent(body: AgentCreate, session: SessionDep, p: CurrentPrincipal) -> AgentOut:
    """Register an AI agent with its owner, backup owner, team and purpose (platform role)."""
    require_team(p, body.team)
    agent = agents.create_agent(session, body, p.actor)
    return AgentOut.model_validate(agent)


@router.get("", response_model=list[AgentOut])
def list_agents(
    session: SessionDep,
    p: CurrentPrincipal,
    environment: Environment | None = None,
    owner: Email | None = None,
    team: Team | None = None,
    agent_status: Annotated[AgentStatus | None, Query(alias="status")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[AgentOut]:
    """Agents, filtered by environment, owner email, team or status."""
    rows = agents.list_agents(
        session,
        environment=environment.value if environment else None,
        owner=owner,
        team=team,
        status=agent_status.value if agent_status else None,
        limit=limit,
        offset=offset,
        visible_to=p,
    )
    return [AgentOut.model_validate(a) for a in rows]


@router.get("/{agent_id}", response_model=AgentDetail)
def get_agent(agent_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal) -> AgentDetail:
    """One agent with every NHI it holds: its total access footprint."""
    agent = agents.get_agent(session, agent_id, with_nhis=True)
    require_read(p, agent)
    return AgentDetail.model_validate(agent)


@router.post("/{agent_id}/nhis", status_code=status.HTTP_202_ACCEPTED, response_model=NhiAccepted)
async def request_nhi(
    agent_id: uuid.UUID, body: NhiCreate, state: State, p: CurrentPrincipal
) -> NhiAccepted:
    """Request an identity for the agent; provisioning runs as a Temporal workflow.

    The lease (the NHI row) is committed before anything exists on the platform, so nothing
    can be created that the inventory does not know how to remove.
    """
    actor = p.actor
    agent = await state.db(lambda s: agents.get_agent(s, agent_id))
    require_team(p, agent.team, agent)
    own = None
    if (
        body.kind is NhiKind.IAM_ROLE
        and body.trust_principal
        and principal_account(body.trust_principal) is not None
    ):
        own = await run_in_threadpool(own_account, state.settings)

    gates: list[approvals.Gate] = []

    def record(s: Session) -> tuple[Nhi, list[str]]:
        # The policy's checks, then whether approvers must decide (sensitive entries, or the
        # agent's risk score pushed past the policy's threshold), recorded with the lease.
        nhi, sensitive, gate = approvals.request_one(
            s, state.settings, agent_id, body, p, own, lifecycle_workflow_id
        )
        gates.append(gate)
        return nhi, sensitive

    def make_input(nhi_id: uuid.UUID, _sensitive: bool) -> ProvisionInput:
        gate = gates[0]
        return ProvisionInput(
            nhi_id=nhi_id,
            requested_by=actor,
            # Four-eyes compares people: the approver must not be this person under
            # another credential.
            requested_by_person=p.person,
            needs_approval=gate.needs_approval,
            approval_timeout_seconds=gate.window_seconds,
            approvals_required=gate.required,
            owner_persons=gate.owner_persons,
            approval=gate.message,
        )

    # Row, audit event and workflow start: all or nothing, answered within ~2 s (nhis.py).
    accepted = await start_provisioning(state, record, make_input)
    return accepted.model_copy(update={"approval": gates[0].needed})


@router.post(
    "/{agent_id}/nhis:batch", status_code=status.HTTP_202_ACCEPTED, response_model=BundleAccepted
)
async def request_bundle(
    agent_id: uuid.UUID, body: NhiBatch, state: State, p: CurrentPrincipal
) -> BundleAccepted:
    """Request several identities at once: validated together (one refused refuses all, the
    field named as `nhis[<i>]....`), approved together, provisioned all or nothing."""
    agent = await state.db(lambda s: agents.get_agent(s, agent_id))
    require_team(p, agent.team, agent)
    own = None
    if any(
        b.kind is NhiKind.IAM_ROLE
        and b.trust_principal
        and principal_account(b.trust_principal) is not None
        for b in body.nhis
    ):
        own = await run_in_threadpool(own_account, state.settings)
    return await start_bundle(state, agent_id, body, p, own)
