"""The Postgres provider: `postgres_role` NHIs in registered target databases.

Shape of one NHI on a target:

* a group role named `plan.identity_name` (NOLOGIN) that holds the granted privileges;
* two LOGIN roles `<group>_a` / `<group>_b` (see `nhi.rules.pg_grants.role_names`), members of the
  group, used alternately by rotation so the old password keeps working during the overlap.
  Each carries `VALID UNTIL` = the NHI's expiry, so the database itself refuses logins after it
  even if this service is down, and a read-only scope makes its sessions read-only by default;
* a COMMENT on every role marking it ours (`nhi.rules.pg_grants.managed_comment`): the "already
  exists" check and the sweeps read it, and it carries the creation time Postgres lacks.

The password is generated here, set as a SCRAM verifier computed client side (the clear text
never appears in SQL text or server logs) and written straight into Secrets Manager as an
RDS-style JSON secret; only references leave. Every identifier reaching SQL was first checked
by `nhi.rules.pg_grants` and is then quoted with `psycopg.sql.Identifier`.

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

Three modules: this one decides what to do (lifecycle and rotation), `postgres_ddl` holds the
role and grant DDL and the connections, `postgres_discovery` lists for sweeps and judges drift.
Methods are blocking and do not heartbeat: the activity wrapper does that around each call.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import psycopg
from botocore.exceptions import ClientError
from psycopg import sql

from activities._support import classify_aws
from activities.providers import postgres_ddl as ddl
from activities.providers.base import marker_tags
from activities.providers.postgres_ddl import (
    PERMANENT_SQLSTATES,
    RETRYABLE_SQLSTATES,
    classify_postgres,
)
from activities.providers.postgres_discovery import PostgresDiscovery
from activities.providers.secret_store import CURRENT, PENDING, PREVIOUS, SecretStore, SecretValue
from models.contracts import (
    IdentityCreated,
    IdentityRef,
    ProvisionPlan,
    RemovalResult,
    StagedKey,
)
from models.enums import Platform
from nhi.rules.pg_grants import Grant, parse_grants, validate_grants
from nhi.rules.policy import PolicyRules, RuleViolation
from nhi.services.target_registry import TargetConnection, TargetResolver

if TYPE_CHECKING:
    from types_boto3_secretsmanager import SecretsManagerClient

# Where callers and tests have always found the error classification.
__all__ = ["PERMANENT_SQLSTATES", "RETRYABLE_SQLSTATES", "PostgresProvider", "classify_postgres"]

log = logging.getLogger(__name__)

# Structural rules only: the policy itself was applied when the request was accepted; this
# re-check guarantees nothing unvalidated reaches SQL whatever path built the plan.
_STRUCTURE_ONLY = PolicyRules(
    label="provider", allowed=True, default_ttl_seconds=1, max_lifetime_seconds=1
)


def _part(name: str, group: str, tasks: Mapping[str, object]) -> str:
    """How a removal report names one of an NHI's roles."""
    return "task" if name in tasks else "group" if name == group else "login"


class PostgresProvider(PostgresDiscovery):
    """Group role + two alternating login roles per NHI, credentials in Secrets Manager."""

    platform: ClassVar[Platform] = Platform.POSTGRES

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
        return ddl.resolve(self._targets, name)

    def _checked(self, plan: ProvisionPlan) -> tuple[ddl.Names, list[Grant]]:
        """The plan's role names and grants, refused before any connection if not plain."""
        names = ddl.names_of(plan.identity_name)
        try:
            validate_grants(plan.scope, _STRUCTURE_ONLY)
            grants = parse_grants(plan.scope)
        except RuleViolation as err:
            raise ddl.fail(f"scope refused: {err}", "InvalidScope") from None
        return names, grants

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

    def _stages(self, secret_name: str) -> dict[str, SecretValue]:
        try:
            return self._store.stage_values(secret_name)
        except ClientError as err:
            raise classify_aws(err, f"reading secret {secret_name}") from err

    # ---- provisioning ----------------------------------------------------------------------

    def create(self, plan: ProvisionPlan) -> IdentityCreated:
        """The group role with its grants and the two login roles (no password yet)."""
        names, grants = self._checked(plan)
        target = self._target(plan.target)
        with ddl.admin(target, f"creating {names.group}") as conn, conn.transaction():
            ddl.lock(conn, [f"role:{names.group}"] + [f"schema:{g.schema}" for g in grants])
            ddl.ensure_group(conn, plan, names)
            for login in names.logins:
                ddl.ensure_login(conn, plan, names, login, target)
            ddl.apply_grants(conn, names.group, grants)
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
        current = self._stages(plan.secret_name).get(CURRENT)
        if (
            current is not None
            and current.get("username") in names.logins
            and ddl.login_as(target, current) == current["username"]
        ):
            arn = self._arn(plan)
            log.info("nhi %s: delivered login %s reused", plan.nhi_id, current["username"])
            return IdentityCreated(external_id=external_id, credential_ref=arn)
        # A crash between the password and the secret: the login the secret names, re-keyed.
        login = str(current.get("username")) if current else ""
        if login not in names.logins:
            login = names.logins[0]
        password = secrets.token_urlsafe(32)
        with ddl.admin(target, f"setting the password of {login}") as conn, conn.transaction():
            ddl.lock(conn, [f"role:{names.group}"])
            ddl.require_group(conn, plan, names)
            ddl.ensure_login(conn, plan, names, login, target)
            ddl.set_password(conn, login, password)
        value = self._secret_value(target, login, password)
        del password
        try:
            arn = self._store.put_current(
                plan.secret_name,
                value,
                tags=marker_tags(plan),
                description=f"Postgres login of NHI {plan.nhi_id} on target {target.name}",
            )
        except ClientError as err:
            raise classify_aws(err, f"storing the credential of {names.group}") from err
        if ddl.login_as(target, value) != login:
            raise ddl.fail(
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
            raise ddl.fail(f"secret {plan.secret_name} vanished", "SecretMissing", retryable=True)
        return arn

    def renew(self, plan: ProvisionPlan) -> None:
        """Move both login roles' VALID UNTIL to the new expiry and re-apply the grants."""
        names, grants = self._checked(plan)
        target = self._target(plan.target)
        with ddl.admin(target, f"renewing {names.group}") as conn, conn.transaction():
            ddl.lock(conn, [f"role:{names.group}"] + [f"schema:{g.schema}" for g in grants])
            ddl.require_group(conn, plan, names)
            existing = ddl.find_roles(conn, list(names.logins))
            for login in names.logins:
                if login in existing:
                    ddl.check_ours(existing[login], plan.nhi_id)
                    ddl.configure_login(conn, plan, login, target)
            ddl.apply_grants(conn, names.group, grants)

    # ---- rotation --------------------------------------------------------------------------

    def stage_rotation(self, plan: ProvisionPlan) -> StagedKey:
        """Re-key the login role not in AWSCURRENT and store it as AWSPENDING.

        That role may be the previous one still in its overlap: it is retired early (its
        sessions ended), so an NHI never has more than the current and the new credential.
        A pending credential that already works is reused.
        """
        names, _ = self._checked(plan)
        target = self._target(plan.target)
        stages = self._stages(plan.secret_name)
        current = stages.get(CURRENT)
        if current is None:
            raise ddl.fail(
                f"secret {plan.secret_name} holds no current credential", "NothingToRotate"
            )
        old = str(current.get("username"))
        if old not in names.logins:
            raise ddl.fail(
                f"the current credential is for {old}, not {names.group}", "WrongIdentity"
            )
        new = names.logins[1] if old == names.logins[0] else names.logins[0]
        pending = stages.get(PENDING)
        if (
            pending is not None
            and pending.get("username") == new
            and ddl.login_as(target, pending) == new
        ):
            return StagedKey(new_key_id=new, old_key_id=old)
        password = secrets.token_urlsafe(32)
        with ddl.admin(target, f"staging a new password for {new}") as conn:
            with conn.transaction():
                ddl.lock(conn, [f"role:{names.group}"])
                ddl.require_group(conn, plan, names)
                ddl.ensure_login(conn, plan, names, new, target)
                ddl.set_password(conn, new, password)
            ended = ddl.terminate(conn, [new])
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
        pending = self._stages(plan.secret_name).get(PENDING)
        if pending is None:
            raise ddl.fail(
                f"secret {plan.secret_name} holds no pending credential", "NothingPending"
            )
        expected = str(pending.get("username"))
        if expected not in names.logins:
            raise ddl.fail(f"the pending credential is for {expected}", "WrongIdentity")
        user = ddl.login_as(target, pending)
        del pending
        if user is None:
            raise ddl.fail(
                f"the pending credential of {expected} does not log in",
                "NotYetValid",
                retryable=True,
            )
        if user != expected:
            raise ddl.fail(
                f"the pending credential logs in as {user}, not {expected}", "WrongIdentity"
            )

    def promote(self, plan: ProvisionPlan) -> StagedKey:
        """AWSPENDING becomes AWSCURRENT (the old one AWSPREVIOUS); repeat-safe."""
        names, _ = self._checked(plan)
        stages = self._stages(plan.secret_name)
        current, pending = stages.get(CURRENT), stages.get(PENDING)

        def user(value: SecretValue | None) -> str | None:
            return str(value["username"]) if value and "username" in value else None

        if pending is None:
            if current is None:
                raise ddl.fail(
                    f"secret {plan.secret_name} holds nothing to promote", "NothingPending"
                )
            return StagedKey(new_key_id=str(user(current)), old_key_id=user(stages.get(PREVIOUS)))
        new = user(pending)
        if new not in names.logins:
            raise ddl.fail(f"the pending credential is for {new}", "WrongIdentity")
        # Interrupted between the two label moves: AWSCURRENT already points at the new one.
        old = user(stages.get(PREVIOUS)) if user(current) == new else user(current)
        try:
            self._store.promote_pending(plan.secret_name)
        except ClientError as err:
            raise classify_aws(err, f"promoting the pending credential of {new}") from err
        return StagedKey(new_key_id=str(new), old_key_id=old)

    def retire(self, ref: IdentityRef, key_id: str, *, delete: bool) -> None:
        """The old login role `key_id` after the overlap: NOLOGIN and its sessions ended; with
        `delete`, its objects go to the group and the role is dropped. Gone counts as done."""
        names = ddl.names_of(ref.name)
        if key_id not in names.logins:
            raise ddl.fail(f"{key_id} is not a login role of {names.group}", "InvalidPlan")
        target = self._target(ref.target)
        login = key_id
        with ddl.admin(target, f"retiring {login}") as conn:
            found = ddl.find_roles(conn, [login]).get(login)
            if found is None:
                return
            if found.comment is None or found.comment.get("part") != "login":
                raise ddl.fail(
                    f"role {login} is not a login role this service made", "IdentityConflict"
                )
            if found.can_login:
                conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ddl.ident(login)))
            ended = ddl.terminate(conn, [login])
            log.info("login %s retired (%d sessions ended)", login, ended)
            if not delete:
                return
            try:
                with conn.transaction():
                    ddl.lock(conn, [f"role:{names.group}"])
                    has_group = names.group in ddl.find_roles(conn, [names.group])
                    heir = names.group if has_group else None
                    ddl.ensure_member(conn, [login] + ([heir] if heir else []))
                    heir_sql = ddl.ident(heir) if heir else sql.SQL("CURRENT_USER")
                    conn.execute(
                        sql.SQL("REASSIGN OWNED BY {} TO {}").format(ddl.ident(login), heir_sql)
                    )
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(ddl.ident(login)))
                    conn.execute(sql.SQL("DROP ROLE {}").format(ddl.ident(login)))
            except psycopg.Error as err:
                raise ddl.drop_failed(conn, err, [login], [login], f"dropping {login}") from None
            log.info("login %s dropped", login)

    # ---- containment -----------------------------------------------------------------------

    def disable(self, ref: IdentityRef) -> list[str]:
        """NOLOGIN on both login roles and on every task credential's login role of the NHI,
        and every session of them ended. The login roles are restorable; the task roles are
        not (`enable` leaves them alone): their credentials ended here, and the reaper drops
        them. The task roles are locked out under the group's advisory lock, which issuing
        one holds too, so a task role is either made before this (and locked out) or after."""
        names = ddl.names_of(ref.name)
        target = self._target(ref.target)
        done: list[str] = []
        with ddl.admin(target, f"disabling {names.group}") as conn:
            with conn.transaction():
                ddl.lock(conn, [f"role:{names.group}"])
                existing = ddl.find_roles(conn, [names.group, *names.logins])
                tasks = ddl.task_roles(conn, ref.nhi_id)
                logins = {n: r for n, r in existing.items() if n in names.logins}
                disabled = ddl.nologin(conn, ref.nhi_id, logins | tasks)
            if not existing and not tasks:
                return ["already gone"]
            # After the commit: a session that reconnected before it would survive.
            ended = ddl.terminate(conn, [*logins, *tasks])
            done += [
                f"{'task' if login in tasks else 'login'} role {login} NOLOGIN"
                for login in disabled
            ]
            if ended:
                done.append(f"{ended} sessions ended")
        return done

    def verify_disabled(self, ref: IdentityRef) -> None:
        """No login role (task credentials' included) can log in and none has a session
        left, from the catalog itself."""
        names = ddl.names_of(ref.name)
        target = self._target(ref.target)
        with ddl.admin(target, f"checking that {names.group} is disabled") as conn:
            roles = ddl.find_roles(conn, list(names.logins)) | ddl.task_roles(conn, ref.nhi_id)
            can_login = sorted(r.name for r in roles.values() if r.can_login)
            sessions = ddl.sessions(conn, [*names.logins, *roles])
        if can_login or sessions:
            raise ddl.fail(
                f"{names.group} not contained: can log in {can_login}, {sessions} sessions",
                "NotQuarantined",
                retryable=True,
            )

    def enable(self, ref: IdentityRef) -> None:
        """LOGIN again on the login role the delivered (AWSCURRENT) credential names."""
        names = ddl.names_of(ref.name)
        target = self._target(ref.target)
        current = self._stages(ref.secret_name).get(CURRENT)
        login = str(current.get("username")) if current else ""
        if login not in names.logins:
            raise ddl.fail(
                f"no delivered credential of {names.group} to restore", "NothingToEnable"
            )
        with ddl.admin(target, f"enabling {login}") as conn:
            role = ddl.find_roles(conn, [login]).get(login)
            if role is None:
                raise ddl.fail(f"login role {login} does not exist", "IdentityMissing")
            ddl.check_ours(role, ref.nhi_id)
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(ddl.ident(login)))

    # ---- removal ---------------------------------------------------------------------------

    def delete(self, ref: IdentityRef, *, force_delete_secret: bool = False) -> RemovalResult:
        """End sessions, hand owned objects to the admin, drop the roles, prove from pg_roles
        that none is left and that the delivered credential no longer logs in, then delete
        the secret. Gone counts as removed.

        NOLOGIN holds until the drop: it is committed (and sessions ended) before the drop's
        transaction, asserted again inside it, and again after a drop that failed, so a removal
        that stops half way leaves every login at least as locked as quarantine.
        """
        names = ddl.names_of(ref.name)
        target = self._target(ref.target)
        removed: list[str] = []
        doing = f"removing {names.group}"
        with ddl.admin(target, doing) as conn:
            # Task credentials' login roles first: members of the group, they must be gone
            # before it can be dropped (and are as live as its own logins until then).
            tasks = ddl.task_roles(conn, ref.nhi_id)
            everyone = [
                *sorted(tasks),
                *(n for n in (*names.logins, names.group) if n not in tasks),
            ]
            existing = ddl.find_roles(conn, everyone)
            _, ended = ddl.lock_out(conn, ref.nhi_id, existing)
            if ended:
                removed.append(f"{ended} sessions")
            present = [n for n in everyone if n in existing]
            if present:
                logins = [n for n in present if n in names.logins or n in tasks]
                try:
                    with conn.transaction():
                        ddl.lock(conn, [f"role:{names.group}"])
                        # The schemas whose ACLs the drop rewrites, read from the catalog (an
                        # orphan comes with no scope): locked as create and renew lock theirs.
                        schemas = ddl.schemas_of(conn, present)
                        ddl.lock(conn, [f"schema:{schema}" for schema in schemas])
                        for login in logins:  # a LOGIN set since the lock-out is undone here
                            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ddl.ident(login)))
                        ddl.ensure_member(conn, present)
                        roles = sql.SQL(", ").join(ddl.ident(n) for n in present)
                        conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(roles))
                        conn.execute(sql.SQL("DROP OWNED BY {}").format(roles))
                        for name in present:  # logins first: they are members of the group
                            conn.execute(sql.SQL("DROP ROLE {}").format(ddl.ident(name)))
                except psycopg.Error as err:
                    raise ddl.drop_failed(
                        conn, err, present, logins, f"dropping the roles of {names.group}"
                    ) from None
                removed += [f"{_part(n, names.group, tasks)} role {n}" for n in present]
            # A fresh read, task roles by their marker again: one made during the removal
            # would otherwise outlive its NHI.
            left = sorted(
                set(ddl.find_roles(conn, everyone)) | set(ddl.task_roles(conn, ref.nhi_id))
            )
        if left:
            raise ddl.fail(
                f"roles {', '.join(left)} of {names.group} still exist after DROP ROLE; retrying",
                "NotRemoved",
                retryable=True,
            )
        if not ref.secret_name:
            # No delivery secret known (an orphan whose secret the sweep did not find, a task
            # credential's role): nothing delivered to prove dead or to delete.
            log.info("nhi %s removed from %s: %s", ref.nhi_id, target.name, removed)
            return RemovalResult(removed=removed)
        try:
            # A secret already scheduled for deletion was proven dead by the run that did it
            # (and cannot be read any more).
            scheduled = self._store.scheduled_for_deletion(ref.secret_name)
        except ClientError as err:
            raise classify_aws(err, f"describing secret {ref.secret_name}") from err
        delivered = {} if scheduled else self._stages(ref.secret_name)
        for stage, value in delivered.items():
            if ddl.login_as(target, value) is not None:
                raise ddl.fail(
                    f"the {stage} credential of {names.group} still logs in after removal",
                    "NotRemoved",
                    retryable=True,
                )
        try:
            if self._store.delete(ref.secret_name, force=force_delete_secret):
                removed.append(f"secret {ref.secret_name}")
        except ClientError as err:
            raise classify_aws(err, f"deleting secret {ref.secret_name}") from err
        log.info("nhi %s removed from %s: %s", ref.nhi_id, target.name, removed)
        return RemovalResult(removed=removed)
