"""Task credentials on GitHub: an installation token per agent task, narrowed to one repository.

The token is issued for the task's scope (the NHI's when not narrowed) but must name exactly
one repository: a task acts on one repository, and a leaked task token reaches no other.
GitHub fixes the token's life at one hour and a shorter task TTL cannot shorten it on GitHub's
side; the token is never stored, so nothing of ours can revoke it later either: the caller
ends it early with `DELETE /installation/token` (`revoke`). So the service issues GitHub task
tokens for GitHub's hour only (nhi.rules.github_scope.github_task_ttl).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, ClassVar

import httpx
from temporalio.exceptions import ApplicationError

from activities.providers.github import GithubClient
from models.enums import NhiKind, Platform
from nhi.infra.config import Settings
from nhi.rules.github_scope import TokenScope, check_github_narrowing, parse_token_scope
from nhi.rules.policy import RuleViolation
from nhi.rules.task_credentials import IssuedCredential, TaskGrant

if TYPE_CHECKING:
    from types_boto3_secretsmanager import SecretsManagerClient


class GithubTaskProvider:
    """`TaskCredentialProvider` for `github_app_token` NHIs."""

    platform: ClassVar[Platform] = Platform.GITHUB

    def __init__(
        self,
        settings: Settings,
        secrets_client: SecretsManagerClient,
        http: httpx.Client | None = None,
    ) -> None:
        self._gh = GithubClient(settings, secrets_client, http)

    def scope_of(self, grant: TaskGrant) -> TokenScope:
        """The one-repository token a grant asks for, within the NHI's scope."""
        if grant.kind is not NhiKind.GITHUB_APP_TOKEN:
            raise ApplicationError(
                f"task tokens on GitHub come from github_app_token NHIs, not {grant.kind.value}",
                type="InvalidPlan",
                non_retryable=True,
            )
        statements = grant.scope if grant.scope is not None else grant.granted_scope
        try:
            check_github_narrowing(statements, grant.granted_scope)
            scope = parse_token_scope(statements)
        except RuleViolation as err:
            raise ApplicationError(str(err), type="InvalidScope", non_retryable=True) from None
        if len(scope.repositories) != 1:
            raise ApplicationError(
                "a task token is narrowed to one repository: name exactly one",
                type="InvalidScope",
                non_retryable=True,
            )
        return scope

    def issue(self, grant: TaskGrant) -> IssuedCredential:
        scope = self.scope_of(grant)
        answer = self._gh.issue(scope)
        github_expiry = datetime.fromisoformat(str(answer["expires_at"]).replace("Z", "+00:00"))
        return IssuedCredential(
            # GitHub's clock ends the token (the service asked for its full hour).
            expires_at=github_expiry,
            secret={"token": str(answer["token"])},
            public={
                "repository": scope.repositories[0],
                "permissions": scope.permission_map,
                "github_expires_at": github_expiry.isoformat(),
                "api_url": self._gh.api,
            },
        )

    def revoke(self, token: str) -> bool:
        """End a task token before GitHub's hour is up (False: it was dead already)."""
        return self._gh.revoke(token)
