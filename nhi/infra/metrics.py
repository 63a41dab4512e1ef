"""Prometheus metrics of the API and the worker (`/metrics` on each).

Three sources end up on one page:

- the inventory, as gauges the API recomputes every `NHI_METRICS_REFRESH_SECONDS` in a
  background task (`InventoryMetrics.refresh`): a scrape only reads the last values, so a
  scrape costs nothing at any inventory size;
- counters the processes keep themselves: HTTP requests in the API (`HttpMetrics`), activity
  outcomes in the worker (`ActivityMetrics`, fed by `MetricsInterceptor`);
- the Temporal SDK's own runtime metrics (`temporal_*`: task slots, poll latency, task
  failures, sticky cache). The SDK exports them only through its own Prometheus listener,
  so `install_sdk_runtime` binds that listener to a free loopback port and `MetricsPage`
  appends its page to ours: one scrape target per process, nothing extra exposed.

Each app or worker gets its own `CollectorRegistry`, so an API and a worker in one process (the
tests) keep separate pages. No label carries an identifier, a name or an owner: label values
come from fixed vocabularies (platform, kind, environment, status, route template, activity).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)
from sqlalchemy import Engine, QueuePool, bindparam, text
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from models.contracts import FindingKind
from models.enums import Platform

log = logging.getLogger("nhi.infra.metrics")

FINDING_KINDS = frozenset(k.value for k in FindingKind)
PLATFORMS = frozenset(p.value for p in Platform)

# Statuses in which the credential still works: an NHI in one of them past its expiry is
# overdue (its lifecycle missed the deadline). Quarantined and later ones are already unusable.
USABLE = ("active", "rotating", "expiring")
# Provisioning can wait days for an approval, decommission takes seconds: buckets per case.
PROVISIONING_BUCKETS = (1, 2, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 86400, 3 * 86400)
DECOMMISSION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)
# At most this many new audit events are read per refresh; the rest wait for the next one.
AUDIT_BATCH = 10_000
SDK_SCRAPE_TIMEOUT = 2.0


def new_registry() -> CollectorRegistry:
    """A registry with the process, platform and GC collectors (memory, CPU, open fds)."""
    registry = CollectorRegistry(auto_describe=True)
    process_collector.ProcessCollector(registry=registry)
    platform_collector.PlatformCollector(registry=registry)
    gc_collector.GCCollector(registry=registry)
    return registry


# ---- the Temporal SDK's runtime metrics -------------------------------------------------------
def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def install_sdk_runtime() -> str | None:
    """Make the process's default Temporal runtime export its metrics on a loopback port; the
    URL to read them from, or None when that is not possible (logged).

    Call before the first Temporal client is created: clients made earlier stay on the old
    runtime. A process that already has a default runtime (the tests' own) keeps it."""
    port = _free_loopback_port()
    try:
        runtime = Runtime(
            telemetry=TelemetryConfig(
                metrics=PrometheusConfig(
                    bind_address=f"127.0.0.1:{port}", durations_as_seconds=True
                )
            )
        )
        Runtime.set_default(runtime, error_if_already_set=True)
    except (ValueError, RuntimeError) as err:
        log.warning("Temporal SDK metrics not exported: %s", err)
        return None
    return f"http://127.0.0.1:{port}/metrics"


class MetricsPage:
    """Our metrics, then the SDK's: one Prometheus text page (names never clash: ours are
    `nhi_*`, `process_*`, `python_*`; the SDK's `temporal_*`).

    One HTTP client is kept for the SDK's loopback listener (closed by `aclose`): building one
    per scrape cost about 20 ms of CPU on the event loop, mostly its TLS context loading the CA
    bundle, which stalled every request in flight on that loop once per scrape."""

    def __init__(self, registry: CollectorRegistry, sdk_url: str | None) -> None:
        self.registry = registry
        self.sdk_url = sdk_url
        self._client: httpx.AsyncClient | None = None

    async def render(self) -> bytes:
        """The page; the SDK's part is left out (logged) when its listener does not answer."""
        page = generate_latest(self.registry)
        if self.sdk_url is None:
            return page
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=SDK_SCRAPE_TIMEOUT)
        try:
            response = await self._client.get(self.sdk_url)
            response.raise_for_status()
        except httpx.HTTPError as err:
            log.warning("Temporal SDK metrics unavailable this scrape: %s", type(err).__name__)
            return page
        sdk = response.content
        return page + (sdk if sdk.endswith(b"\n") or not sdk else sdk + b"\n")

    async def aclose(self) -> None:
        """Close the kept client (a later `render` opens another)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


# ---- API: HTTP requests -----------------------------------------------------------------------
class HttpMetrics:
    """Requests by route template (never the raw path: ids would explode the series)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "nhi_http_requests",
            "HTTP requests answered by the API, by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "nhi_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template.",
            ["method", "route"],
            registry=registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(seconds)


# ---- API and worker: the inventory's connection pool ------------------------------------------
class DatabasePoolMetrics:
    """One process's pool of inventory connections.

    `nhi_db_connections_opened_total` counts connections opened: after start-up it should
    stay flat. A steady rate means the process serves more at once than its pool keeps
    (`NHI_API_DATABASE_POOL_SIZE`, a worker's activity slots): each connection beyond the pool
    is opened for one checkout and closed on return, a Postgres backend forked and
    authenticated every time. The gauges say how many are in use and idle, against the
    pool's size."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.opened = Counter(
            "nhi_db_connections_opened",
            "Inventory database connections this process opened (flat once warm; a steady "
            "rate means its pool is smaller than the concurrency it serves).",
            registry=registry,
        )
        self.connections = Gauge(
            "nhi_db_pool_connections",
            "Inventory database connections of this process, by state (in_use, idle).",
            ["state"],
            registry=registry,
        )
        self.size = Gauge(
            "nhi_db_pool_size",
            "Inventory database connections this process's pool keeps open.",
            registry=registry,
        )

    def watch(self, engine: Engine) -> None:
        """Count `engine`'s openings and read its pool at each scrape (a later call moves the
        gauges to another engine, as an app started again makes a new one)."""
        sa_event.listen(engine, "connect", self._opened)
        pool = engine.pool
        if isinstance(pool, QueuePool):
            self.connections.labels("in_use").set_function(pool.checkedout)
            self.connections.labels("idle").set_function(pool.checkedin)
            self.size.set_function(pool.size)

    def _opened(self, _dbapi_connection: Any, _record: Any) -> None:
        self.opened.inc()


# ---- API: the inventory -----------------------------------------------------------------------
# NHIs by (platform, kind, environment, status) come from `nhi_counts` (migration 0009), signed
# deltas that triggers on `nhis` append: a count is the sum of its combination's rows, so the
# gauges cost a scan of a few hundred rows whatever the inventory's size.
COUNTS_SQL = text(
    """
    SELECT platform, kind, environment, status, sum(n) AS total
    FROM nhi_counts
    GROUP BY platform, kind, environment, status
    HAVING sum(n) <> 0
    """
)

# Fold the deltas appended since the last refresh into one row per combination, so the table
# stays as small as the number of combinations. One refresher at a time (several API replicas
# each refresh): the others skip the fold rather than wait for it. Correct even without the
# lock: a delta is deleted by exactly one fold, which re-inserts its sum in the same statement.
FOLD_LOCK = 0x6E68_6963  # "nhic": the advisory lock key of the fold
FOLD_SQL = text(
    """
    WITH gone AS (DELETE FROM nhi_counts RETURNING platform, kind, environment, status, n)
    INSERT INTO nhi_counts (platform, kind, environment, status, n)
    SELECT platform, kind, environment, status, sum(n) FROM gone
    GROUP BY platform, kind, environment, status
    HAVING sum(n) <> 0
    """
)

# Usable NHIs due within 7 days (overdue ones included): an index-only range scan of
# ix_nhis_usable_expires_at (its predicate is this WHERE's status list, verbatim), grouped by
# agent before the join so the join sees one row per agent, not per NHI. now() is the
# database's clock, the one expires_at is compared with everywhere else.
EXPIRY_SQL = text(
    """
    SELECT x.platform, x.kind, a.environment,
           sum(x.overdue) AS overdue, sum(x.within_24h) AS within_24h,
           sum(x.within_7d) AS within_7d
    FROM (
        SELECT platform, kind, agent_id,
               count(*) FILTER (WHERE expires_at <= now()) AS overdue,
               count(*) FILTER (WHERE expires_at > now()
                                AND expires_at <= now() + interval '24 hours') AS within_24h,
               count(*) FILTER (WHERE expires_at > now()) AS within_7d
        FROM nhis
        WHERE status IN ('active', 'rotating', 'expiring')
          AND expires_at <= now() + interval '7 days'
        GROUP BY platform, kind, agent_id
    ) x JOIN agents a ON a.id = x.agent_id
    GROUP BY x.platform, x.kind, a.environment
    """
)

# What the gauges were computed with before migration 0009: one pass over every NHI joined to
# its agent (0.7-1.1 s at 1,000,000 NHIs). Kept for bench/metrics_scrape.py, which times both
# in the same run, and for the test that checks the counts against it.
DIRECT_INVENTORY_SQL = text(
    """
    SELECT n.platform, n.kind, a.environment, n.status,
           count(*) AS total,
           count(*) FILTER (WHERE n.status IN :usable AND n.expires_at <= now()) AS overdue,
           count(*) FILTER (WHERE n.status IN :usable AND n.expires_at > now()
                            AND n.expires_at <= now() + interval '24 hours') AS within_24h,
           count(*) FILTER (WHERE n.status IN :usable AND n.expires_at > now()
                            AND n.expires_at <= now() + interval '7 days') AS within_7d
    FROM nhis n JOIN agents a ON a.id = n.agent_id
    GROUP BY n.platform, n.kind, a.environment, n.status
    """
).bindparams(bindparam("usable", value=list(USABLE), expanding=True))

# Small indexed look-ups in one round trip: open prompts (ix_prompts_status_created_at),
# the oldest revoke_failed (few rows; audit events by subject), and the audit head.
SCALARS_SQL = text(
    """
    SELECT
      (SELECT count(*) FROM prompts WHERE status = 'open') AS open_prompts,
      (SELECT extract(epoch FROM now() - min(e.created_at))
         FROM nhis n
         JOIN audit_events e ON e.subject_type = 'nhi' AND e.subject_id = n.id::text
                             AND e.event = 'nhi.revoke_failed'
        WHERE n.status = 'revoke_failed') AS oldest_revoke_failed,
      (SELECT max(id) FROM audit_events) AS audit_head
    """
)

# New NHI audit events since the last refresh (by primary key), with the NHI's request time
# and expiry: each activation is one provisioning latency (request -> active), each
# quarantine at or after the expiry one decommission latency (due -> unusable).
# A sample, not a ledger: an event whose transaction commits after a higher id was already
# read is skipped (concurrent writers), which moves no quantile.
EVENTS_SQL = text(
    """
    SELECT e.id, e.event, n.platform, n.kind,
           extract(epoch FROM e.created_at - n.created_at) AS since_request,
           extract(epoch FROM e.created_at - n.expires_at) AS since_expiry
    FROM audit_events e JOIN nhis n ON n.id = CAST(e.subject_id AS uuid)
    WHERE e.id > :after AND e.subject_type = 'nhi'
    ORDER BY e.id
    LIMIT :batch
    """
)

# The latest finished, real (not dry-run) sweep of each provider in each outcome.
SWEEPS_SQL = text(
    """
    SELECT DISTINCT ON (provider, status)
           provider, status, extract(epoch FROM finished_at) AS finished, summary
    FROM sweeps
    WHERE NOT dry_run AND finished_at IS NOT NULL AND status IN ('completed', 'failed')
    ORDER BY provider, status, finished_at DESC
    """
)


@dataclass
class InventorySnapshot:
    """What one refresh read (kept so tests and logs can see it)."""

    nhis: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    seconds: float = 0.0
    new_events: int = 0


class InventoryMetrics:
    """Inventory gauges and the latency histograms fed from new audit events."""

    def __init__(self, registry: CollectorRegistry, sweep_interval_seconds: int) -> None:
        where = ["platform", "kind", "environment"]
        self.nhis = Gauge(
            "nhi_nhis",
            "NHIs in the inventory by platform, kind, environment and status.",
            [*where, "status"],
            registry=registry,
        )
        self.overdue = Gauge(
            "nhi_overdue",
            "Usable NHIs (active, rotating, expiring) past their expiry: a missed deadline.",
            where,
            registry=registry,
        )
        self.expiring = Gauge(
            "nhi_expiring",
            "Usable NHIs expiring within the window (24h, 7d; the 7d count includes the 24h).",
            [*where, "within"],
            registry=registry,
        )
        self.pending_approvals = Gauge(
            "nhi_pending_approvals",
            "NHI requests waiting for an approver's decision.",
            registry=registry,
        )
        self.open_prompts = Gauge(
            "nhi_open_prompts",
            "Renewal reminders and escalations sent and not answered yet.",
            registry=registry,
        )
        self.oldest_revoke_failed = Gauge(
            "nhi_revoke_failed_oldest_age_seconds",
            "Age of the oldest revoke_failed NHI since its removal first failed (0: none).",
            registry=registry,
        )
        self.provisioning = Histogram(
            "nhi_provisioning_latency_seconds",
            "From request to active (approval waits included), per NHI activated.",
            ["platform", "kind"],
            buckets=PROVISIONING_BUCKETS,
            registry=registry,
        )
        self.decommission = Histogram(
            "nhi_decommission_latency_seconds",
            "From expiry to unusable (quarantined), per NHI that expired.",
            ["platform", "kind"],
            buckets=DECOMMISSION_BUCKETS,
            registry=registry,
        )
        self.events = Counter(
            "nhi_lifecycle_events",
            "NHI audit events recorded since this process started, by event.",
            ["event"],
            registry=registry,
        )
        self.sweep_success = Gauge(
            "nhi_sweep_last_success_timestamp_seconds",
            "When the latest completed (not dry-run) sweep of the provider finished.",
            ["provider"],
            registry=registry,
        )
        self.sweep_failure = Gauge(
            "nhi_sweep_last_failure_timestamp_seconds",
            "When the latest failed sweep of the provider finished.",
            ["provider"],
            registry=registry,
        )
        self.sweep_findings = Gauge(
            "nhi_sweep_findings",
            "Findings of the latest completed sweep of the provider, by kind.",
            ["provider", "kind"],
            registry=registry,
        )
        self.sweep_interval = Gauge(
            "nhi_sweep_interval_seconds",
            "NHI_SWEEP_INTERVAL_SECONDS: how often each provider is swept.",
            registry=registry,
        )
        self.sweep_interval.set(sweep_interval_seconds)
        self.pollers = Gauge(
            "nhi_task_queue_pollers",
            "Workers seen polling the task queue recently, by task type (workflow, activity).",
            ["type"],
            registry=registry,
        )
        self.dependency_up = Gauge(
            "nhi_dependency_up",
            "Whether the last refresh reached the dependency (database, temporal).",
            ["dependency"],
            registry=registry,
        )
        self.refreshed_at = Gauge(
            "nhi_inventory_refresh_timestamp_seconds",
            "When the inventory gauges were last computed successfully.",
            registry=registry,
        )
        self.refresh_seconds = Gauge(
            "nhi_inventory_refresh_duration_seconds",
            "How long the last inventory query took.",
            registry=registry,
        )
        self.refresh_errors = Counter(
            "nhi_inventory_refresh_errors",
            "Inventory refreshes that failed (the gauges keep their last values).",
            registry=registry,
        )
        self._after: int | None = None  # audit cursor; None until the first refresh
        self._series = _Series()

    def refresh(self, session: Session) -> InventorySnapshot:
        """Recompute every gauge from the inventory (one transaction; it writes only the fold
        of `nhi_counts`)."""
        started = time.perf_counter()
        snap = InventorySnapshot()
        # A refresh that cannot finish must not hold a connection for long: the next one retries.
        session.execute(text("SET LOCAL statement_timeout = '10s'"))
        serial_plans(session)
        self._inventory(session, snap)
        self._scalars(session)
        snap.new_events = self._events(session)
        self._sweeps(session)
        snap.seconds = time.perf_counter() - started
        self.refresh_seconds.set(snap.seconds)
        self.refreshed_at.set(time.time())
        return snap

    def _inventory(self, session: Session, snap: InventorySnapshot) -> None:
        fold_counts(session)
        snap.nhis.update(read_counts(session))
        # Every combination present gets its overdue and expiring series, zero included.
        overdue: dict[tuple[str, str, str], int] = {k[:3]: 0 for k in snap.nhis}
        within: dict[tuple[str, str, str, str], int] = {}
        for key in overdue:
            within[(*key, "24h")] = within[(*key, "7d")] = 0
        for platform, kind, env, late, day, week in session.execute(EXPIRY_SQL).all():
            key = (platform, kind, env)
            overdue[key] = overdue.get(key, 0) + int(late)
            within[(*key, "24h")] = within.get((*key, "24h"), 0) + int(day)
            within[(*key, "7d")] = within.get((*key, "7d"), 0) + int(week)
        pending = sum(n for k, n in snap.nhis.items() if k[3] == "pending_approval")
        # A combination that emptied disappears instead of keeping a stale count.
        self._series.replace(self.nhis, snap.nhis.items())
        self._series.replace(self.overdue, overdue.items())
        self._series.replace(self.expiring, within.items())
        self.pending_approvals.set(pending)

    def _scalars(self, session: Session) -> None:
        prompts, oldest, head = session.execute(SCALARS_SQL).one()
        self.open_prompts.set(int(prompts or 0))
        self.oldest_revoke_failed.set(float(oldest or 0))
        if self._after is None:
            # Counting starts now: history before this process is not replayed into counters.
            self._after = int(head or 0)

    def _events(self, session: Session) -> int:
        assert self._after is not None
        rows = session.execute(EVENTS_SQL, {"after": self._after, "batch": AUDIT_BATCH}).all()
        for _id, event, platform, kind, since_request, since_expiry in rows:
            self.events.labels(event).inc()
            if event == "nhi.activated" and since_request is not None:
                self.provisioning.labels(platform, kind).observe(max(0.0, float(since_request)))
            elif event == "nhi.quarantined" and since_expiry is not None and since_expiry >= 0:
                self.decommission.labels(platform, kind).observe(float(since_expiry))
        if rows:
            self._after = int(rows[-1][0])
        return len(rows)

    def _sweeps(self, session: Session) -> None:
        findings: dict[tuple[str, str], int] = {}
        for provider, status, finished, summary in session.execute(SWEEPS_SQL).all():
            if status == "failed":
                self.sweep_failure.labels(provider).set(float(finished))
                continue
            self.sweep_success.labels(provider).set(float(finished))
            for kind, count in _finding_counts(summary):
                findings[(provider, kind)] = count
        self._series.replace(self.sweep_findings, findings.items())

    def set_pollers(self, counts: Mapping[str, int]) -> None:
        """Record how many workers poll each task type (from DescribeTaskQueue)."""
        for kind, count in counts.items():
            self.pollers.labels(kind).set(count)


def serial_plans(session: Session) -> None:
    """No parallel workers for the rest of the transaction: the gauges' queries read a few
    thousand index entries, and starting workers cost more than that (measured at 1,000,000
    NHIs: ~15 ms of a 25 ms expiry query was Gather start-up; bench/metrics_scrape.py)."""
    session.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))


def fold_counts(session: Session) -> bool:
    """Fold `nhi_counts`' deltas into one row per combination, unless another session is
    folding right now (then its fold serves both). Whether this session folded."""
    locked = session.execute(
        text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": FOLD_LOCK}
    ).scalar_one()
    if locked:
        session.execute(FOLD_SQL)
    return bool(locked)


def read_counts(session: Session) -> dict[tuple[str, str, str, str], int]:
    """NHIs by (platform, kind, environment, status), from `nhi_counts`."""
    return {
        (platform, kind, env, status): int(total)
        for platform, kind, env, status, total in session.execute(COUNTS_SQL).all()
    }


def _finding_counts(summary: Any) -> Iterable[tuple[str, int]]:
    # A sweep's summary also holds `truncated` and `dry_run`: only finding kinds are counts.
    if not isinstance(summary, dict):
        return []
    return [(k, int(v)) for k, v in summary.items() if k in FINDING_KINDS and isinstance(v, int)]


class _Series:
    """The label sets a gauge was last given, so a refresh can drop the ones that emptied
    without clearing the gauge first (a scrape in between would see nothing)."""

    def __init__(self) -> None:
        self._seen: dict[int, set[tuple[str, ...]]] = {}

    def replace(self, gauge: Gauge, values: Iterable[tuple[tuple[str, ...], int]]) -> None:
        fresh: set[tuple[str, ...]] = set()
        for labels, value in values:
            gauge.labels(*labels).set(value)
            fresh.add(labels)
        for labels in self._seen.get(id(gauge), set()) - fresh:
            gauge.remove(*labels)
        self._seen[id(gauge)] = fresh


# ---- worker: activity outcomes ----------------------------------------------------------------
# `remove_identity` for runs recorded before the patch `identity-ref-activities`.
REMOVAL_ACTIVITIES = frozenset({"remove_identity", "delete_identity"})
SLACK_ACTIVITIES = frozenset(
    {"post_prompt", "send_alert", "deliver_prompt", "update_messages", "alert"}
)


def outcome_of(err: BaseException | None) -> str:
    """`ok`; `retried` (Temporal will try again); `failed` (non-retryable); `cancelled`."""
    if err is None:
        return "ok"
    if isinstance(err, CancelledError):
        return "cancelled"
    if isinstance(err, ApplicationError) and err.non_retryable:
        return "failed"
    return "retried"


class ActivityMetrics:
    """Activity outcomes in the worker, and what they mean for NHIs."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.activities = Counter(
            "nhi_activity",
            "Activity executions by activity type and outcome (ok, retried, failed, cancelled).",
            ["activity", "outcome"],
            registry=registry,
        )
        self.removals = Counter(
            "nhi_removals",
            "Identity removals (decommission and orphan deletion) by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.slack = Counter(
            "nhi_slack_sends",
            "Slack sends (prompts, alerts, message updates) by activity and outcome.",
            ["activity", "outcome"],
            registry=registry,
        )
        self.reminders = Counter(
            "nhi_reminders_sent",
            "Renewal prompts opened (one per NHI, term and offset), by kind.",
            ["kind"],
            registry=registry,
        )
        self.sweep_findings = Counter(
            "nhi_sweep_findings_reported",
            "Findings of the sweeps this worker recorded, by kind.",
            ["kind"],
            registry=registry,
        )
        self.task_reaped = Counter(
            "nhi_task_credentials_reaped",
            "Task credentials the reaper handled, by platform and outcome (ended; reap_failed: "
            "its login role could not be dropped this run, counted again each run it stays).",
            ["platform", "outcome"],
            registry=registry,
        )

    def record(
        self, activity_type: str, args: list[Any], result: Any, err: BaseException | None
    ) -> None:
        """Count one finished activity attempt."""
        outcome = outcome_of(err)
        self.activities.labels(activity_type, outcome).inc()
        if activity_type in REMOVAL_ACTIVITIES:
            self.removals.labels(outcome).inc()
        elif activity_type in SLACK_ACTIVITIES:
            self.slack.labels(activity_type, outcome).inc()
        if err is not None:
            return
        if activity_type == "open_prompt":
            kind = getattr(result, "kind", None)
            self.reminders.labels(str(getattr(kind, "value", kind) or "reminder")).inc()
        elif activity_type == "record_sweep" and args:
            summary = getattr(args[0], "summary", None)
            for kind, count in _finding_counts(summary):
                if count:
                    self.sweep_findings.labels(kind).inc(count)
        elif activity_type == "remove_orphans":
            # A sweep's batch: each orphan removed counts as one removal; one that failed is
            # handed to its removal workflow, whose `remove_identity` attempts count it.
            for orphan in getattr(result, "outcomes", None) or []:
                if getattr(orphan, "status", None) == "removed":
                    self.removals.labels("ok").inc()
        elif activity_type == "reap_task_credentials":
            for outcome in ("ended", "reap_failed"):
                counts = getattr(result, outcome, None)
                for platform, count in counts.items() if isinstance(counts, dict) else []:
                    if platform in PLATFORMS and isinstance(count, int) and count:
                        self.task_reaped.labels(platform, outcome).inc(count)


class MetricsInterceptor(Interceptor):
    """Counts every activity attempt's outcome (a worker interceptor: no workflow code
    changes, so no effect on histories or replay)."""

    def __init__(self, metrics: ActivityMetrics) -> None:
        self.metrics = metrics

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityCounter(next, self.metrics)


class _ActivityCounter(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, metrics: ActivityMetrics) -> None:
        super().__init__(next)
        self._metrics = metrics

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        activity_type = activity.info().activity_type
        try:
            result = await self.next.execute_activity(input)
        except BaseException as err:
            self._safely(activity_type, list(input.args), None, err)
            raise
        self._safely(activity_type, list(input.args), result, None)
        return result

    def _safely(
        self, activity_type: str, args: list[Any], result: Any, err: BaseException | None
    ) -> None:
        # A metrics bug must never change an activity's outcome.
        try:
            self._metrics.record(activity_type, args, result, err)
        except Exception:
            log.exception("could not count activity %s", activity_type)
