"""Pure rules: TTL parsing, scope checks against policy, names and IAM documents.

No I/O here, so the API (to refuse bad requests before anything is created) and the
activities (to re-check just before creating) share exactly the same rules.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any

from models.contracts import ScopeStatement
from models.enums import CredentialDelivery, NhiKind

_TTL_RE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ACTION_RE = re.compile(r"^(\*|[a-z0-9-]+:[A-Za-z0-9*?]+)$", re.IGNORECASE)
_RULE_PATTERN_RE = re.compile(r"^(\*|[a-z0-9*?-]+:[A-Za-z0-9*?]+)$", re.IGNORECASE)
_PRIVILEGE_NAME_RE = re.compile(r"^[A-Z]+( [A-Z]+)*$")
_ARN_RE = re.compile(r"^arn:aws[a-z-]*:[a-z0-9-]+:[a-z0-9-]*:(\d{12}|\*|aws)?:.+$")
_WHOLE_RESOURCE_WILDCARD_RE = re.compile(r"^arn:[^:]*:[^:]*:[^:]*:[^:]*:[*?/]+$")
_PRINCIPAL_ARN_RE = re.compile(
    r"^arn:aws[a-z-]*:(iam::\d{12}:(root|role/[\w+=,.@/-]{1,512}|user/[\w+=,.@/-]{1,512})"
    r"|sts::\d{12}:assumed-role/[\w+=,.@/-]{1,512})$"
)
_SERVICE_PRINCIPAL_RE = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)*\.amazonaws\.com$")
FULL_WILDCARDS = frozenset({"*", "*:*"})
# What a `vault_kv`-delivered credential's secret name starts with.
VAULT_KV_PREFIX = "vault-kv:"

# IAM's own limits on inline policy size (characters, whitespace excluded), for ALL of an
# identity's inline policies together.
INLINE_POLICY_LIMIT = {NhiKind.IAM_ROLE: 10240, NhiKind.IAM_USER_KEY: 2048}
# Kept free of the scope for the quarantine's own inline policies (its deny-all and its
# session revocation, 290 characters): a scope that took the whole limit would make
# IAM refuse the quarantine (LimitExceeded) exactly when it is needed.
QUARANTINE_POLICY_RESERVE = 320


def scope_policy_limit(kind: NhiKind) -> int:
    """The largest scope policy an identity of `kind` may get: IAM's limit less the
    quarantine's reserve."""
    return INLINE_POLICY_LIMIT[kind] - QUARANTINE_POLICY_RESERVE


MAX_STATEMENTS = 20


class RuleViolation(ValueError):
    """A request breaks a rule; `field` names where, the message says which rule."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class PolicyRules:
    """The parts of a policy row that decide whether a request is allowed."""

    label: str
    allowed: bool
    default_ttl_seconds: int
    max_lifetime_seconds: int
    max_session_duration_seconds: int = 3600
    allow_resource_wildcard: bool = False
    forbidden_actions: tuple[str, ...] = ()
    sensitive_actions: tuple[str, ...] = field(default=())
    # github_app_token: repository patterns a scope may name (nhi.rules.github_scope).
    allowed_resources: tuple[str, ...] = ()


def parse_ttl(value: int | str) -> int:
    """Seconds from `3600`, `"3600"`, `"45m"`, `"12h"`, `"30d"` or `"2w"`."""
    if isinstance(value, bool):
        raise RuleViolation("ttl", "must be seconds or a duration such as '30d' or '12h'")
    if isinstance(value, int):
        seconds = value
    else:
        match = _TTL_RE.fullmatch(value)
        if not match:
            raise RuleViolation(
                "ttl", f"{value!r} is not seconds or a duration such as '30d' or '12h'"
            )
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise RuleViolation("ttl", "must be greater than zero")
    return seconds


def validate_rule_pattern(where: str, pattern: str) -> str:
    """A policy's forbidden/sensitive entry: an IAM action pattern such as `*:Delete*`."""
    if not _RULE_PATTERN_RE.fullmatch(pattern):
        raise RuleViolation(where, f"{pattern!r} is not an IAM action pattern such as 'iam:*'")
    return pattern


def validate_privilege_name(where: str, name: str) -> str:
    """A Postgres policy's forbidden/sensitive entry: a privilege or role attribute name in
    upper case, such as `TRUNCATE` or `SUPERUSER`."""
    if not _PRIVILEGE_NAME_RE.fullmatch(name):
        raise RuleViolation(
            where, f"{name!r} is not a Postgres privilege name in upper case such as 'INSERT'"
        )
    return name


_WILDCARD_RE = re.compile(r"[*?]")


def _segments_overlap(a: str, b: str) -> bool:
    if fnmatchcase(a, b) or fnmatchcase(b, a):
        return True
    if _WILDCARD_RE.search(a) and _WILDCARD_RE.search(b):
        # Two patterns: assume they can meet unless their literal prefixes already differ.
        # Erring towards "overlap" means refusing or asking for approval, never the reverse.
        pa, pb = _WILDCARD_RE.split(a, 1)[0], _WILDCARD_RE.split(b, 1)[0]
        return pa.startswith(pb) or pb.startswith(pa)
    return False


def actions_overlap(requested: str, rule: str) -> bool:
    """Whether an action pattern and a rule pattern can name the same IAM action."""
    requested, rule = requested.lower(), rule.lower()
    if rule in FULL_WILDCARDS:
        # A rule of `*` forbids asking for everything, not every action.
        return requested in FULL_WILDCARDS
    if requested in FULL_WILDCARDS:
        return True
    r_service, _, r_action = requested.partition(":")
    p_service, _, p_action = rule.partition(":")
    return _segments_overlap(r_service, p_service) and _segments_overlap(r_action, p_action)


def check_statement_count(scope: list[ScopeStatement]) -> None:
    """At least one statement, and no more than every platform's limit."""
    if not scope:
        raise RuleViolation("scope", "must hold at least one statement")
    if len(scope) > MAX_STATEMENTS:
        raise RuleViolation("scope", f"at most {MAX_STATEMENTS} statements")


def validate_scope(scope: list[ScopeStatement], rules: PolicyRules) -> list[str]:
    """Refuse forbidden actions and resource wildcards; return the sensitive actions asked for.

    Raises:
        RuleViolation: naming the statement, the entry and the rule it breaks.
    """
    check_statement_count(scope)
    sensitive: list[str] = []
    for i, statement in enumerate(scope):
        for j, action in enumerate(statement.actions):
            where = f"scope[{i}].actions[{j}]"
            if not _ACTION_RE.fullmatch(action):
                raise RuleViolation(
                    where, f"{action!r} is not an IAM action such as 's3:GetObject'"
                )
            for rule in rules.forbidden_actions:
                if actions_overlap(action, rule):
                    raise RuleViolation(
                        where, f"{action!r} is forbidden by the {rules.label} policy ({rule!r})"
                    )
            if any(actions_overlap(action, rule) for rule in rules.sensitive_actions):
                sensitive.append(action)
        for j, resource in enumerate(statement.resources):
            where = f"scope[{i}].resources[{j}]"
            wildcard = resource == "*" or bool(_WHOLE_RESOURCE_WILDCARD_RE.fullmatch(resource))
            if wildcard and not rules.allow_resource_wildcard:
                raise RuleViolation(
                    where,
                    f"resource wildcard {resource!r} is not allowed by the {rules.label} policy; "
                    "name the resources",
                )
            if resource != "*" and not _ARN_RE.fullmatch(resource):
                raise RuleViolation(where, f"{resource!r} is not an ARN")
    return sensitive


# Vault ACL capabilities a `vault_approle` scope may grant (`deny` is not a grant). `sudo`
# reaches root-protected paths: sensitive unless a policy says otherwise.
VAULT_CAPABILITIES = frozenset({"read", "create", "update", "patch", "delete", "list", "sudo"})
# A Vault path: segments of safe characters, `+` for one segment, `*` only at the very end.
_VAULT_PATH_RE = re.compile(r"^(?!/)([A-Za-z0-9_.@=-]+|\+)(/([A-Za-z0-9_.@=-]+|\+))*/?\*?$")
# Paths that administer Vault itself rather than hold data: asking for them needs an approver.
VAULT_PRIVILEGED_PREFIXES = ("sys/", "auth/", "identity/")


def validate_capability_name(where: str, name: str) -> str:
    """A Vault policy's forbidden/sensitive entry: a capability such as `sudo` or `delete`."""
    if name not in VAULT_CAPABILITIES:
        raise RuleViolation(
            where, f"{name!r} is not a Vault capability ({', '.join(sorted(VAULT_CAPABILITIES))})"
        )
    return name


def validate_vault_scope(scope: list[ScopeStatement], rules: PolicyRules) -> list[str]:
    """A `vault_approle` scope: `actions` are ACL capabilities, `resources` Vault paths
    (`secret/data/app/*`). Refuses unknown or forbidden capabilities and, unless the policy
    allows them, paths that are all wildcard or glob a whole mount; returns what needs an
    approver (sensitive capabilities, and any capability on `sys/`, `auth/` or `identity/`).

    Raises:
        RuleViolation: naming the statement, the entry and the rule it breaks.
    """
    check_statement_count(scope)
    sensitive: list[str] = []
    for i, statement in enumerate(scope):
        for j, action in enumerate(statement.actions):
            where = f"scope[{i}].actions[{j}]"
            validate_capability_name(where, action)
            if action in rules.forbidden_actions:
                raise RuleViolation(
                    where, f"{action!r} is forbidden by the {rules.label} policy ({action!r})"
                )
            if action in rules.sensitive_actions:
                sensitive.append(action)
        for j, path in enumerate(statement.resources):
            where = f"scope[{i}].resources[{j}]"
            if len(path) > 512 or not _VAULT_PATH_RE.fullmatch(path):
                raise RuleViolation(
                    where, f"{path!r} is not a Vault path such as 'secret/data/app/*'"
                )
            first = path.split("/", 1)[0]
            whole_mount = first in ("+", "*") or ("/" not in path and path.endswith("*"))
            if whole_mount and not rules.allow_resource_wildcard:
                raise RuleViolation(
                    where,
                    f"path wildcard {path!r} is not allowed by the {rules.label} policy; "
                    "name the mount and the paths",
                )
            if path.startswith(VAULT_PRIVILEGED_PREFIXES):
                sensitive += [f"{a} on {path}" for a in statement.actions]
    return sensitive


def validate_cidrs(cidrs: list[str]) -> list[str]:
    """Normalised CIDRs, or a violation naming the bad entry."""
    out: list[str] = []
    for i, cidr in enumerate(cidrs):
        try:
            out.append(str(ipaddress.ip_network(cidr, strict=False)))
        except ValueError:
            raise RuleViolation(f"allowed_cidrs[{i}]", f"{cidr!r} is not a CIDR") from None
    return out


def validate_trust_principal(kind: NhiKind, principal: str | None) -> str | None:
    """An `iam_role` needs the agent runtime's principal; an access key has none."""
    if kind is NhiKind.IAM_ROLE:
        if not principal:
            raise RuleViolation(
                "trust_principal",
                "is required for iam_role: the ARN of the agent's runtime role or user, "
                "or a service principal such as 'bedrock.amazonaws.com'",
            )
        if not (
            _PRINCIPAL_ARN_RE.fullmatch(principal) or _SERVICE_PRINCIPAL_RE.fullmatch(principal)
        ):
            raise RuleViolation(
                "trust_principal", f"{principal!r} is not an IAM principal ARN or service principal"
            )
        return principal
    if principal:
        raise RuleViolation("trust_principal", f"only applies to iam_role, not {kind.value}")
    return None


def principal_account(principal: str) -> str | None:
    """The account of an IAM/STS principal ARN (`arn:aws:iam::<account>:...`); None for a
    service principal, "" for anything else."""
    if _SERVICE_PRINCIPAL_RE.fullmatch(principal):
        return None
    parts = principal.split(":")
    return parts[4] if len(parts) > 5 else ""


def check_trust_account(
    principal: str,
    *,
    own_account: str,
    allowed_accounts: list[str],
    allow_service_principals: bool,
    label: str,
) -> None:
    """Whom an `iam_role` may trust: principals of this service's own account or of an account
    the policy names; an AWS service principal only if the policy allows them. Anything else
    (another account's root above all) would hand the role to someone outside.

    Raises:
        RuleViolation: naming `trust_principal`.
    """
    account = principal_account(principal)
    if account is None:
        if not allow_service_principals:
            raise RuleViolation(
                "trust_principal",
                f"service principal {principal!r} is not allowed by the {label} policy "
                "(allow_service_principals)",
            )
        return
    if account != own_account and account not in allowed_accounts:
        raise RuleViolation(
            "trust_principal",
            f"account {account} is neither this service's account nor one the {label} policy "
            "allows (allowed_trust_accounts)",
        )


def identity_name(prefix: str, agent_name: str, nhi_id: uuid.UUID) -> str:
    """Deterministic, IAM-safe (<= 64 chars) name: retries find what an earlier try made.
    (Postgres roles are named by `nhi.rules.pg_grants.group_name`.)"""
    budget = 64 - len(prefix) - 2 - 32
    if budget < 1:
        raise ValueError(f"name prefix {prefix!r} leaves no room for the agent's name")
    return f"{prefix}-{agent_name[:budget].rstrip('-')}-{nhi_id.hex}"


def secret_name(
    prefix: str,
    environment: str,
    agent_name: str,
    nhi_id: uuid.UUID,
    delivery: CredentialDelivery | str = CredentialDelivery.AWS_SECRETS_MANAGER,
) -> str:
    """Name under which an NHI's credential is delivered: a Secrets Manager name, or for
    `vault_kv` delivery the KV path after `vault-kv:` (the secret store routes by it)."""
    name = f"{prefix}{environment}/{agent_name}/{nhi_id}"
    if delivery == CredentialDelivery.VAULT_KV:
        return f"{VAULT_KV_PREFIX}{name}"
    return name


def identity_policy_document(
    scope: list[ScopeStatement], allowed_cidrs: list[str], expires_at: datetime
) -> dict[str, Any]:
    """The inline policy: the granted scope, pinned to source CIDRs and to the expiry.

    The `aws:CurrentTime` condition makes AWS itself deny every call after the lease ends,
    even if this service is down when it should revoke.
    """
    condition: dict[str, Any] = {
        "DateLessThan": {"aws:CurrentTime": expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")}
    }
    if allowed_cidrs:
        condition["IpAddress"] = {"aws:SourceIp": list(allowed_cidrs)}
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": f"Scope{i}",
                "Effect": "Allow",
                "Action": list(s.actions),
                "Resource": list(s.resources),
                "Condition": condition,
            }
            for i, s in enumerate(scope)
        ],
    }


def policy_size(document: dict[str, Any]) -> int:
    """Size as IAM counts it (whitespace excluded)."""
    return len(json.dumps(document, separators=(",", ":")))


def trust_policy_document(principal: str, task_principal: str | None = None) -> dict[str, Any]:
    """Who may assume an agent's role: its runtime principal only; and, where the policy
    allows task credentials, the principal the API issues them as, with the rights to tag the
    session and set its source identity (AWS requires both for what it issues)."""
    key = "Service" if _SERVICE_PRINCIPAL_RE.fullmatch(principal) else "AWS"
    statements: list[dict[str, Any]] = [
        {"Effect": "Allow", "Principal": {key: principal}, "Action": "sts:AssumeRole"}
    ]
    if task_principal:
        statements.append(
            {
                "Sid": "TaskCredentials",
                "Effect": "Allow",
                "Principal": {"AWS": task_principal},
                "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}
