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
"""

from __future__ import annotations

from typing import ClassVar

from psycopg import sql

from activities.providers import postgres_ddl as ddl
from models.enums import Platform
from nhi.rules.pg_grants import is_read_only, managed_comment, parse_grants
from nhi.rules.policy import RuleViolation
from nhi.rules.task_credentials import (
    IssuedCredential,
    TaskGrant,
    new_password,
    scram_verifier,
)
from nhi.services.target_registry import TargetResolver


class PostgresTaskProvider:
    """`TaskCredentialProvider` for `postgres_role` NHIs."""

    platform: ClassVar[Platform] = Platform.POSTGRES

    def __init__(self, targets: TargetResolver) -> None:
        self._targets = targets

    def issue(self, grant: TaskGrant) -> IssuedCredential:
        """One LOGIN role for the task (see the module doc); its password, once."""
        target = ddl.resolve(self._targets, grant.target)
        login, group = grant.name, grant.identity_name
        try:
            narrowed = parse_grants(list(grant.scope)) if grant.scope is not None else None
        except RuleViolation as err:
            raise ddl.fail(f"scope refused: {err}", "InvalidScope") from None
        password = new_password()
        attributes = sql.SQL("LOGIN INHERIT VALID UNTIL {} CONNECTION LIMIT {} PASSWORD {}").format(
            ddl.until(grant.expires_at),
            sql.Literal(int(target.connection_limit)),
            sql.Literal(scram_verifier(password)),
        )
        if narrowed is None:
            attributes = sql.SQL("{} IN ROLE {}").format(attributes, ddl.ident(group))
        comment = managed_comment(
            nhi_id=grant.nhi_id,
            agent_id=grant.agent_id,
            part="task",
            created_at=grant.issued_at,
            task_credential_id=grant.credential_id,
        )
        scope = grant.scope if grant.scope is not None else grant.granted_scope
        # Containment of the parent (provider `disable`) holds the same lock while it finds and
        # locks out the task roles by their marker: this role exists before it looks, or is
        # created after it, when the parent is no longer active and the reaper ends it.
        locks = [f"role:{group}"] + [f"schema:{g.schema}" for g in narrowed or []]
        with ddl.admin(target, f"issuing task credential {login}") as conn, conn.transaction():
            ddl.lock(conn, locks)
            found = ddl.find_roles(conn, [group]).get(group)
            if found is None:
                raise ddl.fail(f"group role {group} does not exist", "IdentityMissing")
            ddl.check_ours(found, grant.nhi_id)
            conn.execute(sql.SQL("CREATE ROLE {} {}").format(ddl.ident(login), attributes))
            conn.execute(
                sql.SQL("COMMENT ON ROLE {} IS {}").format(ddl.ident(login), sql.Literal(comment))
            )
            if narrowed is not None:
                ddl.apply_grants(conn, login, narrowed)
            if is_read_only(list(scope)):
                conn.execute(
                    sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(
                        ddl.ident(login)
                    )
                )
        return IssuedCredential(
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
