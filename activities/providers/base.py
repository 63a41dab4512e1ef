"""The interfaces a platform implements, so workflows and sweeps never name a platform.

Four narrow interfaces, one per concern:

* `LifecycleProvider`: create, deliver, renew, disable, verify_disabled, enable, delete.
  Every platform has it.
* `RotationProvider`: stage_rotation, verify_pending, promote, retire. Only platforms whose
  kinds hold a static credential (`ROTATABLE_KINDS`) need it.
* `DiscoveryProvider`: discover (every identity under this deployment's marker, each judged
  against its granted scope: the provider says what drifted), last_used. Every platform has it;
  sweeps reach the platform through it and through `LifecycleProvider` only.
* `TaskCredentialProvider`: issue (a short-lived credential derived from an active NHI, for one
  task; see nhi/services/task_credentials.py). Called synchronously by the API process, never
  by a workflow: its result holds the credential, which must never reach history.

A provider is a plain class of blocking methods. `ProviderActivities` (activities/provider.py)
wraps them as Temporal activities, routes each call by platform and heartbeats meanwhile.
Creating and renewing take the whole `ProvisionPlan` (scope, expiry, trust); everything that
acts on an identity that exists takes an `IdentityRef`. Every method is idempotent: a retry
after a crash finds what the earlier try made (deterministic names, our own markers on the
platform) and "not found" during removal counts as removed. Secrets go from the platform
straight into the secret store inside one call; only references come back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Protocol, runtime_checkable

from models.contracts import (
    IdentityCreated,
    IdentityRef,
    ProvisionPlan,
    RemovalResult,
    ScopeStatement,
    StagedKey,
)
from models.enums import NhiKind, Platform
from nhi import MANAGED_BY
from nhi.rules.findings import PlatformIdentity
from nhi.rules.task_credentials import IssuedCredential, TaskGrant

# Called before each platform call of a listing: rate limiting and heartbeats (see sweeps).
Pace = Callable[[], None]

EXPIRES_AT_TAG = "nhi:expires-at"
NHI_ID_TAG = "nhi:nhi-id"  # sweeps find an orphan's delivery secret by it


def marker_tags(plan: ProvisionPlan) -> dict[str, str]:
    """What a provider marks the things it makes with (identities where the platform has
    tags, delivery secrets everywhere), derived from the plan's typed fields: the expiry from
    `expires_at`, so a renewed plan carries the renewed tag."""
    return {
        "managed-by": MANAGED_BY,
        "nhi:agent-id": str(plan.agent_id),
        NHI_ID_TAG: str(plan.nhi_id),
        "nhi:owner": plan.owner_email,
        "nhi:environment": plan.environment,
        EXPIRES_AT_TAG: expires_tag(plan.expires_at),
    }


def expires_tag(at: datetime) -> str:
    """An expiry as the `nhi:expires-at` tag holds it."""
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Known:
    """What the inventory says of an identity it holds alive: its status and what it was
    granted. A listing fetches details (usage, permissions) only where a sweep needs them, and
    the provider judges drift by comparing the platform's permissions with the grant."""

    status: str
    scope: tuple[ScopeStatement, ...] = ()
    allowed_cidrs: tuple[str, ...] = ()
    expires_at: datetime | None = None


@dataclass(frozen=True)
class Discovery:
    """What a listing found, and the places (Postgres targets) it could not list. A sweep
    compares only what was listed: an unreachable target's NHIs are never "missing"."""

    identities: list[PlatformIdentity]
    unreachable: dict[str, str] = field(default_factory=dict)  # place -> why


class LifecycleProvider(Protocol):
    """Create, renew, contain and remove identities on one platform. Errors a retry cannot
    fix are raised as non-retryable `ApplicationError`s; anything else is retried."""

    platform: ClassVar[Platform]

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
        """Move the platform-side expiry to `plan.expires_at` and re-apply exactly the
        granted scope (what a sweep's drift revert runs too)."""
        ...

    def disable(self, ref: IdentityRef) -> list[str]:
        """Containment: stop every credential of the identity working, restorably; end its
        live sessions. Gone counts as done. Returns what was done."""
        ...

    def verify_disabled(self, ref: IdentityRef) -> None:
        """Prove the identity cannot act (raise `NotQuarantined` while it still can)."""
        ...

    def enable(self, ref: IdentityRef) -> None:
        """Undo `disable`: the delivered credential works again."""
        ...

    def delete(self, ref: IdentityRef, *, force_delete_secret: bool = False) -> RemovalResult:
        """Remove the identity, everything attached to it and its secret (without recovery
        window when `force_delete_secret`: a credential nobody received)."""
        ...


@runtime_checkable
class RotationProvider(Protocol):
    """Rotate a static credential with an overlap: stage, verify, promote, then retire the old
    one. Optional: only platforms with kinds in `ROTATABLE_KINDS` implement it."""

    def stage_rotation(self, plan: ProvisionPlan) -> StagedKey:
        """Step 1: a new credential, stored as the pending secret version."""
        ...

    def verify_pending(self, plan: ProvisionPlan) -> None:
        """Step 2: prove the pending credential logs in as this identity."""
        ...

    def promote(self, plan: ProvisionPlan) -> StagedKey:
        """Step 3: the pending credential becomes current, the old one previous."""
        ...

    def retire(self, ref: IdentityRef, key_id: str, *, delete: bool) -> None:
        """After the overlap: stop the old credential `key_id` of `ref` working
        (`delete=False`), then remove it (`delete=True`). Gone counts as done."""
        ...


class DiscoveryProvider(Protocol):
    """What sweeps ask of a platform."""

    platform: ClassVar[Platform]
    # What separates the deployment's name prefix from the rest of an identity's name here
    # (IAM names `nhi-...`, Postgres roles `nhi_...`): sweeps select their inventory rows by it.
    name_separator: ClassVar[str]

    def discover(self, known: Mapping[str, Known], pace: Pace) -> Discovery:
        """Every identity under this deployment's marker on the platform. `known` maps the
        names the inventory holds alive to what it knows of them, so details are fetched only
        where a sweep needs them; for each active one, `PlatformIdentity.drift` says how the
        platform's permissions differ from its grant (None: they match). A listing that fails
        for the whole platform raises; one place of several that cannot be reached is reported
        in `unreachable`."""
        ...

    def last_used(self, kind: NhiKind, name: str, target: str | None) -> datetime | None:
        """When the platform last saw the identity used, if it says."""
        ...


class Provider(LifecycleProvider, DiscoveryProvider, Protocol):
    """What the registry holds per platform: lifecycle and discovery (rotation optional)."""


class TaskCredentialProvider(Protocol):
    """Issue task credentials on one platform (`iam_role`, `postgres_role` NHIs)."""

    platform: ClassVar[Platform]

    def issue(self, grant: TaskGrant) -> IssuedCredential:
        """Create the credential `grant` describes, valid until `grant.expires_at` and no
        longer, with at most the NHI's scope (`grant.scope` narrowing it), and return it. All
        or nothing: a failure leaves nothing usable behind. Platform errors leave as
        `ApplicationError`s whose messages never hold the credential."""
        ...
