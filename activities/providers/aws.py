"""The AWS provider: IAM roles, and IAM users with access keys delivered into Secrets Manager.

Every method is idempotent: names are deterministic, "already exists" is checked against our
own tags, and "not found" during removal counts as removed. Secrets go from IAM straight into
Secrets Manager inside one call; only references leave.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from botocore.exceptions import ClientError
from temporalio.exceptions import ApplicationError

from activities._support import aws_code, classify_aws
from activities.providers.base import (
    EXPIRES_AT_TAG,
    NHI_ID_TAG,
    Discovery,
    Known,
    Pace,
    expires_tag,
    marker_tags,
)
from activities.providers.secret_store import CURRENT, PENDING, PREVIOUS, SecretStore
from models.contracts import (
    IdentityCreated,
    IdentityRef,
    ProvisionPlan,
    RemovalResult,
    StagedKey,
)
from models.enums import NhiKind, Platform
from nhi import MANAGED_BY
from nhi.infra.aws_clients import AwsClients
from nhi.rules.findings import PlatformIdentity
from nhi.rules.policy import identity_policy_document, trust_policy_document

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


def _arn(attached: Mapping[str, Any]) -> str:
    return str(attached["PolicyArn"])


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
    """IAM's form of the provider's tags (the same the delivery secret carries)."""
    return [{"Key": k, "Value": v} for k, v in sorted(marker_tags(plan).items())]


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


_Listing = tuple[str, str, str, Callable[[Any], str]]


@dataclass(frozen=True)
class _Shape:
    """The IAM operations one kind of identity is read and removed with: IAM names them
    alike for roles and users (`list_role_policies`, `list_user_policies`)."""

    what: str  # "role" or "user", as messages and IAM's operation names say it
    param: str  # RoleName or UserName
    # What a fresh read lists as still attached besides the policies, before and after them
    # in its report: (label, listing, result key, entry's name).
    before: tuple[_Listing, ...]
    after: tuple[_Listing, ...]

    def op(self, template: str) -> str:
        """An operation's name, e.g. `op("list_{}_policies")`."""
        return template.format(self.what)

    @property
    def attached(self) -> tuple[_Listing, ...]:
        policies: tuple[_Listing, ...] = (
            ("inline policy", self.op("list_{}_policies"), "PolicyNames", str),
            ("managed policy", self.op("list_attached_{}_policies"), "AttachedPolicies", _arn),
        )
        return self.before + policies + self.after


_SHAPES = {
    NhiKind.IAM_ROLE: _Shape(
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
    NhiKind.IAM_USER_KEY: _Shape(
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


@dataclass(frozen=True)
class _Step:
    """One removal call: what it does (for the error), the call, and what it removed."""

    doing: str
    call: Callable[..., object]
    params: dict[str, Any]
    done: str
    hint: str | None = None


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
        shape = _SHAPES[kind]
        listing: Any = getattr(self._iam, shape.op("list_{}_tags"))
        return {t["Key"]: t["Value"] for t in listing(**{shape.param: name})["Tags"]}

    def _document(self, kind: NhiKind, name: str) -> dict[str, Any]:
        """The scope policy IAM holds ({} when there is none)."""
        shape = _SHAPES[kind]
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
        tag: list[TagTypeDef] = [{"Key": EXPIRES_AT_TAG, "Value": expires_tag(plan.expires_at)}]
        try:
            if plan.kind is NhiKind.IAM_ROLE:
                self._iam.put_role_policy(
                    RoleName=plan.identity_name,
                    PolicyName=SCOPE_POLICY_NAME,
                    PolicyDocument=_policy_json(plan),
                )
                self._iam.tag_role(RoleName=plan.identity_name, Tags=tag)
            else:
                self._iam.put_user_policy(
                    UserName=plan.identity_name,
                    PolicyName=SCOPE_POLICY_NAME,
                    PolicyDocument=_policy_json(plan),
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
            if aws_code(err) not in _NOT_FOUND:
                doing = "deleting" if delete else "deactivating"
                raise classify_aws(err, f"{doing} key {key_id}") from err

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

    def disable(self, ref: IdentityRef) -> list[str]:
        """Stop the credential working without deleting anything yet (restorable)."""
        try:
            return self._quarantine(ref.kind, ref.name, datetime.now(UTC))
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return ["already gone"]
            raise classify_aws(err, f"quarantining {ref.name}") from err

    def verify_disabled(self, ref: IdentityRef) -> None:
        """Prove the quarantine from IAM's own state: deny policy in place, no active key.

        (moto does not refuse inactive keys, so a login attempt would prove nothing there; the
        state is what AWS enforces.)
        """
        try:
            if ref.kind is NhiKind.IAM_ROLE:
                names = self._iam.list_role_policies(RoleName=ref.name)["PolicyNames"]
            else:
                names = self._iam.list_user_policies(UserName=ref.name)["PolicyNames"]
                keys = self._iam.list_access_keys(UserName=ref.name)["AccessKeyMetadata"]
                active = [k["AccessKeyId"] for k in keys if k["Status"] == "Active"]
                if active:
                    raise ApplicationError(f"keys still active: {active}", type="NotQuarantined")
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return
            raise classify_aws(err, f"checking the quarantine of {ref.name}") from err
        if QUARANTINE_POLICY_NAME not in names:
            raise ApplicationError("deny-all policy not in place", type="NotQuarantined")

    def enable(self, ref: IdentityRef) -> None:
        """Restore: remove the deny-all and reactivate the delivered key (older sessions stay
        revoked)."""
        try:
            if ref.kind is NhiKind.IAM_ROLE:
                self._iam.delete_role_policy(RoleName=ref.name, PolicyName=QUARANTINE_POLICY_NAME)
                return
            current = self._stage_key_ids(ref.secret_name).get(CURRENT) if ref.secret_name else None
            if current:
                self._iam.update_access_key(UserName=ref.name, AccessKeyId=current, Status="Active")
            self._iam.delete_user_policy(UserName=ref.name, PolicyName=QUARANTINE_POLICY_NAME)
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return
            raise classify_aws(err, f"restoring {ref.name}") from err


class AwsProvider(_AwsLifecycle, AwsDiscovery):
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

    def _create_user(self, plan: ProvisionPlan) -> IdentityCreated:
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

    def delete(self, ref: IdentityRef, *, force_delete_secret: bool = False) -> RemovalResult:
        """Strip the identity, delete it, prove it is gone, then delete its secret.

        Containment is monotonic: everything that grants access goes first; what quarantine
        put in place (the deny policies) goes last, right before the delete call. A step that
        fails re-applies the quarantine before raising, so a removal stopped half way leaves
        the identity at least as locked as quarantine. Each step's own "not found" counts as
        done, and only a fresh read that no longer finds the identity ends the removal.
        """
        removed = self._remove(ref.kind, ref.name)
        try:
            removed += self._remove_secret(ref.secret_name, force=force_delete_secret)
        except ClientError as err:
            raise classify_aws(err, f"deleting secret {ref.secret_name}") from err
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

    def _remains(self, kind: NhiKind, name: str) -> str | None:
        """What a fresh read finds of the identity: None when it is gone, else what is left."""
        shape = _SHAPES[kind]
        iam: Any = self._iam
        by_name = {shape.param: name}
        try:
            getattr(iam, shape.op("get_{}"))(**by_name)
            parts = [
                f"{label} {named(entry)}"
                for label, operation, key, named in shape.attached
                for entry in _listed(getattr(iam, operation), key, **by_name)
            ]
        except ClientError as err:
            if aws_code(err) in _NOT_FOUND:
                return None
            raise classify_aws(err, f"proving {shape.what} {name} is gone") from err
        return ", ".join(parts) or "nothing attached"

    def _remains_or_unknown(self, kind: NhiKind, name: str) -> str:
        """What is left, for an operator's sentence; never fails the error it explains."""
        try:
            return self._remains(kind, name) or "nothing"
        except ApplicationError:
            return "something (unreadable)"

    def _not_removed(self, kind: NhiKind, name: str, remains: str) -> ApplicationError:
        relocked = self._relock(kind, name)
        what = _SHAPES[kind].what
        message = f"{what} {name} still exists after its deletion ({remains}); {relocked}; retrying"
        return ApplicationError(
            message,
            {"code": "NotRemoved", "message": message, "remains": remains},
            type="NotRemoved",
        )

    def _remove(self, kind: NhiKind, name: str) -> list[str]:
        """Run the removal steps in order (each one's "not found" counts as done), then prove
        the identity is gone. A failed step re-locks the identity and raises, naming the step
        and, where there is one, what the operator does about it."""
        what = _SHAPES[kind].what
        steps = self._role_steps(name) if kind is NhiKind.IAM_ROLE else self._user_steps(name)
        done: list[str] = []
        # A listing between steps that fails is reported as part of the step before it.
        doing, hint = f"removing {what} {name}", None
        try:
            for step in steps:
                doing, hint = step.doing, step.hint
                if _gone_ok(step.call, **step.params):
                    done.append(step.done)
        except ClientError as err:
            if aws_code(err) == "DeleteConflict" and doing == f"deleting {what} {name}":
                hint = _conflict_hint(what, name, self._remains_or_unknown(kind, name))
            hint = hint or _access_hint(err, f"{what} {name}")
            raise self._fail_removal(err, kind, name, doing, hint) from err
        remains = self._remains(kind, name)
        if remains is not None:
            raise self._not_removed(kind, name, remains)
        return done

    def _role_steps(self, name: str) -> Iterator[_Step]:
        """Managed policies, instance profiles, then the inline policies and the role."""
        iam = self._iam
        yield from self._detach_steps(NhiKind.IAM_ROLE, name)
        for profile in _listed(
            iam.list_instance_profiles_for_role, "InstanceProfiles", RoleName=name
        ):
            profile_name = profile["InstanceProfileName"]
            yield _Step(
                f"removing role {name} from instance profile {profile_name}",
                iam.remove_role_from_instance_profile,
                {"InstanceProfileName": profile_name, "RoleName": name},
                f"instance profile {profile_name}",
                hint=(
                    f"Operator: instance profile {profile_name} (made outside nhi-lifecycle) "
                    f"holds role {name}: remove the role from it; the removal retries"
                ),
            )
        yield from self._final_steps(NhiKind.IAM_ROLE, name)

    def _user_steps(self, name: str) -> Iterator[_Step]:
        """Credentials (console password, keys, certificates, SSH keys, MFA), groups, managed
        policies, then the inline policies and the user."""
        iam = self._iam
        user = {"UserName": name}
        yield _Step(
            f"deleting the login profile of user {name}",
            iam.delete_login_profile,
            user,
            "login profile",
        )
        # Every kind of credential a user can hold: (what, listing, result key, id, removal).
        credentials: tuple[tuple[str, Callable[..., Any], str, str, Callable[..., object]], ...] = (
            (
                "access key",
                iam.list_access_keys,
                "AccessKeyMetadata",
                "AccessKeyId",
                iam.delete_access_key,
            ),
            (
                "signing certificate",
                iam.list_signing_certificates,
                "Certificates",
                "CertificateId",
                iam.delete_signing_certificate,
            ),
            (
                "SSH public key",
                iam.list_ssh_public_keys,
                "SSHPublicKeys",
                "SSHPublicKeyId",
                iam.delete_ssh_public_key,
            ),
            (
                "MFA device",
                iam.list_mfa_devices,
                "MFADevices",
                "SerialNumber",
                iam.deactivate_mfa_device,
            ),
        )
        for what, listing, key, field, remove in credentials:
            for entry in _listed(listing, key, UserName=name):
                ident = entry[field]
                verb = "deactivating" if what == "MFA device" else "deleting"
                yield _Step(
                    f"{verb} {what} {ident} of user {name}",
                    remove,
                    user | {field: ident},
                    f"{what.lower()} {ident}",
                )
        for group in _listed(iam.list_groups_for_user, "Groups", UserName=name):
            group_name = group["GroupName"]
            yield _Step(
                f"removing user {name} from group {group_name}",
                iam.remove_user_from_group,
                user | {"GroupName": group_name},
                f"group membership {group_name}",
                hint=(
                    f"Operator: user {name} was added to group {group_name} outside "
                    f"nhi-lifecycle: remove it from the group; the removal retries"
                ),
            )
        yield from self._detach_steps(NhiKind.IAM_USER_KEY, name)
        yield from self._final_steps(NhiKind.IAM_USER_KEY, name)

    def _detach_steps(self, kind: NhiKind, name: str) -> Iterator[_Step]:
        """Managed policies attached (outside nhi-lifecycle: we attach none)."""
        shape = _SHAPES[kind]
        iam: Any = self._iam
        by_name = {shape.param: name}
        for attached in _listed(
            getattr(iam, shape.op("list_attached_{}_policies")), "AttachedPolicies", **by_name
        ):
            arn = attached["PolicyArn"]
            yield _Step(
                f"detaching {arn} from {shape.what} {name}",
                getattr(iam, shape.op("detach_{}_policy")),
                by_name | {"PolicyArn": arn},
                f"attached policy {arn}",
                hint=(
                    f"Operator: a managed policy attached outside nhi-lifecycle blocks the "
                    f"removal: detach {arn} from {shape.what} {name} (or allow the worker "
                    f"iam:Detach{shape.what.title()}Policy on it); the {shape.what} stays "
                    f"quarantined and the removal retries"
                ),
            )

    def _final_steps(self, kind: NhiKind, name: str) -> Iterator[_Step]:
        """The inline policies, the scope (and anything else granting access) before the
        quarantine's denies that hold it; then the identity itself."""
        shape = _SHAPES[kind]
        iam: Any = self._iam
        by_name = {shape.param: name}
        inline = _listed(getattr(iam, shape.op("list_{}_policies")), "PolicyNames", **by_name)
        for policy in sorted(inline, key=_deny_last):
            yield _Step(
                f"deleting inline policy {policy} of {shape.what} {name}",
                getattr(iam, shape.op("delete_{}_policy")),
                by_name | {"PolicyName": policy},
                f"inline policy {policy}",
            )
        yield _Step(
            f"deleting {shape.what} {name}",
            getattr(iam, shape.op("delete_{}")),
            by_name,
            f"{shape.what} {name}",
        )

    def _remove_secret(self, name: str, *, force: bool) -> list[str]:
        # An orphan whose secret was never found has no name; one already scheduled for
        # deletion counts as removed by the run that scheduled it.
        return [f"secret {name}"] if self._store.delete(name, force=force) else []
