"""Task credentials on AWS: an STS `AssumeRole` session on the NHI's own role.

* `DurationSeconds` = the task's TTL (STS accepts 900 s to the role's `MaxSessionDuration`;
  the service refuses anything outside that before calling);
* a session policy when the scope is narrowed: AWS grants the intersection of the role's
  policy and the session policy, so a session can never do more than its NHI;
* `SourceIdentity` (the agent) and session tags (agent, NHI, task, credential), which
  CloudTrail records on every call the session makes. Both need the caller to be trusted for
  `sts:TagSession` and `sts:SetSourceIdentity` as well as `sts:AssumeRole`: provisioning adds
  those for the task-credential principal when the policy allows task credentials.

Nothing is created in IAM, so nothing is left to reap: the session ends by itself at its
expiry, and containment of the parent (its revoke-older-sessions deny) ends it at once.
"""

from __future__ import annotations

import json
from datetime import UTC
from typing import TYPE_CHECKING, ClassVar

from botocore.exceptions import ClientError
from temporalio.exceptions import ApplicationError

from activities._support import classify_aws
from models.enums import NhiKind, Platform
from nhi.infra.aws_clients import AwsClients
from nhi.rules.task_credentials import (
    IssuedCredential,
    TaskGrant,
    session_policy,
    session_tags,
    source_identity,
)

if TYPE_CHECKING:
    from types_boto3_sts.type_defs import AssumeRoleRequestTypeDef


class AwsTaskProvider:
    """`TaskCredentialProvider` for `iam_role` NHIs."""

    platform: ClassVar[Platform] = Platform.AWS

    def __init__(self, clients: AwsClients) -> None:
        self._sts = clients.sts

    def request(self, grant: TaskGrant) -> AssumeRoleRequestTypeDef:
        """The AssumeRole parameters for `grant` (no secret in them)."""
        if grant.kind is not NhiKind.IAM_ROLE:
            raise ApplicationError(
                f"task credentials on AWS come from iam_role NHIs, not {grant.kind.value}",
                type="InvalidPlan",
                non_retryable=True,
            )
        params: AssumeRoleRequestTypeDef = {
            "RoleArn": grant.external_id,
            "RoleSessionName": grant.name,
            "DurationSeconds": grant.ttl_seconds,
            "SourceIdentity": source_identity(grant.agent_id),
            "Tags": [{"Key": k, "Value": v} for k, v in session_tags(grant).items()],
        }
        document = session_policy(grant)
        if document is not None:
            params["Policy"] = json.dumps(document, separators=(",", ":"))
        return params

    def issue(self, grant: TaskGrant) -> IssuedCredential:
        """One STS session on the NHI's role; its keys, once."""
        params = self.request(grant)
        try:
            answer = self._sts.assume_role(**params)
        except ClientError as err:
            raise classify_aws(err, f"assuming {grant.external_id} for a task") from err
        credentials = answer["Credentials"]
        expiration = credentials["Expiration"]
        if expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=UTC)
        return IssuedCredential(
            expires_at=grant.expires_at,
            secret={
                "access_key_id": credentials["AccessKeyId"],
                "secret_access_key": credentials["SecretAccessKey"],
                "session_token": credentials["SessionToken"],
            },
            public={
                # AWS's own clock ends the session (DurationSeconds after its issue time).
                "expiration": expiration.isoformat(),
                "assumed_role_arn": answer["AssumedRoleUser"]["Arn"],
                "role_arn": grant.external_id,
                "session_name": grant.name,
                "source_identity": params["SourceIdentity"],
                "session_tags": session_tags(grant),
                "session_policy": "Policy" in params,
            },
        )
