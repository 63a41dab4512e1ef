"""Activity import (issue 17): one generated CloudTrail file of N events (1,000,000 in full
sizes) imported into the inventory by the real importer (`nhi.services.activity.import_file`:
the C JSON decoder over gunzipped text, binary COPY into staging and `INSERT ... ON CONFLICT DO
NOTHING` on a worker thread, baselines judged on the importer's thread meanwhile).

The file is written by this process, streamed record by record (the generator holds no list),
as CloudTrail writes them: `{"Records": [...]}` gzipped, the documented record fields, assumed
role sessions of 100 `iam_role` NHIs (and 1 % of records from an identity the inventory does
not know, as a real trail holds). The import runs in a fresh child process, so its peak
resident memory (`ru_maxrss`) is the importer's, not this harness's; the child reports its
resident memory before the import too (the interpreter and its imports).

Targets: at least 20,000 events/s and under 300 MB peak. A second import of the same file
(everything a duplicate) is timed too. The machine's other work shows in the rate, so the CPU
the importer and its Postgres backend spent per event are reported beside it (the backend's
from /proc when the server runs on this machine).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.report import Result, fmt, verdict_at_least, verdict_at_most
from bench.services import REPO, Stack

NAME = "activity_import"
NHIS = 100
TARGET_RATE = 20_000.0
TARGET_MB = 300.0
ACCOUNT = "123456789012"
AGENT = "Boto3/1.35.0 md/Botocore#1.35.0 ua/2.0 os/linux#6.1 lang/python#3.11.9"


def seed(database_url: str) -> list[str]:
    """An agent with `NHIS` iam_role NHIs (scope: the kb-docs bucket, CIDR 10.20.0.0/16)."""
    from models.enums import NhiKind, NhiStatus, Platform
    from models.orm import Agent, Nhi
    from nhi.infra.db import make_engine, make_sessionmaker, transaction

    engine = make_engine(database_url)
    now = datetime.now(UTC)
    names = [f"nhi-bench-{uuid.uuid4().hex[:12]}" for _ in range(NHIS)]
    with transaction(make_sessionmaker(engine)) as s:
        agent = Agent(
            name=f"bench-{uuid.uuid4().hex[:8]}",
            category="rag",
            environment="dev",
            owner_email="bench@example.com",
            team="bench",
            purpose="activity import benchmark",
            created_by="bench",
        )
        s.add(agent)
        s.flush()
        for name in names:
            s.add(
                Nhi(
                    agent_id=agent.id,
                    platform=Platform.AWS,
                    kind=NhiKind.IAM_ROLE,
                    name=name,
                    granted_scope=[
                        {"actions": ["s3:GetObject", "s3:ListBucket"], "resources": ["*"]}
                    ],
                    allowed_cidrs=["10.20.0.0/16"],
                    status=NhiStatus.ACTIVE,
                    requested_by="bench",
                    expires_at=now + timedelta(days=30),
                    max_lifetime_at=now + timedelta(days=60),
                )
            )
    engine.dispose()
    return names


def write_trail(path: Path, names: list[str], n: int) -> None:
    """N records over the last day, streamed into a gzip file."""
    start = datetime.now(UTC) - timedelta(days=1)
    step = 86_400 / n
    with gzip.open(path, "wt", compresslevel=1) as out:
        out.write('{"Records":[')
        for i in range(n):
            name = names[i % len(names)] if i % 100 else "someone-else"
            at = start + timedelta(seconds=i * step)
            rec: dict[str, Any] = {
                "eventVersion": "1.09",
                "userIdentity": {
                    "type": "AssumedRole",
                    "principalId": f"AROAEXAMPLE:{name}",
                    "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/{name}/task",
                    "accountId": ACCOUNT,
                    "accessKeyId": f"ASIA{i % len(names):016d}",
                    "sessionContext": {"sourceIdentity": "agent-bench"},
                },
                "eventTime": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "eventSource": "s3.amazonaws.com",
                "eventName": "GetObject",
                "awsRegion": "us-east-1",
                "sourceIPAddress": f"10.20.{i % len(names)}.5",
                "userAgent": AGENT,
                "requestParameters": {"bucketName": "kb-docs", "key": f"faq/{i % 5000}.md"},
                "responseElements": None,
                "requestID": f"{i:016X}",
                "eventID": str(uuid.uuid4()),
                "readOnly": True,
                "resources": [
                    {"type": "AWS::S3::Object", "ARN": f"arn:aws:s3:::kb-docs/faq/{i % 5000}.md"}
                ],
                "eventType": "AwsApiCall",
                "managementEvent": False,
                "recipientAccountId": ACCOUNT,
            }
            out.write(("," if i else "") + json.dumps(rec, separators=(",", ":")))
        out.write("]}")


def _rss_mb() -> float:
    """This process's resident memory now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _backend_cpu(pids: list[int]) -> float | None:
    """CPU seconds the Postgres backends `pids` have used (None unless they run here)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def child(database_url: str, path: str) -> None:
    """The importer alone in a process: one file, timed; prints JSON."""
    from contextlib import nullcontext

    from sqlalchemy import event

    from nhi.infra.db import make_engine, make_sessionmaker
    from nhi.services import activity

    engine = make_engine(database_url)
    backends: list[int] = []

    @event.listens_for(engine, "connect")
    def _pid(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            backends.append(cur.fetchone()[0])

    sessions = make_sessionmaker(engine)
    before = _rss_mb()
    cpu = time.process_time()
    started = time.perf_counter()
    done = activity.import_file(
        sessions,
        path,
        lambda: nullcontext(open(path, "rb")),  # noqa: SIM115 - closed by the importer
        now=datetime.now(UTC),
        alert_window=timedelta(hours=1),
    )
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    backend_cpu = _backend_cpu(backends)
    r = done.result
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "backend_cpu_seconds": backend_cpu,
                "events": r.events,
                "new": r.new,
                "duplicates": r.duplicates,
                "unmatched": r.unmatched,
                "findings": r.findings,
                "error": r.error,
                "rss_before_mb": before,
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def _import(database_url: str, path: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.activity_import", "--child", database_url, str(path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the importer failed: {proc.stderr.strip()[-800:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


async def run(stack: Stack, n: int, out: Path) -> Result:
    del out  # no plot: two figures
    result = Result(name=NAME, title=f"Activity import: a CloudTrail file of {n:,} events")
    names = await asyncio.to_thread(seed, stack.database_url)
    path = stack.dir / "trail.json.gz"
    t0 = time.perf_counter()
    await asyncio.to_thread(write_trail, path, names, n)
    generated = time.perf_counter() - t0
    load_before = os.getloadavg()
    first = await asyncio.to_thread(_import, stack.database_url, path)
    again = await asyncio.to_thread(_import, stack.database_url, path)
    rate = first["events"] / first["seconds"]
    result.data = {"n": n, "first": first, "again": again, "file_bytes": path.stat().st_size}
    if first["error"]:
        result.status = f"failed: {first['error']}"
    result.row(
        "import rate (first import)",
        fmt(rate, "events/s", 0),
        f"≥ {TARGET_RATE:,.0f} events/s",
        verdict_at_least(rate, TARGET_RATE),
    )
    result.row(
        "importer peak memory (ru_maxrss)",
        fmt(first["peak_mb"], "MB", 0),
        f"< {TARGET_MB:.0f} MB",
        verdict_at_most(first["peak_mb"], TARGET_MB, "MB"),
    )
    result.row("importer memory before the import", fmt(first["rss_before_mb"], "MB", 0))
    result.row(
        "importer CPU per event (its own process; Postgres not counted)",
        fmt(first["cpu_seconds"] / max(1, first["events"]) * 1e6, "µs", 1),
    )
    result.row(
        "rate if the importer had a core to itself (events / importer CPU seconds)",
        fmt(first["events"] / max(1e-9, first["cpu_seconds"]), "events/s", 0),
    )
    if first.get("backend_cpu_seconds") is not None:
        result.row(
            "its Postgres backend's CPU per event",
            fmt(first["backend_cpu_seconds"] / max(1, first["events"]) * 1e6, "µs", 1),
        )
    result.row(
        "re-import of the same file (all duplicates)",
        fmt(again["events"] / again["seconds"], "events/s", 0),
    )
    result.row("events new / unmatched / findings", f"{first['new']:,} / "
               f"{first['unmatched']:,} / {first['findings']:,}")  # fmt: skip
    result.note(
        f"The gzip file is {path.stat().st_size / 1e6:,.1f} MB ({n:,} records, "
        f"{NHIS} NHIs, 1 % unknown identities); writing it took {generated:.0f} s (not counted)."
    )
    result.note(
        "One file is one transaction: the rate includes parsing, matching, COPY into staging, "
        "the deduplicating insert, judging every new event and the commit."
    )
    result.note(
        "Load average before the first import: "
        + ", ".join(f"{x:.2f}" for x in load_before)
        + " (other work on the machine's CPUs slows both the importer and Postgres)."
    )
    path.unlink(missing_ok=True)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m bench.activity_import --child DATABASE_URL FILE")
