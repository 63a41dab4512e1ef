"""Sweep activities: discover what the platform holds, compare it with the inventory, act.

`SweepActivities` needs the inventory and the platform's provider together, because the
comparison must see both and only its findings (few) may enter workflow history, not the
listings (up to 5,000 users per AWS account). `SupervisionActivities` are async: they ask
Temporal which NHIs have no lifecycle running, and nudge lifecycles.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from activities._support import heartbeating
from activities.db import DbActivities
from activities.provider import provider_for
from activities.providers.base import Known, Provider
from models.contracts import (
    Finding,
    FindingKind,
    LifecycleAction,
    LifecycleInput,
    LifecycleNudge,
    OrphanInput,
    ScopeStatement,
    SweepInput,
    SweepOutcome,
    SweepPlan,
    orphan_plan,
)
from models.enums import Platform
from models.orm import Agent, Nhi, Sweep
from nhi import audit
from nhi.config import Settings
from nhi.db import transaction
from nhi.policy import identity_policy_document
from nhi.sweep import ALIVE, InventoryItem, Rules, classify

log = logging.getLogger(__name__)

MAX_FINDINGS = 500  # per sweep in history; the rest is counted and picked up by the next sweep


def ours(platform: Platform, prefix: str) -> ColumnElement[bool]:
    """This deployment's NHIs on a platform: names start with its prefix and the platform's
    separator (`nhi-` for IAM names, `nhi_` for Postgres roles, whose names are identifiers)."""
    separator = "_" if platform is Platform.POSTGRES else "-"
    return Nhi.name.startswith(f"{prefix}{separator}", autoescape=True)


class Pacer:
    """At most `rate` calls a second from this worker to one provider account."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + self._interval
        if wait > 0:
            time.sleep(wait)


class SweepActivities:
    """Discovery (through the platform's provider), comparison, and a sweep's actions."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        providers: Mapping[Platform, Provider],
        settings: Settings,
    ) -> None:
        self._sessions = sessions
        self._providers = dict(providers)
        self._settings = settings
        self._pace = Pacer(settings.sweep_calls_per_second)
        self._plans = DbActivities(sessions, settings)

    def _provider(self, platform: str) -> Provider:
        return provider_for(self._providers, platform)

    def _paced(self) -> None:
        self._pace()
        activity.heartbeat()

    # ---- discovery ---------------------------------------------------------------------------

    @activity.defn
    def plan_sweep(self, inp: SweepInput) -> SweepPlan:
        """Discover, compare, and return the findings (listing failures raise)."""
        workflow_id = activity.info().workflow_id or f"standalone-{uuid.uuid4()}"
        provider = self._provider(inp.provider)
        sweep_id = self._begin(inp, workflow_id)
        now = datetime.now(UTC)
        with heartbeating():
            alive = self._inventory(provider.platform)
            known = {i.name: Known(status=i.status, scope=i.granted_scope) for i in alive}
            found = provider.discover(known, self._paced)
            platform = found.identities
            # Rows that are no longer alive matter only where the platform still holds the name.
            others = self._inventory(provider.platform, {p.name for p in platform} - set(known))
            inventory = [
                i
                for i in alive + others
                # What could not be listed is not compared: its NHIs are not "missing".
                if i.target not in found.unreachable
            ]
        rules = Rules(
            propagation=timedelta(seconds=self._settings.sweep_propagation_seconds),
            stale_after=timedelta(days=self._settings.sweep_stale_days),
        )
        findings = [
            Finding(
                kind=FindingKind.UNREACHABLE,
                identity=place,
                identity_kind="target",
                detail=why,
                action="its identities were not compared",
                target=place,
            )
            for place, why in sorted(found.unreachable.items())
        ] + classify(platform, inventory, now, rules)
        counts: dict[str, int] = {"platform_identities": len(platform), "inventory": len(inventory)}
        for f in findings:
            counts[f.kind.value] = counts.get(f.kind.value, 0) + 1
        return SweepPlan(
            sweep_id=sweep_id,
            findings=findings[:MAX_FINDINGS],
            counts=counts,
            truncated=max(0, len(findings) - MAX_FINDINGS),
            orphan_grace_seconds=self._settings.orphan_grace_seconds,
        )

    def _begin(self, inp: SweepInput, workflow_id: str) -> uuid.UUID:
        with transaction(self._sessions) as session:
            session.execute(
                insert(Sweep)
                .values(
                    id=inp.sweep_id or uuid.uuid4(),
                    provider=inp.provider,
                    dry_run=inp.dry_run,
                    triggered_by=inp.triggered_by,
                    workflow_id=workflow_id,
                    status="running",
                    summary={},
                    findings=[],
                )
                .on_conflict_do_nothing(index_elements=["workflow_id"])
            )
            return session.scalars(select(Sweep.id).where(Sweep.workflow_id == workflow_id)).one()

    def _inventory(self, platform: Platform, names: set[str] | None = None) -> list[InventoryItem]:
        """This deployment's inventory NHIs (its name prefix) on a platform: the alive ones,
        or, given `names`, those rows whatever their status."""
        query = (
            select(Nhi, Agent.status)
            .join(Agent)
            .where(Nhi.platform == platform.value, ours(platform, self._settings.name_prefix))
        )
        if names is None:
            query = query.where(Nhi.status.in_(sorted(ALIVE)))
        elif not names:
            return []
        else:
            query = query.where(Nhi.name.in_(sorted(names)))
        items: list[InventoryItem] = []
        with transaction(self._sessions) as session:
            for nhi, agent_status in session.execute(query).all():
                scope = tuple(ScopeStatement.model_validate(s) for s in nhi.granted_scope)
                expected = None
                # AWS drift compares policy documents; Postgres providers judge grants themselves.
                if nhi.status == "active" and platform is Platform.AWS:
                    expected = identity_policy_document(
                        list(scope), list(nhi.allowed_cidrs), nhi.expires_at
                    )
                items.append(
                    InventoryItem(
                        nhi_id=nhi.id,
                        name=nhi.name,
                        kind=nhi.kind,
                        status=nhi.status,
                        expires_at=nhi.expires_at,
                        agent_status=agent_status,
                        expected_document=expected,
                        last_used_at=nhi.last_used_at,
                        target=nhi.target,
                        granted_scope=scope,
                    )
                )
        return items

    # ---- actions -----------------------------------------------------------------------------

    @activity.defn
    def quarantine_orphan(self, orphan: OrphanInput) -> None:
        """Stop an orphan working (keys, logins, sessions); "not found" counts as done."""
        plan = orphan_plan(orphan, uuid.uuid4(), datetime.now(UTC))
        with heartbeating():
            self._provider(plan.platform).disable(plan)
        self._note(
            "orphan",
            orphan.identity,
            "orphan.quarantined",
            orphan.found_by,
            "found by a sweep: not in the inventory",
        )

    @activity.defn
    def mark_missing(self, finding: Finding) -> None:
        """An active NHI whose identity is gone from the platform: say so in the inventory."""
        with transaction(self._sessions) as session:
            nhi = session.get(Nhi, finding.nhi_id, with_for_update=True)
            if nhi is None or nhi.status_reason == "missing from the platform":
                return
            nhi.status_reason = "missing from the platform"
            audit.record(
                session,
                subject_type="nhi",
                subject_id=nhi.id,
                event="nhi.missing",
                actor="system:sweep",
                reason=finding.detail,
            )

    @activity.defn
    def revert_drift(self, finding: Finding) -> bool:
        """Put the granted scope back, when the NHI's policy says drift is reverted."""
        from nhi.inventory import find_policy

        with transaction(self._sessions) as session:
            nhi = session.get_one(Nhi, finding.nhi_id)
            agent = session.get_one(Agent, nhi.agent_id)
            policy = find_policy(session, nhi.platform, nhi.kind, agent.environment)
            if policy is None or not policy.revert_drift:
                return False
            plan = self._plans.plan_of(nhi, agent, policy.max_session_duration_seconds)
        with heartbeating():
            self._provider(plan.platform).renew(plan)
        self._note(
            "nhi",
            str(finding.nhi_id),
            "nhi.drift_reverted",
            "system:sweep",
            "granted scope restored",
        )
        return True

    @activity.defn
    def record_sweep(self, outcome: SweepOutcome) -> None:
        """Store the sweep's report (idempotent) and one audit event."""
        with transaction(self._sessions) as session:
            sweep = session.get_one(Sweep, outcome.sweep_id, with_for_update=True)
            if sweep.status != "running":
                return
            sweep.status = outcome.status
            sweep.finished_at = datetime.now(UTC)
            sweep.summary = dict(outcome.summary)
            sweep.findings = [f.model_dump(mode="json") for f in outcome.findings]
            sweep.error = outcome.error
            audit.record(
                session,
                subject_type="sweep",
                subject_id=sweep.id,
                event=f"sweep.{outcome.status}",
                actor="system:sweep",
                reason=outcome.error
                or f"{sweep.provider} sweep{' (dry run)' if sweep.dry_run else ''}",
                details=dict(outcome.summary),
            )

    def _note(
        self, subject_type: str, subject_id: str, event: str, actor: str, reason: str
    ) -> None:
        with transaction(self._sessions) as session:
            audit.record(
                session,
                subject_type=subject_type,
                subject_id=subject_id,
                event=event,
                actor=actor or "system:sweep",
                reason=reason,
            )


class SupervisionActivities:
    """Ask Temporal which lifecycles run, and nudge them (async: the Temporal client is async)."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self._sessions = sessions
        self._settings = settings

    def _alive_ids(self, platform: str) -> list[uuid.UUID]:
        # Only this deployment's NHIs (its name prefix) on the swept platform, like discovery.
        with transaction(self._sessions) as session:
            return list(
                session.scalars(
                    select(Nhi.id).where(
                        Nhi.status.in_(sorted(ALIVE)),
                        ours(Platform(platform), self._settings.name_prefix),
                        Nhi.platform == platform,
                    )
                )
            )

    @activity.defn
    async def find_unsupervised(self, inp: SweepInput) -> list[Finding]:
        """Alive inventory NHIs of the swept platform whose lifecycle workflow is not running."""
        from workflows.lifecycle import lifecycle_workflow_id

        client = activity.client()
        ids = await asyncio.to_thread(self._alive_ids, inp.provider)
        limit = asyncio.Semaphore(20)
        out: list[Finding] = []

        async def check(nhi_id: uuid.UUID) -> None:
            async with limit:
                try:
                    described = await client.get_workflow_handle(
                        lifecycle_workflow_id(nhi_id)
                    ).describe()
                    running = described.status is WorkflowExecutionStatus.RUNNING
                except RPCError as err:
                    if err.status is not RPCStatusCode.NOT_FOUND:
                        raise
                    running = False
            if not running:
                out.append(
                    Finding(
                        kind=FindingKind.UNSUPERVISED,
                        identity=str(nhi_id),
                        identity_kind="nhi",
                        nhi_id=nhi_id,
                        detail="no lifecycle workflow runs",
                        action="restart it",
                    )
                )

        await asyncio.gather(*(check(i) for i in ids))
        activity.heartbeat()
        return out[:MAX_FINDINGS]

    @activity.defn
    async def nudge_lifecycle(self, nudge: LifecycleNudge) -> str:
        """Ask a running lifecycle to decommission, or start one where none runs: a fresh run
        acts on a passed expiry or an ended agent by itself, at once."""
        from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id

        client = activity.client()
        handle = client.get_workflow_handle_for(
            NhiLifecycleWorkflow.run, lifecycle_workflow_id(nudge.nhi_id)
        )
        try:
            running = (await handle.describe()).status is WorkflowExecutionStatus.RUNNING
        except RPCError as err:
            if err.status is not RPCStatusCode.NOT_FOUND:
                raise
            running = False
        if not running:
            await client.start_workflow(
                NhiLifecycleWorkflow.run,
                LifecycleInput(nhi_id=nudge.nhi_id),
                id=lifecycle_workflow_id(nudge.nhi_id),
                task_queue=self._settings.temporal_task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            )
            return "lifecycle started"
        if nudge.action != "decommission":
            return "lifecycle running"
        try:
            await handle.execute_update(
                NhiLifecycleWorkflow.decommission,
                LifecycleAction(actor="system:sweep", channel="system", reason=nudge.reason),
                id=f"sweep-decommission-{nudge.nhi_id}",
            )
        except WorkflowUpdateFailedError as err:  # e.g. already decommissioning: goal met
            return f"not needed: {err.cause}"
        return "decommission started"
