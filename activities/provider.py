"""The activities every workflow uses to act on a platform, whatever the platform.

Each activity routes by platform to the registered provider (activities/providers/) and
heartbeats while the provider's blocking calls run. Activity names and the payloads workflows
send are part of workflow history: the lifecycle's names predate the provider interface and are
kept as they were, and the payloads (a plan, a `KeyRef`, a `RemoveIdentity`) are turned here
into the `IdentityRef` the provider interface takes, so running workflows replay unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._support import heartbeating
from activities.providers.base import Provider, RotationProvider
from models.contracts import (
    DeleteIdentity,
    IdentityCreated,
    IdentityRef,
    KeyRef,
    ProvisionPlan,
    RemovalResult,
    RemoveIdentity,
    ScopeStatement,
    StagedKey,
)
from models.enums import NhiKind, Platform
from models.orm import Agent, Nhi
from nhi.infra.config import Settings
from nhi.rules.policy import secret_name

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


def identity_ref_of(nhi: Nhi, agent: Agent, settings: Settings) -> IdentityRef:
    """The identity an inventory NHI names on its platform (deterministic names: it may exist
    there whatever its status says)."""
    return IdentityRef(
        platform=Platform(nhi.platform),
        kind=NhiKind(nhi.kind),
        name=nhi.name,
        target=nhi.target,
        nhi_id=nhi.id,
        secret_name=secret_name(
            settings.secret_prefix, agent.environment, agent.name, nhi.id, nhi.delivery
        ),
        external_id=nhi.external_id,
    )


def plan_of(
    nhi: Nhi,
    agent: Agent,
    settings: Settings,
    max_session_duration: int,
    *,
    allow_task_credentials: bool = False,
) -> ProvisionPlan:
    """What creating or renewing an inventory NHI needs (derived, so retries see the same).
    Providers derive their tags from these fields themselves."""
    ref = identity_ref_of(nhi, agent, settings)
    task_principal = (
        settings.task_credential_principal
        if allow_task_credentials and ref.kind is NhiKind.IAM_ROLE
        else None
    )
    return ProvisionPlan(
        nhi_id=nhi.id,
        agent_id=agent.id,
        agent_name=agent.name,
        environment=agent.environment,
        owner_email=agent.owner_email,
        platform=ref.platform,
        kind=ref.kind,
        identity_name=ref.name,
        iam_path=settings.iam_path,
        secret_name=ref.secret_name,
        scope=[ScopeStatement.model_validate(s) for s in nhi.granted_scope],
        allowed_cidrs=list(nhi.allowed_cidrs),
        trust_principal=nhi.trust_principal,
        expires_at=nhi.expires_at,
        max_session_duration_seconds=max_session_duration,
        target=nhi.target,
        task_principal=task_principal,
    )


def rotation_of(provider: Provider) -> RotationProvider:
    """The provider's rotation interface; a non-retryable `NotRotatable` error when its
    platform has no credential to rotate."""
    if not isinstance(provider, RotationProvider):
        raise ApplicationError(
            f"the {provider.platform} provider rotates no credential",
            type="NotRotatable",
            non_retryable=True,
        )
    return provider


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

    def _rotate(self, platform: Platform, call: Callable[[RotationProvider], T]) -> T:
        rotation = rotation_of(self.provider(platform))
        with heartbeating():
            return call(rotation)

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
        return self._rotate(plan.platform, lambda p: p.stage_rotation(plan))

    @activity.defn
    def verify_pending(self, plan: ProvisionPlan) -> None:
        """Rotation step 2: prove the pending credential works as this identity."""
        self._rotate(plan.platform, lambda p: p.verify_pending(plan))

    @activity.defn
    def promote_pending(self, plan: ProvisionPlan) -> StagedKey:
        """Rotation step 3: the proven credential becomes current."""
        return self._rotate(plan.platform, lambda p: p.promote(plan))

    @activity.defn
    def deactivate_key(self, key: KeyRef) -> None:
        """After the overlap: the old credential stops working."""
        self._rotate(
            key.platform, lambda p: p.retire(IdentityRef.of_key(key), key.key_id, delete=False)
        )

    @activity.defn
    def delete_key(self, key: KeyRef) -> None:
        """After the second overlap: the old credential is removed."""
        self._rotate(
            key.platform, lambda p: p.retire(IdentityRef.of_key(key), key.key_id, delete=True)
        )

    @activity.defn
    def quarantine(self, plan: ProvisionPlan) -> list[str]:
        """Containment: nothing of the identity works any more, restorably."""
        return self._run(plan.platform, lambda p: p.disable(IdentityRef.of_plan(plan)))

    @activity.defn
    def verify_quarantine(self, plan: ProvisionPlan) -> None:
        """Prove the containment from the platform's own state."""
        self._run(plan.platform, lambda p: p.verify_disabled(IdentityRef.of_plan(plan)))

    @activity.defn
    def lift_quarantine(self, plan: ProvisionPlan) -> None:
        """Restore during the grace period."""
        self._run(plan.platform, lambda p: p.enable(IdentityRef.of_plan(plan)))

    # The same four steps on an `IdentityRef`, which is all they need: what today's workflows
    # call (patch `identity-ref-activities`); the plan-taking ones above stay registered for
    # runs recorded before it.
    @activity.defn
    def quarantine_identity(self, ref: IdentityRef) -> list[str]:
        """Containment: nothing of the identity works any more, restorably."""
        return self._run(ref.platform, lambda p: p.disable(ref))

    @activity.defn
    def verify_identity_quarantined(self, ref: IdentityRef) -> None:
        """Prove the containment from the platform's own state."""
        self._run(ref.platform, lambda p: p.verify_disabled(ref))

    @activity.defn
    def lift_identity_quarantine(self, ref: IdentityRef) -> None:
        """Restore during the grace period."""
        self._run(ref.platform, lambda p: p.enable(ref))

    @activity.defn
    def delete_identity(self, request: DeleteIdentity) -> RemovalResult:
        """Delete the identity, what is attached to it and its secret."""
        ref, force = request.ref, request.force_delete_secret
        return self._run(ref.platform, lambda p: p.delete(ref, force_delete_secret=force))

    @activity.defn
    def remove_identity(self, request: RemoveIdentity) -> RemovalResult:
        """Delete the identity, what is attached to it and its secret."""
        ref = IdentityRef.of_plan(request.plan)
        force = request.force_delete_secret
        return self._run(ref.platform, lambda p: p.delete(ref, force_delete_secret=force))
