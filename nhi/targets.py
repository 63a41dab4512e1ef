"""Registered Postgres targets: where `postgres_role` NHIs are created, and how to reach them
as an admin. The admin password is resolved when needed, from the environment or the secret
store, and never stored in the inventory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


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
        who = f"{user}@" if user else ""
        return f"postgresql://{who}{self.host}:{self.port}/{self.dbname}"


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
