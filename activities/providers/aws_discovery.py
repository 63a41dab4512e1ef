"""What a sweep asks of AWS: every identity under this deployment's IAM path, with its tags,
usage and scope drift fetched only where the sweep needs them (the discovery half of
AwsProvider)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from temporalio.exceptions import ApplicationError

from activities._support import aws_code
from activities.providers.aws_iam import SCOPE_POLICY_NAME, SHAPES
from activities.providers.base import NHI_ID_TAG, Discovery, Known, Pace
from activities.providers.secret_store import SecretStore
from models.enums import NhiKind
from nhi import MANAGED_BY
from nhi.rules.findings import PlatformIdentity
from nhi.rules.policy import identity_policy_document

if TYPE_CHECKING:
    from types_boto3_iam import IAMClient


class AwsDiscovery:
    """What a sweep asks of AWS: every identity under our IAM path, with details where needed."""

    _iam: IAMClient
    _store: SecretStore
    _iam_path: str

    def _paged(self, operation: str, key: str, pace: Pace) -> list[dict[str, Any]]:
        """Every page of a listing. Any error (throttling past botocore's retries included)
        propagates: a listing that ends early must never read as "nothing there"."""
        out: list[dict[str, Any]] = []
        paginator = self._iam.get_paginator(operation)  # type: ignore[call-overload]
        for page in paginator.paginate(PathPrefix=self._iam_path):
            pace()
            if page.get("IsTruncated") and not page.get("Marker"):
                raise ApplicationError(
                    f"{operation}: truncated page without a marker", type="ListingIncomplete"
                )
            out += page[key]
        return out

    def _tags_of(self, kind: NhiKind, name: str) -> dict[str, str]:
        shape = SHAPES[kind]
        listing: Any = getattr(self._iam, shape.op("list_{}_tags"))
        return {t["Key"]: t["Value"] for t in listing(**{shape.param: name})["Tags"]}

    def _document(self, kind: NhiKind, name: str) -> dict[str, Any]:
        """The scope policy IAM holds ({} when there is none)."""
        shape = SHAPES[kind]
        read: Any = getattr(self._iam, shape.op("get_{}_policy"))
        try:
            doc = read(**{shape.param: name, "PolicyName": SCOPE_POLICY_NAME})["PolicyDocument"]
        except ClientError as err:
            if aws_code(err) == "NoSuchEntity":
                return {}
            raise
        return json.loads(doc) if isinstance(doc, str) else dict(doc)

    def _drift(self, kind: NhiKind, name: str, granted: Known) -> str | None:
        """Whether the scope policy IAM holds is the one the grant makes (any difference, a
        missing policy included, is drift: IAM offers no finer comparison we could trust)."""
        if granted.expires_at is None:
            return None  # nothing to compare with
        expected = identity_policy_document(
            list(granted.scope), list(granted.allowed_cidrs), granted.expires_at
        )
        if self._document(kind, name) == expected:
            return None
        return "platform permissions differ from the granted scope"

    def last_used(self, kind: NhiKind, name: str, target: str | None) -> datetime | None:
        """RoleLastUsed, or the latest use of any of the user's access keys."""
        del target  # one AWS account per worker
        if kind == NhiKind.IAM_ROLE:
            return (
                self._iam.get_role(RoleName=name)["Role"]
                .get("RoleLastUsed", {})
                .get("LastUsedDate")
            )
        dates = []
        for key in self._iam.list_access_keys(UserName=name)["AccessKeyMetadata"]:
            used = self._iam.get_access_key_last_used(AccessKeyId=key["AccessKeyId"])[
                "AccessKeyLastUsed"
            ]
            if used.get("LastUsedDate"):
                dates.append(used["LastUsedDate"])
        return max(dates) if dates else None

    def discover(self, known: Mapping[str, Known], pace: Pace) -> Discovery:
        """Users and roles under our path. Tags (and the delivery secret) are read only for
        names the inventory does not hold alive; usage and scope only for active ones."""
        try:
            found = [(NhiKind.IAM_USER_KEY, u) for u in self._paged("list_users", "Users", pace)]
            found += [(NhiKind.IAM_ROLE, r) for r in self._paged("list_roles", "Roles", pace)]
        except ClientError as err:
            raise ApplicationError(
                f"listing IAM identities failed ({aws_code(err)}): sweep stopped, nothing changed",
                type="ListingFailed",
                non_retryable=True,
            ) from None
        out: list[PlatformIdentity] = []
        for kind, entry in found:
            name = str(entry.get("UserName") or entry.get("RoleName"))
            status = known[name].status if name in known else None
            tags: dict[str, str] = {}
            if status is None:
                pace()
                tags = self._tags_of(kind, name)
            managed = status is not None or tags.get("managed-by") == MANAGED_BY
            nhi_id = tags.get(NHI_ID_TAG)
            secret_arn = None
            if managed and nhi_id and status is None:
                pace()
                secret_arn = self._store.find_by_tag(NHI_ID_TAG, nhi_id)
            last_used = drift = None
            if status == "active":
                pace()
                last_used = self.last_used(kind, name, None)
                pace()
                drift = self._drift(kind, name, known[name])
            out.append(
                PlatformIdentity(
                    name=name,
                    kind=kind.value,
                    created_at=entry["CreateDate"],
                    managed=managed,
                    nhi_id=nhi_id,
                    secret_arn=secret_arn,
                    last_used_at=last_used,
                    drift=drift,
                )
            )
        return Discovery(identities=out)
