"""`/metrics` of the API and the worker, through the real processes (`uvicorn api.app:app`,
`python worker.py`) on an inventory database of this module's own: after provisioning,
rotating, decommissioning and letting expire a few NHIs, the counts are the expected ones; an
NHI forced past its expiry with its lifecycle terminated shows as overdue; every metric the
alert rules and the Grafana dashboard name is exposed."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import pytest_asyncio
import yaml
from sqlalchemy import text
from temporalio.testing import WorkflowEnvironment

from nhi.infra.config import Settings
from nhi.infra.db import make_engine, make_sessionmaker, transaction, upgrade_head
from tests.conftest import Databases, dev_address
from tests.helpers import ROLE_SCOPE, TRUST, agent_body, api_json, bearer, eventually, mint
from tests.ops_procs import api_process, names, value, worker_process
from workflows.lifecycle import lifecycle_workflow_id

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "nhi-lifecycle.json"
AWS_ROLE = {"platform": "aws", "kind": "iam_role", "environment": "dev"}
AWS_KEY = {"platform": "aws", "kind": "iam_user_key", "environment": "dev"}


@dataclass
class Exercised:
    """The pages both processes served after the scenario, and what the scenario did."""

    api: str
    worker: str
    nhis: dict[str, str]


async def _scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=15) as http:
        response = await http.get(url + "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def _fast_policy(admin: httpx.AsyncClient) -> None:
    """aws/iam_role/dev with no grace period and a reminder 10 s before expiry, applied through
    the API as an operator would: decommissions and expiries finish within the test."""
    current = await api_json(admin, "GET", "/v1/policies")
    [policy] = [p for p in current if all(p[k] == v for k, v in AWS_ROLE.items())]
    body = {
        **AWS_ROLE,
        "allowed": policy["allowed"],
        "default_ttl": policy["default_ttl_seconds"],
        "max_lifetime": policy["max_lifetime_seconds"],
        "rotation_period": policy["rotation_period_seconds"],
        "reminder_offsets": [10],
        "grace_period": 0,
        "max_session_duration": policy["max_session_duration_seconds"],
        "allow_resource_wildcard": policy["allow_resource_wildcard"],
        "forbidden_actions": policy["forbidden_actions"],
        "sensitive_actions": policy["sensitive_actions"],
    }
    await api_json(admin, "PUT", "/v1/policies", json={"policies": [body]})


async def _status(http: httpx.AsyncClient, nhi_id: str, status: str, timeout: float = 60) -> None:
    async def reached() -> None:
        nhi = await api_json(http, "GET", f"/v1/nhis/{nhi_id}")
        assert nhi["status"] == status, nhi

    await eventually(reached, timeout=timeout, interval=0.3)


async def _event(http: httpx.AsyncClient, nhi_id: str, event: str) -> None:
    async def recorded() -> None:
        events = await api_json(http, "GET", f"/v1/nhis/{nhi_id}/events")
        assert event in {e["event"] for e in events}, events

    await eventually(recorded, timeout=60, interval=0.3)


@pytest_asyncio.fixture(scope="module")
async def exercised(
    dev_env: WorkflowEnvironment, databases: Databases, moto_url: str
) -> AsyncIterator[Exercised]:
    url = databases.new("nhi_metrics")
    upgrade_head(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    common = {
        "NHI_DATABASE_URL": url,
        "NHI_TEMPORAL_ADDRESS": dev_address(dev_env),
        "NHI_TEMPORAL_TASK_QUEUE": f"nhi-metrics-{uuid.uuid4().hex[:8]}",
        "NHI_AWS_ENDPOINT_URL": moto_url,
        "NHI_AWS_REGION": "us-east-1",
    }
    with (
        worker_process(**common, NHI_ROTATION_OVERLAP_SECONDS="1") as worker,
        api_process(**common, NHI_METRICS_REFRESH_SECONDS="0.5") as api,
    ):
        # Counting starts at the API's first refresh: wait for it before doing anything.
        async def refreshed() -> None:
            assert value(await _scrape(api.url), "nhi_inventory_refresh_timestamp_seconds") > 0

        await eventually(refreshed)
        admin_token = mint(sessions, "ops-admin", "admin")
        owner_token = mint(
            sessions, "ops-ana", "platform", teams=["search"], email="ana@example.com"
        )
        async with (
            httpx.AsyncClient(base_url=api.url, headers=bearer(admin_token), timeout=30) as admin,
            httpx.AsyncClient(base_url=api.url, headers=bearer(owner_token), timeout=30) as http,
        ):
            await _fast_policy(admin)
            agent = await api_json(http, "POST", "/v1/agents", json=agent_body())
            role = {"platform": "aws", "kind": "iam_role", "scope": ROLE_SCOPE}
            requests = {
                "kept": {**role, "ttl": "2d", "trust_principal": TRUST},
                "decommissioned": {**role, "ttl": "2d", "trust_principal": TRUST},
                "expired": {**role, "ttl": "25s", "trust_principal": TRUST},
                "rotated": {
                    "platform": "aws",
                    "kind": "iam_user_key",
                    "scope": ROLE_SCOPE,
                    "ttl": "2d",
                },
            }
            nhis = {}
            for name, body in requests.items():
                accepted = await api_json(http, "POST", f"/v1/agents/{agent['id']}/nhis", json=body)
                nhis[name] = accepted["id"]
            for nhi_id in nhis.values():
                await _status(http, nhi_id, "active")

            await api_json(http, "POST", f"/v1/nhis/{nhis['rotated']}/rotate", json={"reason": "t"})
            await api_json(
                http,
                "POST",
                f"/v1/nhis/{nhis['decommissioned']}/decommission",
                json={"reason": "t"},
            )
            await _event(http, nhis["rotated"], "nhi.rotated")
            await _status(http, nhis["decommissioned"], "decommissioned")
            await _status(http, nhis["expired"], "decommissioned", timeout=90)
            await _status(http, nhis["rotated"], "active")
            assert (await http.get("/no/such/path")).status_code == 404

            # Its lifecycle gone and its expiry passed: what a missed deadline looks like.
            await dev_env.client.get_workflow_handle(lifecycle_workflow_id(nhis["kept"])).terminate(
                reason="metrics test: a lifecycle that stopped"
            )
            with transaction(sessions) as session:
                session.execute(
                    text("UPDATE nhis SET expires_at = now() - interval '1 hour' WHERE id = :id"),
                    {"id": nhis["kept"]},
                )

        async def settled() -> tuple[str, str]:
            api_page = await _scrape(api.url)
            assert value(api_page, "nhi_overdue", **AWS_ROLE) == 1
            assert value(api_page, "nhi_lifecycle_events_total", event="nhi.decommissioned") == 2
            worker_page = await _scrape(worker.url)
            assert value(worker_page, "nhi_removals_total", outcome="ok") == 2
            return api_page, worker_page

        api_page, worker_page = await eventually(settled, timeout=30, interval=0.5)
        yield Exercised(api=api_page, worker=worker_page, nhis=nhis)
    engine.dispose()


@pytest.mark.slow
async def test_inventory_gauges_count_what_happened(exercised: Exercised) -> None:
    page = exercised.api
    # kept (forced overdue) is still active; decommissioned and expired are gone.
    assert value(page, "nhi_nhis", **AWS_ROLE, status="active") == 1
    assert value(page, "nhi_nhis", **AWS_ROLE, status="decommissioned") == 2
    assert value(page, "nhi_nhis", **AWS_KEY, status="active") == 1
    assert value(page, "nhi_nhis") == 4
    assert value(page, "nhi_overdue", **AWS_ROLE) == 1
    assert value(page, "nhi_overdue", **AWS_KEY) == 0
    # rotated expires in two days: within 7 d, not within 24 h; the overdue one is in neither.
    assert value(page, "nhi_expiring", **AWS_KEY, within="7d") == 1
    assert value(page, "nhi_expiring", within="24h") == 0
    assert value(page, "nhi_expiring", **AWS_ROLE, within="7d") == 0
    assert value(page, "nhi_pending_approvals") == 0
    assert value(page, "nhi_revoke_failed_oldest_age_seconds") == 0
    assert value(page, "nhi_dependency_up", dependency="database") == 1
    assert value(page, "nhi_dependency_up", dependency="temporal") == 1
    assert value(page, "nhi_task_queue_pollers", type="workflow") >= 1
    assert value(page, "nhi_task_queue_pollers", type="activity") >= 1


@pytest.mark.slow
async def test_latencies_and_events_come_from_new_audit_events(exercised: Exercised) -> None:
    page = exercised.api
    role = {"platform": "aws", "kind": "iam_role"}
    key = {"platform": "aws", "kind": "iam_user_key"}
    assert value(page, "nhi_provisioning_latency_seconds_count", **role) == 3
    assert value(page, "nhi_provisioning_latency_seconds_count", **key) == 1
    # Every provisioning took seconds, not minutes, on this machine.
    assert value(page, "nhi_provisioning_latency_seconds_bucket", **role, le="60.0") == 3
    # Only the NHI that expired has an expiry-to-unusable latency (the other was on request).
    assert value(page, "nhi_decommission_latency_seconds_count", **role) == 1
    assert value(page, "nhi_decommission_latency_seconds_bucket", **role, le="30.0") == 1
    for event, count in {
        "nhi.activated": 4,
        "nhi.rotated": 1,
        "nhi.quarantined": 2,
        "nhi.decommissioned": 2,
    }.items():
        assert value(page, "nhi_lifecycle_events_total", event=event) == count, event


@pytest.mark.slow
async def test_requests_are_counted_by_route_template(exercised: Exercised) -> None:
    page = exercised.api
    route = "/v1/agents/{agent_id}/nhis"
    assert value(page, "nhi_http_requests_total", method="POST", route=route, status="202") == 4
    assert value(page, "nhi_http_requests_total", method="POST", route="/v1/agents") == 1
    assert value(page, "nhi_http_requests_total", route="unmatched", status="404") == 1
    assert not re.search(r'route="[^"]*[0-9a-f]{8}-[0-9a-f]{4}', page), "an id became a label"
    assert value(page, "nhi_http_request_duration_seconds_count", method="POST", route=route) == 4
    # The Temporal SDK's own metrics, merged into the same page by the served app.
    assert value(page, "temporal_request", operation="DescribeTaskQueue") >= 1


@pytest.mark.slow
async def test_each_process_exports_its_database_pool(exercised: Exercised) -> None:
    api, worker = exercised.api, exercised.worker
    size = Settings.model_fields["api_database_pool_size"].default
    assert value(api, "nhi_db_pool_size") == size
    # One request at a time (and the refresh): connections opened once, then reused.
    assert 1 <= value(api, "nhi_db_connections_opened_total") <= size
    assert value(api, "nhi_db_pool_connections", state="idle") >= 1
    assert (
        value(worker, "nhi_db_pool_size")
        == Settings.model_fields["worker_max_concurrent_activities"].default
    )
    assert value(worker, "nhi_db_connections_opened_total") >= 1
    assert "nhi_db_pool_connections" in names(worker)


@pytest.mark.slow
async def test_worker_counts_activity_outcomes(exercised: Exercised) -> None:
    page = exercised.worker
    assert value(page, "nhi_activity_total", activity="record_active", outcome="ok") == 4
    # Decommissions remove through `delete_identity` (patch `identity-ref-activities`).
    assert value(page, "nhi_activity_total", activity="delete_identity", outcome="ok") == 2
    assert value(page, "nhi_removals_total", outcome="ok") == 2
    assert value(page, "nhi_removals_total", outcome="failed") == 0
    assert value(page, "nhi_reminders_sent_total") >= 1  # the NHI that expired was reminded
    assert value(page, "nhi_activity_total", outcome="failed") == 0
    # The SDK's worker metrics: slots, pollers, task latencies.
    for name in ("temporal_worker_task_slots_available", "temporal_num_pollers"):
        assert value(page, name) > 0, name
    assert "temporal_activity_execution_latency_count" in names(page)
    assert value(page, "process_resident_memory_bytes") > 0


# ---- the alert rules and the dashboard name only metrics that exist ---------------------------
# Grafana's interval variables are not PromQL; they stand for a range.
_GRAFANA_RANGES = ("$__rate_interval", "$__interval", "$__range")


def _named(expressions: list[str]) -> set[str]:
    """Every metric the expressions select, from their parsed PromQL (a syntax error fails)."""
    found: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            found.add(node.name)
        return True

    for expr in expressions:
        for variable in _GRAFANA_RANGES:
            expr = expr.replace(variable, "5m")
        promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_alert_rules_are_well_formed() -> None:
    rules = _rules()
    assert {r["alert"] for r in rules} >= {
        "NhiOverdueExpiry",
        "NhiRevokeFailed",
        "NhiNoWorkerPolling",
        "NhiSweepFailed",
        "NhiSweepOverdue",
        "NhiApiErrorRate",
    }
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("critical", "warning"), rule
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("runbook"), rule["alert"]
        promql_parser.parse(str(rule["expr"]))  # raises on a syntax error


@pytest.mark.slow
async def test_every_metric_the_alerts_name_is_exposed(exercised: Exercised) -> None:
    exposed = names(exercised.api) | names(exercised.worker)
    named = _named([str(r["expr"]) for r in _rules()])
    assert named, "the rules name no metric"
    assert named <= exposed, f"alerts name metrics nobody exposes: {sorted(named - exposed)}"


@pytest.mark.slow
async def test_every_metric_the_dashboard_names_is_exposed(exercised: Exercised) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(exprs) >= 10
    named = _named(exprs)
    exposed = names(exercised.api) | names(exercised.worker)
    assert named <= exposed, (
        f"the dashboard names metrics nobody exposes: {sorted(named - exposed)}"
    )
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]


# ---- the refresh's other gauges, on rows of a database of the test's own ---------------------
def test_refresh_reads_sweeps_revoke_failures_approvals_and_prompts(databases: Databases) -> None:
    from datetime import UTC, datetime, timedelta

    from prometheus_client import generate_latest

    from models.orm import Agent, AuditEvent, Nhi, Prompt, Sweep
    from nhi.infra.metrics import InventoryMetrics, new_registry

    url = databases.new("nhi_refresh")
    upgrade_head(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    now = datetime.now(UTC)
    with transaction(sessions) as s:
        agent = Agent(**agent_body(environment="prod"), created_by="test:setup")
        s.add(agent)
        s.flush()

        def nhi(status: str, name: str) -> Nhi:
            row = Nhi(
                agent_id=agent.id,
                platform="aws",
                kind="iam_role",
                name=name,
                status=status,
                requested_by="test:setup",
                expires_at=now + timedelta(days=3),
                max_lifetime_at=now + timedelta(days=30),
            )
            s.add(row)
            s.flush()
            return row

        stuck = nhi("revoke_failed", "nhi-stuck")
        nhi("pending_approval", "nhi-waiting")
        reminded = nhi("active", "nhi-reminded")
        for minutes in (20, 5):  # failed first 20 min ago, again 5 min ago
            s.add(
                AuditEvent(
                    subject_type="nhi",
                    subject_id=str(stuck.id),
                    event="nhi.revoke_failed",
                    actor="system:decommission",
                    reason="AccessDenied",
                    created_at=now - timedelta(minutes=minutes),
                )
            )
        s.add(
            Prompt(
                nhi_id=reminded.id,
                kind="reminder",
                for_expires_at=reminded.expires_at,
                offset_seconds=86400,
                status="open",
            )
        )
        for provider, status, minutes, dry_run, summary in (
            (
                "aws",
                "completed",
                60,
                False,
                {"orphan": 2, "stale": 1, "truncated": 0, "dry_run": 0},
            ),
            ("aws", "completed", 120, False, {"orphan": 9}),  # older: not the latest
            ("aws", "failed", 10, False, {}),
            ("postgres", "completed", 5, True, {"orphan": 4}),  # a dry run changes nothing
        ):
            s.add(
                Sweep(
                    provider=provider,
                    dry_run=dry_run,
                    triggered_by="test:setup",
                    workflow_id=f"sweep-{uuid.uuid4()}",
                    status=status,
                    finished_at=now - timedelta(minutes=minutes),
                    summary=summary,
                )
            )

    registry = new_registry()
    metrics = InventoryMetrics(registry, 86400)
    with transaction(sessions) as s:
        snap = metrics.refresh(s)
    engine.dispose()
    page = generate_latest(registry).decode()
    assert snap.nhis[("aws", "iam_role", "prod", "revoke_failed")] == 1
    assert value(page, "nhi_pending_approvals") == 1
    assert value(page, "nhi_open_prompts") == 1
    assert 20 * 60 - 5 <= value(page, "nhi_revoke_failed_oldest_age_seconds") <= 20 * 60 + 60
    assert value(page, "nhi_expiring", within="7d", environment="prod") == 1  # the active one
    success = value(page, "nhi_sweep_last_success_timestamp_seconds", provider="aws")
    failure = value(page, "nhi_sweep_last_failure_timestamp_seconds", provider="aws")
    assert abs(success - (now - timedelta(minutes=60)).timestamp()) < 1
    assert failure > success  # what NhiSweepFailed fires on
    assert value(page, "nhi_sweep_findings", provider="aws", kind="orphan") == 2
    assert value(page, "nhi_sweep_findings", provider="aws", kind="stale") == 1
    assert "truncated" not in page and 'provider="postgres"' not in page
    assert value(page, "nhi_sweep_interval_seconds") == 86400


# ---- nhi_counts (migration 0009) against a direct GROUP BY ------------------------------------
_AGENT_SQL = text(
    """
    INSERT INTO agents (id, name, category, environment, owner_email, team, purpose,
                        invokers, status, created_by)
    VALUES (:id, :name, 'rag', :env, 'ana@example.com', 'search', 'counts test', '[]',
            'active', 'test:setup')
    """
)
# Rows spread over kinds, statuses and expiries (some past, some within 24 h or 7 d).
_NHIS_SQL = text(
    """
    INSERT INTO nhis (id, agent_id, platform, kind, name, granted_scope, allowed_cidrs, status,
                      requested_by, expires_at, max_lifetime_at)
    SELECT gen_random_uuid(), :agent, 'aws',
           (ARRAY['iam_role', 'iam_user_key'])[1 + i % 2],
           :prefix || i, '[]', '[]',
           (ARRAY['active', 'rotating', 'expiring', 'pending_approval', 'decommissioned',
                  'revoke_failed', 'requested'])[1 + i % 7],
           'test:setup',
           now() + (i % 11 - 2) * interval '13 hours',
           now() + interval '30 days'
    FROM generate_series(1, :count) AS i
    """
)


def _direct(session: Any) -> tuple[dict[tuple[str, ...], int], dict[tuple[str, ...], int]]:
    """(counts by platform, kind, environment, status; usable due counts by platform, kind,
    environment, window), from the query the gauges used before the counts table."""
    from nhi.infra.metrics import DIRECT_INVENTORY_SQL

    counts: dict[tuple[str, ...], int] = {}
    due: dict[tuple[str, ...], int] = {}
    for platform, kind, env, status, total, late, day, week in session.execute(
        DIRECT_INVENTORY_SQL
    ).all():
        counts[(platform, kind, env, status)] = int(total)
        for window, n in (("overdue", late), ("24h", day), ("7d", week)):
            key = (platform, kind, env, window)
            due[key] = due.get(key, 0) + int(n)
    return counts, due


def test_trigger_maintained_counts_equal_a_direct_group_by(databases: Databases) -> None:
    from prometheus_client import generate_latest

    from nhi.infra.metrics import InventoryMetrics, fold_counts, new_registry, read_counts

    url = databases.new("nhi_counts")
    upgrade_head(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    dev, prod = uuid.uuid4(), uuid.uuid4()
    deltas = text("SELECT count(*) FROM nhi_counts")

    def check(label: str) -> None:
        with transaction(sessions) as s:
            expected, _ = _direct(s)
            assert read_counts(s) == expected, f"{label}: before the fold"
            assert fold_counts(s)
            assert read_counts(s) == expected, f"{label}: after the fold"
            assert s.execute(deltas).scalar_one() == len(expected), "one row per combination"

    try:
        with transaction(sessions) as s:
            for agent, env in ((dev, "dev"), (prod, "prod")):
                s.execute(_AGENT_SQL, {"id": agent, "name": f"counts-{env}", "env": env})
        check("empty")
        with transaction(sessions) as s:  # bulk inserts: one statement, many rows
            s.execute(_NHIS_SQL, {"agent": dev, "prefix": "d", "count": 200})
            s.execute(_NHIS_SQL, {"agent": prod, "prefix": "p", "count": 90})
        check("inserted")
        with transaction(sessions) as s:  # status transitions, bulk and one by one
            s.execute(text("UPDATE nhis SET status = 'expiring' WHERE status = 'active'"))
            s.execute(text("UPDATE nhis SET status = 'decommissioned' WHERE status = 'rotating'"))
            one = s.execute(text("SELECT id FROM nhis WHERE status = 'requested' LIMIT 1"))
            s.execute(
                text("UPDATE nhis SET status = 'active' WHERE id = :id"),
                {"id": one.scalar_one()},
            )
            s.execute(text("UPDATE nhis SET kind = 'iam_role' WHERE name = 'p1'"))
        check("transitions")
        with transaction(sessions) as s:  # an update of no counted column appends no delta
            before = s.execute(deltas).scalar_one()
            s.execute(text("UPDATE nhis SET expires_at = expires_at - interval '1 minute'"))
            assert s.execute(deltas).scalar_one() == before
        with transaction(sessions) as s:  # deletions, and a rolled-back change counts nothing
            s.execute(text("DELETE FROM nhis WHERE name LIKE 'p%' AND status = 'revoke_failed'"))
            s.execute(text("DELETE FROM nhis WHERE name IN ('d3', 'd4', 'd5', 'p6')"))
        with pytest.raises(RuntimeError), transaction(sessions) as s:
            s.execute(text("DELETE FROM nhis WHERE name LIKE 'd1%'"))
            raise RuntimeError("roll back")
        check("deleted")
        with transaction(sessions) as s:  # an agent moving environment moves its NHIs' counts
            s.execute(
                text("UPDATE agents SET environment = 'staging' WHERE id = :id"), {"id": prod}
            )
        check("moved")

        # The gauges a refresh sets are the direct query's, overdue and expiring included.
        registry = new_registry()
        with transaction(sessions) as s:
            InventoryMetrics(registry, 86400).refresh(s)
            counts, due = _direct(s)
        page = generate_latest(registry).decode()
        for (platform, kind, env, status), n in counts.items():
            where = {"platform": platform, "kind": kind, "environment": env}
            assert value(page, "nhi_nhis", **where, status=status) == n
        assert any(n for (*_, window), n in due.items() if window == "overdue")
        for (platform, kind, env, window), n in due.items():
            where = {"platform": platform, "kind": kind, "environment": env}
            if window == "overdue":
                assert value(page, "nhi_overdue", **where) == n, where
            else:
                assert value(page, "nhi_expiring", **where, within=window) == n, (where, window)
        pending = sum(n for k, n in counts.items() if k[3] == "pending_approval")
        assert pending and value(page, "nhi_pending_approvals") == pending

        with transaction(sessions) as s:  # TRUNCATE fires no row triggers: counts start over
            s.execute(text("TRUNCATE nhis CASCADE"))
        check("truncated")
    finally:
        engine.dispose()
