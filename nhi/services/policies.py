"""Policies: what may be created per platform, kind and environment, and for how long."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.contracts import ScopeStatement
from models.enums import Platform
from models.orm import Policy
from models.schemas import PolicyIn
from nhi.rules.github_scope import (
    validate_github_scope,
    validate_permission_pattern,
    validate_repository_pattern,
)
from nhi.rules.pg_grants import validate_grants
from nhi.rules.policy import (
    PolicyRules,
    RuleViolation,
    parse_ttl,
    validate_capability_name,
    validate_privilege_name,
    validate_rule_pattern,
    validate_scope,
    validate_vault_scope,
)
from nhi.services.transitions import note


def rules_of(policy: Policy) -> PolicyRules:
    """The decision-relevant part of a policy row."""
    return PolicyRules(
        label=f"{policy.platform}/{policy.kind}/{policy.environment}",
        allowed=policy.allowed,
        default_ttl_seconds=policy.default_ttl_seconds,
        max_lifetime_seconds=policy.max_lifetime_seconds,
        max_session_duration_seconds=policy.max_session_duration_seconds,
        allow_resource_wildcard=policy.allow_resource_wildcard,
        forbidden_actions=tuple(policy.forbidden_actions),
        sensitive_actions=tuple(policy.sensitive_actions),
        allowed_resources=tuple(policy.allowed_resources),
    )


def check_scope(platform: str, scope: list[ScopeStatement], rules: PolicyRules) -> list[str]:
    """The platform's scope rules (Postgres grants, or IAM actions on ARNs); returns the
    sensitive entries asked for, which need an approver."""
    if platform == Platform.POSTGRES:
        return validate_grants(scope, rules)
    if platform == Platform.GITHUB:
        return validate_github_scope(scope, rules)
    if platform == Platform.VAULT:
        return validate_vault_scope(scope, rules)
    return validate_scope(scope, rules)


def find_policy(session: Session, platform: str, kind: str, environment: str) -> Policy | None:
    """The policy for a target, if one is defined."""
    return session.scalar(
        select(Policy).where(
            Policy.platform == platform, Policy.kind == kind, Policy.environment == environment
        )
    )


def list_policies(session: Session) -> list[Policy]:
    """Every policy, in a stable order."""
    return list(
        session.scalars(select(Policy).order_by(Policy.platform, Policy.kind, Policy.environment))
    )


def apply_policy(session: Session, body: PolicyIn, actor: str, index: int = 0) -> Policy:
    """Create or replace one policy; durations accept seconds or '30d'-style strings."""
    where = f"policies[{index}]"

    def seconds(name: str, value: int | str) -> int:
        try:
            return parse_ttl(value)
        except RuleViolation as err:
            raise RuleViolation(f"{where}.{name}", err.message) from None

    default_ttl = seconds("default_ttl", body.default_ttl)
    max_lifetime = seconds("max_lifetime", body.max_lifetime)
    if max_lifetime > 366 * 86400:
        raise RuleViolation(f"{where}.max_lifetime", "must be at most 366 days")
    if default_ttl > max_lifetime:
        raise RuleViolation(f"{where}.default_ttl", "must not exceed max_lifetime")
    rotation = (
        None if body.rotation_period is None else seconds("rotation_period", body.rotation_period)
    )
    grace = 0 if body.grace_period in (0, "0") else seconds("grace_period", body.grace_period)
    session_duration = seconds("max_session_duration", body.max_session_duration)
    if not 3600 <= session_duration <= 43200:
        raise RuleViolation(
            f"{where}.max_session_duration", "must be between 1h and 12h (IAM's range)"
        )
    task_ttl = seconds("task_credential_max_ttl", body.task_credential_max_ttl)
    if not 60 <= task_ttl <= 43200:
        raise RuleViolation(f"{where}.task_credential_max_ttl", "must be between 60s and 12h")
    window = seconds("approval_window", body.approval_window)
    if not 60 <= window <= 30 * 86400:
        raise RuleViolation(f"{where}.approval_window", "must be between 1 minute and 30 days")
    offsets = sorted({seconds("reminder_offsets", o) for o in body.reminder_offsets}, reverse=True)
    # Postgres policies name privileges (`TRUNCATE`), GitHub ones permissions
    # (`administration:write`), AWS policies IAM action patterns.
    validate_entry = (
        validate_privilege_name
        if body.platform is Platform.POSTGRES
        else validate_permission_pattern
        if body.platform is Platform.GITHUB
        else validate_capability_name
        if body.platform is Platform.VAULT
        else validate_rule_pattern
    )
    for name, patterns in (
        ("forbidden_actions", body.forbidden_actions),
        ("sensitive_actions", body.sensitive_actions),
    ):
        for j, pattern in enumerate(patterns):
            validate_entry(f"{where}.{name}[{j}]", pattern)
    policy = find_policy(session, body.platform.value, body.kind.value, body.environment.value)
    if policy is None:
        policy = Policy(
            platform=body.platform.value, kind=body.kind.value, environment=body.environment.value
        )
        session.add(policy)
    policy.allowed = body.allowed
    policy.default_ttl_seconds = default_ttl
    policy.max_lifetime_seconds = max_lifetime
    policy.rotation_period_seconds = rotation
    policy.reminder_offsets_seconds = offsets
    policy.grace_period_seconds = grace
    policy.max_session_duration_seconds = session_duration
    policy.allow_resource_wildcard = body.allow_resource_wildcard
    policy.forbidden_actions = list(body.forbidden_actions)
    policy.sensitive_actions = list(body.sensitive_actions)
    policy.delivery = body.delivery
    # Whom an iam_role may trust (the audit event below records the whole body, these too).
    policy.allowed_trust_accounts = sorted(set(body.allowed_trust_accounts))
    for j, pattern in enumerate(body.allowed_resources):
        validate_repository_pattern(f"{where}.allowed_resources[{j}]", pattern)
    policy.allowed_resources = sorted(set(body.allowed_resources))
    policy.allow_service_principals = body.allow_service_principals
    policy.allow_task_credentials = body.allow_task_credentials
    policy.task_credential_max_ttl_seconds = task_ttl
    # Approvals (issue 16): who decides, how many, how long they have, and the risk threshold.
    policy.approvers = list(dict.fromkeys(body.approvers))
    policy.approvals_required = body.approvals_required
    policy.approval_window_seconds = window
    policy.risk_threshold = body.risk_threshold
    policy.updated_by = actor
    session.flush()
    note(
        session,
        subject_type="policy",
        subject_id=f"{policy.platform}/{policy.kind}/{policy.environment}",
        event="policy.applied",
        actor=actor,
        reason="policy applied",
        details=body.model_dump(mode="json"),
    )
    return policy
