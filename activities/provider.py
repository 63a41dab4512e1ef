"""The activities every workflow uses to act on a platform, whatever the platform.

Each activity routes by the plan's platform to the registered provider (activities/providers/)
and heartbeats while the provider's blocking calls run. Activity names are part of workflow
history: the lifecycle's names predate the provider interface and are kept as they were, so
running lifecycles replay unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._support import heartbeating
from activities.providers.base import Provider
from models.contracts import (
    IdentityCreated,
    KeyRef,
    ProvisionPlan,
    RemovalResult,
    RemoveIdentity,
    StagedKey,
)
from models.enums import Platform

T = TypeVar("T")


def provider_for(providers: Mapping[Platform, Provider], platform: str) -> Provider:
    """The provider registered for a platform; a non-retryable `NoProvider` error when the
    name is no platform or this worker has none for it."""
    try:
        return providers[Platform(platform)]
    except (ValueError, KeyError):
        raise ApplicationError(
            f"no provider is registered for {platform!r} on this worker",
            type="NoProvider",
            non_retryable=True,
        ) from None


class ProviderActivities:
    """Create, deliver, renew, rotate, contain and delete identities through providers."""

    def __init__(self, providers: Mapping[Platform, Provider]) -> None:
        self._providers = dict(providers)

    def provider(self, platform: Platform) -> Provider:
        """The provider registered for a platform (a non-retryable error if none is)."""
        return provider_for(self._providers, platform)

    def _run(self, platform: Platform, call: Callable[[Provider], T]) -> T:
        provider = self.provider(platform)
        with heartbeating():
            return call(provider)

    # ---- provisioning --------------------------------------------------------------------------

    @activity.defn
    def create_identity(self, plan: ProvisionPlan) -> IdentityCreated:
        """The identity and its scope, without a credential."""
        return self._run(plan.platform, lambda p: p.create(plan))

    @activity.defn
    def deliver_credential(self, plan: ProvisionPlan) -> IdentityCreated:
        """The credential, into the secret store; only its reference comes back."""
        return self._run(plan.platform, lambda p: p.deliver(plan))

    # Provisioning runs recorded before the provider interface scheduled these AWS-only names;
    # they stay registered so such runs (e.g. waiting for an approver) still complete.
    @activity.defn
    def ensure_role(self, plan: ProvisionPlan) -> IdentityCreated:
        """Legacy name of `create_identity` for an `iam_role`."""
        return self._run(plan.platform, lambda p: p.create(plan))

    @activity.defn
    def ensure_user(self, plan: ProvisionPlan) -> IdentityCreated:
        """Legacy name of `create_identity` for an `iam_user_key`."""
        return self._run(plan.platform, lambda p: p.create(plan))

    @activity.defn
    def issue_access_key(self, plan: ProvisionPlan) -> IdentityCreated:
        """Legacy name of `deliver_credential` for an `iam_user_key`."""
        return self._run(plan.platform, lambda p: p.deliver(plan))

    # ---- lifecycle -----------------------------------------------------------------------------

    @activity.defn
    def update_expiry(self, plan: ProvisionPlan) -> None:
        """Renewal: move the platform-side expiry."""
        self._run(plan.platform, lambda p: p.renew(plan))

    @activity.defn
    def stage_new_key(self, plan: ProvisionPlan) -> StagedKey:
        """Rotation step 1: a new credential as the pending secret version."""
        return self._run(plan.platform, lambda p: p.stage_rotation(plan))

    @activity.defn
    def verify_pending(self, plan: ProvisionPlan) -> None:
        """Rotation step 2: prove the pending credential works as this identity."""
        self._run(plan.platform, lambda p: p.verify_pending(plan))

    @activity.defn
    def promote_pending(self, plan: ProvisionPlan) -> StagedKey:
        """Rotation step 3: the proven credential becomes current."""
        return self._run(plan.platform, lambda p: p.promote(plan))

    @activity.defn
    def deactivate_key(self, key: KeyRef) -> None:
        """After the overlap: the old credential stops working."""
        self._run(key.platform, lambda p: p.retire(key, delete=False))

    @activity.defn
    def delete_key(self, key: KeyRef) -> None:
        """After the second overlap: the old credential is removed."""
        self._run(key.platform, lambda p: p.retire(key, delete=True))

    @activity.defn
    def quarantine(self, plan: ProvisionPlan) -> list[str]:
        """Containment: nothing of the identity works any more, restorably."""
        return self._run(plan.platform, lambda p: p.disable(plan))

    @activity.defn
    def verify_quarantine(self, plan: ProvisionPlan) -> None:
        """Prove the containment from the platform's own state."""
        self._run(plan.platform, lambda p: p.verify_disabled(plan))

    @activity.defn
    def lift_quarantine(self, plan: ProvisionPlan) -> None:
        """Restore during the grace period."""
        self._run(plan.platform, lambda p: p.enable(plan))

    @activity.defn
    def remove_identity(self, request: RemoveIdentity) -> RemovalResult:
        """Delete the identity, what is attached to it and its secret."""
        return self._run(request.plan.platform, lambda p: p.delete(request))
