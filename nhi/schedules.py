"""Temporal Schedules for sweeps and the task reaper: created or updated idempotently (`nhi
schedules apply`, and at every worker start), overlap SKIP, a bounded catch-up window."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from activities.activity_import import ActivityImportInput
from activities.reaper import ReaperInput
from models.contracts import SweepInput
from nhi.infra.config import Settings
from nhi.rules.ids import (
    activity_import_schedule_id,
    activity_import_workflow_id,
    sweep_schedule_id,
    sweep_workflow_id,
    task_reaper_schedule_id,
    task_reaper_workflow_id,
)
from workflows.activity_import import ActivityImportWorkflow
from workflows.reaper import TaskReaperWorkflow
from workflows.sweep import SweepWorkflow

PROVIDERS = ("aws", "postgres", "github")


def swept_providers(settings: Settings | None) -> tuple[str, ...]:
    """Providers with a sweep schedule: Vault's only where `NHI_VAULT_ADDR` is set (a worker
    without it builds no Vault provider, so its sweeps would fail with `NoProvider`)."""
    return (*PROVIDERS, "vault") if settings is not None and settings.vault_addr else PROVIDERS


# What `nhi schedules pause|resume|trigger` accepts besides a provider's name.
TASK_REAPER = "task-reaper"
ACTIVITY_IMPORT = "activity-import"


def schedule_id_of(name: str) -> str:
    """The schedule a CLI name means: a provider's sweep, `task-reaper` or `activity-import`."""
    if name == ACTIVITY_IMPORT:
        return activity_import_schedule_id()
    return task_reaper_schedule_id() if name == TASK_REAPER else sweep_schedule_id(name)


def schedule_ids(settings: Settings | None = None) -> list[str]:
    """Every schedule this service keeps (the activity import's only when configured)."""
    ids = [*(sweep_schedule_id(p) for p in swept_providers(settings)), task_reaper_schedule_id()]
    if settings is not None and settings.activity_s3_prefix:
        ids.append(activity_import_schedule_id())
    return ids


def sweep_schedule(settings: Settings, provider: str) -> Schedule:
    """The schedule as configuration says it should be."""
    return Schedule(
        action=ScheduleActionStartWorkflow(
            SweepWorkflow.run,
            SweepInput(provider=provider, triggered_by="system:schedule"),
            id=sweep_workflow_id(provider),
            task_queue=settings.temporal_task_queue,
        ),
        spec=ScheduleSpec(
            intervals=[
                ScheduleIntervalSpec(every=timedelta(seconds=settings.sweep_interval_seconds))
            ],
            jitter=timedelta(seconds=min(300, settings.sweep_interval_seconds // 10)),
        ),
        # A sweep still running when the next is due is not doubled; a worker outage catches
        # up with one run, not a burst.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=timedelta(days=1)),
    )


def task_reaper_schedule(settings: Settings) -> Schedule:
    """The task reaper's schedule: frequent, no jitter (expired task roles should go within
    one interval), and a missed fire is not caught up: the next run reaps everything due."""
    every = timedelta(seconds=settings.task_reaper_interval_seconds)
    return Schedule(
        action=ScheduleActionStartWorkflow(
            TaskReaperWorkflow.run,
            ReaperInput(),
            id=task_reaper_workflow_id(),
            task_queue=settings.temporal_task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        # Temporal refuses a catch-up window under 10 s.
        policy=SchedulePolicy(
            overlap=ScheduleOverlapPolicy.SKIP, catchup_window=max(every, timedelta(minutes=1))
        ),
    )


def activity_import_schedule(settings: Settings) -> Schedule:
    """The scheduled import of `NHI_ACTIVITY_S3_PREFIX` after its cursor: overlap SKIP (a long
    import is not doubled), and a missed fire is not caught up (the next run reads on from
    the cursor anyway)."""
    every = timedelta(seconds=settings.activity_import_interval_seconds)
    return Schedule(
        action=ScheduleActionStartWorkflow(
            ActivityImportWorkflow.run,
            ActivityImportInput(scheduled=True),
            id=activity_import_workflow_id(),
            task_queue=settings.temporal_task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=every),
    )


async def apply_schedules(client: Client, settings: Settings) -> list[str]:
    """Create missing schedules and bring existing ones up to date (keeping pause state)."""
    wanted = {sweep_schedule_id(p): sweep_schedule(settings, p) for p in swept_providers(settings)}
    wanted[task_reaper_schedule_id()] = task_reaper_schedule(settings)
    if settings.activity_s3_prefix:
        wanted[activity_import_schedule_id()] = activity_import_schedule(settings)
    return [await _apply(client, schedule_id, schedule) for schedule_id, schedule in wanted.items()]


async def _apply(client: Client, schedule_id: str, wanted: Schedule) -> str:
    try:
        await client.create_schedule(schedule_id, wanted)
        return f"{schedule_id} created"
    except ScheduleAlreadyRunningError:

        def keep_state(current: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(
                schedule=replace(wanted, state=current.description.schedule.state)
            )

        await client.get_schedule_handle(schedule_id).update(keep_state)
        return f"{schedule_id} updated"
