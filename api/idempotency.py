"""`Idempotency-Key` on every state-changing request: a retry is answered, never re-applied.

A client that did not hear back (a timeout, a dropped connection) sends the same request again
with the same `Idempotency-Key`. The first request's answer is stored per (caller, key) in
`idempotency_keys` and replayed with `Idempotent-Replayed: true`:

- same caller, key and request (method, path, body) -> the stored status and body, replayed;
- same key with a different request -> 422 naming the header (a key names one request);
- same key while the first request is still being answered -> 409, try again shortly;
- a response that carried a secret (`POST /v1/tokens` shows the token once, and
  `POST /v1/nhis/{id}/credentials` a task credential) is never stored: only that the key was
  used, and a replay is a 409 saying so;
- a 5xx (Temporal or the database unreachable, a lifecycle that did not accept in time) is
  not stored: the key is released and the same request may be sent again. Nothing was applied,
  and lifecycle updates carry an id derived from the key (`nhi.rules.ids.keyed_update_id`), so
  Temporal itself deduplicates a retried update even if this record were lost.

It is an ASGI middleware so that it sees the response body the routes produce; the caller is
authenticated exactly as the routes do it (an unauthenticated request passes through and gets
its 401 from the route). Keys are kept `RETENTION` long; an in-flight record older than
`IN_FLIGHT_STALE` (the server died mid-request) may be taken over by a retry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Header, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import AppState, principal_of
from models.orm import IdempotencyKey
from nhi.infra.db import transaction

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
# Printable ASCII without spaces: what a UUID, a ULID or any generated token looks like.
KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
KEY_RULE = f"{HEADER}: must be 1-255 printable ASCII characters (no spaces), e.g. a UUID"
METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Slack signs its own retries; it never sends this header. The codec endpoints change nothing,
# and a stored answer would keep decrypted payloads.
UNGUARDED_PATHS = frozenset({"/slack/interactions", "/codec/encode", "/codec/decode"})
# Responses shown once because they hold a secret: stored only as "used".
SECRET_RESPONSES = frozenset({("POST", "/v1/tokens")})
SECRET_PATHS = (("POST", re.compile(r"^/v1/nhis/[^/]+/credentials/?$")),)
RETENTION = timedelta(hours=24)
# Longer than any request can take (a lifecycle action waits at most its timeout plus the
# result window): a record still in flight after this was left by a server that died.
IN_FLIGHT_STALE = timedelta(minutes=5)

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias=HEADER,
        description="Makes a retry safe: the same key and request get the first answer again "
        "(with `Idempotent-Replayed: true`) instead of being applied twice. 1-255 printable "
        "ASCII characters; kept 24 hours.",
        min_length=1,
        max_length=255,
        pattern=KEY_RE.pattern,
    ),
]


def _request_hash(method: str, path: str, query: bytes, body: bytes) -> str:
    try:
        # Key order and whitespace do not make a different request.
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, RecursionError):
        canonical = body
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query, canonical):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


Headers = list[tuple[bytes, bytes]]
Answer = tuple[int, Headers, bytes]
"""A whole response: status, raw ASGI headers, body."""


def _json(status: int, body: dict[str, Any], **headers: str) -> Answer:
    raw = json.dumps(body).encode()
    head: Headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(raw)).encode()),
    ]
    head += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return status, head, raw


class _Outcome:
    """What the claim found: go ahead, or answer at once."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.answer = answer


def _claim(
    session: Session, principal: str, key: str, method: str, path: str, request_hash: str
) -> _Outcome:
    now = datetime.now(UTC)
    inserted = session.execute(
        insert(IdempotencyKey)
        .values(
            principal=principal,
            key=key,
            method=method,
            path=path[:2048],
            request_hash=request_hash,
            created_at=now,
        )
        .on_conflict_do_nothing(constraint="uq_idempotency_keys_principal_key")
        .returning(IdempotencyKey.id)
    ).scalar()
    if inserted is not None:
        return _Outcome()
    row = session.scalar(
        select(IdempotencyKey)
        .where(IdempotencyKey.principal == principal, IdempotencyKey.key == key)
        .with_for_update()
    )
    if row is None:  # released between the insert and this read: the caller may retry
        return _Outcome(_json(409, {"detail": f"{HEADER}: in use; try again", "field": HEADER}))
    if now - row.created_at > RETENTION or (
        row.status_code is None and now - row.created_at > IN_FLIGHT_STALE
    ):
        # Expired, or abandoned by a server that died mid-request: this request takes it over.
        row.method, row.path, row.request_hash = method, path[:2048], request_hash
        row.status_code, row.response, row.created_at = None, None, now
        return _Outcome()
    if (row.method, row.path, row.request_hash) != (method, path[:2048], request_hash):
        return _Outcome(
            _json(
                422,
                {
                    "detail": f"{HEADER}: this key was already used for a different request; "
                    "use a new key for a new request",
                    "field": HEADER,
                },
            )
        )
    if row.status_code is None:
        return _Outcome(
            _json(
                409,
                {
                    "detail": f"{HEADER}: the first request with this key is still being "
                    "answered; try again shortly",
                    "field": HEADER,
                },
            )
        )
    stored = row.response or {}
    if stored.get("secret"):
        return _Outcome(
            _json(
                409,
                {
                    "detail": f"{HEADER}: already used; its response held a secret that is shown "
                    "once and was not kept (list what exists instead, e.g. GET /v1/tokens)",
                    "field": HEADER,
                },
                **{REPLAYED: "true"},
            )
        )
    if "json" in stored:
        return _Outcome(_json(row.status_code, stored["json"], **{REPLAYED: "true"}))
    return _Outcome((row.status_code, [(REPLAYED.lower().encode(), b"true")], b""))


def _finish(
    session: Session, principal: str, key: str, status: int, response: dict[str, Any] | None
) -> None:
    where = (IdempotencyKey.principal == principal, IdempotencyKey.key == key)
    if response is None:
        session.execute(delete(IdempotencyKey).where(*where))
        return
    row = session.scalar(select(IdempotencyKey).where(*where).with_for_update())
    if row is not None:
        row.status_code = status
        row.response = response


class IdempotencyMiddleware:
    """Claims the key before the route runs, stores (or releases) it after."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in METHODS
            or scope["path"] in UNGUARDED_PATHS
        ):
            await self.app(scope, receive, send)
            return
        raw = [v for k, v in scope["headers"] if k == HEADER.lower().encode()]
        if not raw:
            await self.app(scope, receive, send)
            return
        key = raw[0].decode("latin-1")
        if len(raw) > 1 or not KEY_RE.fullmatch(key):
            await _send(send, _json(422, {"detail": KEY_RULE, "field": HEADER}))
            return

        body = await _read_body(receive)
        replay = _replayer(body, receive)
        state: AppState | None = getattr(scope["app"].state, "nhi", None)
        if state is None:  # not started (no lifespan): nothing to keep keys in
            await self.app(scope, replay, send)
            return
        try:
            principal = (await run_in_threadpool(principal_of, Request(scope), state)).actor
        except Exception:
            await self.app(scope, replay, send)
            return
        method, path = scope["method"], scope["path"]
        request_hash = _request_hash(method, path, scope.get("query_string", b""), body)

        def claim() -> _Outcome:
            with transaction(state.sessions) as session:
                return _claim(session, principal, key, method, path, request_hash)

        try:
            outcome = await run_in_threadpool(claim)
        except SQLAlchemyError:
            log.exception("could not claim an Idempotency-Key")
            await _send(
                send,
                _json(503, {"detail": "the inventory is unreachable; nothing was applied"}),
            )
            return
        if outcome.answer is not None:
            await _send(send, outcome.answer)
            return

        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        try:
            await self.app(scope, replay, capture)
        except BaseException:
            await run_in_threadpool(self._store, state, principal, key, 500, None)
            raise
        status = int(start["status"]) if start is not None else 500
        payload = b"".join(chunks)
        await run_in_threadpool(
            self._store, state, principal, key, status, _kept(method, path, status, payload)
        )
        if start is not None:
            await send(start)
        await send({"type": "http.response.body", "body": payload, "more_body": False})

    @staticmethod
    def _store(
        state: AppState, principal: str, key: str, status: int, response: dict[str, Any] | None
    ) -> None:
        try:
            with transaction(state.sessions) as session:
                _finish(session, principal, key, status, response)
        except Exception:
            # The action's own outcome stands; the key stays in flight until IN_FLIGHT_STALE.
            log.exception("could not record the answer to Idempotency-Key of %s", principal)


def _kept(method: str, path: str, status: int, payload: bytes) -> dict[str, Any] | None:
    """What to keep of an answer: None releases the key (5xx: nothing was applied)."""
    if status >= 500:
        return None
    if 200 <= status < 300 and _holds_secret(method, path):
        return {"secret": True}
    if not payload:
        return {}
    try:
        return {"json": json.loads(payload)}
    except ValueError:
        return None


def _holds_secret(method: str, path: str) -> bool:
    """Whether a success answer to this request shows a secret once (never kept)."""
    return (method, path) in SECRET_RESPONSES or any(
        method == m and pattern.fullmatch(path) for m, pattern in SECRET_PATHS
    )


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replayer(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send(send: Send, answer: Answer) -> None:
    status, headers, body = answer
    if not any(k == b"content-length" for k, _ in headers):
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
