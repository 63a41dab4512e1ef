"""boto3 clients built from settings: the same code talks to moto in dev and to AWS in prod."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

from nhi.infra.config import Settings

if TYPE_CHECKING:
    from types_boto3_iam import IAMClient
    from types_boto3_secretsmanager import SecretsManagerClient
    from types_boto3_sts import STSClient


@dataclass(frozen=True)
class AwsClients:
    """The clients one worker shares across its activity threads (boto3 clients are thread-safe)."""

    iam: IAMClient
    sts: STSClient
    secrets: SecretsManagerClient
    region: str
    endpoint_url: str | None = None

    def sts_as(self, access_key_id: str, secret_access_key: str) -> STSClient:
        """An STS client signing with the given key: proves that key authenticates."""
        return boto3.client(
            "sts",
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(retries={"mode": "standard", "total_max_attempts": 2}),
        )


def make_aws_clients(settings: Settings, session: boto3.Session | None = None) -> AwsClients:
    """Clients with standard retries (throttling backs off) and the configured endpoint."""
    session = session or boto3.Session(region_name=settings.aws_region)
    config = Config(
        retries={"mode": "standard", "total_max_attempts": settings.aws_max_attempts},
        connect_timeout=5,
        read_timeout=30,
    )
    endpoint = settings.aws_endpoint_url
    return AwsClients(
        iam=session.client("iam", endpoint_url=endpoint, config=config),
        sts=session.client("sts", endpoint_url=endpoint, config=config),
        secrets=session.client("secretsmanager", endpoint_url=endpoint, config=config),
        region=settings.aws_region,
        endpoint_url=endpoint,
    )
