"""Vocabularies shared by the database, the workflows and the API."""

from __future__ import annotations

from enum import StrEnum


class AgentCategory(StrEnum):
    """What kind of AI system the agent is (Astrix's taxonomy of AI-NHI touchpoints)."""

    CHATBOT = "chatbot"
    RAG = "rag"
    CLOUD_MODEL = "cloud_model"
    LLM_API = "llm_api"
    ENTERPRISE_PLATFORM = "enterprise_platform"
    BROWSER_AGENT = "browser_agent"
    COMPUTER_AGENT = "computer_agent"


class Environment(StrEnum):
    """Deployment stage an agent runs in; policy differs per stage."""

    DEV = "dev"
    STAGING = "staging"
    PROD = "prod"


class AgentStatus(StrEnum):
    """Whether the agent's task is still running."""

    ACTIVE = "active"
    COMPLETED = "completed"
    DECOMMISSIONED = "decommissioned"


class Platform(StrEnum):
    """Where an NHI lives."""

    AWS = "aws"
    POSTGRES = "postgres"
    GITHUB = "github"
    VAULT = "vault"


class NhiKind(StrEnum):
    """The type of identity created on the platform."""

    IAM_ROLE = "iam_role"
    IAM_USER_KEY = "iam_user_key"
    POSTGRES_ROLE = "postgres_role"
    # A GitHub App installation access token (one hour at most), re-issued by the lifecycle.
    GITHUB_APP_TOKEN = "github_app_token"  # noqa: S105 (a kind's name, not a secret)
    # An OpenBao/Vault AppRole role with its own ACL policy; the credential is a secret id.
    VAULT_APPROLE = "vault_approle"


KINDS_BY_PLATFORM: dict[Platform, frozenset[NhiKind]] = {
    Platform.AWS: frozenset({NhiKind.IAM_ROLE, NhiKind.IAM_USER_KEY}),
    Platform.POSTGRES: frozenset({NhiKind.POSTGRES_ROLE}),
    Platform.GITHUB: frozenset({NhiKind.GITHUB_APP_TOKEN}),
    Platform.VAULT: frozenset({NhiKind.VAULT_APPROLE}),
}

PLATFORM_OF: dict[NhiKind, Platform] = {
    kind: platform for platform, kinds in KINDS_BY_PLATFORM.items() for kind in kinds
}

# Kinds whose credential is a static secret: rotated on a schedule, with an overlap window.
# (An IAM role has none: the agent assumes it and gets short-lived credentials.)
# A GitHub App token is re-issued through the same rotation (stage, verify, promote) every
# period, which for it is shorter than the hour the token lives (nhi.rules.github).
ROTATABLE_KINDS: frozenset[NhiKind] = frozenset(
    {NhiKind.IAM_USER_KEY, NhiKind.POSTGRES_ROLE, NhiKind.GITHUB_APP_TOKEN, NhiKind.VAULT_APPROLE}
)


class CredentialDelivery(StrEnum):
    """Where a static credential is delivered (by reference): AWS Secrets Manager, or a KV v2
    path in OpenBao/Vault (`delivery: vault_kv`, per policy or per request)."""

    AWS_SECRETS_MANAGER = "aws_secrets_manager"
    VAULT_KV = "vault_kv"


class NhiStatus(StrEnum):
    """Where an NHI is in its life."""

    REQUESTED = "requested"
    PENDING_APPROVAL = "pending_approval"
    PROVISIONING = "provisioning"
    ACTIVE = "active"
    ROTATING = "rotating"
    EXPIRING = "expiring"
    QUARANTINED = "quarantined"
    DECOMMISSIONED = "decommissioned"
    FAILED = "failed"
    REVOKE_FAILED = "revoke_failed"
    # Gone from its platform without this service removing it: nothing left to act on, but
    # someone must find out who deleted it and whether anything replaced it.
    MISSING = "missing"


class Role(StrEnum):
    """What a caller may do (owner rights come from being an agent's owner, not from a role)."""

    PLATFORM = "platform"
    APPROVER = "approver"
    SECURITY = "security"
    AUDITOR = "auditor"
    ADMIN = "admin"
    # An agent's own token, bound to exactly that agent (`api_tokens.agent_id`): it may issue
    # task credentials from its agent's NHIs and nothing else.
    AGENT = "agent"


class InvokerKind(StrEnum):
    """Who or what can make an agent act (issue 16): its `ref` is an email, a group name, a
    service name, a cron expression, or another agent's id."""

    PERSON = "person"
    GROUP = "group"
    SERVICE = "service"
    SCHEDULE = "schedule"
    AGENT = "agent"


class InvokerChannel(StrEnum):
    """How an invoker reaches the agent."""

    SLACK = "slack"
    API = "api"
    UI = "ui"
    WEBHOOK = "webhook"
    CRON = "cron"


class Severity(StrEnum):
    """How bad an activity finding is (issue 17), in rising order: auto-containment and the
    findings filter compare by this order, not alphabetically."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


SEVERITY_RANK: dict[Severity, int] = {s: i for i, s in enumerate(Severity)}


class ActivityKind(StrEnum):
    """What an activity finding says an NHI did (issue 17)."""

    OUT_OF_SCOPE = "out_of_scope"
    NEW_NETWORK = "new_network"
    USE_AFTER_REVOCATION = "use_after_revocation"
    BURST = "burst"
    RECONNAISSANCE = "reconnaissance"
    HUMAN_USE = "human_use"
    CONCURRENT_NETWORKS = "concurrent_networks"


class ActivitySource(StrEnum):
    """Where an activity event came from."""

    CLOUDTRAIL = "cloudtrail"
    POSTGRES = "postgres"
    API = "api"


class IncidentStatus(StrEnum):
    """Where a containment incident is (issue 17): `containing` while the playbook runs its
    first pass, `contained` once every credential is proven dead, `partially_contained` while
    some proof still fails (the playbook keeps trying), `released` once a second person lifted
    it."""

    CONTAINING = "containing"
    CONTAINED = "contained"
    PARTIALLY_CONTAINED = "partially_contained"
    RELEASED = "released"
