"""Which provider serves which platform: the one place, with the provider modules, that names
platforms. Adding a platform: write its provider (see base.py), add its class below and one
line to `build_providers`, and add the platform and its kinds to models/enums.py."""

from __future__ import annotations

from activities.providers.aws import AwsProvider
from activities.providers.aws_task import AwsTaskProvider
from activities.providers.base import Provider, TaskCredentialProvider
from activities.providers.postgres import PostgresProvider
from activities.providers.postgres_task import PostgresTaskProvider
from models.enums import Platform
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import Settings
from nhi.services.target_registry import TargetResolver

PROVIDER_CLASSES: tuple[type[Provider], ...] = (AwsProvider, PostgresProvider)
_SEPARATORS = {cls.platform: cls.name_separator for cls in PROVIDER_CLASSES}


def build_providers(
    settings: Settings, aws: AwsClients, targets: TargetResolver
) -> dict[Platform, Provider]:
    """One provider per platform, sharing the worker's clients."""
    return {
        Platform.AWS: AwsProvider(aws, settings.iam_path),
        Platform.POSTGRES: PostgresProvider(targets, aws.secrets, name_prefix=settings.name_prefix),
    }


def build_task_providers(
    aws: AwsClients, targets: TargetResolver
) -> dict[Platform, TaskCredentialProvider]:
    """One task-credential issuer per platform (the API process builds them: issuance runs
    there, off the workflow path)."""
    return {Platform.AWS: AwsTaskProvider(aws), Platform.POSTGRES: PostgresTaskProvider(targets)}


def name_prefix(platform: Platform, prefix: str) -> str:
    """How the names of this deployment's identities on `platform` start (`nhi-`, `nhi_`)."""
    return f"{prefix}{_SEPARATORS[platform]}"
