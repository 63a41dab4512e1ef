"""Which provider serves which platform: the one place, with the provider modules, that names
platforms. Adding a platform: write its provider (see base.py), add its class below and one
line to `build_providers`, and add the platform and its kinds to models/enums.py."""

from __future__ import annotations

from collections.abc import Mapping

from activities.providers.aws import AwsProvider
from activities.providers.aws_task import AwsTaskProvider
from activities.providers.base import Provider, TaskCredentialProvider
from activities.providers.github import GithubProvider
from activities.providers.github_task import GithubTaskProvider
from activities.providers.postgres import PostgresProvider
from activities.providers.postgres_task import ROLE_STOCK, PostgresTaskProvider
from activities.providers.secret_store import SecretStore, use_delivery_store
from activities.providers.vault import VaultProvider
from activities.providers.vault_client import VaultClient
from activities.providers.vault_kv import VaultKvStore
from models.enums import Platform
from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import Settings
from nhi.services.target_registry import TargetResolver

PROVIDER_CLASSES: tuple[type[Provider], ...] = (
    AwsProvider,
    PostgresProvider,
    GithubProvider,
    VaultProvider,
)
_SEPARATORS = {cls.platform: cls.name_separator for cls in PROVIDER_CLASSES}


def build_providers(
    settings: Settings, aws: AwsClients, targets: TargetResolver
) -> dict[Platform, Provider]:
    """One provider per platform, sharing the worker's clients. Vault (the platform and
    `vault_kv` delivery for every platform) only where `NHI_VAULT_ADDR` is set."""
    providers: dict[Platform, Provider] = {
        Platform.AWS: AwsProvider(aws, settings.iam_path),
        Platform.POSTGRES: PostgresProvider(targets, aws.secrets, name_prefix=settings.name_prefix),
        Platform.GITHUB: GithubProvider(settings, aws.secrets),
    }
    vault = VaultClient.from_settings(settings)
    if vault is not None:
        kv = VaultKvStore(vault, settings.vault_kv_mount)
        use_delivery_store(kv)
        providers[Platform.VAULT] = VaultProvider(
            vault,
            SecretStore(aws.secrets, kv),
            mount=settings.vault_approle_mount,
            name_prefix=settings.name_prefix,
        )
    return providers


def build_task_providers(
    aws: AwsClients, targets: TargetResolver, settings: Settings | None = None
) -> dict[Platform, TaskCredentialProvider]:
    """One task-credential issuer per platform (the API process builds them: issuance runs
    there, off the workflow path). GitHub's needs the settings (its app and installation)."""
    issuers: dict[Platform, TaskCredentialProvider] = {
        Platform.AWS: AwsTaskProvider(aws),
        Platform.POSTGRES: PostgresTaskProvider(
            targets,
            role_stock=settings.task_role_stock if settings is not None else ROLE_STOCK,
        ),
    }
    if settings is not None:
        issuers[Platform.GITHUB] = GithubTaskProvider(settings, aws.secrets)
    return issuers


def close_task_providers(issuers: Mapping[Platform, TaskCredentialProvider]) -> None:
    """Close the issuers that keep something open (Postgres: admin connections and the stock
    roles made ahead, which closing drops)."""
    for issuer in issuers.values():
        close = getattr(issuer, "close", None)
        if close is not None:
            close()


def name_prefix(platform: Platform, prefix: str) -> str:
    """How the names of this deployment's identities on `platform` start (`nhi-`, `nhi_`)."""
    return f"{prefix}{_SEPARATORS[platform]}"
