"""Footprints (issue 16): everything an agent can do and who can make it act, with a risk
score; and a team's agents ranked by it. Read by whoever may read the agent."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from api.deps import CurrentPrincipal, SessionDep, authenticated
from models.schemas import FootprintOut, FootprintRank, Limit, Offset, Team
from nhi.services import agents, footprint
from nhi.services.auth import require_read

router = APIRouter(tags=["footprints"], dependencies=[authenticated])


@router.get("/v1/agents/{agent_id}/footprint", response_model=FootprintOut)
def agent_footprint(agent_id: uuid.UUID, session: SessionDep, p: CurrentPrincipal) -> FootprintOut:
    """Every live NHI and task credential of the agent, their permissions together (and the
    sensitive ones), the data stores they reach, the invokers through the chain of agents, the
    expiry horizon, and the risk score with its reasons."""
    require_read(p, agents.get_agent(session, agent_id))
    return footprint.footprint(session, agent_id)


@router.get("/v1/footprints", response_model=list[FootprintRank])
def rank_footprints(
    session: SessionDep,
    p: CurrentPrincipal,
    team: Team | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[FootprintRank]:
    """A team's active agents that the caller may see (without `team`: every team's), riskiest
    first."""
    return footprint.rank_team(session, team, visible_to=p, limit=limit, offset=offset)
