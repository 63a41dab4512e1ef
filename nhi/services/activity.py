"""Activity ingestion (issue 17): CloudTrail files, Postgres CSV logs, `pg_stat_activity`
samples and API batches, matched to NHIs and task credentials and judged against their
baselines (nhi/rules/baseline.py).

Everything is streamed: a CloudTrail file is parsed record by record (ijson over gzip), a CSV
log row by row, and events are written in chunks of `CHUNK` through COPY into a temporary
staging table and `INSERT ... ON CONFLICT DO NOTHING RETURNING id`, so only events not stored
before are learned and judged (a re-import adds nothing). One file is one transaction: events,
findings, profiles, `last_used_at` and the scheduled import's cursor commit together, and a
truncated or corrupt file rolls back whole (the caller reports it).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import ijson  # type: ignore[import-untyped]
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from models.enums import ActivitySource, AgentCategory, NhiStatus, Platform
from models.orm import (
    ActivityCursor,
    ActivityFinding,
    Agent,
    AuditEvent,
    Nhi,
    NhiProfile,
    TaskCredential,
)
from nhi.infra.db import transaction
from nhi.rules.baseline import REVOKED, Draft, Event, Intent, Profile, Watch, judge
from nhi.rules.task_credentials import TASK_ROLE_PREFIX
from nhi.services import findings

CHUNK = 5000  # events per COPY: bounds memory, amortises the round trips
MAX_UNMATCHED_LISTED = 20  # unmatched identities named in a result; the rest are counted
MAX_FINDINGS_PER_FILE = 1000  # stored per file; a flood beyond it is counted, not stored
# The audit events that take an NHI out of use: a use after the latest of them is a finding.
REVOKING_EVENTS = ("nhi.quarantined", "nhi.decommissioned", "nhi.missing", "nhi.revoke_failed")
_DENIED_CODES = re.compile(r"AccessDenied|Unauthorized|Forbidden", re.IGNORECASE)
_STAGE_COLUMNS = (
    "id",
    "nhi_id",
    "task_credential_id",
    "source",
    "occurred_at",
    "action",
    "resource",
    "source_ip",
    "user_agent",
    "outcome",
    "identity",
)


class CorruptFile(ValueError):
    """A log file that cannot be read to its end (truncated gzip, broken JSON or CSV)."""


@dataclass(frozen=True)
class Raw:
    """One event as its source logged it, before matching: who (in the source's terms)."""

    event: Event
    source: ActivitySource
    # AWS: the user or role name and the session name; Postgres: the login role.
    principal: str | None = None
    session: str | None = None


@dataclass
class FileResult:
    """What importing one file (or one API batch) did."""

    name: str
    events: int = 0
    new: int = 0
    duplicates: int = 0
    unmatched: int = 0
    findings: int = 0
    error: str | None = None
    unmatched_identities: dict[str, int] = field(default_factory=dict)
    finding_ids: list[uuid.UUID] = field(default_factory=list)

    def count_unmatched(self, identity: str) -> None:
        self.unmatched += 1
        if identity in self.unmatched_identities or (
            len(self.unmatched_identities) < MAX_UNMATCHED_LISTED
        ):
            self.unmatched_identities[identity] = self.unmatched_identities.get(identity, 0) + 1


def event_uuid(*parts: str) -> uuid.UUID:
    """A stable event id for sources without one (a log line, an API event)."""
    return uuid.UUID(bytes=hashlib.sha256("\x1f".join(parts).encode()).digest()[:16], version=5)


def _uuid_or_hash(value: str | None, fallback: Callable[[], uuid.UUID]) -> uuid.UUID:
    if value:
        try:
            return uuid.UUID(value)
        except ValueError:
            return event_uuid(value)
    return fallback()


def _time(value: str) -> datetime:
    at = datetime.fromisoformat(value)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


# ---- CloudTrail -------------------------------------------------------------------------------


def _outcome(error_code: str | None) -> str:
    if not error_code:
        return "success"
    return "denied" if _DENIED_CODES.search(error_code) else "error"


def cloudtrail_raw(record: dict[str, Any]) -> Raw:
    """One CloudTrail record (the documented format) as a `Raw` event."""
    ident = record.get("userIdentity") or {}
    arn = str(ident.get("arn") or "")
    principal = session_name = None
    if ident.get("type") == "AssumedRole" and ":assumed-role/" in arn:
        _, _, rest = arn.partition(":assumed-role/")
        principal, _, session_name = rest.partition("/")
    elif ident.get("type") == "IAMUser":
        principal = str(ident.get("userName") or arn.rsplit("/", 1)[-1])
    resources = record.get("resources") or []
    resource = next((str(r["ARN"]) for r in resources if r.get("ARN")), None)
    source = str(record.get("eventSource") or "unknown").split(".", 1)[0]
    agent = record.get("userAgent")
    event = Event(
        id=_uuid_or_hash(
            record.get("eventID"), lambda: event_uuid(repr(sorted(record.items(), key=str)))
        ),
        at=_time(str(record["eventTime"])),
        action=f"{source}:{record.get('eventName', '')}"[:128],
        identity=arn[:512] or str(ident.get("principalId") or "unknown"),
        outcome=_outcome(record.get("errorCode")),
        resource=resource,
        source_ip=str(record.get("sourceIPAddress") or "")[:64] or None,
        user_agent=str(agent)[:256] if agent else None,
        credential=ident.get("accessKeyId"),
    )
    return Raw(event, ActivitySource.CLOUDTRAIL, principal, session_name)


def cloudtrail_events(stream: IO[bytes]) -> Iterator[Raw]:
    """The records of one CloudTrail log file (gzip or plain JSON), parsed incrementally."""
    try:
        for record in ijson.items(decompressed(stream), "Records.item", use_float=True):
            yield cloudtrail_raw(record)
    except (EOFError, OSError, ijson.JSONError, KeyError, ValueError, TypeError) as err:
        raise CorruptFile(f"{type(err).__name__}: {err}") from err


class _Reader(io.RawIOBase):
    """Any binary stream (a file, boto3's StreamingBody) as a raw stream, so it can be
    buffered and its first bytes peeked at without being consumed."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def decompressed(stream: IO[bytes]) -> io.BufferedIOBase:
    """The stream itself, or its gunzipped content when it starts with the gzip magic."""
    buffered = io.BufferedReader(_Reader(stream), buffer_size=1 << 20)
    if buffered.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered)
    return buffered


# ---- Postgres ---------------------------------------------------------------------------------

# csvlog columns (Postgres 13+; later versions append columns, which are ignored).
PG_CSV_COLUMNS = (
    "log_time",
    "user_name",
    "database_name",
    "process_id",
    "connection_from",
    "session_id",
    "session_line_num",
    "command_tag",
    "session_start_time",
    "virtual_transaction_id",
    "transaction_id",
    "error_severity",
    "sql_state_code",
    "message",
    "detail",
    "hint",
    "internal_query",
    "internal_query_pos",
    "context",
    "query",
    "query_pos",
    "location",
    "application_name",
)
_PG_STATEMENT = re.compile(r"^(?:statement|execute [^:]*): (.*)$", re.DOTALL)
_PGAUDIT = re.compile(r"^AUDIT: (?:SESSION|OBJECT),[^,]*,[^,]*,[^,]*,([^,]*),[^,]*,([^,]*),")
_CATALOG = re.compile(r"\b(information_schema|pg_catalog)\.?\w*", re.IGNORECASE)


def _first_word(sql: str) -> str:
    word = sql.strip().split(None, 1)[0] if sql.strip() else "UNKNOWN"
    return re.sub(r"[^A-Za-z]", "", word).upper()[:64] or "UNKNOWN"


def _pg_action(row: dict[str, str]) -> tuple[str, str | None, str] | None:
    """(action, resource, outcome) of a csvlog row, or None for rows that are no activity."""
    message = row.get("message", "")
    state = row.get("sql_state_code", "")
    if message.startswith("connection authorized"):
        return "CONNECT", row.get("database_name") or None, "success"
    if state == "28P01" or message.startswith("password authentication failed"):
        return "CONNECT", row.get("database_name") or None, "denied"
    audit = _PGAUDIT.match(message)
    if audit:
        return audit.group(1).upper() or "UNKNOWN", audit.group(2) or None, "success"
    statement = _PG_STATEMENT.match(message)
    sql = statement.group(1) if statement else ""
    if row.get("error_severity") in ("ERROR", "FATAL") and state == "42501":
        sql = row.get("query", "") or sql
        return _first_word(sql) if sql else row.get("command_tag") or "UNKNOWN", None, "denied"
    if statement:
        catalog = _CATALOG.search(sql)
        return _first_word(sql), catalog.group(0) if catalog else None, "success"
    return None


def postgres_raw(row: dict[str, str], line: str) -> Raw | None:
    """One csvlog row as a `Raw` event (None when it records no activity)."""
    found = _pg_action(row)
    user = row.get("user_name", "")
    if found is None or not user:
        return None
    action, resource, outcome = found
    host = row.get("connection_from", "").rsplit(":", 1)[0] or None
    event = Event(
        id=event_uuid("postgres", line),
        at=_time(row["log_time"].replace(" UTC", "+00:00")),
        action=action,
        identity=user[:512],
        outcome=outcome,
        resource=resource,
        source_ip=host if host and host != "[local]" else None,
        user_agent=row.get("application_name") or None,
        credential=f"pg:{row.get('session_id', '')}" if host else None,
    )
    return Raw(event, ActivitySource.POSTGRES, principal=user)


def postgres_csv_events(stream: IO[bytes]) -> Iterator[Raw]:
    """The activity rows of one Postgres csvlog file (gzip or plain), row by row."""
    try:
        text = io.TextIOWrapper(decompressed(stream), encoding="utf-8", newline="")  # type: ignore[type-var]
        for values in csv.reader(text):
            if len(values) < len(PG_CSV_COLUMNS):
                raise CorruptFile(f"a row of {len(values)} columns (csvlog has at least 23)")
            row = dict(zip(PG_CSV_COLUMNS, values, strict=False))
            found = postgres_raw(row, "\x1f".join(values))
            if found is not None:
                yield found
    except (EOFError, OSError, csv.Error, UnicodeDecodeError, ValueError) as err:
        if isinstance(err, CorruptFile):
            raise
        raise CorruptFile(f"{type(err).__name__}: {err}") from err


# What a sample reads: client backends of other sessions only (never this service's own).
PG_STAT_ACTIVITY_SQL = (
    "SELECT pid, usename, client_addr::text AS client_addr, application_name, backend_start, "
    "query_start, left(query, 1000) AS query FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND usename IS NOT NULL"
)


def sample_pg_stat_activity(conn: Any) -> list[dict[str, Any]]:
    """One sample of a target's `pg_stat_activity` over an admin connection (psycopg): the
    rows `pg_stat_activity_events` turns into events. For the Postgres sweep to call."""
    with conn.cursor() as cur:
        cur.execute(PG_STAT_ACTIVITY_SQL)
        names = [d.name for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def pg_stat_activity_events(rows: Iterable[dict[str, Any]]) -> Iterator[Raw]:
    """Samples of `pg_stat_activity` (usename, client_addr, application_name, backend_start,
    query_start, query, pid) as events: one per backend and query start, so sampling the same
    running query twice adds it once."""
    for row in rows:
        user, started = row.get("usename"), row.get("query_start") or row.get("backend_start")
        if not user or started is None:
            continue
        query = str(row.get("query") or "")
        catalog = _CATALOG.search(query)
        addr = row.get("client_addr")
        event = Event(
            id=event_uuid("pg_stat_activity", str(row.get("pid")), str(started), query[:200]),
            at=started,
            action=_first_word(query) if query else "CONNECT",
            identity=str(user),
            resource=catalog.group(0) if catalog else None,
            source_ip=str(addr) if addr else None,
            user_agent=row.get("application_name") or None,
            credential=f"pg:{row.get('pid')}:{row.get('backend_start')}",
        )
        yield Raw(event, ActivitySource.POSTGRES, principal=str(user))


# ---- matching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    intent: Intent
    task_credential_id: uuid.UUID | None = None


class Matcher:
    """Identities to NHIs: IAM user and role names (from ARNs), STS session names and login
    roles of task credentials (`nhit_<hex>`), Postgres role names. Loaded once per import."""

    def __init__(self, session: Session) -> None:
        self._session = session
        revoked_at = dict(
            session.execute(
                select(AuditEvent.subject_id, func.max(AuditEvent.created_at))
                .where(AuditEvent.subject_type == "nhi", AuditEvent.event.in_(REVOKING_EVENTS))
                .group_by(AuditEvent.subject_id)
            ).all()
        )
        rows = session.execute(select(Nhi, Agent.category).join(Agent)).all()
        self._by_name: dict[tuple[Platform, str], Intent] = {}
        self._by_id: dict[uuid.UUID, Intent] = {}
        for nhi, category in rows:
            intent = intent_of(nhi, category, revoked_at.get(str(nhi.id)))
            self._by_name[(nhi.platform, nhi.name)] = intent
            self._by_id[nhi.id] = intent
        self._tasks: dict[str, Match | None] = {}

    def _task(self, name: str) -> Match | None:
        if name not in self._tasks:
            row = self._session.execute(
                select(TaskCredential.id, TaskCredential.nhi_id).where(TaskCredential.name == name)
            ).first()
            intent = self._by_id.get(row.nhi_id) if row else None
            self._tasks[name] = Match(intent, row.id) if row and intent else None
        return self._tasks[name]

    def match(self, raw: Raw) -> Match | None:
        platform = Platform.POSTGRES if raw.source is ActivitySource.POSTGRES else Platform.AWS
        if raw.session and raw.session.startswith(TASK_ROLE_PREFIX):
            found = self._task(raw.session)
            if found:
                return found
        if raw.principal and raw.principal.startswith(TASK_ROLE_PREFIX):
            found = self._task(raw.principal)
            if found:
                return found
        if raw.source is ActivitySource.API:
            for candidate in (Platform.AWS, Platform.POSTGRES):
                intent = self._by_name.get((candidate, raw.principal or ""))
                if intent:
                    return Match(intent)
            return None
        intent = self._by_name.get((platform, raw.principal or ""))
        return Match(intent) if intent else None

    def intent(self, nhi_id: uuid.UUID) -> Intent:
        return self._by_id[nhi_id]


def intent_of(nhi: Nhi, category: AgentCategory, revoked_at: datetime | None) -> Intent:
    """An NHI's declared intent (its day-one baseline)."""
    status = NhiStatus(nhi.status)
    when = None
    if status in REVOKED:
        when = revoked_at or nhi.decommissioned_at or nhi.expires_at
    scope = tuple(
        (tuple(s.get("actions", [])), tuple(s.get("resources", [])))
        for s in nhi.granted_scope
        if isinstance(s, dict)
    )
    return Intent(
        nhi_id=nhi.id,
        agent_id=nhi.agent_id,
        platform=Platform(nhi.platform),
        name=nhi.name,
        category=AgentCategory(category),
        status=status,
        scope=scope,
        cidrs=tuple(nhi.allowed_cidrs or ()),
        expires_at=nhi.expires_at,
        revoked_at=when,
    )


# ---- import -----------------------------------------------------------------------------------


class Importer:
    """Imports files (or batches) into one session: profiles are read once per NHI and written
    back by `finish_file`, in the file's own transaction."""

    def __init__(self, session: Session, matcher: Matcher | None = None) -> None:
        self._session = session
        self._matcher = matcher or Matcher(session)
        self._profiles: dict[uuid.UUID, Profile] = {}
        self._watches: dict[uuid.UUID, Watch] = {}
        self._last_used: dict[uuid.UUID, datetime] = {}
        self._findings: list[ActivityFinding] = []

    def _profile(self, nhi_id: uuid.UUID) -> Profile:
        if nhi_id not in self._profiles:
            row = self._session.get(NhiProfile, nhi_id)
            self._profiles[nhi_id] = Profile.from_json(row.profile) if row else Profile()
        return self._profiles[nhi_id]

    def run(self, name: str, raws: Iterable[Raw]) -> FileResult:
        """Import one file's events into the session's transaction; raises `CorruptFile` with
        nothing of this file to be committed (the caller rolls back)."""
        result = FileResult(name=name)
        cur = self._raw_cursor()
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS activity_stage "
            "(LIKE activity_events INCLUDING DEFAULTS) ON COMMIT DROP"
        )
        chunk: list[tuple[Raw, Match]] = []
        for raw in raws:
            result.events += 1
            found = self._matcher.match(raw)
            if found is None:
                result.count_unmatched(raw.event.identity)
                continue
            chunk.append((raw, found))
            if len(chunk) >= CHUNK:
                self._flush(cur, chunk, result)
                chunk = []
        if chunk:
            self._flush(cur, chunk, result)
        self._finish(result)
        return result

    def _raw_cursor(self) -> Any:
        # The session's own psycopg connection: COPY joins the session's transaction.
        return self._session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]

    def _flush(self, cur: Any, chunk: list[tuple[Raw, Match]], result: FileResult) -> None:
        with cur.copy(f"COPY activity_stage ({', '.join(_STAGE_COLUMNS)}) FROM STDIN") as copy:
            for raw, found in chunk:
                e = raw.event
                copy.write_row(
                    (
                        e.id,
                        found.intent.nhi_id,
                        found.task_credential_id,
                        raw.source.value,
                        e.at,
                        _clean(e.action),
                        _clean(e.resource),
                        _clean(e.source_ip),
                        _clean(e.user_agent),
                        e.outcome,
                        _clean(e.identity),
                    )
                )
        cur.execute(
            "INSERT INTO activity_events SELECT * FROM activity_stage "
            "ON CONFLICT (id) DO NOTHING RETURNING id"
        )
        new = {row[0] for row in cur.fetchall()}
        cur.execute("TRUNCATE activity_stage")
        result.new += len(new)
        result.duplicates += len(chunk) - len(new)
        for raw, found in chunk:
            if raw.event.id not in new:
                continue
            new.discard(raw.event.id)  # the same id twice in one chunk is learned once
            self._judge(raw.event, found, result)

    def _judge(self, event: Event, found: Match, result: FileResult) -> None:
        intent = found.intent
        drafts = judge(
            intent,
            self._profile(intent.nhi_id),
            self._watches.setdefault(intent.nhi_id, Watch()),
            event,
        )
        if event.outcome == "success":
            last = self._last_used.get(intent.nhi_id)
            self._last_used[intent.nhi_id] = event.at if last is None else max(last, event.at)
        for draft in drafts:
            result.findings += 1
            if len(self._findings) < MAX_FINDINGS_PER_FILE:
                self._findings.append(_finding(intent, found, event, draft))

    def _finish(self, result: FileResult) -> None:
        for finding in self._findings:
            self._session.add(finding)
            result.finding_ids.append(finding.id)
        self._findings = []
        for nhi_id, profile in self._profiles.items():
            self._session.execute(
                insert(NhiProfile)
                .values(nhi_id=nhi_id, profile=profile.to_json(), events=profile.events)
                .on_conflict_do_update(
                    index_elements=[NhiProfile.nhi_id],
                    set_={"profile": profile.to_json(), "events": profile.events},
                )
            )
        for nhi_id, at in self._last_used.items():
            self._session.execute(
                update(Nhi)
                .where(Nhi.id == nhi_id, func.coalesce(Nhi.last_used_at, at) <= at)
                .values(last_used_at=at)
            )
        self._last_used = {}
        self._session.flush()


def _clean(value: str | None) -> str | None:
    """Postgres text cannot hold NUL: a log line with one is stored without it."""
    return value.replace("\x00", "") if value and "\x00" in value else value


def _finding(intent: Intent, found: Match, event: Event, draft: Draft) -> ActivityFinding:
    evidence = {
        **draft.evidence,
        "event_id": str(event.id),
        "action": event.action,
        "identity": event.identity,
        "at": event.at.isoformat(),
        "source_ip": event.source_ip,
        "user_agent": event.user_agent,
        "resource": event.resource,
    }
    return ActivityFinding(
        id=uuid.uuid4(),
        nhi_id=intent.nhi_id,
        agent_id=intent.agent_id,
        task_credential_id=found.task_credential_id,
        kind=draft.kind,
        severity=draft.severity,
        summary=draft.summary[:2000],
        evidence=evidence,
        event_id=event.id,
        occurred_at=event.at,
    )


def api_raw(
    *,
    at: datetime,
    identity: str,
    action: str,
    resource: str | None,
    source_ip: str | None,
    user_agent: str | None,
    outcome: str,
    event_id: str | None,
) -> Raw:
    """An event posted to `POST /v1/activity` (identity: an NHI name, or a task credential's
    `nhit_` name)."""
    ident = event_id or "\x1f".join(
        ["api", identity, at.isoformat(), action, resource or "", source_ip or ""]
    )
    event = Event(
        id=event_uuid(ident),
        at=at,
        action=action,
        identity=identity,
        outcome=outcome,
        resource=resource,
        source_ip=source_ip,
        user_agent=user_agent,
        credential=identity,
    )
    return Raw(event, ActivitySource.API, principal=identity)


def read_cursor(session: Session, name: str) -> str | None:
    row = session.get(ActivityCursor, name)
    return row.position if row else None


def write_cursor(session: Session, name: str, position: str) -> None:
    """Advance a scheduled import's cursor, in the transaction of the file it passes."""
    session.execute(
        insert(ActivityCursor)
        .values(name=name, position=position)
        .on_conflict_do_update(
            index_elements=[ActivityCursor.name],
            set_={"position": position, "updated_at": func.now()},
        )
    )


# ---- one file, one transaction ----------------------------------------------------------------


def format_of(name: str) -> ActivitySource:
    """A file's format from its name: Postgres csvlog (`.csv`, `.csv.gz`) or CloudTrail."""
    return (
        ActivitySource.POSTGRES if re.search(r"\.csv(\.gz)?$", name) else ActivitySource.CLOUDTRAIL
    )


PARSERS: dict[ActivitySource, Callable[[IO[bytes]], Iterator[Raw]]] = {
    ActivitySource.CLOUDTRAIL: cloudtrail_events,
    ActivitySource.POSTGRES: postgres_csv_events,
}


@dataclass
class Imported:
    """A file's result and the findings to alert on (claimed in the file's transaction)."""

    result: FileResult
    alerts: list[findings.AlertTarget] = field(default_factory=list)


def import_file(
    sessions: sessionmaker[Session],
    name: str,
    open_stream: Callable[[], AbstractContextManager[IO[bytes]]],
    *,
    now: datetime,
    alert_window: timedelta,
    cursor: str | None = None,
) -> Imported:
    """Import one file in one transaction, with the cursor `cursor` (a scheduled import's
    prefix) moved to `name` in the same transaction. A corrupt file changes nothing but the
    cursor (so one bad object does not stop the schedule for good); its error is reported."""
    parse = PARSERS[format_of(name)]
    try:
        with transaction(sessions) as session:
            with open_stream() as stream:
                result = Importer(session).run(name, parse(stream))
            alerts = findings.claim_alerts(
                session, result.finding_ids, now=now, window=alert_window
            )
            if cursor is not None:
                write_cursor(session, cursor, name)
            return Imported(result, alerts)
    except CorruptFile as err:
        if cursor is not None:
            with transaction(sessions) as session:
                write_cursor(session, cursor, name)
        return Imported(FileResult(name=name, error=f"not imported, file unreadable: {err}"))


def import_batch(
    session: Session, name: str, raws: Iterable[Raw], *, now: datetime, alert_window: timedelta
) -> Imported:
    """Import a batch (`POST /v1/activity`) in the caller's transaction."""
    result = Importer(session).run(name, raws)
    return Imported(
        result, findings.claim_alerts(session, result.finding_ids, now=now, window=alert_window)
    )
