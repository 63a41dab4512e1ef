"""The AWS provider: IAM roles, and IAM users with access keys delivered into Secrets Manager.

Every method is idempotent: names are deterministic, "already exists" is checked against our
own tags, and "not found" during removal counts as removed. Secrets go from IAM straight into
Secrets Manager inside one call; only references leave.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from temporalio.exceptions import ApplicationError

from activities._support import aws_code, classify_aws
from activities.providers.base import Discovery, Known, Pace
from activities.providers.secret_store import CURRENT, PENDING, PREVIOUS, SecretStore
from models.contracts import (
    IdentityCreated,
    KeyRef,
    ProvisionPlan,
    RemovalResult,
    RemoveIdentity,
    StagedKey,
)
from models.enums import NhiKind, Platform
from nhi import MANAGED_BY
from nhi.aws import AwsClients
from nhi.policy import identity_policy_document, trust_policy_document
from nhi.sweep import PlatformIdentity

if TYPE_CHECKING:
    from types_boto3_iam import IAMClient
    from types_boto3_iam.type_defs import TagTypeDef

log = logging.getLogger(__name__)

SCOPE_POLICY_NAME = "nhi-scope"
_NOT_FOUND = frozenset({"NoSuchEntity", "ResourceNotFoundException"})


def _gone_ok(call: Callable[..., object], **params: Any) -> bool:
    """One removal step. Its own "not found" (this key, policy or profile, or the identity
    itself) means already done: False; True when the step acted."""
    try:
        call(**params)
    except ClientError as err:
        if aws_code(err) in _NOT_FOUND:
            return False
        raise
    return True


def _listed(call: Callable[..., Any], key: str, **params: Any) -> list[Any]:
    """A listing of what is attached; an identity already gone has nothing attached."""
    try:
        return list(call(**params)[key])
    except ClientError as err:
        if aws_code(err) in _NOT_FOUND:
            return []
        raise


def _conflict_hint(what: str, name: str, left: str) -> str:
    """The operator's sentence for a DeleteConflict on the identity itself."""
    if left in ("nothing", "nothing attached"):
        return (
            f"Operator: IAM refused to delete {what} {name} with nothing left attached (IAM "
            f"catching up, or a change made at the same time): the removal retries; if it keeps "
            f"failing, look at {what} {name} in IAM"
        )
    return (
        f"Operator: {what} {name} still has {left}, added outside nhi-lifecycle during its "
        f"removal: remove it; the removal retries"
    )


def _access_hint(err: ClientError, what: str) -> str | None:
    """The operator's sentence for a refused call."""
    if aws_code(err) not in {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"}:
        return None
    return (
        f"Operator: the worker is refused iam:{err.operation_name} on {what}: grant it (or lift "
        f"the SCP or permissions boundary that refuses it); the {what.split()[0]} stays "
        f"quarantined"
    )


def _tags(plan: ProvisionPlan) -> list[TagTypeDef]:
    return [{"Key": k, "Value": v} for k, v in sorted(plan.tags.items())]


def _policy_json(plan: ProvisionPlan) -> str:
    return json.dumps(identity_policy_document(plan.scope, plan.allowed_cidrs, plan.expires_at))


QUARANTINE_POLICY_NAME = "nhi-quarantine"
REVOKE_SESSIONS_POLICY_NAME = "nhi-revoke-older-sessions"
# What quarantine puts in place, in the order removal deletes it: last of all.
QUARANTINE_POLICIES = (REVOKE_SESSIONS_POLICY_NAME, QUARANTINE_POLICY_NAME)


def _deny_last(policy: str) -> tuple[int, str]:
    """Sort key of inline policies for removal: the quarantine's denies after all others."""
    if policy in QUARANTINE_POLICIES:
        return (1 + QUARANTINE_POLICIES.index(policy), policy)
    return (0, policy)


def _key_value(key: Mapping[str, Any]) -> dict[str, str]:
    """What the delivery secret holds: the key pair, exactly as the SDKs' credential
    providers name its parts."""
    return {"AccessKeyId": str(key["AccessKeyId"]), "SecretAccessKey": str(key["SecretAccessKey"])}


def _deny_all() -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Sid": "Quarantine", "Effect": "Deny", "Action": "*", "Resource": "*"}],
        }
    )


def _deny_sessions_issued_before(at: datetime) -> str:
    # What the IAM console's "revoke active sessions" does: sessions issued before `at` are
    # refused even after the quarantine is lifted.
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

    def _tags_of(self, kind: str, name: str) -> dict[str, str]:
        if kind == NhiKind.IAM_ROLE:
            tags = self._iam.list_role_tags(RoleName=name)["Tags"]
        else:
            tags = self._iam.list_user_tags(UserName=name)["Tags"]
        return {t["Key"]: t["Value"] for t in tags}

    def _document(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            if kind == NhiKind.IAM_ROLE:
                doc: Any = self._iam.get_role_policy(RoleName=name, PolicyName=SCOPE_POLICY_NAME)[
                    "PolicyDocument"
                ]
            else:
                doc = self._iam.get_user_policy(UserName=name, PolicyName=SCOPE_POLICY_NAME)[
                    "PolicyDocument"
                ]
        except ClientError as err:
            if aws_code(err) == "NoSuchEntity":
                return {}
            raise
        return json.loads(doc) if isinstance(doc, str) else dict(doc)

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
            nhi_id = tags.get("nhi:nhi-id")
            secret_arn = None
            if managed and nhi_id and status is None:
                pace()
                secret_arn = self._store.find_by_tag("nhi:nhi-id", nhi_id)
            last_used = document = None
            if status == "active":
                pace()
                last_used = self.last_used(kind, name, None)
                pace()
                document = self._document(kind, name)
            out.append(
                PlatformIdentity(
                    name=name,
                    kind=kind.value,
                    created_at=entry["CreateDate"],
                    managed=managed,
                    nhi_id=nhi_id,
                    secret_arn=secret_arn,
                    last_used_at=last_used,
                    scope_document=document,
                )
            )
        return Discovery(identities=out)


class _AwsLifecycle:
    """Rotation, renewal and containment of AWS identities (the second half of AwsProvider)."""

    _iam: IAMClient
    _clients: AwsClients

    _store: SecretStore

    def _stage_key_ids(self, secret_name: str) -> dict[str, str]:
        """Access key id held by each staging label of the delivery secret."""
        return {
            stage: str(value["AccessKeyId"])
            for stage, value in self._store.stage_values(secret_name).items()
        }

    def renew(self, plan: ProvisionPlan) -> None:
        """Rewrite the scope policy and tag for a new expiry (renewal)."""
        tag = [{"Key": "nhi:expires-at", "Value": plan.tags["nhi:expires-at"]}]
        try:
            if plan.kind is NhiKind.IAM_ROLE:
                self._iam.put_role_policy(
                    RoleName=plan.identity_name,
                    PolicyName=SCOPE_POLICY_NAME,
                    PolicyDocument=_policy_json(plan),
                )
                self._iam.tag_role(RoleName=plan.identity_name, Tags=tag)  # type: ignore[arg-type]
            else:
                self._iam.put_user_policy(
                    UserName=plan.identity_name,
                    PolicyName=SCOPE_POLICY_NAME,
                    PolicyDocument=_policy_json(plan),
                )
                self._iam.tag_user(UserName=plan.identity_name, Tags=tag)  # type: ignore[arg-type]
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
            stages = self._stage_key_ids(plan.secret_name)
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
            stages = self._stage_key_ids(plan.secret_name)
            if PENDING in stages and stages[PENDING] != stages.get(CURRENT):
                self._store.promote_pending(plan.secret_name)
                return StagedKey(new_key_id=stages[PENDING], old_key_id=stages.get(CURRENT))
            self._store.promote_pending(plan.secret_name)  # finish an interrupted promotion
        except ClientError as err:
            raise classify_aws(err, f"promoting the new key of {plan.identity_name}") from err
        # Already promoted by an earlier attempt.
        return StagedKey(new_key_id=stages[CURRENT], old_key_id=stages.get(PREVIOUS))

    def retire(self, key: KeyRef, *, delete: bool) -> None:
        """Old key after the overlap: inactive first, so a forgotten client fails visibly; then
        deleted. "Not found" counts as done."""
        try:
            if delete:
                self._iam.delete_access_key(UserName=key.user_name, AccessKeyId=key.key_id)
            else:
                self._iam.update_access_key(
                    UserName=key.user_name, AccessKeyId=key.key_id, Status="Inactive"
                )
        except ClientError as err:
            if aws_code(err) not in _NOT_FOUND:
                doing = "deleting" if delete else "deactivating"
                raise classify_aws(err, f"{doing} key {key.key_id}") from err

    def _quarantine(self, kind: NhiKind, name: str, now: datetime) -> list[str]:
        """Quarantine `name`: deny-all policies (roles: and older sessions revoked); users'
        keys inactive. Raises ClientError (NoSuchEntity when the identity is gone)."""
        done: list[str] = []
        if kind is NhiKind.IAM_ROLE:
            self._iam.put_role_policy(
                RoleName=name, PolicyName=QUARANTINE_POLICY_NAME, PolicyDocument=_deny_all()
            )
            self._iam.put_role_policy(
                RoleName=name,
                PolicyName=REVOKE_SESSIONS_POLICY_NAME,
                PolicyDocument=_deny_sessions_issued_before(now),
            )
            return ["deny-all policy", "sessions issued before now revoked"]
        for key in self._iam.list_access_keys(UserName=name)["AccessKeyMetadata"]:
            if key["Status"] != "Inactive":
                self._iam.update_access_key(
                    UserName=name, AccessKeyId=key["AccessKeyId"], Status="Inactive"
                )
            done.append(f"key {key['AccessKeyId']} inactive")
        self._iam.put_user_policy(
            UserName=name, PolicyName=QUARANTINE_POLICY_NAME, PolicyDocument=_deny_all()
        )
        done.append("deny-all policy")
        return done

    def disable(self, plan: ProvisionPlan) -> list[str]:
        """Stop the credential working without deleting anything yet (restorable)."""
        try:
            return self._quarantine(plan.kind, plan.identity_name, datetime.now(UTC))
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return ["already gone"]
            raise classify_aws(err, f"quarantining {plan.identity_name}") from err

    def verify_disabled(self, plan: ProvisionPlan) -> None:
        """Prove the quarantine from IAM's own state: deny policy in place, no active key.

        (moto does not refuse inactive keys, so a login attempt would prove nothing there; the
        state is what AWS enforces.)
        """
        try:
            if plan.kind is NhiKind.IAM_ROLE:
                names = self._iam.list_role_policies(RoleName=plan.identity_name)["PolicyNames"]
            else:
                names = self._iam.list_user_policies(UserName=plan.identity_name)["PolicyNames"]
                keys = self._iam.list_access_keys(UserName=plan.identity_name)["AccessKeyMetadata"]
                active = [k["AccessKeyId"] for k in keys if k["Status"] == "Active"]
                if active:
                    raise ApplicationError(f"keys still active: {active}", type="NotQuarantined")
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return
            raise classify_aws(err, f"checking the quarantine of {plan.identity_name}") from err
        if QUARANTINE_POLICY_NAME not in names:
            raise ApplicationError("deny-all policy not in place", type="NotQuarantined")

    def enable(self, plan: ProvisionPlan) -> None:
        """Restore: remove the deny-all and reactivate the delivered key (older sessions stay
        revoked)."""
        try:
            if plan.kind is NhiKind.IAM_ROLE:
                self._iam.delete_role_policy(
                    RoleName=plan.identity_name, PolicyName=QUARANTINE_POLICY_NAME
                )
                return
            current = self._stage_key_ids(plan.secret_name).get(CURRENT)
            if current:
                self._iam.update_access_key(
                    UserName=plan.identity_name, AccessKeyId=current, Status="Active"
                )
            self._iam.delete_user_policy(
                UserName=plan.identity_name, PolicyName=QUARANTINE_POLICY_NAME
            )
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return
            raise classify_aws(err, f"restoring {plan.identity_name}") from err


class AwsProvider(_AwsLifecycle, AwsDiscovery):
    """IAM and Secrets Manager calls for the `iam_role` and `iam_user_key` kinds."""

    platform = Platform.AWS

    def __init__(self, clients: AwsClients, iam_path: str = "/nhi-lifecycle/") -> None:
        self._clients = clients
        self._iam = clients.iam
        self._store = SecretStore(clients.secrets)
        self._iam_path = iam_path

    def _check_ours(self, tags: list[TagTypeDef], plan: ProvisionPlan, what: str) -> None:
        found = {t["Key"]: t["Value"] for t in tags}
        if found.get("nhi:nhi-id") != str(plan.nhi_id):
            raise ApplicationError(
                f"{what} {plan.identity_name} already exists and is not NHI {plan.nhi_id}'s",
                type="IdentityConflict",
                non_retryable=True,
            )

    def create(self, plan: ProvisionPlan) -> IdentityCreated:
        """The role (with its trust and scope) or the user (with its scope, no key yet)."""
        if plan.kind is NhiKind.IAM_ROLE:
            return self.ensure_role(plan)
        return self.ensure_user(plan)

    def deliver(self, plan: ProvisionPlan) -> IdentityCreated:
        """A user's access key into Secrets Manager. A role has no static secret: the agent
        assumes it, so its ARN is the reference."""
        if plan.kind is NhiKind.IAM_ROLE:
            try:
                arn = self._iam.get_role(RoleName=plan.identity_name)["Role"]["Arn"]
            except ClientError as err:
                raise classify_aws(err, f"reading role {plan.identity_name}") from err
            return IdentityCreated(external_id=arn, credential_ref=arn)
        return self.issue_access_key(plan)

    def ensure_role(self, plan: ProvisionPlan) -> IdentityCreated:
        """Create the agent's role (trust = its runtime principal, inline policy = its scope)."""
        if plan.trust_principal is None:
            raise ApplicationError(
                "iam_role needs a trust principal", type="InvalidPlan", non_retryable=True
            )
        trust = json.dumps(trust_policy_document(plan.trust_principal))
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

    def ensure_user(self, plan: ProvisionPlan) -> IdentityCreated:
        """Create the IAM user and its inline scope policy (no key yet)."""
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

    def _delivered_key_id(self, plan: ProvisionPlan) -> str | None:
        """The access key id the delivery secret holds, if any."""
        value = self._store.read(plan.secret_name)
        key_id = value.get("AccessKeyId") if value else None
        return str(key_id) if key_id else None

    def issue_access_key(self, plan: ProvisionPlan) -> IdentityCreated:
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
                    tags=plan.tags,
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

    def delete(self, request: RemoveIdentity) -> RemovalResult:
        """Strip the identity, delete it, prove it is gone, then delete its secret.

        Containment is monotonic: everything that grants access goes first; what quarantine
        put in place (the deny policies) goes last, right before the delete call. A step that
        fails re-applies the quarantine before raising, so a removal stopped half way leaves
        the identity at least as locked as quarantine. Each step's own "not found" counts as
        done, and only a fresh read that no longer finds the identity ends the removal.
        """
        plan = request.plan
        if plan.kind is NhiKind.IAM_ROLE:
            removed = self._remove_role(plan.identity_name)
        else:
            removed = self._remove_user(plan.identity_name)
        try:
            removed += self._remove_secret(plan.secret_name, force=request.force_delete_secret)
        except ClientError as err:
            raise classify_aws(err, f"deleting secret {plan.secret_name}") from err
        return RemovalResult(removed=removed)

    def _relock(self, kind: NhiKind, name: str) -> str:
        """After a failed removal step: the quarantine again, best effort, so whatever the
        step left behind is at least as locked as quarantine. Says how that went."""
        try:
            self._quarantine(kind, name, datetime.now(UTC))
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return "it is gone"
            log.warning("re-applying the quarantine of %s failed: %s", name, aws_code(err))
            return f"re-applying its quarantine failed too ({aws_code(err)})"
        return "its quarantine was re-applied"

    def _fail_removal(
        self, err: ClientError, kind: NhiKind, name: str, doing: str, hint: str | None
    ) -> ApplicationError:
        """A failed removal step: re-lock, then the classified error naming the step."""
        relocked = self._relock(kind, name)
        return classify_aws(err, f"{doing}; {relocked}", hint=hint)

    def _role_remains(self, name: str) -> str | None:
        """What a fresh read finds of the role: None when it is gone, else what is left."""
        iam = self._iam
        try:
            iam.get_role(RoleName=name)
            parts = [
                f"inline policy {p}"
                for p in _listed(iam.list_role_policies, "PolicyNames", RoleName=name)
            ]
            parts += [
                f"managed policy {a['PolicyArn']}"
                for a in _listed(iam.list_attached_role_policies, "AttachedPolicies", RoleName=name)
            ]
            parts += [
                f"instance profile {p['InstanceProfileName']}"
                for p in _listed(
                    iam.list_instance_profiles_for_role, "InstanceProfiles", RoleName=name
                )
            ]
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return None
            raise classify_aws(err, f"proving role {name} is gone") from err
        return ", ".join(parts) or "nothing attached"

    def _user_remains(self, name: str) -> str | None:
        """What a fresh read finds of the user: None when it is gone, else what is left."""
        iam = self._iam
        try:
            iam.get_user(UserName=name)
            parts = [
                f"access key {k['AccessKeyId']} ({k['Status']})"
                for k in _listed(iam.list_access_keys, "AccessKeyMetadata", UserName=name)
            ]
            parts += [
                f"inline policy {p}"
                for p in _listed(iam.list_user_policies, "PolicyNames", UserName=name)
            ]
            parts += [
                f"managed policy {a['PolicyArn']}"
                for a in _listed(iam.list_attached_user_policies, "AttachedPolicies", UserName=name)
            ]
            parts += [
                f"group {g['GroupName']}"
                for g in _listed(iam.list_groups_for_user, "Groups", UserName=name)
            ]
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return None
            raise classify_aws(err, f"proving user {name} is gone") from err
        return ", ".join(parts) or "nothing attached"

    @staticmethod
    def _remains_or_unknown(read: Callable[[str], str | None], name: str) -> str:
        """What is left, for an operator's sentence; never fails the error it explains."""
        try:
            return read(name) or "nothing"
        except ApplicationError:
            return "something (unreadable)"

    def _not_removed(self, kind: NhiKind, what: str, name: str, remains: str) -> ApplicationError:
        relocked = self._relock(kind, name)
        message = f"{what} {name} still exists after its deletion ({remains}); {relocked}; retrying"
        return ApplicationError(
            message,
            {"code": "NotRemoved", "message": message, "remains": remains},
            type="NotRemoved",
        )

    def _remove_role(self, name: str) -> list[str]:
        """Managed policies, instance profiles and the other inline policies first; the
        quarantine's deny policies last, right before DeleteRole; then prove it is gone."""
        iam = self._iam
        kind = NhiKind.IAM_ROLE
        done: list[str] = []
        doing, hint = f"removing role {name}", None
        try:
            for attached in _listed(
                iam.list_attached_role_policies, "AttachedPolicies", RoleName=name
            ):
                arn = attached["PolicyArn"]
                doing = f"detaching {arn} from role {name}"
                hint = (
                    f"Operator: a managed policy attached outside nhi-lifecycle blocks the "
                    f"removal: detach {arn} from role {name} (or allow the worker "
                    f"iam:DetachRolePolicy on it); the role stays quarantined and the removal "
                    f"retries"
                )
                if _gone_ok(iam.detach_role_policy, RoleName=name, PolicyArn=arn):
                    done.append(f"attached policy {arn}")
            for profile in _listed(
                iam.list_instance_profiles_for_role, "InstanceProfiles", RoleName=name
            ):
                profile_name = profile["InstanceProfileName"]
                doing = f"removing role {name} from instance profile {profile_name}"
                hint = (
                    f"Operator: instance profile {profile_name} (made outside nhi-lifecycle) "
                    f"holds role {name}: remove the role from it; the removal retries"
                )
                if _gone_ok(
                    iam.remove_role_from_instance_profile,
                    InstanceProfileName=profile_name,
                    RoleName=name,
                ):
                    done.append(f"instance profile {profile_name}")
            hint = None
            inline = _listed(iam.list_role_policies, "PolicyNames", RoleName=name)
            # The scope (and anything else granting access) before the denies that hold it.
            for policy in sorted(inline, key=_deny_last):
                doing = f"deleting inline policy {policy} of role {name}"
                if _gone_ok(iam.delete_role_policy, RoleName=name, PolicyName=policy):
                    done.append(f"inline policy {policy}")
            doing = f"deleting role {name}"
            if _gone_ok(iam.delete_role, RoleName=name):
                done.append(f"role {name}")
        except ClientError as err:
            if aws_code(err) == "DeleteConflict" and doing == f"deleting role {name}":
                left = self._remains_or_unknown(self._role_remains, name)
                hint = _conflict_hint("role", name, left)
            hint = hint or _access_hint(err, f"role {name}")
            raise self._fail_removal(err, kind, name, doing, hint) from err
        remains = self._role_remains(name)
        if remains is not None:
            raise self._not_removed(kind, "role", name, remains)
        return done

    def _remove_user(self, name: str) -> list[str]:
        """Credentials (console password, keys, certificates, SSH keys, MFA), groups, managed
        and other inline policies first; the quarantine's deny policy last, right before
        DeleteUser; then prove it is gone."""
        iam = self._iam
        kind = NhiKind.IAM_USER_KEY
        done: list[str] = []
        doing, hint = f"deleting the login profile of user {name}", None
        try:
            if _gone_ok(iam.delete_login_profile, UserName=name):
                done.append("login profile")
            for key in _listed(iam.list_access_keys, "AccessKeyMetadata", UserName=name):
                key_id = key["AccessKeyId"]
                doing = f"deleting access key {key_id} of user {name}"
                if _gone_ok(iam.delete_access_key, UserName=name, AccessKeyId=key_id):
                    done.append(f"access key {key_id}")
            for cert in _listed(iam.list_signing_certificates, "Certificates", UserName=name):
                cert_id = cert["CertificateId"]
                doing = f"deleting signing certificate {cert_id} of user {name}"
                if _gone_ok(iam.delete_signing_certificate, UserName=name, CertificateId=cert_id):
                    done.append(f"signing certificate {cert_id}")
            for ssh in _listed(iam.list_ssh_public_keys, "SSHPublicKeys", UserName=name):
                ssh_id = ssh["SSHPublicKeyId"]
                doing = f"deleting SSH public key {ssh_id} of user {name}"
                if _gone_ok(iam.delete_ssh_public_key, UserName=name, SSHPublicKeyId=ssh_id):
                    done.append(f"ssh public key {ssh_id}")
            for device in _listed(iam.list_mfa_devices, "MFADevices", UserName=name):
                serial = device["SerialNumber"]
                doing = f"deactivating MFA device {serial} of user {name}"
                if _gone_ok(iam.deactivate_mfa_device, UserName=name, SerialNumber=serial):
                    done.append(f"mfa device {serial}")
            for group in _listed(iam.list_groups_for_user, "Groups", UserName=name):
                group_name = group["GroupName"]
                doing = f"removing user {name} from group {group_name}"
                hint = (
                    f"Operator: user {name} was added to group {group_name} outside "
                    f"nhi-lifecycle: remove it from the group; the removal retries"
                )
                if _gone_ok(iam.remove_user_from_group, GroupName=group_name, UserName=name):
                    done.append(f"group membership {group_name}")
            for attached in _listed(
                iam.list_attached_user_policies, "AttachedPolicies", UserName=name
            ):
                arn = attached["PolicyArn"]
                doing = f"detaching {arn} from user {name}"
                hint = (
                    f"Operator: a managed policy attached outside nhi-lifecycle blocks the "
                    f"removal: detach {arn} from user {name} (or allow the worker "
                    f"iam:DetachUserPolicy on it); the user stays quarantined and the removal "
                    f"retries"
                )
                if _gone_ok(iam.detach_user_policy, UserName=name, PolicyArn=arn):
                    done.append(f"attached policy {arn}")
            hint = None
            inline = _listed(iam.list_user_policies, "PolicyNames", UserName=name)
            for policy in sorted(inline, key=_deny_last):
                doing = f"deleting inline policy {policy} of user {name}"
                if _gone_ok(iam.delete_user_policy, UserName=name, PolicyName=policy):
                    done.append(f"inline policy {policy}")
            doing = f"deleting user {name}"
            if _gone_ok(iam.delete_user, UserName=name):
                done.append(f"user {name}")
        except ClientError as err:
            if aws_code(err) == "DeleteConflict" and doing == f"deleting user {name}":
                left = self._remains_or_unknown(self._user_remains, name)
                hint = _conflict_hint("user", name, left)
            hint = hint or _access_hint(err, f"user {name}")
            raise self._fail_removal(err, kind, name, doing, hint) from err
        remains = self._user_remains(name)
        if remains is not None:
            raise self._not_removed(kind, "user", name, remains)
        return done

    def _remove_secret(self, name: str, *, force: bool) -> list[str]:
        # An orphan whose secret was never found has no name; one already scheduled for
        # deletion counts as removed by the run that scheduled it.
        return [f"secret {name}"] if self._store.delete(name, force=force) else []
