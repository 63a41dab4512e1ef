"""The IAM vocabulary the AWS provider modules share: the inline policies it writes and their
documents, its tags, and the operations each kind of identity is read and removed with.

Pure helpers and constants: no client, no call (aws.py creates and rotates, aws_removal.py
contains and removes, aws_discovery.py lists).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from activities._support import aws_code
from activities.providers.base import marker_tags
from activities.providers.secret_store import SecretStore
from models.contracts import ProvisionPlan
from models.enums import NhiKind
from nhi.rules.policy import identity_policy_document

if TYPE_CHECKING:
    from types_boto3_iam.type_defs import TagTypeDef

SCOPE_POLICY_NAME = "nhi-scope"
NOT_FOUND = frozenset({"NoSuchEntity", "ResourceNotFoundException"})


def listed(call: Callable[..., Any], key: str, **params: Any) -> list[Any]:
    """A listing of what is attached; an identity already gone has nothing attached."""
    try:
        return list(call(**params)[key])
    except ClientError as err:
        if aws_code(err) in NOT_FOUND:
            return []
        raise


def policy_arn(attached: Mapping[str, Any]) -> str:
    return str(attached["PolicyArn"])


def iam_tags(plan: ProvisionPlan) -> list[TagTypeDef]:
    """IAM's form of the provider's tags (the same the delivery secret carries)."""
    return [{"Key": k, "Value": v} for k, v in sorted(marker_tags(plan).items())]


def scope_policy_json(plan: ProvisionPlan) -> str:
    return json.dumps(identity_policy_document(plan.scope, plan.allowed_cidrs, plan.expires_at))


QUARANTINE_POLICY_NAME = "nhi-quarantine"
REVOKE_SESSIONS_POLICY_NAME = "nhi-revoke-older-sessions"
# What quarantine puts in place, in the order removal deletes it: last of all.
QUARANTINE_POLICIES = (REVOKE_SESSIONS_POLICY_NAME, QUARANTINE_POLICY_NAME)


def deny_last(policy: str) -> tuple[int, str]:
    """Sort key of inline policies for removal: the quarantine's denies after all others."""
    if policy in QUARANTINE_POLICIES:
        return (1 + QUARANTINE_POLICIES.index(policy), policy)
    return (0, policy)


def deny_all() -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Sid": "Quarantine", "Effect": "Deny", "Action": "*", "Resource": "*"}],
        }
    )


def deny_sessions_issued_before(at: datetime) -> str:
    # What the IAM console's "revoke active sessions" does: sessions issued before `at` are
    # refused even after the quarantine is lifted. The condition holds whole seconds, so `at`
    # is rounded up: truncated, a session issued earlier in that same second (a task
    # credential issued a moment before the quarantine) would outlive it.
    if at.microsecond:
        at = at.replace(microsecond=0) + timedelta(seconds=1)
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "RevokeOlderSessions",
                    "Effect": "Deny",
                    "Action": "*",
                    "Resource": "*",
                    "Condition": {
                        "DateLessThan": {"aws:TokenIssueTime": at.strftime("%Y-%m-%dT%H:%M:%SZ")}
                    },
                }
            ],
        }
    )


Listing = tuple[str, str, str, Callable[[Any], str]]


@dataclass(frozen=True)
class Shape:
    """The IAM operations one kind of identity is read and removed with: IAM names them
    alike for roles and users (`list_role_policies`, `list_user_policies`)."""

    what: str  # "role" or "user", as messages and IAM's operation names say it
    param: str  # RoleName or UserName
    # What a fresh read lists as still attached besides the policies, before and after them
    # in its report: (label, listing, result key, entry's name).
    before: tuple[Listing, ...]
    after: tuple[Listing, ...]

    def op(self, template: str) -> str:
        """An operation's name, e.g. `op("list_{}_policies")`."""
        return template.format(self.what)

    @property
    def attached(self) -> tuple[Listing, ...]:
        policies: tuple[Listing, ...] = (
            ("inline policy", self.op("list_{}_policies"), "PolicyNames", str),
            (
                "managed policy",
                self.op("list_attached_{}_policies"),
                "AttachedPolicies",
                policy_arn,
            ),
        )
        return self.before + policies + self.after


SHAPES = {
    NhiKind.IAM_ROLE: Shape(
        what="role",
        param="RoleName",
        before=(),
        after=(
            (
                "instance profile",
                "list_instance_profiles_for_role",
                "InstanceProfiles",
                lambda p: str(p["InstanceProfileName"]),
            ),
        ),
    ),
    NhiKind.IAM_USER_KEY: Shape(
        what="user",
        param="UserName",
        before=(
            (
                "access key",
                "list_access_keys",
                "AccessKeyMetadata",
                lambda k: f"{k['AccessKeyId']} ({k['Status']})",
            ),
        ),
        after=(("group", "list_groups_for_user", "Groups", lambda g: str(g["GroupName"])),),
    ),
}


def stage_key_ids(store: SecretStore, secret_name: str) -> dict[str, str]:
    """Access key id held by each staging label of the delivery secret."""
    return {
        stage: str(value["AccessKeyId"]) for stage, value in store.stage_values(secret_name).items()
    }
