"""Payload encryption (nhi/infra/codec.py), the codec server (api/routes/codec.py) and mTLS to
Temporal (nhi/infra/temporal_client.py), against the real Temporal dev server and CLI.

What the server stores is read with a client WITHOUT the codec: every payload of a provisioning
run and of a failing run is ciphertext with a key id, failure messages and stack traces
included; with the codec they decode, and a rotated key ring (new key first) still decodes
them. Search attributes are indexed by the server in clear by design and are left out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.message import Message
from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.api.failure.v1 import Failure
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, Worker

from api.app import create_app
from models.contracts import ProvisionInput
from models.enums import NhiStatus
from nhi.infra.aws_clients import AwsClients
from nhi.infra.codec import ENCODING, KEY_ID, EncryptionCodec, PayloadDecryptError, parse_keys
from nhi.infra.config import Settings
from nhi.infra.temporal_client import connect, data_converter
from nhi.rules.ids import provision_workflow_id
from tests.conftest import binary, dev_address
from tests.helpers import ApiServer, bearer, mint, request_nhi
from worker import WORKFLOWS, build_worker
from workflows.provision import ProvisionNhiWorkflow

OLD_KEY = base64.b64encode(os.urandom(32)).decode()
NEW_KEY = base64.b64encode(os.urandom(32)).decode()
PAYLOAD_TYPE = "temporal.api.common.v1.Payload"
UI_ORIGIN = "https://temporal-ui.example.com"


def keyed(settings: Settings, keys: str | None, **update: object) -> Settings:
    """`settings` with `NHI_PAYLOAD_KEYS` = `keys` (validated as at start)."""
    return Settings.model_validate({**settings.model_dump(), "payload_keys": keys, **update})


# ---- the key ring -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "no key given"),
        (OLD_KEY, "expected `kid:base64key`"),
        (f"old:{OLD_KEY[:20]}", "exactly 32 bytes"),
        (f"old:{base64.b64encode(os.urandom(16)).decode()}", "exactly 32 bytes"),
        (f"bad id:{OLD_KEY}", "key id must be"),
        (f"old:{OLD_KEY},old:{NEW_KEY}", "appears twice"),
        (f"new:{NEW_KEY},old:{OLD_KEY}!", "entry 2 ('old')"),
    ],
)
def test_a_bad_key_ring_stops_start_up_naming_the_setting_never_the_key(
    value: str, rule: str
) -> None:
    with pytest.raises(ValueError) as caught:
        Settings(_env_file=None, payload_keys=value)  # type: ignore[call-arg]
    message = str(caught.value)
    assert "NHI_PAYLOAD_KEYS" in message and rule in message, message
    for secret in (OLD_KEY, NEW_KEY, OLD_KEY[:20]):
        assert secret not in message


def test_the_first_key_encrypts_and_every_key_decrypts() -> None:
    ring = parse_keys(f" new:{NEW_KEY} , old:{OLD_KEY.rstrip('=')}")
    assert ring.current == "new" and set(ring.by_id) == {"new", "old"}
    assert NEW_KEY not in repr(ring)
    old_only = EncryptionCodec(parse_keys(f"old:{OLD_KEY}"))
    rotated = EncryptionCodec(ring)
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'{"owner": "ana@example.com"}')
    sealed = old_only.encrypt(plain)
    assert sealed.metadata["encoding"] == ENCODING and sealed.metadata[KEY_ID] == b"old"
    assert b"ana@example.com" not in sealed.SerializeToString()
    assert rotated.decrypt(sealed) == plain
    assert rotated.encrypt(plain).metadata[KEY_ID] == b"new"
    assert rotated.decrypt(plain) == plain, "payloads from before encryption pass as they are"
    with pytest.raises(PayloadDecryptError, match="key id 'new'"):
        old_only.decrypt(rotated.encrypt(plain))
    tampered = Payload()
    tampered.CopyFrom(sealed)
    tampered.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(PayloadDecryptError, match="fails authentication"):
        rotated.decrypt(tampered)
    relabelled = Payload()
    relabelled.CopyFrom(sealed)
    relabelled.metadata[KEY_ID] = b"new"  # the key id is authenticated with the data
    with pytest.raises(PayloadDecryptError):
        EncryptionCodec(parse_keys(f"new:{OLD_KEY}")).decrypt(relabelled)


async def test_failure_messages_and_stack_traces_are_encoded_too() -> None:
    converter = data_converter(Settings(_env_file=None, payload_keys=f"k1:{OLD_KEY}"))  # type: ignore[call-arg]
    failure = Failure()
    try:
        raise ApplicationError("role for owner ana@example.com refused", type="Refused")
    except ApplicationError as err:
        await converter.encode_failure(err, failure)
    assert failure.message == "Encoded failure" and not failure.stack_trace
    assert failure.encoded_attributes.metadata["encoding"] == ENCODING
    assert b"ana@example.com" not in failure.SerializeToString()
    decoded = await converter.decode_failure(failure)
    assert isinstance(decoded, ApplicationError) and "ana@example.com" in decoded.message
    assert Settings.model_fields["payload_keys"].default is None, "off unless set (make dev)"


# ---- what the server stores -------------------------------------------------------------------


# Never through the codec: search attributes (the server indexes them: in clear by design),
# headers (the SDK's default header codec behaviour; tracing context only) and markers (core
# writes the patch markers itself: a patch id).
SEARCH_ATTRIBUTES = "temporal.api.common.v1.SearchAttributes"
OTHERS_IN_CLEAR = (
    "temporal.api.common.v1.Header",
    "temporal.api.history.v1.MarkerRecordedEventAttributes",
)


@dataclass
class Found:
    payloads: list[Payload]
    search_attributes: list[Message]
    other_in_clear: list[Message]


def walk(message: Message, found: Found) -> Found:
    """Every Payload in a proto tree, with what never passes through the codec set apart."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            values = list(value.values())
            if values and not isinstance(values[0], Message):
                continue
        elif field.is_repeated:
            values = list(value)
        else:
            values = [value]
        for item in values:
            name = item.DESCRIPTOR.full_name
            if name == PAYLOAD_TYPE:
                found.payloads.append(item)
            elif name == SEARCH_ATTRIBUTES:
                found.search_attributes.append(item)
            elif name in OTHERS_IN_CLEAR:
                found.other_in_clear.append(item)
            else:
                walk(item, found)
    return found


def stored(history: WorkflowHistory) -> Found:
    found = Found([], [], [])
    for event in history.events:
        walk(event, found)
    return found


def assert_ciphertext(history: WorkflowHistory, kid: str, *plaintexts: str) -> list[Payload]:
    found = stored(history)
    assert len(found.payloads) >= 3, "inputs, results and activity arguments are payloads"
    for payload in found.payloads:
        assert payload.metadata["encoding"] == ENCODING, payload.metadata
        assert payload.metadata[KEY_ID] == kid.encode()
    for message in found.payloads + found.other_in_clear:
        for text in plaintexts:
            assert text.encode() not in message.SerializeToString()
    return found.payloads


@pytest.fixture
async def dev_client(dev_env: WorkflowEnvironment) -> Client:
    """A client of the dev server WITHOUT the codec: what the server holds, as it holds it."""
    return dev_env.client


@contextlib.asynccontextmanager
async def encrypted_worker(
    settings: Settings, sessions: sessionmaker[Session], aws: AwsClients
) -> AsyncIterator[Client]:
    client = await connect(settings)
    async with build_worker(client, settings, sessions, aws):
        yield client


def our_settings(settings: Settings, dev_env: WorkflowEnvironment, keys: str) -> Settings:
    return keyed(
        settings,
        keys,
        temporal_address=dev_address(dev_env),
        temporal_task_queue=f"codec-{uuid.uuid4().hex[:8]}",
    )


async def test_a_provisioning_history_is_ciphertext_decoded_only_with_the_keys(
    dev_env: WorkflowEnvironment,
    dev_client: Client,
    settings: Settings,
    sessions: sessionmaker[Session],
    aws: AwsClients,
    codec_api: str,
) -> None:
    enc = our_settings(settings, dev_env, f"old:{OLD_KEY}")
    owner = f"codec-owner-{uuid.uuid4().hex[:6]}@example.com"
    bucket = f"codec-kb-{uuid.uuid4().hex[:8]}"
    scope = [{"actions": ["s3:GetObject"], "resources": [f"arn:aws:s3:::{bucket}/*"]}]
    _, nhi_id, _ = request_nhi(sessions, enc, "iam_role", scope=scope, owner_email=owner)
    workflow_id = provision_workflow_id(nhi_id)
    async with encrypted_worker(enc, sessions, aws) as client:
        result = await client.execute_workflow(
            ProvisionNhiWorkflow.run,
            ProvisionInput(nhi_id=nhi_id, requested_by="test:codec"),
            id=workflow_id,
            task_queue=enc.temporal_task_queue,
        )
    assert result.status is NhiStatus.ACTIVE

    # Read back without the codec: ciphertext with the key id, no owner or scope anywhere.
    history = await dev_client.get_workflow_handle(workflow_id).fetch_history()
    payloads = assert_ciphertext(history, "old", owner, bucket)
    # The same history through the codec holds them: the check above could have failed.
    decoded = await EncryptionCodec(parse_keys(f"old:{OLD_KEY}")).decode(payloads)
    clear = b"".join(p.SerializeToString() for p in decoded)
    assert bucket.encode() in clear and owner.encode() in clear
    assert all(p.metadata["encoding"] != ENCODING for p in decoded)

    # Rotated: a new key encrypts, the old one (second) still decodes and replays.
    rotated = keyed(enc, f"new:{NEW_KEY},old:{OLD_KEY}")
    replayed = await Replayer(
        workflows=WORKFLOWS, data_converter=data_converter(rotated)
    ).replay_workflow(history, raise_on_replay_failure=True)
    assert replayed.replay_failure is None
    rotated_client = await connect(rotated)
    assert (await rotated_client.get_workflow_handle(workflow_id).result())["status"] == "active"
    # Once the old key is dropped, its histories no longer decode (why it stays listed).
    new_only = await connect(keyed(enc, f"new:{NEW_KEY}"))
    with pytest.raises(PayloadDecryptError, match="key id 'old'"):
        await new_only.get_workflow_handle(workflow_id).result()

    # `temporal workflow show` (the real CLI, no codec): no plaintext scope or owner.
    shown = _show(dev_env, workflow_id)
    for text in (owner, bucket):
        assert text not in shown["text"], f"{text} in `temporal workflow show`"
        assert text not in shown["payload_data"], f"{text} in a payload of the CLI's output"
    assert shown["payloads"] and all(e == "binary/encrypted" for e in shown["encodings"])
    print(f"search attributes in history: {shown['search_attribute_names']}")
    # The same CLI through our codec server (the API, its keys rotated) shows them to a role
    # that may read them: the endpoints speak Temporal's remote codec protocol.
    auth = f"Bearer {mint(sessions, 'codec-security', 'security')}"
    endpoint = ["--codec-endpoint", f"{codec_api}/codec", "--codec-auth", auth]
    through = _show(dev_env, workflow_id, *endpoint)
    assert owner in through["text"] + through["payload_data"]
    assert bucket in through["text"] + through["payload_data"]


def _payload_dicts(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "metadata" in node and isinstance(node.get("metadata"), dict):
            yield node
        for key, value in node.items():
            if key not in ("header", "markerRecordedEventAttributes"):
                yield from _payload_dicts(value)
    elif isinstance(node, list):
        for item in node:
            yield from _payload_dicts(item)


def _strip_search_attributes(node: Any, names: set[str]) -> Any:
    if isinstance(node, dict):
        if "searchAttributes" in node:
            names.update(node["searchAttributes"].get("indexedFields", {}))
        return {
            k: _strip_search_attributes(v, names)
            for k, v in node.items()
            if k != "searchAttributes"
        }
    if isinstance(node, list):
        return [_strip_search_attributes(i, names) for i in node]
    return node


def _b64text(value: Any) -> str:
    """A payload field of the CLI's JSON: base64 bytes, or already a decoded value."""
    if not isinstance(value, str):
        return json.dumps(value)
    try:
        return base64.b64decode(value, validate=True).decode("latin-1")
    except ValueError:
        return value


def _show(env: WorkflowEnvironment, workflow_id: str, *options: str) -> dict[str, Any]:
    """`temporal workflow show -o json` against the dev server, search attributes set apart
    (indexed in clear by design); its payloads' encodings and decoded data."""
    command = [binary("temporal"), "workflow", "show", "--address", dev_address(env)]
    command += ["--namespace", "default", "-w", workflow_id, "-o", "json", *options]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    names: set[str] = set()
    document = _strip_search_attributes(json.loads(run.stdout), names)
    payloads = list(_payload_dicts(document))
    encodings = [_b64text(p["metadata"].get("encoding", "")) for p in payloads]
    data = "".join(_b64text(p.get("data", "")) for p in payloads)
    return {
        "text": json.dumps(document),
        "payloads": payloads,
        "encodings": encodings,
        "payload_data": data,
        "search_attribute_names": sorted(names),
    }


# ---- a failure in history ---------------------------------------------------------------------


@activity.defn(name="codec_test_refuse")
def refuse(owner: str) -> None:
    raise ApplicationError(f"refused for {owner}", type="Refused", non_retryable=True)


@workflow.defn(name="CodecTestFailing", sandboxed=False)
class Failing:
    @workflow.run
    async def run(self, owner: str) -> None:
        await workflow.execute_activity(refuse, owner, start_to_close_timeout=timedelta(seconds=10))


async def test_a_failure_in_history_is_encoded_message_and_stack_trace_included(
    dev_env: WorkflowEnvironment, dev_client: Client, settings: Settings
) -> None:
    enc = our_settings(settings, dev_env, f"old:{OLD_KEY}")
    owner = f"codec-failing-{uuid.uuid4().hex[:6]}@example.com"
    client = await connect(enc)
    workflow_id = f"codec-failing-{uuid.uuid4().hex[:8]}"
    async with Worker(
        client,
        task_queue=enc.temporal_task_queue,
        workflows=[Failing],
        activities=[refuse],
        activity_executor=ThreadPoolExecutor(1),
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        with pytest.raises(WorkflowFailureError) as caught:
            await client.execute_workflow(
                Failing.run, owner, id=workflow_id, task_queue=enc.temporal_task_queue
            )
    # With the codec, the caller gets the real message back.
    cause = caught.value.cause
    assert isinstance(cause, ActivityError) and isinstance(cause.cause, ApplicationError)
    assert cause.cause.message == f"refused for {owner}"
    assert cause.cause.type == "Refused", "the error type stays readable: routing depends on it"

    history = await dev_client.get_workflow_handle(workflow_id).fetch_history()
    failures = [
        e.activity_task_failed_event_attributes.failure
        for e in history.events
        if e.HasField("activity_task_failed_event_attributes")
    ]
    assert failures
    for failure in failures:
        assert failure.message == "Encoded failure" and not failure.stack_trace
        assert failure.encoded_attributes.metadata["encoding"] == ENCODING
    assert owner.encode() not in b"".join(e.SerializeToString() for e in history.events)
    assert_ciphertext(history, "old", owner)


# ---- the codec server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def codec_api(
    dev_env: WorkflowEnvironment, settings: Settings, sessions: sessionmaker[Session]
) -> Iterator[str]:
    enc = keyed(
        settings,
        f"new:{NEW_KEY},old:{OLD_KEY}",
        temporal_address=dev_address(dev_env),
        codec_cors_origin=UI_ORIGIN,
    )
    with ApiServer(create_app(enc, sessions)) as server:
        yield server.url


def _token(sessions: sessionmaker[Session], role: str) -> dict[str, str]:
    return bearer(
        mint(sessions, f"codec-{role}", role, teams=["search"] if role == "platform" else None)
    )


def _json(payload: Payload) -> dict[str, Any]:
    return {
        "metadata": {k: base64.b64encode(v).decode() for k, v in payload.metadata.items()},
        "data": base64.b64encode(payload.data).decode(),
    }


def _proto(item: dict[str, Any]) -> Payload:
    return Payload(
        metadata={k: base64.b64decode(v) for k, v in item["metadata"].items()},
        data=base64.b64decode(item.get("data", "")),
    )


PLAIN = Payload(metadata={"encoding": b"json/plain"}, data=b'{"owner": "ana@example.com"}')


def test_the_codec_endpoints_round_trip_for_the_roles_that_may(
    codec_api: str, sessions: sessionmaker[Session]
) -> None:
    body = {"payloads": [_json(PLAIN)]}
    headers = {**_token(sessions, "security"), "X-Namespace": "default"}
    encoded = httpx.post(f"{codec_api}/codec/encode", json=body, headers=headers, timeout=10)
    assert encoded.status_code == 200, encoded.text
    [sealed] = encoded.json()["payloads"]
    assert _proto(sealed).metadata[KEY_ID] == b"new"
    assert b"ana@example.com" not in base64.b64decode(sealed["data"])
    # What a worker with the old key wrote decodes too; a payload in clear comes back as it is.
    old = EncryptionCodec(parse_keys(f"old:{OLD_KEY}")).encrypt(PLAIN)
    for role in ("security", "auditor", "admin"):
        decoded = httpx.post(
            f"{codec_api}/codec/decode",
            json={"payloads": [sealed, _json(old), _json(PLAIN)]},
            headers={**_token(sessions, role), "X-Namespace": "default"},
            timeout=10,
        )
        assert decoded.status_code == 200, (role, decoded.text)
        assert [_proto(p) for p in decoded.json()["payloads"]] == [PLAIN, PLAIN, PLAIN]


@pytest.mark.parametrize(
    ("path", "role", "status"),
    [
        ("decode", None, 401),
        ("encode", None, 401),
        ("decode", "platform", 403),
        ("decode", "approver", 403),
        ("encode", "auditor", 403),
        ("encode", "platform", 403),
    ],
)
def test_the_codec_endpoints_refuse_who_may_not(
    codec_api: str, sessions: sessionmaker[Session], path: str, role: str | None, status: int
) -> None:
    sealed = EncryptionCodec(parse_keys(f"old:{OLD_KEY}")).encrypt(PLAIN)
    headers = _token(sessions, role) if role else {}
    answer = httpx.post(
        f"{codec_api}/codec/{path}", json={"payloads": [_json(sealed)]}, headers=headers, timeout=10
    )
    assert answer.status_code == status, answer.text
    assert "ana@example.com" not in answer.text and "payloads" not in answer.json()


def test_the_codec_endpoints_name_what_they_cannot_do(
    codec_api: str, sessions: sessionmaker[Session], settings: Settings
) -> None:
    admin = _token(sessions, "admin")
    foreign = EncryptionCodec(parse_keys(f"gone:{base64.b64encode(os.urandom(32)).decode()}"))
    cases = [
        ({"payloads": [_json(PLAIN), _json(foreign.encrypt(PLAIN))]}, {}, "payloads[1]"),
        ({"payloads": [_json(PLAIN)]}, {"X-Namespace": "other"}, "X-Namespace"),
        ({"payloads": [{"metadata": {"encoding": "%%%"}, "data": ""}]}, {}, "payloads[0]"),
    ]
    for body, extra, field in cases:
        answer = httpx.post(
            f"{codec_api}/codec/decode", json=body, headers={**admin, **extra}, timeout=10
        )
        assert answer.status_code == 422, answer.text
        assert answer.json()["field"].startswith(field), answer.json()
    # Without keys the endpoints are not served at all.
    with ApiServer(create_app(settings, sessions)) as off:
        answer = httpx.post(
            f"{off.url}/codec/decode", json={"payloads": []}, headers=admin, timeout=10
        )
        assert answer.status_code == 404


def test_cors_allows_the_temporal_ui_origin_on_the_codec_paths_only(codec_api: str) -> None:
    def preflight(path: str, origin: str) -> httpx.Response:
        return httpx.options(
            f"{codec_api}{path}",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
            },
            timeout=10,
        )

    allowed = preflight("/codec/decode", UI_ORIGIN)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == UI_ORIGIN
    assert "x-namespace" in allowed.headers["access-control-allow-headers"].lower()
    other = preflight("/codec/decode", "https://evil.example.com")
    assert other.headers.get("access-control-allow-origin") != "https://evil.example.com"
    assert "access-control-allow-origin" not in preflight("/v1/agents", UI_ORIGIN).headers


# ---- mTLS -------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    dns: str | None = None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("nhi test CA", ca_key, None, ca_key, ca=True)
    files: dict[str, bytes] = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM)}
    for who, dns in (("server", "temporal.test"), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"nhi {who}", key, ca.subject, ca_key, dns=dns)
        files[f"{who}.pem"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{who}.key"] = _key_pem(key)
    for name, content in files.items():
        (out / name).write_bytes(content)
    return Pki(
        out / "ca.pem", out / "server.pem", out / "server.key", out / "client.pem",
        out / "client.key",
    )  # fmt: skip


@contextlib.asynccontextmanager
async def mtls_proxy(pki: Pki, upstream: str) -> AsyncIterator[str]:
    """A TLS endpoint in front of the dev server (which has no TLS) that requires a client
    certificate signed by the test CA, as Temporal Cloud does for mTLS namespaces."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    host, port = upstream.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield address
    finally:
        server.close()


async def test_mtls_with_a_client_certificate_from_files(
    dev_env: WorkflowEnvironment, settings: Settings, pki: Pki
) -> None:
    async with mtls_proxy(pki, dev_address(dev_env)) as address:
        mtls = settings.model_copy(
            update={
                "temporal_address": address,
                "temporal_tls_cert": pki.client_cert,
                "temporal_tls_key": pki.client_key,
                "temporal_tls_ca": pki.ca,
                "temporal_tls_server_name": "temporal.test",
            }
        )
        client = await asyncio.wait_for(connect(mtls), 30)
        assert (await client.count_workflows()).count >= 0
        # The same endpoint refuses a client without a certificate.
        no_cert = mtls.model_copy(update={"temporal_tls_cert": None, "temporal_tls_key": None})
        with pytest.raises(RuntimeError) as refused:
            await asyncio.wait_for(connect(no_cert), 30)
        print(f"without a client certificate: {refused.value}")
    # A key file that cannot be read is named by its setting and path, its content never read.
    missing = mtls.model_copy(update={"temporal_tls_key": pki.client_key.with_name("gone.key")})
    with pytest.raises(RuntimeError, match=r"NHI_TEMPORAL_TLS_KEY: cannot read .*gone\.key"):
        await connect(missing)
