"""Staged secrets in Secrets Manager: the delivery secret of any platform's credential.

A credential is a JSON object held under the staging labels Secrets Manager's own rotation uses:
AWSCURRENT (what the agent reads), AWSPENDING (a rotation's new credential, until proven and
promoted) and AWSPREVIOUS (the one before, kept for the overlap). Every read names its stage:
moto, unlike AWS, keeps serving the pre-rotation version to reads that name none.

A name starting `vault-kv:` (`delivery: vault_kv`) is handed to the KV v2 store given at
construction (activities/providers/vault_kv.py), which keeps the same labels in the secret's
custom metadata; every other name is Secrets Manager's, exactly as before.

Values are returned as `SecretValue`, whose repr shows the keys only, so a credential never
reaches a log line or a traceback through this module. Errors other than "not found" propagate
as botocore `ClientError`s for the caller to classify.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from botocore.exceptions import ClientError
from temporalio.exceptions import ApplicationError

from activities._support import aws_code
from nhi.rules.policy import VAULT_KV_PREFIX

if TYPE_CHECKING:
    from types_boto3_secretsmanager import SecretsManagerClient

PENDING, CURRENT, PREVIOUS = "AWSPENDING", "AWSCURRENT", "AWSPREVIOUS"
STAGES = (PENDING, CURRENT, PREVIOUS)
_NOT_FOUND = frozenset({"ResourceNotFoundException"})


class SecretValue(dict[str, Any]):
    """A decoded secret whose repr and str never show the values."""

    def __repr__(self) -> str:
        return f"SecretValue(keys={sorted(self)})"

    __str__ = __repr__


def _encode(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), separators=(",", ":"), sort_keys=True)


class DeliveryStore(Protocol):
    """Another place credentials can be delivered to, with the same staging protocol."""

    def arn(self, name: str) -> str | None: ...
    def scheduled_for_deletion(self, name: str) -> bool: ...
    def put_current(
        self, name: str, value: Mapping[str, Any], *, tags: Mapping[str, str], description: str
    ) -> str: ...
    def read(self, name: str, stage: str = ...) -> SecretValue | None: ...
    def put_pending(self, name: str, value: Mapping[str, Any]) -> None: ...
    def stage_versions(self, name: str) -> dict[str, str]: ...
    def stage_values(self, name: str) -> dict[str, SecretValue]: ...
    def promote_pending(self, name: str) -> bool: ...
    def delete(self, name: str, *, force: bool) -> bool: ...


# The process's KV store for `vault-kv:` names, set where the providers are built
# (registry.build_providers): every SecretStore a provider or activity makes finds it without
# each constructor being threaded through.
_delivery_store: DeliveryStore | None = None


def use_delivery_store(store: DeliveryStore | None) -> None:
    """Make `store` serve `vault-kv:` names for every SecretStore without its own."""
    global _delivery_store
    _delivery_store = store


class SecretStore:
    """Create, stage, promote, read and delete one JSON secret per identity."""

    def __init__(self, client: SecretsManagerClient, kv: DeliveryStore | None = None) -> None:
        self._client = client
        self._own_kv = kv

    @property
    def _kv(self) -> DeliveryStore | None:
        return self._own_kv or _delivery_store

    def _other(self, name: str) -> DeliveryStore | None:
        """The KV store for a `vault-kv:` name (refused when this worker has no Vault)."""
        if not name.startswith(VAULT_KV_PREFIX):
            return None
        if self._kv is None:
            raise ApplicationError(
                f"{name} is delivered into Vault, and this worker has no NHI_VAULT_ADDR",
                type="NoVault",
                non_retryable=True,
            )
        return self._kv

    def arn(self, name: str) -> str | None:
        """The secret's ARN, or None when no such secret exists (scheduled ones included)."""
        if (kv := self._other(name)) is not None:
            return kv.arn(name)
        try:
            return str(self._client.describe_secret(SecretId=name)["ARN"])
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return None
            raise

    def scheduled_for_deletion(self, name: str) -> bool:
        """Whether the secret exists but waits out its recovery window."""
        if (kv := self._other(name)) is not None:
            return kv.scheduled_for_deletion(name)
        try:
            return "DeletedDate" in self._client.describe_secret(SecretId=name)
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return False
            raise

    def put_current(
        self,
        name: str,
        value: Mapping[str, Any],
        *,
        tags: Mapping[str, str],
        description: str = "",
    ) -> str:
        """Create the secret holding `value`, or store `value` as its new AWSCURRENT version
        (the one it replaces becomes AWSPREVIOUS). Returns the ARN."""
        if (kv := self._other(name)) is not None:
            return kv.put_current(name, value, tags=tags, description=description)
        text = _encode(value)
        try:
            return str(
                self._client.create_secret(
                    Name=name,
                    Description=description,
                    SecretString=text,
                    Tags=[{"Key": k, "Value": v} for k, v in sorted(tags.items())],
                )["ARN"]
            )
        except ClientError as err:
            if aws_code(err) != "ResourceExistsException":
                raise
        self._client.put_secret_value(SecretId=name, SecretString=text, VersionStages=[CURRENT])
        return str(self._client.describe_secret(SecretId=name)["ARN"])

    def read(self, name: str, stage: str = CURRENT) -> SecretValue | None:
        """The value under `stage`, or None when the secret or the stage does not exist."""
        if (kv := self._other(name)) is not None:
            return kv.read(name, stage)
        try:
            text = self._client.get_secret_value(SecretId=name, VersionStage=stage)["SecretString"]
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return None
            raise
        return SecretValue(json.loads(text))

    def put_pending(self, name: str, value: Mapping[str, Any]) -> None:
        """Store `value` as AWSPENDING (moving the label off any earlier pending version)."""
        if (kv := self._other(name)) is not None:
            kv.put_pending(name, value)
            return
        self._client.put_secret_value(
            SecretId=name, SecretString=_encode(value), VersionStages=[PENDING]
        )

    def stage_versions(self, name: str) -> dict[str, str]:
        """The version id each staging label points at (missing labels are absent)."""
        if (kv := self._other(name)) is not None:
            return kv.stage_versions(name)
        versions = self._client.list_secret_version_ids(SecretId=name)["Versions"]
        return {
            stage: v["VersionId"]
            for v in versions
            for stage in v.get("VersionStages", [])
            if stage in STAGES
        }

    def stage_values(self, name: str) -> dict[str, SecretValue]:
        """The value under each staging label present (empty when the secret is missing)."""
        if (kv := self._other(name)) is not None:
            return kv.stage_values(name)
        out: dict[str, SecretValue] = {}
        for stage in STAGES:
            value = self.read(name, stage)
            if value is not None:
                out[stage] = value
        return out

    def promote_pending(self, name: str) -> bool:
        """Make AWSPENDING the AWSCURRENT version (the old current becomes AWSPREVIOUS), then
        drop the AWSPENDING label. Returns False when there was nothing pending to promote.

        Safe to repeat: a run interrupted between the two label moves finishes the second.
        """
        if (kv := self._other(name)) is not None:
            return kv.promote_pending(name)
        by_stage = self.stage_versions(name)
        pending = by_stage.get(PENDING)
        if pending is None:
            return False
        current = by_stage.get(CURRENT)
        if current != pending:
            if current is None:
                self._client.update_secret_version_stage(
                    SecretId=name, VersionStage=CURRENT, MoveToVersionId=pending
                )
            else:
                self._client.update_secret_version_stage(
                    SecretId=name,
                    VersionStage=CURRENT,
                    MoveToVersionId=pending,
                    RemoveFromVersionId=current,
                )
        self._client.update_secret_version_stage(
            SecretId=name, VersionStage=PENDING, RemoveFromVersionId=pending
        )
        return True

    def find_by_tag(self, key: str, value: str) -> str | None:
        """The ARN of a secret tagged `key=value`, if any."""
        found = self._client.list_secrets(
            Filters=[{"Key": "tag-key", "Values": [key]}, {"Key": "tag-value", "Values": [value]}]
        )["SecretList"]
        # The two filters match independently (any key, any value); check the pair itself.
        for secret in found:
            tags = {t.get("Key"): t.get("Value") for t in secret.get("Tags", [])}
            if tags.get(key) == value:
                return str(secret["ARN"])
        return None

    def delete(self, name: str, *, force: bool) -> bool:
        """Delete the secret, without recovery (`force`) or with a 7-day window. Returns
        whether there was a secret to delete; one already scheduled counts as done unless
        `force` asks to finish it now."""
        if (kv := self._other(name)) is not None:
            return kv.delete(name, force=force)
        if not name:
            return False
        # Secrets Manager reports success for a forced delete of a missing secret, so look
        # first: a removal report must say what was really there.
        try:
            described = self._client.describe_secret(SecretId=name)
            if "DeletedDate" in described and not force:
                return False
            if force:
                self._client.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
            else:
                self._client.delete_secret(SecretId=name, RecoveryWindowInDays=7)
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return False
            raise
        return True
