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


class NhiKind(StrEnum):
    """The type of identity created on the platform."""

    IAM_ROLE = "iam_role"
    IAM_USER_KEY = "iam_user_key"
    POSTGRES_ROLE = "postgres_role"


KINDS_BY_PLATFORM: dict[Platform, frozenset[NhiKind]] = {
    Platform.AWS: frozenset({NhiKind.IAM_ROLE, NhiKind.IAM_USER_KEY}),
    Platform.POSTGRES: frozenset({NhiKind.POSTGRES_ROLE}),
}

PLATFORM_OF: dict[NhiKind, Platform] = {
    kind: platform for platform, kinds in KINDS_BY_PLATFORM.items() for kind in kinds
}

# Kinds whose credential is a static secret: rotated on a schedule, with an overlap window.
# (An IAM role has none: the agent assumes it and gets short-lived credentials.)
ROTATABLE_KINDS: frozenset[NhiKind] = frozenset({NhiKind.IAM_USER_KEY, NhiKind.POSTGRES_ROLE})


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
