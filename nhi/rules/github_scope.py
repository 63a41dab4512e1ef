"""GitHub App token scopes: the grammar, the policy checks, narrowing and drift. Pure, no I/O.

A `github_app_token` scope is a list of statements whose actions are `<permission>:<level>`
(`contents:read`, `pull_requests:write`) and whose resources are repositories (`owner/repo`).
An installation token carries ONE permission set for all its repositories, so every statement
must name the same permissions: a scope that would grant one repository's permissions on
another is refused rather than silently widened.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from models.contracts import ScopeStatement
from nhi.rules.policy import PolicyRules, RuleViolation, check_statement_count, parse_ttl

# GitHub's installation tokens live one hour; the lifecycle re-issues them this often, so a
# token is replaced a quarter of an hour before it lapses (a retried re-issue has that long).
TOKEN_LIFETIME_SECONDS = 3600
REISSUE_PERIOD_SECONDS = 45 * 60
REISSUE_MIN_SECONDS = 5 * 60  # the shortest re-issue period a lifecycle runs with


def reissue_period(policy_period: int | None) -> int:
    """How often a `github_app_token` NHI's token is re-issued: the policy's rotation period
    when it is shorter than the default, never less than REISSUE_MIN_SECONDS."""
    if policy_period is None:
        return REISSUE_PERIOD_SECONDS
    return max(min(policy_period, REISSUE_PERIOD_SECONDS), REISSUE_MIN_SECONDS)


MAX_REPOSITORIES = 500  # GitHub's limit per token request

# Repository and organization permissions an installation token can be narrowed to.
PERMISSIONS = frozenset(
    {
        "actions",
        "administration",
        "checks",
        "codespaces",
        "contents",
        "dependabot_secrets",
        "deployments",
        "environments",
        "issues",
        "members",
        "metadata",
        "packages",
        "pages",
        "pull_requests",
        "repository_custom_properties",
        "repository_hooks",
        "repository_projects",
        "secret_scanning_alerts",
        "secrets",
        "security_events",
        "single_file",
        "statuses",
        "vulnerability_alerts",
        "workflows",
    }
)
LEVELS = ("read", "write")  # write implies read
# Always sensitive, whatever the policy adds: they change who can do what, or reach secrets.
SENSITIVE_PERMISSIONS = (
    "administration:write",
    "members:write",
    "secrets:write",
    "workflows:write",
)

_ACTION_RE = re.compile(r"^([a-z_]+):(read|write)$")
_PATTERN_RE = re.compile(r"^([a-z_*?]+):(read|write|\*)$")
_OWNER = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})"
_REPOSITORY_RE = re.compile(rf"^{_OWNER}/[A-Za-z0-9._-]{{1,100}}$")
_REPOSITORY_PATTERN_RE = re.compile(rf"^{_OWNER}/(\*|[A-Za-z0-9._-]{{1,100}})$")


@dataclass(frozen=True)
class TokenScope:
    """What one installation token is asked for: repository names (`owner/repo`, sorted) and
    the permission levels GitHub's API takes (`{"contents": "read"}`)."""

    repositories: tuple[str, ...]
    permissions: tuple[tuple[str, str], ...]

    @property
    def permission_map(self) -> dict[str, str]:
        return dict(self.permissions)

    @property
    def owner(self) -> str:
        return self.repositories[0].split("/", 1)[0]

    @property
    def repository_names(self) -> list[str]:
        """The names GitHub's token request takes (`repositories`: without the owner)."""
        return [r.split("/", 1)[1] for r in self.repositories]


def _permissions_of(where: str, actions: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for j, action in enumerate(actions):
        match = _ACTION_RE.fullmatch(action)
        if not match or match.group(1) not in PERMISSIONS:
            raise RuleViolation(
                f"{where}.actions[{j}]",
                f"{action!r} is not a GitHub App permission such as 'contents:read' "
                "or 'pull_requests:write'",
            )
        name, level = match.groups()
        if out.get(name) != "write":
            out[name] = level
    return out


def parse_token_scope(scope: Sequence[ScopeStatement]) -> TokenScope:
    """The token a scope asks for.

    Raises:
        RuleViolation: naming the statement and entry (bad permission or repository, statements
            with different permissions, repositories of several owners, too many repositories).
    """
    check_statement_count(list(scope))
    first: dict[str, str] | None = None
    repositories: set[str] = set()
    for i, statement in enumerate(scope):
        permissions = _permissions_of(f"scope[{i}]", statement.actions)
        if first is None:
            first = permissions
        elif permissions != first:
            raise RuleViolation(
                f"scope[{i}].actions",
                "a GitHub App token has one permission set for all its repositories: every "
                "statement must name the same permissions",
            )
        for j, resource in enumerate(statement.resources):
            if not _REPOSITORY_RE.fullmatch(resource):
                raise RuleViolation(
                    f"scope[{i}].resources[{j}]",
                    f"{resource!r} is not a repository name such as 'acme/api'",
                )
            repositories.add(resource.lower())
    owners = {r.split("/", 1)[0] for r in repositories}
    if len(owners) != 1:
        raise RuleViolation(
            "scope", "a GitHub App token reaches one installation: name repositories of one owner"
        )
    if len(repositories) > MAX_REPOSITORIES:
        raise RuleViolation("scope", f"at most {MAX_REPOSITORIES} repositories per token")
    assert first is not None  # check_statement_count: at least one statement
    return TokenScope(
        repositories=tuple(sorted(repositories)), permissions=tuple(sorted(first.items()))
    )


def _matches(action: str, pattern: str) -> bool:
    name, _, level = action.partition(":")
    p_name, _, p_level = pattern.partition(":")
    # A rule on `x:read` also covers `x:write` (write implies read); one on `x:write` does not
    # cover `x:read`.
    level_ok = p_level in ("*", level) or (p_level == "read" and level == "write")
    return fnmatchcase(name, p_name) and level_ok


def validate_github_scope(scope: Sequence[ScopeStatement], rules: PolicyRules) -> list[str]:
    """Refuse what the policy forbids or does not allow; return the sensitive permissions.

    Raises:
        RuleViolation: naming the statement, the entry and the rule it breaks.
    """
    parse_token_scope(scope)
    sensitive: list[str] = []
    for i, statement in enumerate(scope):
        for j, action in enumerate(statement.actions):
            for rule in rules.forbidden_actions:
                if _matches(action, rule):
                    raise RuleViolation(
                        f"scope[{i}].actions[{j}]",
                        f"{action!r} is forbidden by the {rules.label} policy ({rule!r})",
                    )
            catalogue = (*SENSITIVE_PERMISSIONS, *rules.sensitive_actions)
            if action not in sensitive and any(_matches(action, rule) for rule in catalogue):
                sensitive.append(action)
        for j, resource in enumerate(statement.resources):
            if not any(fnmatchcase(resource.lower(), p.lower()) for p in rules.allowed_resources):
                raise RuleViolation(
                    f"scope[{i}].resources[{j}]",
                    f"repository {resource!r} is not allowed by the {rules.label} policy "
                    "(allowed_resources)",
                )
    return sensitive


def validate_permission_pattern(where: str, pattern: str) -> str:
    """A GitHub policy's forbidden/sensitive entry: `permission:level`, wildcards allowed."""
    match = _PATTERN_RE.fullmatch(pattern)
    name = match.group(1) if match else ""
    if not match or not any(fnmatchcase(p, name) for p in PERMISSIONS):
        raise RuleViolation(
            where, f"{pattern!r} is not a GitHub permission pattern such as 'administration:write'"
        )
    return pattern


def validate_repository_pattern(where: str, pattern: str) -> str:
    """A GitHub policy's allowed repository: `owner/repo` or `owner/*`."""
    if not _REPOSITORY_PATTERN_RE.fullmatch(pattern):
        raise RuleViolation(where, f"{pattern!r} is not 'owner/repo' or 'owner/*'")
    return pattern


def check_github_narrowing(
    narrowed: Sequence[ScopeStatement], granted: Sequence[ScopeStatement]
) -> None:
    """A task token's repositories and permissions lie within its NHI's.

    Raises:
        RuleViolation: naming the entry that is not within.
    """
    inner, outer = parse_token_scope(narrowed), parse_token_scope(granted)
    held = outer.permission_map
    for name, level in inner.permissions:
        if held.get(name) not in (level, "write"):
            raise RuleViolation(
                "scope",
                f"'{name}:{level}' is not within the NHI's scope (a task token only narrows)",
            )
    for repository in inner.repositories:
        if repository not in outer.repositories:
            raise RuleViolation(
                "scope", f"{repository!r} is not within the NHI's scope (a task token only narrows)"
            )


def scope_drift(
    granted: TokenScope,
    installation_permissions: Mapping[str, str],
    installation_repositories: Sequence[str] | None,
) -> str | None:
    """How an installation differs from what a token was granted, or None.

    `installation_repositories` None means the installation reaches every repository of its
    owner. What counts is what the grant needs and the installation no longer holds: tokens
    can then no longer be issued as granted. (An installation holds more than any one NHI's
    grant by design; a token never carries more than it was asked for.)
    """
    problems: list[str] = []
    for name, level in granted.permissions:
        if installation_permissions.get(name) not in (level, "write"):
            problems.append(f"installation lacks {name}:{level}")
    if installation_repositories is not None:
        reach = {r.lower() for r in installation_repositories}
        problems += [f"installation lacks {r}" for r in granted.repositories if r not in reach]
    return "; ".join(problems) or None


def github_task_ttl(value: int | str | None, *, max_seconds: int) -> int:
    """A GitHub task token's life: GitHub's hour, which a request cannot shorten (the token
    is never stored, so nothing could revoke it earlier on the caller's behalf).

    Raises:
        RuleViolation: naming `ttl`.
    """
    if value is not None and parse_ttl(value) != TOKEN_LIFETIME_SECONDS:
        raise RuleViolation(
            "ttl", "GitHub fixes an installation token's life at one hour: ask for 1h or omit it"
        )
    if max_seconds < TOKEN_LIFETIME_SECONDS:
        raise RuleViolation(
            "ttl",
            f"GitHub task tokens live one hour, over the policy's task_credential_max_ttl "
            f"of {max_seconds} s",
        )
    return TOKEN_LIFETIME_SECONDS


def check_github_task_scope(
    scope: Sequence[ScopeStatement] | None,
    granted: Sequence[ScopeStatement],
    rules: PolicyRules,
) -> tuple[ScopeStatement, ...]:
    """A task token's scope: within the NHI's, under the policy, on exactly one repository
    (the NHI's own scope when not narrowed, if it names one).

    Raises:
        RuleViolation: naming `scope` or its entry.
    """
    statements = list(granted if scope is None else scope)
    if scope is not None:
        validate_github_scope(statements, rules)
        check_github_narrowing(statements, granted)
    if len(parse_token_scope(statements).repositories) != 1:
        raise RuleViolation(
            "scope", "a GitHub task token is narrowed to one repository: name exactly one"
        )
    return tuple(statements)
