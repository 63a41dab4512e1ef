"""The worker: builds activity instances with their dependencies and polls the task queue.

Run alone against configured services with `python worker.py` (settings from `NHI_*`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from slack_sdk import WebClient
from sqlalchemy.orm import Session, sessionmaker
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import Worker

from activities.activity_import import ActivityImportActivities
from activities.contain import ContainActivities
from activities.db import DbActivities
from activities.provider import ProviderActivities
from activities.providers.registry import build_providers
from activities.reaper import ReaperActivities
from activities.slack import SlackActivities
from activities.sweep import SupervisionActivities, SweepActivities
from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import Settings, get_settings
from nhi.infra.db import make_engine, make_sessionmaker
from nhi.infra.logging import configure
from nhi.infra.metrics import (
    ActivityMetrics,
    DatabasePoolMetrics,
    MetricsInterceptor,
    install_sdk_runtime,
    new_registry,
)
from nhi.infra.slack_client import make_slack_client
from nhi.infra.task_alerts import install_task_failure_alerts
from nhi.infra.temporal_client import connect
from nhi.infra.tracing import setup_tracing, shutdown_tracing
from nhi.infra.worker_http import WorkerHttp
from nhi.schedules import apply_schedules
from nhi.services.target_registry import TargetRegistry
from workflows.activity_import import ActivityImportWorkflow
from workflows.bundle import BundleWorkflow
from workflows.contain import ContainAgentWorkflow
from workflows.lifecycle import NhiLifecycleWorkflow
from workflows.provision import ProvisionNhiWorkflow
from workflows.reaper import TaskReaperWorkflow
from workflows.sweep import OrphanRemovalWorkflow, SweepWorkflow

log = logging.getLogger("nhi.worker")

WORKFLOWS = [
    ProvisionNhiWorkflow,
    NhiLifecycleWorkflow,
    SweepWorkflow,
    OrphanRemovalWorkflow,
    TaskReaperWorkflow,
    BundleWorkflow,
    ContainAgentWorkflow,
    ActivityImportWorkflow,
]

# The inventory steps run as local activities (issue 15), on the same executor as activities:
# they have slots and threads of their own, so they never wait behind platform calls (a waiting
# local activity holds its workflow task open, and its timeout runs meanwhile).
LOCAL_ACTIVITY_SLOTS = 16

ActivityMethod = Callable[..., object]
"""A bound `@activity.defn` method: the SDK reads its name and signature, we only pass it on."""


def activities_of(
    db: DbActivities,
    platforms: ProviderActivities,
    people: SlackActivities,
    sweeps: SweepActivities,
    supervision: SupervisionActivities,
    reaper: ReaperActivities,
    contain: ContainActivities,
    imports: ActivityImportActivities,
) -> list[ActivityMethod]:
    """Every activity the workflows call, bound to its dependencies.

    Listed by hand because the SDK offers no public "is this an activity" check;
    tests/test_replay.py compares this list with every `@activity.defn` in `activities/`, so
    a new activity cannot be forgotten and a removed one cannot linger. Activity names are
    history: the legacy provisioning names (`ensure_role`, `ensure_user`, `issue_access_key`)
    stay registered for the runs recorded before the provider interface."""
    return [
        # Inventory: every status change and its audit event.
        db.begin_provisioning,
        db.record_approval,
        db.record_active,
        db.mark_failed,
        db.load_lifecycle,
        db.change_status,
        db.note,
        db.open_prompt,
        db.record_delivery,
        db.decide_prompts,
        # Platforms, through the provider interface.
        platforms.create_identity,
        platforms.deliver_credential,
        platforms.ensure_role,
        platforms.ensure_user,
        platforms.issue_access_key,
        platforms.update_expiry,
        platforms.stage_new_key,
        platforms.verify_pending,
        platforms.promote_pending,
        platforms.deactivate_key,
        platforms.delete_key,
        platforms.quarantine,
        platforms.verify_quarantine,
        platforms.lift_quarantine,
        platforms.remove_identity,
        # The same on an IdentityRef (patch `identity-ref-activities`).
        platforms.quarantine_identity,
        platforms.verify_identity_quarantined,
        platforms.lift_identity_quarantine,
        platforms.delete_identity,
        # People.
        people.post_prompt,
        people.post_approval,
        people.send_alert,
        people.deliver_prompt,
        people.update_messages,
        people.alert,
        # Sweeps.
        sweeps.plan_sweep,
        sweeps.quarantine_orphan,
        sweeps.remove_orphans,
        sweeps.note_orphan,
        sweeps.mark_missing,
        sweeps.clean_preactive,
        sweeps.revert_drift,
        sweeps.record_sweep,
        supervision.find_unsupervised,
        supervision.find_preactive,
        supervision.redrive_provisioning,
        supervision.nudge_lifecycle,
        # Task credentials: the reaper.
        reaper.reap_task_credentials,
        # Containment of an agent (issue 17).
        contain.plan_containment,
        contain.hold_lifecycle,
        contain.end_task_credentials,
        contain.prove_dead,
        contain.record_pass,
        # Activity monitoring (issue 17).
        imports.import_activity,
    ]


def build_worker(
    client: Client,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    *,
    slack: WebClient | None = None,
    task_queue: str | None = None,
    metrics: ActivityMetrics | None = None,
) -> Worker:
    """A worker with every workflow and activity registered; sync activities run on threads.
    Activity outcomes are counted into `metrics` (a private registry when not given). With
    `worker_fail_on_nondeterminism` (every test worker) a run whose history no longer replays
    fails at once instead of retrying its workflow task forever."""
    targets = TargetRegistry(sessions, settings, aws.secrets)
    providers = build_providers(settings, aws, targets)
    db = DbActivities(sessions, settings)
    platforms = ProviderActivities(providers)
    people = SlackActivities(slack, settings.slack_security_channel)
    sweeps = SweepActivities(sessions, providers, settings)
    supervision = SupervisionActivities(sessions, settings)
    reaper = ReaperActivities(sessions, targets)
    contain = ContainActivities(sessions, settings, aws, targets)
    imports = ActivityImportActivities(sessions, settings, targets=targets)
    return Worker(
        client,
        task_queue=task_queue or settings.temporal_task_queue,
        workflows=WORKFLOWS,
        activities=activities_of(
            db, platforms, people, sweeps, supervision, reaper, contain, imports
        ),
        activity_executor=ThreadPoolExecutor(
            max_workers=settings.worker_max_concurrent_activities + LOCAL_ACTIVITY_SLOTS,
            thread_name_prefix="activity",
        ),
        max_concurrent_activities=settings.worker_max_concurrent_activities,
        max_concurrent_local_activities=LOCAL_ACTIVITY_SLOTS,
        max_cached_workflows=settings.worker_max_cached_workflows,
        interceptors=[MetricsInterceptor(metrics or ActivityMetrics(new_registry()))],
        workflow_failure_exception_types=(
            [workflow.NondeterminismError] if settings.worker_fail_on_nondeterminism else []
        ),
    )


async def run(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then finish in-flight activities and stop."""
    engine = make_engine(
        settings.require_database_url(), pool_size=settings.worker_max_concurrent_activities
    )
    # The SDK's metrics need the runtime set before the client exists; they are served on
    # /metrics of the worker's HTTP server, so only when that server is on.
    sdk_url = install_sdk_runtime() if settings.worker_http_port else None
    # Before connecting: the client (and so this worker) gets the tracing interceptor only
    # when a tracer provider exists (NHI_OTEL_EXPORTER_OTLP_ENDPOINT set).
    setup_tracing(settings, "nhi-worker")
    client = await connect(settings)
    sessions = make_sessionmaker(engine)
    registry = new_registry()
    DatabasePoolMetrics(registry).watch(engine)
    slack = make_slack_client(settings)
    worker = build_worker(
        client,
        settings,
        sessions,
        make_aws_clients(settings),
        slack=slack,
        metrics=ActivityMetrics(registry),
    )
    http = WorkerHttp(settings, worker, client, sessions, registry, sdk_url)
    # A workflow task that fails leaves its run stuck retrying: tell the security channel.
    install_task_failure_alerts(slack, settings.slack_security_channel)
    try:
        for line in await apply_schedules(client, settings):
            log.info("schedule %s", line)
    except Exception:  # the worker's own job is more important than the schedule's upkeep
        log.exception("could not apply the sweep schedules; `nhi schedules apply` will")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "worker polling %s on %s (namespace %s)",
        settings.temporal_task_queue,
        settings.temporal_address,
        settings.temporal_namespace,
    )
    async with worker:
        await http.start()
        await stop.wait()
        await http.close()
    engine.dispose()
    shutdown_tracing()  # export the spans still batched
    log.info("worker stopped")


def main() -> None:
    """Entry point for `python worker.py`."""
    settings = get_settings()
    configure(settings.log_level, settings.log_format)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
