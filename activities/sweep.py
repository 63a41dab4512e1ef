"""Sweep activities: discover what the platform holds, compare it with the inventory, act.

`SweepActivities` needs the inventory and the AWS clients together, because the comparison
must see both and only its findings (few) may enter workflow history, not the listings (up to
5,000 users per account). `SupervisionActivities` are async: they ask Temporal which NHIs have
no lifecycle running, and nudge lifecycles.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities._support import aws_code, heartbeating
from activities.aws import QUARANTINE_POLICY_NAME, SCOPE_POLICY_NAME, _deny_all
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
)
from models.enums import NhiKind
from models.orm import Agent, Nhi, Sweep
from nhi import MANAGED_BY, audit
from nhi.aws import AwsClients
from nhi.config import Settings
from nhi.db import transaction
from nhi.policy import identity_policy_document
from nhi.sweep import ALIVE, InventoryItem, PlatformIdentity, Rules, classify

log = logging.getLogger(__name__)

MAX_FINDINGS = 500  # per sweep in history; the rest is counted and picked up by the next sweep


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
    """Discovery, comparison and the inventory/AWS side of a sweep's actions."""

    def __init__(
        self, sessions: sessionmaker[Session], aws: AwsClients, settings: Settings
    ) -> None:
        self._sessions = sessions
        self._iam = aws.iam
        self._secrets = aws.secrets
        self._settings = settings
        self._pace = Pacer(settings.sweep_calls_per_second)

    # ---- discovery ---------------------------------------------------------------------------

    def _paged(self, operation: str, key: str) -> list[dict[str, Any]]:
        """Every page of a listing. Any error (throttling past botocore's retries included)
        propagates: a listing that ends early must never read as "nothing there"."""
        out: list[dict[str, Any]] = []
        paginator = self._iam.get_paginator(operation)  # type: ignore[call-overload]
        for page in paginator.paginate(PathPrefix=self._settings.iam_path):
            self._pace()
            activity.heartbeat()
            if page.get("IsTruncated") and not page.get("Marker"):
                raise ApplicationError(
                    f"{operation}: truncated page without a marker", type="ListingIncomplete"
                )
            out += page[key]
        return out

    def _tags(self, kind: str, name: str) -> dict[str, str]:
        self._pace()
        if kind == NhiKind.IAM_ROLE:
            tags = self._iam.list_role_tags(RoleName=name)["Tags"]
        else:
            tags = self._iam.list_user_tags(UserName=name)["Tags"]
        return {t["Key"]: t["Value"] for t in tags}

    def _secret_of(self, nhi_id: str) -> str | None:
        self._pace()
        found = self._secrets.list_secrets(
            Filters=[
                {"Key": "tag-key", "Values": ["nhi:nhi-id"]},
                {"Key": "tag-value", "Values": [nhi_id]},
            ]
        )["SecretList"]
        return str(found[0]["ARN"]) if found else None

    def _document(self, kind: str, name: str) -> dict[str, Any] | None:
        self._pace()
        try:
            if kind == NhiKind.IAM_ROLE:
                doc: Any = self._iam.get_role_policy(RoleName=name, PolicyName=SCOPE_POLICY_NAME)[
                    "PolicyDocument"
                ]
            else:
                doc = self._iam.get_user_policy(UserName=name, PolicyName=SCOPE_POLICY_NAME)[
                    "PolicyDocument"
                ]
        except ClientError as err:
            if aws_code(err) == "NoSuchEntity":
                return {}
            raise
        return json.loads(doc) if isinstance(doc, str) else dict(doc)

    def _last_used(self, kind: str, name: str) -> datetime | None:
        self._pace()
        if kind == NhiKind.IAM_ROLE:
            return (
                self._iam.get_role(RoleName=name)["Role"]
                .get("RoleLastUsed", {})
                .get("LastUsedDate")
            )
        dates = []
        for key in self._iam.list_access_keys(UserName=name)["AccessKeyMetadata"]:
            self._pace()
            used = self._iam.get_access_key_last_used(AccessKeyId=key["AccessKeyId"])[
                "AccessKeyLastUsed"
            ]
            if used.get("LastUsedDate"):
                dates.append(used["LastUsedDate"])
        return max(dates) if dates else None

    @activity.defn
    def plan_sweep(self, inp: SweepInput) -> SweepPlan:
        """Discover, compare, and return the findings (listing failures raise)."""
        workflow_id = activity.info().workflow_id or f"standalone-{uuid.uuid4()}"
        sweep_id = self._begin(inp, workflow_id)
        now = datetime.now(UTC)
        with heartbeating():
            try:
                users = [
                    (NhiKind.IAM_USER_KEY.value, u) for u in self._paged("list_users", "Users")
                ]
                roles = [(NhiKind.IAM_ROLE.value, r) for r in self._paged("list_roles", "Roles")]
            except ClientError as err:
                raise ApplicationError(
                    f"listing IAM identities failed ({aws_code(err)}): "
                    "sweep stopped, nothing changed",
                    type="ListingFailed",
                    non_retryable=True,
                ) from None
            names = {e.get("UserName") or e.get("RoleName") for _, e in users + roles}
            inventory = self._inventory(names)
            by_name = {i.name: i for i in inventory}
            platform: list[PlatformIdentity] = []
            for kind, entry in users + roles:
                name = str(entry.get("UserName") or entry.get("RoleName"))
                item = by_name.get(name)
                known_alive = item is not None and item.status in ALIVE
                tags = {} if known_alive else self._tags(kind, name)
                managed = known_alive or tags.get("managed-by") == MANAGED_BY
                nhi_id = tags.get("nhi:nhi-id")
                platform.append(
                    PlatformIdentity(
                        name=name,
                        kind=kind,
                        created_at=entry["CreateDate"],
                        managed=managed,
                        nhi_id=nhi_id,
                        secret_arn=self._secret_of(nhi_id)
                        if (managed and nhi_id and not known_alive)
                        else None,
                        last_used_at=self._last_used(kind, name)
                        if known_alive and item and item.status == "active"
                        else None,
                        scope_document=self._document(kind, name)
                        if known_alive and item and item.status == "active"
                        else None,
                    )
                )
        rules = Rules(
            propagation=timedelta(seconds=self._settings.sweep_propagation_seconds),
            stale_after=timedelta(days=self._settings.sweep_stale_days),
        )
        findings = classify(platform, inventory, now, rules)
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

    def _inventory(self, platform_names: set[Any]) -> list[InventoryItem]:
        """This deployment's inventory NHIs (its name prefix) that are alive, or that share a
        name with something on the platform."""
        items: list[InventoryItem] = []
        with transaction(self._sessions) as session:
            rows = session.execute(
                select(Nhi, Agent.status)
                .join(Agent)
                .where(Nhi.platform == "aws", Nhi.name.startswith(f"{self._settings.name_prefix}-"))
                .where(
                    (Nhi.status.in_(sorted(ALIVE)))
                    | (Nhi.name.in_(sorted(n for n in platform_names if n)))
                )
            ).all()
            for nhi, agent_status in rows:
                expected = None
                if nhi.status == "active":
                    scope = [ScopeStatement.model_validate(s) for s in nhi.granted_scope]
                    expected = identity_policy_document(
                        scope, list(nhi.allowed_cidrs), nhi.expires_at
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
                    )
                )
        return items

    # ---- actions -----------------------------------------------------------------------------

    @activity.defn
    def quarantine_orphan(self, orphan: OrphanInput) -> None:
        """Deactivate an orphan's keys and deny it everything; "not found" counts as done."""
        name = orphan.identity
        try:
            if orphan.identity_kind is NhiKind.IAM_ROLE:
                self._iam.put_role_policy(
                    RoleName=name, PolicyName=QUARANTINE_POLICY_NAME, PolicyDocument=_deny_all()
                )
            else:
                for key in self._iam.list_access_keys(UserName=name)["AccessKeyMetadata"]:
                    self._iam.update_access_key(
                        UserName=name, AccessKeyId=key["AccessKeyId"], Status="Inactive"
                    )
                self._iam.put_user_policy(
                    UserName=name, PolicyName=QUARANTINE_POLICY_NAME, PolicyDocument=_deny_all()
                )
        except ClientError as err:
            if aws_code(err) != "NoSuchEntity":
                raise
        self._note(
            "orphan",
            name,
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
            scope = [ScopeStatement.model_validate(s) for s in nhi.granted_scope]
            document = json.dumps(
                identity_policy_document(scope, list(nhi.allowed_cidrs), nhi.expires_at)
            )
            kind, name = nhi.kind, nhi.name
        if kind == NhiKind.IAM_ROLE:
            self._iam.put_role_policy(
                RoleName=name, PolicyName=SCOPE_POLICY_NAME, PolicyDocument=document
            )
        else:
            self._iam.put_user_policy(
                UserName=name, PolicyName=SCOPE_POLICY_NAME, PolicyDocument=document
            )
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

    def _alive_ids(self) -> list[uuid.UUID]:
        # Only this deployment's NHIs (its name prefix), like the discovery side.
        prefix = f"{self._settings.name_prefix}-"
        with transaction(self._sessions) as session:
            return list(
                session.scalars(
                    select(Nhi.id).where(Nhi.status.in_(sorted(ALIVE)), Nhi.name.startswith(prefix))
                )
            )

    @activity.defn
    async def find_unsupervised(self, _inp: SweepInput) -> list[Finding]:
        """Alive inventory NHIs whose lifecycle workflow is not running."""
        from workflows.lifecycle import lifecycle_workflow_id

        client = activity.client()
        ids = await asyncio.to_thread(self._alive_ids)
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
