"""OpenTelemetry tracing of the API (`nhi-api`) and the worker (`nhi-worker`).

On only when `NHI_OTEL_EXPORTER_OTLP_ENDPOINT` is set: `setup_tracing` then installs a tracer
provider that batches spans to `<endpoint>/v1/traces` over OTLP/HTTP, `temporal_interceptors`
gives the Temporal client (and through it every worker built on that client) the SDK's
`TracingInterceptor`, and `instrument_app` wraps the FastAPI app. Unset, none of them does
anything: no provider, no interceptor, no middleware, not even the SDK imported.

One trace per request: the FastAPI span is the parent of the client's `StartWorkflow` span, the
interceptor carries its context in the workflow's headers, and the workflow's and each
activity's spans join it in the worker. Spans carry workflow and activity names and ids, never
payloads (arguments and results stay out of them; credentials never reach a payload anyway).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nhi.infra.config import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from temporalio.client import Interceptor

log = logging.getLogger("nhi.infra.tracing")

TRACES_PATH = "/v1/traces"
# Probes and scrapes every few seconds would drown the traces that matter.
UNTRACED_URLS = "healthz,readyz,metrics"

# One provider per process (OpenTelemetry's global can be set once); None: tracing is off.
_provider: TracerProvider | None = None


def traces_url(endpoint: str) -> str:
    """Where spans are posted: the collector's base URL plus `/v1/traces` (as the standard
    `OTEL_EXPORTER_OTLP_ENDPOINT` means it), unless the URL already names that path."""
    base = endpoint.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def setup_tracing(settings: Settings, service_name: str) -> TracerProvider | None:
    """Install the process's tracer provider when an endpoint is configured; the provider, or
    None when tracing is off. Idempotent: a second call (a second app in one process) gets the
    first provider, whose service name stays."""
    global _provider
    if settings.otel_exporter_otlp_endpoint is None:
        return None
    if _provider is not None:
        return _provider
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    url = traces_url(settings.otel_exporter_otlp_endpoint)
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    # Batched and exported from a background thread: a slow or absent collector costs a
    # dropped batch, never a request's or an activity's latency.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing on: %s exports spans to %s", service_name, url)
    return provider


def tracing_enabled() -> bool:
    """Whether this process installed a tracer provider."""
    return _provider is not None


def temporal_interceptors() -> list[Interceptor]:
    """The Temporal client's interceptors: the SDK's tracing one when tracing is on. Given to
    the client, it also applies to every worker created on that client."""
    if _provider is None:
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor(_provider.get_tracer("temporalio"))]


def instrument_app(app: FastAPI) -> None:
    """Trace every request of `app` (probes and `/metrics` excepted) when tracing is on."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # One span per request: the ASGI "http send"/"http receive" child spans (one per body
    # chunk) would multiply the spans exported for no question anyone asks of a trace.
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=_provider,
        excluded_urls=UNTRACED_URLS,
        exclude_spans=["receive", "send"],
    )


def flush_tracing(timeout_millis: int = 5_000) -> None:
    """Export the spans still batched (before the process exits)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis)


def shutdown_tracing() -> None:
    """Flush and stop the exporter (the process is exiting); tracing is off afterwards."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None
