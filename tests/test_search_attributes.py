"""Search attributes: every NHI workflow is tagged, the tags follow its status and expiry, the
queries the README gives for the Web UI and the CLI return the right workflows on the dev
server, and `nhi temporal setup` registers them on a cluster that lacks them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker
from temporalio.api.enums.v1 import EventType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client, WorkflowHistory
from temporalio.common import TypedSearchAttributes
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from api.routes.nhis import _search_attributes, _start
from models.contracts import (
    LifecycleAction,
    LifecycleInput,
    ProvisionInput,
    RenewRequest,
    SweepInput,
)
from models.enums import NhiStatus, Platform
from models.orm import Nhi
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.rules import search_attributes as sa
from nhi.rules.ids import LIFECYCLE_WORKFLOW, lifecycle_workflow_id
from tests.conftest import Service, binary, dev_address
from tests.helpers import (
    ROLE_SCOPE,
    TRUST,
    agent_body,
    api_json,
    bearer,
    eventually,
    keep_history,
    nhi_row,
    request_nhi,
)
from worker import WORKFLOWS, build_worker
from workflows.lifecycle import NhiLifecycleWorkflow
from workflows.sweep import SweepWorkflow
from workflows.tagging import PATCH

NHI = str(Path(sys.executable).parent / "nhi")


def test_the_queries_read_as_the_readme_shows_them() -> None:
    agent = uuid.UUID("0b7f6f1e-9c1a-4d44-8a51-3f2d2c6f0a10")
    monday = datetime(2026, 11, 30, tzinfo=UTC)
    assert sa.by_agent(agent) == 'AgentId = "0b7f6f1e-9c1a-4d44-8a51-3f2d2c6f0a10"'
    assert sa.expiring_between(monday, monday + timedelta(days=7)) == (
        'WorkflowType = "NhiLifecycleWorkflow" AND ExecutionStatus = "Running" AND '
        'NhiExpiresAt BETWEEN "2026-11-30T00:00:00Z" AND "2026-12-07T00:00:00Z"'
    )
    assert sa.dev_server_flags()[:4] == [
        "--search-attribute",
        "NhiId=Keyword",
        "--search-attribute",
        "AgentId=Keyword",
    ]
    assert "NhiExpiresAt=Datetime" in sa.dev_server_flags()
    with pytest.raises(ValueError, match="not usable"):
        sa._quoted('x" OR AgentId != "')


# ---- the README's queries on the dev server ---------------------------------------------------


def _workflows(nhi_id: str) -> set[str]:
    """An NHI's workflows: one run per NHI, which provisions it and keeps it."""
    return {lifecycle_workflow_id(uuid.UUID(nhi_id))}


async def _listed(client: Client, query: str) -> set[str]:
    return {w.id async for w in client.list_workflows(query)}


def _cli_listed(address: str, query: str) -> set[str]:
    """The same query as the README's `temporal workflow list` command."""
    cmd = [binary("temporal"), "workflow", "list", "--address", address, "--query", query]
    out = subprocess.run(
        [*cmd, "--output", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    rows: Any = json.loads(out) if out.strip().startswith("[") else []
    if not rows:  # one JSON object per line in some CLI versions
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {row["execution"]["workflowId"] for row in rows}


async def _active(http: httpx.AsyncClient, agent_id: str, ttl: str) -> dict[str, Any]:
    accepted = await api_json(
        http,
        "POST",
        f"/v1/agents/{agent_id}/nhis",
        json={
            "platform": "aws",
            "kind": "iam_role",
            "scope": ROLE_SCOPE,
            "ttl": ttl,
            "trust_principal": TRUST,
        },
    )

    async def active() -> dict[str, Any]:
        nhi = await api_json(http, "GET", f"/v1/nhis/{accepted['id']}")
        assert nhi["status"] == "active", nhi
        return dict(nhi)

    return await eventually(active)


async def _tags(client: Client, workflow_id: str) -> TypedSearchAttributes:
    return (await client.get_workflow_handle(workflow_id).describe()).typed_search_attributes


def _ours(tags: TypedSearchAttributes) -> set[str]:
    """Which of our attributes a run has (the SDK adds `TemporalChangeVersion` on patches)."""
    return {k.name for k in sa.KEYS if tags.get(k) is not None}


async def test_readme_queries_return_the_right_workflows(service: Service) -> None:
    client = service.env.client
    token = service.token("sa-owner", "platform", teams=["search"], email="ana@example.com")
    async with httpx.AsyncClient(base_url=service.url, headers=bearer(token), timeout=30) as http:
        agent_a = (await api_json(http, "POST", "/v1/agents", json=agent_body()))["id"]
        agent_b = (await api_json(http, "POST", "/v1/agents", json=agent_body()))["id"]
        a_soon, a_later, b_soon = await asyncio.gather(
            _active(http, agent_a, "3d"),
            _active(http, agent_a, "30d"),
            _active(http, agent_b, "2d"),
        )

        # "Every workflow of agent X": its NHIs' runs, nothing else.
        of_a = sa.by_agent(uuid.UUID(agent_a))
        expected = _workflows(a_soon["id"]) | _workflows(a_later["id"])

        async def agent_found() -> None:
            assert await _listed(client, of_a) == expected

        await eventually(agent_found)
        address = dev_address(service.env)
        assert await asyncio.to_thread(_cli_listed, address, of_a) == expected

        # "NHIs expiring this week": one lifecycle per NHI, whatever the agent.
        now = datetime.now(UTC)
        this_week = sa.expiring_between(now, now + timedelta(days=7))
        soon = {lifecycle_workflow_id(uuid.UUID(n["id"])) for n in (a_soon, b_soon)}
        later = _workflows(a_later["id"])

        async def expiring_found() -> set[str]:
            found = await _listed(client, this_week)
            assert soon <= found and not later & found, found
            return found

        await eventually(expiring_found)
        cli_found = await asyncio.to_thread(_cli_listed, address, this_week)
        assert soon <= cli_found and not later & cli_found

        lifecycle = lifecycle_workflow_id(uuid.UUID(a_soon["id"]))
        tags = await _tags(client, lifecycle)
        assert tags.get(sa.NHI_ID) == a_soon["id"] and tags.get(sa.AGENT_ID) == agent_a
        assert (tags.get(sa.OWNER), tags.get(sa.TEAM)) == ("ana@example.com", "search")
        assert (tags.get(sa.PLATFORM), tags.get(sa.NHI_KIND)) == ("aws", "iam_role")
        assert tags.get(sa.NHI_STATUS) == "active"
        expires_at = datetime.fromisoformat(a_soon["expires_at"])
        tagged_expiry = tags.get(sa.NHI_EXPIRES_AT)
        assert tagged_expiry is not None and abs(tagged_expiry - expires_at) < timedelta(seconds=1)
        # The sweep's unsupervised check lists running lifecycles by platform.
        assert lifecycle in await _listed(client, sa.running(LIFECYCLE_WORKFLOW, Platform.AWS))
        assert lifecycle not in await _listed(
            client, sa.running(LIFECYCLE_WORKFLOW, Platform.POSTGRES)
        )

        # A renewal moves the expiry out of the week; a decommission moves the status.
        await api_json(http, "POST", f"/v1/nhis/{a_soon['id']}/renew", json={"extend_by": "30d"})
        await api_json(
            http, "POST", f"/v1/nhis/{b_soon['id']}/decommission", json={"reason": "done"}
        )
        of_b = sa.by_agent(uuid.UUID(agent_b))
        quarantined = f"{of_b} AND {sa.with_status([NhiStatus.QUARANTINED])}"

        async def moved() -> None:
            assert lifecycle not in await _listed(client, this_week)
            assert await _listed(client, quarantined) == {
                lifecycle_workflow_id(uuid.UUID(b_soon["id"]))
            }

        await eventually(moved)

    # Today's tagged path, as a golden history: it replays from scratch. (`tagged_provision`
    # and `tagged_lifecycle` keep the two runs of before, which running NHIs may still be on.)
    history = await client.get_workflow_handle(lifecycle).fetch_history()
    assert _upserted_statuses(history)[:2] == ["provisioning", "active"]
    await _replay(history)
    keep_history(history, "tagged_one_run")


# ---- tags follow the status; untagged runs issue nothing (time-skipping server) ---------------


def _upserts(history: WorkflowHistory) -> list[dict[str, Any]]:
    """Our attributes each upsert set (the SDK's own `TemporalChangeVersion` upserts aside)."""
    ours = {k.name for k in sa.KEYS}
    out = []
    for e in history.events:
        if e.event_type != EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            continue
        fields = e.upsert_workflow_search_attributes_event_attributes.search_attributes
        mine = {k: json.loads(v.data) for k, v in fields.indexed_fields.items() if k in ours}
        if mine:
            out.append(mine)
    return out


def _upserted_statuses(history: WorkflowHistory) -> list[str]:
    return [u[sa.NHI_STATUS.name] for u in _upserts(history)]


def _patch_markers(history: WorkflowHistory) -> list[str]:
    return [
        json.loads(e.marker_recorded_event_attributes.details["patch-data"].payloads[0].data)["id"]
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
        and "patch-data" in e.marker_recorded_event_attributes.details
    ]


async def _replay(history: WorkflowHistory) -> None:
    result = await Replayer(
        workflows=WORKFLOWS, data_converter=pydantic_data_converter
    ).replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None


async def _start_provisioning(
    env: WorkflowEnvironment, sessions: sessionmaker[Session], nhi_id: uuid.UUID, queue: str
) -> None:
    with transaction(sessions) as s:
        tags = _search_attributes(s.get_one(Nhi, nhi_id))
    await _start(
        env.client, ProvisionInput(nhi_id=nhi_id), lifecycle_workflow_id(nhi_id), queue,
        timedelta(seconds=10), tags,
    )  # fmt: skip


async def _kept(sessions: sessionmaker[Session], nhi_ids: list[uuid.UUID]) -> None:
    """Until each NHI is active (its one run then keeps it)."""

    async def active() -> None:
        for nhi_id in nhi_ids:
            assert nhi_row(sessions, nhi_id).status == "active"

    await eventually(active)


async def test_tags_follow_the_status_to_the_end_and_untagged_runs_issue_nothing(
    ts_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    _, tagged, _ = request_nhi(sessions, settings, "iam_role")
    _, untagged, _ = request_nhi(sessions, settings, "iam_role")
    queue = f"sa-{uuid.uuid4().hex[:8]}"
    client = ts_env.client
    async with build_worker(client, settings, sessions, aws, task_queue=queue):
        with ts_env.auto_time_skipping_disabled():
            await _start_provisioning(ts_env, sessions, tagged, queue)
            await client.start_workflow(
                NhiLifecycleWorkflow.run,
                LifecycleInput(nhi_id=untagged, provision=ProvisionInput(nhi_id=untagged)),
                id=lifecycle_workflow_id(untagged),
                task_queue=queue,
            )
            await _kept(sessions, [tagged, untagged])
        handles = [
            client.get_workflow_handle_for(NhiLifecycleWorkflow.run, lifecycle_workflow_id(n))
            for n in (tagged, untagged)
        ]
        for handle in handles:
            await handle.execute_update(
                NhiLifecycleWorkflow.decommission,
                LifecycleAction(actor="security:sa-test", channel="api", reason="test"),
            )
        # Handles from get_workflow_handle do not skip time by themselves: unlock it, so the
        # grace period passes and both runs remove their identity and end.
        async with ts_env.time_skipping_unlocked():  # type: ignore[attr-defined]
            await asyncio.gather(*(h.result() for h in handles))
    assert nhi_row(sessions, tagged).status == "decommissioned"

    lifecycle = await client.get_workflow_handle(lifecycle_workflow_id(tagged)).fetch_history()
    # Provisioning, then the lifecycle's load (every attribute), then its own changes.
    assert _upserted_statuses(lifecycle) == [
        "provisioning",
        "active",
        "quarantined",
        "decommissioned",
    ]
    assert _patch_markers(lifecycle).count(PATCH) == 1
    tags = await _tags(client, lifecycle_workflow_id(tagged))
    assert tags.get(sa.NHI_STATUS) == "decommissioned" and tags.get(sa.NHI_ID) == str(tagged)

    untagged_run = lifecycle_workflow_id(untagged)
    history = await client.get_workflow_handle(untagged_run).fetch_history()
    assert _upserts(history) == [] and PATCH not in _patch_markers(history)
    assert _ours(await _tags(client, untagged_run)) == set()
    await _replay(lifecycle)


async def test_unsupervised_tagged_lifecycles_are_found_by_their_platform(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
) -> None:
    tag = uuid.uuid4().hex[:6]
    queue = f"sav-{tag}"
    own = settings.model_copy(
        update={
            "temporal_task_queue": queue,
            "iam_path": f"/sav-{tag}/",
            "name_prefix": f"s{tag}",
            "sweep_propagation_seconds": 0,
            "sweep_calls_per_second": 1000.0,
        }
    )
    client = dev_env.client
    async with build_worker(client, own, sessions, aws, task_queue=queue):
        ids = [request_nhi(sessions, own, "iam_role")[1] for _ in range(2)]
        for nhi_id in ids:
            await _start_provisioning(dev_env, sessions, nhi_id, queue)
        await _kept(sessions, ids)
        lost, kept = ids
        assert sa.PLATFORM.name in _ours(await _tags(client, lifecycle_workflow_id(kept)))
        await client.get_workflow_handle(lifecycle_workflow_id(lost)).terminate(reason="lost")
        outcome = await client.execute_workflow(
            SweepWorkflow.run, SweepInput(triggered_by="test"), id=f"sweep-{tag}", task_queue=queue
        )
        unsupervised = [f.nhi_id for f in outcome.findings if f.kind.value == "unsupervised"]
        assert unsupervised == [lost]
        # The restarted lifecycle is tagged like the run it replaces.
        restarted = await _tags(client, lifecycle_workflow_id(lost))
        assert _ours(restarted) == {k.name for k in sa.KEYS}
        assert restarted.get(sa.NHI_ID) == str(lost)
        for nhi_id in ids:  # leave nothing running on the shared dev server
            await client.get_workflow_handle(lifecycle_workflow_id(nhi_id)).terminate()


async def test_a_continued_lifecycle_keeps_its_tags(
    settings: Settings, sessions: sessionmaker[Session], aws: AwsClients
) -> None:
    """Continue-as-new starts the next run tagged (the tags then follow it as before)."""
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=binary("temporal"),
        search_attributes=sa.KEYS,
        dev_server_extra_args=[
            "--dynamic-config-value",
            "limit.historyCount.suggestContinueAsNew=40",
        ],
    )
    queue = f"sacan-{uuid.uuid4().hex[:8]}"
    try:
        _, nhi_id, _ = request_nhi(sessions, settings, "iam_role", ttl="10d")
        async with build_worker(env.client, settings, sessions, aws, task_queue=queue):
            await _start_provisioning(env, sessions, nhi_id, queue)
            await _kept(sessions, [nhi_id])
            handle = env.client.get_workflow_handle_for(
                NhiLifecycleWorkflow.run, lifecycle_workflow_id(nhi_id)
            )
            first_run = (await handle.describe()).run_id
            for days in range(11, 19):
                view = await handle.execute_update(
                    NhiLifecycleWorkflow.renew,
                    RenewRequest(actor="ana@example.com", extend_by_seconds=days * 86400),
                )

            async def continued() -> TypedSearchAttributes:
                description = await handle.describe()
                assert description.run_id != first_run, "still the first run"
                return description.typed_search_attributes

            tags = await eventually(continued, timeout=30)
            assert _ours(tags) == {k.name for k in sa.KEYS}
            assert tags.get(sa.NHI_EXPIRES_AT) == view.expires_at
            started = (await handle.fetch_history()).events[0]
            carried = started.workflow_execution_started_event_attributes.search_attributes
            assert sa.NHI_ID.name in carried.indexed_fields, "set by the continue-as-new itself"
            await handle.terminate()
    finally:
        await env.shutdown()


# ---- registration -----------------------------------------------------------------------------


async def test_temporal_setup_registers_them_once_and_untagged_starts_work_without(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter, dev_server_existing_path=binary("temporal")
    )
    try:
        # Before setup the namespace lacks them: provisioning still starts, untagged.
        _, nhi_id, _ = request_nhi(sessions, settings, "iam_role")
        await _start_provisioning(env, sessions, nhi_id, f"nobody-{uuid.uuid4().hex[:6]}")
        assert _ours(await _tags(env.client, lifecycle_workflow_id(nhi_id))) == set()

        cmd_env = dict(os.environ, NHI_TEMPORAL_ADDRESS=dev_address(env))

        def setup() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [NHI, "temporal", "setup"], env=cmd_env, capture_output=True, text=True, timeout=60
            )

        first = await asyncio.to_thread(setup)
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines() == [
            f"{k.name} ({sa.type_name(k)}): registered" for k in sa.KEYS
        ]
        again = await asyncio.to_thread(setup)
        assert again.returncode == 0, again.stderr
        assert all(line.endswith("already registered") for line in again.stdout.splitlines())
        listed = await env.client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=env.client.namespace)
        )
        assert {k.name for k in sa.KEYS} <= set(listed.custom_attributes)
    finally:
        await env.shutdown()


def test_temporal_setup_unreachable_is_one_line() -> None:
    from tests.helpers import free_port

    result = subprocess.run(
        [NHI, "temporal", "setup"],
        env=dict(os.environ, NHI_TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "cannot reach Temporal" in result.stderr
