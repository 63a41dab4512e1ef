"""`POST /slack/interactions` authenticates first and never answers 5xx: malformed headers or
bodies are 401 before anything is parsed; a correctly signed but malformed payload is 400."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from models.orm import AuditEvent, Prompt
from nhi.infra.config import Settings
from nhi.infra.db import transaction
from tests.helpers import ApiServer, free_port

SECRET = "slack-signing-secret-for-tests"


@pytest.fixture(scope="module")
def url(settings: Settings) -> Iterator[str]:
    # No Temporal behind it: nothing here may get as far as a lifecycle.
    app_settings = settings.model_copy(
        update={
            "slack_signing_secret": SecretStr(SECRET),
            "temporal_address": f"127.0.0.1:{free_port()}",
        }
    )
    with ApiServer(create_app(app_settings)) as server:
        yield server.url


def _sign(body: bytes, timestamp: bytes | None = None) -> dict[str, bytes]:
    ts = timestamp if timestamp is not None else str(int(time.time())).encode()
    digest = hmac.new(SECRET.encode(), b"v0:" + ts + b":" + body, hashlib.sha256).hexdigest()
    return {
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": f"v0={digest}".encode(),
        "Content-Type": b"application/x-www-form-urlencoded",
    }


def _form(payload: Any) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"payload={quote(text)}".encode()


def _counts(sessions: sessionmaker[Session]) -> tuple[int, int]:
    with transaction(sessions) as s:
        return (
            s.scalar(select(func.count()).select_from(AuditEvent)) or 0,
            s.scalar(select(func.count()).select_from(Prompt).where(Prompt.status != "open")) or 0,
        )


def _click(**overrides: Any) -> dict[str, Any]:
    action = {
        "action_id": "renew",
        "value": json.dumps({"prompt_id": str(uuid.uuid4())}),
        "action_ts": "1700000000.1",
    }
    payload: dict[str, Any] = {
        "type": "block_actions",
        "user": {"id": "U123"},
        "actions": [action],
        "channel": {"id": "D1"},
    }
    payload.update(overrides)
    return payload


GOOD_BODY = _form(_click())
STALE = str(int(time.time()) - 3600).encode()

UNAUTHENTICATED: list[tuple[str, bytes, dict[str, bytes]]] = [
    ("no headers", GOOD_BODY, {}),
    ("non-numeric timestamp", GOOD_BODY, _sign(GOOD_BODY) | {"X-Slack-Request-Timestamp": b"abc"}),
    ("signed non-numeric timestamp", GOOD_BODY, _sign(GOOD_BODY, b"12e3")),
    ("huge timestamp", GOOD_BODY, _sign(GOOD_BODY, b"9" * 40)),
    ("non-ASCII timestamp", GOOD_BODY, _sign(GOOD_BODY) | {"X-Slack-Request-Timestamp": "١٢٣".encode()}),
    ("non-ASCII signature", GOOD_BODY, _sign(GOOD_BODY) | {"X-Slack-Signature": b"v0=\xff\xfe" + b"a" * 62}),
    ("upper-case signature", GOOD_BODY, {**_sign(GOOD_BODY), "X-Slack-Signature": _sign(GOOD_BODY)["X-Slack-Signature"].upper()}),
    ("wrong signature", GOOD_BODY, _sign(GOOD_BODY + b"x") | {"Content-Type": b"application/x-www-form-urlencoded"}),
    ("stale timestamp", GOOD_BODY, _sign(GOOD_BODY, STALE)),
    ("body not UTF-8, unsigned", b"payload=\xff\xfe\xfa", _sign(b"something else")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "body", "headers"), UNAUTHENTICATED, ids=[c[0] for c in UNAUTHENTICATED]
)
async def test_unauthenticated_requests_are_401_and_change_nothing(
    url: str, sessions: sessionmaker[Session], case: str, body: bytes, headers: dict[str, bytes]
) -> None:
    before = _counts(sessions)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.post("/slack/interactions", content=body, headers=headers)
        assert response.status_code == 401, (case, response.text)
        # The connection stays usable.
        assert (await client.get("/healthz")).status_code == 200
    assert _counts(sessions) == before


MALFORMED: list[tuple[str, bytes]] = [
    ("payload=[1,2]", _form([1, 2])),
    ("payload is a string", _form('"hello"')),
    ("payload is null", _form("null")),
    ("payload not JSON", _form("{not json")),
    ("no payload field", b"other=1"),
    ("empty body", b""),
    ("body not UTF-8, signed", b"payload=\xff\xfe\xfa"),
    ("deep JSON", _form("[" * 5_000 + "]" * 5_000)),
    ("actions missing", _form(_click(actions=None))),
    ("actions not a list", _form(_click(actions={"a": 1}))),
    ("actions empty", _form(_click(actions=[]))),
    ("action not an object", _form(_click(actions=[1]))),
    ("user missing", _form(_click(user=None))),
    ("user id a number", _form(_click(user={"id": 5}))),
    ("unknown action", _form(_click(actions=[{"action_id": "grant_admin", "value": "{}"}]))),
    ("value not ours", _form(_click(actions=[{"action_id": "renew", "value": "[1]"}]))),
    ("value not a string", _form(_click(actions=[{"action_id": "renew", "value": {"prompt_id": 1}}]))),
    ("prompt id not a uuid", _form(_click(actions=[{"action_id": "renew", "value": '{"prompt_id": "x"}'}]))),
    ("channel of the wrong type", _form(_click(channel={"id": 7}))),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body"), MALFORMED, ids=[c[0] for c in MALFORMED])
async def test_signed_but_malformed_payloads_are_400_and_change_nothing(
    url: str, sessions: sessionmaker[Session], case: str, body: bytes
) -> None:
    before = _counts(sessions)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.post("/slack/interactions", content=body, headers=_sign(body))
        assert response.status_code == 400, (case, response.text)
        assert (await client.get("/healthz")).status_code == 200
    assert _counts(sessions) == before


async def test_a_signed_payload_that_is_not_a_click_is_acknowledged(url: str) -> None:
    body = _form({"type": "view_submission", "user": {"id": "U1"}})
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.post("/slack/interactions", content=body, headers=_sign(body))
    assert response.status_code == 200
