"""Registered Postgres targets: where `postgres_role` NHIs are created, and how to reach them
as an admin. The admin password is resolved when needed, from the environment or the secret
store, and never stored in the inventory.

A target is a place the worker sends an admin password to, so registering one must not be a
way to read a secret: the password comes only from a secret under `NHI_TARGET_SECRET_PREFIX`
or a variable named `NHI_TARGET_PASSWORD_*`, the host must match `NHI_TARGET_ALLOWED_HOSTS`,
and the connection must verify the server (`sslmode=verify-full`) outside dev mode. The API
checks this when a target is registered and the worker again right before it connects
(`check_target`), so a row written before these rules, or edited in the database, cannot be
abused either. Targets in `NHI_POSTGRES_TARGETS` are the operator's deploy-time word and are
trusted for host, sslmode and variable, but still can never name a delivered credential.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Literal, Protocol

from botocore.exceptions import ClientError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models.orm import Target
from nhi.infra.config import Settings
from nhi.rules.policy import RuleViolation
from nhi.rules.targets import (
    _TARGET_ENV_RE,
    REQUIRED_SSLMODE,
    TARGET_PASSWORD_ENV_PREFIX,
    format_dsn,
    host_allowed,
    parse_dsn,
    secret_name,
    under_prefix,
)

if TYPE_CHECKING:
    from types_boto3_secretsmanager import SecretsManagerClient


@dataclass(frozen=True)
class TargetConnection:
    """An admin connection to one target database (the password is resolved, in memory only)."""

    name: str
    host: str
    port: int
    dbname: str
    admin_user: str
    password: str = field(repr=False)
    sslmode: str = "prefer"
    connection_limit: int = 10

    def public_dsn(self, user: str | None = None) -> str:
        """A DSN without any password: what the inventory and secret references may show."""
        return format_dsn(self.host, self.port, self.dbname, user)


class TargetResolver(Protocol):
    """Finds registered targets (from the inventory's `targets` table and from settings)."""

    def get(self, name: str) -> TargetConnection:
        """The target's admin connection, password resolved; raises `UnknownTarget`."""
        ...

    def names(self) -> list[str]:
        """Every registered target's name, sorted."""
        ...


class UnknownTarget(LookupError):
    """No target of that name is registered (or its admin password cannot be resolved)."""


class TargetRefused(UnknownTarget):
    """A target breaks the rules on hosts, password sources or TLS: the worker never connects."""


def check_password_source(settings: Settings, ref: str, *, trusted: bool = False) -> None:
    """Where a target's admin password may come from.

    Never a secret under the delivery prefix (`NHI_SECRET_PREFIX`: other NHIs' credentials),
    whoever defined the target. Unless `trusted` (a target from settings): a secret only under
    `NHI_TARGET_SECRET_PREFIX`, a variable only named `NHI_TARGET_PASSWORD_*`.

    Raises:
        RuleViolation: naming `password_secret` or `password_env` and the rule.
    """
    kind, _, where = ref.partition(":")
    if kind == "secret":
        name = secret_name(where)
        if not name or under_prefix(name, settings.secret_prefix):
            raise RuleViolation(
                "password_secret",
                f"must not name a secret under the delivery prefix {settings.secret_prefix!r} "
                "(NHI_SECRET_PREFIX: credentials delivered to agents)",
            )
        if not trusted and not name.startswith(settings.target_secret_prefix):
            raise RuleViolation(
                "password_secret",
                f"must name a secret under {settings.target_secret_prefix!r} "
                "(NHI_TARGET_SECRET_PREFIX); when given as an ARN, its secret name",
            )
        return
    if kind == "env":
        if not trusted and not _TARGET_ENV_RE.fullmatch(where):
            raise RuleViolation(
                "password_env",
                f"must be a variable named {TARGET_PASSWORD_ENV_PREFIX}<NAME> "
                "(only those hold target admin passwords)",
            )
        return
    raise RuleViolation("password_env", "the password reference is not env:... or secret:...")


def check_target(
    settings: Settings, host: str, ref: str, sslmode: str, *, trusted: bool = False
) -> None:
    """Every rule a target must meet before a password is sent to it (see the module doc).

    Raises:
        RuleViolation: naming the field (`dsn`, `password_secret`, `password_env`, `sslmode`).
    """
    check_password_source(settings, ref, trusted=trusted)
    if trusted:
        return
    if not host_allowed(host, settings.target_allowed_hosts):
        allowed = ", ".join(settings.target_allowed_hosts) or "none: the list is empty"
        raise RuleViolation(
            "dsn",
            f"host {host!r} is not allowed for targets (NHI_TARGET_ALLOWED_HOSTS: {allowed})",
        )
    if sslmode != REQUIRED_SSLMODE and not settings.dev_mode:
        raise RuleViolation(
            "sslmode", f"must be {REQUIRED_SSLMODE} (the server's certificate and name verified)"
        )


# ---- lookup: the `targets` table and settings, with or without the password -----------------

TargetSource = Literal["inventory", "settings"]


@dataclass(frozen=True)
class TargetSpec:
    """A registered target as the inventory shows it: a password reference, no password."""

    name: str
    host: str
    port: int
    dbname: str
    admin_user: str
    password_ref: str
    sslmode: str
    connection_limit: int
    source: TargetSource
    created_by: str | None = None
    created_at: datetime | None = None

    @property
    def dsn(self) -> str:
        """The admin DSN it was registered with (no password)."""
        return format_dsn(self.host, self.port, self.dbname, self.admin_user)


def target_spec(row: Target) -> TargetSpec:
    """The spec of a `targets` row."""
    return TargetSpec(
        name=row.name,
        host=row.host,
        port=row.port,
        dbname=row.dbname,
        admin_user=row.admin_user,
        password_ref=row.password_ref,
        sslmode=row.sslmode,
        connection_limit=row.connection_limit,
        source="inventory",
        created_by=row.created_by,
        created_at=row.created_at,
    )


def settings_targets(settings: Settings) -> dict[str, TargetSpec]:
    """Targets defined in `NHI_POSTGRES_TARGETS` (already validated when settings loaded)."""
    out: dict[str, TargetSpec] = {}
    for name, entry in settings.postgres_targets.items():
        parsed = parse_dsn(entry.dsn, f"postgres_targets.{name}.dsn")
        out[name] = TargetSpec(
            name=name,
            host=parsed.host,
            port=parsed.port,
            dbname=parsed.dbname,
            admin_user=parsed.admin_user,
            password_ref=entry.password_ref,
            sslmode=entry.sslmode,
            connection_limit=entry.connection_limit,
            source="settings",
        )
    return out


def find_target(
    session: Session, settings: Settings, name: str, *, lock: bool = False
) -> TargetSpec | None:
    """One target without its password. A name in both settings and the table resolves to the
    settings entry: settings are the operator's deploy-time word and cannot be changed or
    removed through the API. `lock` holds the table row (FOR SHARE) until the transaction ends,
    so a concurrent removal waits for, and then sees, what this transaction adds."""
    configured = settings_targets(settings).get(name)
    if configured is not None:
        return configured
    query = select(Target).where(Target.name == name)
    if lock:
        query = query.with_for_update(read=True)
    row = session.scalar(query)
    return None if row is None else target_spec(row)


def all_targets(session: Session, settings: Settings) -> list[TargetSpec]:
    """Every registered target, by name; settings win over a table row of the same name."""
    merged = {row.name: target_spec(row) for row in session.scalars(select(Target))}
    merged.update(settings_targets(settings))
    return [merged[name] for name in sorted(merged)]


def resolve_password(
    target: str,
    ref: str,
    secrets: SecretsManagerClient | None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The admin password `ref` points at. Messages name the reference, never the password.

    Raises:
        UnknownTarget: the variable is unset or empty, the secret is missing, unreadable or
            has no password.
    """
    kind, _, where = ref.partition(":")
    if kind == "env":
        value = (os.environ if environ is None else environ).get(where)
        if not value:
            raise UnknownTarget(
                f"target {target}: environment variable {where} (its admin password) is not set"
            )
        return value
    if kind != "secret":
        raise UnknownTarget(f"target {target}: password reference is not env:... or secret:...")
    if secrets is None:
        raise UnknownTarget(
            f"target {target}: its admin password is in Secrets Manager, and no client is set up"
        )
    try:
        answer = secrets.get_secret_value(SecretId=where)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in _SECRET_UNUSABLE:
            raise UnknownTarget(
                f"target {target}: secret {where} (its admin password) cannot be read ({code})"
            ) from None
        raise
    text = answer.get("SecretString")
    if not text:
        raise UnknownTarget(f"target {target}: secret {where} holds no text password")
    return _password_of(target, where, text)


# Answers a retry will not change; anything else (throttling, outages) propagates to be retried.
_SECRET_UNUSABLE = frozenset(
    {
        "ResourceNotFoundException",
        "AccessDeniedException",
        "InvalidRequestException",
        "DecryptionFailure",
        "ValidationException",
    }
)


def _password_of(target: str, where: str, text: str) -> str:
    """A plain-string secret, or RDS-style JSON with a "password" key."""
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except ValueError:
            raise UnknownTarget(f"target {target}: secret {where} is not valid JSON") from None
        password = document.get("password") if isinstance(document, dict) else None
        if not isinstance(password, str) or not password:
            raise UnknownTarget(f'target {target}: secret {where} has no "password" key')
        return password
    return text


class TargetRegistry:
    """`TargetResolver` over the `targets` table and `NHI_POSTGRES_TARGETS` (settings win on a
    shared name). `get` resolves the admin password on every call, so a rotated secret or a
    changed variable is picked up without a restart; nothing is cached."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        secrets: SecretsManagerClient | None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._secrets = secrets
        self._environ = environ

    def spec(self, name: str) -> TargetSpec:
        """The target without its password (raises `UnknownTarget`)."""
        with self._sessions() as session:
            spec = find_target(session, self._settings, name)
        if spec is None:
            raise UnknownTarget(f"no target named {name!r} is registered (see `nhi targets list`)")
        return spec

    def get(self, name: str) -> TargetConnection:
        """The target's admin connection with its password resolved now, only if the target
        still meets the rules (`check_target`): this is the last check before a connection.

        Raises:
            TargetRefused: the target breaks a rule; nothing was resolved.
            UnknownTarget: no such target, or its password cannot be found.
        """
        spec = self.spec(name)
        try:
            check_target(
                self._settings,
                spec.host,
                spec.password_ref,
                spec.sslmode,
                trusted=spec.source == "settings",
            )
        except RuleViolation as err:
            raise TargetRefused(f"target {name} is refused: {err}") from None
        return TargetConnection(
            name=spec.name,
            host=spec.host,
            port=spec.port,
            dbname=spec.dbname,
            admin_user=spec.admin_user,
            password=resolve_password(spec.name, spec.password_ref, self._secrets, self._environ),
            sslmode=spec.sslmode,
            connection_limit=spec.connection_limit,
        )

    def names(self) -> list[str]:
        """Every registered target's name, sorted."""
        with self._sessions() as session:
            return [t.name for t in all_targets(session, self._settings)]
