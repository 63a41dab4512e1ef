"""The Postgres provider: `postgres_role` NHIs in registered target databases.

Shape of one NHI on a target:

* a group role named `plan.identity_name` (NOLOGIN) that holds the granted privileges;
* two LOGIN roles `<group>_a` / `<group>_b` (see `nhi.pg_grants.role_names`), members of the
  group, used alternately by rotation so the old password keeps working during the overlap.
  Each carries `VALID UNTIL` = the NHI's expiry, so the database itself refuses logins after it
  even if this service is down, and a read-only scope makes its sessions read-only by default;
* a COMMENT on every role marking it ours (`nhi.pg_grants.managed_comment`): the "already
  exists" check and the sweeps read it, and it carries the creation time Postgres lacks.

The password is generated here, set as a SCRAM verifier computed client side (the clear text
never appears in SQL text or server logs) and written straight into Secrets Manager as an
RDS-style JSON secret; only references leave. Every identifier reaching SQL was first checked
by `nhi.pg_grants` and is then quoted with `psycopg.sql.Identifier`.

Admin role requirements on each target (PostgreSQL 15; the admin is NOT a superuser):

* `LOGIN CREATEROLE`: create, alter, comment on and drop the NHI roles; and grant itself
  membership in them (`GRANT <role> TO CURRENT_USER`), which `REASSIGN OWNED` and `DROP OWNED`
  require. On PostgreSQL 16+ CREATEROLE only reaches roles the admin holds ADMIN OPTION on,
  which it gets for the roles it creates itself.
* membership in `pg_signal_backend`: end the sessions of a disabled, retired or deleted role
  (`pg_terminate_backend`; superuser sessions can never be ended this way).
* for every schema and table a scope may name: `USAGE ON SCHEMA ... WITH GRANT OPTION` and the
  table privileges `WITH GRANT OPTION` (or ownership). A grant the admin cannot pass on is
  refused (`GrantRefused`), never silently reduced.
* `CONNECT` on the target database (PUBLIC has it unless revoked); the NHI's logins also need
  `CONNECT`, which they get from PUBLIC or from the database owner.

Removal acts in the target's database only: `DROP ROLE` fails with 2BP01 (retryably, naming
the blocker) if the role still owns objects or holds privileges in another database of the
cluster, or holds a privilege some role other than the admin granted it (`DROP OWNED`, run by
the admin, revokes only what the admin may). The logins stay NOLOGIN until the drop succeeds.
`schema.*` grants cover the tables that exist when they are applied (renewal re-applies them).

Methods are blocking and do not heartbeat: the activity wrapper does that around each call.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from botocore.exceptions import ClientError
from psycopg import sql
from psycopg.rows import TupleRow
from temporalio.exceptions import ApplicationError

from activities._support import classify_aws
from activities.providers.base import Discovery, Known, Pace
from activities.providers.secret_store import CURRENT, PENDING, PREVIOUS, SecretStore, SecretValue
from models.contracts import (
    IdentityCreated,
    KeyRef,
    ProvisionPlan,
    RemovalResult,
    RemoveIdentity,
    ScopeStatement,
    StagedKey,
)
from models.enums import NhiKind, Platform
from nhi.pg_grants import (
    IDENTIFIER_RE,
    Grant,
    has_our_shape,
    is_read_only,
    managed_comment,
    parse_comment,
    parse_grants,
    role_names,
    validate_grants,
)
from nhi.policy import PolicyRules, RuleViolation
from nhi.sweep import PlatformIdentity
from nhi.targets import TargetConnection, TargetResolver, UnknownTarget

if TYPE_CHECKING:
    from types_boto3_secretsmanager import SecretsManagerClient

log = logging.getLogger(__name__)

Conn = psycopg.Connection[TupleRow]

# Structural rules only: the policy itself was applied when the request was accepted; this
# re-check guarantees nothing unvalidated reaches SQL whatever path built the plan.
_STRUCTURE_ONLY = PolicyRules(
    label="provider", allowed=True, default_ttl_seconds=1, max_lifetime_seconds=1
)
# Relation kinds GRANT ... ON ALL TABLES IN SCHEMA covers.
_TABLE_KINDS = ["r", "p", "v", "m", "f"]
_TERMINATE_WAIT_MS = 5000
_ADMIN_OPTIONS = "-c statement_timeout=60000 -c lock_timeout=30000"


def _fail(message: str, kind: str, *, retryable: bool = False) -> ApplicationError:
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


def _until(at: datetime) -> sql.Composable:
    # VALID UNTIL takes a string constant, not a typed expression.
    aware = at if at.tzinfo else at.replace(tzinfo=UTC)
    return sql.Literal(aware.isoformat())


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


@dataclass(frozen=True)
class _Role:
    name: str
    can_login: bool
    comment: dict[str, str] | None


@dataclass(frozen=True)
class _Names:
    group: str
    logins: tuple[str, str]


class PostgresProvider:
    """Group role + two alternating login roles per NHI, credentials in Secrets Manager."""

    platform = Platform.POSTGRES

    def __init__(
        self,
        targets: TargetResolver,
        secrets: SecretsManagerClient,
        *,
        name_prefix: str = "nhi",
    ) -> None:
        self._targets = targets
        self._store = SecretStore(secrets)
        self._prefix = name_prefix

    # ---- plumbing --------------------------------------------------------------------------

    def _target(self, name: str | None) -> TargetConnection:
        if not name:
            raise _fail("a postgres_role plan must name its target", "InvalidPlan")
        try:
            return self._targets.get(name)
        except UnknownTarget as err:
            # The registry's messages name the target and the missing piece, never a password.
            raise _fail(str(err), "UnknownTarget") from None

    @contextmanager
    def _admin(self, target: TargetConnection, doing: str) -> Iterator[Conn]:
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

    @staticmethod
    def _login_as(target: TargetConnection, value: Mapping[str, Any]) -> str | None:
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

    @staticmethod
    def _names(group: str) -> _Names:
        try:
            return _Names(group, role_names(group))
        except ValueError as err:
            raise _fail(f"identity name: {err}", "InvalidPlan") from None

    def _checked(self, plan: ProvisionPlan) -> tuple[_Names, list[Grant]]:
        """The plan's role names and grants, refused before any connection if not plain."""
        names = self._names(plan.identity_name)
        try:
            validate_grants(plan.scope, _STRUCTURE_ONLY)
            grants = parse_grants(plan.scope)
        except RuleViolation as err:
            raise _fail(f"scope refused: {err}", "InvalidScope") from None
        return names, grants

    @staticmethod
    def _roles(conn: Conn, names: list[str]) -> dict[str, _Role]:
        rows = conn.execute(
            "SELECT rolname, rolcanlogin, shobj_description(oid, 'pg_authid') "
            "FROM pg_roles WHERE rolname = ANY(%s)",
            (names,),
        ).fetchall()
        return {str(n): _Role(str(n), bool(login), parse_comment(c)) for n, login, c in rows}

    @staticmethod
    def _check_ours(role: _Role, plan: ProvisionPlan) -> None:
        if role.comment is None or role.comment.get("nhi-id") != str(plan.nhi_id):
            raise _fail(
                f"role {role.name} already exists and is not NHI {plan.nhi_id}'s",
                "IdentityConflict",
            )

    @staticmethod
    def _lock(conn: Conn, keys: list[str]) -> None:
        # Sorted, so two calls needing the same locks cannot deadlock each other.
        for key in sorted(set(keys)):
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"nhi-lifecycle:{key}",))

    def _ensure_member(self, conn: Conn, roles: list[str]) -> None:
        """Give the admin the privileges of `roles`: REASSIGN/DROP OWNED require them. (On
        PostgreSQL 16+ the creator of a role is a member with ADMIN OPTION but, by default,
        without its privileges, so membership alone is not enough.)"""
        for role in roles:
            row = conn.execute("SELECT pg_has_role(current_user, %s, 'USAGE')", (role,)).fetchone()
            if not (row and row[0]):
                conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(_ident(role)))

    @staticmethod
    def _terminate(conn: Conn, roles: list[str]) -> int:
        """End every session of `roles`, waiting (bounded) for each backend to exit."""
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity "
            "WHERE usename = ANY(%s) AND pid <> pg_backend_pid()",
            (_TERMINATE_WAIT_MS, roles),
        ).fetchall()
        return sum(1 for (ok,) in rows if ok)

    def _lock_out(
        self, conn: Conn, plan: ProvisionPlan, roles: Mapping[str, _Role]
    ) -> tuple[list[str], int]:
        """NOLOGIN on each of `roles` (ours, checked) that can still log in, then end their
        sessions: VALID UNTIL and NOLOGIN stop new logins only. Returns (disabled, ended)."""
        disabled: list[str] = []
        for role in roles.values():
            self._check_ours(role, plan)
            if role.can_login:
                conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(_ident(role.name)))
                disabled.append(role.name)
        return disabled, self._terminate(conn, list(roles))

    @staticmethod
    def _sessions(conn: Conn, roles: list[str]) -> int:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = ANY(%s)", (roles,)
        ).fetchone()
        return int(row[0]) if row else 0

    def _external_id(self, target: TargetConnection, group: str) -> str:
        return f"{target.public_dsn()}#{group}"

    def _secret_value(self, target: TargetConnection, login: str, password: str) -> SecretValue:
        return SecretValue(
            engine="postgres",
            host=target.host,
            port=target.port,
            dbname=target.dbname,
            username=login,
            password=password,
        )

    def _stages(self, plan: ProvisionPlan) -> dict[str, SecretValue]:
        try:
            return self._store.stage_values(plan.secret_name)
        except ClientError as err:
            raise classify_aws(err, f"reading secret {plan.secret_name}") from err

    # ---- role DDL --------------------------------------------------------------------------

    def _ensure_group(self, conn: Conn, plan: ProvisionPlan, names: _Names) -> None:
        found = self._roles(conn, [names.group]).get(names.group)
        if found is not None:
            self._check_ours(found, plan)
            return
        self._create_role(conn, plan, names.group, "group", sql.SQL("NOLOGIN"))
        log.info("group role %s created for nhi %s", names.group, plan.nhi_id)

    @staticmethod
    def _create_role(
        conn: Conn,
        plan: ProvisionPlan,
        name: str,
        part: Literal["group", "login"],
        attributes: sql.Composable,
    ) -> None:
        """CREATE ROLE with the comment that marks it ours (the "already exists" check and
        the sweeps read it; it also holds the creation time Postgres does not keep)."""
        conn.execute(sql.SQL("CREATE ROLE {} {}").format(_ident(name), attributes))
        comment = managed_comment(
            nhi_id=plan.nhi_id, agent_id=plan.agent_id, part=part, created_at=datetime.now(UTC)
        )
        conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(_ident(name), sql.Literal(comment)))

    def _require_group(self, conn: Conn, plan: ProvisionPlan, names: _Names) -> None:
        found = self._roles(conn, [names.group]).get(names.group)
        if found is None:
            raise _fail(f"group role {names.group} does not exist", "IdentityMissing")
        self._check_ours(found, plan)

    def _ensure_login(
        self, conn: Conn, plan: ProvisionPlan, names: _Names, login: str, target: TargetConnection
    ) -> None:
        """Create the login role (NOLOGIN until it gets a password) or check it is ours, then
        bring its expiry, connection limit, membership and read-only default in line."""
        found = self._roles(conn, [login]).get(login)
        role = _ident(login)
        if found is None:
            attributes = sql.SQL("NOLOGIN INHERIT IN ROLE {}").format(_ident(names.group))
            self._create_role(conn, plan, login, "login", attributes)
        else:
            self._check_ours(found, plan)
            row = conn.execute(
                "SELECT pg_has_role(%s, %s, 'MEMBER')", (login, names.group)
            ).fetchone()
            if not (row and row[0]):
                conn.execute(sql.SQL("GRANT {} TO {}").format(_ident(names.group), role))
        self._configure_login(conn, plan, login, target)

    @staticmethod
    def _configure_login(
        conn: Conn, plan: ProvisionPlan, login: str, target: TargetConnection
    ) -> None:
        role = _ident(login)
        conn.execute(
            sql.SQL("ALTER ROLE {} VALID UNTIL {} CONNECTION LIMIT {}").format(
                role, _until(plan.expires_at), sql.Literal(int(target.connection_limit))
            )
        )
        if is_read_only(plan.scope):
            conn.execute(
                sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(role)
            )
        else:
            conn.execute(sql.SQL("ALTER ROLE {} RESET default_transaction_read_only").format(role))

    def _set_password(self, conn: Conn, login: str, password: str) -> None:
        # The verifier is computed by libpq: the server (and its statement log) sees only it.
        verifier = conn.pgconn.encrypt_password(password.encode(), login.encode(), b"scram-sha-256")
        conn.execute(
            sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(
                _ident(login), sql.Literal(verifier.decode())
            )
        )

    def _apply_grants(self, conn: Conn, group: str, grants: list[Grant]) -> None:
        """Make the group's privileges exactly the scope's: grant what is missing (USAGE on
        every schema a table grant needs included), revoke the rest, then prove each grant
        took effect: GRANT only warns when the admin lacks the grant option."""
        role = _ident(group)
        schemas = sorted({g.schema for g in grants})
        for schema in schemas:
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(_ident(schema), role))
        by_object: dict[tuple[str, str | None], list[str]] = {}
        for grant in grants:
            if not grant.on_schema:
                by_object.setdefault((grant.schema, grant.table), []).append(grant.privilege)
        for (schema, table), privileges in by_object.items():
            privs = sql.SQL(", ").join(sql.SQL(p) for p in privileges)  # from a closed list
            if table is None:
                target: sql.Composable = sql.SQL("ALL TABLES IN SCHEMA {}").format(_ident(schema))
            else:
                target = sql.SQL("TABLE {}").format(sql.Identifier(schema, table))
            conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(privs, target, role))
        wanted = self._wanted(conn, by_object)
        held, held_schemas = self._held(conn, group)
        for schema, table, privilege in sorted(held - wanted):
            self._revoke(
                conn,
                sql.SQL("REVOKE {} ON TABLE {} FROM {}").format(
                    sql.SQL(privilege), sql.Identifier(schema, table), role
                ),
                f"{privilege} on {schema}.{table} from {group}",
            )
        for schema in sorted(held_schemas - set(schemas)):
            self._revoke(
                conn,
                sql.SQL("REVOKE USAGE ON SCHEMA {} FROM {}").format(_ident(schema), role),
                f"USAGE on schema {schema} from {group}",
            )
        missing = sorted(f"{p} on {s}.{t}" for s, t, p in wanted if (s, t, p) not in held) + sorted(
            f"USAGE on schema {s}"
            for s in schemas
            if not self._has(conn, "SELECT has_schema_privilege(%s, %s, 'USAGE')", group, s)
        )
        if missing:
            raise _fail(
                f"the admin role cannot grant {', '.join(missing[:10])} to {group}: it needs "
                "each privilege WITH GRANT OPTION (or ownership)",
                "GrantRefused",
            )

    @staticmethod
    def _revoke(conn: Conn, statement: sql.Composed, what: str) -> None:
        """Revoke a privilege beyond the scope, where the admin may. One granted by a role the
        admin cannot speak for stays (sweeps keep reporting it as drift): refusing to renew
        the NHI over it would let the NHI expire for someone else's grant."""
        try:
            with conn.transaction():  # a savepoint: a refused revoke leaves the rest standing
                conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            log.warning("cannot revoke %s: granted by a role the admin cannot act for", what)

    @staticmethod
    def _held(conn: Conn, group: str) -> tuple[set[tuple[str, str, str]], set[str]]:
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

    def _drift(self, conn: Conn, group: str, scope: list[ScopeStatement]) -> str | None:
        """How the group's privileges differ from its granted scope, or None.

        Privileges beyond the scope are drift (someone granted by hand); so is a named grant
        gone missing. A table created in a `schema.*` schema since the last grant is not: the
        next renewal grants it, and less access is no risk.
        """
        try:
            grants = parse_grants(scope)
        except RuleViolation:
            return None  # nothing to compare an invalid scope with (and we never granted it)
        by_object: dict[tuple[str, str | None], list[str]] = {}
        for grant in grants:
            if not grant.on_schema:
                by_object.setdefault((grant.schema, grant.table), []).append(grant.privilege)
        wanted = self._wanted(conn, by_object)
        held, held_schemas = self._held(conn, group)
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

    @staticmethod
    def _has(conn: Conn, query: str, *args: str) -> bool:
        row = conn.execute(query, list(args)).fetchone()
        return bool(row and row[0])

    @staticmethod
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

    # ---- provisioning ----------------------------------------------------------------------

    def create(self, plan: ProvisionPlan) -> IdentityCreated:
        """The group role with its grants and the two login roles (no password yet)."""
        names, grants = self._checked(plan)
        target = self._target(plan.target)
        with self._admin(target, f"creating {names.group}") as conn, conn.transaction():
            self._lock(conn, [f"role:{names.group}"] + [f"schema:{g.schema}" for g in grants])
            self._ensure_group(conn, plan, names)
            for login in names.logins:
                self._ensure_login(conn, plan, names, login, target)
            self._apply_grants(conn, names.group, grants)
        return IdentityCreated(
            external_id=self._external_id(target, names.group), credential_ref=""
        )

    def deliver(self, plan: ProvisionPlan) -> IdentityCreated:
        """Give the first login role a password and deliver it into Secrets Manager.

        A retry finds the secret holding a working login and reuses it; otherwise (a crash
        between the password and the secret, say) a new password replaces one nobody holds.
        """
        names, _ = self._checked(plan)
        target = self._target(plan.target)
        external_id = self._external_id(target, names.group)
        current = self._stages(plan).get(CURRENT)
        if (
            current is not None
            and current.get("username") in names.logins
            and self._login_as(target, current) == current["username"]
        ):
            arn = self._arn(plan)
            log.info("nhi %s: delivered login %s reused", plan.nhi_id, current["username"])
            return IdentityCreated(external_id=external_id, credential_ref=arn)
        # A crash between the password and the secret: the login the secret names, re-keyed.
        login = str(current.get("username")) if current else ""
        if login not in names.logins:
            login = names.logins[0]
        password = secrets.token_urlsafe(32)
        with self._admin(target, f"setting the password of {login}") as conn, conn.transaction():
            self._lock(conn, [f"role:{names.group}"])
            self._require_group(conn, plan, names)
            self._ensure_login(conn, plan, names, login, target)
            self._set_password(conn, login, password)
        value = self._secret_value(target, login, password)
        del password
        try:
            arn = self._store.put_current(
                plan.secret_name,
                value,
                tags=plan.tags,
                description=f"Postgres login of NHI {plan.nhi_id} on target {target.name}",
            )
        except ClientError as err:
            raise classify_aws(err, f"storing the credential of {names.group}") from err
        if self._login_as(target, value) != login:
            raise _fail(
                f"the delivered login {login} does not log in yet", "NotYetValid", retryable=True
            )
        del value
        log.info("nhi %s: login %s delivered to %s", plan.nhi_id, login, arn)
        return IdentityCreated(external_id=external_id, credential_ref=arn)

    def _arn(self, plan: ProvisionPlan) -> str:
        try:
            arn = self._store.arn(plan.secret_name)
        except ClientError as err:
            raise classify_aws(err, f"describing secret {plan.secret_name}") from err
        if arn is None:
            raise _fail(f"secret {plan.secret_name} vanished", "SecretMissing", retryable=True)
        return arn

    def renew(self, plan: ProvisionPlan) -> None:
        """Move both login roles' VALID UNTIL to the new expiry and re-apply the grants."""
        names, grants = self._checked(plan)
        target = self._target(plan.target)
        with self._admin(target, f"renewing {names.group}") as conn, conn.transaction():
            self._lock(conn, [f"role:{names.group}"] + [f"schema:{g.schema}" for g in grants])
            self._require_group(conn, plan, names)
            existing = self._roles(conn, list(names.logins))
            for login in names.logins:
                if login in existing:
                    self._check_ours(existing[login], plan)
                    self._configure_login(conn, plan, login, target)
            self._apply_grants(conn, names.group, grants)

    # ---- rotation --------------------------------------------------------------------------

    def stage_rotation(self, plan: ProvisionPlan) -> StagedKey:
        """Re-key the login role not in AWSCURRENT and store it as AWSPENDING.

        That role may be the previous one still in its overlap: it is retired early (its
        sessions ended), so an NHI never has more than the current and the new credential.
        A pending credential that already works is reused.
        """
        names, _ = self._checked(plan)
        target = self._target(plan.target)
        stages = self._stages(plan)
        current = stages.get(CURRENT)
        if current is None:
            raise _fail(f"secret {plan.secret_name} holds no current credential", "NothingToRotate")
        old = str(current.get("username"))
        if old not in names.logins:
            raise _fail(f"the current credential is for {old}, not {names.group}", "WrongIdentity")
        new = names.logins[1] if old == names.logins[0] else names.logins[0]
        pending = stages.get(PENDING)
        if (
            pending is not None
            and pending.get("username") == new
            and self._login_as(target, pending) == new
        ):
            return StagedKey(new_key_id=new, old_key_id=old)
        password = secrets.token_urlsafe(32)
        with self._admin(target, f"staging a new password for {new}") as conn:
            with conn.transaction():
                self._lock(conn, [f"role:{names.group}"])
                self._require_group(conn, plan, names)
                self._ensure_login(conn, plan, names, new, target)
                self._set_password(conn, new, password)
            ended = self._terminate(conn, [new])
        if ended:
            log.info("nhi %s: %d sessions of %s ended before re-keying", plan.nhi_id, ended, new)
        value = self._secret_value(target, new, password)
        del password
        try:
            self._store.put_pending(plan.secret_name, value)
        except ClientError as err:
            raise classify_aws(err, f"storing the pending credential of {new}") from err
        del value
        return StagedKey(new_key_id=new, old_key_id=old)

    def verify_pending(self, plan: ProvisionPlan) -> None:
        """Log in with the pending credential; it must be this NHI's other login role."""
        names, _ = self._checked(plan)
        target = self._target(plan.target)
        pending = self._stages(plan).get(PENDING)
        if pending is None:
            raise _fail(f"secret {plan.secret_name} holds no pending credential", "NothingPending")
        expected = str(pending.get("username"))
        if expected not in names.logins:
            raise _fail(f"the pending credential is for {expected}", "WrongIdentity")
        user = self._login_as(target, pending)
        del pending
        if user is None:
            raise _fail(
                f"the pending credential of {expected} does not log in",
                "NotYetValid",
                retryable=True,
            )
        if user != expected:
            raise _fail(
                f"the pending credential logs in as {user}, not {expected}", "WrongIdentity"
            )

    def promote(self, plan: ProvisionPlan) -> StagedKey:
        """AWSPENDING becomes AWSCURRENT (the old one AWSPREVIOUS); repeat-safe."""
        names, _ = self._checked(plan)
        stages = self._stages(plan)
        current, pending = stages.get(CURRENT), stages.get(PENDING)

        def user(value: SecretValue | None) -> str | None:
            return str(value["username"]) if value and "username" in value else None

        if pending is None:
            if current is None:
                raise _fail(f"secret {plan.secret_name} holds nothing to promote", "NothingPending")
            return StagedKey(new_key_id=str(user(current)), old_key_id=user(stages.get(PREVIOUS)))
        new = user(pending)
        if new not in names.logins:
            raise _fail(f"the pending credential is for {new}", "WrongIdentity")
        # Interrupted between the two label moves: AWSCURRENT already points at the new one.
        old = user(stages.get(PREVIOUS)) if user(current) == new else user(current)
        try:
            self._store.promote_pending(plan.secret_name)
        except ClientError as err:
            raise classify_aws(err, f"promoting the pending credential of {new}") from err
        return StagedKey(new_key_id=str(new), old_key_id=old)

    def retire(self, key: KeyRef, *, delete: bool) -> None:
        """The old login role after the overlap: NOLOGIN and its sessions ended; with
        `delete`, its objects go to the group and the role is dropped. Gone counts as done."""
        names = self._names(key.user_name)
        if key.key_id not in names.logins:
            raise _fail(f"{key.key_id} is not a login role of {names.group}", "InvalidPlan")
        target = self._target(key.target)
        login = key.key_id
        with self._admin(target, f"retiring {login}") as conn:
            found = self._roles(conn, [login]).get(login)
            if found is None:
                return
            if found.comment is None or found.comment.get("part") != "login":
                raise _fail(
                    f"role {login} is not a login role this service made", "IdentityConflict"
                )
            if found.can_login:
                conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(_ident(login)))
            ended = self._terminate(conn, [login])
            log.info("login %s retired (%d sessions ended)", login, ended)
            if not delete:
                return
            try:
                with conn.transaction():
                    self._lock(conn, [f"role:{names.group}"])
                    has_group = names.group in self._roles(conn, [names.group])
                    heir = names.group if has_group else None
                    self._ensure_member(conn, [login] + ([heir] if heir else []))
                    heir_sql = _ident(heir) if heir else sql.SQL("CURRENT_USER")
                    conn.execute(
                        sql.SQL("REASSIGN OWNED BY {} TO {}").format(_ident(login), heir_sql)
                    )
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(_ident(login)))
                    conn.execute(sql.SQL("DROP ROLE {}").format(_ident(login)))
            except psycopg.Error as err:
                raise self._drop_failed(conn, err, [login], [login], f"dropping {login}") from None
            log.info("login %s dropped", login)

    def _drop_failed(
        self,
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
            for login in self._roles(conn, logins).values():
                if login.can_login:
                    conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(_ident(login.name)))
            if isinstance(err, psycopg.errors.DependentObjectsStillExist):
                found, hint = self._blockers(conn, roles, err)
        except psycopg.Error as inner:
            log.warning(
                "after a failed drop of %s: %s", roles, classify_postgres(inner, "re-locking")
            )
        return classify_postgres(err, doing, found=found, hint=hint)

    @staticmethod
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

    # ---- containment -----------------------------------------------------------------------

    def disable(self, plan: ProvisionPlan) -> list[str]:
        """NOLOGIN on both login roles and every session of them ended (restorable)."""
        names = self._names(plan.identity_name)
        target = self._target(plan.target)
        done: list[str] = []
        with self._admin(target, f"disabling {names.group}") as conn:
            existing = self._roles(conn, [names.group, *names.logins])
            if not existing:
                return ["already gone"]
            logins = {n: r for n, r in existing.items() if n in names.logins}
            disabled, ended = self._lock_out(conn, plan, logins)
            done += [f"login role {login} NOLOGIN" for login in disabled]
            if ended:
                done.append(f"{ended} sessions ended")
        return done

    def verify_disabled(self, plan: ProvisionPlan) -> None:
        """No login role can log in and none has a session left, from the catalog itself."""
        names = self._names(plan.identity_name)
        target = self._target(plan.target)
        with self._admin(target, f"checking that {names.group} is disabled") as conn:
            can_login = sorted(
                r.name for r in self._roles(conn, list(names.logins)).values() if r.can_login
            )
            sessions = self._sessions(conn, list(names.logins))
        if can_login or sessions:
            raise _fail(
                f"{names.group} not contained: can log in {can_login}, {sessions} sessions",
                "NotQuarantined",
                retryable=True,
            )

    def enable(self, plan: ProvisionPlan) -> None:
        """LOGIN again on the login role the delivered (AWSCURRENT) credential names."""
        names = self._names(plan.identity_name)
        target = self._target(plan.target)
        current = self._stages(plan).get(CURRENT)
        login = str(current.get("username")) if current else ""
        if login not in names.logins:
            raise _fail(f"no delivered credential of {names.group} to restore", "NothingToEnable")
        with self._admin(target, f"enabling {login}") as conn:
            role = self._roles(conn, [login]).get(login)
            if role is None:
                raise _fail(f"login role {login} does not exist", "IdentityMissing")
            self._check_ours(role, plan)
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(_ident(login)))

    # ---- removal ---------------------------------------------------------------------------

    def delete(self, request: RemoveIdentity) -> RemovalResult:
        """End sessions, hand owned objects to the admin, drop the roles, prove from pg_roles
        that none is left and that the delivered credential no longer logs in, then delete
        the secret. Gone counts as removed.

        NOLOGIN holds until the drop: it is committed (and sessions ended) before the drop's
        transaction, asserted again inside it, and again after a drop that failed, so a removal
        that stops half way leaves every login at least as locked as quarantine.
        """
        plan = request.plan
        names = self._names(plan.identity_name)
        target = self._target(plan.target)
        try:
            schemas = sorted({g.schema for g in parse_grants(plan.scope)})
        except RuleViolation:
            schemas = []  # nothing of an invalid scope was ever granted by us
        removed: list[str] = []
        everyone = [*names.logins, names.group]
        doing = f"removing {names.group}"
        with self._admin(target, doing) as conn:
            existing = self._roles(conn, everyone)
            _, ended = self._lock_out(conn, plan, existing)
            if ended:
                removed.append(f"{ended} sessions")
            present = [n for n in everyone if n in existing]
            if present:
                logins = [n for n in present if n in names.logins]
                try:
                    with conn.transaction():
                        self._lock(conn, [f"role:{names.group}"] + [f"schema:{s}" for s in schemas])
                        for login in logins:  # a LOGIN set since the lock-out is undone here
                            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(_ident(login)))
                        self._ensure_member(conn, present)
                        roles = sql.SQL(", ").join(_ident(n) for n in present)
                        conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(roles))
                        conn.execute(sql.SQL("DROP OWNED BY {}").format(roles))
                        for name in present:  # logins first: they are members of the group
                            conn.execute(sql.SQL("DROP ROLE {}").format(_ident(name)))
                except psycopg.Error as err:
                    raise self._drop_failed(
                        conn, err, present, logins, f"dropping the roles of {names.group}"
                    ) from None
                removed += [f"{'group' if n == names.group else 'login'} role {n}" for n in present]
            left = sorted(self._roles(conn, everyone))
        if left:
            raise _fail(
                f"roles {', '.join(left)} of {names.group} still exist after DROP ROLE; retrying",
                "NotRemoved",
                retryable=True,
            )
        try:
            # A secret already scheduled for deletion was proven dead by the run that did it
            # (and cannot be read any more).
            scheduled = self._store.scheduled_for_deletion(plan.secret_name)
        except ClientError as err:
            raise classify_aws(err, f"describing secret {plan.secret_name}") from err
        delivered = {} if scheduled else self._stages(plan)
        for stage, value in delivered.items():
            if self._login_as(target, value) is not None:
                raise _fail(
                    f"the {stage} credential of {names.group} still logs in after removal",
                    "NotRemoved",
                    retryable=True,
                )
        try:
            if self._store.delete(plan.secret_name, force=request.force_delete_secret):
                removed.append(f"secret {plan.secret_name}")
        except ClientError as err:
            raise classify_aws(err, f"deleting secret {plan.secret_name}") from err
        log.info("nhi %s removed from %s: %s", plan.nhi_id, target.name, removed)
        return RemovalResult(removed=removed)

    # ---- sweeps ----------------------------------------------------------------------------

    def discover(self, known: Mapping[str, Known], pace: Pace) -> Discovery:
        """Group roles marked ours on every target, plus roles named like ours with no marker
        (reported, never touched). A login role whose group is gone is reported as its group,
        so removing the orphan removes it. A target that cannot be reached (or whose admin
        password cannot be resolved) is reported, and the others are still listed."""
        out: list[PlatformIdentity] = []
        unreachable: dict[str, str] = {}
        pattern = self._prefix.replace("_", r"\_") + r"\_%"
        for target_name in self._targets.names():
            pace()
            try:
                target = self._target(target_name)
                pace()
                with self._admin(target, "listing roles") as conn:
                    rows = conn.execute(
                        "SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles "
                        "WHERE rolname LIKE %s ORDER BY rolname",
                        (pattern,),
                    ).fetchall()
                    pace()
                    active = {
                        str(u)
                        for (u,) in conn.execute(
                            "SELECT DISTINCT usename FROM pg_stat_activity WHERE usename LIKE %s",
                            (pattern,),
                        ).fetchall()
                    }
                    drifts: dict[str, str] = {}
                    for name, _comment in rows:
                        seen = known.get(str(name))
                        if seen is not None and seen.status == "active":
                            pace()
                            drift = self._drift(conn, str(name), list(seen.scope))
                            if drift:
                                drifts[str(name)] = drift
            except ApplicationError as err:  # what _target and _admin raise, classified
                unreachable[target_name] = err.message
                continue
            out += self._identities(target_name, rows, active, known, pace, drifts)
        return Discovery(identities=out, unreachable=unreachable)

    def _identities(
        self,
        target: str,
        rows: list[tuple[Any, ...]],
        active: set[str],
        known: Mapping[str, Known],
        pace: Pace,
        drifts: Mapping[str, str],
    ) -> list[PlatformIdentity]:
        now = datetime.now(UTC)
        groups: dict[str, dict[str, str]] = {}
        unmanaged: list[str] = []
        for name, comment in rows:
            fields = parse_comment(comment)
            if fields is None:
                if has_our_shape(self._prefix, str(name)):
                    unmanaged.append(str(name))
            elif fields.get("part") == "login":
                group = str(name)[:-2]
                if group not in groups and IDENTIFIER_RE.fullmatch(group):
                    groups.setdefault(group, fields)
            else:
                groups[str(name)] = fields
        out: list[PlatformIdentity] = []
        for group, fields in sorted(groups.items()):
            try:
                created = datetime.fromisoformat(fields.get("created-at", ""))
            except ValueError:
                created = datetime.fromtimestamp(0, UTC)  # unknown age: old enough to act on
            secret_arn = None
            if group not in known:
                pace()
                try:
                    secret_arn = self._store.find_by_tag("nhi:nhi-id", fields["nhi-id"])
                except ClientError as err:
                    raise classify_aws(err, f"finding the secret of {group}") from err
            logins = set(role_names(group)) if len(group) <= 61 else set()
            out.append(
                PlatformIdentity(
                    name=group,
                    kind=NhiKind.POSTGRES_ROLE.value,
                    created_at=created,
                    managed=True,
                    nhi_id=fields["nhi-id"],
                    secret_arn=secret_arn,
                    last_used_at=now if logins & active else None,
                    target=target,
                    drift=drifts.get(group),
                )
            )
        for name in unmanaged:
            if name[:-2] in groups and name[-2:] in ("_a", "_b"):
                continue  # a login role whose comment was lost: its group stands for it
            out.append(
                PlatformIdentity(
                    name=name,
                    kind=NhiKind.POSTGRES_ROLE.value,
                    created_at=now,
                    managed=False,
                    target=target,
                )
            )
        return out

    def last_used(self, kind: NhiKind, name: str, target: str | None) -> datetime | None:
        """Postgres records no last login: now if a login role of the group has a session."""
        del kind  # one kind on this platform
        names = self._names(name)
        conn_target = self._target(target)
        with self._admin(conn_target, f"reading the sessions of {name}") as conn:
            sessions = self._sessions(conn, list(names.logins))
        return datetime.now(UTC) if sessions else None
