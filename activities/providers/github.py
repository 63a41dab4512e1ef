"""The GitHub provider: `github_app_token` NHIs, installation tokens of the organisation's
GitHub App.

GitHub has no identity per NHI: what an NHI holds is an installation access token narrowed to
its repositories and permissions (`POST /app/installations/{id}/access_tokens`, signed with an
app JWT), valid one hour. So:

* `create` checks the installation still holds what the grant needs; nothing is made;
* `deliver` issues the first token into the secret store (as every kind's credential is
  delivered: by reference), tagged so retirement and sweeps find it by the NHI's name;
* re-issue is the lifecycle's rotation: every `REISSUE_PERIOD_SECONDS` (shorter than the hour)
  a new token is staged as pending, proven, promoted; the old one is revoked after the overlap
  (or has lapsed by then: 401 counts as done);
* containment and removal revoke every token the delivery secret holds
  (`DELETE /installation/token`) and prove each one answers 401 afterwards.

The app's private key is read from Secrets Manager by reference
(`NHI_GITHUB_APP_PRIVATE_KEY_SECRET`) at each signing and never kept. A token issued whose
storing failed (a crash between the two) is unknown to everyone and lapses within the hour:
GitHub lists no installation tokens, so no sweep can find it.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
import jwt
from botocore.exceptions import ClientError
from temporalio.exceptions import ApplicationError

from activities._support import classify_aws
from activities.providers.base import NHI_ID_TAG, Discovery, Known, Pace, marker_tags
from activities.providers.secret_store import CURRENT, PENDING, PREVIOUS, SecretStore, SecretValue
from models.contracts import IdentityCreated, IdentityRef, ProvisionPlan, RemovalResult, StagedKey
from models.enums import NhiKind, Platform
from nhi import MANAGED_BY
from nhi.infra.config import Settings
from nhi.rules.findings import PlatformIdentity
from nhi.rules.github_scope import TokenScope, parse_token_scope, scope_drift
from nhi.rules.policy import RuleViolation

if TYPE_CHECKING:
    from types_boto3_secretsmanager import SecretsManagerClient

log = logging.getLogger(__name__)

IDENTITY_TAG = "nhi:identity"  # the NHI's name: how retirement and sweeps find the secret
PLATFORM_TAG = "nhi:platform"
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def fail(message: str, kind: str, *, retryable: bool = False) -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=not retryable)


def _http_error(response: httpx.Response, doing: str) -> ApplicationError:
    """A GitHub answer as a classified error: its status as the type (`GitHub422`), retryable
    for rate limits and server errors. The body's message only: it never holds a token."""
    try:
        message = str(response.json().get("message", ""))[:300]
    except ValueError:
        message = ""
    retryable = response.status_code in _RETRYABLE_STATUS or (
        response.status_code == 403 and response.headers.get("x-ratelimit-remaining") == "0"
    )
    return fail(
        f"{doing}: GitHub answered {response.status_code} {message}".strip(),
        f"GitHub{response.status_code}",
        retryable=retryable,
    )


class GithubClient:
    """The few GitHub REST calls the provider makes, as the app (JWT) or with a token."""

    def __init__(
        self, settings: Settings, secrets_client: SecretsManagerClient, http: httpx.Client | None
    ) -> None:
        self._settings = settings
        self._secrets = secrets_client
        self._http = http or httpx.Client(timeout=15.0)
        self.api = settings.github_api_url.rstrip("/")

    @property
    def installation_id(self) -> int:
        if not (
            self._settings.github_app_id
            and self._settings.github_app_private_key_secret
            and self._settings.github_installation_id
        ):
            raise fail(
                "GitHub is not configured on this worker (NHI_GITHUB_APP_ID, "
                "NHI_GITHUB_APP_PRIVATE_KEY_SECRET, NHI_GITHUB_INSTALLATION_ID)",
                "NotConfigured",
            )
        return self._settings.github_installation_id

    def _app_jwt(self) -> str:
        name = self._settings.github_app_private_key_secret or ""
        try:
            text = self._secrets.get_secret_value(SecretId=name)["SecretString"]
        except ClientError as err:
            raise classify_aws(err, "reading the GitHub App's private key") from err
        if text.lstrip().startswith("{"):
            text = str(json.loads(text).get("private_key", ""))
        now = int(time.time())
        # Backdated a minute for clock drift; GitHub refuses more than ten minutes of life.
        claims = {"iat": now - 60, "exp": now + 540, "iss": self._settings.github_app_id}
        return jwt.encode(claims, text, algorithm="RS256")

    def _call(
        self, method: str, path: str, auth: str, doing: str, body: object = None
    ) -> httpx.Response:
        try:
            return self._http.request(
                method,
                f"{self.api}{path}",
                headers={
                    "Authorization": f"Bearer {auth}",
                    "Accept": "application/vnd.github+json",
                    "X-GitHub-Api-Version": "2022-11-28",
                },
                json=body,
            )
        except httpx.HTTPError as err:
            raise fail(
                f"{doing}: {type(err).__name__}", "GitHubUnreachable", retryable=True
            ) from None

    def installation(self) -> dict[str, Any]:
        """`GET /app/installations/{id}`: the account, permissions and repository selection."""
        doing = "reading the GitHub App installation"
        response = self._call(
            "GET", f"/app/installations/{self.installation_id}", self._app_jwt(), doing
        )
        if response.status_code != 200:
            raise _http_error(response, doing)
        return dict(response.json())

    def issue(self, scope: TokenScope | None) -> dict[str, Any]:
        """A new installation token narrowed to `scope` (None: metadata only, every
        repository: what a sweep lists with). Returns GitHub's answer, token included."""
        body: dict[str, Any] = (
            {"permissions": {"metadata": "read"}}
            if scope is None
            else {"repositories": scope.repository_names, "permissions": scope.permission_map}
        )
        doing = "issuing an installation token"
        response = self._call(
            "POST",
            f"/app/installations/{self.installation_id}/access_tokens",
            self._app_jwt(),
            doing,
            body,
        )
        if response.status_code != 201:
            raise _http_error(response, doing)
        return dict(response.json())

    def works(self, token: str) -> bool:
        """Whether `token` is accepted (any call it can make; 401 means dead)."""
        doing = "checking an installation token"
        response = self._call("GET", "/installation/repositories?per_page=1", token, doing)
        if response.status_code == 401:
            return False
        if response.status_code != 200:
            raise _http_error(response, doing)
        return True

    def revoke(self, token: str) -> bool:
        """`DELETE /installation/token`; False when it was dead already (401)."""
        doing = "revoking an installation token"
        response = self._call("DELETE", "/installation/token", token, doing)
        if response.status_code == 401:
            return False
        if response.status_code != 204:
            raise _http_error(response, doing)
        return True

    def repositories(self, token: str) -> list[str]:
        """Every repository `token` reaches (full names, lower case)."""
        names: list[str] = []
        page = 1
        while True:
            doing = "listing the installation's repositories"
            response = self._call(
                "GET", f"/installation/repositories?per_page=100&page={page}", token, doing
            )
            if response.status_code != 200:
                raise _http_error(response, doing)
            chunk = response.json().get("repositories", [])
            names += [str(r["full_name"]).lower() for r in chunk]
            if len(chunk) < 100:
                return names
            page += 1


class GithubProvider:
    """`LifecycleProvider`, `RotationProvider` and `DiscoveryProvider` for GitHub App tokens."""

    platform: ClassVar[Platform] = Platform.GITHUB
    name_separator: ClassVar[str] = "-"  # `<prefix>-<agent>-<id>` (nhi.rules.policy.identity_name)

    def __init__(
        self,
        settings: Settings,
        secrets_client: SecretsManagerClient,
        http: httpx.Client | None = None,
    ) -> None:
        self._gh = GithubClient(settings, secrets_client, http)
        self._store = SecretStore(secrets_client)
        self._secrets = secrets_client
        self._prefix = f"{settings.name_prefix}-"
        self._secret_prefix = settings.secret_prefix

    # ---- plumbing ------------------------------------------------------------------------------

    def _scope(self, plan: ProvisionPlan) -> TokenScope:
        try:
            return parse_token_scope(plan.scope)
        except RuleViolation as err:
            raise fail(f"scope refused: {err}", "InvalidScope") from None

    def _check_installation(self, scope: TokenScope) -> None:
        """Refuse (non-retryably) a grant the installation cannot issue any more."""
        inst = self._gh.installation()
        owner = str(inst.get("account", {}).get("login", "")).lower()
        if owner != scope.owner:
            raise fail(
                f"the installation belongs to {owner}, not {scope.owner}", "InstallationLacks"
            )
        drift = scope_drift(scope, inst.get("permissions", {}), None)
        if drift:
            raise fail(
                f"the GitHub App installation cannot grant this: {drift}", "InstallationLacks"
            )

    def _issue_value(self, scope: TokenScope) -> SecretValue:
        answer = self._gh.issue(scope)
        return SecretValue(
            kind=NhiKind.GITHUB_APP_TOKEN.value,
            token=answer["token"],
            expires_at=answer["expires_at"],
            key_id=f"ghtok-{secrets.token_hex(8)}",
            api_url=self._gh.api,
            repositories=list(scope.repositories),
            permissions=scope.permission_map,
        )

    def _stages(self, name: str) -> dict[str, SecretValue]:
        try:
            return self._store.stage_values(name)
        except ClientError as err:
            raise classify_aws(err, f"reading secret {name}") from err

    def _secret_of(self, ref: IdentityRef) -> str:
        """The delivery secret of `ref`: its own name, or the one tagged with its identity
        (a retiring key knows only the identity's name)."""
        if ref.secret_name:
            return ref.secret_name
        try:
            return self._store.find_by_tag(IDENTITY_TAG, ref.name) or ""
        except ClientError as err:
            raise classify_aws(err, f"finding the secret of {ref.name}") from err

    def _tags(self, plan: ProvisionPlan) -> dict[str, str]:
        return marker_tags(plan) | {IDENTITY_TAG: plan.identity_name, PLATFORM_TAG: "github"}

    # ---- provisioning --------------------------------------------------------------------------

    def create(self, plan: ProvisionPlan) -> IdentityCreated:
        """Nothing to make on GitHub: check the installation can issue the grant."""
        self._check_installation(self._scope(plan))
        return IdentityCreated(external_id=self._external_id(plan.identity_name), credential_ref="")

    def _external_id(self, name: str) -> str:
        return f"{self._gh.api}/app/installations/{self._gh.installation_id}#{name}"

    def deliver(self, plan: ProvisionPlan) -> IdentityCreated:
        """The first token, into the secret store; a retry reuses a delivered token that works."""
        scope = self._scope(plan)
        current = self._stages(plan.secret_name).get(CURRENT)
        if current is None or not self._gh.works(str(current.get("token", ""))):
            value = self._issue_value(scope)
            try:
                self._store.put_current(
                    plan.secret_name,
                    value,
                    tags=self._tags(plan),
                    description=f"GitHub App token of NHI {plan.nhi_id}",
                )
            except ClientError as err:
                raise classify_aws(err, f"storing the token of {plan.identity_name}") from err
            del value
        try:
            arn = self._store.arn(plan.secret_name)
        except ClientError as err:
            raise classify_aws(err, f"describing secret {plan.secret_name}") from err
        if arn is None:
            raise fail(f"secret {plan.secret_name} vanished", "SecretMissing", retryable=True)
        return IdentityCreated(
            external_id=self._external_id(plan.identity_name), credential_ref=arn
        )

    def renew(self, plan: ProvisionPlan) -> None:
        """A token's life is GitHub's hour, not the NHI's term: renewing only re-checks that
        the installation can still issue the grant (each re-issue applies it afresh)."""
        self._check_installation(self._scope(plan))

    # ---- re-issue (rotation) -------------------------------------------------------------------

    def stage_rotation(self, plan: ProvisionPlan) -> StagedKey:
        """A new token as the pending version (a pending one that works is reused)."""
        scope = self._scope(plan)
        stages = self._stages(plan.secret_name)
        current = stages.get(CURRENT)
        if current is None:
            raise fail(f"secret {plan.secret_name} holds no current token", "NothingToRotate")
        pending = stages.get(PENDING)
        if pending is not None and self._gh.works(str(pending.get("token", ""))):
            return StagedKey(new_key_id=str(pending["key_id"]), old_key_id=str(current["key_id"]))
        value = self._issue_value(scope)
        new_key = str(value["key_id"])
        try:
            self._store.put_pending(plan.secret_name, value)
        except ClientError as err:
            raise classify_aws(err, f"storing the pending token of {plan.identity_name}") from err
        del value
        return StagedKey(new_key_id=new_key, old_key_id=str(current["key_id"]))

    def verify_pending(self, plan: ProvisionPlan) -> None:
        """The pending token is accepted and reaches exactly the granted repositories."""
        scope = self._scope(plan)
        pending = self._stages(plan.secret_name).get(PENDING)
        if pending is None:
            raise fail(f"secret {plan.secret_name} holds no pending token", "NothingPending")
        reach = sorted(self._gh.repositories(str(pending["token"])))
        del pending
        if reach != sorted(scope.repositories):
            raise fail(
                f"the pending token reaches {reach}, not {list(scope.repositories)}",
                "WrongScope",
            )

    def promote(self, plan: ProvisionPlan) -> StagedKey:
        """The pending token becomes current (the old one previous); repeat-safe."""
        name = plan.secret_name
        try:
            self._store.promote_pending(name)
        except ClientError as err:
            raise classify_aws(err, f"promoting the token of {plan.identity_name}") from err
        stages = self._stages(name)
        current, previous = stages.get(CURRENT), stages.get(PREVIOUS)
        if current is None:
            raise fail(f"secret {name} holds nothing to promote", "NothingPending")
        return StagedKey(
            new_key_id=str(current["key_id"]),
            old_key_id=None if previous is None else str(previous["key_id"]),
        )

    def retire(self, ref: IdentityRef, key_id: str, *, delete: bool) -> None:
        """Revoke the old token `key_id` (a lapsed or vanished one counts as done); GitHub
        holds nothing else of it, so `delete` has nothing more to do."""
        if delete:
            return
        name = self._secret_of(ref)
        stages = self._stages(name) if name else {}
        for stage, value in stages.items():
            if stage != CURRENT and value.get("key_id") == key_id:
                self._gh.revoke(str(value["token"]))

    # ---- containment and removal ---------------------------------------------------------------

    def _revoke_all(self, name: str) -> list[str]:
        done: list[str] = []
        for stage, value in self._stages(name).items():
            if self._gh.revoke(str(value["token"])):
                done.append(f"revoked the {stage} token {value.get('key_id')}")
        return done

    def disable(self, ref: IdentityRef) -> list[str]:
        """Revoke every token the delivery secret holds; `enable` issues a new one."""
        name = self._secret_of(ref)
        return self._revoke_all(name) if name else []

    def verify_disabled(self, ref: IdentityRef) -> None:
        name = self._secret_of(ref)
        for stage, value in (self._stages(name) if name else {}).items():
            if self._gh.works(str(value["token"])):
                raise fail(f"the {stage} token still works", "NotQuarantined", retryable=True)

    def enable(self, ref: IdentityRef) -> None:
        """A fresh token with the repositories and permissions the revoked one had."""
        name = self._secret_of(ref)
        current = self._stages(name).get(CURRENT) if name else None
        if current is None:
            raise fail(f"no delivered token of {ref.name} to restore", "NothingToRestore")
        if self._gh.works(str(current["token"])):
            return
        scope = TokenScope(
            repositories=tuple(current["repositories"]),
            permissions=tuple(sorted(dict(current["permissions"]).items())),
        )
        value = self._issue_value(scope)
        try:
            self._store.put_current(name, value, tags={})
        except ClientError as err:
            raise classify_aws(err, f"storing the restored token of {ref.name}") from err

    def delete(self, ref: IdentityRef, *, force_delete_secret: bool = False) -> RemovalResult:
        """Revoke every delivered token, prove each dead with a fresh call, delete the secret."""
        name = self._secret_of(ref)
        if not name:
            return RemovalResult(removed=[])
        try:
            scheduled = self._store.scheduled_for_deletion(name)
        except ClientError as err:
            raise classify_aws(err, f"describing secret {name}") from err
        removed = [] if scheduled else self._revoke_all(name)
        if not scheduled:
            self.verify_disabled(
                IdentityRef.model_validate({**ref.model_dump(), "secret_name": name})
            )
        try:
            if self._store.delete(name, force=force_delete_secret):
                removed.append(f"secret {name}")
        except ClientError as err:
            raise classify_aws(err, f"deleting secret {name}") from err
        log.info("nhi %s removed from GitHub: %s", ref.nhi_id, removed)
        return RemovalResult(removed=removed)

    # ---- sweeps --------------------------------------------------------------------------------

    def discover(self, known: Mapping[str, Known], pace: Pace) -> Discovery:
        """The NHIs whose delivery secrets this deployment holds, each active one judged
        against the installation's permissions and repositories.

        GitHub does not list installation tokens, so a token is known only through the secret
        it was delivered into: an orphan is a delivery secret whose NHI the inventory does not
        know (its tokens are revoked when it is removed), and a token minted outside this
        service with the app's key cannot be seen at all."""
        identities = self._delivery_secrets(pace)
        if not any(k.status == "active" for n, k in known.items() if n in identities):
            return Discovery(identities=list(identities.values()))
        pace()
        inst = self._gh.installation()
        pace()
        lister = self._gh.issue(None)["token"]
        try:
            reach = (
                None if inst.get("repository_selection") == "all" else self._gh.repositories(lister)
            )
        finally:
            self._gh.revoke(lister)
        for name, found in identities.items():
            item = known.get(name)
            if item is None or item.status != "active":
                continue
            try:
                scope = parse_token_scope(item.scope)
            except RuleViolation as err:
                identities[name] = _with_drift(found, f"granted scope unreadable: {err.message}")
                continue
            drift = scope_drift(scope, inst.get("permissions", {}), reach)
            if drift:
                identities[name] = _with_drift(found, drift)
        return Discovery(identities=list(identities.values()))

    def _delivery_secrets(self, pace: Pace) -> dict[str, PlatformIdentity]:
        out: dict[str, PlatformIdentity] = {}
        token: str | None = None
        while True:
            pace()
            kwargs: dict[str, Any] = {
                "Filters": [
                    {"Key": "tag-key", "Values": [PLATFORM_TAG]},
                    {"Key": "tag-value", "Values": ["github"]},
                ],
                "MaxResults": 100,
            }
            if token:
                kwargs["NextToken"] = token
            try:
                page = self._gh_secrets_list(kwargs)
            except ClientError as err:
                raise classify_aws(err, "listing GitHub delivery secrets") from err
            for secret in page.get("SecretList", []):
                tags = {t.get("Key"): t.get("Value") for t in secret.get("Tags", [])}
                name = str(tags.get(IDENTITY_TAG, ""))
                if (
                    tags.get(PLATFORM_TAG) != "github"
                    or not name.startswith(self._prefix)
                    or not str(secret.get("Name", "")).startswith(self._secret_prefix)
                    or "DeletedDate" in secret
                ):
                    continue
                created = secret.get("CreatedDate") or datetime.fromtimestamp(0, UTC)
                out[name] = PlatformIdentity(
                    name=name,
                    kind=NhiKind.GITHUB_APP_TOKEN.value,
                    created_at=created if created.tzinfo else created.replace(tzinfo=UTC),
                    managed=tags.get("managed-by") == MANAGED_BY,
                    nhi_id=tags.get(NHI_ID_TAG),
                    secret_arn=str(secret["ARN"]),
                )
            token = page.get("NextToken")
            if not token:
                return out

    def _gh_secrets_list(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return dict(self._secrets.list_secrets(**kwargs))

    def last_used(self, kind: NhiKind, name: str, target: str | None) -> datetime | None:  # noqa: ARG002
        """GitHub reports no use of an installation token (outside Enterprise audit logs)."""
        return None


def _with_drift(found: PlatformIdentity, drift: str) -> PlatformIdentity:
    return replace(found, drift=drift)
