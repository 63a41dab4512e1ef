"""An agent's footprint (issue 16): every live identity and task credential it holds, what they
can do together, where that reaches data, who can make the agent act, and the risk score.

Read-only: it reads the inventory and the policies, and the pure rules in
`nhi.rules.risk` do the rest, so the same inventory and `now` give the same answer.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.contracts import ScopeStatement
from models.enums import ROTATABLE_KINDS, AgentStatus, Environment, InvokerKind, NhiKind, Platform
from models.orm import Agent, AgentInvoker, Nhi, Policy, TaskCredential
from models.schemas import (
    AwsPermission,
    ChainAgent,
    ChainInvoker,
    DataStores,
    FootprintNhi,
    FootprintOut,
    FootprintRank,
    FootprintTaskCredential,
    InvokerOut,
    Permissions,
    PostgresPermission,
    PostgresStore,
    RiskOut,
    RiskReasonOut,
)
from nhi.rules import risk
from nhi.services.agents import FINAL_STATUSES, get_agent
from nhi.services.auth import Principal
from nhi.services.visibility import visible

# How far invoker links are followed each way: far enough for real delegation chains, bounded
# so a footprint stays a few queries.
MAX_CHAIN_DEPTH = 5
# A team's ranking computes this many footprints at most (then pages through them).
MAX_RANKED = 500
LIVE_TASK_CREDENTIAL = "active"


def _live(expires_at: datetime | None, now: datetime) -> bool:
    return expires_at is None or expires_at > now


@dataclass(frozen=True)
class _Chain:
    agents: list[ChainAgent]
    invokers: list[ChainInvoker]
    truncated: bool


def _walk(
    session: Session, start: Agent, now: datetime, *, upstream: bool, max_depth: int
) -> _Chain:
    """Follow live agent-invoker links breadth first, each agent once (cycle-safe), at most
    `max_depth` links. Upstream: the agents that can make `start` act (and their other
    invokers); downstream: the agents `start` can make act."""
    seen = {start.id}
    frontier = [start.id]
    agents: list[ChainAgent] = []
    invokers: list[ChainInvoker] = []
    truncated = False
    for depth in range(1, max_depth + 2):
        if not frontier:
            break
        found = {
            far: near for near, far in _links(session, frontier, upstream, now) if far not in seen
        }
        if found and depth > max_depth:
            truncated = True
            break
        rows = {a.id: a for a in session.scalars(select(Agent).where(Agent.id.in_(list(found))))}
        frontier = []
        for far in sorted(found, key=str):
            agent = rows.get(far)
            if agent is None:
                continue
            seen.add(far)
            frontier.append(far)
            agents.append(
                ChainAgent(
                    agent_id=far,
                    name=agent.name,
                    environment=Environment(agent.environment),
                    depth=depth,
                    via=found[far],
                )
            )
        if upstream and frontier:
            invokers += _principals_of(session, frontier, depth + 1, now)
    return _Chain(agents, invokers, truncated)


def _links(
    session: Session, frontier: Sequence[uuid.UUID], upstream: bool, now: datetime
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(near, far) pairs of live agent-invoker links from `frontier`, in a stable order.
    Upstream a link is "far invokes near"; downstream "near invokes far"."""
    rows = session.scalars(
        select(AgentInvoker)
        .where(
            AgentInvoker.kind == InvokerKind.AGENT.value,
            AgentInvoker.agent_id.in_(list(frontier))
            if upstream
            else AgentInvoker.ref.in_([str(a) for a in frontier]),
        )
        .order_by(AgentInvoker.agent_id, AgentInvoker.ref)
    )
    live = [r for r in rows if _live(r.expires_at, now)]
    if upstream:
        return [(r.agent_id, uuid.UUID(r.ref)) for r in live]
    return [(uuid.UUID(r.ref), r.agent_id) for r in live]


def _principals_of(
    session: Session, agent_ids: Sequence[uuid.UUID], depth: int, now: datetime
) -> list[ChainInvoker]:
    """The live non-agent invokers of `agent_ids`: they reach the footprint through them."""
    rows = session.scalars(
        select(AgentInvoker)
        .where(
            AgentInvoker.agent_id.in_(list(agent_ids)),
            AgentInvoker.kind != InvokerKind.AGENT.value,
        )
        .order_by(AgentInvoker.agent_id, AgentInvoker.kind, AgentInvoker.ref, AgentInvoker.channel)
    )
    return [
        ChainInvoker(
            kind=r.kind,
            ref=r.ref,
            channel=r.channel,
            expires_at=r.expires_at,
            depth=depth,
            via=r.agent_id,
        )
        for r in rows
        if _live(r.expires_at, now)
    ]


def _policies(session: Session, environment: str) -> dict[tuple[str, str], Policy]:
    rows = session.scalars(select(Policy).where(Policy.environment == environment))
    return {(p.platform, p.kind): p for p in rows}


def _scopes(nhis: Iterable[Nhi], policies: dict[tuple[str, str], Policy]) -> list[risk.NhiScope]:
    out = []
    for n in nhis:
        policy = policies.get((str(n.platform), str(n.kind)))
        out.append(
            risk.NhiScope(
                nhi_id=str(n.id),
                platform=str(n.platform),
                scope=[ScopeStatement.model_validate(s) for s in n.granted_scope],
                sensitive_rules=tuple(policy.sensitive_actions) if policy else (),
                target=n.target,
            )
        )
    return out


def _permissions(aws: list[risk.AwsGrant], pg: list[risk.PgGrant]) -> Permissions:
    return Permissions(
        aws=[
            AwsPermission(
                action=g.action,
                resources=list(g.resources),
                nhi_ids=[uuid.UUID(i) for i in g.nhi_ids],
                sensitive=g.sensitive,
                write=g.write,
            )
            for g in aws
        ],
        postgres=[
            PostgresPermission(
                target=g.target,
                object=g.object,
                privileges=list(g.privileges),
                sensitive=list(g.sensitive),
                nhi_ids=[uuid.UUID(i) for i in g.nhi_ids],
            )
            for g in pg
        ],
    )


def _sensitive_only(p: Permissions) -> Permissions:
    return Permissions(
        aws=[a for a in p.aws if a.sensitive],
        postgres=[
            g.model_copy(update={"privileges": list(g.sensitive)})
            for g in p.postgres
            if g.sensitive
        ],
    )


def _facts(
    agent: Agent,
    permissions: Permissions,
    stores: risk.Stores,
    nhis: Sequence[Nhi],
    invokers: Sequence[AgentInvoker],
    chain: _Chain,
    horizon: datetime | None,
    now: datetime,
) -> risk.RiskFacts:
    writes: set[str] = set()
    reads: set[str] = set()
    wide: set[str] = set()
    for a in permissions.aws:
        if a.sensitive:
            (writes if a.write else reads).add(f"aws {a.action}")
        wide |= {f"aws {r}" for r in a.resources if risk.is_wide_resource(r)}
    for g in permissions.postgres:
        for privilege in g.sensitive:
            kept = writes if risk.is_write_privilege(privilege) else reads
            kept.add(f"postgres {privilege} on {g.target}:{g.object}")
        if g.object.endswith(".*"):
            wide.add(f"postgres {g.target}:{g.object}")
    people = {f"{i.kind} {i.ref}" for i in invokers if i.kind != InvokerKind.AGENT.value}
    people |= {f"{i.kind} {i.ref}" for i in chain.invokers}
    people |= {f"declared {d}" for d in agent.invokers or []}
    stale = {
        n.name
        for n in nhis
        if risk.is_stale(
            risk.NhiActivity(
                name=n.name,
                rotatable=NhiKind(n.kind) in ROTATABLE_KINDS,
                since=n.activated_at or n.created_at,
                last_used_at=n.last_used_at,
                last_rotated_at=n.last_rotated_at,
            ),
            now,
        )
    }
    return risk.RiskFacts(
        environment=str(agent.environment),
        now=now,
        sensitive_writes=frozenset(writes),
        sensitive_reads=frozenset(reads),
        wide_resources=frozenset(wide),
        data_stores=stores.count,
        invokers=frozenset(people),
        chained_agents=frozenset(a.name for a in chain.agents),
        expiry_horizon=horizon,
        has_backup_owner=bool(agent.backup_owner_email),
        stale_nhis=frozenset(stale),
    )


def footprint(
    session: Session,
    agent_id: uuid.UUID,
    now: datetime | None = None,
    *,
    max_depth: int = MAX_CHAIN_DEPTH,
    excluding: Sequence[uuid.UUID] = (),
) -> FootprintOut:
    """The agent's footprint as the inventory knows it now, without the NHIs in `excluding`
    (a request's own, for the footprint before it); NotFound for no such agent."""
    now = now or datetime.now(UTC)
    agent = get_agent(session, agent_id)
    alive = select(Nhi).where(Nhi.agent_id == agent.id, Nhi.status.not_in(sorted(FINAL_STATUSES)))
    if excluding:
        alive = alive.where(Nhi.id.not_in(excluding))
    nhis = list(session.scalars(alive.order_by(Nhi.created_at, Nhi.id)))
    credentials = list(
        session.scalars(
            select(TaskCredential)
            .where(
                TaskCredential.agent_id == agent.id,
                TaskCredential.status == LIVE_TASK_CREDENTIAL,
            )
            .order_by(TaskCredential.issued_at, TaskCredential.id)
        )
    )
    scopes = _scopes(nhis, _policies(session, str(agent.environment)))
    aws = risk.expand_aws(s for s in scopes if s.platform == Platform.AWS.value)
    pg = risk.expand_postgres(s for s in scopes if s.platform == Platform.POSTGRES.value)
    permissions = _permissions(aws, pg)
    stores = risk.data_stores(aws, pg)
    invokers = [
        i
        for i in session.scalars(
            select(AgentInvoker)
            .where(AgentInvoker.agent_id == agent.id)
            .order_by(AgentInvoker.added_at, AgentInvoker.id)
        )
        if _live(i.expires_at, now)
    ]
    upstream = _walk(session, agent, now, upstream=True, max_depth=max_depth)
    downstream = _walk(session, agent, now, upstream=False, max_depth=max_depth)
    expiries = [n.expires_at for n in nhis] + [c.expires_at for c in credentials]
    horizon = max(expiries) if expiries else None
    scored = risk.score(_facts(agent, permissions, stores, nhis, invokers, upstream, horizon, now))
    return FootprintOut(
        agent_id=agent.id,
        name=agent.name,
        environment=Environment(agent.environment),
        team=agent.team,
        nhis=[
            FootprintNhi(
                id=n.id,
                platform=n.platform,
                kind=n.kind,
                name=n.name,
                status=n.status,
                target=n.target,
                expires_at=n.expires_at,
                last_used_at=n.last_used_at,
                last_rotated_at=n.last_rotated_at,
            )
            for n in nhis
        ],
        task_credentials=[
            FootprintTaskCredential(
                id=c.id,
                nhi_id=c.nhi_id,
                platform=c.platform,
                name=c.name,
                task_id=c.task_id,
                expires_at=c.expires_at,
            )
            for c in credentials
        ],
        permissions=permissions,
        sensitive=_sensitive_only(permissions),
        data_stores=DataStores(
            s3_buckets=list(stores.s3_buckets),
            dynamodb_tables=list(stores.dynamodb_tables),
            postgres=[
                PostgresStore(target=t, schema_name=s, tables=list(names))
                for t, s, names in stores.postgres
            ],
        ),
        invokers=[InvokerOut.model_validate(i) for i in invokers],
        declared_invokers=list(agent.invokers or []),
        reachable_agents=upstream.agents,
        reachable_invokers=upstream.invokers,
        invokes=downstream.agents,
        chain_truncated=upstream.truncated or downstream.truncated,
        expiry_horizon=horizon,
        risk=RiskOut(
            score=scored.score,
            reasons=[
                RiskReasonOut(code=r.code, points=r.points, detail=r.detail) for r in scored.reasons
            ],
        ),
        computed_at=now,
    )


def rank_team(
    session: Session,
    team: str | None,
    *,
    visible_to: Principal | None,
    limit: int = 100,
    offset: int = 0,
    now: datetime | None = None,
) -> list[FootprintRank]:
    """The team's active agents (every team's when `team` is None; only those `visible_to` may
    see), riskiest first, then by name. At most `MAX_RANKED` agents are scored."""
    now = now or datetime.now(UTC)
    query = visible(
        select(Agent.id)
        .where(Agent.status == AgentStatus.ACTIVE.value)
        .order_by(Agent.name, Agent.id),
        visible_to,
    )
    if team is not None:
        query = query.where(Agent.team == team)
    ranked = []
    for agent_id in session.scalars(query.limit(MAX_RANKED)):
        fp = footprint(session, agent_id, now)
        ranked.append(
            FootprintRank(
                agent_id=fp.agent_id,
                name=fp.name,
                environment=fp.environment,
                score=fp.risk.score,
                reasons=[r.code for r in fp.risk.reasons],
            )
        )
    ranked.sort(key=lambda r: (-r.score, r.name, str(r.agent_id)))
    return ranked[offset : offset + limit]
