"""Activity ingestion (issue 17): CloudTrail files, Postgres CSV logs, `pg_stat_activity`
samples and API batches, matched to NHIs and task credentials and judged against their
baselines (nhi/rules/baseline.py).

Everything is streamed: a CloudTrail file is parsed record by record (the C JSON decoder over
a sliding window of the gunzipped text; ijson for any other layout), a CSV log row by row, and
events are written in chunks of `CHUNK` through binary COPY into a temporary staging table and
`INSERT ... ON CONFLICT DO NOTHING RETURNING id`, so only events not stored before are learned
and judged (a re-import adds nothing). A worker thread stores one chunk while the importer
judges the one before it and parses the next. One file is one transaction: events,
findings, profiles, `last_used_at` and the scheduled import's cursor commit together, and a
truncated or corrupt file rolls back whole (the caller reports it).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import gzip
import hashlib
import io
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import IO, Any

import ijson  # type: ignore[import-untyped]
from sqlalchemy import DateTime, Uuid, column, func, select, update, values
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
from nhi.rules.pg_grants import role_names
from nhi.rules.task_credentials import TASK_ROLE_PREFIX
from nhi.services import findings

CHUNK = 5000  # events per COPY: bounds memory, amortises the round trips
MAX_UNMATCHED_LISTED = 20  # unmatched identities named in a result; the rest are counted
MAX_MATCHES_CACHED = 100_000  # identities resolved to NHIs kept per import
MAX_FINDINGS_PER_FILE = 1000  # stored per file; a flood beyond it is counted, not stored
# The audit events that take an NHI out of use: a use after the latest of them is a finding.
REVOKING_EVENTS = ("nhi.quarantined", "nhi.decommissioned", "nhi.missing", "nhi.revoke_failed")
_DENIED_CODES = re.compile(r"AccessDenied|Unauthorized|Forbidden", re.IGNORECASE)


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


def _time(value: str) -> datetime:
    at = datetime.fromisoformat(value)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


# ---- CloudTrail -------------------------------------------------------------------------------


def _outcome(error_code: str | None) -> str:
    if not error_code:
        return "success"
    return "denied" if _DENIED_CODES.search(error_code) else "error"


# A trail repeats the same few identities, API calls and (second-resolution) times: each is
# worked out once (the import's per-record cost is the rate).
@lru_cache(maxsize=65536)
def _assumed_role(arn: str) -> tuple[str, str] | None:
    """(role name, session name) of an assumed-role ARN, or None for another ARN."""
    if ":assumed-role/" not in arn:
        return None
    _, _, rest = arn.partition(":assumed-role/")
    principal, _, session_name = rest.partition("/")
    return principal, session_name


@lru_cache(maxsize=4096)
def _action(event_source: str, event_name: str) -> str:
    return f"{event_source.split('.', 1)[0]}:{event_name}"[:128]


_cloudtrail_time = lru_cache(maxsize=4096)(_time)


def cloudtrail_raw(record: dict[str, Any]) -> Raw:
    """One CloudTrail record (the documented format) as a `Raw` event."""
    ident = record.get("userIdentity") or {}
    arn = str(ident.get("arn") or "")
    principal = session_name = None
    kind = ident.get("type")
    if kind == "AssumedRole":
        assumed = _assumed_role(arn)
        if assumed is not None:
            principal, session_name = assumed
    elif kind == "IAMUser":
        principal = str(ident.get("userName") or arn.rsplit("/", 1)[-1])
    resource = None
    for r in record.get("resources") or ():
        if r.get("ARN"):
            resource = str(r["ARN"])
            break
    source = record.get("eventSource") or "unknown"
    name = record.get("eventName", "")
    if type(source) is str and type(name) is str:
        action = _action(source, name)
    else:
        action = f"{str(source).split('.', 1)[0]}:{name}"[:128]
    event_id = record.get("eventID")
    if event_id:
        try:
            id_ = uuid.UUID(event_id)
        except ValueError:
            id_ = event_uuid(event_id)
    else:
        id_ = event_uuid(repr(sorted(record.items(), key=str)))
    error = record.get("errorCode")
    agent = record.get("userAgent")
    event = Event(
        id=id_,
        at=_cloudtrail_time(str(record["eventTime"])),
        action=action,
        identity=arn[:512] or str(ident.get("principalId") or "unknown"),
        outcome=_outcome(error) if error else "success",
        resource=resource,
        source_ip=str(record.get("sourceIPAddress") or "")[:64] or None,
        user_agent=str(agent)[:256] if agent else None,
        credential=ident.get("accessKeyId"),
    )
    return Raw(event, ActivitySource.CLOUDTRAIL, principal, session_name)


def cloudtrail_events(stream: IO[bytes]) -> Iterator[Raw]:
    """The records of one CloudTrail log file (gzip or plain JSON), parsed incrementally."""
    try:
        content = decompressed(stream)
        peek = getattr(content, "peek", None)  # both a buffered file and a GzipFile have it
        if peek is not None and _RECORDS_START.match(peek(64)):
            records: Iterator[Any] = _records(content)
        else:  # any other layout (keys before `Records`, no records at all): the general parser
            records = ijson.items(content, "Records.item", use_float=True)
        for record in records:
            yield cloudtrail_raw(record)
    except (EOFError, OSError, ijson.JSONError, KeyError, ValueError, TypeError) as err:
        raise CorruptFile(f"{type(err).__name__}: {err}") from err


# How CloudTrail writes a log file: `{"Records":[{...},{...}]}`.
_RECORDS_START = re.compile(rb'\s*\{\s*"Records"\s*:\s*\[')
_SPACE = re.compile(r"[ \t\n\r]*")
_TEXT_BLOCK = 1 << 20  # characters decoded at a time
# Characters one record may span before the file counts as broken (CloudTrail's records are
# at most a few hundred KB): a broken spot costs this much reading, not the rest of the file.
_MAX_RECORD = 8 << 20
_decode = json.JSONDecoder().raw_decode


def _records(content: io.BufferedIOBase) -> Iterator[Any]:
    """The items of the `Records` array of a file laid out as CloudTrail writes it, decoded
    one after the other by the C JSON decoder from a sliding text buffer (faster than an
    event-based parser; strict: anything but `{"Records":[item, ...]}` is an error)."""
    text = io.TextIOWrapper(content, encoding="utf-8")  # type: ignore[type-var]
    buf = text.read(_TEXT_BLOCK)
    start = re.match(r'\s*\{\s*"Records"\s*:\s*\[', buf)
    if start is None:
        raise ValueError("not a CloudTrail log file")
    pos, eof, first = start.end(), False, True

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        block = text.read(_TEXT_BLOCK)
        eof = not block
        buf, pos = buf[pos:] + block, 0
        return not eof

    while True:
        pos = _SPACE.match(buf, pos).end()  # type: ignore[union-attr]
        while pos >= len(buf):
            if not more():
                raise ValueError("the file ends inside its Records")
            pos = _SPACE.match(buf, pos).end()  # type: ignore[union-attr]
        if first and buf[pos] == "]":
            break
        try:
            record, end = _decode(buf, pos)
            # A value reaching the end of the buffer may go on in the next block.
            complete = end < len(buf) or eof
        except json.JSONDecodeError:
            complete = False
            if len(buf) - pos > _MAX_RECORD or eof:
                raise
        if not complete:
            if not more() and len(buf) - pos == 0:
                raise ValueError("the file ends inside its Records")
            continue
        yield record
        first = False
        pos = _SPACE.match(buf, end).end()  # type: ignore[union-attr]
        while pos >= len(buf):
            if not more():
                raise ValueError("the file ends inside its Records")
            pos = _SPACE.match(buf, pos).end()  # type: ignore[union-attr]
        if buf[pos] == "]":
            break
        if buf[pos] != ",":
            raise ValueError(f"expected ',' or ']' after a record, found {buf[pos]!r}")
        pos += 1
    # After the array: the end of the object, or (unusual) more keys after `Records`.
    rest = (buf[pos + 1 :] + text.read()).strip()
    if rest != "}":
        tail = json.loads("{" + rest[1:]) if rest.startswith(",") else None
        if not isinstance(tail, dict):
            raise ValueError("unexpected content after the Records")


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
            if nhi.platform is Platform.POSTGRES:
                # A postgres_role's logins are its two alternating LOGIN roles (`<group>_a`,
                # `_b`): those, not the group, are what logs and pg_stat_activity name.
                with contextlib.suppress(ValueError):
                    for login in role_names(nhi.name):
                        self._by_name[(nhi.platform, login)] = intent
            self._by_id[nhi.id] = intent
        self._tasks: dict[str, Match | None] = {}
        self._matches: dict[tuple[ActivitySource, str | None, str | None], Match | None] = {}

    def _task(self, name: str) -> Match | None:
        if name not in self._tasks:
            row = self._session.execute(
                select(TaskCredential.id, TaskCredential.nhi_id).where(TaskCredential.name == name)
            ).first()
            intent = self._by_id.get(row.nhi_id) if row else None
            self._tasks[name] = Match(intent, row.id) if row and intent else None
        return self._tasks[name]

    def match(self, raw: Raw) -> Match | None:
        # A log names the same few identities over and over: each is resolved once.
        key = (raw.source, raw.principal, raw.session)
        try:
            return self._matches[key]
        except KeyError:
            if len(self._matches) >= MAX_MATCHES_CACHED:
                self._matches.clear()  # session names can be unique per session: stay bounded
            found = self._matches[key] = self._resolve(raw)
            return found

    def _resolve(self, raw: Raw) -> Match | None:
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


class _FullCollectionsPaused:
    """Holds off the cyclic garbage collector's full (oldest-generation) collections while any
    import runs; nested and concurrent imports share one pause, which ends with the last.

    Events in flight live across tens of thousands of allocations, so the collector promotes
    them to its oldest generation and then walks the whole heap (every module, the ORM) each
    time enough have piled up: a sixth of an import's CPU. Nothing an import creates per event
    forms a reference cycle (reference counting frees it), and the young generations are still
    collected, so short-lived cycles made meanwhile (by this or other threads) are too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._thresholds = gc.get_threshold()

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._thresholds = gc.get_threshold()
                young, middle, _ = self._thresholds
                gc.set_threshold(young, middle, 1 << 30)
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                gc.set_threshold(*self._thresholds)


_FULL_COLLECTIONS_PAUSED = _FullCollectionsPaused()


@dataclass
class _Nhi:
    """What an import keeps per NHI: its learned profile, its short windows and its latest
    successful use."""

    profile: Profile
    watch: Watch = field(default_factory=Watch)
    last_used: datetime | None = None


@dataclass
class _Chunk:
    """Events on their way to the database: (event, match, source) in file order."""

    rows: list[tuple[Event, Match, ActivitySource]] = field(default_factory=list)


class Importer:
    """Imports files (or batches) into one session: profiles are read once per NHI and written
    back at the end of each file, in the file's own transaction.

    Storing and judging overlap: while a worker thread copies one chunk into staging and
    inserts what is new (the database's work, waited for on the socket without the GIL), this
    thread judges the chunk before it and parses the next. Chunks are stored and judged in
    file order, so the findings are those a sequential import makes."""

    def __init__(self, session: Session, matcher: Matcher | None = None) -> None:
        self._session = session
        self._matcher = matcher or Matcher(session)
        self._nhis: dict[uuid.UUID, _Nhi] = {}
        self._findings: list[ActivityFinding] = []

    def _state(self, nhi_id: uuid.UUID) -> _Nhi:
        state = self._nhis.get(nhi_id)
        if state is None:
            row = self._session.get(NhiProfile, nhi_id)
            state = _Nhi(Profile.from_json(row.profile) if row else Profile())
            self._nhis[nhi_id] = state
        return state

    def run(self, name: str, raws: Iterable[Raw]) -> FileResult:
        """Import one file's events into the session's transaction; raises `CorruptFile` with
        nothing of this file to be committed (the caller rolls back)."""
        result = FileResult(name=name)
        # The session's own psycopg connection: COPY joins the session's transaction.
        conn: Any = self._session.connection().connection.driver_connection
        with conn.cursor() as cur:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS activity_stage "
                "(seq integer NOT NULL, LIKE activity_events INCLUDING DEFAULTS) ON COMMIT DROP"
            )
        # One worker: chunks reach the database one after the other, in order. The
        # connection is psycopg's (thread-safe: each statement, a whole COPY included, holds
        # its lock), so this thread's own queries through the session (a task credential by
        # name, an NHI's stored profile) wait for the worker's statement to end.
        store = ThreadPoolExecutor(max_workers=1, thread_name_prefix="activity-store")
        try:
            with _FULL_COLLECTIONS_PAUSED:
                self._pipeline(store, conn, raws, result)
        finally:
            # Whatever happened, nothing may still be using the connection when the caller
            # commits or rolls back.
            store.shutdown(wait=True, cancel_futures=True)
        self._finish(result)
        return result

    def _pipeline(
        self, store: ThreadPoolExecutor, conn: Any, raws: Iterable[Raw], result: FileResult
    ) -> None:
        """Parse and match events into chunks; each full chunk goes to the worker and the one
        before it is judged."""
        pending: tuple[_Chunk, Future[list[int]]] | None = None
        chunk = _Chunk()
        match = self._matcher.match
        for raw in raws:
            result.events += 1
            found = match(raw)
            if found is None:
                result.count_unmatched(raw.event.identity)
                continue
            chunk.rows.append((raw.event, found, raw.source))
            if len(chunk.rows) >= CHUNK:
                pending = self._hand_over(store, conn, pending, chunk, result)
                chunk = _Chunk()
        if chunk.rows:
            pending = self._hand_over(store, conn, pending, chunk, result)
        if pending is not None:
            self._judge_chunk(pending[0], pending[1].result(), result)

    def _hand_over(
        self,
        store: ThreadPoolExecutor,
        conn: Any,
        pending: tuple[_Chunk, Future[list[int]]] | None,
        chunk: _Chunk,
        result: FileResult,
    ) -> tuple[_Chunk, Future[list[int]]]:
        """Queue `chunk` for storing, then judge the chunk stored before it (the database
        works on this one meanwhile)."""
        queued = store.submit(_store_chunk, conn, chunk)
        if pending is not None:
            self._judge_chunk(pending[0], pending[1].result(), result)
        return chunk, queued

    def _judge_chunk(self, chunk: _Chunk, new: list[int], result: FileResult) -> None:
        """Judge the events of `chunk` stored for the first time (`new`: their positions, the
        first of each id), in file order."""
        rows = chunk.rows
        result.new += len(new)
        result.duplicates += len(rows) - len(new)
        if len(new) == len(rows):
            picked: Iterable[tuple[Event, Match, ActivitySource]] = rows
        else:
            new.sort()
            picked = [rows[i] for i in new]
        states = self._nhis
        for event, found, _ in picked:
            intent = found.intent
            state = states.get(intent.nhi_id) or self._state(intent.nhi_id)
            drafts = judge(intent, state.profile, state.watch, event)
            if event.outcome == "success" and (
                state.last_used is None or event.at > state.last_used
            ):
                state.last_used = event.at
            for draft in drafts:
                result.findings += 1
                if len(self._findings) < MAX_FINDINGS_PER_FILE:
                    self._findings.append(_finding(intent, found, event, draft))

    def _finish(self, result: FileResult) -> None:
        for finding in self._findings:
            self._session.add(finding)
            result.finding_ids.append(finding.id)
        self._findings = []
        states = list(self._nhis.items())
        for start in range(0, len(states), 1000):
            batch = states[start : start + 1000]
            stmt = insert(NhiProfile).values(
                [
                    {"nhi_id": nhi_id, "profile": s.profile.to_json(), "events": s.profile.events}
                    for nhi_id, s in batch
                ]
            )
            self._session.execute(
                stmt.on_conflict_do_update(
                    index_elements=[NhiProfile.nhi_id],
                    set_={
                        "profile": stmt.excluded.profile,
                        "events": stmt.excluded.events,
                        "updated_at": func.now(),
                    },
                )
            )
        used = [(nhi_id, s.last_used) for nhi_id, s in states if s.last_used is not None]
        for start in range(0, len(used), 1000):
            # One statement per thousand NHIs used, not one each.
            latest = values(
                column("id", Uuid()), column("at", DateTime(timezone=True)), name="latest"
            ).data(used[start : start + 1000])
            self._session.execute(
                update(Nhi)
                .where(
                    Nhi.id == latest.c.id,
                    func.coalesce(Nhi.last_used_at, latest.c.at) <= latest.c.at,
                )
                .values(last_used_at=latest.c.at)
            )
        for state in self._nhis.values():
            state.last_used = None
        self._session.flush()


# The staging table holds `seq` (the event's position in its chunk) before the event's columns.
_EVENT_COLUMNS = (
    "id, nhi_id, task_credential_id, source, occurred_at, action, resource, source_ip, "
    "user_agent, outcome, identity"
)
_INSERT_EVENTS = """
WITH new AS (
    INSERT INTO activity_events (
        id, nhi_id, task_credential_id, source, occurred_at, action, resource, source_ip,
        user_agent, outcome, identity
    )
    SELECT id, nhi_id, task_credential_id, source, occurred_at, action, resource, source_ip,
        user_agent, outcome, identity
    FROM activity_stage
    ON CONFLICT (id) DO NOTHING
    RETURNING id
)
SELECT min(s.seq) FROM activity_stage s JOIN new USING (id) GROUP BY s.id
"""
# Binary COPY: half the client's formatting work of text, and less parsing for the server.
_COPY_STAGE = "COPY activity_stage (seq, " + _EVENT_COLUMNS + ") FROM STDIN (FORMAT BINARY)"
_STAGE_TYPES = (
    "int4", "uuid", "uuid", "uuid", "text", "timestamptz", "text", "text", "text", "text", "text",
    "text",
)  # fmt: skip


def _store_chunk(conn: Any, chunk: _Chunk) -> list[int]:
    """COPY a chunk into staging and insert the events not stored before (in the worker
    thread, on the session's own psycopg connection and transaction); the positions of the
    new ones, the first of each id (the same id twice in a file is one event)."""
    with conn.cursor() as cur:
        with cur.copy(_COPY_STAGE) as copy:
            copy.set_types(_STAGE_TYPES)
            write = copy.write_row
            source: ActivitySource | None = None
            source_text = ""
            for seq, (e, found, origin) in enumerate(chunk.rows):
                if origin is not source:  # an enum's value is a slow property: once a run
                    source, source_text = origin, origin.value
                write(
                    (
                        seq,
                        e.id,
                        found.intent.nhi_id,
                        found.task_credential_id,
                        source_text,
                        e.at,
                        _clean(e.action),
                        _clean(e.resource),
                        _clean(e.source_ip),
                        _clean(e.user_agent),
                        e.outcome,
                        _clean(e.identity),
                    )
                )
        cur.execute(_INSERT_EVENTS)
        new = [row[0] for row in cur.fetchall()]
        cur.execute("TRUNCATE activity_stage")
    return new


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
