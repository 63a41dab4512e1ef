"""Sweeps at account scale (issue 19): bulk discovery paged to the end, a listing failing half
way, throttling answered by a slower budget, and a worker killed mid-discovery resuming from
its last page.

moto serves GetAccountAuthorizationDetails in one page whatever MaxItems says; IAM pages it.
`_page_like_iam` pages moto's answer on the worker's client (botocore event hooks: the
boundary), so a small NHI_SWEEP_PAGE_SIZE gives a listing of many pages."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from botocore.awsrequest import AWSResponse, HTTPHeaders
from botocore.exceptions import ClientError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowFailureError
from temporalio.testing import WorkflowEnvironment

from activities.providers.aws_iam import SCOPE_POLICY_NAME
from models.contracts import ScopeStatement, SweepInput, SweepOutcome
from models.enums import NhiStatus
from models.orm import AuditEvent, Nhi
from nhi.infra.aws_clients import AwsClients, make_aws_clients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.infra.ratelimit import TokenBucket
from nhi.rules.policy import identity_policy_document
from tests.conftest import dev_address
from tests.gate_proxy import GateProxy
from tests.helpers import SweepRig, eventually, orphan_user, request_nhi, sweep_settings
from worker import build_worker
from workflows.sweep import SweepWorkflow

if TYPE_CHECKING:
    from types_boto3_iam.type_defs import TagTypeDef

ROOT = Path(__file__).resolve().parent.parent
OPERATION = "GetAccountAuthorizationDetails"
LISTS = ("UserDetailList", "RoleDetailList")


@pytest_asyncio.fixture
async def rig(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> AsyncIterator[SweepRig]:
    rig_settings = sweep_settings(
        settings, "scale", orphan_grace_seconds=0, aws_max_attempts=2, sweep_page_size=3
    )
    queue = rig_settings.temporal_task_queue
    worker_aws = make_aws_clients(rig_settings)
    async with build_worker(ts_env.client, rig_settings, sessions, worker_aws, task_queue=queue):
        yield SweepRig(ts_env, rig_settings, sessions, aws, worker_aws, queue)


class _Paging:
    """IAM's paging of GetAccountAuthorizationDetails over moto's one-page answer (Marker: the
    offset), restricted to the test's IAM path and one decoy path outside it. Counts pages and
    can fail the listing from a given page on."""

    def __init__(self, client: Any, paths: tuple[str, ...]) -> None:
        self.pages = 0
        self.fail_from: int | None = None
        self._paths = paths
        events = client.meta.events
        events.register(f"before-parameter-build.iam.{OPERATION}", self._request)
        events.register(f"after-call.iam.{OPERATION}", self._answer)

    def _request(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["paging"] = (int(params.get("MaxItems", 100)), int(params.get("Marker") or 0))

    def _answer(self, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if "Error" in parsed:
            return
        size, start = context["paging"]
        self.pages += 1
        if self.fail_from is not None and self.pages >= self.fail_from:
            raise ClientError(
                {"Error": {"Code": "ServiceFailure", "Message": "injected mid-listing"}}, OPERATION
            )
        total = 0
        for key in LISTS:
            mine = [
                e for e in parsed.get(key, []) if str(e.get("Path", "")).startswith(self._paths)
            ]
            total = max(total, len(mine))
            parsed[key] = mine[start : start + size]
        parsed["IsTruncated"] = start + size < total
        if parsed["IsTruncated"]:
            parsed["Marker"] = str(start + size)
        else:
            parsed.pop("Marker", None)


class _Body:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Any:
        yield self._body


THROTTLED = (
    b"<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code>"
    b"<Message>Rate exceeded</Message></Error><RequestId>test</RequestId></ErrorResponse>"
)


def _throttle_every(client: Any, nth: int) -> Callable[[], int]:
    """Every `nth` IAM request of this client answered `Throttling` as IAM does past its rate
    (on the wire: botocore's own retry sees it, as it would AWS's); returns how many were
    throttled so far."""
    sent = count(1)
    throttled = [0]

    def answer(request: Any, **_: Any) -> AWSResponse | None:
        if next(sent) % nth:
            return None
        throttled[0] += 1
        return AWSResponse(request.url, 400, HTTPHeaders(), _Body(THROTTLED))

    client.meta.events.register("before-send.iam", answer)
    return lambda: throttled[0]


def _known_user(rig: SweepRig, label: str) -> str:
    """An active inventory NHI and its IAM user, tagged, with exactly its granted scope."""
    _, nhi_id, _ = request_nhi(rig.sessions, rig.settings, "iam_user_key")
    now = datetime.now(UTC)
    with transaction(rig.sessions) as s:
        row = s.get_one(Nhi, nhi_id)
        row.status = NhiStatus.ACTIVE
        row.activated_at = now - timedelta(days=1)
        row.expires_at = now + timedelta(days=30)
        name, expires = row.name, row.expires_at
        scope = [ScopeStatement.model_validate(x) for x in row.granted_scope]
        cidrs = list(row.allowed_cidrs)
    tags: list[TagTypeDef] = [
        {"Key": "managed-by", "Value": "nhi-lifecycle"},
        {"Key": "nhi:nhi-id", "Value": str(nhi_id)},
        {"Key": "label", "Value": label},
    ]
    rig.aws.iam.create_user(UserName=name, Path=rig.settings.iam_path, Tags=tags)
    rig.aws.iam.put_user_policy(
        UserName=name,
        PolicyName=SCOPE_POLICY_NAME,
        PolicyDocument=json.dumps(identity_policy_document(scope, cidrs, expires)),
    )
    return name


def _users(rig: SweepRig) -> set[str]:
    pages = rig.aws.iam.get_paginator("list_users").paginate(PathPrefix=rig.settings.iam_path)
    return {u["UserName"] for page in pages for u in page["Users"]}


def _quarantined(rig: SweepRig, names: set[str]) -> set[str]:
    with transaction(rig.sessions) as s:
        rows = s.scalars(
            select(AuditEvent.subject_id).where(
                AuditEvent.subject_type == "orphan",
                AuditEvent.event == "orphan.quarantined",
                AuditEvent.subject_id.in_(sorted(names)),
            )
        ).all()
    return set(rows)


def _kinds(outcome: SweepOutcome) -> dict[str, set[str]]:
    """Findings by kind, but `unsupervised`: the known users' rows have no lifecycle running."""
    out: dict[str, set[str]] = {}
    for f in outcome.findings:
        if f.kind.value == "unsupervised":
            continue
        out.setdefault(f.kind.value, set()).add(f.identity)
    return out


def _account(rig: SweepRig, orphans: int, known: int) -> tuple[set[str], set[str], str, str]:
    """Orphans, known users, an untagged stranger under our path, and a tagged user outside
    it (which no sweep of ours may see)."""
    ghosts = {orphan_user(rig.aws, rig.settings, with_key=i % 2 == 0)[0] for i in range(orphans)}
    alive = {_known_user(rig, f"k{i}") for i in range(known)}
    stranger = f"{rig.settings.name_prefix}-manual-admin"
    rig.aws.iam.create_user(UserName=stranger, Path=rig.settings.iam_path)
    # A sibling path sharing our path's text: "/scale-abc/" must not match "/scale-abc-other/".
    elsewhere = rig.settings.model_copy(update={"iam_path": f"{rig.settings.iam_path[:-1]}-other/"})
    outside = orphan_user(rig.aws, elsewhere, with_key=False)[0]
    return ghosts, alive, stranger, outside


# ---- the budget ---------------------------------------------------------------------------------


def test_the_budget_halves_on_throttling_and_recovers_slowly() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(100.0, burst=1.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(101):
        bucket.acquire()
    assert now[0] == pytest.approx(1.0), "100 calls a second, no faster"
    bucket.throttled()
    bucket.throttled()
    assert bucket.rate == pytest.approx(25.0) and bucket.throttles == 2
    start = now[0]
    for _ in range(25):
        bucket.acquire()
    assert now[0] - start == pytest.approx(1.0, abs=0.05), "a quarter of the speed"
    for _ in range(10):
        bucket.succeeded()
    assert bucket.rate == pytest.approx(35.0), "recovers by 1% of the ceiling per success"
    for _ in range(1000):
        bucket.throttled()
    assert bucket.rate == pytest.approx(100.0 / 64), "never below the floor"
    for _ in range(1000):
        bucket.succeeded()
    assert bucket.rate == pytest.approx(100.0), "never above the ceiling"


# ---- paged discovery ------------------------------------------------------------------------------


async def test_a_paged_account_is_swept_to_its_last_page(rig: SweepRig) -> None:
    paging = _Paging(rig.worker_aws.iam, (rig.settings.iam_path, rig.settings.iam_path[:-1]))
    ghosts, alive, stranger, outside = _account(rig, orphans=5, known=4)
    outcome = await rig.sweep(dry_run=True)
    # 11 users in our path, 3 a page (+ one empty page of roles).
    assert paging.pages >= 5, paging.pages
    assert outcome.summary["discovery_pages"] == paging.pages
    assert outcome.summary["platform_identities"] == len(ghosts) + len(alive) + 1
    assert _kinds(outcome) == {"orphan": ghosts, "untagged": {stranger}}, outcome.findings
    assert outside not in {f.identity for f in outcome.findings}
    assert outcome.summary["inventory"] == len(alive)
    assert _quarantined(rig, ghosts) == set(), "a dry run changes nothing"


async def test_a_listing_failing_half_way_changes_nothing(rig: SweepRig) -> None:
    paging = _Paging(rig.worker_aws.iam, (rig.settings.iam_path,))
    ghosts, alive, _, _ = _account(rig, orphans=5, known=4)
    gone = sorted(alive)[0]  # gone from IAM: a complete listing would call it "missing"
    rig.aws.iam.delete_user_policy(UserName=gone, PolicyName=SCOPE_POLICY_NAME)
    rig.aws.iam.delete_user(UserName=gone)
    paging.fail_from = 3
    before = _users(rig)
    with pytest.raises(WorkflowFailureError) as failure:
        await rig.sweep()
    assert "sweep stopped, nothing changed" in str(failure.value.cause)
    assert paging.pages == 3, "failed on the third page, after two were classified"
    assert _users(rig) == before
    assert _quarantined(rig, ghosts) == set()
    with transaction(rig.sessions) as s:
        statuses = set(s.scalars(select(Nhi.status).where(Nhi.name.in_(sorted(alive)))).all())
    assert statuses == {"active"}, "nothing marked missing from a partial listing"


async def test_throttling_slows_the_sweep_which_removes_exactly_the_orphans(
    rig: SweepRig,
) -> None:
    _Paging(rig.worker_aws.iam, (rig.settings.iam_path,))
    ghosts, alive, stranger, _ = _account(rig, orphans=6, known=3)
    throttled = _throttle_every(rig.worker_aws.iam, 4)
    outcome = await rig.sweep()
    assert throttled() > 0
    assert outcome.summary["throttled"] > 0, "the budget was told, and halved its rate"
    assert _kinds(outcome).get("orphan") == ghosts, outcome.findings
    assert "history_events" in outcome.summary

    async def removed() -> None:
        assert _users(rig) == alive | {stranger}
        # An orphan whose batch removal failed part-way (a throttled proof that it is gone)
        # is gone already; its removal workflow, which the sweep handed it to, audits it.
        assert _quarantined(rig, ghosts) == ghosts

    await eventually(removed, timeout=120)
    # Nothing else was touched: the known users keep their scope policy.
    for name in alive:
        names = rig.aws.iam.list_user_policies(UserName=name)["PolicyNames"]
        assert names == [SCOPE_POLICY_NAME]


# ---- a worker killed mid-discovery ----------------------------------------------------------------


def _worker(settings: Settings, temporal: str, aws_endpoint: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        NHI_DATABASE_URL=settings.require_database_url(),
        NHI_TEMPORAL_ADDRESS=temporal,
        NHI_TEMPORAL_TASK_QUEUE=settings.temporal_task_queue,
        NHI_AWS_ENDPOINT_URL=aws_endpoint,
        NHI_AWS_REGION=settings.aws_region,
        NHI_IAM_PATH=settings.iam_path,
        NHI_NAME_PREFIX=settings.name_prefix,
        NHI_SWEEP_PROPAGATION_SECONDS="0",
        NHI_SWEEP_CALLS_PER_SECOND="1000",
        NHI_ORPHAN_GRACE_SECONDS="0",
        NHI_WORKER_FAIL_ON_NONDETERMINISM="true",
    )
    return subprocess.Popen([sys.executable, str(ROOT / "worker.py")], env=env, cwd=ROOT)


@pytest.mark.slow
async def test_a_worker_killed_mid_discovery_resumes_from_its_last_page(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    own = sweep_settings(settings, "resume", orphan_grace_seconds=0)
    rig = SweepRig(dev_env, own, sessions, aws, aws, own.temporal_task_queue)
    ghosts, alive, stranger, _ = _account(rig, orphans=3, known=2)
    moto = settings.aws_endpoint_url or ""
    # Users are listed (one page: moto does not page); the roles' request is held, and the
    # worker dies with it on the wire.
    with (
        GateProxy(moto, hold_on=b"Filter.member.1=Role") as first_gate,
        GateProxy(moto, hold_on=b"Filter.member.1=User") as second_gate,
    ):
        first = _worker(own, dev_address(dev_env), first_gate.url)
        try:
            handle = await dev_env.client.start_workflow(
                SweepWorkflow.run,
                SweepInput(provider="aws", triggered_by="test"),
                id=f"sweep-{uuid.uuid4().hex[:8]}",
                task_queue=own.temporal_task_queue,
            )
            assert await asyncio.to_thread(first_gate.reached.wait, 90), "never listed roles"

            async def users_page_heartbeated() -> None:
                pending = (await handle.describe()).raw_description.pending_activities
                assert pending and pending[0].heartbeat_details.payloads
                details = await dev_env.client.data_converter.decode(
                    pending[0].heartbeat_details.payloads, [dict]
                )
                assert details[0]["resume"] == {"listing": "Role", "marker": None}, details

            await eventually(users_page_heartbeated, timeout=90, interval=0.5)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        finally:
            if first.poll() is None:
                first.kill()
        first_gate.release()
        second = _worker(own, dev_address(dev_env), second_gate.url)
        try:
            await _resumed_and_removed(handle, sessions, rig, ghosts, alive | {stranger})
            assert not second_gate.reached.is_set(), "the new worker listed the users again"
        finally:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(timeout=30)
            except subprocess.TimeoutExpired:
                second.kill()


async def _resumed_and_removed(
    handle: Any,
    sessions: sessionmaker[Session],
    rig: SweepRig,
    ghosts: set[str],
    kept: set[str],
) -> None:
    # After the heartbeat timeout, the plan is retried on the new worker.
    outcome: SweepOutcome = await asyncio.wait_for(handle.result(), timeout=240)
    assert outcome.summary["resumed_pages"] == 1, outcome.summary
    orphans = [f.identity for f in outcome.findings if f.kind.value == "orphan"]
    assert sorted(orphans) == sorted(ghosts), "each orphan found once, from the first page"

    async def removed() -> None:
        assert _users(rig) == kept

    await eventually(removed, timeout=120)

    async def removed_once() -> None:
        with transaction(sessions) as s:
            events = s.execute(
                select(AuditEvent.subject_id, AuditEvent.event).where(
                    AuditEvent.subject_type == "orphan",
                    AuditEvent.subject_id.in_(sorted(ghosts)),
                )
            ).all()
        expected = [(g, e) for g in ghosts for e in ("orphan.deleted", "orphan.quarantined")]
        assert sorted((g, e) for g, e in events) == sorted(expected), "one removal each"

    await eventually(removed_once, timeout=30)


# ---- a worker killed mid-removal ------------------------------------------------------------------


@pytest.mark.slow
async def test_a_worker_killed_mid_removal_batch_resumes_without_removing_twice(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    """The first worker removes the orphans of a batch but one, whose DeleteUser it has on the
    wire when it dies; the batch's retry on a second worker skips the ones its heartbeat names
    (their report is the first attempt's, keys and all), finishes the last, and every orphan
    ends with one `orphan.quarantined` and one `orphan.deleted`."""
    own = sweep_settings(settings, "rmkill", orphan_grace_seconds=0)
    rig = SweepRig(dev_env, own, sessions, aws, aws, own.temporal_task_queue)
    ghosts = {orphan_user(aws, own)[0] for _ in range(6)}
    alive = {_known_user(rig, f"k{i}") for i in range(2)}
    moto = settings.aws_endpoint_url or ""
    with GateProxy(moto, hold_on=b"Action=DeleteUser&") as gate:
        first = _worker(own, dev_address(dev_env), gate.url)
        try:
            handle = await dev_env.client.start_workflow(
                SweepWorkflow.run,
                SweepInput(provider="aws", triggered_by="test"),
                id=f"sweep-{uuid.uuid4().hex[:8]}",
                task_queue=own.temporal_task_queue,
            )
            assert await asyncio.to_thread(gate.reached.wait, 90), "never deleted a user"

            async def others_heartbeated() -> None:
                pending = (await handle.describe()).raw_description.pending_activities
                assert pending and pending[0].activity_type.name == "remove_orphans"
                assert pending[0].heartbeat_details.payloads
                details = await dev_env.client.data_converter.decode(
                    pending[0].heartbeat_details.payloads, [dict]
                )
                assert len(details[0]) == len(ghosts) - 1, details

            await eventually(others_heartbeated, timeout=90, interval=0.5)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        finally:
            if first.poll() is None:
                first.kill()
        gate.release()
    second = _worker(own, dev_address(dev_env), moto)
    try:
        outcome: SweepOutcome = await asyncio.wait_for(handle.result(), timeout=240)
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()
    assert outcome.summary["orphans_removed"] == len(ghosts), outcome.summary
    actions = {f.identity: f.action for f in outcome.findings if f.kind.value == "orphan"}
    assert set(actions) == ghosts
    # Reported from the first attempt's heartbeat: what it removed, its key included.
    assert sum("access key" in a for a in actions.values()) >= len(ghosts) - 1, actions
    assert _users(rig) == alive
    with transaction(sessions) as s:
        events = s.execute(
            select(AuditEvent.subject_id, AuditEvent.event).where(
                AuditEvent.subject_type == "orphan", AuditEvent.subject_id.in_(sorted(ghosts))
            )
        ).all()
    expected = [(g, e) for g in ghosts for e in ("orphan.deleted", "orphan.quarantined")]
    assert sorted((g, e) for g, e in events) == sorted(expected), "one removal each"
    history = await handle.fetch_history()
    attempts = [
        e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
    ]
    assert max(attempts) >= 2, "the batch was retried on the second worker"
