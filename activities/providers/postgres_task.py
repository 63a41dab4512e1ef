"""Task credentials on Postgres: one LOGIN role per task, gone on its own at expiry.

The role (`nhi.rules.task_credentials.task_role_name`) is created in one admin transaction,
with everything it needs or nothing at all:

* `LOGIN`, `VALID UNTIL` = the credential's expiry exactly (the database itself refuses the
  login after it, whether or not the reaper has run), the target's connection limit;
* `PASSWORD` = a SCRAM-SHA-256 verifier computed here (`scram_verifier`): the clear text never
  reaches the server, its statement log or anything this service keeps;
* the NHI's whole scope: membership in its group role (`IN ROLE <group>`). A narrowed scope:
  no membership (a member could `SET ROLE` to the group and get the whole scope back), the
  narrowed grants given to the role directly instead (a subset of the group's, checked by the
  service; the admin can hand them on since it granted them to the group);
* a read-only default when the scope only reads, as for the NHI's own logins;
* the COMMENT marker with `part=task` and the credential's id, so sweeps and the reaper tie
  the role to its row and its parent NHI.

The reaper (worker) drops expired roles; this module only issues (API process).

Speed (issue 15: at least OpenBao's rate). The issuer keeps, per target, a few admin
connections open (`AdminPool`: no SCRAM handshake per issue), the target's resolved
connection settings (`postgres_ddl.ResolvedTargets`: no `targets` read or secret fetch per
issue), and a few passwords with their SCRAM verifiers computed ahead (`PasswordStock`). The role is
made in two phases (`prepare`, then `PreparedRole.commit`), so the service writes the
credential's row while the target works and the role commits only after its row: `prepare`
is ONE round trip, one batch (BEGIN, the advisory lock, a guard that fails the batch unless
the group carries the parent's marker and one of the parent's own logins can still log in,
CREATE ROLE, COMMENT, the read-only default) that leaves its transaction open; `commit` is a
bare COMMIT. A narrowed scope takes one more round trip (its grants) before the commit. A
pooled connection found dead on the batch (its backend was gone before the batch arrived) is
replaced and the batch sent again on a fresh one.

Most of what an issue costs is the target's, and most of that is its PASSWORD clause: Postgres
refuses an empty password even given as a verifier, so CREATE (or ALTER) ROLE ... PASSWORD
runs the verifier's PBKDF2 (4096 iterations) once more on the server, about 8 ms of its CPU,
where the rest of the batch takes well under 1 ms. So each target also has a `RoleStock`:
a background thread keeps a few roles made ahead, NOLOGIN, in no group, with their password
set and a task role's marker of no NHI (`STOCK_NHI_ID`). An issue takes one and, in its same
one round trip, renames it to the credential's name and gives it LOGIN, VALID UNTIL, the
connection limit, the group and its own marker (a SCRAM verifier does not depend on the role's
name, so renaming keeps it). The target's work is the same; it is done before the request.
A stock role lives at most `ROLE_STOCK_MAX_AGE_S` (then it is dropped, and the stock is only
refilled while issues come); a taken one whose issue did not commit is dropped; closing the
issuer drops the rest; a leftover of a process that died is a task role of no live NHI to
sweeps, removed as one. The stock is `NHI_TASK_ROLE_STOCK` roles per target (0: none, every
issue makes its role with its password).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from typing import ClassVar

import psycopg
from psycopg import pq, sql
from psycopg.rows import TupleRow
from temporalio.exceptions import ApplicationError

from activities.providers import postgres_ddl as ddl
from models.enums import Platform
from nhi import MANAGED_BY
from nhi.rules.pg_grants import (
    Grant,
    is_read_only,
    managed_comment,
    parse_comment,
    parse_grants,
    role_names,
)
from nhi.rules.policy import RuleViolation
from nhi.rules.task_credentials import (
    QUARANTINED_ON_PLATFORM,
    STOCK_NHI_ID,
    IssuedCredential,
    TaskGrant,
    new_password,
    scram_verifier,
    task_role_name,
)
from nhi.services.target_registry import TargetConnection, TargetResolver

# Admin connections kept open per target (at most this many issue at once on one target;
# more callers wait for one). Each is one backend on the target, counted against its
# max_connections, and an idle one is closed after POOL_IDLE_S.
POOL_SIZE = 8
POOL_IDLE_S = 60.0
POOL_WAIT_S = 30.0
# Password/verifier pairs kept ready (PasswordStock) and how long one may wait to be used.
PASSWORD_STOCK = 4
PASSWORD_MAX_AGE_S = 60.0
# Task roles made ahead per target (`RoleStock`), and how long one may wait to be used.
ROLE_STOCK = 4
ROLE_STOCK_MAX_AGE_S = 60.0
# After a failed refill, the stock waits this long before it tries again.
STOCK_RETRY_S = 5.0
Cursor = psycopg.Cursor[TupleRow]
log = logging.getLogger(__name__)
# As postgres_ddl.admin: no statement or lock wait holds an issuing request forever. And a
# prepared role's transaction (open while the service writes its row) that the service stalls
# on is ended by the target itself: nothing is committed, and the group's shared lock no
# longer keeps the parent's containment waiting (its COMMIT then fails, the row is ended).
IDLE_IN_TRANSACTION_MS = 10_000
_ADMIN_OPTIONS = (
    "-c statement_timeout=60000 -c lock_timeout=30000 "
    f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"
)


def _connect(target: TargetConnection) -> ddl.Conn:
    return psycopg.connect(
        host=target.host,
        port=target.port,
        dbname=target.dbname,
        user=target.admin_user,
        password=target.password,
        sslmode=target.sslmode,
        connect_timeout=10,
        application_name="nhi-lifecycle-tasks",
        options=_ADMIN_OPTIONS,
        autocommit=True,
    )


class AdminPool:
    """At most `size` autocommit admin connections to one target, reused between issues.

    A connection goes back only when it is idle and healthy (no transaction open, not
    closed); anything else is closed, so a failed issue never hands a broken or half-done
    session to the next. Connections are opened in the caller's thread, so a refused login
    is the caller's classified error, not a pool timeout.
    """

    def __init__(
        self, target: TargetConnection, size: int = POOL_SIZE, stock: RoleStock | None = None
    ) -> None:
        self.target = target
        self.stock = stock  # the target's roles made ahead (closed with the pool)
        self._idle: deque[tuple[float, ddl.Conn]] = deque()
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self.opened = 0  # connections opened so far (tests and the benchmark read it)

    def _take_idle(self) -> ddl.Conn | None:
        now = time.monotonic()
        with self._lock:
            while self._idle:
                since, conn = self._idle.pop()  # the most recently used: least likely stale
                if now - since < POOL_IDLE_S and not conn.closed:
                    return conn
                conn.close()
        return None

    def fresh(self) -> ddl.Conn:
        """A new connection (also what replaces one found dead)."""
        conn = _connect(self.target)
        self.opened += 1
        return conn

    def checkout(self) -> tuple[ddl.Conn, bool]:
        """(connection, reused?) for one issue; hand it back with `checkin` (or `discard`)."""
        if not self._slots.acquire(timeout=POOL_WAIT_S):
            raise ddl.fail(
                f"no admin connection to target {self.target.name!r} came free in "
                f"{POOL_WAIT_S:.0f} s",
                "PoolExhausted",
                retryable=True,
            )
        try:
            conn = self._take_idle()
            return (conn, True) if conn is not None else (self.fresh(), False)
        except BaseException:
            self._slots.release()
            raise

    def checkin(self, conn: ddl.Conn) -> None:
        """Back to the pool if idle and sound (no transaction open), else closed."""
        try:
            if conn.closed or conn.pgconn.transaction_status != pq.TransactionStatus.IDLE:
                conn.close()
                return
            with self._lock:
                self._idle.append((time.monotonic(), conn))
        finally:
            self._slots.release()

    def stock_give_back(self, name: str) -> None:
        """A stock role taken for an issue that did not commit: the stock drops it."""
        if self.stock is not None:
            self.stock.give_back(name)

    def discard(self, conn: ddl.Conn) -> None:
        """Close a connection a failure left in an unknown state (the server rolls back)."""
        try:
            conn.close()
        finally:
            self._slots.release()

    def close(self, wait_s: float = 10.0) -> None:
        """Close the idle connections and the stock (waiting up to `wait_s` for its roles to
        be dropped)."""
        if self.stock is not None:
            self.stock.close(wait_s)
        with self._lock:
            while self._idle:
                self._idle.pop()[1].close()


class PasswordStock:
    """Fresh passwords with their SCRAM verifiers, computed ahead on a background thread.

    The verifier (PBKDF2, SCRAM_ITERATIONS = 4096 as Postgres's and OpenBao's default, never
    fewer) is the costliest step an issue computes (about 1 ms of CPU). One thread keeps up to
    `size` pairs ready, so an issue takes one instead of computing it while its caller waits
    (hashlib releases the GIL: the refill runs beside the issue's round trips). A pair is used
    once, at most `max_age_s` after it was made (older ones are thrown away), and lives only
    in this process's memory; with the stock empty (a burst), the issue computes its own."""

    def __init__(self, size: int = PASSWORD_STOCK, max_age_s: float = PASSWORD_MAX_AGE_S) -> None:
        self._size = size
        self._max_age_s = max_age_s
        self._ready: deque[tuple[float, str, str]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def take(self) -> tuple[str, str]:
        """(password, verifier), never handed out twice."""
        now = time.monotonic()
        found: tuple[float, str, str] | None = None
        with self._cond:
            while self._ready:
                made = self._ready.popleft()
                if now - made[0] < self._max_age_s:
                    found = made
                    break
            if self._size > 0 and not self._closed:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._fill, name="nhi-task-scram", daemon=True
                    )
                    self._thread.start()
                self._cond.notify()
        if found is not None:
            return found[1], found[2]
        password = new_password()
        return password, scram_verifier(password)

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._ready) >= self._size:
                    self._cond.wait()
                if self._closed:
                    return
            password = new_password()
            verifier = scram_verifier(password)  # outside the lock: takers never wait on it
            with self._cond:
                self._ready.append((time.monotonic(), password, verifier))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()


class RoleStock:
    """Task roles made ahead on one target (see the module doc), by one background thread on
    its own admin connection. Thread-safe; each role is handed out once, at most
    `max_age_s` after it was made, and its password lives only in this process's memory.

    The thread starts with the first `take` and refills only while takes come (one in the
    last `max_age_s`): an idle issuer ends with no stock at all on the target."""

    def __init__(
        self,
        target: TargetConnection,
        secrets: PasswordStock,
        size: int = ROLE_STOCK,
        max_age_s: float = ROLE_STOCK_MAX_AGE_S,
    ) -> None:
        self.target = target
        self._secrets = secrets
        self._size = size
        self._max_age_s = max_age_s
        self._ready: deque[tuple[float, str, str]] = deque()  # (made, name, password)
        self._spent: list[str] = []  # made by this stock and not handed out: to drop
        self._wanted_until = 0.0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.made = 0  # roles made so far (tests and the benchmark read it)

    def take(self) -> tuple[str, str] | None:
        """(name, password) of a stock role, or None when none is ready."""
        if self._size <= 0:
            return None
        now = time.monotonic()
        found: tuple[str, str] | None = None
        with self._cond:
            if self._closed:
                return None
            while self._ready:
                made, name, password = self._ready.popleft()
                if now - made < self._max_age_s:
                    found = (name, password)
                    break
                self._spent.append(name)
            self._wanted_until = now + self._max_age_s
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._fill, name="nhi-task-role-stock", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return found

    def give_back(self, name: str) -> None:
        """A taken role that did not become a credential (its issue rolled back, or its
        outcome is unknown): dropped, if it still exists under its stock name."""
        with self._cond:
            self._spent.append(name)
            self._cond.notify()

    def _next(self) -> tuple[list[str], bool] | None:
        """Wait for work: (names to drop, make one?); None once closed."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._ready and now - self._ready[0][0] >= self._max_age_s:
                    self._spent.append(self._ready.popleft()[1])
                make = now < self._wanted_until and len(self._ready) < self._size
                if self._spent or make:
                    spent, self._spent = self._spent, []
                    return spent, make
                ends = [self._ready[0][0] + self._max_age_s] if self._ready else []
                if now < self._wanted_until:
                    ends.append(self._wanted_until)
                self._cond.wait(max(0.0, min(ends) - now) if ends else None)
            return None

    def _fill(self) -> None:
        conn: ddl.Conn | None = None
        try:
            while (work := self._next()) is not None:
                spent, make = work
                try:
                    if conn is None or conn.closed:
                        conn = _connect(self.target)
                    _drop_stock(conn, spent)
                    if make:
                        made = self._make(conn)
                        with self._cond:
                            self._ready.append(made)
                    else:
                        # No issue for a while: no admin connection is held open for nothing.
                        conn.close()
                        conn = None
                except Exception as err:
                    # Never the password: only what failed. Tried again after a pause.
                    log.warning(
                        "task role stock on target %r: %s", self.target.name, type(err).__name__
                    )
                    if conn is not None:
                        conn.close()
                        conn = None
                    with self._cond:
                        self._spent.extend(spent)
                        if not self._closed:
                            self._cond.wait(STOCK_RETRY_S)
            with self._cond:
                left = self._spent + [name for _, name, _ in self._ready]
                self._spent, self._ready = [], deque()
            if left:
                if conn is None or conn.closed:
                    conn = _connect(self.target)
                _drop_stock(conn, left)
        except Exception as err:
            log.warning(
                "task role stock on target %r not dropped: %s (sweeps remove it)",
                self.target.name,
                type(err).__name__,
            )
        finally:
            if conn is not None:
                conn.close()

    def _make(self, conn: ddl.Conn) -> tuple[float, str, str]:
        password, verifier = self._secrets.take()
        stock_id = uuid.uuid4()
        name = task_role_name(stock_id)
        comment = managed_comment(
            nhi_id=STOCK_NHI_ID,
            agent_id=STOCK_NHI_ID,
            part="task",
            created_at=datetime.now(UTC),
            task_credential_id=stock_id,
        )
        # One implicit transaction (autocommit, one simple query): both or neither.
        statement = sql.SQL(
            "CREATE ROLE {} NOLOGIN NOINHERIT PASSWORD {}; COMMENT ON ROLE {} IS {}"
        )
        conn.execute(
            statement.format(
                ddl.ident(name), sql.Literal(verifier), ddl.ident(name), sql.Literal(comment)
            )
        )
        self.made += 1
        return time.monotonic(), name, password

    def close(self, wait_s: float = 10.0) -> None:
        """Stop refilling and drop every stock role not handed out (waits up to `wait_s`)."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(wait_s)


def _drop_stock(conn: ddl.Conn, names: list[str]) -> None:
    """Drop those of `names` that still exist as stock roles (a taken one that became a
    credential has another name by now, and is never touched here)."""
    if not names:
        return
    rows = conn.execute(
        "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s) "
        "AND shobj_description(oid, 'pg_authid') LIKE %s",
        (names, f"%;nhi-id={STOCK_NHI_ID};%"),
    ).fetchall()
    if rows:
        conn.execute(
            sql.SQL("DROP ROLE IF EXISTS {}").format(
                sql.SQL(", ").join(ddl.ident(str(r[0])) for r in rows)
            )
        )


def _pool_key(target: TargetConnection) -> tuple[str, int, str, str, str, str]:
    # A changed password (or address) gets a new pool; the digest keeps the password itself
    # out of the key.
    digest = hashlib.sha256(target.password.encode()).hexdigest()
    return (target.host, target.port, target.dbname, target.admin_user, target.sslmode, digest)


class PostgresTaskProvider:
    """`TaskCredentialProvider` for `postgres_role` NHIs."""

    platform: ClassVar[Platform] = Platform.POSTGRES

    def __init__(
        self,
        targets: TargetResolver,
        *,
        target_cache_s: float = ddl.TARGET_CACHE_S,
        role_stock: int = ROLE_STOCK,
    ) -> None:
        self._targets = ddl.ResolvedTargets(targets, target_cache_s)
        self._role_stock = role_stock
        self._pools: dict[str, tuple[tuple[str, int, str, str, str, str], AdminPool]] = {}
        self._lock = threading.Lock()
        self._secrets = PasswordStock()

    def pool(self, target: TargetConnection) -> AdminPool:
        """The target's admin pool (a new one, the old closed, when its settings changed)."""
        key = _pool_key(target)
        with self._lock:
            found = self._pools.get(target.name)
            if found is not None and found[0] == key:
                return found[1]
            stock = RoleStock(target, self._secrets, self._role_stock) if self._role_stock else None
            pool = AdminPool(target, stock=stock)
            self._pools[target.name] = (key, pool)
        if found is not None:
            found[1].close(wait_s=0)  # its stock is dropped in the background: no request waits
        return pool

    def pools(self) -> dict[str, AdminPool]:
        """The current admin pool of each target used so far."""
        with self._lock:
            return {name: pool for name, (_, pool) in self._pools.items()}

    def close(self) -> None:
        """Close every pooled admin connection, drop the stock roles and the passwords kept
        ready."""
        with self._lock:
            pools = [pool for _, pool in self._pools.values()]
            self._pools.clear()
        for pool in pools:
            pool.close()
        self._secrets.close()

    def issue(self, grant: TaskGrant) -> IssuedCredential:
        """One LOGIN role for the task (see the module doc); its password, once."""
        return self.prepare(grant).commit()

    def prepare(self, grant: TaskGrant) -> PreparedRole:
        """The role for the task, created in a transaction left open (one round trip, under
        the group's lock): nothing exists for anyone else until `commit`, and `rollback` (or
        a lost connection) leaves nothing at all. The service writes the credential's row
        meanwhile, and commits only once that row is committed. A stock role is used when one
        is ready; a batch that fails on one is sent again making the role here (the stock
        role may have been dropped by hand, or by a sweep), whose outcome is the answer."""
        target = self._targets.get(grant.target)
        try:
            narrowed = parse_grants(list(grant.scope)) if grant.scope is not None else None
        except RuleViolation as err:
            raise ddl.fail(f"scope refused: {err}", "InvalidScope") from None
        pool = self.pool(target)
        stocked = pool.stock.take() if pool.stock is not None else None
        if stocked is not None:
            try:
                return self._prepare(grant, target, pool, narrowed, stocked)
            except _StockFailed:
                pass
        return self._prepare(grant, target, pool, narrowed, None)

    def _prepare(
        self,
        grant: TaskGrant,
        target: TargetConnection,
        pool: AdminPool,
        narrowed: list[Grant] | None,
        stocked: tuple[str, str] | None,
    ) -> PreparedRole:
        login, group = grant.name, grant.identity_name
        options = sql.SQL("LOGIN INHERIT VALID UNTIL {} CONNECTION LIMIT {}").format(
            ddl.until(grant.expires_at), sql.Literal(int(target.connection_limit))
        )
        creating: list[sql.Composable]
        if stocked is not None:
            stock_name, password = stocked
            creating = [
                sql.SQL("ALTER ROLE {} RENAME TO {}").format(
                    ddl.ident(stock_name), ddl.ident(login)
                ),
                sql.SQL("ALTER ROLE {} {}").format(ddl.ident(login), options),
            ]
            if narrowed is None:
                creating.append(
                    sql.SQL("GRANT {} TO {}").format(ddl.ident(group), ddl.ident(login))
                )
        else:
            password, verifier = self._secrets.take()
            attributes = sql.SQL("{} PASSWORD {}").format(options, sql.Literal(verifier))
            if narrowed is None:
                attributes = sql.SQL("{} IN ROLE {}").format(attributes, ddl.ident(group))
            creating = [sql.SQL("CREATE ROLE {} {}").format(ddl.ident(login), attributes)]
        comment = managed_comment(
            nhi_id=grant.nhi_id,
            agent_id=grant.agent_id,
            part="task",
            created_at=grant.issued_at,
            task_credential_id=grant.credential_id,
        )
        scope = grant.scope if grant.scope is not None else grant.granted_scope
        # Containment of the parent (provider `disable`) holds the same lock while it finds and
        # locks out the task roles by their marker and its own logins: this role is committed
        # before it looks (and is locked out), or is refused after it, since the guard finds
        # the parent's logins locked out (IdentityQuarantined).
        # The group's lock is taken SHARED: issues of one parent exclude its containment,
        # rotation and removal (which take it exclusively), not each other, so they never queue
        # behind one another while each holds its transaction open until the commit. Schema
        # locks (a narrowed scope's grants) stay exclusive, as for every grant change.
        role_lock = f"role:{group}"
        locks = [role_lock] + [f"schema:{g.schema}" for g in narrowed or []]
        statements: list[sql.Composable] = [sql.SQL("BEGIN")]
        statements += [
            sql.SQL("SELECT {}(hashtext({}))").format(
                sql.SQL(
                    "pg_advisory_xact_lock_shared" if key == role_lock else "pg_advisory_xact_lock"
                ),
                sql.Literal(f"nhi-lifecycle:{key}"),  # as postgres_ddl.lock
            )
            for key in sorted(set(locks))  # in postgres_ddl.lock's order: no deadlock
        ]
        # The whole scope (the common case): the group is checked on the server, under the
        # lock: ONE round trip. A narrowed scope reads the group instead and gives its grants
        # in a second round trip.
        one_trip = narrowed is None
        statements.append(_guard(group, grant) if one_trip else _read_group(group))
        statements += creating
        statements.append(
            sql.SQL("COMMENT ON ROLE {} IS {}").format(ddl.ident(login), sql.Literal(comment))
        )
        if is_read_only(list(scope)):
            statements.append(
                sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(
                    ddl.ident(login)
                )
            )
        batch = sql.SQL("; ").join(statements)
        doing = f"issuing task credential {login} on target {target.name!r}"
        try:
            conn, reused = pool.checkout()
        except BaseException as err:
            if stocked is not None:
                pool.stock_give_back(stocked[0])
            if isinstance(err, psycopg.Error):
                raise ddl.classify_postgres(err, doing) from None
            raise
        try:
            try:
                cursor = _execute(conn, batch, group, one_trip, grant.nhi_id)
            except psycopg.OperationalError:
                # A reused connection found dead (killed backend, restarted server): its
                # backend was gone before the batch arrived, so nothing ran; send it again on
                # a fresh one, once. (Nothing commits before `commit`, so never two roles.)
                if not (reused and conn.closed):
                    raise
                conn.close()
                conn = pool.fresh()
                cursor = _execute(conn, batch, group, one_trip, grant.nhi_id)
            if not one_trip:
                _check_group(cursor, group, grant)
                if narrowed is not None:
                    ddl.apply_grants(conn, login, narrowed)
        except BaseException as err:
            pool.discard(conn)
            if stocked is not None:
                pool.stock_give_back(stocked[0])
                if isinstance(err, psycopg.Error | ApplicationError):
                    raise _StockFailed from None
            if isinstance(err, psycopg.Error):
                raise ddl.classify_postgres(err, doing) from None
            raise
        issued = IssuedCredential(
            expires_at=grant.expires_at,
            secret={"password": password},
            public={
                "username": login,
                "host": target.host,
                "port": target.port,
                "dbname": target.dbname,
                "sslmode": target.sslmode,
                "dsn": target.public_dsn(login),
                "member_of": None if narrowed is not None else group,
            },
        )
        given_back = stocked[0] if stocked is not None else None
        return PreparedRole(pool, conn, issued, doing, given_back)


class _StockFailed(Exception):
    """The batch failed on a stock role: sent again, making the role in the batch."""


class PreparedRole:
    """A task role created in an open transaction on a pooled admin connection: `commit`
    makes it exist (and returns the credential), `rollback` leaves nothing. Exactly one of
    them, once; the connection goes back to its pool either way."""

    def __init__(
        self,
        pool: AdminPool,
        conn: ddl.Conn,
        issued: IssuedCredential,
        doing: str,
        stock_name: str | None = None,
    ):
        self._pool = pool
        self._conn: ddl.Conn | None = conn
        self._issued = issued
        self._doing = doing
        self._stock_name = stock_name  # the stock role this one was renamed from, if any

    def _end(self, statement: str) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError(f"{self._doing}: already committed or rolled back")
        try:
            conn.execute(statement)
        except BaseException as err:
            # Unknown outcome of a COMMIT whose answer was lost: as for any lost connection,
            # the error is the caller's (its row is ended; the reaper and sweeps know the
            # marker); a ROLLBACK that fails leaves nothing committed.
            self._pool.discard(conn)
            self._give_back()
            if isinstance(err, psycopg.Error):
                raise ddl.classify_postgres(err, self._doing) from None
            raise
        self._pool.checkin(conn)
        if statement != "COMMIT":
            self._give_back()

    def _give_back(self) -> None:
        # Back under its stock name (rolled back), or renamed (committed after all): the
        # stock drops it only in the first case.
        if self._stock_name is not None:
            self._pool.stock_give_back(self._stock_name)

    def commit(self) -> IssuedCredential:
        self._end("COMMIT")
        return self._issued

    def rollback(self) -> None:
        self._end("ROLLBACK")


# What `_guard` makes the server fail with (a cast of this text to integer), then the kind.
_GUARD = "nhi-lifecycle task-credential guard:"
# The error type of a parent quarantined on the platform (the service answers 409).
QUARANTINED = QUARANTINED_ON_PLATFORM


def _logins_live(group: str) -> sql.Composable:
    """Whether one of the group's own login roles can still log in. An active NHI always has
    one (rotation locks out the old login only after the new one exists); quarantine (provider
    `disable`, under the group's lock) has locked out both. A task role is never made beside a
    quarantined parent, whatever the inventory says yet: the lifecycle records `quarantined`
    only after the platform's lock-out, and that gap is closed here, on the platform."""
    return sql.SQL(
        "(SELECT count(*) > 0 FROM pg_roles WHERE rolname IN ({}) AND rolcanlogin)"
    ).format(sql.SQL(", ").join(sql.Literal(n) for n in role_names(group)))


def _read_group(group: str) -> sql.Composable:
    return sql.SQL(
        "SELECT rolname, shobj_description(oid, 'pg_authid'), {} AS live "
        "FROM pg_roles WHERE rolname = {}"
    ).format(_logins_live(group), sql.Literal(group))


def _guard(group: str, grant: TaskGrant) -> sql.Composable:
    """A statement that fails the batch (so its transaction never commits) unless the group
    role exists, carries the parent NHI's marker and one of its logins can log in (the parent
    is not quarantined on the platform): the check `_check_group` makes in Python, on the
    server. The marker is matched by the prefix `managed_comment` writes
    (`managed-by=...;nhi-id=<id>;`), so a group not made by this service is refused."""
    prefix = f"managed-by={MANAGED_BY};nhi-id={grant.nhi_id};"
    return sql.SQL(
        "SELECT CASE WHEN g.ok AND g.live THEN 'ours' ELSE ({} || CASE WHEN g.ok "
        "THEN 'IdentityQuarantined' ELSE g.why END)::int::text END FROM ("
        "SELECT coalesce(bool_or(starts_with(coalesce(shobj_description(oid, 'pg_authid'), "
        "''), {})), false) AS ok, CASE WHEN count(*) = 0 THEN 'IdentityMissing' "
        "ELSE 'IdentityConflict' END AS why, {} AS live FROM pg_roles WHERE rolname = {}) AS g"
    ).format(
        sql.Literal(f"{_GUARD} "), sql.Literal(prefix), _logins_live(group), sql.Literal(group)
    )


def _quarantined(group: str) -> ApplicationError:
    return ddl.fail(
        f"no login of {group} can log in (its NHI is quarantined there, or its logins were "
        "removed by hand): no task credential",
        QUARANTINED,
    )


def _execute(
    conn: ddl.Conn, batch: sql.Composed, group: str, member: bool, nhi_id: object = None
) -> Cursor:
    """Send the creating batch: one round trip (its transaction left open unless it ends with
    COMMIT)."""
    try:
        return conn.execute(batch)
    except psycopg.errors.InvalidTextRepresentation as err:
        if _GUARD not in str(err):
            raise
        if "IdentityMissing" in str(err):
            raise ddl.fail(f"group role {group} does not exist", "IdentityMissing") from None
        if QUARANTINED in str(err):
            raise _quarantined(group) from None
        raise ddl.fail(
            f"role {group} already exists and is not NHI {nhi_id}'s", "IdentityConflict"
        ) from None
    except psycopg.errors.UndefinedObject:
        if not member:
            raise
        # The only object the batch names that may not exist: `IN ROLE <group>`.
        raise ddl.fail(f"group role {group} does not exist", "IdentityMissing") from None


def _check_group(cursor: Cursor, group: str, grant: TaskGrant) -> None:
    """The group (read in the batch, under the lock) must exist, be the parent's and have a
    login that can log in (the parent is not quarantined on the platform)."""
    found: tuple[str, str | None, bool] | None = None
    while True:
        if cursor.description and cursor.description[0].name == "rolname":
            row = cursor.fetchone()
            if row is not None:
                found = (str(row[0]), None if row[1] is None else str(row[1]), bool(row[2]))
        if not cursor.nextset():
            break
    if found is None:
        raise ddl.fail(f"group role {group} does not exist", "IdentityMissing")
    ddl.check_ours(ddl.Role(found[0], False, parse_comment(found[1])), grant.nhi_id)
    if not found[2]:
        raise _quarantined(group)
