"""The AWS provider: IAM roles, and IAM users with access keys delivered into Secrets Manager.

Every method is idempotent: names are deterministic, "already exists" is checked against our
own tags, and "not found" during removal counts as removed. Secrets go from IAM straight into
Secrets Manager inside one call; only references leave.

This module creates, delivers, renews and rotates; containment and removal live in
aws_removal.py, listing for sweeps in aws_discovery.py, and the policy names, documents and
IAM operation shapes they share in aws_iam.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from botocore.exceptions import ClientError
from temporalio.exceptions import ApplicationError

from activities._support import aws_code, classify_aws
from activities.providers.aws_discovery import AwsDiscovery
from activities.providers.aws_iam import (
    NOT_FOUND,
    QUARANTINE_POLICY_NAME,
    REVOKE_SESSIONS_POLICY_NAME,
    SCOPE_POLICY_NAME,
    deny_all,
    deny_sessions_issued_before,
    iam_tags,
    scope_policy_json,
    stage_key_ids,
)
from activities.providers.aws_removal import AwsRemoval
from activities.providers.base import EXPIRES_AT_TAG, NHI_ID_TAG, expires_tag, marker_tags
from activities.providers.secret_store import CURRENT, PENDING, PREVIOUS, SecretStore
from models.contracts import IdentityCreated, IdentityRef, ProvisionPlan, StagedKey
from models.enums import NhiKind, Platform
from nhi.infra.aws_clients import AwsClients
from nhi.rules.policy import trust_policy_document

if TYPE_CHECKING:
    from types_boto3_iam.type_defs import TagTypeDef

# Kept importable from here (tests, benchmarks): the policies the provider writes.
__all__ = [
    "QUARANTINE_POLICY_NAME",
    "REVOKE_SESSIONS_POLICY_NAME",
    "SCOPE_POLICY_NAME",
    "AwsProvider",
    "_deny_all",
    "_deny_sessions_issued_before",
]
_deny_all = deny_all
_deny_sessions_issued_before = deny_sessions_issued_before

log = logging.getLogger(__name__)


def _key_value(key: Mapping[str, Any]) -> dict[str, str]:
    """What the delivery secret holds: the key pair, exactly as the SDKs' credential
    providers name its parts."""
    return {"AccessKeyId": str(key["AccessKeyId"]), "SecretAccessKey": str(key["SecretAccessKey"])}


class AwsProvider(AwsRemoval, AwsDiscovery):
    """IAM and Secrets Manager calls for the `iam_role` and `iam_user_key` kinds."""

    platform: ClassVar[Platform] = Platform.AWS
    name_separator: ClassVar[str] = (
        "-"  # IAM names: `<prefix>-<agent>-<id>` (nhi.rules.policy.identity_name)
    )

    def __init__(self, clients: AwsClients, iam_path: str = "/nhi-lifecycle/") -> None:
        self._clients = clients
        self._iam = clients.iam
        self._store = SecretStore(clients.secrets)
        self._iam_path = iam_path

    def _check_ours(self, tags: list[TagTypeDef], plan: ProvisionPlan, what: str) -> None:
        found = {t["Key"]: t["Value"] for t in tags}
        if found.get(NHI_ID_TAG) != str(plan.nhi_id):
            raise ApplicationError(
                f"{what} {plan.identity_name} already exists and is not NHI {plan.nhi_id}'s",
                type="IdentityConflict",
                non_retryable=True,
            )

    def create(self, plan: ProvisionPlan) -> IdentityCreated:
        """The role (with its trust and scope) or the user (with its scope, no key yet)."""
        if plan.kind is NhiKind.IAM_ROLE:
            return self._create_role(plan)
        return self._create_user(plan)

    def deliver(self, plan: ProvisionPlan) -> IdentityCreated:
        """A user's access key into Secrets Manager. A role has no static secret: the agent
        assumes it, so its ARN is the reference."""
        if plan.kind is NhiKind.IAM_ROLE:
            try:
                arn = self._iam.get_role(RoleName=plan.identity_name)["Role"]["Arn"]
            except ClientError as err:
                raise classify_aws(err, f"reading role {plan.identity_name}") from err
            return IdentityCreated(external_id=arn, credential_ref=arn)
        return self._deliver_key(plan)

    def _create_role(self, plan: ProvisionPlan) -> IdentityCreated:
        """Create the agent's role (trust = its runtime principal, inline policy = its scope)."""
        if plan.trust_principal is None:
            raise ApplicationError(
                "iam_role needs a trust principal", type="InvalidPlan", non_retryable=True
            )
        trust = json.dumps(trust_policy_document(plan.trust_principal, plan.task_principal))
        try:
            try:
                arn = self._iam.create_role(
                    RoleName=plan.identity_name,
                    Path=plan.iam_path,
                    AssumeRolePolicyDocument=trust,
                    MaxSessionDuration=plan.max_session_duration_seconds,
                    Description=f"NHI {plan.nhi_id} of agent {plan.agent_name}"[:1000],
                    Tags=iam_tags(plan),
                )["Role"]["Arn"]
            except ClientError as err:
                if aws_code(err) != "EntityAlreadyExists":
                    raise
                arn = self._iam.get_role(RoleName=plan.identity_name)["Role"]["Arn"]
                tags = self._iam.list_role_tags(RoleName=plan.identity_name)["Tags"]
                self._check_ours(tags, plan, "role")
                self._iam.update_assume_role_policy(
                    RoleName=plan.identity_name, PolicyDocument=trust
                )
            self._iam.put_role_policy(
                RoleName=plan.identity_name,
                PolicyName=SCOPE_POLICY_NAME,
                PolicyDocument=scope_policy_json(plan),
            )
        except ClientError as err:
            raise classify_aws(err, f"creating role {plan.identity_name}") from err
        log.info("role %s ready for nhi %s", arn, plan.nhi_id)
        # A role has no static secret: the agent assumes it, so its ARN is the reference.
        return IdentityCreated(external_id=arn, credential_ref=arn)

    def _create_user(self, plan: ProvisionPlan) -> IdentityCreated:
        """Create the IAM user and its inline scope policy (no key yet)."""
        try:
            try:
                arn = self._iam.create_user(
                    UserName=plan.identity_name, Path=plan.iam_path, Tags=iam_tags(plan)
                )["User"]["Arn"]
            except ClientError as err:
                if aws_code(err) != "EntityAlreadyExists":
                    raise
                arn = self._iam.get_user(UserName=plan.identity_name)["User"]["Arn"]
                tags = self._iam.list_user_tags(UserName=plan.identity_name)["Tags"]
                self._check_ours(tags, plan, "user")
            self._iam.put_user_policy(
                UserName=plan.identity_name,
                PolicyName=SCOPE_POLICY_NAME,
                PolicyDocument=scope_policy_json(plan),
            )
        except ClientError as err:
            raise classify_aws(err, f"creating user {plan.identity_name}") from err
        return IdentityCreated(external_id=arn, credential_ref="")

    def _delivered_key_id(self, plan: ProvisionPlan) -> str | None:
        """The access key id the delivery secret holds, if any."""
        value = self._store.read(plan.secret_name)
        key_id = value.get("AccessKeyId") if value else None
        return str(key_id) if key_id else None

    def _deliver_key(self, plan: ProvisionPlan) -> IdentityCreated:
        """Create the user's access key and deliver it into Secrets Manager, in one step.

        A key that exists but is not in the secret can only be the leftover of a run that
        crashed between CreateAccessKey and the secret write: nobody can hold its secret, so it
        is deleted before a new key is made. So a retry never leaves a second key behind, and
        the user never reaches IAM's limit of two.
        """
        user = plan.identity_name
        try:
            delivered = self._delivered_key_id(plan)
            keys = [
                k["AccessKeyId"]
                for k in self._iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
            ]
            for key_id in keys:
                if key_id != delivered:
                    log.warning(
                        "deleting access key %s of %s: never delivered (interrupted run)",
                        key_id,
                        user,
                    )
                    self._iam.delete_access_key(UserName=user, AccessKeyId=key_id)
            if delivered is None or delivered not in keys:
                key = self._iam.create_access_key(UserName=user)["AccessKey"]
                delivered = key["AccessKeyId"]
                self._store.put_current(
                    plan.secret_name,
                    _key_value(key),
                    tags=marker_tags(plan),
                    description=f"Access key of NHI {plan.nhi_id}",
                )
                del key
            secret_arn = self._store.arn(plan.secret_name)
            user_arn = self._iam.get_user(UserName=user)["User"]["Arn"]
        except ClientError as err:
            raise classify_aws(err, f"issuing the access key of {user}") from err
        log.info("access key %s of %s delivered to %s", delivered, user, secret_arn)
        return IdentityCreated(
            external_id=user_arn, credential_ref=secret_arn, access_key_id=delivered
        )

    # ---- renewal and rotation ----------------------------------------------------------

    def renew(self, plan: ProvisionPlan) -> None:
        """Rewrite the scope policy and tag for a new expiry (renewal)."""
        tag: list[TagTypeDef] = [{"Key": EXPIRES_AT_TAG, "Value": expires_tag(plan.expires_at)}]
        try:
            if plan.kind is NhiKind.IAM_ROLE:
                self._iam.put_role_policy(
                    RoleName=plan.identity_name,
                    PolicyName=SCOPE_POLICY_NAME,
                    PolicyDocument=scope_policy_json(plan),
                )
                self._iam.tag_role(RoleName=plan.identity_name, Tags=tag)
            else:
                self._iam.put_user_policy(
                    UserName=plan.identity_name,
                    PolicyName=SCOPE_POLICY_NAME,
                    PolicyDocument=scope_policy_json(plan),
                )
                self._iam.tag_user(UserName=plan.identity_name, Tags=tag)
        except ClientError as err:
            raise classify_aws(err, f"renewing {plan.identity_name}") from err

    def stage_rotation(self, plan: ProvisionPlan) -> StagedKey:
        """Rotation step 1: clean leftovers, create the new key, store it as AWSPENDING.

        Keys held by no staging label are leftovers of an interrupted run and are deleted
        first; a key still in its overlap (AWSPREVIOUS) is retired early. So the user never
        holds more than the current key plus the new one. An existing AWSPENDING key is reused.
        """
        user = plan.identity_name
        try:
            stages = stage_key_ids(self._store, plan.secret_name)
            current = stages.get(CURRENT)
            keys = [
                k["AccessKeyId"]
                for k in self._iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
            ]
            pending = stages.get(PENDING)
            if pending and pending in keys and pending != current:
                return StagedKey(new_key_id=pending, old_key_id=current)
            for key_id in keys:
                if key_id != current:
                    log.warning("deleting access key %s of %s before rotating", key_id, user)
                    self._iam.delete_access_key(UserName=user, AccessKeyId=key_id)
            key = self._iam.create_access_key(UserName=user)["AccessKey"]
            new_key_id = key["AccessKeyId"]
            self._store.put_pending(plan.secret_name, _key_value(key))
            del key
        except ClientError as err:
            raise classify_aws(err, f"staging a new key for {user}") from err
        return StagedKey(new_key_id=new_key_id, old_key_id=current)

    def verify_pending(self, plan: ProvisionPlan) -> None:
        """Rotation step 2: prove the pending key authenticates as this user (STS).

        IAM is eventually consistent, so a refusal is retried (by Temporal) before giving up.
        """
        value = self._store.read(plan.secret_name, PENDING)
        if value is None:
            raise ApplicationError(
                "no pending key to verify", type="NothingPending", non_retryable=True
            )
        sts = self._clients.sts_as(value["AccessKeyId"], value["SecretAccessKey"])
        del value
        try:
            arn = sts.get_caller_identity()["Arn"]
        except ClientError as err:
            raise ApplicationError(
                f"the new key does not authenticate yet: {aws_code(err)}", type="NotYetValid"
            ) from None
        if not arn.endswith(f"/{plan.identity_name}"):
            raise ApplicationError(
                f"the new key authenticates as {arn}, not {plan.identity_name}",
                type="WrongIdentity",
                non_retryable=True,
            )

    def promote(self, plan: ProvisionPlan) -> StagedKey:
        """Rotation step 3: make the proven key AWSCURRENT (the old one becomes AWSPREVIOUS)."""
        try:
            stages = stage_key_ids(self._store, plan.secret_name)
            if PENDING in stages and stages[PENDING] != stages.get(CURRENT):
                self._store.promote_pending(plan.secret_name)
                return StagedKey(new_key_id=stages[PENDING], old_key_id=stages.get(CURRENT))
            self._store.promote_pending(plan.secret_name)  # finish an interrupted promotion
        except ClientError as err:
            raise classify_aws(err, f"promoting the new key of {plan.identity_name}") from err
        # Already promoted by an earlier attempt.
        return StagedKey(new_key_id=stages[CURRENT], old_key_id=stages.get(PREVIOUS))

    def retire(self, ref: IdentityRef, key_id: str, *, delete: bool) -> None:
        """Old key after the overlap: inactive first, so a forgotten client fails visibly; then
        deleted. "Not found" counts as done."""
        try:
            if delete:
                self._iam.delete_access_key(UserName=ref.name, AccessKeyId=key_id)
            else:
                self._iam.update_access_key(
                    UserName=ref.name, AccessKeyId=key_id, Status="Inactive"
                )
        except ClientError as err:
            if aws_code(err) not in NOT_FOUND:
                doing = "deleting" if delete else "deactivating"
                raise classify_aws(err, f"{doing} key {key_id}") from err
