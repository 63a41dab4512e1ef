"""Delivery into OpenBao/Vault: one KV v2 secret per NHI, staged like Secrets Manager's.

`delivery: vault_kv` NHIs have a secret name `vault-kv:<NHI_SECRET_PREFIX><env>/<agent>/<id>`
(`nhi.rules.policy.secret_name`); `SecretStore` hands such names to this store. The staging
protocol is the one rotation already speaks: each credential is a KV version, and the secret's
custom metadata holds the staging labels, `AWSCURRENT` / `AWSPENDING` / `AWSPREVIOUS` -> the
version number each points at, beside the marker tags. An agent reads the metadata, then the
version `AWSCURRENT` names (during a rotation's stage-verify-promote the newest version is the
pending one). Moving labels is one metadata write, so a promotion is atomic here.

Deleting is `DELETE <mount>/metadata/<path>`: every version and the metadata, with no recovery
window (KV has none), whether or not the removal asked for one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from activities.providers.secret_store import CURRENT, PENDING, PREVIOUS, STAGES, SecretValue
from activities.providers.vault_client import VaultClient
from nhi.rules.policy import VAULT_KV_PREFIX

_DESCRIPTION = "description"


def kv_path(name: str) -> str:
    """The KV path of a `vault-kv:` secret name."""
    return name.removeprefix(VAULT_KV_PREFIX).strip("/")


class VaultKvStore:
    """What `SecretStore` does for Secrets Manager, on a KV v2 mount."""

    def __init__(self, client: VaultClient, mount: str) -> None:
        self._client = client
        self._mount = mount.strip("/")

    def ref(self, name: str) -> str:
        """The reference an NHI's row and the agent get: `vault-kv://<mount>/<path>`."""
        return f"{VAULT_KV_PREFIX}//{self._mount}/{kv_path(name)}"

    def _meta_path(self, name: str) -> str:
        return f"{self._mount}/metadata/{kv_path(name)}"

    def _data_path(self, name: str) -> str:
        return f"{self._mount}/data/{kv_path(name)}"

    def _labels(self, name: str) -> dict[str, str] | None:
        meta = self._client.read(self._meta_path(name), doing=f"reading metadata of {name}")
        if meta is None:
            return None
        return {str(k): str(v) for k, v in (meta.get("custom_metadata") or {}).items()}

    def _put_labels(self, name: str, labels: Mapping[str, str]) -> None:
        self._client.write(
            self._meta_path(name),
            {"custom_metadata": dict(labels)},
            doing=f"labelling versions of {name}",
        )

    def _write(self, name: str, value: Mapping[str, Any]) -> str:
        data = self._client.write(
            self._data_path(name), {"data": dict(value)}, doing=f"writing {name}"
        )
        return str(data["version"])

    # ---- SecretStore's methods ---------------------------------------------------------------

    def arn(self, name: str) -> str | None:
        """The reference, or None when no such secret exists."""
        return None if self._labels(name) is None else self.ref(name)

    def scheduled_for_deletion(self, name: str) -> bool:
        """KV has no recovery window: a deleted secret is simply gone."""
        del name
        return False

    def put_current(
        self, name: str, value: Mapping[str, Any], *, tags: Mapping[str, str], description: str
    ) -> str:
        """A new version labelled AWSCURRENT (the one it replaces becomes AWSPREVIOUS); the
        marker tags are written with the first version."""
        labels = self._labels(name)
        version = self._write(name, value)
        if labels is None:
            labels = {**tags, _DESCRIPTION: description[:512]}
        old = labels.get(CURRENT)
        if old is not None and old != version:
            labels[PREVIOUS] = old
        labels[CURRENT] = version
        self._put_labels(name, labels)
        return self.ref(name)

    def read(self, name: str, stage: str = CURRENT) -> SecretValue | None:
        """The value under `stage`, or None when the secret, the label or its version is gone."""
        labels = self._labels(name) or {}
        version = labels.get(stage)
        if version is None:
            return None
        answer = self._client.call(
            "GET",
            self._data_path(name),
            params={"version": version},
            doing=f"reading {stage} of {name}",
            missing_ok=True,
        )
        data = ((answer or {}).get("data") or {}).get("data")
        return SecretValue(data) if isinstance(data, dict) else None

    def put_pending(self, name: str, value: Mapping[str, Any]) -> None:
        """A new version labelled AWSPENDING."""
        labels = self._labels(name) or {}
        labels[PENDING] = self._write(name, value)
        self._put_labels(name, labels)

    def stage_versions(self, name: str) -> dict[str, str]:
        """The version each staging label points at."""
        labels = self._labels(name) or {}
        return {stage: labels[stage] for stage in STAGES if stage in labels}

    def stage_values(self, name: str) -> dict[str, SecretValue]:
        """The value under each staging label present."""
        out: dict[str, SecretValue] = {}
        for stage in STAGES:
            value = self.read(name, stage)
            if value is not None:
                out[stage] = value
        return out

    def promote_pending(self, name: str) -> bool:
        """AWSPENDING becomes AWSCURRENT, the old current AWSPREVIOUS, in one metadata write."""
        labels = self._labels(name) or {}
        pending = labels.pop(PENDING, None)
        if pending is None:
            return False
        current = labels.get(CURRENT)
        if current is not None and current != pending:
            labels[PREVIOUS] = current
        labels[CURRENT] = pending
        self._put_labels(name, labels)
        return True

    def delete(self, name: str, *, force: bool) -> bool:
        """Delete every version and the metadata; whether there was a secret to delete."""
        del force  # no recovery window in KV
        if self._labels(name) is None:
            return False
        self._client.delete(self._meta_path(name), doing=f"deleting {name}")
        return True
