"""Sweep activities: discover what the platform holds, compare it with the inventory, act.

`SweepActivities` needs the inventory and the platform's provider together, because the
comparison must see both and only its findings (few) may enter workflow history, not the
listings (up to 5,000 users per AWS account). `SupervisionActivities` are async: they ask
Temporal which NHIs have no lifecycle running, and nudge lifecycles.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from sqlalchemy import ColumnElement, String, cast, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities._support import heartbeating
from activities.db import step_key
from activities.provider import identity_ref_of, plan_of, provider_for
from activities.providers.aws_discovery import DETAILS_PAGE_MAX, PagedDiscovery, ResumePoint
from activities.providers.aws_removal import AwsRemoval
from activities.providers.base import Known, Provider
from activities.providers.registry import name_prefix
from models.contracts import (
    Contract,
    Finding,
    FindingKind,
    IdentityRef,
    LifecycleAction,
    LifecycleInput,
    LifecycleNudge,
    MissingMarked,
    OrphanEvent,
    OrphanInput,
    OrphanNoted,
    OrphanQuarantined,
    PreactiveAction,
    PreactiveNhi,
    ProvisionInput,
    ScopeStatement,
    SweepInput,
    SweepOutcome,
    SweepPlan,
)
from models.enums import NhiStatus, Platform
from models.orm import Agent, Approval, AuditEvent, Nhi, Sweep
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.infra.ratelimit import TokenBucket
from nhi.rules import search_attributes
from nhi.rules.findings import ALIVE, InventoryItem, PlatformIdentity, Rules, classify
from nhi.rules.ids import (
    LIFECYCLE_WORKFLOW,
    lifecycle_workflow_id,
    orphan_workflow_id,
    provision_workflow_id,
    sweep_nudge_update_id,
)
from nhi.services.policies import find_policy
from nhi.services.transitions import note, transition

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_FINDINGS = 500  # per sweep in history; the rest is counted and picked up by the next sweep
# Statuses before `active`: nothing supervises them but their provisioning run.
PREACTIVE = (NhiStatus.REQUESTED, NhiStatus.PENDING_APPROVAL, NhiStatus.PROVISIONING)
# Visibility: every running lifecycle of the namespace, one page at a time.
RUNNING_LIFECYCLES = "WorkflowType='NhiLifecycleWorkflow' AND ExecutionStatus='Running'"
LIST_PAGE = 1000
DESCRIBE_BATCH = 100  # concurrent describes between heartbeats
SWEEP_ACTOR = "system:sweep"
DIGEST_BYTES = 6  # per alive name seen, in a resumable sweep's heartbeat details
START_FAILED = "the sweep could not start"  # how the API records a start it gave up on
ORPHAN = "orphan"  # the audit subject type of identities no inventory row answers for
ORPHAN_THREADS = 4  # removals under way at once inside one `remove_orphans` batch


def ours(platform: Platform, prefix: str) -> ColumnElement[bool]:
    """This deployment's NHIs on a platform: names start with its prefix and the platform's
    separator (`nhi-` for IAM names, `nhi_` for Postgres roles, whose names are identifiers)."""
    return Nhi.name.startswith(name_prefix(platform, prefix), autoescape=True)


def _digest(name: str) -> bytes:
    """A name as a 6-byte digest: the compact form a resumed sweep remembers names in."""
    return hashlib.blake2b(name.encode(), digest_size=DIGEST_BYTES).digest()


def _urgent_first(findings: list[Finding]) -> list[Finding]:
    """Findings most urgent first (stable: within a kind, in listing order)."""
    order = list(FindingKind)
    return sorted(findings, key=lambda f: order.index(f.kind))


class OrphanBatch(Contract):
    """Orphans a sweep removes in one activity (issue 19): each is removed at once when its
    grace period is over, else left to its own `OrphanRemovalWorkflow`."""

    orphans: list[OrphanInput]


class OrphanOutcome(Contract):
    """What `remove_orphans` did with one orphan: `removed` (completely, with its audit
    events), `waiting` (its grace period runs: the sweep hands it to its removal workflow) or
    `failed` (the platform's reason; the identity stays at least quarantined and the sweep hands
    it to its removal workflow, which retries it and alerts)."""

    identity: str
    status: Literal["removed", "waiting", "failed"]
    removed: list[str] = []
    reason: str = ""
    code: str = ""


class OrphanBatchResult(Contract):
    """One outcome per orphan of the batch, in its order."""

    outcomes: list[OrphanOutcome]


class SweepProgress:
    """One `plan_sweep` attempt, as the paged discovery's sink (`PageSink`).

    Holds the compact inventory index (alive names → status), the current page's inventory
    rows, and the findings so far (the MAX_FINDINGS most urgent: only those enter history);
    every page is classified as it arrives and then dropped. Its heartbeat details (the point
    after the last page, counts, kept findings, digests of the alive names seen) let a retry on
    another worker go on from the last page instead of listing everything again."""

    def __init__(
        self,
        acts: SweepActivities,
        platform: Platform,
        rules: Rules,
        now: datetime,
        resumed: Mapping[str, Any] | None,
    ) -> None:
        self._acts = acts
        self._platform = platform
        self._rules = rules
        self._now = now
        self._budget = acts.budget
        self._lock = threading.Lock()
        self.page_size = acts.settings.sweep_page_size
        self.index = acts.alive_index(platform)
        self._page: dict[str, InventoryItem] = {}
        state = dict(resumed or {})
        resume = state.get("resume")
        self.resume_from = ResumePoint(**resume) if resume else None
        self.done = bool(state.get("done"))
        self.findings = [Finding.model_validate(f) for f in state.get("findings", [])]
        self.counts: dict[str, int] = {k: int(v) for k, v in state.get("counts", {}).items()}
        self.resumed_pages = int(state.get("pages", 0))
        self.pages = self.resumed_pages
        self._seen = bytearray(base64.b64decode(state.get("seen", "")))
        self._seen_set = {
            bytes(self._seen[i : i + DIGEST_BYTES]) for i in range(0, len(self._seen), DIGEST_BYTES)
        }

    # -- the budget (called from discovery threads: no heartbeat here) --

    def __call__(self) -> None:
        self._budget.acquire()

    def throttled(self) -> None:
        self._budget.throttled()

    def succeeded(self) -> None:
        self._budget.succeeded()

    # -- pages --

    def known(self, names: list[str]) -> Mapping[str, Known]:
        """The inventory rows of a page's names (one query); Known for the alive ones."""
        rows = self._acts.inventory_of(self._platform, names)
        # A name may have an old, gone row besides its alive one: the alive one answers.
        self._page = {}
        for item in rows:
            current = self._page.get(item.name)
            if current is None or item.status in ALIVE:
                self._page[item.name] = item
        return {
            n: Known(
                status=i.status,
                scope=i.granted_scope,
                allowed_cidrs=i.allowed_cidrs,
                expires_at=i.expires_at,
            )
            for n, i in self._page.items()
            if i.status in ALIVE
        }

    def page(self, found: list[PlatformIdentity], after: ResumePoint | None) -> None:
        items = [self._page[p.name] for p in found if p.name in self._page]
        # A task credential's role is judged by its parent NHI, whatever the parent's name.
        parents = {p.nhi_id for p in found if p.task and p.nhi_id} - {str(i.nhi_id) for i in items}
        items += self._acts.inventory_by_ids(self._platform, parents)
        new = classify(found, items, self._now, self._rules)
        with self._lock:
            self.counts["platform_identities"] = self.counts.get("platform_identities", 0) + len(
                found
            )
            self.counts["inventory_rows_listed"] = self.counts.get(
                "inventory_rows_listed", 0
            ) + len(items)
            for f in new:
                self.counts[f.kind.value] = self.counts.get(f.kind.value, 0) + 1
            self.findings = _urgent_first(self.findings + new)[:MAX_FINDINGS]
            for p in found:
                if p.name in self.index:
                    digest = _digest(p.name)
                    if digest not in self._seen_set:
                        self._seen_set.add(digest)
                        self._seen += digest
            self.resume_from = after
            self.done = after is None
            self.pages += 1
            self._page = {}
        activity.heartbeat(self.details())

    def feed(self, identities: list[PlatformIdentity]) -> None:
        """A whole listing from a provider that does not page (Postgres): the same
        classification, a page at a time."""
        for start in range(0, max(1, len(identities)), DETAILS_PAGE_MAX):
            chunk = identities[start : start + DETAILS_PAGE_MAX]
            self.known([p.name for p in chunk])
            self.page(
                chunk, ResumePoint("fed") if start + DETAILS_PAGE_MAX < len(identities) else None
            )

    def details(self) -> dict[str, Any]:
        """The heartbeat details a retry resumes from."""
        with self._lock:
            resume = self.resume_from
            return {
                "resume": {"listing": resume.listing, "marker": resume.marker} if resume else None,
                "done": self.done,
                "findings": [f.model_dump(mode="json") for f in self.findings],
                "counts": dict(self.counts),
                "pages": self.pages,
                "seen": base64.b64encode(bytes(self._seen)).decode(),
            }

    def unseen(self) -> set[str]:
        """Alive inventory names no page listed."""
        return {n for n in self.index if _digest(n) not in self._seen_set}


@contextmanager
def beating(progress: SweepProgress, interval: float = 5.0) -> Iterator[None]:
    """Heartbeat the progress from a helper thread while a page is slow (a throttled budget,
    a long fallback): details, never an empty heartbeat, which would erase them."""
    stop = threading.Event()
    context = contextvars.copy_context()

    def beat() -> None:
        while not stop.wait(interval):
            activity.heartbeat(progress.details())

    thread = threading.Thread(target=context.run, args=(beat,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def beating_details(details: Callable[[], Any], interval: float = 5.0) -> Iterator[None]:
    """Heartbeat `details()` now and from a helper thread every `interval` seconds while the
    block runs (never an empty heartbeat, which would erase the details a retry resumes from)."""
    stop = threading.Event()
    context = contextvars.copy_context()

    def beat() -> None:
        while not stop.wait(interval):
            activity.heartbeat(details())

    activity.heartbeat(details())
    thread = threading.Thread(target=context.run, args=(beat,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        activity.heartbeat(details())


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
        # One budget for every sweep call this worker makes to its provider accounts.
        self.budget = TokenBucket(settings.sweep_calls_per_second)

    @property
    def settings(self) -> Settings:
        return self._settings

    def _provider(self, platform: str) -> Provider:
        return provider_for(self._providers, platform)

    def _paced(self) -> None:
        self.budget.acquire()
        activity.heartbeat()

    # ---- discovery ---------------------------------------------------------------------------

    @activity.defn
    def plan_sweep(self, inp: SweepInput) -> SweepPlan:
        """Discover, compare, and return the findings (listing failures raise).

        A provider that pages (AWS) is classified a page at a time and resumes, after a worker
        restart, from the page after the last one heartbeated; the others are listed whole."""
        info = activity.info()
        workflow_id = info.workflow_id or f"standalone-{uuid.uuid4()}"
        provider = self._provider(inp.provider)
        sweep_id = self._begin(inp, workflow_id)
        now = datetime.now(UTC)
        rules = Rules(
            propagation=timedelta(seconds=self._settings.sweep_propagation_seconds),
            stale_after=timedelta(days=self._settings.sweep_stale_days),
        )
        paged = isinstance(provider, PagedDiscovery)
        resumed = info.heartbeat_details[0] if info.heartbeat_details else None
        # Only a paged listing resumes: the others list everything again on a retry.
        resumable = resumed if paged and isinstance(resumed, dict) else None
        progress = SweepProgress(self, provider.platform, rules, now, resumable)
        unreachable: dict[str, str] = {}
        with beating(progress):
            if isinstance(provider, PagedDiscovery):  # `paged`, spelled out for mypy
                if not progress.done:
                    provider.discover_pages(progress)
            else:
                found = provider.discover(self._known(provider.platform), self._paced)
                unreachable = found.unreachable
                # What could not be listed is not compared: its NHIs are not "missing".
                progress.feed([p for p in found.identities if p.target not in unreachable])
            gone = [
                i
                for i in self._inventory(provider.platform, progress.unseen())
                if i.status in ALIVE and i.target not in unreachable
            ]
        missing = classify([], gone, now, rules)
        findings = [
            Finding(
                kind=FindingKind.UNREACHABLE,
                identity=place,
                identity_kind="target",
                detail=why,
                action="its identities were not compared",
                target=place,
            )
            for place, why in sorted(unreachable.items())
        ] + _urgent_first(progress.findings + missing)
        findings = self._with_removal_failures(findings)
        counts = dict(progress.counts)
        counts.setdefault("platform_identities", 0)
        counts.pop("inventory_rows_listed", None)
        counts["inventory"] = len(progress.index)
        counts["discovery_pages"] = progress.pages
        counts["resumed_pages"] = progress.resumed_pages
        counts["throttled"] = self.budget.throttles
        for f in missing:
            counts[f.kind.value] = counts.get(f.kind.value, 0) + 1
        if unreachable:
            counts[FindingKind.UNREACHABLE.value] = len(unreachable)
        total = sum(counts.get(k.value, 0) for k in FindingKind)
        return SweepPlan(
            sweep_id=sweep_id,
            findings=findings[:MAX_FINDINGS],
            counts=counts,
            truncated=max(0, total - MAX_FINDINGS),
            orphan_grace_seconds=self._settings.orphan_grace_seconds,
            revoke_alert_seconds=self._settings.revoke_alert_seconds,
            security_channel=self._settings.slack_security_channel,
        )

    def _known(self, platform: Platform) -> dict[str, Known]:
        """What the inventory knows of every alive name (providers that list all at once)."""
        return {
            i.name: Known(
                status=i.status,
                scope=i.granted_scope,
                allowed_cidrs=i.allowed_cidrs,
                expires_at=i.expires_at,
            )
            for i in self._inventory(platform)
        }

    def alive_index(self, platform: Platform) -> dict[str, str]:
        """Alive inventory names of a platform → status: all a sweep keeps of the inventory."""
        with transaction(self._sessions) as session:
            rows = session.execute(
                select(Nhi.name, Nhi.status).where(
                    Nhi.platform == platform.value,
                    ours(platform, self._settings.name_prefix),
                    Nhi.status.in_(sorted(ALIVE)),
                )
            ).all()
        return {str(name): str(status) for name, status in rows}

    def inventory_by_ids(self, platform: Platform, ids: set[str]) -> list[InventoryItem]:
        """Inventory rows by id (task credentials' parents)."""
        if not ids:
            return []
        return self._inventory(platform, ids=sorted(uuid.UUID(i) for i in ids))

    def inventory_of(self, platform: Platform, names: list[str]) -> list[InventoryItem]:
        """The inventory rows (any status) of a page's names."""
        return self._inventory(platform, set(names))

    def _with_removal_failures(self, findings: list[Finding]) -> list[Finding]:
        """Orphans whose last removal failed say why (the platform's code and message)."""
        names = [f.identity for f in findings[:MAX_FINDINGS] if f.kind is FindingKind.ORPHAN]
        if not names:
            return findings
        with transaction(self._sessions) as session:
            rows = session.execute(
                select(AuditEvent.subject_id, AuditEvent.event, AuditEvent.reason)
                .where(
                    AuditEvent.subject_type == ORPHAN,
                    AuditEvent.subject_id.in_(names),
                    AuditEvent.event.in_(["orphan.removal_failed", "orphan.deleted"]),
                )
                .order_by(AuditEvent.id)
            ).all()
        # Ordered by id, so each name keeps its latest event: a deletion clears a failure.
        latest = {subject: (event, reason) for subject, event, reason in rows}
        out = []
        for f in findings:
            event, reason = latest.get(f.identity, ("", ""))
            if f.kind is FindingKind.ORPHAN and event == "orphan.removal_failed":
                f = f.model_copy(update={"detail": f"{f.detail}; last removal failed: {reason}"})
            out.append(f)
        return out

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
            sweep = session.scalars(
                select(Sweep).where(Sweep.workflow_id == workflow_id).with_for_update()
            ).one()
            if sweep.status == "failed" and (sweep.error or "").startswith(START_FAILED):
                # The API gave up waiting for the start (and answered 503), yet the start went
                # through: the report must tell what this sweep does after all.
                transition(
                    session,
                    sweep,
                    event="sweep.started",
                    actor=SWEEP_ACTOR,
                    reason="started after its request had been answered 503",
                    status="running",
                    changes={"error": None, "finished_at": None},
                    key=step_key("started"),
                )
            return sweep.id

    def _inventory(
        self,
        platform: Platform,
        names: set[str] | None = None,
        ids: list[uuid.UUID] | None = None,
    ) -> list[InventoryItem]:
        """This deployment's inventory NHIs (its name prefix) on a platform: the alive ones,
        or, given `names` (or `ids`), those rows whatever their status."""
        query = (
            select(Nhi, Agent.status)
            .join(Agent)
            .where(Nhi.platform == platform.value, ours(platform, self._settings.name_prefix))
        )
        if ids is not None:
            query = query.where(Nhi.id.in_(ids))
        elif names is None:
            query = query.where(Nhi.status.in_(sorted(ALIVE)))
        elif not names:
            return []
        else:
            query = query.where(Nhi.name.in_(sorted(names)))
        items: list[InventoryItem] = []
        with transaction(self._sessions) as session:
            for nhi, agent_status in session.execute(query).all():
                scope = tuple(ScopeStatement.model_validate(s) for s in nhi.granted_scope)
                items.append(
                    InventoryItem(
                        nhi_id=nhi.id,
                        name=nhi.name,
                        kind=nhi.kind,
                        status=nhi.status,
                        expires_at=nhi.expires_at,
                        agent_status=agent_status,
                        last_used_at=nhi.last_used_at,
                        target=nhi.target,
                        granted_scope=scope,
                        allowed_cidrs=tuple(nhi.allowed_cidrs),
                        activated_at=nhi.activated_at,
                    )
                )
        return items

    # ---- actions -----------------------------------------------------------------------------

    @activity.defn
    def quarantine_orphan(self, orphan: OrphanInput) -> OrphanQuarantined:
        """Stop an orphan working (keys, logins, sessions); "not found" counts as done.

        Returns when it was first quarantined (since it was last deleted): a removal retried by a
        later sweep counts its grace period from then, not again from now."""
        ref = IdentityRef.of_orphan(orphan)
        with heartbeating():
            self._provider(ref.platform).disable(ref)
        with transaction(self._sessions) as session:
            since = select(func.min(AuditEvent.created_at)).where(
                AuditEvent.subject_type == ORPHAN,
                AuditEvent.subject_id == orphan.identity,
                AuditEvent.event == "orphan.quarantined",
                AuditEvent.id > self._last_deleted(session, orphan.identity),
            )
            first = session.scalar(since)
            if first is None:
                note(
                    session,
                    subject_type=ORPHAN,
                    subject_id=orphan.identity,
                    event="orphan.quarantined",
                    actor=orphan.found_by or SWEEP_ACTOR,
                    reason="found by a sweep: not in the inventory",
                    key=step_key("quarantined"),
                )
                # Written just now (or by a concurrent attempt with the same key).
                first = session.scalar(since) or datetime.now(UTC)
        return OrphanQuarantined(first_quarantined_at=first)

    @staticmethod
    def _last_deleted(session: Session, identity: str) -> int:
        return (
            session.scalar(
                select(func.max(AuditEvent.id)).where(
                    AuditEvent.subject_type == ORPHAN,
                    AuditEvent.subject_id == identity,
                    AuditEvent.event == "orphan.deleted",
                )
            )
            or 0
        )

    @activity.defn
    def remove_orphans(self, batch: OrphanBatch) -> OrphanBatchResult:
        """Remove a sweep's orphans whose grace period is over, ORPHAN_THREADS at a time, in
        one activity instead of a child workflow and three activities each (issue 19).

        Each one: one pass on the platform (AWS: the deny-all first, then everything in
        `delete`'s order, proven gone, then its secret), then its audit events
        (`orphan.quarantined` unless one stands since it was last deleted, `orphan.deleted`
        with what was removed) in its own transaction, committed before it counts as done.
        The heartbeat details name the orphans done, so a retry (after a worker restart, say)
        skips them; one whose heartbeat was lost is removed again harmlessly ("not found" is
        done, and the events' keys are per sweep run and orphan). A failure is that orphan's
        outcome, not the batch's: the sweep hands it to its removal workflow."""
        info = activity.info()
        details = info.heartbeat_details[0] if info.heartbeat_details else None
        # By removal id (kind, target and name: one Postgres role name may be an orphan on two
        # targets), as the orphans' removal workflows are named.
        done: dict[str, dict[str, Any]] = dict(details) if isinstance(details, dict) else {}
        ids = [
            orphan_workflow_id(o.identity_kind.value, o.identity, o.target) for o in batch.orphans
        ]
        since = self._first_quarantined([o.identity for o in batch.orphans])
        now = datetime.now(UTC)
        outcomes: dict[str, OrphanOutcome] = {}
        todo: list[tuple[str, OrphanInput]] = []
        for removal, orphan in zip(ids, batch.orphans, strict=True):
            if removal in done:
                outcomes[removal] = OrphanOutcome.model_validate(done[removal])
                continue
            first = since.get(orphan.identity)
            grace = timedelta(seconds=orphan.grace_seconds)
            if orphan.grace_seconds > 0 and (first is None or first + grace > now):
                outcomes[removal] = OrphanOutcome(identity=orphan.identity, status="waiting")
                continue
            todo.append((removal, orphan))
        lock = threading.Lock()
        run = f"{info.workflow_id}/{info.workflow_run_id}"

        def one(item: tuple[str, OrphanInput]) -> None:
            removal, orphan = item
            outcome = self._remove_orphan(orphan, f"{run}/{removal}")
            with lock:
                outcomes[removal] = outcome
                if outcome.status == "removed":  # a failed one is tried again by a retry
                    done[removal] = outcome.model_dump(mode="json")

        def progress() -> dict[str, Any]:
            with lock:
                return dict(done)

        with beating_details(progress), ThreadPoolExecutor(ORPHAN_THREADS) as pool:
            list(pool.map(one, todo))
        return OrphanBatchResult(outcomes=[outcomes[i] for i in ids])

    def _remove_orphan(self, orphan: OrphanInput, key: str) -> OrphanOutcome:
        """One orphan of a batch: removed from its platform, then its audit events."""
        ref = IdentityRef.of_orphan(orphan)
        provider = self._provider(ref.platform)
        try:
            if isinstance(provider, AwsRemoval):
                with provider.paced(self.budget):
                    removed = provider.remove_now(ref).removed
            else:
                provider.disable(ref)
                removed = provider.delete(ref).removed
        except ApplicationError as err:  # classified by the provider, the identity re-locked
            return OrphanOutcome(
                identity=orphan.identity, status="failed", reason=err.message, code=err.type or ""
            )
        except Exception as err:  # an unclassified error (a connection lost): still this orphan's
            log.warning("removing orphan %s failed: %r", orphan.identity, err)
            return OrphanOutcome(
                identity=orphan.identity,
                status="failed",
                reason=f"{type(err).__name__}: {err}"[:500],
                code=type(err).__name__,
            )
        actor = orphan.found_by or SWEEP_ACTOR
        with transaction(self._sessions) as session:
            if orphan.identity not in self._first_quarantined([orphan.identity], session):
                note(
                    session,
                    subject_type=ORPHAN,
                    subject_id=orphan.identity,
                    event="orphan.quarantined",
                    actor=actor,
                    reason="found by a sweep: not in the inventory",
                    key=f"{key}/quarantined",
                )
            note(
                session,
                subject_type=ORPHAN,
                subject_id=orphan.identity,
                event="orphan.deleted",
                actor=actor,
                reason="not in the inventory: removed after the grace period",
                details={
                    k: v
                    for k, v in {
                        "removed": "; ".join(removed),
                        "kind": orphan.identity_kind.value,
                        "key": f"{key}/deleted",
                        "first": "true",
                    }.items()
                    if v
                },
                key=f"{key}/deleted",
            )
        return OrphanOutcome(identity=orphan.identity, status="removed", removed=removed)

    def _first_quarantined(
        self, names: list[str], session: Session | None = None
    ) -> dict[str, datetime]:
        """When each orphan was first quarantined since it was last deleted (one query; the
        ones never quarantined since are absent)."""
        if not names:
            return {}
        deleted = (
            select(AuditEvent.subject_id, func.max(AuditEvent.id).label("last"))
            .where(
                AuditEvent.subject_type == ORPHAN,
                AuditEvent.subject_id.in_(names),
                AuditEvent.event == "orphan.deleted",
            )
            .group_by(AuditEvent.subject_id)
            .subquery()
        )
        query = (
            select(AuditEvent.subject_id, func.min(AuditEvent.created_at))
            .outerjoin(deleted, deleted.c.subject_id == AuditEvent.subject_id)
            .where(
                AuditEvent.subject_type == ORPHAN,
                AuditEvent.subject_id.in_(names),
                AuditEvent.event == "orphan.quarantined",
                AuditEvent.id > func.coalesce(deleted.c.last, 0),
            )
            .group_by(AuditEvent.subject_id)
        )
        with nullcontext(session) if session else transaction(self._sessions) as s:
            return {str(name): first for name, first in s.execute(query).all()}

    @activity.defn
    def note_orphan(self, entry: OrphanEvent) -> OrphanNoted:
        """Record an orphan's deletion or removal failure (once per idempotency key), and say
        whether it is the first of its kind since the orphan was last deleted."""
        with transaction(self._sessions) as session:
            if entry.key:
                earlier = session.scalar(
                    select(AuditEvent.details["first"].astext).where(
                        AuditEvent.subject_type == ORPHAN,
                        AuditEvent.subject_id == entry.identity,
                        AuditEvent.details["key"].astext == entry.key,
                    )
                )
                if earlier is not None:  # a retry after the first try committed
                    return OrphanNoted(first=earlier == "true")
            seen = session.scalar(
                select(func.count(AuditEvent.id)).where(
                    AuditEvent.subject_type == ORPHAN,
                    AuditEvent.subject_id == entry.identity,
                    AuditEvent.event == entry.event,
                    AuditEvent.id > self._last_deleted(session, entry.identity),
                )
            )
            first = not seen
            # The key stays in the details too: the lookup above reads `first` back from there.
            note(
                session,
                subject_type=ORPHAN,
                subject_id=entry.identity,
                event=entry.event,
                actor=entry.actor or SWEEP_ACTOR,
                reason=entry.reason[:2000],
                details=dict(entry.details)
                | ({"key": entry.key} if entry.key else {})
                | {"first": "true" if first else "false"},
                key=entry.key or None,
            )
        return OrphanNoted(first=first)

    @activity.defn
    def mark_missing(self, finding: Finding) -> MissingMarked | None:
        """An active NHI whose identity is gone from the platform becomes `missing`, with one
        audit event; one no longer active (decommissioned meanwhile, say) is left alone."""
        if finding.nhi_id is None:
            return None
        with transaction(self._sessions) as session:
            nhi = session.get(Nhi, finding.nhi_id, with_for_update=True)
            if nhi is None:
                return None
            agent = session.get_one(Agent, nhi.agent_id)
            marked = MissingMarked(
                nhi_id=nhi.id,
                changed=False,
                name=nhi.name,
                agent_name=agent.name,
                owner_email=agent.owner_email,
                status=nhi.status,
            )
            if nhi.status == NhiStatus.MISSING:
                # A retry after the first try committed: tell people (alerts are idempotent
                # per recipient) and stop the lifecycle, but record nothing twice.
                return marked.model_copy(update={"changed": True})
            if nhi.status != NhiStatus.ACTIVE:
                return marked
            if not transition(
                session,
                nhi,
                event="nhi.missing",
                actor=SWEEP_ACTOR,
                reason=finding.detail or "gone from the platform",
                status=NhiStatus.MISSING,
                changes={"status_reason": f"gone from the platform: {finding.detail}"},
                details={"identity": nhi.name},
                key=step_key("missing"),
            ):
                return marked  # this sweep marked it before, and it has changed since
            return marked.model_copy(update={"changed": True, "status": nhi.status})

    @activity.defn
    def clean_preactive(self, stuck: PreactiveNhi) -> str:
        """Remove whatever an NHI stuck before `active` may hold on its platform (its identity,
        keys, policies, secret or database roles, by their deterministic names), then mark it
        `failed` with the reason and one audit event. Idempotent: "not found" is removed."""
        with transaction(self._sessions) as session:
            nhi = session.get(Nhi, stuck.nhi_id, with_for_update=True)
            if nhi is None or nhi.status not in PREACTIVE:
                return f"nothing to do: it is {nhi.status if nhi else 'gone'} now"
            ref = identity_ref_of(nhi, session.get_one(Agent, nhi.agent_id), self._settings)
        with heartbeating():
            # Never delivered to anyone who acknowledged it: the secret goes without recovery.
            removed = self._provider(ref.platform).delete(ref, force_delete_secret=True).removed
        what = "; ".join(removed) or "nothing was on the platform"
        with transaction(self._sessions) as session:
            nhi = session.get_one(Nhi, stuck.nhi_id, with_for_update=True)
            if nhi.status not in PREACTIVE:
                return f"removed {what}; it is {nhi.status} now"
            reason = f"{stuck.reason}; cleaned up by a sweep"[:2000]
            if not transition(
                session,
                nhi,
                event="nhi.failed",
                actor=SWEEP_ACTOR,
                reason=reason,
                status=NhiStatus.FAILED,
                changes={"status_reason": reason},
                details={"removed": what, "sweep_id": str(stuck.sweep_id or "")},
                key=step_key("failed"),
            ):
                return f"removed {what}; marked failed before"
        return f"removed {what}; marked failed"

    @activity.defn
    def revert_drift(self, finding: Finding) -> bool:
        """Put the granted scope back, when the NHI's policy says drift is reverted."""
        with transaction(self._sessions) as session:
            nhi = session.get_one(Nhi, finding.nhi_id)
            agent = session.get_one(Agent, nhi.agent_id)
            policy = find_policy(session, nhi.platform, nhi.kind, agent.environment)
            if policy is None or not policy.revert_drift:
                return False
            plan = plan_of(nhi, agent, self._settings, policy.max_session_duration_seconds)
        with heartbeating():
            self._provider(plan.platform).renew(plan)
        with transaction(self._sessions) as session:
            note(
                session,
                subject_type="nhi",
                subject_id=str(finding.nhi_id),
                event="nhi.drift_reverted",
                actor=SWEEP_ACTOR,
                reason="granted scope restored",
                key=step_key("drift_reverted"),
            )
        return True

    @activity.defn
    def record_sweep(self, outcome: SweepOutcome) -> None:
        """Store the sweep's report (idempotent) and one audit event."""
        with transaction(self._sessions) as session:
            sweep = session.get_one(Sweep, outcome.sweep_id, with_for_update=True)
            if sweep.status != "running":
                return
            transition(
                session,
                sweep,
                event=f"sweep.{outcome.status}",
                actor=SWEEP_ACTOR,
                reason=outcome.error
                or f"{sweep.provider} sweep{' (dry run)' if sweep.dry_run else ''}",
                status=outcome.status,
                changes={
                    "finished_at": datetime.now(UTC),
                    "summary": dict(outcome.summary),
                    "findings": [f.model_dump(mode="json") for f in outcome.findings],
                    "error": outcome.error,
                },
                details=dict(outcome.summary),
                key=step_key("recorded"),
            )


async def _running(handle: WorkflowHandle[Any, Any]) -> WorkflowExecutionStatus | None:
    """A workflow's status, or None when Temporal has no such workflow."""
    try:
        return (await handle.describe()).status
    except RPCError as err:
        if err.status is not RPCStatusCode.NOT_FOUND:
            raise
        return None


async def _last_tags(handle: WorkflowHandle[Any, Any]) -> TypedSearchAttributes | None:
    """The NHI search attributes of a workflow's latest run, to start its next run with. Only
    a run that had them: then the namespace has them registered."""
    try:
        tags = (await handle.describe()).typed_search_attributes
    except RPCError as err:
        if err.status is not RPCStatusCode.NOT_FOUND:
            raise
        return None
    return search_attributes.ours(tags)


async def _described(
    client: Client, items: list[T], workflow_id: Callable[[T], str]
) -> AsyncIterator[list[tuple[T, WorkflowExecutionStatus | None]]]:
    """Each item with the status of its workflow, DESCRIBE_BATCH concurrent describes at a
    time and a heartbeat after each batch (so a long list never outlives the heartbeat)."""
    for start in range(0, len(items), DESCRIBE_BATCH):
        batch = items[start : start + DESCRIBE_BATCH]
        statuses = await asyncio.gather(
            *(_running(client.get_workflow_handle(workflow_id(i))) for i in batch)
        )
        activity.heartbeat(start + len(batch))
        yield list(zip(batch, statuses, strict=True))


class SupervisionActivities:
    """Ask Temporal which NHIs lack the workflow that should supervise them, and act on it
    (async: the Temporal client is async; the few database reads go to a thread)."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self._sessions = sessions
        self._settings = settings

    def _alive_ids(self, platform: str) -> list[uuid.UUID]:
        # Only this deployment's NHIs (its name prefix) on the swept platform, like discovery.
        with transaction(self._sessions) as session:
            return list(
                session.scalars(
                    select(Nhi.id)
                    .where(
                        Nhi.status.in_(sorted(ALIVE)),
                        ours(Platform(platform), self._settings.name_prefix),
                        Nhi.platform == platform,
                    )
                    .order_by(Nhi.id)
                )
            )

    @staticmethod
    async def _running_lifecycles(client: Client, platform: str) -> set[str] | None:
        """Ids of the running lifecycles of `platform`, from visibility, a page at a time with a
        heartbeat per page; None where the server has no visibility API (the time-skipping test
        server).

        By the `Platform` search attribute (plus untagged runs, which may be of any platform);
        every running lifecycle where the namespace lacks the attribute."""
        queries = (
            search_attributes.running(LIFECYCLE_WORKFLOW, Platform(platform)),
            RUNNING_LIFECYCLES,
        )
        for query in queries:
            found: set[str] = set()
            pages = client.list_workflows(query, page_size=LIST_PAGE)
            try:
                while True:
                    await pages.fetch_next_page()
                    found.update(w.id for w in pages.current_page or ())
                    activity.heartbeat(len(found))
                    if not pages.next_page_token:
                        return found
            except RPCError as err:
                if err.status is RPCStatusCode.UNIMPLEMENTED:
                    return None
                unregistered = err.status is RPCStatusCode.INVALID_ARGUMENT and (
                    search_attributes.unregistered(err.message)
                )
                if not unregistered or query == RUNNING_LIFECYCLES:
                    raise
        return None

    @activity.defn
    async def find_unsupervised(self, inp: SweepInput) -> list[Finding]:
        """Alive inventory NHIs of the swept platform whose lifecycle workflow is not running.

        One visibility listing instead of a describe per NHI, so a large inventory neither
        floods the server nor outlives the heartbeat timeout. Visibility lags a little, so the
        few it does not show as running are confirmed with a describe before being reported."""
        client = activity.client()
        ids = await asyncio.to_thread(self._alive_ids, inp.provider)
        running = await self._running_lifecycles(client, inp.provider)
        candidates = [i for i in ids if running is None or lifecycle_workflow_id(i) not in running]
        out: list[Finding] = []
        async for described in _described(client, candidates, lifecycle_workflow_id):
            out += [
                Finding(
                    kind=FindingKind.UNSUPERVISED,
                    identity=str(nhi_id),
                    identity_kind="nhi",
                    nhi_id=nhi_id,
                    detail="no lifecycle workflow runs",
                    action="restart it",
                )
                for nhi_id, status in described
                if status is not WorkflowExecutionStatus.RUNNING
            ]
            if len(out) >= MAX_FINDINGS:
                break  # the next sweep picks up the rest
        return out[:MAX_FINDINGS]

    def _preactive_rows(
        self, platform: str
    ) -> list[tuple[uuid.UUID, str, str, str, datetime, str | None]]:
        cutoff = datetime.now(UTC) - timedelta(seconds=self._settings.sweep_preactive_seconds)
        with transaction(self._sessions) as session:
            rows = session.execute(
                select(Nhi.id, Nhi.name, Nhi.kind, Nhi.status, Nhi.created_at, Nhi.workflow_id)
                .where(
                    Nhi.status.in_([s.value for s in PREACTIVE]),
                    Nhi.platform == platform,
                    ours(Platform(platform), self._settings.name_prefix),
                    Nhi.created_at < cutoff,
                    # A bundle's NHIs wait for its approval in the bundle's run, not in a
                    # provisioning run of their own (issue 16): not stuck within its window.
                    ~select(Approval.id)
                    .where(
                        Approval.bundle.is_(True),
                        Approval.status == "pending",
                        Approval.expires_at > datetime.now(UTC),
                        Approval.nhi_ids.op("?")(cast(Nhi.id, String)),
                    )
                    .exists(),
                )
                .order_by(Nhi.created_at)
                .limit(MAX_FINDINGS)
            ).all()
        return [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    @activity.defn
    async def find_preactive(self, inp: SweepInput) -> list[Finding]:
        """NHIs of the swept platform stuck before `active` for longer than
        NHI_SWEEP_PREACTIVE_SECONDS whose provisioning workflow is not running.

        A run that never started (no such workflow) of a row still `requested` is re-driven:
        nothing can exist on the platform before provisioning moves the row to `provisioning`.
        Every other case (a terminated, cancelled, failed or vanished run, or a request whose
        approval wait was lost: the four-eyes check needs the requester as the API saw them)
        is cleaned up: whatever it may have created is removed and the NHI fails.
        """
        client = activity.client()
        rows = await asyncio.to_thread(self._preactive_rows, inp.provider)
        out: list[Finding] = []
        # The run the row names (the NHI's one run, or its provisioning run when requested
        # before one-run provisioning or in a bundle); rows from before it was recorded: the
        # provisioning run's id.
        async for described in _described(
            client, rows, lambda r: r[5] or provision_workflow_id(r[0])
        ):
            for (nhi_id, name, kind, status, created_at, _), run in described:
                if run is WorkflowExecutionStatus.RUNNING:
                    continue  # e.g. waiting for an approver: its own timeout decides
                since = f"{status} since {created_at:%Y-%m-%d %H:%M} UTC"
                if run is None and status == NhiStatus.REQUESTED:
                    remedy, detail = PreactiveAction.REDRIVE, f"{since}; provisioning never started"
                    action = "restart provisioning"
                else:
                    how = "never started" if run is None else f"is {run.name.lower()}"
                    remedy, detail = (
                        PreactiveAction.CLEAN_UP,
                        f"{since}; its provisioning run {how}",
                    )
                    action = "remove what it may have created, mark it failed"
                out.append(
                    Finding(
                        kind=FindingKind.PREACTIVE,
                        identity=name,
                        identity_kind=kind,
                        nhi_id=nhi_id,
                        detail=detail,
                        action=action,
                        preactive=remedy,
                    )
                )
        return out

    @activity.defn
    async def redrive_provisioning(self, stuck: PreactiveNhi) -> str:
        """Start the one run of an NHI whose run never started: its lifecycle, provisioning it
        first. A run that exists (or existed: the id is never reused) is left alone."""

        def load() -> Nhi | None:
            with transaction(self._sessions) as session:
                return session.get(Nhi, stuck.nhi_id)

        nhi = await asyncio.to_thread(load)
        if nhi is None or nhi.status != NhiStatus.REQUESTED:
            return f"nothing to do: it is {nhi.status if nhi else 'gone'} now"
        try:
            await activity.client().start_workflow(
                LIFECYCLE_WORKFLOW,
                LifecycleInput(
                    nhi_id=nhi.id,
                    # `requested`: approved already, or never needed an approver.
                    provision=ProvisionInput(nhi_id=nhi.id, requested_by=nhi.requested_by),
                ),
                id=lifecycle_workflow_id(nhi.id),
                task_queue=self._settings.temporal_task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )
        except WorkflowAlreadyStartedError:
            return "a provisioning run exists: left alone"

        key = step_key("provisioning_restarted")  # here: the activity's context is this task's

        def record() -> None:
            with transaction(self._sessions) as session:
                # The next sweep describes the run the row names.
                row = session.get(Nhi, stuck.nhi_id)
                if row is not None and row.status == NhiStatus.REQUESTED:
                    row.workflow_id = lifecycle_workflow_id(stuck.nhi_id)
                note(
                    session,
                    subject_type="nhi",
                    subject_id=stuck.nhi_id,
                    event="nhi.provisioning_restarted",
                    actor=SWEEP_ACTOR,
                    reason=stuck.reason,
                    details={"sweep_id": str(stuck.sweep_id or "")},
                    key=key,
                )

        await asyncio.to_thread(record)
        return "provisioning restarted"

    @activity.defn
    async def nudge_lifecycle(self, nudge: LifecycleNudge) -> str:
        """Ask a running lifecycle to decommission (or, for a missing NHI, to stop), or start
        one where none runs: a fresh run acts on a passed expiry or an ended agent by itself.

        The update id names the sweep: a retry of this activity is deduplicated, and a later
        sweep's nudge (after a restore, say) is a new request, never the earlier one's echo."""
        client = activity.client()
        handle = client.get_workflow_handle(lifecycle_workflow_id(nudge.nhi_id))
        running = await _running(handle) is WorkflowExecutionStatus.RUNNING
        if nudge.action == "mark_missing":
            if not running:
                return "no lifecycle runs"
        elif not running:
            await client.start_workflow(
                LIFECYCLE_WORKFLOW,
                LifecycleInput(nhi_id=nudge.nhi_id),
                id=lifecycle_workflow_id(nudge.nhi_id),
                task_queue=self._settings.temporal_task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                search_attributes=await _last_tags(handle),
            )
            return "lifecycle started"
        if nudge.action not in ("decommission", "mark_missing"):
            return "lifecycle running"
        term = nudge.sweep_id or uuid.uuid4()
        # The update waits for the step the lifecycle has under way; give up a little before
        # this attempt times out, so the attempt fails with the reason instead of lingering.
        limit = activity.info().start_to_close_timeout or timedelta(seconds=60)
        wait = max(limit.total_seconds() - 5, 1)
        try:
            async with asyncio.timeout(wait):
                # By name: `mark_missing` is the lifecycle's update for an identity that is gone.
                await handle.execute_update(
                    nudge.action,
                    LifecycleAction(actor=SWEEP_ACTOR, channel="system", reason=nudge.reason),
                    id=sweep_nudge_update_id(nudge.action, nudge.nhi_id, term),
                    result_type=None,
                )
        except WorkflowUpdateFailedError as err:  # e.g. already decommissioning: goal met
            return f"not needed: {err.cause}"
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
            # The client turns the timeout's cancellation into its own error.
            raise ApplicationError(
                f"the lifecycle did not accept {nudge.action} within {wait:.0f} s "
                "(a step is under way); the next sweep asks again",
                type="LifecycleBusy",
            ) from None
        return "lifecycle stopped" if nudge.action == "mark_missing" else "decommission started"
