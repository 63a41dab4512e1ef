"""Tracing and structured logs (issue 14, item 3).

With `NHI_OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a tiny OTLP/HTTP receiver of the test's own,
the deployed processes (`uvicorn api.app:app`, `python worker.py`) export the spans of one NHI's
provisioning as one trace: the API's request, its workflow start, the workflow and its
activities in the worker. No secret reaches a span, and with `NHI_LOG_FORMAT=json` every line
the worker writes is a JSON object, those logged in a span carrying its trace id. Unset, tracing
installs nothing at all.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from temporalio.testing import WorkflowEnvironment

from nhi.infra.aws_clients import AwsClients
from nhi.infra.config import Settings
from nhi.infra.db import make_engine, make_sessionmaker, upgrade_head
from nhi.infra.logging import ContextFilter, JsonFormatter, TextFormatter
from tests.conftest import Databases, dev_address
from tests.helpers import (
    ROLE_SCOPE,
    agent_body,
    api_json,
    bearer,
    eventually,
    free_port,
    mint,
    wait_port,
)
from tests.ops_procs import service_env

ROOT = Path(__file__).resolve().parent.parent


# ---- a tiny OTLP/HTTP receiver ------------------------------------------------------------------
@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    attributes: dict[str, str]


class Receiver:
    """Collects the bodies POSTed to /v1/traces (OTLP protobuf) and answers 200."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.paths: set[str] = set()
        bodies, paths = self.bodies, self.paths

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                paths.add(self.path)
                if self.path == "/v1/traces":
                    bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[Span]:
        found = []
        for body in list(self.bodies):
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        found.append(
                            Span(
                                service=attrs.get("service.name", ""),
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                attributes={a.key: a.value.string_value for a in span.attributes},
                            )
                        )
        return found


@contextmanager
def serving(argv: list[str], port: int, log: Path, **settings: str) -> Iterator[str]:
    """A service process with its stderr in `log`; its base URL."""
    with log.open("wb") as err:
        popen = subprocess.Popen(argv, env=service_env(**settings), cwd=ROOT, stderr=err)
        try:
            wait_port(port, timeout=60, proc=popen)
            yield f"http://127.0.0.1:{port}"
        finally:
            popen.terminate()
            try:
                popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=10)


# ---- one trace from the request to the activities --------------------------------------------
@pytest.mark.slow
async def test_provisioning_is_one_trace_across_api_and_worker(
    dev_env: WorkflowEnvironment,
    databases: Databases,
    moto_url: str,
    aws: AwsClients,
    tmp_path: Path,
) -> None:
    url = databases.new("nhi_tracing")
    upgrade_head(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with Receiver() as receiver:
        common = {
            "NHI_DATABASE_URL": url,
            "NHI_TEMPORAL_ADDRESS": dev_address(dev_env),
            "NHI_TEMPORAL_TASK_QUEUE": f"nhi-tracing-{uuid.uuid4().hex[:8]}",
            "NHI_AWS_ENDPOINT_URL": moto_url,
            "NHI_AWS_REGION": "us-east-1",
            "NHI_OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "NHI_LOG_FORMAT": "json",
            # Export batches every 200 ms instead of 5 s, so the test need not wait.
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
        worker_port, api_port = free_port(), free_port()
        worker_argv = [sys.executable, str(ROOT / "worker.py")]
        api_argv = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1"]
        api_argv += ["--port", str(api_port)]
        worker_log, api_log = tmp_path / "worker.log", tmp_path / "api.log"
        with (
            serving(worker_argv, worker_port, worker_log, **common,
                    NHI_WORKER_HTTP_PORT=str(worker_port)),
            serving(api_argv, api_port, api_log, **common) as api,
        ):  # fmt: skip
            token = mint(sessions, "trace-ana", "platform", teams=["search"], email="a@x.io")
            async with httpx.AsyncClient(base_url=api, headers=bearer(token), timeout=30) as http:
                agent = await api_json(http, "POST", "/v1/agents", json=agent_body())
                body = {"platform": "aws", "kind": "iam_user_key", "scope": ROLE_SCOPE}
                body["ttl"] = "2d"
                accepted = await api_json(http, "POST", f"/v1/agents/{agent['id']}/nhis", json=body)

                async def active() -> dict[str, Any]:
                    nhi = await api_json(http, "GET", f"/v1/nhis/{accepted['id']}")
                    assert nhi["status"] == "active", nhi
                    return dict(nhi)

                nhi = await eventually(active, timeout=60, interval=0.3)
            wanted = {"RunActivity:create_identity", "RunActivity:record_active"}

            async def exported() -> list[Span]:
                spans = receiver.spans()
                assert wanted <= {s.name for s in spans}, sorted({s.name for s in spans})
                return spans

            spans = await eventually(exported, timeout=30, interval=0.3)
        raw = b"".join(receiver.bodies)
    engine.dispose()

    assert receiver.paths == {"/v1/traces"}
    # One run per NHI: the API starts the NHI's lifecycle, which provisions it first.
    [start] = [s for s in spans if s.name == "StartWorkflow:NhiLifecycleWorkflow"]
    assert start.service == "nhi-api"
    assert start.attributes["temporalWorkflowID"] == f"nhi-{nhi['id']}"
    trace = [s for s in spans if s.trace_id == start.trace_id]
    by_service = {(s.service, s.name) for s in trace}
    # The request's server span is the root: the workflow start is inside it.
    assert ("nhi-api", "POST /v1/agents/{agent_id}/nhis") in by_service, by_service
    assert ("nhi-worker", "RunWorkflow:NhiLifecycleWorkflow") in by_service, by_service
    for activity in ("create_identity", "deliver_credential", "record_active"):
        assert ("nhi-worker", f"RunActivity:{activity}") in by_service, activity
    # Probes and scrapes are not traced, nor the ASGI body chunks (one span per request).
    assert not [s for s in spans if "healthz" in s.name or "metrics" in s.name]
    assert not [s for s in spans if s.name.endswith(("http send", "http receive"))]

    # Spans carry names and ids, never the credential: not its reference, not the key.
    delivered = json.loads(
        aws.secrets.get_secret_value(SecretId=nhi["credential_ref"])["SecretString"]
    )
    for secret in (nhi["credential_ref"], delivered["AccessKeyId"], delivered["SecretAccessKey"]):
        assert secret.encode() not in raw

    # NHI_LOG_FORMAT=json: every line the worker wrote is one JSON object; lines logged in an
    # activity name its workflow and NHI, and those logged in a span carry the trace id.
    records = [json.loads(line) for line in worker_log.read_text().splitlines() if line]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    in_workflow = [r for r in records if r.get("workflow_id") == start.attributes[
        "temporalWorkflowID"]]  # fmt: skip
    assert in_workflow, records
    assert all(r.get("nhi_id") == nhi["id"] for r in in_workflow)
    assert any(r.get("trace_id") == start.trace_id for r in in_workflow), in_workflow
    for line in api_log.read_text().splitlines():
        json.loads(line)
    logs = worker_log.read_text() + api_log.read_text()
    assert delivered["SecretAccessKey"] not in logs


# ---- off: nothing installed -------------------------------------------------------------------
async def test_without_an_endpoint_nothing_is_installed(
    dev_env: WorkflowEnvironment, settings: Settings
) -> None:
    from opentelemetry import trace
    from opentelemetry.instrumentation.fastapi import OpenTelemetryMiddleware

    from api.app import create_app
    from nhi.infra import tracing
    from nhi.infra.temporal_client import connect

    off = settings.model_copy(update={"temporal_address": dev_address(dev_env)})
    assert off.otel_exporter_otlp_endpoint is None
    assert tracing.setup_tracing(off, "nhi-api") is None
    assert not tracing.tracing_enabled()
    assert tracing.temporal_interceptors() == []
    # No SDK tracer provider: OpenTelemetry's default no-op one.
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    app = create_app(off)
    assert not any(m.cls is OpenTelemetryMiddleware for m in app.user_middleware)
    client = await connect(off)
    assert list(client.config()["interceptors"]) == []


def test_settings_refuse_an_endpoint_that_is_not_http() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="otel_exporter_otlp_endpoint"):
        Settings(otel_exporter_otlp_endpoint="collector:4318")
    from nhi.infra.tracing import traces_url

    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/v1/traces/") == "http://c:4318/v1/traces"


# ---- log formats ------------------------------------------------------------------------------
def _logger(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    logger = logging.getLogger(f"nhi.test.{uuid.uuid4().hex[:8]}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger, out


def test_json_logs_are_one_object_per_line_with_the_current_trace() -> None:
    # A provider of the test's own, not the process's global one: only the context matters.
    tracer = TracerProvider().get_tracer("test")
    logger, out = _logger(JsonFormatter())
    nhi_id = str(uuid.uuid4())
    logger.info("outside any span")
    with tracer.start_as_current_span("work") as span:
        logger.info(
            "in an activity\nover two lines",
            extra={"temporal_activity": {"workflow_id": f"nhi-{nhi_id}", "activity_type": "x"}},
        )
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    outside, inside, failed = (json.loads(line) for line in lines)
    assert outside["message"] == "outside any span" and outside["level"] == "INFO"
    assert outside["logger"].startswith("nhi.test.") and outside["time"].endswith("+00:00")
    assert "trace_id" not in outside and "workflow_id" not in outside
    context = span.get_span_context()
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert inside["workflow_id"] == f"nhi-{nhi_id}" and inside["nhi_id"] == nhi_id
    assert inside["activity_type"] == "x"
    assert inside["message"] == "in an activity\nover two lines"
    assert "ValueError: boom" in failed["exception"] and failed["level"] == "ERROR"


def test_text_logs_show_the_trace_id_when_there_is_one() -> None:
    tracer = TracerProvider().get_tracer("test")
    logger, out = _logger(TextFormatter())
    logger.info("plain")
    with tracer.start_as_current_span("work") as span:
        logger.info("traced")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    plain, traced, failed, *traceback = out.getvalue().splitlines()
    trace_id = f"{span.get_span_context().trace_id:032x}"
    assert "trace_id=" not in plain and plain.endswith("plain")
    assert traced.endswith(f"traced trace_id={trace_id}")
    # The trace id stays on the message's line, before the traceback.
    assert failed.endswith(f"failed trace_id={trace_id}")
    assert traceback[-1] == "ValueError: boom"


def test_provision_workflow_ids_name_their_nhi() -> None:
    from nhi.infra.logging import nhi_id_of
    from nhi.rules.ids import lifecycle_workflow_id, provision_workflow_id, sweep_workflow_id

    nhi_id = uuid.uuid4()
    assert nhi_id_of(lifecycle_workflow_id(nhi_id)) == str(nhi_id)
    assert nhi_id_of(provision_workflow_id(nhi_id)) == str(nhi_id)
    assert nhi_id_of(sweep_workflow_id("aws")) is None
    assert nhi_id_of(None) is None
