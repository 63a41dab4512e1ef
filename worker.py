"""The worker: builds activity instances with their dependencies and polls the task queue.

Run alone against configured services with `python worker.py` (settings from `NHI_*`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client
from temporalio.worker import Worker

from activities.aws import AwsActivities
from activities.db import DbActivities
from nhi.aws import AwsClients, make_aws_clients
from nhi.config import Settings, get_settings
from nhi.db import make_engine, make_sessionmaker
from nhi.logging import configure
from nhi.temporal import connect
from workflows.provision import ProvisionNhiWorkflow

log = logging.getLogger("nhi.worker")

WORKFLOWS = [ProvisionNhiWorkflow]


def build_worker(
    client: Client,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    *,
    task_queue: str | None = None,
) -> Worker:
    """A worker with every workflow and activity registered; sync activities run on threads."""
    db = DbActivities(sessions, settings)
    cloud = AwsActivities(aws)
    return Worker(
        client,
        task_queue=task_queue or settings.temporal_task_queue,
        workflows=WORKFLOWS,
        activities=[
            db.begin_provisioning,
            db.record_active,
            db.mark_failed,
            cloud.ensure_role,
            cloud.ensure_user,
            cloud.issue_access_key,
            cloud.remove_identity,
        ],
        activity_executor=ThreadPoolExecutor(
            max_workers=settings.worker_max_concurrent_activities, thread_name_prefix="activity"
        ),
        max_concurrent_activities=settings.worker_max_concurrent_activities,
        max_cached_workflows=settings.worker_max_cached_workflows,
    )


async def run(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then finish in-flight activities and stop."""
    engine = make_engine(
        settings.require_database_url(), pool_size=settings.worker_max_concurrent_activities
    )
    client = await connect(settings)
    worker = build_worker(client, settings, make_sessionmaker(engine), make_aws_clients(settings))
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
        await stop.wait()
    engine.dispose()
    log.info("worker stopped")


def main() -> None:
    """Entry point for `python worker.py`."""
    settings = get_settings()
    configure(settings.log_level)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
