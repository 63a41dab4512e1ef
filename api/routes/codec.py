"""The codec server: `POST /codec/encode` and `POST /codec/decode`, Temporal's remote codec
protocol, so the Temporal Web UI and `temporal --codec-endpoint` show encrypted payloads to the
operators who may read them.

Body and answer: proto3 JSON of `temporal.api.common.v1.Payloads`, `{"payloads": [{"metadata":
{"encoding": "<base64>"}, "data": "<base64>"}]}`; the `X-Namespace` header, when sent, must be
this deployment's namespace (its keys serve no other). Authenticated like the rest of the API.

Who may decode: `security`, `auditor`, `admin`. A decoded payload is any workflow's input,
result or failure, for every team at once; the codec cannot tell whose agent a payload is about,
so only roles that already read the whole inventory and answer for the service get it.
(`approver` reads everything too, but decides through the API and Slack, not the Web UI;
`platform` callers see only their teams.) Who may encode: `security` and `admin`, the roles that
act on workflows from the Web UI (signals, resets); the read-only `auditor` may not.

Payloads in clear (recorded before encryption) decode as they are. Without `NHI_PAYLOAD_KEYS`
both endpoints answer 404 (they are not mounted). CORS is allowed for one origin,
`NHI_CODEC_CORS_ORIGIN` (the Temporal Web UI), on these two paths only.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send
from temporalio.api.common.v1 import Payload

from api.deps import CurrentPrincipal, State, authenticated
from api.errors import documented
from models.enums import Role
from models.schemas import MAX_BODY_BYTES
from nhi.infra.codec import EncryptionCodec, PayloadDecryptError
from nhi.infra.config import Settings
from nhi.infra.temporal_client import payload_codec
from nhi.rules.policy import RuleViolation
from nhi.services.auth import Principal, require_role
from nhi.services.errors import NotFound

log = logging.getLogger(__name__)

PREFIX = "/codec"
DECODERS = (Role.SECURITY, Role.AUDITOR, Role.ADMIN)
ENCODERS = (Role.SECURITY, Role.ADMIN)
MAX_PAYLOADS = 1000


def _b64(value: str) -> str:
    _b64_bytes(value)
    return value


def _b64_bytes(value: str) -> bytes:
    """Proto3 JSON bytes: standard base64, though parsers also take the URL-safe alphabet and
    missing padding."""
    padded = value + "=" * (-len(value) % 4)
    try:
        return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64") from None


Base64 = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9+/_-]*={0,2}$", max_length=MAX_BODY_BYTES),
    AfterValidator(_b64),
]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class PayloadJson(BaseModel):
    """One `temporal.api.common.v1.Payload` in proto3 JSON (bytes as base64)."""

    # Fields a newer Temporal adds are left alone rather than refused: the Web UI sends
    # payloads as the server gave them.
    model_config = ConfigDict(extra="ignore")

    metadata: dict[MetadataKey, Base64] = Field(default_factory=dict, max_length=64)
    data: Base64 = ""

    def proto(self) -> Payload:
        return Payload(
            metadata={k: _b64_bytes(v) for k, v in self.metadata.items()},
            data=_b64_bytes(self.data),
        )

    @classmethod
    def of(cls, payload: Payload) -> PayloadJson:
        return cls(
            metadata={k: base64.b64encode(v).decode() for k, v in payload.metadata.items()},
            data=base64.b64encode(payload.data).decode(),
        )


class Payloads(BaseModel):
    """`temporal.api.common.v1.Payloads` in proto3 JSON."""

    model_config = ConfigDict(extra="ignore")

    payloads: list[PayloadJson] = Field(default_factory=list, max_length=MAX_PAYLOADS)


def _decoder(p: CurrentPrincipal) -> Principal:
    require_role(p, *DECODERS)
    return p


def _encoder(p: CurrentPrincipal) -> Principal:
    require_role(p, *ENCODERS)
    return p


def _codec(request: Request, state: State, namespace: str | None) -> EncryptionCodec:
    codec: EncryptionCodec | None = request.app.state.codec
    if codec is None:
        raise NotFound("payload encryption is off here (NHI_PAYLOAD_KEYS is not set)")
    if namespace is not None and namespace != state.settings.temporal_namespace:
        raise RuleViolation(
            "X-Namespace",
            f"this codec serves namespace {state.settings.temporal_namespace!r} only",
        )
    return codec


NamespaceHeader = Annotated[
    str | None,
    Header(alias="X-Namespace", max_length=1000, description="The payloads' Temporal namespace."),
]
_RESPONSES = documented(401, 403, 404)
_SECURED: dict[str, object] = {"security": [{"bearer": []}]}
router = APIRouter(prefix=PREFIX, tags=["codec"], dependencies=[authenticated])


@router.post("/decode", responses=_RESPONSES, openapi_extra=_SECURED)
async def decode(
    body: Payloads,
    request: Request,
    state: State,
    p: Annotated[Principal, Depends(_decoder)],
    x_namespace: NamespaceHeader = None,
) -> Payloads:
    """Decrypt payloads for the Web UI or the CLI (roles security, auditor, admin). Payloads
    stored in clear come back as they are; one that cannot be decrypted is a 422 naming it."""
    codec = _codec(request, state, x_namespace)
    out: list[PayloadJson] = []
    for n, item in enumerate(body.payloads):
        try:
            out.append(PayloadJson.of(codec.decrypt(item.proto())))
        except PayloadDecryptError as err:
            raise RuleViolation(f"payloads[{n}]", str(err)) from None
    # Who read what stays traceable: operators see payloads no API answer would show at once.
    log.info("codec: %s decoded %d payload(s)", p.actor, len(out))
    return Payloads(payloads=out)


@router.post("/encode", responses=_RESPONSES, openapi_extra=_SECURED)
async def encode(
    body: Payloads,
    request: Request,
    state: State,
    p: Annotated[Principal, Depends(_encoder)],
    x_namespace: NamespaceHeader = None,
) -> Payloads:
    """Encrypt payloads the Web UI or the CLI sends to a workflow (roles security, admin)."""
    codec = _codec(request, state, x_namespace)
    out = [PayloadJson.of(codec.encrypt(item.proto())) for item in body.payloads]
    log.info("codec: %s encoded %d payload(s)", p.actor, len(out))
    return Payloads(payloads=out)


class _CodecCors:
    """CORS for the Temporal Web UI's origin on the codec paths only: no other route is ever
    callable from a browser page."""

    def __init__(self, app: ASGIApp, origin: str) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=[origin],
            allow_methods=["POST"],
            allow_headers=["Authorization", "Content-Type", "X-Namespace"],
            allow_credentials=True,
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PREFIX + "/"):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def install(app: FastAPI, settings: Settings) -> None:
    """The two endpoints with their codec and, when an origin is configured, their CORS; none
    of it without `NHI_PAYLOAD_KEYS`."""
    app.state.codec = payload_codec(settings)
    if app.state.codec is None:
        # Without keys there is nothing to decode: no endpoint (404), none in the OpenAPI.
        return
    app.include_router(router)
    if settings.codec_cors_origin:
        app.add_middleware(_CodecCors, origin=settings.codec_cors_origin)
