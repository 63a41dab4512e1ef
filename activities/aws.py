"""Activities that create and remove AWS identities (IAM roles, IAM users with access keys).

Every method is idempotent: names are deterministic, "already exists" is checked against our
own tags, and "not found" during removal counts as removed. Secrets go from IAM straight into
Secrets Manager inside one activity; only references leave.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._support import aws_code, classify_aws, heartbeating
from models.contracts import IdentityCreated, ProvisionPlan, RemovalResult, RemoveIdentity
from models.enums import NhiKind
from nhi.aws import AwsClients
from nhi.policy import identity_policy_document, trust_policy_document

if TYPE_CHECKING:
    from types_boto3_iam.type_defs import TagTypeDef

log = logging.getLogger(__name__)

SCOPE_POLICY_NAME = "nhi-scope"
_NOT_FOUND = frozenset({"NoSuchEntity", "ResourceNotFoundException"})


def _tags(plan: ProvisionPlan) -> list[TagTypeDef]:
    return [{"Key": k, "Value": v} for k, v in sorted(plan.tags.items())]


def _policy_json(plan: ProvisionPlan) -> str:
    return json.dumps(identity_policy_document(plan.scope, plan.allowed_cidrs, plan.expires_at))


class AwsActivities:
    """IAM and Secrets Manager calls for the `iam_role` and `iam_user_key` kinds."""

    def __init__(self, clients: AwsClients) -> None:
        self._iam = clients.iam
        self._secrets = clients.secrets

    def _check_ours(self, tags: list[TagTypeDef], plan: ProvisionPlan, what: str) -> None:
        found = {t["Key"]: t["Value"] for t in tags}
        if found.get("nhi:nhi-id") != str(plan.nhi_id):
            raise ApplicationError(
                f"{what} {plan.identity_name} already exists and is not NHI {plan.nhi_id}'s",
                type="IdentityConflict",
                non_retryable=True,
            )

    @activity.defn
    def ensure_role(self, plan: ProvisionPlan) -> IdentityCreated:
        """Create the agent's role (trust = its runtime principal, inline policy = its scope)."""
        if plan.trust_principal is None:
            raise ApplicationError(
                "iam_role needs a trust principal", type="InvalidPlan", non_retryable=True
            )
        trust = json.dumps(trust_policy_document(plan.trust_principal))
        with heartbeating():
            try:
                try:
                    arn = self._iam.create_role(
                        RoleName=plan.identity_name,
                        Path=plan.iam_path,
                        AssumeRolePolicyDocument=trust,
                        MaxSessionDuration=plan.max_session_duration_seconds,
                        Description=f"NHI {plan.nhi_id} of agent {plan.agent_name}"[:1000],
                        Tags=_tags(plan),
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
                    PolicyDocument=_policy_json(plan),
                )
            except ClientError as err:
                raise classify_aws(err, f"creating role {plan.identity_name}") from err
        log.info("role %s ready for nhi %s", arn, plan.nhi_id)
        # A role has no static secret: the agent assumes it, so its ARN is the reference.
        return IdentityCreated(external_id=arn, credential_ref=arn)

    @activity.defn
    def ensure_user(self, plan: ProvisionPlan) -> IdentityCreated:
        """Create the IAM user and its inline scope policy (no key yet)."""
        with heartbeating():
            try:
                try:
                    arn = self._iam.create_user(
                        UserName=plan.identity_name, Path=plan.iam_path, Tags=_tags(plan)
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
                    PolicyDocument=_policy_json(plan),
                )
            except ClientError as err:
                raise classify_aws(err, f"creating user {plan.identity_name}") from err
        return IdentityCreated(external_id=arn, credential_ref="")

    def _delivered_key_id(self, plan: ProvisionPlan) -> tuple[str | None, bool]:
        """(access key id held by the delivery secret, whether the secret exists)."""
        try:
            value = self._secrets.get_secret_value(SecretId=plan.secret_name)["SecretString"]
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return None, False
            raise
        key_id = json.loads(value).get("AccessKeyId")
        return (str(key_id) if key_id else None), True

    @activity.defn
    def issue_access_key(self, plan: ProvisionPlan) -> IdentityCreated:
        """Create the user's access key and deliver it into Secrets Manager, in one step.

        A key that exists but is not in the secret can only be the leftover of a run that
        crashed between CreateAccessKey and the secret write: nobody can hold its secret, so it
        is deleted before a new key is made. So a retry never leaves a second key behind, and
        the user never reaches IAM's limit of two.
        """
        user = plan.identity_name
        with heartbeating():
            try:
                delivered, secret_exists = self._delivered_key_id(plan)
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
                    value = json.dumps(
                        {
                            "AccessKeyId": key["AccessKeyId"],
                            "SecretAccessKey": key["SecretAccessKey"],
                        }
                    )
                    del key
                    if secret_exists:
                        self._secrets.put_secret_value(
                            SecretId=plan.secret_name, SecretString=value
                        )
                    else:
                        self._secrets.create_secret(
                            Name=plan.secret_name,
                            Description=f"Access key of NHI {plan.nhi_id}",
                            SecretString=value,
                            Tags=[{"Key": k, "Value": v} for k, v in sorted(plan.tags.items())],
                        )
                    del value
                secret_arn = self._secrets.describe_secret(SecretId=plan.secret_name)["ARN"]
                user_arn = self._iam.get_user(UserName=user)["User"]["Arn"]
            except ClientError as err:
                raise classify_aws(err, f"issuing the access key of {user}") from err
        log.info("access key %s of %s delivered to %s", delivered, user, secret_arn)
        return IdentityCreated(
            external_id=user_arn, credential_ref=secret_arn, access_key_id=delivered
        )

    @activity.defn
    def remove_identity(self, request: RemoveIdentity) -> RemovalResult:
        """Delete the identity and everything attached to it; "not found" counts as done."""
        plan = request.plan
        removed: list[str] = []
        with heartbeating():
            try:
                if plan.kind is NhiKind.IAM_ROLE:
                    removed += self._remove_role(plan.identity_name)
                else:
                    removed += self._remove_user(plan.identity_name)
                removed += self._remove_secret(plan.secret_name, force=request.force_delete_secret)
            except ClientError as err:
                raise classify_aws(err, f"removing {plan.identity_name}") from err
        return RemovalResult(removed=removed)

    def _remove_role(self, name: str) -> list[str]:
        iam = self._iam
        done: list[str] = []
        try:
            for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]:
                iam.delete_role_policy(RoleName=name, PolicyName=policy)
                done.append(f"inline policy {policy}")
            for attached in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
                iam.detach_role_policy(RoleName=name, PolicyArn=attached["PolicyArn"])
                done.append(f"attached policy {attached['PolicyArn']}")
            for profile in iam.list_instance_profiles_for_role(RoleName=name)["InstanceProfiles"]:
                iam.remove_role_from_instance_profile(
                    InstanceProfileName=profile["InstanceProfileName"], RoleName=name
                )
                done.append(f"instance profile {profile['InstanceProfileName']}")
            iam.delete_role(RoleName=name)
            done.append(f"role {name}")
        except ClientError as err:
            if aws_code(err) not in _NOT_FOUND:
                raise
        return done

    def _remove_user(self, name: str) -> list[str]:
        iam = self._iam
        done: list[str] = []
        try:
            for key in iam.list_access_keys(UserName=name)["AccessKeyMetadata"]:
                iam.delete_access_key(UserName=name, AccessKeyId=key["AccessKeyId"])
                done.append(f"access key {key['AccessKeyId']}")
            for policy in iam.list_user_policies(UserName=name)["PolicyNames"]:
                iam.delete_user_policy(UserName=name, PolicyName=policy)
                done.append(f"inline policy {policy}")
            for attached in iam.list_attached_user_policies(UserName=name)["AttachedPolicies"]:
                iam.detach_user_policy(UserName=name, PolicyArn=attached["PolicyArn"])
                done.append(f"attached policy {attached['PolicyArn']}")
            for group in iam.list_groups_for_user(UserName=name)["Groups"]:
                iam.remove_user_from_group(GroupName=group["GroupName"], UserName=name)
                done.append(f"group membership {group['GroupName']}")
            for device in iam.list_mfa_devices(UserName=name)["MFADevices"]:
                iam.deactivate_mfa_device(UserName=name, SerialNumber=device["SerialNumber"])
                done.append(f"mfa device {device['SerialNumber']}")
            try:
                iam.delete_login_profile(UserName=name)
                done.append("login profile")
            except ClientError as err:
                if aws_code(err) not in _NOT_FOUND:
                    raise
            iam.delete_user(UserName=name)
            done.append(f"user {name}")
        except ClientError as err:
            if aws_code(err) not in _NOT_FOUND:
                raise
        return done

    def _remove_secret(self, name: str, *, force: bool) -> list[str]:
        # Secrets Manager reports success for a forced delete of a missing secret, so look
        # first: the removal report must say what was really there.
        try:
            described = self._secrets.describe_secret(SecretId=name)
            if "DeletedDate" in described and not force:
                return []  # already scheduled for deletion
            if force:
                self._secrets.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
            else:
                self._secrets.delete_secret(SecretId=name, RecoveryWindowInDays=7)
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return []
            raise
        return [f"secret {name}"]
