"""Replay committed workflow histories against today's workflow code: a change that would break
running provisioning, lifecycle or sweep workflows fails here, before it reaches a worker.

The histories in tests/histories/ and the tests that record them:

| history | recorded by | what it covers |
|---|---|---|
| `provision`, `lifecycle` | `test_lifecycle.py::test_a_whole_life_in_seconds[two_runs]` (a provisioning run, as bundles start) | AWS provisioning before the provider interface (legacy activity names), a 75-day lifecycle with rotations, reminders, a Slack renewal and decommission |
| `postgres_provision`, `postgres_lifecycle` | `test_postgres_lifecycle.py::test_a_postgres_role_lives_rotates_renews_and_is_removed_completely[two_runs]` | a `postgres_role` through the provider interface; quarantine, its proof and removal on an `IdentityRef` (patch `identity-ref-activities`) |
| `postgres_lifecycle_plan_activities` | the same test, before `identity-ref-activities` | quarantine and removal taking the whole plan (`quarantine`, `verify_quarantine`, `remove_identity`) |
| `containment`, `containment_partial` | `test_contain.py` | the containment playbook on an `IdentityRef`; `*_plan_activities`: the same recorded before that patch |
| `lifecycle_revoke_failed` | `test_lifecycle_faults.py::test_a_removal_that_keeps_failing_surfaces_within_the_alert_window_once` (recorded as a lifecycle started by a provisioning run; the test now runs the NHI's one run) | a removal failing past the alert window, alerted once per recipient, retried and finished |
| `aws_provision`, `aws_lifecycle_start` | `test_aws_provisioning_of_today_replays` (here) | AWS provisioning through the provider interface, with an approval, its inventory steps as local activities (patch `local-inventory-steps`); the lifecycle it starts, loading as a local activity (patch `local-lifecycle-load`), renewed |
| `aws_one_run` | `test_aws_one_run_of_today_replays` (here) | one run per NHI (issue 15): the lifecycle provisions its NHI first (approval, creation, delivery, the inventory steps as local activities), then loads and keeps it; renewed |
| `aws_provision_activities` | the same test, before `local-inventory-steps` | the inventory steps as activities |
| `sweep_aws`, `orphan_removal_aws`, `sweep_aws_missing` | `test_aws_sweeps_of_today_replay` (here) | sweeps acting on every kind of finding, and the orphan removal one starts |
| `sweep_aws_batched` | `test_sweep_batches.py::test_a_batched_sweep_removes_orphans_completely_and_hands_failures_on` | a sweep (patch `sweep-orphan-batches`) removing grace-0 orphans in a `remove_orphans` batch and handing a failed one to its removal workflow |
| `sweep_postgres` | `test_a_postgres_sweep_of_today_replays` (here) | a Postgres sweep: drift reverted, a role gone (missing), a target unreachable |
| `lifecycle_rotation_overlap` | `test_rotation_overlap.py::test_rotations_during_an_overlap_retire_every_old_key` | two rotations within one overlap (AWS): every old key retired and deleted, with the `keep-every-retiring-key` patch |
| `tagged_provision`, `tagged_lifecycle` | `test_search_attributes.py::test_readme_queries_return_the_right_workflows` (dev server), before one-run provisioning | runs started with search attributes: the `search-attributes` patch, status and expiry upserts, a tagged child start, a renewal |
| `tagged_one_run` | the same test, today | one run per NHI started with search attributes: provisioning's status upserts, the lifecycle's load tagging every attribute, a renewal |
| `slack_approval_provision` | `test_approvals.py::test_a_sensitive_request_exists_only_once_a_listed_approver_clicks_approve`, before one-run provisioning | a provisioning run approved in Slack (patch `approvals-in-slack`): the request posted to each approver, the messages rewritten once decided |
| `slack_approval_one_run` | the same test, today | the same, as the first phase of the NHI's one run |
| `task_reaper` | `test_task_reaper.py::test_a_role_that_cannot_be_dropped_is_reap_failed_with_its_cause_alerted_once` | a reaper run with a blocked role and its alert |

After a deliberate, patched change, refresh them with
`NHI_RECORD_HISTORIES=1 pytest tests/test_replay.py tests/test_lifecycle.py
tests/test_postgres_lifecycle.py tests/test_lifecycle_faults.py -k "today or whole_life or
postgres_role_lives or removal_that_keeps_failing"`, and keep the history of the old path under
another name when running workflows may still be on it (as `provision` is kept).

Every golden history replays three ways: without the codec, with it (histories recorded in
clear before `NHI_PAYLOAD_KEYS` was set must keep replaying on an encrypting worker), and with
its payloads encrypted as an encrypting worker would have written them.

The scenario tests here run today's code end to end on every run and replay the history they
produced from scratch (no worker cache), so a nondeterminism in today's path (an unordered
iteration, a clock read) fails here even before anything is recorded.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from google.protobuf.message import Message
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from models.contracts import (
    ApprovalDecision,
    FindingKind,
    LifecycleInput,
    ProvisionInput,
    RenewRequest,
    SweepOutcome,
)
from models.enums import NhiStatus
from models.orm import Nhi
from nhi.infra.aws_clients import AwsClients
from nhi.infra.codec import EncryptionCodec
from nhi.infra.config import PostgresTargetSetting, Settings
from nhi.infra.db import transaction
from nhi.infra.temporal_client import data_converter, payload_codec
from nhi.rules.ids import lifecycle_workflow_id, orphan_workflow_id, provision_workflow_id
from tests.helpers import (
    HISTORIES,
    SENSITIVE_SCOPE,
    delete_role,
    eventually,
    keep_history,
    nhi_row,
    orphan_user,
    provision,
    request_nhi,
    run_sweep,
    sweep_settings,
)
from tests.pg_cluster import ADMIN, DATABASE, PgCluster
from worker import WORKFLOWS, build_worker
from workflows.lifecycle import NhiLifecycleWorkflow
from workflows.provision import ProvisionNhiWorkflow

ROOT = Path(__file__).resolve().parent.parent
PATHS = sorted(HISTORIES.glob("*.json"))


def test_golden_histories_are_committed() -> None:
    # AWS provisioning both before the provider interface (legacy activity names) and after
    # it, lifecycles on both platforms, sweeps: every path running workflows may be on.
    assert {p.stem for p in PATHS} >= {
        "provision",
        "lifecycle",
        "postgres_provision",
        "postgres_lifecycle",
        "postgres_lifecycle_plan_activities",
        "containment",
        "containment_plan_activities",
        "lifecycle_revoke_failed",
        "aws_provision",
        "aws_provision_activities",
        "aws_lifecycle_start",
        "sweep_aws",
        "sweep_aws_missing",
        "sweep_aws_batched",
        "orphan_removal_aws",
        "sweep_postgres",
        "lifecycle_rotation_overlap",
        "tagged_provision",
        "tagged_lifecycle",
        "tagged_one_run",
        "slack_approval_provision",
        "slack_approval_one_run",
        "task_reaper",
        "aws_one_run",
    }


async def _replay(history: WorkflowHistory, converter: DataConverter | None = None) -> None:
    result = await Replayer(
        workflows=WORKFLOWS, data_converter=converter or pydantic_data_converter
    ).replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None


# A worker with payload encryption on (NHI_PAYLOAD_KEYS) replays histories recorded in clear
# before it was turned on, and the same paths once encrypted (a test key, made per run).
CODEC_KEYS = f"test:{base64.b64encode(os.urandom(32)).decode()}"
CODEC_MODES = ("without codec", "with codec", "encrypted, with codec")


# What never passes through the codec: search attributes (the server indexes them), headers
# (the SDK's default header codec behaviour) and markers (core writes patch markers itself).
IN_CLEAR = frozenset(
    {
        "temporal.api.common.v1.SearchAttributes",
        "temporal.api.common.v1.Header",
        "temporal.api.history.v1.MarkerRecordedEventAttributes",
    }
)


def _encrypt_payloads(message: Message, codec: EncryptionCodec) -> int:
    """Encrypt every payload of a history in place, as a worker with the codec would have
    written it (what stays `IN_CLEAR` is left alone); how many."""
    count = 0
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            items = (
                list(value.values())
                if field.message_type.fields_by_name["value"].message_type
                else []
            )
        elif field.is_repeated:
            items = list(value)
        else:
            items = [value]
        for item in items:
            name = item.DESCRIPTOR.full_name
            if name == "temporal.api.common.v1.Payload":
                item.CopyFrom(codec.encrypt(item))
                count += 1
            elif name not in IN_CLEAR:
                count += _encrypt_payloads(item, codec)
    return count


@pytest.mark.parametrize("mode", CODEC_MODES)
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
async def test_history_replays_deterministically(path: Path, mode: str) -> None:
    text = path.read_text()
    events = json.loads(text)["events"]
    assert len(events) > 10
    history = WorkflowHistory.from_json(f"golden-{path.stem}", text)
    if mode == "without codec":
        await _replay(history)
        return
    keyed = Settings(_env_file=None, payload_keys=CODEC_KEYS)  # type: ignore[call-arg]
    if mode.startswith("encrypted"):
        codec = payload_codec(keyed)
        assert codec is not None
        assert sum(_encrypt_payloads(event, codec) for event in history.events) > 3
    await _replay(history, data_converter(keyed))


def _activities(history: WorkflowHistory) -> list[str]:
    return [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


def _local_activities(history: WorkflowHistory) -> list[str]:
    """The activity type of every local activity a history recorded (core's markers)."""
    names = []
    for e in history.events:
        if e.event_type != EventType.EVENT_TYPE_MARKER_RECORDED:
            continue
        marker = e.marker_recorded_event_attributes
        if marker.marker_name != "core_local_activity":
            continue
        data = json.loads(marker.details["data"].payloads[0].data)
        names.append(data["activity_type"])
    return names


def _committed(name: str) -> WorkflowHistory:
    return WorkflowHistory.from_json(name, (HISTORIES / f"{name}.json").read_text())


def test_the_golden_histories_record_the_paths_they_are_named_for() -> None:
    legacy, today = _activities(_committed("provision")), _activities(_committed("aws_provision"))
    assert {"ensure_user", "issue_access_key"} <= set(legacy), "recorded before the interface"
    assert {"create_identity", "deliver_credential"} <= set(today)
    assert not {"ensure_role", "ensure_user", "issue_access_key"} & set(today)
    sweep = set(_activities(_committed("sweep_aws")) + _activities(_committed("sweep_aws_missing")))
    assert {
        "plan_sweep",
        "find_unsupervised",
        "find_preactive",
        "nudge_lifecycle",
        "mark_missing",
        "send_alert",
        "redrive_provisioning",
        "record_sweep",
        "alert",
    } <= sweep, "the sweep history acts on every kind of finding"
    postgres = set(_activities(_committed("sweep_postgres")))
    assert {"mark_missing", "nudge_lifecycle", "revert_drift", "record_sweep"} <= postgres
    # Quarantine, its proof and removal take an IdentityRef on today's code; the histories
    # recorded before keep the plan-taking names.
    for today_path, before in (
        ("postgres_lifecycle", "postgres_lifecycle_plan_activities"),
        ("containment", "containment_plan_activities"),
    ):
        narrow, wide = (
            set(_activities(_committed(today_path))),
            set(_activities(_committed(before))),
        )
        assert {"quarantine_identity", "verify_identity_quarantined"} <= narrow
        assert not {"quarantine", "verify_quarantine", "remove_identity"} & narrow
        assert {"quarantine", "verify_quarantine"} <= wide
    assert "delete_identity" in _activities(_committed("postgres_lifecycle"))
    assert "remove_identity" in _activities(_committed("postgres_lifecycle_plan_activities"))
    removal = set(_activities(_committed("orphan_removal_aws")))
    assert {"quarantine_orphan", "remove_identity"} <= removal
    # The inventory steps run as local activities on today's code (issue 15); the history
    # recorded before keeps them as activities, and the lifecycle loads the same way.
    inventory = {"begin_provisioning", "record_approval", "record_active"}
    local = _committed("aws_provision")
    assert inventory <= set(_local_activities(local))
    assert not inventory & set(_activities(local))
    assert set(_activities(local)) == {"create_identity", "deliver_credential"}
    as_activities = _committed("aws_provision_activities")
    assert inventory <= set(_activities(as_activities))
    assert not _local_activities(as_activities)
    assert "load_lifecycle" in _local_activities(_committed("aws_lifecycle_start"))
    assert "load_lifecycle" not in _activities(_committed("aws_lifecycle_start"))
    # One run per NHI: the provisioning steps, then the lifecycle's load, in one history.
    one_run = _committed("aws_one_run")
    assert _activities(one_run)[:2] == ["create_identity", "deliver_credential"]
    assert inventory | {"load_lifecycle"} <= set(_local_activities(one_run))
    assert not any(
        e.event_type == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED
        for e in one_run.events
    )
    # A lifecycle recorded before (kept, never re-recorded) loads with an activity.
    assert "load_lifecycle" in _activities(_committed("postgres_lifecycle_plan_activities"))


# --- the worker --------------------------------------------------------------------------------


def _defined_activities() -> set[str]:
    """The name of every `@activity.defn` in activities/, read from the source (the SDK has no
    public way to ask a function whether it is an activity)."""
    names: set[str] = set()
    for path in (ROOT / "activities").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for deco in node.decorator_list:
                call = deco if isinstance(deco, ast.Call) else None
                target = call.func if call else deco
                if ast.unparse(target) != "activity.defn":
                    continue
                named = [k.value for k in (call.keywords if call else []) if k.arg == "name"]
                names.add(
                    named[0].value if named and isinstance(named[0], ast.Constant) else node.name
                )
    return names


async def test_the_worker_registers_every_activity_and_fails_runs_on_nondeterminism(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    config = build_worker(ts_env.client, settings, sessions, aws).config()
    registered = [getattr(fn, "__name__", "") for fn in config.get("activities", [])]
    assert sorted(registered) == sorted(_defined_activities()), (
        "worker.activities_of lists every @activity.defn once (a forgotten one leaves the "
        "workflows that call it waiting; a stale one cannot be registered)"
    )
    assert len(registered) == len(set(registered))
    # Every test worker is built from these settings (tests/conftest.py): a nondeterminism
    # fails the run, and the test, at once; production keeps retrying until a fix is deployed.
    assert list(config.get("workflow_failure_exception_types", [])) == [
        workflow.NondeterminismError
    ]
    assert Settings.model_fields["worker_fail_on_nondeterminism"].default is False
    production = settings.model_copy(update={"worker_fail_on_nondeterminism": False})
    queue = f"production-{uuid.uuid4().hex[:8]}"  # one worker per queue and client
    config = build_worker(ts_env.client, production, sessions, aws, task_queue=queue).config()
    assert not list(config.get("workflow_failure_exception_types", []))


# --- today's paths, recorded -------------------------------------------------------------------


async def _sensitive_request(
    env: WorkflowEnvironment, settings: Settings, sessions: sessionmaker[Session]
) -> tuple[Settings, uuid.UUID]:
    """The golden tests' own settings, and an `iam_user_key` request by alice that needs an
    approver (its scope is sensitive)."""
    golden = sweep_settings(settings, "golden")
    _, nhi_id, sensitive = request_nhi(
        sessions,
        golden,
        "iam_user_key",
        scope=SENSITIVE_SCOPE,
        actor="alice",
        now=await env.get_current_time(),
    )
    assert sensitive == ["s3:DeleteObject"]
    return golden, nhi_id


async def test_aws_provisioning_of_today_replays(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    """An `iam_user_key` with a sensitive scope: approved by someone else, created, delivered,
    handed to its lifecycle."""
    golden, nhi_id = await _sensitive_request(ts_env, settings, sessions)
    queue = golden.temporal_task_queue
    async with build_worker(ts_env.client, golden, sessions, aws, task_queue=queue):
        handle = await ts_env.client.start_workflow(
            ProvisionNhiWorkflow.run,
            ProvisionInput(nhi_id=nhi_id, requested_by="alice", needs_approval=True),
            id=provision_workflow_id(nhi_id),
            task_queue=queue,
        )
        decision = await handle.execute_update(
            ProvisionNhiWorkflow.decide,
            ApprovalDecision(approve=True, approver="bob", reason="needed by the docs agent"),
        )
        assert decision.approved
        result = await handle.result()
        history = await handle.fetch_history()
        # The lifecycle it handed the NHI to: loaded, waiting on its timer, then renewed.
        lifecycle = ts_env.client.get_workflow_handle(lifecycle_workflow_id(nhi_id))

        async def waiting() -> None:
            events = (await lifecycle.fetch_history()).events
            assert any(e.event_type == EventType.EVENT_TYPE_TIMER_STARTED for e in events)

        await eventually(waiting)
        renewed = await lifecycle.execute_update(
            NhiLifecycleWorkflow.renew, RenewRequest(actor="ana@example.com", reason="golden")
        )
        assert renewed.message == "renewed"
        life = await lifecycle.fetch_history()
    assert result.status is NhiStatus.ACTIVE
    assert nhi_row(sessions, nhi_id).status == "active"
    assert set(_activities(history)) == {"create_identity", "deliver_credential"}
    assert {"begin_provisioning", "record_approval", "record_active"} <= set(
        _local_activities(history)
    )
    assert _local_activities(life) == ["load_lifecycle"]
    for name, recorded in (("aws_provision", history), ("aws_lifecycle_start", life)):
        await _replay(recorded)
        keep_history(recorded, name)


async def test_aws_one_run_of_today_replays(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    """One run per NHI (issue 15): an `iam_user_key` with a sensitive scope, approved by
    someone else, created, delivered and kept by the same run, then renewed."""
    golden, nhi_id = await _sensitive_request(ts_env, settings, sessions)
    queue = golden.temporal_task_queue
    provision = ProvisionInput(nhi_id=nhi_id, requested_by="alice", needs_approval=True)
    async with build_worker(ts_env.client, golden, sessions, aws, task_queue=queue):
        handle = await ts_env.client.start_workflow(
            NhiLifecycleWorkflow.run,
            LifecycleInput(nhi_id=nhi_id, provision=provision),
            id=lifecycle_workflow_id(nhi_id),
            task_queue=queue,
        )
        decision = await handle.execute_update(
            NhiLifecycleWorkflow.decide,
            ApprovalDecision(approve=True, approver="bob", reason="needed by the docs agent"),
        )
        assert decision.approved

        async def keeping() -> None:  # past its approval timer, on the lifecycle's
            events = (await handle.fetch_history()).events
            started = [e for e in events if e.event_type == EventType.EVENT_TYPE_TIMER_STARTED]
            assert len(started) == 2

        await eventually(keeping)
        renewed = await handle.execute_update(
            NhiLifecycleWorkflow.renew, RenewRequest(actor="ana@example.com", reason="golden")
        )
        assert renewed.message == "renewed"
        history = await handle.fetch_history()
    assert nhi_row(sessions, nhi_id).status == "active"
    # Provisioning's two platform calls, then the renewal's.
    assert _activities(history) == [
        "create_identity",
        "deliver_credential",
        "update_expiry",
        "change_status",
    ]
    assert {"begin_provisioning", "record_approval", "record_active", "load_lifecycle"} <= set(
        _local_activities(history)
    )
    await _replay(history)
    keep_history(history, "aws_one_run")


async def test_aws_sweeps_of_today_replay(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    """A sweep meeting an NHI whose lifecycle is gone (unsupervised), one stuck before active
    (pre-active), a tagged orphan (removed after its grace period by the child it starts) and
    an untagged identity (reported); then one meeting an NHI deleted behind the service's back
    (missing). Two sweeps, because the time-skipping test server stops skipping once an update
    has ended a run (the lifecycle's `mark_missing`), and the orphan's grace must be skipped."""
    golden = sweep_settings(
        settings,
        "golden",
        orphan_grace_seconds=3600,
        sweep_preactive_seconds=3600,
        aws_max_attempts=1,
    )
    queue = golden.temporal_task_queue
    env = ts_env

    async def requested() -> uuid.UUID:
        now = await env.get_current_time()
        return request_nhi(sessions, golden, "iam_role", now=now)[1]

    def findings(outcome: SweepOutcome) -> set[tuple[FindingKind, object]]:
        inventoried = (FindingKind.UNSUPERVISED, FindingKind.MISSING, FindingKind.PREACTIVE)
        return {
            (f.kind, f.nhi_id if f.kind in inventoried else f.identity) for f in outcome.findings
        }

    async with build_worker(env.client, golden, sessions, aws, task_queue=queue):
        lost, gone, stuck = await requested(), await requested(), await requested()
        for nhi_id in (lost, gone):
            await provision(env, queue, nhi_id)
        lifecycle = env.client.get_workflow_handle(lifecycle_workflow_id(lost))

        async def waiting() -> None:
            # Terminated mid-activity, a run could keep the test server's clock locked.
            described = (await lifecycle.describe()).raw_description
            assert not described.pending_activities
            assert not described.HasField("pending_workflow_task")

        await eventually(waiting)
        await lifecycle.terminate(reason="lost")
        with transaction(sessions) as s:  # requested two hours ago, never provisioned
            row = s.get_one(Nhi, stuck)
            row.created_at = row.created_at - timedelta(hours=2)
        orphan, _ = orphan_user(aws, golden)
        stranger = f"{golden.name_prefix}-manual-admin"
        aws.iam.create_user(UserName=stranger, Path=golden.iam_path)

        first_id = f"golden-sweep-{uuid.uuid4().hex[:8]}"
        first = await run_sweep(env, queue, workflow_id=first_id)
        assert findings(first) == {
            (FindingKind.UNSUPERVISED, lost),
            (FindingKind.PREACTIVE, stuck),
            (FindingKind.ORPHAN, orphan),
            (FindingKind.UNTAGGED, stranger),
        }, first.findings
        removal = env.client.get_workflow_handle(orphan_workflow_id("iam_user_key", orphan))
        async with env.time_skipping_unlocked():  # type: ignore[attr-defined]
            removed = await removal.result()
        assert any(orphan in r for r in removed), removed

        async def redriven() -> None:  # as one run per NHI, which then keeps it
            assert nhi_row(sessions, stuck).status == "active"

        await eventually(redriven)

        delete_role(aws, nhi_row(sessions, gone).name)  # someone in the console
        second_id = f"golden-sweep-{uuid.uuid4().hex[:8]}"
        second = await run_sweep(env, queue, workflow_id=second_id)
        assert findings(second) == {
            (FindingKind.MISSING, gone),
            (FindingKind.UNTAGGED, stranger),
        }, second.findings
        assert nhi_row(sessions, gone).status == "missing"
        histories = {
            "sweep_aws": await env.client.get_workflow_handle(first_id).fetch_history(),
            "orphan_removal_aws": await removal.fetch_history(),
            "sweep_aws_missing": await env.client.get_workflow_handle(second_id).fetch_history(),
        }
    for name, history in histories.items():
        await _replay(history)
        keep_history(history, name)


async def test_a_postgres_sweep_of_today_replays(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    cluster: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Postgres sweep meeting a role granted more than its scope by hand (drift, reverted),
    an NHI whose roles were dropped behind the service's back (missing) and a target whose
    admin password cannot be found (unreachable, the others still listed)."""
    target = f"golden{uuid.uuid4().hex[:6]}"
    password_env = f"NHI_TEST_PW_{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv(password_env, cluster.admin_password)  # the deployment's environment
    dsn = f"postgresql://{ADMIN}@{cluster.host}:{cluster.port}/{DATABASE}"
    golden = sweep_settings(
        settings,
        "golden",
        postgres_targets={
            target: PostgresTargetSetting(dsn=dsn, password_env=password_env),
            f"{target}-down": PostgresTargetSetting(dsn=dsn, password_env="NHI_TEST_NOT_SET"),
        },
    )
    queue = golden.temporal_task_queue
    env = ts_env

    async def active() -> uuid.UUID:
        now = await env.get_current_time()
        scope = [{"actions": ["SELECT"], "resources": ["docs.articles"]}]
        nhi_id = request_nhi(sessions, golden, "postgres_role", scope=scope, target=target, now=now)
        await provision(env, queue, nhi_id[1])
        return nhi_id[1]

    async with build_worker(env.client, golden, sessions, aws, task_queue=queue):
        widened, gone = await active(), await active()
        with cluster.connect(ADMIN, cluster.admin_password) as conn:
            conn.execute(f"GRANT SELECT ON docs.faq TO {nhi_row(sessions, widened).name}")
        with cluster.connect(ADMIN, cluster.admin_password) as conn:
            # Someone drops the group and its logins by hand, as the admin (who granted them).
            roles = [
                f'"{r}"'
                for (r,) in conn.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname LIKE %s ORDER BY rolcanlogin DESC",
                    (nhi_row(sessions, gone).name + "%",),
                ).fetchall()
            ]
            assert roles
            conn.execute(f"GRANT {', '.join(roles)} TO CURRENT_USER")
            conn.execute(f"DROP OWNED BY {', '.join(roles)}")
            for role in roles:  # logins first: they are members of the group
                conn.execute(f"DROP ROLE {role}")

        sweep_id = f"golden-pg-sweep-{uuid.uuid4().hex[:8]}"
        outcome = await run_sweep(env, queue, provider="postgres", workflow_id=sweep_id)
        # Only this test's targets and their NHIs: other tests' targets share the inventory.
        ours = {target, f"{target}-down"}
        with transaction(sessions) as s:
            our_nhis = set(s.scalars(select(Nhi.id).where(Nhi.target.in_(ours))))
        # (A finding naming another test's NHI is not ours either: a task role left on the
        # shared cluster by an earlier test is listed through this test's target too.)
        found = {
            (f.kind, f.nhi_id or f.identity)
            for f in outcome.findings
            if f.nhi_id in our_nhis
            or (f.nhi_id is None and (f.target in ours or f.identity in ours))
        }
        assert found == {
            (FindingKind.DRIFT, widened),
            (FindingKind.MISSING, gone),
            (FindingKind.UNREACHABLE, f"{target}-down"),
        }, outcome.findings
        assert nhi_row(sessions, gone).status == "missing"
        history = await env.client.get_workflow_handle(sweep_id).fetch_history()
    await _replay(history)
    keep_history(history, "sweep_postgres")
