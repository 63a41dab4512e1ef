"""The activity import (issue 17): CloudTrail and Postgres log files from a local path or an
S3 prefix into the inventory, one transaction per file (nhi/services/activity.py), then
auto-containment of agents with a finding at or above `NHI_AUTO_CONTAIN_SEVERITY`.

The scheduled import (`nhi-activity-import`, every `NHI_ACTIVITY_IMPORT_INTERVAL_SECONDS`)
reads `NHI_ACTIVITY_S3_PREFIX` after its cursor, the last key imported, which moves in the
same transaction as each file's events: a crash never skips a file nor imports one twice
(and a re-import would add nothing anyway). A local path is read by the worker, so it must be
visible to the worker's machine (`nhi dev`, a mounted volume).

Only counts, identity names and finding summaries leave the activity; a log line can hold
anything (a statement's literals), so events themselves never enter workflow history.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, closing, nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from pydantic import Field
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError

from activities._support import aws_code, aws_message
from activities.providers import postgres_ddl as ddl
from models.contracts import ContainAgentInput, Contract
from models.enums import Severity
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.rules.ids import CONTAIN_WORKFLOW, containment_workflow_id
from nhi.services import activity as imports
from nhi.services import findings
from nhi.services.target_registry import TargetResolver, UnknownTarget
from nhi.services.transitions import note

log = logging.getLogger(__name__)

ACTOR = "system:activity"
LOG_SUFFIXES = (".json.gz", ".json", ".csv", ".csv.gz", ".log.gz")
MAX_FILES_LISTED = 100  # files named in an outcome (workflow history); the rest are counted
MAX_ALERTS = 50  # alerts per run; findings beyond it are in `GET /v1/findings`
HEARTBEAT_SECONDS = 5.0
PERMANENT_S3_ERRORS = frozenset(
    {"NoSuchBucket", "NoSuchKey", "AccessDenied", "InvalidBucketName", "AllAccessDisabled"}
)


# ---- payloads ---------------------------------------------------------------------------------


class ActivityImportInput(Contract):
    """What to import: `s3://bucket/prefix` or a path the worker can read; `scheduled` reads
    `NHI_ACTIVITY_S3_PREFIX` after its cursor instead."""

    location: str = Field(default="", max_length=2048)
    triggered_by: str = Field(default="system:schedule", max_length=254)
    scheduled: bool = False
    max_files: int = Field(default=1000, ge=1, le=100_000)
    # Also take one sample of `pg_stat_activity` on every registered Postgres target (what a
    # Postgres sweep asks for): live sessions become events like log lines do.
    sample_postgres: bool = False


class ImportedFile(Contract):
    """One file's result."""

    name: str
    events: int = 0
    new: int = 0
    duplicates: int = 0
    unmatched: int = 0
    findings: int = 0
    error: str | None = None
    unmatched_identities: dict[str, int] = {}


class FindingAlert(Contract):
    """A finding to tell the agent's owner and the security channel about."""

    finding_id: uuid.UUID
    agent_id: uuid.UUID
    agent_name: str
    owner_email: str
    nhi_name: str
    kind: str
    severity: str
    summary: str


class ImportOutcome(Contract):
    """A run's totals, its first files, the alerts to send and the containments started."""

    files: list[ImportedFile] = []
    file_count: int = 0
    failed_files: int = 0
    events: int = 0
    new: int = 0
    duplicates: int = 0
    unmatched: int = 0
    findings: int = 0
    alerts: list[FindingAlert] = []
    contained: list[uuid.UUID] = []
    more: bool = False  # files were left for the next run (`max_files`)


# ---- sources ----------------------------------------------------------------------------------

Opener = tuple[str, "AbstractContextManager[IO[bytes]]"]


def split_s3(location: str) -> tuple[str, str]:
    """`s3://bucket/prefix` as (bucket, prefix)."""
    rest = location.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ApplicationError(f"{location!r}: expected s3://bucket/prefix", non_retryable=True)
    return bucket, prefix


def local_files(location: str) -> list[Path]:
    """A file, or the log files under a directory in name order."""
    path = Path(location)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(LOG_SUFFIXES))
    raise ApplicationError(
        f"{location!r}: no such file or directory on the worker", non_retryable=True
    )


class ActivityImportActivities:
    """Imports log files into the inventory and starts auto-containment."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        s3: Any | None = None,
        targets: TargetResolver | None = None,
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._s3 = s3
        self._targets = targets

    def _s3_client(self) -> Any:
        if self._s3 is None:
            self._s3 = boto3.client(
                "s3",
                region_name=self._settings.aws_region,
                endpoint_url=self._settings.aws_endpoint_url,
                config=Config(retries={"mode": "standard", "total_max_attempts": 5}),
            )
        return self._s3

    def _s3_objects(self, location: str, after: str | None) -> Iterator[str]:
        bucket, prefix = split_s3(location)
        pages = self._s3_client().get_paginator("list_objects_v2")
        args: dict[str, str] = {"Bucket": bucket, "Prefix": prefix}
        if after:
            args["StartAfter"] = after
        for page in pages.paginate(**args):
            for obj in page.get("Contents", []):
                if str(obj["Key"]).endswith(LOG_SUFFIXES):
                    yield str(obj["Key"])

    def _open_s3(self, bucket: str, key: str) -> AbstractContextManager[IO[bytes]]:
        body = self._s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        return closing(body)

    def import_location(self, inp: ActivityImportInput) -> tuple[ImportOutcome, list[uuid.UUID]]:
        """Import every log file at the location (at most `max_files`), a transaction each;
        the outcome and the ids of the findings made."""
        location = self._settings.activity_s3_prefix if inp.scheduled else inp.location
        now = datetime.now(UTC)
        window = timedelta(seconds=self._settings.finding_alert_window_seconds)
        totals = _Totals()
        if inp.sample_postgres and self._targets is not None:
            for target in self._targets.names():
                totals.add(self._sample(self._targets, target, now, window))
        if not location:
            return totals.outcome(), totals.finding_ids
        cursor = location if inp.scheduled else None
        for name, opener in self._sources(location, cursor, inp.max_files + 1):
            if totals.count >= inp.max_files:
                totals.more = True
                break
            done = imports.import_file(
                self._sessions,
                name,
                _once(opener),
                now=now,
                alert_window=window,
                cursor=cursor,
            )
            totals.add(done)
            if done.result.error:
                log.warning("activity import: %s: %s", name, done.result.error)
        return totals.outcome(), totals.finding_ids

    def _sample(
        self, targets: TargetResolver, target: str, now: datetime, window: timedelta
    ) -> imports.Imported:
        """One `pg_stat_activity` sample of a target, imported in one transaction; a target
        that cannot be read is reported like an unreadable file (nothing imported)."""
        name = f"pg_stat_activity:{target}"
        try:
            with ddl.admin(targets.get(target), "sampling pg_stat_activity") as conn:
                # Without it, pg_stat_activity hides other roles' sessions: an empty sample
                # would look like a quiet database.
                stats = conn.execute("SELECT pg_has_role('pg_read_all_stats', 'USAGE')").fetchone()
                if not (stats and stats[0]):
                    return imports.Imported(
                        imports.FileResult(
                            name=name,
                            error="not sampled: the target's admin role is not a member of "
                            "pg_read_all_stats",
                        )
                    )
                rows = imports.sample_pg_stat_activity(conn)
        except (UnknownTarget, ApplicationError) as err:
            log.warning("activity sample: %s: %s", target, err)
            return imports.Imported(imports.FileResult(name=name, error=f"not sampled: {err}"))
        with transaction(self._sessions) as session:
            return imports.import_batch(
                session, name, imports.pg_stat_activity_events(rows), now=now, alert_window=window
            )

    def _sources(self, location: str, cursor: str | None, limit: int) -> Iterator[Opener]:
        if location.startswith("s3://"):
            bucket, _ = split_s3(location)
            after = None
            if cursor is not None:
                with transaction(self._sessions) as session:
                    after = imports.read_cursor(session, cursor)
            for n, key in enumerate(self._s3_objects(location, after)):
                if n >= limit:
                    return
                yield key, _Lazy(lambda k=key: self._open_s3(bucket, k))
            return
        for path in local_files(location)[:limit]:
            yield str(path), _Lazy(lambda p=path: nullcontext(p.open("rb")))

    def auto_contain(self, outcome_ids: list[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID]:
        """Agents whose new findings reach the threshold -> the finding that did it."""
        if self._settings.auto_contain_severity == "off" or not outcome_ids:
            return {}
        threshold = Severity(self._settings.auto_contain_severity)
        with transaction(self._sessions) as session:
            return findings.severe_agents(session, outcome_ids, threshold)

    def _import_and_classify(
        self, inp: ActivityImportInput
    ) -> tuple[ImportOutcome, dict[uuid.UUID, uuid.UUID]]:
        try:
            return self._import_and_select(inp)
        except ClientError as err:
            code = aws_code(err)
            if code in PERMANENT_S3_ERRORS:
                # No retry can make a missing bucket appear: fail the run with the reason.
                raise ApplicationError(
                    f"S3 {code}: {aws_message(err)}", type=code, non_retryable=True
                ) from err
            raise

    @activity.defn
    async def import_activity(self, inp: ActivityImportInput) -> ImportOutcome:
        """Import, heartbeating while the files are read on a thread; then start containment
        of each agent with a finding at or above `NHI_AUTO_CONTAIN_SEVERITY` (by name and id:
        a containment already running for the agent is joined, not doubled)."""
        work = asyncio.create_task(asyncio.to_thread(self._import_and_classify, inp))
        while True:
            done, _ = await asyncio.wait({work}, timeout=HEARTBEAT_SECONDS)
            activity.heartbeat()
            if done:
                break
        outcome, severe = work.result()
        contained = [
            agent_id
            for agent_id, finding_id in severe.items()
            if await self._start_containment(agent_id, finding_id)
        ]
        return outcome.model_copy(update={"contained": contained})

    def _import_and_select(
        self, inp: ActivityImportInput
    ) -> tuple[ImportOutcome, dict[uuid.UUID, uuid.UUID]]:
        outcome, finding_ids = self.import_location(inp)
        return outcome, self.auto_contain(finding_ids)

    async def _start_containment(self, agent_id: uuid.UUID, finding_id: uuid.UUID) -> bool:
        reason = f"automatic: activity finding {finding_id} at or above " + (
            f"{self._settings.auto_contain_severity}"
        )
        await activity.client().start_workflow(
            CONTAIN_WORKFLOW,
            ContainAgentInput(agent_id=agent_id, reason=reason, actor=ACTOR, finding_id=finding_id),
            id=containment_workflow_id(agent_id),
            task_queue=self._settings.temporal_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )

        def record() -> None:
            with transaction(self._sessions) as session:
                note(
                    session,
                    subject_type="agent",
                    subject_id=agent_id,
                    event="agent.auto_containment_started",
                    actor=ACTOR,
                    reason=reason,
                    details={"finding_id": str(finding_id)},
                    key=f"auto-contain:{finding_id}",
                )

        await asyncio.to_thread(record)
        return True


def _once(opener: AbstractContextManager[IO[bytes]]) -> Any:
    return lambda: opener


class _Lazy(AbstractContextManager[IO[bytes]]):
    """Opens its stream only when entered, so listing many objects opens none of them."""

    def __init__(self, make: Any) -> None:
        self._make = make
        self._inner: AbstractContextManager[IO[bytes]] | None = None

    def __enter__(self) -> IO[bytes]:
        self._inner = self._make()
        return self._inner.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._inner is not None:
            self._inner.__exit__(*exc)  # type: ignore[arg-type]


class _Totals:
    def __init__(self) -> None:
        self.count = 0
        self.more = False
        self.files: list[ImportedFile] = []
        self.sums = dict.fromkeys(("events", "new", "duplicates", "unmatched", "findings"), 0)
        self.failed = 0
        self.alerts: list[FindingAlert] = []
        self.finding_ids: list[uuid.UUID] = []

    def add(self, done: imports.Imported) -> None:
        r = done.result
        self.count += 1
        self.failed += r.error is not None
        for key in self.sums:
            self.sums[key] += getattr(r, key)
        self.finding_ids.extend(r.finding_ids)
        if len(self.files) < MAX_FILES_LISTED:
            self.files.append(
                ImportedFile(
                    name=r.name,
                    events=r.events,
                    new=r.new,
                    duplicates=r.duplicates,
                    unmatched=r.unmatched,
                    findings=r.findings,
                    error=r.error,
                    unmatched_identities=r.unmatched_identities,
                )
            )
        for a in done.alerts[: max(0, MAX_ALERTS - len(self.alerts))]:
            self.alerts.append(FindingAlert(**a.__dict__))

    def outcome(self) -> ImportOutcome:
        # Finding ids stay beside the outcome, not in it: they can be many, and history
        # needs none of them.
        return ImportOutcome(
            files=self.files,
            file_count=self.count,
            failed_files=self.failed,
            alerts=self.alerts,
            more=self.more,
            **self.sums,
        )
