"""Containment and removal of AWS identities (the second half of AwsProvider).

Containment (`disable`) puts deny-all policies in place (roles: and sessions issued before it
revoked; users: every key inactive), restorably; `verify_disabled` proves it from IAM's own
state; `enable` lifts it. Removal (`delete`) is staged: everything that grants access goes
first, the quarantine's denies last, right before the identity itself; a failed step re-locks
the identity before raising, and only a fresh read that no longer finds the identity ends it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from temporalio.exceptions import ApplicationError

from activities._support import aws_code, classify_aws
from activities.providers.aws_iam import (
    NOT_FOUND,
    QUARANTINE_POLICY_NAME,
    REVOKE_SESSIONS_POLICY_NAME,
    SHAPES,
    Shape,
    deny_all,
    deny_last,
    deny_sessions_issued_before,
    listed,
    stage_key_ids,
)
from activities.providers.secret_store import CURRENT, SecretStore
from models.contracts import IdentityRef, RemovalResult
from models.enums import NhiKind
from nhi.infra.ratelimit import THROTTLING_CODES, TokenBucket

if TYPE_CHECKING:
    from types_boto3_iam import IAMClient

log = logging.getLogger(__name__)
PACE_ID = "nhi-removal-pace"
# The budget of the thread removing orphans for a sweep (`AwsRemoval.paced`): the client is
# shared with every other activity, and only those threads' calls are paced.
_pacing = threading.local()


def _pace(**_: Any) -> None:
    """Before each IAM call: its share of the pacing thread's budget, if it has one."""
    budget: TokenBucket | None = getattr(_pacing, "budget", None)
    if budget is not None:
        budget.acquire()


def _paced_attempt(response: Any = None, **_: Any) -> None:
    """After each attempt (botocore's own retries too): a throttle halves the budget."""
    budget: TokenBucket | None = getattr(_pacing, "budget", None)
    if budget is None or response is None:
        return
    code = response[1].get("Error", {}).get("Code") if len(response) > 1 else None
    if code in THROTTLING_CODES:
        budget.throttled()
    elif code is None:
        budget.succeeded()


def _gone_ok(call: Callable[..., object], **params: Any) -> bool:
    """One removal step. Its own "not found" (this key, policy or profile, or the identity
    itself) means already done: False; True when the step acted."""
    try:
        call(**params)
    except ClientError as err:
        if aws_code(err) in NOT_FOUND:
            return False
        raise
    return True


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


@dataclass(frozen=True)
class _Step:
    """One removal call: what it does (for the error), the call, and what it removed."""

    doing: str
    call: Callable[..., object]
    params: dict[str, Any]
    done: str
    hint: str | None = None


class AwsRemoval:
    """Quarantine, prove, lift and remove AWS identities."""

    _iam: IAMClient
    _store: SecretStore

    def _quarantine(self, kind: NhiKind, name: str, now: datetime) -> list[str]:
        """Quarantine `name`: deny-all policy and older sessions revoked; users' keys
        inactive. Raises ClientError (NoSuchEntity when the identity is gone)."""
        done: list[str] = []
        if kind is NhiKind.IAM_ROLE:
            self._iam.put_role_policy(
                RoleName=name, PolicyName=QUARANTINE_POLICY_NAME, PolicyDocument=deny_all()
            )
            # Scopes leave a role room for it; a LimitExceeded here still fails the quarantine.
            self._revoke_sessions(SHAPES[kind], name, now)
            return ["deny-all policy", "sessions issued before now revoked"]
        for key in self._iam.list_access_keys(UserName=name)["AccessKeyMetadata"]:
            if key["Status"] != "Inactive":
                self._iam.update_access_key(
                    UserName=name, AccessKeyId=key["AccessKeyId"], Status="Inactive"
                )
            done.append(f"key {key['AccessKeyId']} inactive")
        self._iam.put_user_policy(
            UserName=name, PolicyName=QUARANTINE_POLICY_NAME, PolicyDocument=deny_all()
        )
        done.append("deny-all policy")
        # Session tokens made with the user's key (GetSessionToken, GetFederationToken: up to
        # 36 h) outlive the key's deactivation and are refused only by the user's policies;
        # AWS offers no "revoke sessions" for users, so this is the same deny a role gets.
        if self._revoke_sessions(SHAPES[kind], name, now):
            done.append("sessions issued before now revoked")
        else:
            done.append(
                "sessions not revoked: no room under IAM's inline policy size limit (a scope "
                "made before the quarantine's reserve); the deny-all refuses them meanwhile"
            )
        return done

    def _revoke_sessions(self, shape: Shape, name: str, at: datetime) -> bool:
        """Put the session revocation at `at`; False when IAM's limit on the size of an
        identity's inline policies leaves no room for it. Only a user whose scope was accepted
        before scopes kept room for the quarantine (`QUARANTINE_POLICY_RESERVE`) can be that
        full: its quarantine and restore go on as they did before users had a revocation."""
        try:
            getattr(self._iam, shape.op("put_{}_policy"))(
                **{shape.param: name},
                PolicyName=REVOKE_SESSIONS_POLICY_NAME,
                PolicyDocument=deny_sessions_issued_before(at),
            )
        except ClientError as err:
            if shape.what != "user" or aws_code(err) not in (
                "LimitExceeded",
                "LimitExceededException",
            ):
                raise
            log.warning("no room to revoke the sessions of user %s: %s", name, aws_code(err))
            return False
        return True

    @contextmanager
    def paced(self, budget: TokenBucket) -> Iterator[None]:
        """Every IAM call this thread makes meanwhile takes its share of `budget` (a sweep's
        one budget), and throttled attempts slow the budget down."""
        events = self._iam.meta.events
        # Registered once per client (unique ids); inert for threads without a budget.
        events.register("before-call.iam", _pace, unique_id=f"{PACE_ID}-call")
        events.register("needs-retry.iam", _paced_attempt, unique_id=f"{PACE_ID}-retry")
        _pacing.budget = budget
        try:
            yield
        finally:
            _pacing.budget = None

    def remove_now(self, ref: IdentityRef) -> RemovalResult:
        """Remove an identity whose grace period is over in one pass (a sweep's orphan).

        The first call is the deny-all (roles: and their older sessions revoked): from then on
        every request signed by any of its keys or sessions is refused, as after `disable`.
        A user's keys are not made inactive first, as `disable` does: `delete` deletes them a
        few calls later, and the deny-all refuses them meanwhile; a removal that fails half way
        re-applies the whole quarantine (keys inactive too) before raising. So there is no
        moment after the sweep decided at which a key or session of the identity works, with
        two calls fewer per user than quarantine-then-delete."""
        try:
            if ref.kind is NhiKind.IAM_ROLE:
                self._quarantine(ref.kind, ref.name, datetime.now(UTC))
            else:
                self._iam.put_user_policy(
                    UserName=ref.name, PolicyName=QUARANTINE_POLICY_NAME, PolicyDocument=deny_all()
                )
        except ClientError as err:
            if aws_code(err) not in NOT_FOUND:  # gone: `delete` proves it and takes the secret
                raise classify_aws(err, f"quarantining {ref.name}") from err
        return self.delete(ref)

    def disable(self, ref: IdentityRef) -> list[str]:
        """Stop the credential working without deleting anything yet (restorable)."""
        try:
            return self._quarantine(ref.kind, ref.name, datetime.now(UTC))
        except ClientError as err:
            if aws_code(err) in NOT_FOUND:
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
            if aws_code(err) in NOT_FOUND:
                return
            raise classify_aws(err, f"checking the quarantine of {ref.name}") from err
        if QUARANTINE_POLICY_NAME not in names:
            raise ApplicationError("deny-all policy not in place", type="NotQuarantined")

    def enable(self, ref: IdentityRef) -> None:
        """Restore: remove the deny-all and reactivate the delivered key. Sessions issued
        before the restore stay revoked, those issued while it was quarantined too.

        A session issued during the quarantine (AssumeRole still answers on a quarantined
        role; a leaked user key's GetSessionToken before it) is refused only by the deny-all,
        and would work for the rest of its lifetime once that goes. So the revocation moves to
        now first, then the deny-all goes: containment never has a gap. Only while the
        deny-all is there (NoSuchEntity below): a retry after it went must not revoke the
        sessions issued since the restore."""
        shape = SHAPES[ref.kind]
        who = {shape.param: ref.name}
        try:
            denied = self._has_policy(shape, ref.name, QUARANTINE_POLICY_NAME)
            if denied:
                self._revoke_sessions(shape, ref.name, datetime.now(UTC))
            if ref.kind is not NhiKind.IAM_ROLE and ref.secret_name:
                current = stage_key_ids(self._store, ref.secret_name).get(CURRENT)
                if current:
                    self._iam.update_access_key(
                        UserName=ref.name, AccessKeyId=current, Status="Active"
                    )
            if denied:
                getattr(self._iam, shape.op("delete_{}_policy"))(
                    **who, PolicyName=QUARANTINE_POLICY_NAME
                )
        except ClientError as err:
            if aws_code(err) in NOT_FOUND:
                return
            raise classify_aws(err, f"restoring {ref.name}") from err

    def _has_policy(self, shape: Shape, name: str, policy: str) -> bool:
        """Whether the identity has this inline policy. Raises ClientError (NoSuchEntity when
        the identity itself is gone: the policy's absence reads as False)."""
        try:
            getattr(self._iam, shape.op("get_{}_policy"))(**{shape.param: name}, PolicyName=policy)
        except ClientError as err:
            if aws_code(err) not in NOT_FOUND:
                raise
            # NoSuchEntity names the policy or the identity; a gone identity fails the next
            # call with NoSuchEntity too, which `enable` takes as done.
            return False
        return True

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
            if aws_code(err) in NOT_FOUND:
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
        shape = SHAPES[kind]
        iam: Any = self._iam
        by_name = {shape.param: name}
        try:
            getattr(iam, shape.op("get_{}"))(**by_name)
            parts = [
                f"{label} {named(entry)}"
                for label, operation, key, named in shape.attached
                for entry in listed(getattr(iam, operation), key, **by_name)
            ]
        except ClientError as err:
            if aws_code(err) in NOT_FOUND:
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
        what = SHAPES[kind].what
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
        what = SHAPES[kind].what
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
        for profile in listed(
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
            for entry in listed(listing, key, UserName=name):
                ident = entry[field]
                verb = "deactivating" if what == "MFA device" else "deleting"
                yield _Step(
                    f"{verb} {what} {ident} of user {name}",
                    remove,
                    user | {field: ident},
                    f"{what.lower()} {ident}",
                )
        for group in listed(iam.list_groups_for_user, "Groups", UserName=name):
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
        shape = SHAPES[kind]
        iam: Any = self._iam
        by_name = {shape.param: name}
        for attached in listed(
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
        shape = SHAPES[kind]
        iam: Any = self._iam
        by_name = {shape.param: name}
        inline = listed(getattr(iam, shape.op("list_{}_policies")), "PolicyNames", **by_name)
        for policy in sorted(inline, key=deny_last):
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
