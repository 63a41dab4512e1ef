"""The one Temporal client factory: API, worker, CLI and tests all connect through it."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from nhi.infra.config import Settings


async def connect(settings: Settings) -> Client:
    """Connect with the pydantic converter, so every payload is a typed model."""
    api_key = settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        api_key=api_key,
        tls=settings.temporal_tls or api_key is not None,
    )
