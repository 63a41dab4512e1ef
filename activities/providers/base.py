"""The interface every platform implements, so workflows never name a platform.

A provider is a plain class of blocking methods; `ProviderActivities` (activities/provider.py)
wraps them as Temporal activities and routes each call by the plan's platform. Every method is
idempotent: a retry after a crash finds what the earlier try made (deterministic names, our own
markers on the platform) and "not found" during removal counts as removed. Secrets go from the
platform straight into the secret store inside one call; only references come back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

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
from nhi.sweep import PlatformIdentity

# Called before each platform call of a listing: rate limiting and heartbeats (see sweeps).
Pace = Callable[[], None]


@dataclass(frozen=True)
class Known:
    """What the inventory says of an identity it holds alive: a listing fetches details (and
    judges drift against the granted scope) only where a sweep needs them."""

    status: str
    scope: tuple[ScopeStatement, ...] = ()


@dataclass(frozen=True)
class Discovery:
    """What a listing found, and the places (Postgres targets) it could not list. A sweep
    compares only what was listed: an unreachable target's NHIs are never "missing"."""

    identities: list[PlatformIdentity]
    unreachable: dict[str, str] = field(default_factory=dict)  # place -> why


class Provider(Protocol):
    """What a platform must do for the lifecycle. Errors a retry cannot fix are raised as
    non-retryable `ApplicationError`s; anything else is retried by Temporal."""

    platform: Platform

    def create(self, plan: ProvisionPlan) -> IdentityCreated:
        """Create the identity with its scope (no credential yet), or find the one a previous
        try made; refuse one that exists but is not this NHI's (`IdentityConflict`)."""
        ...

    def deliver(self, plan: ProvisionPlan) -> IdentityCreated:
        """Issue the credential and store it in the secret store; return its reference.
        Provisioning calls it only for kinds with a static secret (`ROTATABLE_KINDS`): for the
        others, `create`'s result is the reference."""
        ...

    def renew(self, plan: ProvisionPlan) -> None:
        """Move the platform-side expiry (and re-apply the granted scope) to `plan.expires_at`."""
        ...

    def stage_rotation(self, plan: ProvisionPlan) -> StagedKey:
        """Rotation step 1: a new credential, stored as the pending secret version."""
        ...

    def verify_pending(self, plan: ProvisionPlan) -> None:
        """Rotation step 2: prove the pending credential logs in as this identity."""
        ...

    def promote(self, plan: ProvisionPlan) -> StagedKey:
        """Rotation step 3: the pending credential becomes current, the old one previous."""
        ...

    def retire(self, key: KeyRef, *, delete: bool) -> None:
        """After the overlap: stop the old credential working (`delete=False`), then remove
        it (`delete=True`)."""
        ...

    def disable(self, plan: ProvisionPlan) -> list[str]:
        """Containment: stop every credential of the identity working, restorably; end its
        live sessions. Returns what was done."""
        ...

    def verify_disabled(self, plan: ProvisionPlan) -> None:
        """Prove the identity cannot act (raise `NotQuarantined` while it still can)."""
        ...

    def enable(self, plan: ProvisionPlan) -> None:
        """Undo `disable`: the delivered credential works again."""
        ...

    def delete(self, request: RemoveIdentity) -> RemovalResult:
        """Remove the identity, everything attached to it and its secret."""
        ...

    def discover(self, known: Mapping[str, Known], pace: Pace) -> Discovery:
        """Every identity under this deployment's marker on the platform. `known` maps the
        names the inventory holds alive to what it knows of them, so details are fetched only
        where a sweep needs them. A listing that fails for the whole platform raises; one place of
        several that cannot be reached is reported in `unreachable`."""
        ...

    def last_used(self, kind: NhiKind, name: str, target: str | None) -> datetime | None:
        """When the platform last saw the identity used, if it says."""
        ...


Providers = Mapping[Platform, Provider]
