"""Activity (issue 17): `POST /v1/activity` takes batches of events from any source;
`POST /v1/activity/imports` starts an import of CloudTrail or Postgres log files
(`nhi activity import`), `GET /v1/activity/imports/{id}` tells how it went.

A batch is imported in the request's transaction (nhi/services/activity.py), so it is all or
nothing; its findings are alerted (owner and security channel, once per NHI and kind within
`NHI_FINDING_ALERT_WINDOW_SECONDS`) and severe ones start the agent's containment, both after
the commit and best effort: the findings themselves are stored either way.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Path, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, StringConstraints, field_validator
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from activities.activity_import import ActivityImportInput, FindingAlert, ImportOutcome
from api.deps import AppState, CurrentPrincipal, State, TemporalUnavailable, authenticated
from models.contracts import ContainAgentInput
from models.enums import Role, Severity
from models.schemas import Body, Line, Timestamp
from nhi.rules.ids import (
    CONTAIN_WORKFLOW,
    containment_workflow_id,
    manual_activity_import_workflow_id,
)
from nhi.rules.policy import RuleViolation
from nhi.services import activity as imports
from nhi.services import findings
from nhi.services.auth import require_role
from nhi.services.errors import NotFound
from workflows.activity_import import ActivityImportWorkflow, alert_text

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/activity", tags=["activity"], dependencies=[authenticated])

MAX_BATCH = 1000  # events per POST: one transaction of bounded size
# Not platform: events can put an agent in containment, so only those who may contain post them.
WRITERS = (Role.SECURITY, Role.ADMIN)
IMPORTERS = (Role.SECURITY, Role.ADMIN)
_PRINTABLE = r"^[\x21-\x7e]+$"
ActionName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=_PRINTABLE)]
Identity = Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=_PRINTABLE)]
# Not a control, bidi, zero-width or surrogate character: these end up in findings and alerts.
NoControl = Line
EventId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=_PRINTABLE)]
ImportId = Annotated[str, Path(max_length=255)]
_IMPORT_ID = re.compile(r"^nhi-activity-import-manual-[0-9a-f-]{36}$")


class ActivityEventIn(Body):
    """One event, as any source reports it."""

    id: EventId | None = Field(
        default=None, description="The source's own event id; the same id is imported once."
    )
    time: Timestamp
    identity: Identity = Field(description="An NHI's name or a task credential's `nhit_` name.")
    action: ActionName = Field(description="e.g. `s3:GetObject` or `SELECT`.")
    resource: NoControl | None = Field(default=None, max_length=2048)
    source_ip: str | None = Field(default=None, max_length=45)
    user_agent: NoControl | None = Field(default=None, max_length=256)
    outcome: Literal["success", "denied", "error"] = "success"

    @field_validator("source_ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)  # ValueError: 422 naming the field
        return value


class ActivityBatch(Body):
    """A batch of events (at most 1,000), imported all or nothing."""

    source: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.-]{1,64}$")] = "api"
    events: list[ActivityEventIn] = Field(min_length=1, max_length=MAX_BATCH)


class ActivityImported(BaseModel):
    """What a batch did."""

    events: int
    new: int
    duplicates: int
    unmatched: int
    unmatched_identities: dict[str, int]
    findings: int
    finding_ids: list[uuid.UUID]


class ImportRequest(Body):
    """Log files to import: `s3://bucket/prefix`, or (dev mode only) a path on the worker."""

    location: Line = Field(min_length=1, max_length=2048)


class ImportStarted(BaseModel):
    workflow_id: str


class ImportStatus(BaseModel):
    workflow_id: str
    status: str
    outcome: ImportOutcome | None = None


@router.post("", status_code=status.HTTP_200_OK, response_model=ActivityImported)
async def post_activity(body: ActivityBatch, state: State, p: CurrentPrincipal) -> ActivityImported:
    """Import a batch of events (security or admin): matched to NHIs, judged, and
    the unmatched counted. Posting the same events again adds nothing."""
    require_role(p, *WRITERS)
    raws = [
        imports.api_raw(
            at=e.time,
            identity=e.identity,
            action=e.action,
            resource=e.resource,
            source_ip=e.source_ip,
            user_agent=e.user_agent,
            outcome=e.outcome,
            event_id=f"{body.source}:{e.id}" if e.id else None,
        )
        for e in body.events
    ]
    window = timedelta(seconds=state.settings.finding_alert_window_seconds)
    done = await state.db(
        lambda s: imports.import_batch(
            s, f"api:{body.source}", raws, now=datetime.now(UTC), alert_window=window
        )
    )
    await _alert(state, done)
    await _contain(state, done.result.finding_ids)
    r = done.result
    return ActivityImported(
        events=r.events,
        new=r.new,
        duplicates=r.duplicates,
        unmatched=r.unmatched,
        unmatched_identities=r.unmatched_identities,
        findings=r.findings,
        finding_ids=r.finding_ids,
    )


async def _alert(state: AppState, done: imports.Imported) -> None:
    slack = state.slack
    for target in done.alerts:
        text = alert_text(_as_alert(target))
        if slack is None:
            log.error("ALERT to %s and security: %s", target.owner_email, text)
            continue
        try:
            await run_in_threadpool(_post, state, target.owner_email, text)
        except Exception:  # best effort: the finding is stored and listed either way
            log.exception("finding alert %s not sent", target.finding_id)


def _as_alert(target: findings.AlertTarget) -> FindingAlert:
    return FindingAlert(**target.__dict__)


def _post(state: AppState, email: str, text: str) -> None:
    assert state.slack is not None
    user = state.slack.users_lookupByEmail(email=email)["user"]
    if not user.get("deleted"):
        state.slack.chat_postMessage(channel=str(user["id"]), text=text)
    state.slack.chat_postMessage(channel=state.settings.slack_security_channel, text=text)


async def _contain(state: AppState, finding_ids: list[uuid.UUID]) -> None:
    level = state.settings.auto_contain_severity
    if level == "off" or not finding_ids:
        return
    severe = await state.db(lambda s: findings.severe_agents(s, finding_ids, Severity(level)))
    for agent_id, finding_id in severe.items():
        try:
            client = await state.temporal()
            await client.start_workflow(
                CONTAIN_WORKFLOW,
                ContainAgentInput(
                    agent_id=agent_id,
                    reason=f"automatic: activity finding {finding_id} at or above {level}",
                    actor="system:activity",
                    finding_id=finding_id,
                ),
                id=containment_workflow_id(agent_id),
                task_queue=state.settings.temporal_task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            )
        except Exception:  # the finding stays; the security channel has its alert
            log.exception("automatic containment of agent %s not started", agent_id)


@router.post("/imports", status_code=status.HTTP_202_ACCEPTED, response_model=ImportStarted)
async def start_import(body: ImportRequest, state: State, p: CurrentPrincipal) -> ImportStarted:
    """Start importing log files (security or admin). Local paths are read by the worker and
    accepted in dev mode only (a path names the worker's files, not the caller's)."""
    require_role(p, *IMPORTERS)
    if not body.location.startswith("s3://") and not state.settings.dev_mode:
        raise RuleViolation("location", "must be s3://bucket/prefix (local paths: dev mode only)")
    if body.location.startswith("s3://"):
        bucket = body.location.removeprefix("s3://").partition("/")[0]
        if not bucket:
            raise RuleViolation("location", "s3://bucket/prefix needs a bucket")
    workflow_id = manual_activity_import_workflow_id(uuid.uuid4())
    try:
        client = await state.temporal()
        await client.start_workflow(
            ActivityImportWorkflow.run,
            ActivityImportInput(location=body.location, triggered_by=p.actor),
            id=workflow_id,
            task_queue=state.settings.temporal_task_queue,
        )
    except TemporalUnavailable:
        raise
    except Exception as err:
        raise TemporalUnavailable("the import could not start; nothing was changed") from err
    return ImportStarted(workflow_id=workflow_id)


@router.get("/imports/{workflow_id}", response_model=ImportStatus)
async def get_import(workflow_id: ImportId, state: State, p: CurrentPrincipal) -> ImportStatus:
    """How an import started through the API went (its outcome once completed)."""
    require_role(p, *IMPORTERS, Role.AUDITOR)
    if not _IMPORT_ID.fullmatch(workflow_id):  # only imports started here can be read here
        raise NotFound(f"import {workflow_id} not found")
    client = await state.temporal()
    handle = client.get_workflow_handle_for(ActivityImportWorkflow.run, workflow_id)
    try:
        described = await handle.describe()
    except RPCError as err:
        if err.status is RPCStatusCode.NOT_FOUND:
            raise NotFound(f"import {workflow_id} not found") from err
        raise
    run_status = described.status or WorkflowExecutionStatus.RUNNING
    outcome = None
    if run_status is WorkflowExecutionStatus.COMPLETED:
        outcome = await handle.result()
    return ImportStatus(workflow_id=workflow_id, status=run_status.name.lower(), outcome=outcome)
