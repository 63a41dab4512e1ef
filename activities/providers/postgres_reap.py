"""Dropping task credentials' login roles on one Postgres target, a batch at a time.

The reaper (activities/reaper.py) hands over the roles of credentials that expired or whose NHI
was quarantined or removed, with the credential each belongs to. On one admin connection:

1. the roles that exist are read with their markers; one not marked as that credential's task
   role (made by hand, or another credential's) is never touched, only reported;
2. their sessions are ended (VALID UNTIL and NOLOGIN stop new logins only);
3. one transaction drops them all (`REASSIGN OWNED` / `DROP OWNED` first for the few that own
   or were granted something in this database). One role that cannot go (it owns an object in
   another database, a lock outlasts the lock timeout) spoils that transaction: the batch is
   then dropped role by role, so the others still go and the blocked one is named with what
   blocks it, kept NOLOGIN;
4. sessions that raced in before the drop are ended by the dropped roles' oids;
5. a fresh read of pg_roles proves which are gone.

The lock timeout is short: a blocked role is reported and tried again next run, instead of
holding up the batch (and the inventory rows the reaper holds locked meanwhile).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from temporalio.exceptions import ApplicationError

from activities.providers import postgres_ddl as ddl
from nhi.rules.pg_grants import parse_comment
from nhi.services.target_registry import TargetConnection

log = logging.getLogger(__name__)

REAP_LOCK_TIMEOUT_MS = 5000
REAP_TERMINATE_WAIT_MS = 5000


@dataclass(frozen=True)
class Reaped:
    """What one batch on one target came to: roles gone (dropped now or already absent) and
    roles still there, each with why."""

    gone: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def reason(err: ApplicationError) -> str:
    """A classified error as the inventory's `last_error` holds it: "Type: message"."""
    return f"{err.type}: {err.message}" if err.type else err.message


def reap_task_roles(target: TargetConnection, wanted: Mapping[str, uuid.UUID]) -> Reaped:
    """Drop the login roles `wanted` names (role -> its task credential's id) and prove them
    gone. A connection that fails raises, classified; a role that cannot be dropped does not."""
    failed: dict[str, str] = {}
    with ddl.admin(target, f"reaping {len(wanted)} task roles") as conn:
        conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(REAP_LOCK_TIMEOUT_MS)))
        found = _found(conn, list(wanted))
        for name, (_, role) in found.items():
            refusal = _not_ours(role, wanted[name])
            if refusal:
                failed[name] = refusal
        doomed = {name: oid for name, (oid, _) in found.items() if name not in failed}
        if doomed:
            ddl.terminate(conn, list(doomed))
            failed |= _drop(conn, list(doomed))
            _terminate_oids(conn, list(doomed.values()))
        left = ddl.find_roles(conn, list(doomed))
    for name in left:
        failed.setdefault(name, f"NotRemoved: role {name} still exists after DROP ROLE")
    return Reaped(gone=[n for n in wanted if n not in failed], failed=failed)


def _found(conn: ddl.Conn, names: list[str]) -> dict[str, tuple[int, ddl.Role]]:
    rows = conn.execute(
        "SELECT oid, rolname, rolcanlogin, shobj_description(oid, 'pg_authid') "
        "FROM pg_roles WHERE rolname = ANY(%s)",
        (names,),
    ).fetchall()
    return {
        str(name): (int(oid), ddl.Role(str(name), bool(login), parse_comment(comment)))
        for oid, name, login, comment in rows
    }


def _not_ours(role: ddl.Role, credential_id: uuid.UUID) -> str | None:
    """Why the role must not be dropped as that credential's, or None."""
    marker = role.comment or {}
    if marker.get("part") != "task":
        return (
            f"IdentityConflict: role {role.name} is not marked as a task credential's role "
            "(made by hand?); left alone"
        )
    if marker.get("task-credential-id") != str(credential_id):
        return (
            f"IdentityConflict: role {role.name} is marked as task credential "
            f"{marker.get('task-credential-id')}'s, not {credential_id}'s; left alone"
        )
    return None


def _drop(conn: ddl.Conn, names: list[str]) -> dict[str, str]:
    """Drop the roles in one transaction; if that fails, one by one. Returns the failures."""
    owners = _with_dependencies(conn, names)
    try:
        with conn.transaction():
            _drop_all(conn, names, owners)
        return {}
    except psycopg.Error as err:
        if len(names) == 1:
            return {names[0]: _failure(conn, err, names[0])}
        log.info("a task role of %d blocks the batch drop: dropping one by one", len(names))
    failed: dict[str, str] = {}
    for name in names:
        try:
            with conn.transaction():
                _drop_all(conn, [name], owners & {name})
        except psycopg.Error as err:
            failed[name] = _failure(conn, err, name)
    return failed


def _drop_all(conn: ddl.Conn, names: list[str], owners: set[str]) -> None:
    if owners:
        # What a task session created or was granted in this database goes to the admin
        # first (REASSIGN/DROP OWNED need the role's privileges, hence the membership).
        ddl.ensure_member(conn, sorted(owners))
        roles = sql.SQL(", ").join(ddl.ident(n) for n in sorted(owners))
        conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(roles))
        conn.execute(sql.SQL("DROP OWNED BY {}").format(roles))
    conn.execute(
        sql.SQL("DROP ROLE IF EXISTS {}").format(sql.SQL(", ").join(ddl.ident(n) for n in names))
    )


def _with_dependencies(conn: ddl.Conn, names: list[str]) -> set[str]:
    """The roles that own or were granted something in this database (or a shared object):
    only those need REASSIGN/DROP OWNED, which is slow. Objects in other databases cannot be
    reached from here; their DROP ROLE fails and says where they are."""
    rows = conn.execute(
        "SELECT DISTINCT r.rolname FROM pg_shdepend d JOIN pg_roles r ON r.oid = d.refobjid "
        "WHERE d.refclassid = 'pg_authid'::regclass AND r.rolname = ANY(%s) "
        "AND d.dbid IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))",
        (names,),
    ).fetchall()
    return {str(name) for (name,) in rows}


def _failure(conn: ddl.Conn, err: psycopg.Error, name: str) -> str:
    # drop_failed puts NOLOGIN back (the failed transaction rolled nothing forward, but an
    # expired role may never have been NOLOGIN) and names what blocks the drop.
    return reason(ddl.drop_failed(conn, err, [name], [name], f"dropping task role {name}"))


def _terminate_oids(conn: ddl.Conn, oids: list[int]) -> None:
    """End sessions of roles just dropped (their `usename` reads NULL now, their oid stays):
    a login that raced in between the first termination and the drop."""
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity "
        "WHERE usesysid = ANY(%s) AND pid <> pg_backend_pid()",
        (REAP_TERMINATE_WAIT_MS, oids),
    ).fetchall()
    if rows:
        log.info("%d sessions of dropped task roles ended", len(rows))
