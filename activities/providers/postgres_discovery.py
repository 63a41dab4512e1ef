"""What sweeps ask of the Postgres provider: every role marked ours on every registered
target, how it differs from its grant, and whether it is in use.

Postgres keeps no last-login time and no creation time: a session of a login role counts as
use now, and the creation time is read from the marker comment (`nhi.rules.pg_grants`).
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, ClassVar

from botocore.exceptions import ClientError
from temporalio.exceptions import ApplicationError

from activities._support import classify_aws
from activities.providers import postgres_ddl as ddl
from activities.providers.base import NHI_ID_TAG, Discovery, Known, Pace
from activities.providers.secret_store import SecretStore
from models.contracts import ScopeStatement
from models.enums import NhiKind
from nhi.rules.findings import PlatformIdentity
from nhi.rules.pg_grants import (
    IDENTIFIER_RE,
    has_our_shape,
    parse_comment,
    parse_grants,
    role_names,
)
from nhi.rules.policy import RuleViolation
from nhi.rules.task_credentials import is_task_role_name
from nhi.services.target_registry import TargetResolver

# One catalog query per target: each role named like ours with its marker comment, the roles
# it is a member of, whether it has a session, and the privileges it holds (relations and
# schema USAGE), so drift needs no query per role.
CATALOG_SQL = (
    "SELECT r.rolname, shobj_description(r.oid, 'pg_authid'), "
    "ARRAY(SELECT g.rolname::text FROM pg_auth_members m "
    "JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid), "
    "EXISTS (SELECT 1 FROM pg_stat_activity s WHERE s.usename = r.rolname), "
    "ARRAY(SELECT n.nspname || chr(31) || c.relname || chr(31) || a.privilege_type "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "CROSS JOIN LATERAL aclexplode(c.relacl) a WHERE a.grantee = r.oid), "
    "ARRAY(SELECT n.nspname::text FROM pg_namespace n "
    "CROSS JOIN LATERAL aclexplode(n.nspacl) a "
    "WHERE a.grantee = r.oid AND a.privilege_type = 'USAGE') "
    "FROM pg_roles r WHERE r.rolname LIKE ANY(%s) ORDER BY r.rolname"
)
Held = tuple[set[tuple[str, str, str]], set[str]]
# Targets listed at once by a sweep (one admin connection each).
LISTING_CONCURRENCY = 8


def _held(tables: list[str] | None, schemas: list[str] | None) -> Held:
    """(schema, table, privilege) and the USAGE schemas, from the catalog query's arrays
    (parts joined by the unit separator, which no identifier of ours holds)."""
    out: set[tuple[str, str, str]] = set()
    for item in tables or []:
        schema, table, privilege = str(item).split("\x1f")
        out.add((schema, table, privilege))
    return out, {str(s) for s in schemas or []}


def _drift(conn: ddl.Conn, held: Held, scope: list[ScopeStatement]) -> str | None:
    """`postgres_ddl.drift`, with what the group holds already read by the catalog query."""
    try:
        grants = parse_grants(scope)
    except RuleViolation:
        return None  # nothing to compare an invalid scope with (and we never granted it)
    by_object = ddl._by_object(grants)
    wanted = ddl._wanted(conn, by_object)
    tables, schemas = held
    named = {(s, t, p) for (s, t), ps in by_object.items() if t is not None for p in ps}
    extra = sorted(f"{p} on {s}.{t}" for s, t, p in tables - wanted)
    extra += sorted(f"USAGE on schema {s}" for s in schemas - {g.schema for g in grants})
    missing = sorted(f"{p} on {s}.{t}" for s, t, p in named - tables)
    parts = []
    if extra:
        parts.append(f"beyond the scope: {', '.join(extra[:10])}")
    if missing:
        parts.append(f"missing: {', '.join(missing[:10])}")
    return "; ".join(parts) or None


def _created_at(fields: Mapping[str, str]) -> datetime:
    try:
        return datetime.fromisoformat(fields.get("created-at", ""))
    except ValueError:
        return datetime.fromtimestamp(0, UTC)  # unknown age: old enough to act on


def _task_role(
    name: str, fields: Mapping[str, str], target: str, last_used_at: datetime | None
) -> PlatformIdentity:
    """A task credential's login role whose NHI's group is gone from the target: judged by
    its parent NHI (`nhi_id`). It has no delivery secret: the credential was only ever in
    its issuing response."""
    return PlatformIdentity(
        name=name,
        kind=NhiKind.POSTGRES_ROLE.value,
        created_at=_created_at(fields),
        managed=True,
        nhi_id=fields.get("nhi-id"),
        last_used_at=last_used_at,
        target=target,
        task=True,
    )


class PostgresDiscovery:
    """Listing, drift and usage across the registered targets (the sweep half of
    PostgresProvider)."""

    name_separator: ClassVar[str] = (
        "_"  # role names: `<prefix>_<agent>_<id>` (nhi.rules.pg_grants.group_name)
    )

    _targets: TargetResolver
    _store: SecretStore
    _prefix: str

    def discover(self, known: Mapping[str, Known], pace: Pace) -> Discovery:
        """Group roles marked ours on every target, plus roles named like ours with no marker
        (reported, never touched). A login role whose group is gone is reported as its group,
        so removing the orphan removes it. A task credential's login role is part of its
        NHI's group while that group exists (its sessions count as the NHI's use), and is
        reported on its own, as a task role, once the group is gone: the sweep's rules then
        judge it by its parent NHI. A target that cannot be reached (or whose admin password
        cannot be resolved) is reported, and the others are still listed.

        Targets are listed LISTING_CONCURRENCY at a time: an unreachable one holds its
        listing for up to the connect timeout, and one after the other those waits added up
        (ten dead targets, minutes per sweep)."""
        out: list[PlatformIdentity] = []
        unreachable: dict[str, str] = {}
        names = self._targets.names()
        workers = max(1, min(LISTING_CONCURRENCY, len(names)))
        with ThreadPoolExecutor(workers, thread_name_prefix="nhi-pg-listing") as pool:
            # Each in a copy of this context: `pace` may heartbeat the sweep's activity.
            listings = [
                pool.submit(contextvars.copy_context().run, self._listing, name, known, pace)
                for name in names
            ]
            for target_name, listing in zip(names, listings, strict=True):
                found = listing.result()
                if isinstance(found, str):
                    unreachable[target_name] = found
                    continue
                rows, active, drifts = found
                out += self._identities(target_name, rows, active, known, pace, drifts)
        return Discovery(identities=out, unreachable=unreachable)

    def _listing(
        self, target_name: str, known: Mapping[str, Known], pace: Pace
    ) -> tuple[list[tuple[Any, ...]], set[str], dict[str, str]] | str:
        """One target's catalog: its rows, the roles with a session and the drift of the
        active ones; or why it could not be listed."""
        pattern = self._prefix.replace("_", r"\_") + r"\_%"
        patterns = [pattern, ddl.TASK_ROLE_PATTERN]
        pace()
        try:
            target = ddl.resolve(self._targets, target_name)
            pace()
            with ddl.admin(target, "listing roles") as conn:
                # With the roles each is a member of: a task role in another deployment's
                # group (another name prefix, same target) is not ours to judge.
                catalog = conn.execute(CATALOG_SQL, (patterns,)).fetchall()
                rows = [(name, comment, member_of) for name, comment, member_of, *_ in catalog]
                active = {str(r[0]) for r in catalog if r[3]}
                drifts: dict[str, str] = {}
                for name, _, _, _, tables, schemas in catalog:
                    seen = known.get(str(name))
                    if seen is not None and seen.status == "active":
                        drift = _drift(conn, _held(tables, schemas), list(seen.scope))
                        if drift:
                            drifts[str(name)] = drift
        except ApplicationError as err:  # what _target and _admin raise, classified
            return err.message
        return rows, active, drifts

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
        tasks: dict[str, dict[str, str]] = {}
        unmanaged: list[str] = []
        ours = f"{self._prefix}_"
        for name, comment, member_of in rows:
            fields = parse_comment(comment)
            if fields is None:
                if has_our_shape(self._prefix, str(name)) or is_task_role_name(str(name)):
                    unmanaged.append(str(name))
            elif fields.get("part") == "task":
                if all(str(g).startswith(ours) for g in member_of or []):
                    tasks[str(name)] = fields
            elif fields.get("part") == "login":
                group = str(name)[:-2]
                if group not in groups and IDENTIFIER_RE.fullmatch(group):
                    groups.setdefault(group, fields)
            else:
                groups[str(name)] = fields
        # Task roles in use count as their NHI's use; those whose group is gone stand alone.
        group_of = {fields.get("nhi-id"): group for group, fields in groups.items()}
        in_use = {group_of.get(f.get("nhi-id")) for n, f in tasks.items() if n in active}
        out: list[PlatformIdentity] = [
            _task_role(name, fields, target, now if name in active else None)
            for name, fields in sorted(tasks.items())
            if fields.get("nhi-id") not in group_of
        ]
        for group, fields in sorted(groups.items()):
            created = _created_at(fields)
            secret_arn = None
            if group not in known:
                pace()
                try:
                    secret_arn = self._store.find_by_tag(NHI_ID_TAG, fields["nhi-id"])
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
                    last_used_at=now if logins & active or group in in_use else None,
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
        names = ddl.names_of(name)
        conn_target = ddl.resolve(self._targets, target)
        with ddl.admin(conn_target, f"reading the sessions of {name}") as conn:
            sessions = ddl.sessions(conn, list(names.logins))
        return datetime.now(UTC) if sessions else None
