"""Temporal Schedules for sweeps: created or updated idempotently (`nhi schedules apply`, and at
every worker start), overlap SKIP, a bounded catch-up window."""

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

from models.contracts import SweepInput
from nhi.infra.config import Settings
from nhi.rules.ids import sweep_schedule_id, sweep_workflow_id
from workflows.sweep import SweepWorkflow

PROVIDERS = ("aws", "postgres")


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


async def apply_schedules(client: Client, settings: Settings) -> list[str]:
    """Create missing schedules and bring existing ones up to date (keeping pause state)."""
    applied: list[str] = []
    for provider in PROVIDERS:
        wanted = sweep_schedule(settings, provider)
        try:
            await client.create_schedule(sweep_schedule_id(provider), wanted)
            applied.append(f"{sweep_schedule_id(provider)} created")
        except ScheduleAlreadyRunningError:

            def keep_state(
                current: ScheduleUpdateInput, wanted: Schedule = wanted
            ) -> ScheduleUpdate:
                return ScheduleUpdate(
                    schedule=replace(wanted, state=current.description.schedule.state)
                )

            await client.get_schedule_handle(sweep_schedule_id(provider)).update(keep_state)
            applied.append(f"{sweep_schedule_id(provider)} updated")
    return applied
