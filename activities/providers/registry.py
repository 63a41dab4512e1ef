"""Which provider serves which platform. Adding a platform: write its module (see base.py),
add one line here, and add its kinds to models/enums.py."""

from __future__ import annotations

from activities.providers.aws import AwsProvider
from activities.providers.base import Provider
from activities.providers.postgres import PostgresProvider
from models.enums import Platform
from nhi.aws import AwsClients
from nhi.config import Settings
from nhi.targets import TargetResolver


def build_providers(
    settings: Settings, aws: AwsClients, targets: TargetResolver
) -> dict[Platform, Provider]:
    """One provider per platform, sharing the worker's clients."""
    return {
        Platform.AWS: AwsProvider(aws, settings.iam_path),
        Platform.POSTGRES: PostgresProvider(targets, aws.secrets, name_prefix=settings.name_prefix),
    }
