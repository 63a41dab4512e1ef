"""Activity monitoring (issue 17): CloudTrail and Postgres log imports, baselines, findings,
alerts and acknowledgement, against the real database (and moto S3, Temporal's test server).

The CloudTrail files are generated here from NHIs the tests insert, in the record format
CloudTrail documents (eventVersion, eventTime, eventSource, eventName, awsRegion,
sourceIPAddress, userAgent, userIdentity{type, arn, accessKeyId, sessionContext}, errorCode,
eventID, resources) and gzipped as CloudTrail writes them to S3.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from activities.activity_import import ActivityImportActivities, ActivityImportInput
from activities.slack import SlackActivities
from models.enums import ActivityKind, AgentCategory, NhiKind, NhiStatus, Platform, Severity
from models.orm import (
    ActivityCursor,
    ActivityEvent,
    ActivityFinding,
    Agent,
    AuditEvent,
    Nhi,
    NhiProfile,
    TaskCredential,
)
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from nhi.rules import baseline
from nhi.rules.ids import containment_workflow_id
from nhi.services import activity as imports
from tests.conftest import Service
from tests.helpers import keep_history
from worker import WORKFLOWS
from workflows.activity_import import ActivityImportWorkflow

ACCOUNT = "123456789012"
SDK_AGENT = "Boto3/1.35.0 md/Botocore#1.35.0 ua/2.0 os/linux#6.1 lang/python#3.11.9"
BROWSER = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Safari/605.1.15"
WINDOW = timedelta(hours=1)


# ---- inventory --------------------------------------------------------------------------------


def _agent(sessions: sessionmaker[Session], category: str = "rag") -> Agent:
    with transaction(sessions) as s:
        agent = Agent(
            name=f"agent-{uuid.uuid4().hex[:10]}",
            category=category,
            environment="dev",
            owner_email="ana@example.com",
            team="search",
            purpose="answers questions",
            created_by="test:setup",
        )
        s.add(agent)
    return agent


def _nhi(
    sessions: sessionmaker[Session],
    agent: Agent,
    kind: NhiKind,
    scope: list[dict[str, list[str]]],
    *,
    cidrs: list[str] | None = None,
    status: NhiStatus = NhiStatus.ACTIVE,
) -> Nhi:
    platform = Platform.POSTGRES if kind is NhiKind.POSTGRES_ROLE else Platform.AWS
    sep = "_" if platform is Platform.POSTGRES else "-"
    now = datetime.now(UTC)
    with transaction(sessions) as s:
        nhi = Nhi(
            agent_id=agent.id,
            platform=platform,
            kind=kind,
            name=f"nhi{sep}{uuid.uuid4().hex[:12]}",
            granted_scope=scope,
            allowed_cidrs=cidrs or [],
            status=status,
            requested_by="test:setup",
            expires_at=now + timedelta(days=30),
            max_lifetime_at=now + timedelta(days=60),
            target="kb" if platform is Platform.POSTGRES else None,
        )
        s.add(nhi)
    return nhi


def _quarantined_at(sessions: sessionmaker[Session], nhi: Nhi, at: datetime) -> None:
    """The NHI is quarantined as of `at` (status and its audit event, as the lifecycle
    writes them)."""
    with transaction(sessions) as s:
        row = s.get(Nhi, nhi.id)
        assert row is not None
        row.status = NhiStatus.QUARANTINED
        s.add(
            AuditEvent(
                subject_type="nhi",
                subject_id=str(nhi.id),
                event="nhi.quarantined",
                actor="test:setup",
                reason="suspected leak",
                created_at=at,
            )
        )


# ---- CloudTrail files -------------------------------------------------------------------------


def _identity(nhi: Nhi, key: str | None, agent_id: uuid.UUID) -> dict[str, Any]:
    if nhi.kind is NhiKind.IAM_USER_KEY:
        out: dict[str, Any] = {
            "type": "IAMUser",
            "principalId": "AIDA" + nhi.id.hex[:16].upper(),
            "arn": f"arn:aws:iam::{ACCOUNT}:user/{nhi.name}",
            "accountId": ACCOUNT,
            "userName": nhi.name,
        }
    else:
        out = {
            "type": "AssumedRole",
            "principalId": f"AROA{nhi.id.hex[:16].upper()}:task",
            "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/{nhi.name}/task",
            "accountId": ACCOUNT,
            "sessionContext": {
                "sessionIssuer": {
                    "type": "Role",
                    "arn": f"arn:aws:iam::{ACCOUNT}:role/{nhi.name}",
                    "userName": nhi.name,
                },
                "sourceIdentity": f"agent-{agent_id}",
                "attributes": {"creationDate": "2026-11-30T00:00:00Z", "mfaAuthenticated": "false"},
            },
        }
    if key:
        out["accessKeyId"] = key
    return out


def record(
    nhi: Nhi,
    at: datetime,
    action: str,
    *,
    ip: str,
    resource: str | None = None,
    error: str | None = None,
    agent: str = SDK_AGENT,
    key: str | None = "AKIAEXAMPLE",
) -> dict[str, Any]:
    """One CloudTrail record of `nhi` calling `action` ("s3:GetObject")."""
    service, name = action.split(":")
    rec: dict[str, Any] = {
        "eventVersion": "1.09",
        "userIdentity": _identity(nhi, key, nhi.agent_id),
        "eventTime": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "eventSource": f"{service}.amazonaws.com",
        "eventName": name,
        "awsRegion": "us-east-1",
        "sourceIPAddress": ip,
        "userAgent": agent,
        "requestParameters": None,
        "responseElements": None,
        "requestID": uuid.uuid4().hex,
        "eventID": str(uuid.uuid4()),
        "readOnly": name.startswith(("Get", "List", "Describe")),
        "eventType": "AwsApiCall" if service != "signin" else "AwsConsoleSignIn",
        "managementEvent": service != "s3",
        "recipientAccountId": ACCOUNT,
        "eventCategory": "Management",
    }
    if resource:
        rec["resources"] = [{"accountId": ACCOUNT, "type": "AWS::Resource", "ARN": resource}]
    if error:
        rec["errorCode"] = error
        rec["errorMessage"] = f"User is not authorized to perform: {action}"
    return rec


def trail_bytes(records: list[dict[str, Any]]) -> bytes:
    return gzip.compress(json.dumps({"Records": records}).encode())


def write_trail(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(trail_bytes(records))
    return path


@dataclass
class Fleet:
    agent: Agent
    role: Nhi  # iam_role, kb-docs reader, declared CIDR 10.20.0.0/16
    user: Nhi  # iam_user_key, DynamoDB reader, no CIDRs (its network is learned)
    spare: Nhi  # iam_role, quarantined between the two files
    base: datetime


TABLE = f"arn:aws:dynamodb:us-east-1:{ACCOUNT}:table/kb-index"


@pytest.fixture
def fleet(sessions: sessionmaker[Session]) -> Fleet:
    agent = _agent(sessions)
    docs = [{"actions": ["s3:GetObject", "s3:ListBucket"], "resources": ["arn:aws:s3:::kb-docs*"]}]
    role = _nhi(sessions, agent, NhiKind.IAM_ROLE, docs, cidrs=["10.20.0.0/16"])
    user = _nhi(
        sessions,
        agent,
        NhiKind.IAM_USER_KEY,
        [{"actions": ["dynamodb:Query", "dynamodb:GetItem"], "resources": [TABLE]}],
    )
    spare = _nhi(sessions, agent, NhiKind.IAM_ROLE, docs, cidrs=["10.20.0.0/16"])
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=8)
    return Fleet(agent, role, user, spare, base)


def normal_traffic(f: Fleet, start: datetime, minutes: int) -> list[dict[str, Any]]:
    """What the agent does all day: the role reads documents every 3 minutes from its
    subnet, the user key queries the index every minute from its one address."""
    out: list[dict[str, Any]] = []
    for m in range(minutes):
        at = start + timedelta(minutes=m)
        out.append(record(f.user, at, "dynamodb:Query", ip="198.51.100.10", resource=TABLE))
        if m % 3 == 0:
            doc = f"arn:aws:s3:::kb-docs/faq/{m}.md"
            out.append(record(f.role, at, "s3:GetObject", ip="10.20.1.5", resource=doc))
            out.append(record(f.spare, at, "s3:GetObject", ip="10.20.1.6", resource=doc))
    # Someone else's identity in the same trail: counted, never stored.
    out.append(
        {
            **record(f.user, start, "s3:ListBuckets", ip="10.9.9.9"),
            "userIdentity": {
                "type": "IAMUser",
                "arn": f"arn:aws:iam::{ACCOUNT}:user/deploy-bot",
                "userName": "deploy-bot",
                "accessKeyId": "AKIAOTHER",
            },
        }
    )
    return out


def _import_path(sessions: sessionmaker[Session], path: Path) -> imports.Imported:
    return imports.import_file(
        sessions,
        str(path),
        lambda: nullcontext(path.open("rb")),
        now=datetime.now(UTC),
        alert_window=WINDOW,
    )


def _count(sessions: sessionmaker[Session], model: type[Any], nhi_ids: list[uuid.UUID]) -> int:
    with transaction(sessions) as s:
        return int(
            s.scalar(select(func.count()).select_from(model).where(model.nhi_id.in_(nhi_ids))) or 0
        )


def _findings(sessions: sessionmaker[Session], agent_id: uuid.UUID) -> list[ActivityFinding]:
    with transaction(sessions) as s:
        return list(
            s.scalars(
                select(ActivityFinding)
                .where(ActivityFinding.agent_id == agent_id)
                .order_by(ActivityFinding.occurred_at)
            )
        )


# ---- tests ------------------------------------------------------------------------------------


def test_normal_traffic_then_anomalies_yield_exactly_those_findings(
    sessions: sessionmaker[Session], fleet: Fleet, tmp_path: Path
) -> None:
    f = fleet
    ids = [f.role.id, f.user.id, f.spare.id]
    day = normal_traffic(f, f.base, 240)
    first = _import_path(sessions, write_trail(tmp_path / "day1.json.gz", day)).result
    assert first.error is None
    assert first.unmatched == 1 and first.unmatched_identities == {
        f"arn:aws:iam::{ACCOUNT}:user/deploy-bot": 1
    }
    assert first.new == len(day) - 1 and first.duplicates == 0
    assert first.findings == 0, _findings(sessions, f.agent.id)
    with transaction(sessions) as s:
        role = s.get(Nhi, f.role.id)
        profile = s.get(NhiProfile, f.user.id)
        assert role is not None and profile is not None
        assert role.last_used_at == f.base + timedelta(minutes=237)
        assert profile.events == 240 and "198.51.100.0/24" in profile.profile["networks"]

    # The spare role is quarantined after the first file; the second file holds the same
    # kind of traffic with four things mixed in.
    later = f.base + timedelta(hours=5)
    _quarantined_at(sessions, f.spare, later - timedelta(minutes=30))
    traffic = [
        r for r in normal_traffic(f, later, 60) if f.spare.name not in json.dumps(r["userIdentity"])
    ]
    odd_out = record(
        f.user, later + timedelta(minutes=10, seconds=30), "dynamodb:DeleteTable",
        ip="198.51.100.10", resource=TABLE, error="AccessDenied",
    )  # fmt: skip
    odd_net = record(
        f.role, later + timedelta(minutes=19, seconds=30), "s3:GetObject",
        ip="203.0.113.9", resource="arn:aws:s3:::kb-docs/faq/secret.md",
    )  # fmt: skip
    odd_quarantined = record(
        f.spare, later + timedelta(minutes=25), "s3:GetObject",
        ip="10.20.1.6", resource="arn:aws:s3:::kb-docs/faq/1.md",
    )  # fmt: skip
    odd_console = record(
        f.user, later + timedelta(minutes=40, seconds=10), "signin:ConsoleLogin",
        ip="198.51.100.10", agent=BROWSER, key=None,
    )  # fmt: skip
    mixed = sorted(
        [*traffic, odd_out, odd_net, odd_quarantined, odd_console], key=lambda r: r["eventTime"]
    )
    second_path = write_trail(tmp_path / "day2.json.gz", mixed)
    second = _import_path(sessions, second_path)
    assert second.result.error is None and second.result.findings == 4
    found = {(x.kind, x.nhi_id, x.evidence["event_id"]): x for x in _findings(sessions, f.agent.id)}
    assert set(found) == {
        (ActivityKind.OUT_OF_SCOPE, f.user.id, odd_out["eventID"]),
        (ActivityKind.NEW_NETWORK, f.role.id, odd_net["eventID"]),
        (ActivityKind.USE_AFTER_REVOCATION, f.spare.id, odd_quarantined["eventID"]),
        (ActivityKind.HUMAN_USE, f.user.id, odd_console["eventID"]),
    }
    by_kind = {k[0]: v for k, v in found.items()}
    assert by_kind[ActivityKind.OUT_OF_SCOPE].severity is Severity.HIGH  # denied: still counts
    assert by_kind[ActivityKind.OUT_OF_SCOPE].evidence["outcome"] == "denied"
    assert by_kind[ActivityKind.USE_AFTER_REVOCATION].severity is Severity.CRITICAL
    assert by_kind[ActivityKind.NEW_NETWORK].evidence["allowed_cidrs"] == ["10.20.0.0/16"]
    # One alert per NHI and kind, all four claimed in the import's transaction.
    assert sorted(a.kind for a in second.alerts) == sorted(k.value for k in by_kind)

    # Re-importing the same file changes nothing.
    events_before = _count(sessions, ActivityEvent, ids)
    again = _import_path(sessions, second_path).result
    assert (again.new, again.findings, again.duplicates) == (0, 0, len(mixed) - 1)
    assert _count(sessions, ActivityEvent, ids) == events_before
    assert len(_findings(sessions, f.agent.id)) == 4


def test_a_truncated_file_is_reported_and_not_half_applied(
    sessions: sessionmaker[Session], fleet: Fleet, tmp_path: Path
) -> None:
    f = fleet
    # More events than one COPY chunk, so a chunk was written before the file broke off.
    day = normal_traffic(f, f.base, imports.CHUNK + 2000)
    whole = trail_bytes(day)
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(whole[: int(len(whole) * 0.8)])
    done = _import_path(sessions, broken)
    assert done.result.error is not None and "unreadable" in done.result.error
    assert _count(sessions, ActivityEvent, [f.role.id, f.user.id, f.spare.id]) == 0
    assert _count(sessions, NhiProfile, [f.role.id, f.user.id, f.spare.id]) == 0
    with transaction(sessions) as s:
        role = s.get(Nhi, f.role.id)
        assert role is not None and role.last_used_at is None
    # Corrupt JSON inside a good gzip is refused the same way.
    bad_json = tmp_path / "bad.json.gz"
    bad_json.write_bytes(gzip.compress(b'{"Records": [{"eventTime": "2026-'))
    assert _import_path(sessions, bad_json).result.error is not None
    # The whole file imports once it is whole.
    fixed = tmp_path / "fixed.json.gz"
    fixed.write_bytes(whole)
    assert _import_path(sessions, fixed).result.new == len(day) - 1


def _csv_line(row: dict[str, str]) -> str:
    values = [row.get(c, "") for c in imports.PG_CSV_COLUMNS] + ["client backend", "", "0"]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(values)
    return out.getvalue()


def test_postgres_csv_log_import_matches_roles_and_task_roles(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    agent = _agent(sessions)
    reader = _nhi(
        sessions, agent, NhiKind.POSTGRES_ROLE, [{"actions": ["SELECT"], "resources": ["public.*"]}]
    )
    cred_id = uuid.uuid4()
    task_role = f"nhit_{cred_id.hex}"
    with transaction(sessions) as s:
        s.add(
            TaskCredential(
                id=cred_id,
                nhi_id=reader.id,
                agent_id=agent.id,
                platform="postgres",
                name=task_role,
                issued_by="test:setup",
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
        )
    t = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)

    def row(user: str, minute: int, message: str, **extra: str) -> str:
        return _csv_line(
            {
                "log_time": (t + timedelta(minutes=minute)).strftime("%Y-%m-%d %H:%M:%S.000 UTC"),
                "user_name": user,
                "database_name": "kb",
                "process_id": "4242",
                "connection_from": "10.0.0.5:51234",
                "session_id": f"6750a1.{user[:6]}",
                "session_line_num": str(minute),
                "error_severity": extra.pop("severity", "LOG"),
                "sql_state_code": extra.pop("state", "00000"),
                "message": message,
                "application_name": "kb-agent",
                **extra,
            }
        )

    lines = [
        row(reader.name, 0, f"connection authorized: user={reader.name} database=kb"),
        row(reader.name, 1, "statement: SELECT title FROM public.docs WHERE id = 1"),
        row(task_role, 2, "statement: select body from public.docs"),
        row("app_user", 3, "statement: SELECT 1"),
        row(reader.name, 4, "AUDIT: SESSION,1,1,WRITE,DELETE,TABLE,public.docs,delete from docs,"),
        row(
            reader.name,
            5,
            "permission denied for table docs",
            severity="ERROR",
            state="42501",
            query="UPDATE public.docs SET body = ''",
        ),
        row(reader.name, 6, "checkpoint starting: time"),  # no activity
    ]
    path = tmp_path / "postgresql-2026-11-30.csv"
    path.write_text("".join(lines))
    result = _import_path(sessions, path).result
    assert result.error is None
    assert (result.events, result.new, result.unmatched) == (6, 5, 1)
    assert result.unmatched_identities == {"app_user": 1}
    with transaction(sessions) as s:
        events = list(
            s.scalars(
                select(ActivityEvent)
                .where(ActivityEvent.nhi_id == reader.id)
                .order_by(ActivityEvent.occurred_at)
            )
        )
    assert [(e.action, e.outcome) for e in events] == [
        ("CONNECT", "success"),
        ("SELECT", "success"),
        ("SELECT", "success"),
        ("DELETE", "success"),
        ("UPDATE", "denied"),
    ]
    assert [e.task_credential_id for e in events] == [None, None, cred_id, None, None]
    assert {e.source_ip for e in events} == {"10.0.0.5"}
    kinds = [(x.kind, x.evidence["action"]) for x in _findings(sessions, agent.id)]
    assert kinds == [(ActivityKind.OUT_OF_SCOPE, "DELETE"), (ActivityKind.OUT_OF_SCOPE, "UPDATE")]
    # A log file is imported once.
    assert _import_path(sessions, path).result.new == 0


def test_rules_reconnaissance_burst_and_concurrent_networks() -> None:
    """The window rules, on a learned profile (pure: no database)."""
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    intent = baseline.Intent(
        nhi_id=uuid.uuid4(),
        agent_id=uuid.uuid4(),
        platform=Platform.AWS,
        name="nhi-x",
        category=AgentCategory.RAG,
        status=NhiStatus.ACTIVE,
        scope=((("*",), ("*",)),),
        cidrs=(),
        expires_at=now + timedelta(days=1),
    )
    profile, watch = baseline.Profile(), baseline.Watch()

    def ev(at: datetime, action: str, ip: str = "10.1.1.1", key: str = "K") -> baseline.Event:
        return baseline.Event(
            id=uuid.uuid4(), at=at, action=action, identity="x", source_ip=ip, credential=key
        )

    kinds: list[ActivityKind] = []
    for i in range(300):  # five hours of one call a minute: learned, quiet
        kinds += [
            d.kind
            for d in baseline.judge(
                intent, profile, watch, ev(now + timedelta(minutes=i), "s3:GetObject")
            )
        ]
    assert kinds == [] and profile.learned
    t = now + timedelta(hours=6)
    recon = [f"iam:List{n}" for n in ("Users", "Roles", "Policies", "Groups", "AccessKeys")] + [
        f"ec2:Describe{n}"
        for n in ("Instances", "Vpcs", "Subnets", "SecurityGroups", "Images", "Volumes")
    ]
    recon += ["s3:GetBucketPolicy", "s3:GetBucketAcl", "kms:ListKeys", "lambda:ListFunctions"]
    found = [
        d.kind
        for i, action in enumerate(recon)
        for d in baseline.judge(intent, profile, watch, ev(t + timedelta(seconds=i), action))
    ]
    assert found == [ActivityKind.RECONNAISSANCE]
    burst_at = t + timedelta(minutes=30)
    found = [
        d.kind
        for i in range(baseline.BURST_FLOOR + 50)
        for d in baseline.judge(
            intent, profile, watch, ev(burst_at + timedelta(milliseconds=50 * i), "s3:GetObject")
        )
    ]
    assert found == [ActivityKind.BURST]
    later = t + timedelta(hours=1)
    baseline.judge(intent, profile, watch, ev(later, "s3:GetObject"))
    found = [
        d.kind
        for d in baseline.judge(
            intent, profile, watch, ev(later + timedelta(seconds=20), "s3:GetObject", "10.1.1.2")
        )
    ]
    # Same /24: one network. Another network within the minute: two at once, and new.
    assert found == []
    found = [
        d.kind
        for d in baseline.judge(
            intent, profile, watch, ev(later + timedelta(seconds=30), "s3:GetObject", "192.0.2.7")
        )
    ]
    assert sorted(found) == sorted([ActivityKind.NEW_NETWORK, ActivityKind.CONCURRENT_NETWORKS])
    # A browser agent drives a browser: its user agent is not a person.
    browsing = baseline.Event(
        id=uuid.uuid4(), at=later, action="s3:GetObject", identity="x", user_agent=BROWSER
    )
    assert baseline.is_human(browsing, Platform.AWS, AgentCategory.BROWSER_AGENT) is None
    assert baseline.is_human(browsing, Platform.AWS, AgentCategory.RAG) is not None


# ---- API --------------------------------------------------------------------------------------


@pytest.fixture
def api(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[httpx.Client]:
    from api.app import create_app
    from tests.helpers import ApiServer, bearer, mint

    quiet = settings.model_copy(update={"auto_contain_severity": "off"})
    with ApiServer(create_app(quiet, sessions)) as server:
        token = mint(sessions, "activity-security", "security", email="sec@example.com")
        with httpx.Client(base_url=server.url, headers=bearer(token), timeout=30) as client:
            yield client


def test_post_activity_validates_matches_and_findings_can_be_acknowledged(
    api: httpx.Client, sessions: sessionmaker[Session], fleet: Fleet
) -> None:
    f = fleet
    at = datetime.now(UTC) - timedelta(minutes=5)
    event = {
        "time": at.isoformat(),
        "identity": f.user.name,
        "action": "dynamodb:Scan",
        "resource": TABLE,
        "source_ip": "198.51.100.10",
        "outcome": "denied",
        "id": "evt-1",
    }
    bad = api.post("/v1/activity", json={"events": [{**event, "source_ip": "not-an-ip"}]})
    assert bad.status_code == 422 and "source_ip" in bad.text
    bad = api.post("/v1/activity", json={"events": [{**event, "time": 12}]})
    assert bad.status_code == 422 and "time" in bad.text
    bad = api.post("/v1/activity", json={"events": [{**event, "user_agent": "x\u0000y"}]})
    assert bad.status_code == 422 and "user_agent" in bad.text
    huge = api.post("/v1/activity", json={"events": [event] * 1001})
    assert huge.status_code == 422 and "events" in huge.text
    unknown = {**event, "identity": "someone-else", "id": "evt-2"}
    got = api.post("/v1/activity", json={"source": "collector", "events": [event, unknown]})
    assert got.status_code == 200, got.text
    body = got.json()
    assert (body["events"], body["new"], body["unmatched"], body["findings"]) == (2, 1, 1, 1)
    assert body["unmatched_identities"] == {"someone-else": 1}
    again = api.post("/v1/activity", json={"source": "collector", "events": [event]}).json()
    assert (again["new"], again["duplicates"], again["findings"]) == (0, 1, 0)

    listed = api.get("/v1/findings", params={"agent": str(f.agent.id)}).json()
    assert [x["kind"] for x in listed] == ["out_of_scope"]
    assert (
        api.get("/v1/findings", params={"agent": str(f.agent.id), "severity": "critical"}).json()
        == []
    )
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert api.get("/v1/findings", params={"agent": str(f.agent.id), "since": future}).json() == []
    assert api.get("/v1/findings", params={"limit": 0}).status_code == 422
    finding_id = listed[0]["id"]
    assert api.post(f"/v1/findings/{finding_id}/ack", json={"reason": ""}).status_code == 422
    acked = api.post(f"/v1/findings/{finding_id}/ack", json={"reason": "load test"})
    assert acked.status_code == 200 and acked.json()["acked_by"] == "token:activity-security"
    assert api.post(f"/v1/findings/{finding_id}/ack", json={"reason": "again"}).status_code == 409
    with transaction(sessions) as s:
        trail = s.scalars(select(AuditEvent.event).where(AuditEvent.subject_id == finding_id)).all()
    assert trail == ["finding.acknowledged"]


# ---- the workflow: S3, the scheduled cursor, alerts, auto-containment -------------------------


def _s3(settings: Settings) -> Any:
    return boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=settings.aws_endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


async def test_scheduled_s3_import_keeps_a_cursor_alerts_and_starts_containment(
    ts_env: WorkflowEnvironment, settings: Settings, sessions: sessionmaker[Session], fleet: Fleet
) -> None:
    f = fleet
    s3 = _s3(settings)
    bucket = f"trail-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    prefix = f"AWSLogs/{ACCOUNT}/CloudTrail/us-east-1/2026/11/30/"
    quiet = normal_traffic(f, f.base, 30)
    odd = record(
        f.role, f.base + timedelta(hours=1), "s3:PutObject",
        ip="10.20.1.5", resource="arn:aws:s3:::kb-docs/x",
    )  # fmt: skip
    s3.put_object(Bucket=bucket, Key=prefix + "a.json.gz", Body=trail_bytes(quiet))
    s3.put_object(Bucket=bucket, Key=prefix + "b.json.gz", Body=trail_bytes([odd]))
    s3.put_object(Bucket=bucket, Key=prefix + "c.json.gz", Body=trail_bytes(quiet)[:100])
    location = f"s3://{bucket}/{prefix}"
    cfg = settings.model_copy(
        update={
            "activity_s3_prefix": location,
            "temporal_task_queue": f"activity-{uuid.uuid4().hex[:8]}",
            "auto_contain_severity": "critical",
        }
    )
    acts = ActivityImportActivities(sessions, cfg, s3)
    slack = SlackActivities(None)
    async with Worker(
        ts_env.client,
        task_queue=cfg.temporal_task_queue,
        workflows=[ActivityImportWorkflow],
        activities=[acts.import_activity, slack.send_alert],
        activity_executor=ThreadPoolExecutor(4),
    ):
        first_id = f"act-{uuid.uuid4()}"
        run = await ts_env.client.execute_workflow(
            ActivityImportWorkflow.run,
            ActivityImportInput(scheduled=True),
            id=first_id,
            task_queue=cfg.temporal_task_queue,
        )
        # Today's path replays from scratch (and is the golden `activity_import` history).
        history = await ts_env.client.get_workflow_handle(first_id).fetch_history()
        replayed = await Replayer(
            workflows=WORKFLOWS, data_converter=pydantic_data_converter
        ).replay_workflow(history, raise_on_replay_failure=True)
        assert replayed.replay_failure is None
        keep_history(history, "activity_import")
        assert (run.file_count, run.failed_files) == (3, 1)
        assert run.new == len(quiet) - 1 + 1 and run.findings == 1
        assert [a.kind for a in run.alerts] == ["out_of_scope"]
        assert run.contained == [f.agent.id]  # a successful out-of-scope call is critical
        with transaction(sessions) as s:
            cursor = s.get(ActivityCursor, location)
            assert cursor is not None and cursor.position == prefix + "c.json.gz"
        handle = ts_env.client.get_workflow_handle(containment_workflow_id(f.agent.id))
        assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING
        await handle.terminate("test: containment itself is tested in test_contain")

        # The next scheduled run starts after the cursor: only the new object.
        s3.put_object(Bucket=bucket, Key=prefix + "d.json.gz", Body=trail_bytes(quiet))
        rerun = await ts_env.client.execute_workflow(
            ActivityImportWorkflow.run,
            ActivityImportInput(scheduled=True),
            id=f"act-{uuid.uuid4()}",
            task_queue=cfg.temporal_task_queue,
        )
        assert (rerun.file_count, rerun.new, rerun.duplicates) == (1, 0, len(quiet) - 1)

        # A bucket that does not exist fails the run at once (no retry makes it appear).
        with pytest.raises(WorkflowFailureError) as failed:
            await ts_env.client.execute_workflow(
                ActivityImportWorkflow.run,
                ActivityImportInput(location=f"s3://missing-{uuid.uuid4().hex[:8]}/x/"),
                id=f"act-{uuid.uuid4()}",
                task_queue=cfg.temporal_task_queue,
            )
        assert "NoSuchBucket" in str(failed.value.cause.cause)


def test_pg_stat_activity_samples_become_events() -> None:
    started = datetime(2026, 11, 30, 12, tzinfo=UTC)
    rows = [
        {
            "pid": 77,
            "usename": "nhi_reader",
            "client_addr": "10.0.0.8",
            "application_name": "kb-agent",
            "backend_start": started,
            "query_start": started + timedelta(seconds=3),
            "query": "SELECT table_name FROM information_schema.tables",
        },
        {"pid": 78, "usename": None, "backend_start": started},  # a background worker
    ]
    out = list(imports.pg_stat_activity_events(rows))
    assert len(out) == 1
    (raw,) = out
    assert (raw.principal, raw.event.action, raw.event.resource) == (
        "nhi_reader",
        "SELECT",
        "information_schema.tables",
    )
    # Sampling the same running query again names the same event.
    assert next(imports.pg_stat_activity_events(rows[:1])).event.id == raw.event.id


def test_a_pg_stat_activity_sample_of_a_live_session_is_imported(
    sessions: sessionmaker[Session], database_url: str
) -> None:
    """A real sample: this test's own second connection, under a role the inventory holds."""
    import psycopg

    agent = _agent(sessions)
    role = _nhi(
        sessions, agent, NhiKind.POSTGRES_ROLE, [{"actions": ["SELECT"], "resources": ["*"]}]
    )
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role.name}" LOGIN')
        try:
            with psycopg.connect(dsn, user=role.name, application_name="kb-agent") as conn:
                conn.execute("SELECT 1")
                rows = [
                    r for r in imports.sample_pg_stat_activity(admin) if r["usename"] == role.name
                ]
            assert len(rows) == 1
            with transaction(sessions) as s:
                done = imports.import_batch(
                    s,
                    "pg_stat_activity",
                    imports.pg_stat_activity_events(rows),
                    now=datetime.now(UTC),
                    alert_window=WINDOW,
                )
            assert (done.result.new, done.result.unmatched, done.result.findings) == (1, 0, 0)
        finally:
            admin.execute(f'DROP ROLE "{role.name}"')


def test_cli_lists_and_acknowledges_findings(
    api: httpx.Client, sessions: sessionmaker[Session], fleet: Fleet
) -> None:
    from click.testing import CliRunner

    from nhi.cli import cli

    f = fleet
    at = datetime.now(UTC) - timedelta(minutes=3)
    event = {"time": at.isoformat(), "identity": f.role.name, "action": "iam:CreateUser"}
    assert api.post("/v1/activity", json={"events": [event]}).json()["findings"] == 1
    token = str(api.headers["Authorization"]).removeprefix("Bearer ")
    base = ["--api-url", str(api.base_url), "--token", token]
    runner = CliRunner()
    listed = runner.invoke(cli, [*base, "--json", "findings", "--agent", str(f.agent.id)])
    assert listed.exit_code == 0, listed.output
    (finding,) = json.loads(listed.output)
    assert (finding["kind"], finding["severity"]) == ("out_of_scope", "critical")
    acked = runner.invoke(cli, [*base, "findings", "ack", finding["id"], "--reason", "drill"])
    assert acked.exit_code == 0 and "token:activity-security" in acked.output
    again = runner.invoke(cli, [*base, "findings", "ack", finding["id"], "--reason", "drill"])
    assert again.exit_code == 1 and "HTTP 409" in again.output
    bad = runner.invoke(cli, [*base, "findings", "--since", "yesterday"])
    assert bad.exit_code == 1 and "since" in bad.output


async def test_nhi_activity_import_runs_the_import_workflow_end_to_end(
    service: Service, fleet: Fleet, tmp_path: Path
) -> None:
    """`nhi activity import PATH` through the API, Temporal and the worker (dev mode: the
    worker reads the path), then the same command on a broken file exits 1 naming it. The
    CLI runs on a thread: the service's worker runs on this test's event loop."""
    from click.testing import CliRunner

    from nhi.cli import cli

    f = fleet
    day = normal_traffic(f, f.base, 20)
    write_trail(tmp_path / "a.json.gz", day)
    token = service.token("activity-importer", "security", email="sec@example.com")
    base = ["--api-url", service.url, "--token", token]
    runner = CliRunner()

    async def nhi(*args: str) -> Any:
        return await asyncio.to_thread(runner.invoke, cli, list(args))

    done = await nhi(*base, "--json", "activity", "import", str(tmp_path))
    assert done.exit_code == 0, done.output
    outcome = json.loads(done.output)
    assert (outcome["file_count"], outcome["new"], outcome["unmatched"]) == (1, len(day) - 1, 1)
    (tmp_path / "b.json.gz").write_bytes(trail_bytes(day)[:200])
    broken = await nhi(*base, "activity", "import", str(tmp_path / "b.json.gz"))
    assert broken.exit_code == 1 and "FAILED" in broken.output and "b.json.gz" in broken.output
    auditor = service.token("activity-auditor", "auditor")
    refused = await nhi(
        "--api-url", service.url, "--token", auditor, "activity", "import", str(tmp_path)
    )
    assert refused.exit_code == 1 and "HTTP 403" in refused.output


def test_the_scheduled_import_exists_only_when_a_prefix_is_configured(settings: Settings) -> None:
    from temporalio.client import ScheduleActionStartWorkflow

    from nhi.schedules import activity_import_schedule, schedule_id_of, schedule_ids

    assert "nhi-activity-import" not in schedule_ids(settings)
    cfg = settings.model_copy(
        update={
            "activity_s3_prefix": "s3://trail/AWSLogs/",
            "activity_import_interval_seconds": 600,
        }
    )
    assert "nhi-activity-import" in schedule_ids(cfg)
    assert schedule_id_of("activity-import") == "nhi-activity-import"
    schedule = activity_import_schedule(cfg)
    action = schedule.action
    assert isinstance(action, ScheduleActionStartWorkflow)
    assert action.id == "nhi-activity-import" and action.workflow == "ActivityImportWorkflow"
    assert schedule.spec.intervals[0].every == timedelta(minutes=10)
    with pytest.raises(ValueError, match="activity_s3_prefix"):
        Settings(activity_s3_prefix="https://not-s3/prefix")
