"""Error bodies: JSON with the field at fault and the rule it breaks; no stack traces."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api.deps import TemporalUnavailable
from nhi.auth import Forbidden, Unauthenticated
from nhi.inventory import Conflict, NotFound
from nhi.policy import RuleViolation


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _error(status: int, message: str, field: str | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"detail": message}
    if field:
        body["field"] = field
    body.update(extra)
    return JSONResponse(status_code=status, content=body)


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _loc(e.get("loc", ())), "message": str(e.get("msg", "")), "type": e.get("type")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    status = 400 if any(e["type"] == "json_invalid" for e in errors) else 422
    # Input values are not echoed back: a mistaken field could hold something sensitive.
    return _error(
        status, f"{first['field']}: {first['message']}", str(first["field"]), errors=errors
    )


async def _rule(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RuleViolation)
    return _error(422, str(exc), exc.field)


async def _not_found(_: Request, exc: Exception) -> JSONResponse:
    return _error(404, str(exc))


async def _conflict(_: Request, exc: Exception) -> JSONResponse:
    message = str(exc)
    field = (
        message.split(":", 1)[0] if ":" in message and " " not in message.split(":", 1)[0] else None
    )
    return _error(409, message, field)


async def _unauthenticated(_: Request, exc: Exception) -> JSONResponse:
    response = _error(401, str(exc))
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def _forbidden(_: Request, exc: Exception) -> JSONResponse:
    return _error(403, str(exc))


async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    return _error(503, str(exc))


def install(app: FastAPI) -> None:
    """Register the handlers on an app."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(RuleViolation, _rule)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(TemporalUnavailable, _unavailable)
    app.add_exception_handler(Unauthenticated, _unauthenticated)
    app.add_exception_handler(Forbidden, _forbidden)
