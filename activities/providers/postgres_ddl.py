"""Role and grant DDL of the Postgres provider, and its SQL plumbing.

Functions over one admin connection (or, for `admin` and `login_as`, opening one): the roles
of an NHI (`Names`: a NOLOGIN group role and two alternating login roles), the comment marking
them ours, VALID UNTIL and the read-only default, passwords as SCRAM verifiers computed client
side, the group's grants made exactly the scope's (and compared with it: `drift`), session
ends, advisory locks, and what blocks a DROP ROLE. Every identifier reaching SQL was checked by
`nhi.rules.pg_grants` first and is quoted with `psycopg.sql.Identifier`; Postgres errors leave as
classified `ApplicationError`s (`classify_postgres`), never quoting a statement.

The provider (activities/providers/postgres.py) decides what to run; its discovery
(postgres_discovery.py) lists. Blocking; the activity wrapper heartbeats around each call.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from temporalio.exceptions import ApplicationError

from models.contracts import ProvisionPlan, ScopeStatement
from nhi.rules.pg_grants import (
    Grant,
    is_read_only,
    managed_comment,
    parse_comment,
    parse_grants,
    role_names,
)
from nhi.rules.policy import RuleViolation
from nhi.rules.task_credentials import TASK_ROLE_PREFIX
from nhi.services.target_registry import TargetConnection, TargetResolver, UnknownTarget

log = logging.getLogger(__name__)

Conn = psycopg.Connection[TupleRow]

# Relation kinds GRANT ... ON ALL TABLES IN SCHEMA covers.
_TABLE_KINDS = ["r", "p", "v", "m", "f"]
_TERMINATE_WAIT_MS = 5000
_ADMIN_OPTIONS = "-c statement_timeout=60000 -c lock_timeout=30000"


def fail(message: str, kind: str, *, retryable: bool = False) -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=not retryable)


# SQLSTATEs a later try can get past: lost connections, restarts, lock and statement timeouts,
# serialization failures, catalog races ("tuple concurrently updated" is XX000), and 2BP01,
# a privilege some other role granted to the NHI's role: DROP OWNED cannot revoke it, and the
# removal succeeds as soon as that grantor revokes it (the message says who and what).
RETRYABLE_SQLSTATES = frozenset(
    {
        "2BP01",
        "40001",
        "40P01",
        "55P03",
        "55006",
        "57014",
        "57P01",
        "57P02",
        "57P03",
        "53300",
        "08000",
        "08001",
        "08003",
        "08004",
        "08006",
        "XX000",
    }
)
# SQLSTATEs no retry changes: the admin lacks a privilege, an object or name is wrong.
PERMANENT_SQLSTATES = frozenset(
    {"42501", "42704", "42P01", "3F000", "42710", "3D000", "0A000", "22023", "42601"}
)


def _sqlstate_name(state: str, err: BaseException) -> str:
    """psycopg's class name for a SQLSTATE (e.g. 2BP01 -> DependentObjectsStillExist)."""
    try:
        return psycopg.errors.lookup(state).__name__ if state else type(err).__name__
    except KeyError:
        return type(err).__name__


def _retryable(err: psycopg.Error, state: str) -> bool:
    if state in RETRYABLE_SQLSTATES:
        return True
    if state in PERMANENT_SQLSTATES:
        return False
    # Unlisted: lost connections and server trouble are transient, wrong statements are not.
    if isinstance(err, psycopg.OperationalError):
        return True
    return not isinstance(
        err,
        psycopg.ProgrammingError
        | psycopg.DataError
        | psycopg.IntegrityError
        | psycopg.NotSupportedError,
    )


def classify_postgres(
    err: psycopg.Error, doing: str, *, found: str | None = None, hint: str | None = None
) -> ApplicationError:
    """A Postgres error as a new ApplicationError, written (`str()`, what the workflow's
    failure reason holds) "Name: message (SQLSTATE code, doing)".

    The type is psycopg's name for the SQLSTATE (a stable name), the details carry the code.
    Only the server's primary message is kept: `str(err)` can quote the statement, and a
    statement may hold a password verifier. `found` adds what the catalog says blocks the
    statement, `hint` what the operator does about it.
    """
    state = err.sqlstate or ""
    primary = err.diag.message_primary if err.diag else None
    if not primary and not state and isinstance(err, psycopg.OperationalError):
        # A failed connection: libpq's text names host and port, never the password.
        primary = str(err).strip().splitlines()[0] if str(err).strip() else None
    name = _sqlstate_name(state, err)
    primary = primary or name
    kind = "ConcurrentUpdate" if "tuple concurrently updated" in primary else name
    message = f"{primary} (SQLSTATE {state}, {doing})" if state else f"{primary} ({doing})"
    if found:
        message += f": {found}"
    if hint:
        message += f". {hint}"
    return ApplicationError(
        message,
        {"code": state or name, "name": name, "message": primary},
        type=kind,
        non_retryable=not _retryable(err, state),
    )


# Privileges held by the roles being dropped that the admin did not grant (and so DROP OWNED,
# run as the admin, cannot revoke): on tables, views and sequences, their columns, schemas,
# the database and functions. Names come back quoted, ready for the operator's REVOKE.
_BLOCKERS_SQL = """
WITH ours AS (SELECT oid, rolname FROM pg_roles WHERE rolname = ANY(%(roles)s)),
acl AS (
    SELECT CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view' ELSE 'table' END AS kind,
           format('%%I.%%I', n.nspname, c.relname) AS obj, NULL::text AS col, a.*
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
         LATERAL aclexplode(c.relacl) a
    UNION ALL
    SELECT 'table', format('%%I.%%I', n.nspname, c.relname), quote_ident(t.attname), a.*
    FROM pg_attribute t JOIN pg_class c ON c.oid = t.attrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace,
         LATERAL aclexplode(t.attacl) a
    UNION ALL
    SELECT 'schema', quote_ident(n.nspname), NULL, a.*
    FROM pg_namespace n, LATERAL aclexplode(n.nspacl) a
    UNION ALL
    SELECT 'database', quote_ident(d.datname), NULL, a.*
    FROM pg_database d, LATERAL aclexplode(d.datacl) a
    UNION ALL
    SELECT 'function', p.oid::regprocedure::text, NULL, a.*
    FROM pg_proc p, LATERAL aclexplode(p.proacl) a
)
SELECT acl.kind, acl.obj, acl.col, acl.privilege_type,
       quote_ident(g.rolname), quote_ident(o.rolname)
FROM acl JOIN ours o ON o.oid = acl.grantee JOIN pg_roles g ON g.oid = acl.grantor
WHERE g.rolname <> current_user AND acl.grantor NOT IN (SELECT oid FROM ours)
ORDER BY 1, 2, 3, 4, 5, 6
"""


def until(at: datetime) -> sql.Composable:
    # VALID UNTIL takes a string constant, not a typed expression.
    aware = at if at.tzinfo else at.replace(tzinfo=UTC)
    return sql.Literal(aware.isoformat())


def ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


@dataclass(frozen=True)
class Role:
    """A role as the catalog shows it, with its parsed marker (None: not ours)."""

    name: str
    can_login: bool
    comment: dict[str, str] | None


@dataclass(frozen=True)
class Names:
    """The roles of one NHI: its group and the two login roles rotation alternates."""

    group: str
    logins: tuple[str, str]


def resolve(targets: TargetResolver, name: str | None) -> TargetConnection:
    """The registered target a plan or reference names (a permanent error if none)."""
    if not name:
        raise fail("a postgres_role identity must name its target", "InvalidPlan")
    try:
        return targets.get(name)
    except UnknownTarget as err:
        # The registry's messages name the target and the missing piece, never a password.
        raise fail(str(err), "UnknownTarget") from None


# How long a target's resolved settings (and admin password) are reused by the hot callers
# (the task issuer, the reaper's batches): a rotated admin password or an edited target is
# picked up within this, without a `targets` read and a secret fetch per call.
TARGET_CACHE_S = 10.0


class ResolvedTargets:
    """`resolve`, each target's answer reused for `ttl_s`. Thread-safe; `forget` drops one
    (after a failure on it, so the next call resolves it afresh)."""

    def __init__(self, targets: TargetResolver, ttl_s: float = TARGET_CACHE_S) -> None:
        self._targets = targets
        self._ttl_s = ttl_s
        self._found: dict[str, tuple[float, TargetConnection]] = {}
        self._lock = threading.Lock()

    def get(self, name: str | None) -> TargetConnection:
        now = time.monotonic()
        with self._lock:
            cached = self._found.get(name or "")
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        target = resolve(self._targets, name)
        with self._lock:
            # Under the name asked for: no name (the default target) is cached as well.
            self._found[name or ""] = (now, target)
        return target

    def forget(self, name: str) -> None:
        with self._lock:
            self._found.pop(name, None)


@contextmanager
def admin(target: TargetConnection, doing: str) -> Iterator[Conn]:
    """A fresh autocommit admin connection; Postgres errors leave it classified."""
    try:
        with psycopg.connect(
            host=target.host,
            port=target.port,
            dbname=target.dbname,
            user=target.admin_user,
            password=target.password,
            sslmode=target.sslmode,
            connect_timeout=10,
            application_name="nhi-lifecycle",
            options=_ADMIN_OPTIONS,
            autocommit=True,
        ) as conn:
            yield conn
    except psycopg.Error as err:
        raise classify_postgres(err, f"{doing} on target {target.name!r}") from None


def login_as(target: TargetConnection, value: Mapping[str, Any]) -> str | None:
    """Log in with a delivered credential: the session's user, or None if refused."""
    try:
        with psycopg.connect(
            host=str(value["host"]),
            port=int(value["port"]),
            dbname=str(value["dbname"]),
            user=str(value["username"]),
            password=str(value["password"]),
            sslmode=target.sslmode,
            connect_timeout=10,
            application_name="nhi-lifecycle-check",
        ) as conn:
            row = conn.execute("SELECT current_user").fetchone()
            return str(row[0]) if row else None
    except (psycopg.OperationalError, KeyError, ValueError):
        return None


def names_of(group: str) -> Names:
    try:
        return Names(group, role_names(group))
    except ValueError as err:
        raise fail(f"identity name: {err}", "InvalidPlan") from None


def find_roles(conn: Conn, names: list[str]) -> dict[str, Role]:
    rows = conn.execute(
        "SELECT rolname, rolcanlogin, shobj_description(oid, 'pg_authid') "
        "FROM pg_roles WHERE rolname = ANY(%s)",
        (names,),
    ).fetchall()
    return {str(n): Role(str(n), bool(login), parse_comment(c)) for n, login, c in rows}


# Task credentials' login roles, as a LIKE pattern (`_` escaped).
TASK_ROLE_PATTERN = TASK_ROLE_PREFIX.replace("_", r"\_") + "%"


def task_roles(conn: Conn, nhi_id: uuid.UUID | None) -> dict[str, Role]:
    """The login roles of an NHI's task credentials, found by their marker (`part=task`,
    `nhi-id=<nhi_id>`) rather than by membership, so one whose group is already gone (or
    was never granted) is found too. None (no NHI id) finds nothing."""
    if nhi_id is None:
        return {}
    rows = conn.execute(
        "SELECT rolname, rolcanlogin, shobj_description(oid, 'pg_authid') FROM pg_roles "
        "WHERE rolname LIKE %s AND shobj_description(oid, 'pg_authid') LIKE %s",
        (TASK_ROLE_PATTERN, f"%;nhi-id={nhi_id};%"),
    ).fetchall()
    found: dict[str, Role] = {}
    for name, login, comment in rows:
        fields = parse_comment(comment)
        if fields and fields.get("part") == "task" and fields.get("nhi-id") == str(nhi_id):
            found[str(name)] = Role(str(name), bool(login), fields)
    return found


def nologin(conn: Conn, nhi_id: uuid.UUID | None, roles: Mapping[str, Role]) -> list[str]:
    """NOLOGIN on each of `roles` (ours, checked) that can still log in; the names changed.
    Sessions go on until `terminate`, which must run after this is committed: a client that
    reconnected before the commit would otherwise keep a session."""
    disabled: list[str] = []
    for role in roles.values():
        check_ours(role, nhi_id)
        if role.can_login:
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident(role.name)))
            disabled.append(role.name)
    return disabled


def check_ours(role: Role, nhi_id: uuid.UUID | None) -> None:
    """Refuse a role whose marker names another NHI (or none: made by hand). An unknown
    `nhi_id` matches no marker."""
    if nhi_id is None or role.comment is None or role.comment.get("nhi-id") != str(nhi_id):
        raise fail(
            f"role {role.name} already exists and is not NHI {nhi_id}'s",
            "IdentityConflict",
        )


def lock(conn: Conn, keys: list[str]) -> None:
    # Sorted, so two calls needing the same locks cannot deadlock each other.
    for key in sorted(set(keys)):
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"nhi-lifecycle:{key}",))


def ensure_member(conn: Conn, roles: list[str]) -> None:
    """Give the admin the privileges of `roles`: REASSIGN/DROP OWNED require them. (On
    PostgreSQL 16+ the creator of a role is a member with ADMIN OPTION but, by default,
    without its privileges, so membership alone is not enough.)"""
    for role in roles:
        row = conn.execute("SELECT pg_has_role(current_user, %s, 'USAGE')", (role,)).fetchone()
        if not (row and row[0]):
            conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(ident(role)))


def terminate(conn: Conn, roles: list[str]) -> int:
    """End every session of `roles`, waiting (bounded) for each backend to exit."""
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity "
        "WHERE usename = ANY(%s) AND pid <> pg_backend_pid()",
        (_TERMINATE_WAIT_MS, roles),
    ).fetchall()
    return sum(1 for (ok,) in rows if ok)


def lock_out(
    conn: Conn, nhi_id: uuid.UUID | None, roles: Mapping[str, Role]
) -> tuple[list[str], int]:
    """NOLOGIN on each of `roles` (ours, checked) that can still log in, then end their
    sessions: VALID UNTIL and NOLOGIN stop new logins only. Returns (disabled, ended)."""
    disabled = nologin(conn, nhi_id, roles)
    return disabled, terminate(conn, list(roles))


def sessions(conn: Conn, roles: list[str]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = ANY(%s)", (roles,)
    ).fetchone()
    return int(row[0]) if row else 0


def ensure_group(conn: Conn, plan: ProvisionPlan, names: Names) -> None:
    found = find_roles(conn, [names.group]).get(names.group)
    if found is not None:
        check_ours(found, plan.nhi_id)
        return
    create_role(conn, plan, names.group, "group", sql.SQL("NOLOGIN"))
    log.info("group role %s created for nhi %s", names.group, plan.nhi_id)


def create_role(
    conn: Conn,
    plan: ProvisionPlan,
    name: str,
    part: Literal["group", "login"],
    attributes: sql.Composable,
) -> None:
    """CREATE ROLE with the comment that marks it ours (the "already exists" check and
    the sweeps read it; it also holds the creation time Postgres does not keep)."""
    conn.execute(sql.SQL("CREATE ROLE {} {}").format(ident(name), attributes))
    comment = managed_comment(
        nhi_id=plan.nhi_id, agent_id=plan.agent_id, part=part, created_at=datetime.now(UTC)
    )
    conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(ident(name), sql.Literal(comment)))


def require_group(conn: Conn, plan: ProvisionPlan, names: Names) -> None:
    found = find_roles(conn, [names.group]).get(names.group)
    if found is None:
        raise fail(f"group role {names.group} does not exist", "IdentityMissing")
    check_ours(found, plan.nhi_id)


def ensure_login(
    conn: Conn, plan: ProvisionPlan, names: Names, login: str, target: TargetConnection
) -> None:
    """Create the login role (NOLOGIN until it gets a password) or check it is ours, then
    bring its expiry, connection limit, membership and read-only default in line."""
    found = find_roles(conn, [login]).get(login)
    role = ident(login)
    if found is None:
        attributes = sql.SQL("NOLOGIN INHERIT IN ROLE {}").format(ident(names.group))
        create_role(conn, plan, login, "login", attributes)
    else:
        check_ours(found, plan.nhi_id)
        row = conn.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (login, names.group)).fetchone()
        if not (row and row[0]):
            conn.execute(sql.SQL("GRANT {} TO {}").format(ident(names.group), role))
    configure_login(conn, plan, login, target)


def configure_login(conn: Conn, plan: ProvisionPlan, login: str, target: TargetConnection) -> None:
    role = ident(login)
    conn.execute(
        sql.SQL("ALTER ROLE {} VALID UNTIL {} CONNECTION LIMIT {}").format(
            role, until(plan.expires_at), sql.Literal(int(target.connection_limit))
        )
    )
    if is_read_only(plan.scope):
        conn.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(role))
    else:
        conn.execute(sql.SQL("ALTER ROLE {} RESET default_transaction_read_only").format(role))


def set_password(conn: Conn, login: str, password: str) -> None:
    # The verifier is computed by libpq: the server (and its statement log) sees only it.
    verifier = conn.pgconn.encrypt_password(password.encode(), login.encode(), b"scram-sha-256")
    conn.execute(
        sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(
            ident(login), sql.Literal(verifier.decode())
        )
    )


def _by_object(grants: list[Grant]) -> dict[tuple[str, str | None], list[str]]:
    """The privileges of table grants per (schema, table); table None: `schema.*`."""
    by_object: dict[tuple[str, str | None], list[str]] = {}
    for grant in grants:
        if not grant.on_schema:
            by_object.setdefault((grant.schema, grant.table), []).append(grant.privilege)
    return by_object


def apply_grants(conn: Conn, group: str, grants: list[Grant]) -> None:
    """Make the group's privileges exactly the scope's: grant what is missing (USAGE on
    every schema a table grant needs included), revoke the rest, then prove each grant
    took effect: GRANT only warns when the admin lacks the grant option."""
    role = ident(group)
    schemas = sorted({g.schema for g in grants})
    for schema in schemas:
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(ident(schema), role))
    by_object = _by_object(grants)
    for (schema, table), privileges in by_object.items():
        privs = sql.SQL(", ").join(sql.SQL(p) for p in privileges)  # from a closed list
        if table is None:
            target: sql.Composable = sql.SQL("ALL TABLES IN SCHEMA {}").format(ident(schema))
        else:
            target = sql.SQL("TABLE {}").format(sql.Identifier(schema, table))
        conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(privs, target, role))
    wanted = _wanted(conn, by_object)
    held, held_schemas = held_privileges(conn, group)
    for schema, table, privilege in sorted(held - wanted):
        _revoke(
            conn,
            sql.SQL("REVOKE {} ON TABLE {} FROM {}").format(
                sql.SQL(privilege), sql.Identifier(schema, table), role
            ),
            f"{privilege} on {schema}.{table} from {group}",
        )
    for schema in sorted(held_schemas - set(schemas)):
        _revoke(
            conn,
            sql.SQL("REVOKE USAGE ON SCHEMA {} FROM {}").format(ident(schema), role),
            f"USAGE on schema {schema} from {group}",
        )
    missing = sorted(f"{p} on {s}.{t}" for s, t, p in wanted if (s, t, p) not in held) + sorted(
        f"USAGE on schema {s}"
        for s in schemas
        if not _has(conn, "SELECT has_schema_privilege(%s, %s, 'USAGE')", group, s)
    )
    if missing:
        raise fail(
            f"the admin role cannot grant {', '.join(missing[:10])} to {group}: it needs "
            "each privilege WITH GRANT OPTION (or ownership)",
            "GrantRefused",
        )


def _revoke(conn: Conn, statement: sql.Composed, what: str) -> None:
    """Revoke a privilege beyond the scope, where the admin may. One granted by a role the
    admin cannot speak for stays (sweeps keep reporting it as drift): refusing to renew
    the NHI over it would let the NHI expire for someone else's grant."""
    try:
        with conn.transaction():  # a savepoint: a refused revoke leaves the rest standing
            conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        log.warning("cannot revoke %s: granted by a role the admin cannot act for", what)


def held_privileges(conn: Conn, group: str) -> tuple[set[tuple[str, str, str]], set[str]]:
    """What the group holds now: (schema, table, privilege) and the schemas it may use."""
    tables = {
        (str(s), str(t), str(p))
        for s, t, p in conn.execute(
            "SELECT n.nspname, c.relname, a.privilege_type "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "CROSS JOIN LATERAL aclexplode(c.relacl) a "
            "WHERE a.grantee = (SELECT oid FROM pg_roles WHERE rolname = %s)",
            (group,),
        ).fetchall()
    }
    schemas = {
        str(s)
        for (s,) in conn.execute(
            "SELECT n.nspname FROM pg_namespace n "
            "CROSS JOIN LATERAL aclexplode(n.nspacl) a "
            "WHERE a.grantee = (SELECT oid FROM pg_roles WHERE rolname = %s) "
            "AND a.privilege_type = 'USAGE'",
            (group,),
        ).fetchall()
    }
    return tables, schemas


def schemas_of(conn: Conn, roles: list[str]) -> list[str]:
    """The schemas in which `roles` hold USAGE or a privilege on a relation, sorted."""
    found: set[str] = set()
    for role in roles:
        tables, schemas = held_privileges(conn, role)
        found |= schemas | {schema for schema, _, _ in tables}
    return sorted(found)


def drift(conn: Conn, group: str, scope: list[ScopeStatement]) -> str | None:
    """How the group's privileges differ from its granted scope, or None.

    Privileges beyond the scope are drift (someone granted by hand); so is a named grant
    gone missing. A table created in a `schema.*` schema since the last grant is not: the
    next renewal grants it, and less access is no risk.
    """
    try:
        grants = parse_grants(scope)
    except RuleViolation:
        return None  # nothing to compare an invalid scope with (and we never granted it)
    by_object = _by_object(grants)
    wanted = _wanted(conn, by_object)
    held, held_schemas = held_privileges(conn, group)
    named = {(s, t, p) for (s, t), ps in by_object.items() if t is not None for p in ps}
    extra = sorted(f"{p} on {s}.{t}" for s, t, p in held - wanted)
    extra += sorted(f"USAGE on schema {s}" for s in held_schemas - {g.schema for g in grants})
    missing = sorted(f"{p} on {s}.{t}" for s, t, p in named - held)
    parts = []
    if extra:
        parts.append(f"beyond the scope: {', '.join(extra[:10])}")
    if missing:
        parts.append(f"missing: {', '.join(missing[:10])}")
    return "; ".join(parts) or None


def _has(conn: Conn, query: str, *args: str) -> bool:
    row = conn.execute(query, list(args)).fetchone()
    return bool(row and row[0])


def _wanted(
    conn: Conn, by_object: Mapping[tuple[str, str | None], list[str]]
) -> set[tuple[str, str, str]]:
    """(schema, table, privilege) the scope means, with `schema.*` expanded to the tables
    the schema holds now."""
    wanted: set[tuple[str, str, str]] = set()
    for (schema, table), privileges in by_object.items():
        if table is not None:
            wanted |= {(schema, table, p) for p in privileges}
            continue
        rows = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = ANY(%s)",
            (schema, _TABLE_KINDS),
        ).fetchall()
        wanted |= {(schema, str(t), p) for (t,) in rows for p in privileges}
    return wanted


def drop_failed(
    conn: Conn,
    err: psycopg.Error,
    roles: list[str],
    logins: list[str],
    doing: str,
) -> ApplicationError:
    """A drop that failed (its transaction rolled back): the logins NOLOGIN again, then the
    classified error; for 2BP01, with the grants that block it and what the operator does."""
    found = hint = None
    try:
        for login in find_roles(conn, logins).values():
            if login.can_login:
                conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident(login.name)))
        if isinstance(err, psycopg.errors.DependentObjectsStillExist):
            found, hint = _blockers(conn, roles, err)
    except psycopg.Error as inner:
        log.warning("after a failed drop of %s: %s", roles, classify_postgres(inner, "re-locking"))
    return classify_postgres(err, doing, found=found, hint=hint)


def _blockers(
    conn: Conn, roles: list[str], err: psycopg.errors.DependentObjectsStillExist
) -> tuple[str | None, str | None]:
    """What keeps `roles` from being dropped, from the catalog: privileges granted to
    them by a role other than the admin (DROP OWNED, run by the admin, revokes only its
    own grants). Returns (what blocks, what the operator does)."""
    rows = conn.execute(_BLOCKERS_SQL, {"roles": roles}).fetchall()
    found: list[str] = []
    fixes: list[str] = []
    for kind, obj, column, privilege, grantor, grantee in rows[:10]:
        on = f"{kind} {obj}" + (f" column {column}" if column else "")
        found.append(f"privilege {privilege} on {on} granted by {grantor} to {grantee}")
        cols = f" ({column})" if column else ""
        target = "TABLE" if kind in ("table", "view") else str(kind).upper()
        fixes.append(
            f"run `REVOKE {privilege}{cols} ON {target} {obj} FROM {grantee}` as role "
            f"{grantor} (or have {grantor} run it)"
        )
    more = [f"and {len(rows) - 10} more"] if len(rows) > 10 else []
    # The server's own list, less the privileges named above: objects in other databases
    # of the cluster, memberships, default privileges.
    detail = err.diag.message_detail if err.diag else None
    lines = [line.strip() for line in (detail or "").splitlines() if line.strip()]
    others = [
        line
        for line in lines
        if not (line.startswith("privileges for ") and "membership" not in line and rows)
    ]
    if others:
        fixes.append(
            f"for {'; '.join(others)}: REASSIGN OWNED / DROP OWNED, or REVOKE, in the "
            "database it names, as the role that granted it"
        )
    if not found and not others:
        return None, None
    return "; ".join(found + more + others), (
        "Operator: " + "; ".join(fixes) + ". The removal retries by itself and the logins "
        "stay NOLOGIN meanwhile"
    )
