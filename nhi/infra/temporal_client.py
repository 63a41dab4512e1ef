"""The one Temporal client factory: API, worker, CLI and tests all connect through it.

The client's data converter is the worker's too (a worker built on a client inherits it), so
payload encryption is on for everything or for nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.service import TLSConfig

from nhi.infra.codec import EncryptionCodec, parse_keys
from nhi.infra.config import Settings
from nhi.infra.tracing import temporal_interceptors


def payload_codec(settings: Settings) -> EncryptionCodec | None:
    """The encryption codec `NHI_PAYLOAD_KEYS` describes; None when it is not set."""
    if settings.payload_keys is None:
        return None
    return EncryptionCodec(parse_keys(settings.payload_keys.get_secret_value()))


def data_converter(settings: Settings) -> DataConverter:
    """Pydantic payloads; with `NHI_PAYLOAD_KEYS`, encrypted, failure messages and stack traces
    included (moved into the failure's encoded attributes, which the codec encrypts)."""
    codec = payload_codec(settings)
    if codec is None:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def _read(path: Path, setting: str) -> bytes:
    # The path is named in the error, never the content: a key file must not reach a log.
    try:
        return path.read_bytes()
    except OSError as err:
        raise RuntimeError(f"{setting}: cannot read {path} ({err.strerror})") from None


def tls_config(settings: Settings) -> TLSConfig | bool:
    """mTLS (client certificate), a private CA or a server name when configured; else plain
    TLS when asked for or implied by an API key (Temporal Cloud), else none."""
    cert, key = settings.temporal_tls_cert, settings.temporal_tls_key
    ca, server_name = settings.temporal_tls_ca, settings.temporal_tls_server_name
    if cert is None and ca is None and server_name is None:
        return settings.temporal_tls or settings.temporal_api_key is not None
    return TLSConfig(
        server_root_ca_cert=_read(ca, "NHI_TEMPORAL_TLS_CA") if ca else None,
        domain=server_name,
        client_cert=_read(cert, "NHI_TEMPORAL_TLS_CERT") if cert else None,
        client_private_key=_read(key, "NHI_TEMPORAL_TLS_KEY") if key else None,
    )


async def connect(settings: Settings) -> Client:
    """Connect with the pydantic converter, so every payload is a typed model."""
    api_key = settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(settings),
        api_key=api_key,
        tls=tls_config(settings),
        # Tracing (when this process set it up): workers built on this client inherit it.
        interceptors=temporal_interceptors(),
    )
