"""Error answers: one JSON body (`models.schemas.Error`) for every status, naming the field at
fault and the rule it breaks; no stack traces, never the offending value. The OpenAPI document
declares that body, with an example, for every status an operation can answer.

The one place where errors become HTTP statuses: the services' typed domain errors
(`nhi.services.errors`, `nhi.rules.policy.RuleViolation`), authentication, Temporal and database
outages (`_STATUS_OF`), and a lifecycle workflow's refusal of an update (`refusal`, which
turns the workflow's error type into one of those domain errors). The field at fault is always
an attribute of the error, never parsed out of its message."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from api.deps import TemporalUnavailable
from models.schemas import MAX_BODY_BYTES, Error, FieldError
from nhi.rules.lifecycle import STILL_PROVISIONING
from nhi.rules.policy import RuleViolation
from nhi.services.auth import Unauthenticated
from nhi.services.errors import Conflict, Forbidden, NotFound, PolicyViolation

log = logging.getLogger(__name__)


def field_of(loc: Iterable[Any]) -> str:
    """`("body", "policies", 0, "reminder_offsets")` as `policies[0].reminder_offsets`."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path", "header", "cookie") and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def error_response(
    status: int,
    message: str,
    field: str | None = None,
    errors: list[FieldError] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An `Error` body; `field` and `errors` only when there are some."""
    body = Error(detail=message, field=field, errors=errors)
    return JSONResponse(
        status_code=status, content=body.model_dump(mode="json", exclude_none=True), headers=headers
    )


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Input values are not echoed back: a mistaken field could hold something sensitive.
    errors = [
        FieldError(field=field_of(e.get("loc", ())), message=str(e.get("msg", "")), type=e["type"])
        for e in exc.errors()
    ]
    if not errors:
        return error_response(422, "invalid request", "body")
    first = errors[0]
    # A body that is not JSON at all is a bad request, not a field breaking a rule.
    status = 400 if any(e.type == "json_invalid" for e in errors) else 422
    return error_response(status, f"{first.field}: {first.message}", first.field, errors)


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


# Each error type's status; a subclass answers as its base (AwsUnavailable as 503).
_STATUS_OF: dict[type[Exception], int] = {
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    RuleViolation: 422,
    PolicyViolation: 422,
    TemporalUnavailable: 503,
}


async def _domain(_: Request, exc: Exception) -> JSONResponse:
    status = next(_STATUS_OF[t] for t in type(exc).__mro__ if t in _STATUS_OF)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return error_response(status, str(exc), getattr(exc, "field", None), headers=headers)


class LifecycleNotReady(TemporalUnavailable):
    """A workflow refused an update it could not take in time (its deadline passed, or it is
    still starting): 503, nothing was applied."""


# A lifecycle or provisioning workflow's refusal of an update, by its ApplicationError type:
# who may not (403), what may not now (409), what may never (422), and a deadline that passed
# before the workflow saw the action (503: nothing was applied). Other types are 409.
_REFUSALS: dict[str, Callable[[str], Exception]] = {
    "NotOwner": Forbidden,
    "SelfApproval": Forbidden,
    "InvalidState": Conflict,
    STILL_PROVISIONING: Conflict,
    "AlreadyDecided": Conflict,
    "MaxLifetime": lambda message: PolicyViolation(message, "extend_by"),
    "ShortensExpiry": lambda message: PolicyViolation(message, "extend_by"),
    "DeadlinePassed": LifecycleNotReady,
    "NotReady": LifecycleNotReady,
}


def refusal(err: WorkflowUpdateFailedError) -> Exception:
    """The domain error a workflow's refusal of an update stands for (raise it). Only the
    workflow's own refusals (typed ApplicationErrors) are shown; anything else is an internal
    failure, told without its details."""
    cause = err.cause
    if not (isinstance(cause, ApplicationError) and cause.type):
        return Conflict("the lifecycle could not carry out this action")
    return _REFUSALS.get(cause.type, Conflict)(cause.message)


async def _database_unavailable(_: Request, exc: Exception) -> JSONResponse:
    # Connection refused, a dropped connection, a full pool, a deadlock: nothing was committed
    # and the same request can be sent again.
    log.warning("database unavailable: %s", type(exc).__name__)
    return error_response(503, "the database is unavailable; nothing was changed, try again")


class _Tracked:
    """A `send` that remembers whether the response has started (after which an error can no
    longer be answered, only raised)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


class _InternalErrors:
    """Answers an unexpected exception with a JSON 500 and keeps the connection.

    Starlette's own handler re-raises after answering, and uvicorn then closes the kept-alive
    connection; a bug should cost one request, not the client's connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = _Tracked(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s %r", scope.get("method"), scope.get("path"))
            if tracked.started:
                raise
            response = error_response(500, "internal error; the service log has the details")
            await response(scope, receive, send)


class _BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")


class _BodyLimit:
    """Refuses bodies over `MAX_BODY_BYTES` with a JSON 413: at once when Content-Length says
    so (the body is never read), else as soon as the streamed body passes the limit (the read
    raises an HTTPException, which the route answers through `_http`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            # (h11 has already refused a Content-Length that is not a number.)
            if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY_BYTES:
                await error_response(413, str(_BodyTooLarge().detail))(scope, receive, send)
                return
        received = 0
        tracked = _Tracked(send)

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited, tracked)
        except _BodyTooLarge as err:
            # Read by a middleware (idempotency keys hash the body) rather than by a route.
            if tracked.started:
                raise
            await error_response(413, str(err.detail))(scope, receive, send)


# --- the OpenAPI document ----------------------------------------------------------------------

_EXAMPLES: dict[int, tuple[str, dict[str, Any]]] = {
    400: (
        "The body is not JSON (or not UTF-8).",
        {
            "detail": "body: JSON decode error",
            "field": "body",
            "errors": [{"field": "body", "message": "JSON decode error", "type": "json_invalid"}],
        },
    ),
    401: (
        "No valid credential.",
        {"detail": "send 'Authorization: Bearer <token>' (an nhi_ token or an OIDC JWT)"},
    ),
    403: (
        "The caller may not do this; the message names the rule.",
        {"detail": "token:ci-bot lacks role admin"},
    ),
    404: ("Nothing with that id (or nothing the caller may see).", {"detail": "not found"}),
    409: (
        "The request clashes with the current state; nothing was changed.",
        {"detail": "name: an agent named 'kb-bot' already exists in dev", "field": "name"},
    ),
    413: (
        f"The body is larger than {MAX_BODY_BYTES} bytes.",
        {"detail": f"the request body is larger than {MAX_BODY_BYTES} bytes"},
    ),
    422: (
        "A field breaks a rule; `field` names it, `errors` lists every one. Nothing was changed.",
        {
            "detail": "owner_email: must be an email address such as 'ana@example.com'",
            "field": "owner_email",
            "errors": [
                {
                    "field": "owner_email",
                    "message": "must be an email address such as 'ana@example.com'",
                    "type": "email",
                }
            ],
        },
    ),
    503: (
        "Temporal or the database is unreachable; nothing was changed, try again.",
        {"detail": "the database is unavailable; nothing was changed, try again"},
    ),
}
_BODY_METHODS = frozenset({"post", "put", "patch"})
_CHANGE_METHODS = frozenset({"post", "put", "patch", "delete"})


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that answers statuses the rules in `_statuses` cannot infer."""
    return {status: {"description": _EXAMPLES[status][0]} for status in statuses}


def _statuses(method: str, path: str, operation: dict[str, Any]) -> set[int]:
    """What an operation can answer besides success, from what it takes and who may call it."""
    statuses = {503}  # every operation reads the database; some call Temporal
    has_body = "requestBody" in operation
    parameters = operation.get("parameters", [])
    if has_body:
        statuses |= {400, 422}
    if method in _BODY_METHODS:
        statuses.add(413)
    if parameters:
        statuses.add(422)
    if any(p.get("in") == "path" for p in parameters):
        statuses.add(404)
    # Every /v1 router depends on `api.deps.authenticated`, and each route checks a role.
    if path.startswith("/v1/"):
        statuses |= {401, 403}
        if method in _CHANGE_METHODS:
            statuses.add(409)
    return statuses


def _declare_errors(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _, definitions = models_json_schema(
        [(Error, "serialization")], ref_template="#/components/schemas/{model}"
    )
    components.update(definitions.get("$defs", {}))
    schema["components"].setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An `nhi_` API token, or an OIDC JWT where NHI_OIDC_ISSUER is set.",
    }
    ref = {"$ref": "#/components/schemas/Error"}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            declared = {int(code) for code in responses if code.isdigit() and int(code) >= 400}
            if path.startswith("/v1/"):
                operation.setdefault("security", [{"bearer": []}])
            for status in sorted(declared | _statuses(method, path, operation)):
                description, example = _EXAMPLES.get(status, ("Error.", {"detail": "error"}))
                entry = responses.setdefault(str(status), {})
                if entry.get("description") in (None, "", "Validation Error"):
                    entry["description"] = description
                entry["content"] = {"application/json": {"schema": ref, "example": example}}
    # FastAPI's default 422 body (`detail` as a list) is no longer referenced by any operation.
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _declare_errors(FastAPI.openapi(app))
        assert app.openapi_schema is not None
        return app.openapi_schema

    return openapi


def install(app: FastAPI) -> None:
    """Register the handlers on an app, and declare the error body in its OpenAPI document."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    for error in _STATUS_OF:
        app.add_exception_handler(error, _domain)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(InterfaceError, _database_unavailable)
    app.add_exception_handler(PoolTimeout, _database_unavailable)
    # Added last, so outermost (install after every other middleware): a JSON 500 for any
    # failure beneath, and the body limit before any middleware reads a body.
    app.add_middleware(_BodyLimit)
    app.add_middleware(_InternalErrors)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
