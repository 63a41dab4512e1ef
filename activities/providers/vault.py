"""The OpenBao/Vault provider: `vault_approle` NHIs.

Shape of one NHI (names `NHI_NAME_PREFIX-<agent>-<id>`, like IAM's):

* an ACL policy named like the role, written from the scope (activities/providers/vault_acl.py),
  whose comment lines carry the marker (AppRole roles hold no metadata);
* an AppRole role at `auth/<NHI_VAULT_APPROLE_MOUNT>/role/<name>` whose tokens get that policy
  only (`token_no_default_policy`), bound to the NHI's allowed CIDRs (`secret_id_bound_cidrs`,
  `token_bound_cidrs`) and with every secret id's TTL ending at the NHI's expiry, so Vault
  itself refuses logins after it even if this service is down;
* the credential: `{role_id, secret_id, secret_id_accessor, auth_mount, addr}` delivered by
  reference through `SecretStore` (Secrets Manager, or a KV v2 path for `delivery: vault_kv`).

Rotation issues a second secret id (both valid during the overlap), stages it as the pending
version, proves it logs in, promotes it; the old one is destroyed by accessor after the
overlap (`secret-id-accessor/destroy`: a secret id cannot be suspended, so deactivating and
deleting it are the same act). Renewal re-issues the current secret id when it would lapse
before the new expiry (a secret id's TTL is fixed when issued); the old one lapses by itself.

Containment changes the role id (logins with the delivered one fail) and suspends the policy
(tokens already issued lose every capability); restoring puts both back. Removal does both,
deletes the role (with its secret ids) and the policy, proves both gone with fresh reads and
that no delivered credential logs in, then deletes the delivered secret.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import ClassVar

from temporalio.exceptions import ApplicationError

from activities.providers import vault_acl as acl
from activities.providers.base import (
    Discovery,
    Known,
    Pace,
    expires_tag,
    marker_tags,
)
from activities.providers.secret_store import CURRENT, PENDING, PREVIOUS, SecretStore, SecretValue
from activities.providers.vault_client import VaultClient
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
from nhi.rules.policy import PolicyRules, RuleViolation, validate_vault_scope

log = logging.getLogger(__name__)

_STRUCTURE_ONLY = PolicyRules(
    label="provider",
    allowed=True,
    default_ttl_seconds=1,
    max_lifetime_seconds=1,
    allow_resource_wildcard=True,
)
TOKEN_TTL_SECONDS = 3600  # a login's token; the policy, not the token, carries the expiry
RENEW_SLACK = timedelta(minutes=1)
CREATED_AT = "nhi:created-at"
# Where the credential was delivered: a sweep removes it with an orphan.
DELIVERED_TO = "nhi:delivered-to"
NHI_ID = "nhi:nhi-id"


def fail(message: str, kind: str, *, retryable: bool = False) -> ApplicationError:
    """A provider refusal typed like the platform's own errors."""
    return ApplicationError(message, type=kind, non_retryable=not retryable)


def _seconds_until(at: datetime) -> int:
    return max(1, int((at - datetime.now(UTC)).total_seconds()))


class VaultProvider:
    """AppRole role + ACL policy per NHI; secret ids delivered by reference."""

    platform: ClassVar[Platform] = Platform.VAULT
    name_separator: ClassVar[str] = "-"

    def __init__(
        self, client: VaultClient, store: SecretStore, *, mount: str, name_prefix: str = "nhi"
    ) -> None:
        self._vault = client
        self._store = store
        self._mount = mount.strip("/")
        self._prefix = f"{name_prefix}{self.name_separator}"

    # ---- plumbing --------------------------------------------------------------------------

    def _name(self, name: str) -> str:
        if not name.startswith(self._prefix) or not all(c.isalnum() or c in "-_" for c in name):
            raise fail(f"{name!r} is not a role name this service makes", "InvalidPlan")
        return name

    def _role(self, name: str) -> str:
        return f"auth/{self._mount}/role/{self._name(name)}"

    def _policy_path(self, name: str) -> str:
        return f"sys/policies/acl/{self._name(name)}"

    def _checked(self, plan: ProvisionPlan) -> str:
        try:
            validate_vault_scope(plan.scope, _STRUCTURE_ONLY)
        except RuleViolation as err:
            raise fail(f"scope refused: {err}", "InvalidScope") from None
        return self._name(plan.identity_name)

    def _policy(self, name: str) -> tuple[str, acl.ReadPolicy] | None:
        data = self._vault.read(self._policy_path(name), doing=f"reading policy {name}")
        if data is None:
            return None
        text = str(data.get("policy") or "")
        return text, acl.parse(text)

    def _ours(self, name: str, nhi_id: object) -> acl.ReadPolicy | None:
        """The role's policy if it exists; refused when it is not this NHI's."""
        found = self._policy(name)
        if found is None:
            return None
        policy = found[1]
        if policy.marks.get("managed-by") != MANAGED_BY or policy.marks.get(NHI_ID) != str(nhi_id):
            raise fail(f"policy {name} exists but is not this NHI's", "IdentityConflict")
        return policy

    def _role_exists(self, name: str) -> bool:
        return self._vault.read(self._role(name), doing=f"reading role {name}") is not None

    def _role_id(self, name: str) -> str | None:
        data = self._vault.read(f"{self._role(name)}/role-id", doing=f"reading role id of {name}")
        return None if data is None else str(data.get("role_id") or "") or None

    def _external_id(self, name: str) -> str:
        return f"{self._vault.addr}/v1/{self._role(name)}"

    def _write_role(self, plan: ProvisionPlan, name: str) -> None:
        cidrs = list(plan.allowed_cidrs)
        ttl = _seconds_until(plan.expires_at)
        self._vault.write(
            self._role(name),
            {
                "token_policies": [name],
                "token_no_default_policy": True,
                "token_ttl": min(TOKEN_TTL_SECONDS, ttl),
                "token_max_ttl": min(TOKEN_TTL_SECONDS, ttl),
                "secret_id_ttl": ttl,
                "secret_id_num_uses": 0,
                "bind_secret_id": True,
                "secret_id_bound_cidrs": cidrs,
                "token_bound_cidrs": cidrs,
            },
            doing=f"writing role {name}",
        )

    def _marks(self, plan: ProvisionPlan, created_at: str | None) -> dict[str, str]:
        return {
            **marker_tags(plan),
            CREATED_AT: created_at or expires_tag(datetime.now(UTC)),
            DELIVERED_TO: plan.secret_name,
        }

    def _write_policy(self, plan: ProvisionPlan, name: str, *, suspended: bool) -> None:
        found = self._policy(name)
        created = found[1].marks.get(CREATED_AT) if found else None
        text = acl.render(plan.scope, self._marks(plan, created), suspended=suspended)
        self._vault.write(self._policy_path(name), {"policy": text}, doing=f"writing policy {name}")

    def _stages(self, secret_name: str) -> dict[str, SecretValue]:
        # A secret already scheduled for deletion was proven dead by the removal that did it
        # (and cannot be read any more).
        if not secret_name or self._store.scheduled_for_deletion(secret_name):
            return {}
        return self._store.stage_values(secret_name)

    def _issue(self, plan: ProvisionPlan, name: str, role_id: str) -> SecretValue:
        data = self._vault.write(
            f"{self._role(name)}/secret-id",
            {
                "metadata": f'{{"nhi_id": "{plan.nhi_id}"}}',
                "ttl": _seconds_until(plan.expires_at),
                "cidr_list": list(plan.allowed_cidrs),
                "token_bound_cidrs": list(plan.allowed_cidrs),
            },
            doing=f"issuing a secret id for {name}",
        )
        return SecretValue(
            role_id=role_id,
            secret_id=str(data["secret_id"]),
            secret_id_accessor=str(data["secret_id_accessor"]),
            auth_mount=self._mount,
            addr=self._vault.addr,
        )

    def _expires(self, name: str, value: Mapping[str, object]) -> datetime | None:
        """When a secret id lapses (None: it is unknown to the role, i.e. not valid)."""
        data = self._vault.write(
            f"{self._role(name)}/secret-id/lookup",
            {"secret_id": str(value.get("secret_id", ""))},
            doing=f"looking up a secret id of {name}",
        )
        if not data:
            return None
        raw = str(data.get("expiration_time") or "")
        if not raw or raw.startswith("0001-"):
            return datetime.max.replace(tzinfo=UTC)
        at = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        return at if at > datetime.now(UTC) else None

    def _works(self, name: str, value: Mapping[str, object], cidrs: list[str]) -> bool:
        """The credential belongs to this role and is valid; where no CIDR binds it, a real
        login proves it (the login's token is revoked at once)."""
        if value.get("role_id") != self._role_id(name) or self._expires(name, value) is None:
            return False
        if cidrs:
            return True  # this service may stand outside the agent's CIDRs: the lookup is proof
        token = self._vault.login(
            self._mount, str(value["role_id"]), str(value.get("secret_id", ""))
        )
        if token is None:
            return False
        self._vault.revoke_self(token)
        return True

    def _logs_in(self, value: Mapping[str, object]) -> bool:
        token = self._vault.login(
            self._mount, str(value.get("role_id", "")), str(value.get("secret_id", ""))
        )
        if token is not None:
            self._vault.revoke_self(token)
        return token is not None

    def _destroy_others(self, name: str, keep: set[str]) -> list[str]:
        """Destroy the role's secret ids no staging label holds (nobody can have them)."""
        listed = self._vault.list(f"{self._role(name)}/secret-id", doing=f"listing {name}")
        gone = [a for a in listed if a not in keep]
        for accessor in gone:
            self._destroy(name, accessor)
        return gone

    def _destroy(self, name: str, accessor: str) -> None:
        # Destroying a missing accessor answers 500: look first, gone counts as done.
        found = self._vault.call(
            "POST",
            f"{self._role(name)}/secret-id-accessor/lookup",
            body={"secret_id_accessor": accessor},
            doing=f"looking up secret id {accessor} of {name}",
            missing_ok=True,
        )
        if found is None:
            return
        self._vault.write(
            f"{self._role(name)}/secret-id-accessor/destroy",
            {"secret_id_accessor": accessor},
            doing=f"destroying secret id {accessor} of {name}",
        )

    def _held(self, stages: Mapping[str, SecretValue]) -> set[str]:
        return {str(v.get("secret_id_accessor")) for v in stages.values()}

    # ---- provisioning ----------------------------------------------------------------------

    def create(self, plan: ProvisionPlan) -> IdentityCreated:
        """The policy from the scope, then the role (no secret id yet)."""
        name = self._checked(plan)
        policy = self._ours(name, plan.nhi_id)
        if policy is None and self._role_exists(name):
            raise fail(f"role {name} exists but is not this NHI's", "IdentityConflict")
        self._write_policy(plan, name, suspended=False)
        self._write_role(plan, name)
        return IdentityCreated(external_id=self._external_id(name), credential_ref="")

    def deliver(self, plan: ProvisionPlan) -> IdentityCreated:
        """A secret id into the secret store with the role id; a retry reuses a delivered
        one that still works, and destroys any secret id a crash left that nobody holds."""
        name = self._checked(plan)
        if self._ours(name, plan.nhi_id) is None:
            raise fail(f"policy {name} is missing", "IdentityMissing", retryable=True)
        role_id = self._role_id(name)
        if role_id is None:
            raise fail(f"role {name} is missing", "IdentityMissing", retryable=True)
        stages = self._stages(plan.secret_name)
        current = stages.get(CURRENT)
        if current is not None and self._works(name, current, list(plan.allowed_cidrs)):
            return IdentityCreated(
                external_id=self._external_id(name), credential_ref=self._ref(plan)
            )
        self._destroy_others(name, self._held(stages))
        value = self._issue(plan, name, role_id)
        ref = self._store.put_current(
            plan.secret_name,
            value,
            tags=marker_tags(plan),
            description=f"Vault AppRole credential of NHI {plan.nhi_id}",
        )
        if not self._works(name, value, list(plan.allowed_cidrs)):
            raise fail(
                f"the delivered secret id of {name} does not work yet",
                "NotYetValid",
                retryable=True,
            )
        del value
        log.info("nhi %s: AppRole secret id delivered to %s", plan.nhi_id, ref)
        return IdentityCreated(external_id=self._external_id(name), credential_ref=ref)

    def _ref(self, plan: ProvisionPlan) -> str:
        ref = self._store.arn(plan.secret_name)
        if ref is None:
            raise fail(f"secret {plan.secret_name} vanished", "SecretMissing", retryable=True)
        return ref

    def renew(self, plan: ProvisionPlan) -> None:
        """Re-apply the policy (kept suspended while contained) and the role's TTLs and
        CIDRs; re-issue the current secret id if it would lapse before the new expiry."""
        name = self._checked(plan)
        policy = self._ours(name, plan.nhi_id)
        if policy is None or not self._role_exists(name):
            raise fail(f"role {name} is missing", "IdentityMissing")
        self._write_policy(plan, name, suspended=policy.suspended)
        self._write_role(plan, name)
        current = self._stages(plan.secret_name).get(CURRENT)
        if current is None:
            return
        lapses = self._expires(name, current)
        # TTLs are whole seconds counted from the issue: a minute's slack, not a re-issue.
        if lapses is not None and lapses >= plan.expires_at - RENEW_SLACK:
            return
        role_id = str(current.get("role_id"))  # the delivered one, even while contained
        value = self._issue(plan, name, role_id)
        self._store.put_current(plan.secret_name, value, tags=marker_tags(plan), description="")
        log.info("nhi %s: secret id re-issued to reach the renewed expiry", plan.nhi_id)

    # ---- rotation --------------------------------------------------------------------------

    def stage_rotation(self, plan: ProvisionPlan) -> StagedKey:
        """A second secret id as AWSPENDING; both work until the old one is retired. Any
        other secret id (a previous one still in its overlap) is destroyed first, so an NHI
        never has more than the current and the new one. A working pending one is reused."""
        name = self._checked(plan)
        stages = self._stages(plan.secret_name)
        current = stages.get(CURRENT)
        if current is None:
            raise fail(f"secret {plan.secret_name} holds no current credential", "NothingToRotate")
        old = str(current.get("secret_id_accessor"))
        pending = stages.get(PENDING)
        cidrs = list(plan.allowed_cidrs)
        if pending is not None and self._works(name, pending, cidrs):
            return StagedKey(new_key_id=str(pending.get("secret_id_accessor")), old_key_id=old)
        role_id = self._role_id(name)
        if role_id is None or role_id != current.get("role_id"):
            raise fail(f"role {name} is missing or contained", "IdentityMissing", retryable=True)
        self._destroy_others(name, {old})
        value = self._issue(plan, name, role_id)
        new = str(value["secret_id_accessor"])
        self._store.put_pending(plan.secret_name, value)
        del value
        return StagedKey(new_key_id=new, old_key_id=old)

    def verify_pending(self, plan: ProvisionPlan) -> None:
        """The pending secret id logs in with this role's id (or, CIDR-bound, is valid)."""
        name = self._checked(plan)
        pending = self._stages(plan.secret_name).get(PENDING)
        if pending is None:
            raise fail(f"secret {plan.secret_name} holds no pending credential", "NothingPending")
        if not self._works(name, pending, list(plan.allowed_cidrs)):
            raise fail(
                f"the pending secret id of {name} does not log in", "NotYetValid", retryable=True
            )

    def promote(self, plan: ProvisionPlan) -> StagedKey:
        """AWSPENDING becomes AWSCURRENT (the old one AWSPREVIOUS); repeat-safe."""
        self._checked(plan)
        stages = self._stages(plan.secret_name)
        current, pending = stages.get(CURRENT), stages.get(PENDING)

        def accessor(value: SecretValue | None) -> str | None:
            return str(value["secret_id_accessor"]) if value else None

        if pending is None:
            if current is None:
                raise fail(f"secret {plan.secret_name} holds nothing to promote", "NothingPending")
            return StagedKey(
                new_key_id=str(accessor(current)), old_key_id=accessor(stages.get(PREVIOUS))
            )
        new = accessor(pending)
        old = accessor(stages.get(PREVIOUS)) if accessor(current) == new else accessor(current)
        self._store.promote_pending(plan.secret_name)
        return StagedKey(new_key_id=str(new), old_key_id=old)

    def retire(self, ref: IdentityRef, key_id: str, *, delete: bool) -> None:
        """Destroy the old secret id `key_id` (an accessor); gone counts as done."""
        del delete  # a secret id cannot be suspended: both steps destroy it
        name = self._name(ref.name)
        if not self._role_exists(name):
            return
        self._destroy(name, key_id)
        log.info("secret id %s of %s destroyed", key_id, name)

    # ---- containment -----------------------------------------------------------------------

    def disable(self, ref: IdentityRef) -> list[str]:
        """A new role id (the delivered one no longer logs in) and the policy suspended
        (tokens already issued lose every capability). Gone counts as done."""
        name = self._name(ref.name)
        found = self._policy(name)
        done: list[str] = []
        if found is not None:
            text, policy = found
            if policy.marks.get(NHI_ID) != str(ref.nhi_id):
                raise fail(f"policy {name} is not this NHI's", "IdentityConflict")
            if not policy.suspended:
                self._vault.write(
                    self._policy_path(name),
                    {"policy": acl.suspend(text)},
                    doing=f"suspending policy {name}",
                )
                done.append(f"policy {name} suspended")
        if self._role_exists(name):
            delivered = {str(v.get("role_id")) for v in self._stages(ref.secret_name).values()}
            if self._role_id(name) in delivered or not delivered:
                self._vault.write(
                    f"{self._role(name)}/role-id",
                    {"role_id": f"contained-{secrets.token_hex(16)}"},
                    doing=f"changing the role id of {name}",
                )
                done.append(f"role {name}: role id changed")
        return done or ["already gone"]

    def verify_disabled(self, ref: IdentityRef) -> None:
        """From fresh reads: the policy grants nothing and no delivered credential logs in."""
        name = self._name(ref.name)
        found = self._policy(name)
        if found is not None and found[1].granted:
            raise fail(
                f"policy {name} still grants {sorted(found[1].granted)}",
                "NotQuarantined",
                retryable=True,
            )
        for stage, value in self._stages(ref.secret_name).items():
            if self._logs_in(value):
                raise fail(
                    f"the {stage} credential of {name} still logs in",
                    "NotQuarantined",
                    retryable=True,
                )
        role_id = self._role_id(name) if self._role_exists(name) else None
        if role_id is not None and role_id in {
            str(v.get("role_id")) for v in self._stages(ref.secret_name).values()
        }:
            raise fail(
                f"role {name} still has its delivered role id", "NotQuarantined", retryable=True
            )

    def enable(self, ref: IdentityRef) -> None:
        """The delivered role id back, and the policy's grant restored."""
        name = self._name(ref.name)
        current = self._stages(ref.secret_name).get(CURRENT)
        if current is None:
            raise fail(f"no delivered credential of {name} to restore", "NothingToEnable")
        found = self._policy(name)
        if found is None or not self._role_exists(name):
            raise fail(f"role {name} does not exist", "IdentityMissing")
        text, policy = found
        if policy.marks.get(NHI_ID) != str(ref.nhi_id):
            raise fail(f"policy {name} is not this NHI's", "IdentityConflict")
        self._vault.write(
            f"{self._role(name)}/role-id",
            {"role_id": str(current["role_id"])},
            doing=f"restoring the role id of {name}",
        )
        if policy.suspended:
            self._vault.write(
                self._policy_path(name), {"policy": acl.restore(text)}, doing=f"restoring {name}"
            )

    # ---- removal ---------------------------------------------------------------------------

    def delete(self, ref: IdentityRef, *, force_delete_secret: bool = False) -> RemovalResult:
        """Contain, delete the role (its secret ids with it) and the policy, prove both gone
        and that no delivered credential logs in, then delete the delivered secret."""
        name = self._name(ref.name)
        found = self._policy(name)
        if found is not None and found[1].marks.get(NHI_ID) != str(ref.nhi_id):
            raise fail(f"policy {name} is not this NHI's", "IdentityConflict")
        removed: list[str] = []
        if found is not None or self._role_exists(name):
            self.disable(ref)  # as locked as quarantine until gone
        if self._role_exists(name):
            self._vault.delete(self._role(name), doing=f"deleting role {name}")
            removed.append(f"role {name}")
        if found is not None:
            self._vault.delete(self._policy_path(name), doing=f"deleting policy {name}")
            removed.append(f"policy {name}")
        if self._role_exists(name) or self._policy(name) is not None:
            raise fail(
                f"role or policy {name} still exists after deletion", "NotRemoved", retryable=True
            )
        for stage, value in self._stages(ref.secret_name).items():
            if self._logs_in(value):
                raise fail(
                    f"the {stage} credential of {name} still logs in", "NotRemoved", retryable=True
                )
        if ref.secret_name and self._store.delete(ref.secret_name, force=force_delete_secret):
            removed.append(f"secret {ref.secret_name}")
        log.info("nhi %s removed from Vault: %s", ref.nhi_id, removed)
        return RemovalResult(removed=removed)

    # ---- discovery -------------------------------------------------------------------------

    def discover(self, known: Mapping[str, Known], pace: Pace) -> Discovery:
        """Every role under our mount and prefix; its policy's marker says whose it is, and
        for an active NHI the policy and CIDRs are compared with the grant."""
        pace()
        names = self._vault.list(f"auth/{self._mount}/role", doing="listing AppRole roles")
        found: list[PlatformIdentity] = []
        for name in sorted(n for n in names if n.startswith(self._prefix)):
            pace()
            policy = self._policy(name)
            marks = policy[1].marks if policy else {}
            created = marks.get(CREATED_AT)
            item = known.get(name)
            found.append(
                PlatformIdentity(
                    name=name,
                    kind=NhiKind.VAULT_APPROLE.value,
                    created_at=(
                        datetime.fromisoformat(created.replace("Z", "+00:00"))
                        if created
                        else datetime.now(UTC)
                    ),
                    managed=marks.get("managed-by") == MANAGED_BY,
                    nhi_id=marks.get(NHI_ID),
                    secret_arn=marks.get(DELIVERED_TO) or None,
                    drift=self._drift(name, policy[1] if policy else None, item),
                )
            )
        return Discovery(identities=found)

    def _drift(self, name: str, policy: acl.ReadPolicy | None, item: Known | None) -> str | None:
        if item is None or item.status != "active" or policy is None:
            return None
        want = acl.grants(ScopeStatement.model_validate(s) for s in item.scope)
        if policy.granted != want:
            return f"policy {name} grants {policy.granted}, not {want}"
        role = self._vault.read(self._role(name), doing=f"reading role {name}") or {}
        bound = sorted(role.get("token_bound_cidrs") or [])
        if bound != sorted(item.allowed_cidrs):
            return f"role {name} binds tokens to {bound}, not {sorted(item.allowed_cidrs)}"
        return None

    def last_used(self, kind: NhiKind, name: str, target: str | None) -> datetime | None:
        """Vault does not say when a role last logged in (audit devices do): unknown."""
        del kind, name, target
        return None
