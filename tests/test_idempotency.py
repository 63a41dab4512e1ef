"""`Idempotency-Key`: a retried request is answered again, never applied twice."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from models.orm import Agent, ApiToken, AuditEvent, IdempotencyKey
from nhi.infra.db import transaction
from tests.conftest import Service
from tests.helpers import ROLE_SCOPE, TRUST, agent_body, api_json, bearer, eventually, mint


@pytest.fixture
async def http(service: Service) -> Any:
    token = service.token("idem-ana", "platform", teams=["search"], email="ana@example.com")
    async with httpx.AsyncClient(base_url=service.url, headers=bearer(token), timeout=60) as client:
        yield client


def _events(sessions: sessionmaker[Session], subject: object) -> list[str]:
    with transaction(sessions) as s:
        return list(
            s.scalars(
                select(AuditEvent.event)
                .where(AuditEvent.subject_id == str(subject))
                .order_by(AuditEvent.id)
            )
        )


async def _active_key_nhi(http: httpx.AsyncClient) -> dict[str, Any]:
    agent = await api_json(http, "POST", "/v1/agents", json=agent_body())
    accepted = await api_json(
        http,
        "POST",
        f"/v1/agents/{agent['id']}/nhis",
        json={"platform": "aws", "kind": "iam_user_key", "scope": ROLE_SCOPE},
    )

    async def active() -> dict[str, Any]:
        nhi = await api_json(http, "GET", f"/v1/nhis/{accepted['id']}")
        assert nhi["status"] == "active", nhi
        view = await http.get(f"/v1/nhis/{accepted['id']}/lifecycle")
        assert view.status_code == 200, view.text
        return dict(nhi)

    return await eventually(active)


async def test_a_repeated_key_rotates_once_and_replays_the_answer(
    http: httpx.AsyncClient, sessions: sessionmaker[Session]
) -> None:
    nhi = await _active_key_nhi(http)
    key = {"Idempotency-Key": f"rotate-{uuid.uuid4()}"}
    url = f"/v1/nhis/{nhi['id']}/rotate"
    first = await http.post(url, json={"reason": "scheduled"}, headers=key)
    assert first.status_code == 200, first.text
    assert "Idempotent-Replayed" not in first.headers
    again = await http.post(url, json={"reason": "scheduled"}, headers=key)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()

    async def rotated() -> None:
        assert "nhi.rotated" in _events(sessions, nhi["id"])

    await eventually(rotated)
    # Even with the stored answer gone, the update id derived from the key makes Temporal
    # answer the retried update from the first one instead of rotating again.
    with transaction(sessions) as s:
        s.execute(delete(IdempotencyKey).where(IdempotencyKey.key == key["Idempotency-Key"]))
    third = await http.post(url, json={"reason": "scheduled"}, headers=key)
    assert third.status_code == 200, third.text
    assert "Idempotent-Replayed" not in third.headers
    assert third.json() == first.json()
    events = _events(sessions, nhi["id"])
    assert events.count("nhi.rotation_started") == 1, events
    assert events.count("nhi.rotated") == 1, events

    # Same key, different body: refused naming the header, nothing applied.
    other = await http.post(url, json={"reason": "something else"}, headers=key)
    assert other.status_code == 422, other.text
    assert other.json()["field"] == "Idempotency-Key"
    assert _events(sessions, nhi["id"]) == events


async def test_agent_creation_with_a_key_is_applied_once(
    http: httpx.AsyncClient, sessions: sessionmaker[Session]
) -> None:
    body = agent_body()
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = await http.post("/v1/agents", json=body, headers=key)
    assert first.status_code == 201, first.text
    # Key order in the JSON body does not make another request.
    reordered = dict(reversed(list(body.items())))
    again = await http.post("/v1/agents", json=reordered, headers=key)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    with transaction(sessions) as s:
        assert s.scalar(select(func.count()).where(Agent.name == body["name"])) == 1
    # The same key on another path is another request: refused.
    elsewhere = await http.post(f"/v1/agents/{first.json()['id']}/complete", json={}, headers=key)
    assert elsewhere.status_code == 422 and elsewhere.json()["field"] == "Idempotency-Key"
    # Another caller's key space is its own.
    other = bearer(mint(sessions, "idem-other", "platform", teams=["search"]))
    # Same key, other caller: a request of its own (refused: the name is taken).
    clash = await http.post("/v1/agents", json=body, headers=key | other)
    assert clash.status_code == 409 and "Idempotent-Replayed" not in clash.headers


async def test_a_token_is_never_stored_and_a_replay_is_refused(
    service: Service, sessions: sessionmaker[Session]
) -> None:
    admin = bearer(service.token("idem-admin", "admin"))
    name = f"idem-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "role": "auditor", "ttl": "1d"}
    key = {"Idempotency-Key": str(uuid.uuid4())}
    async with httpx.AsyncClient(base_url=service.url, headers=admin, timeout=30) as http:
        first = await http.post("/v1/tokens", json=body, headers=key)
        assert first.status_code == 201, first.text
        token = first.json()["token"]
        again = await http.post("/v1/tokens", json=body, headers=key)
    assert again.status_code == 409 and again.json()["field"] == "Idempotency-Key"
    assert token not in again.text
    with transaction(sessions) as s:
        assert s.scalar(select(func.count()).where(ApiToken.name == name)) == 1
        stored = s.scalar(
            select(IdempotencyKey).where(IdempotencyKey.key == key["Idempotency-Key"])
        )
        assert stored is not None and stored.response == {"secret": True}
        assert token not in str(stored.response)


@pytest.mark.parametrize(
    "bad",
    ["", "a" * 256, "with space", "caf\u00e9", "new\u2028line"],
)
async def test_a_malformed_key_is_422_naming_the_header(
    http: httpx.AsyncClient, sessions: sessionmaker[Session], bad: str
) -> None:
    body = agent_body()
    response = await http.post(
        "/v1/agents", json=body, headers={"Idempotency-Key": bad.encode("utf-8")}
    )
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "Idempotency-Key"
    with transaction(sessions) as s:
        assert s.scalar(select(func.count()).where(Agent.name == body["name"])) == 0


async def test_the_cli_sends_the_key_so_a_repeated_command_is_applied_once(
    service: Service, sessions: sessionmaker[Session]
) -> None:
    import asyncio
    import os
    import subprocess
    import sys
    from pathlib import Path

    token = service.token("idem-cli", "platform", teams=["search"])
    env = dict(os.environ, NHI_API_URL=service.url, NHI_TOKEN=token)
    name = agent_body()["name"]
    args = [
        str(Path(sys.executable).parent / "nhi"),
        "--idempotency-key",
        f"cli-{uuid.uuid4()}",
        "agents",
        "create",
        "-q",
        "--name",
        name,
        "--category",
        "rag",
        "--env",
        "dev",
        "--owner",
        "ana@example.com",
        "--team",
        "search",
        "--purpose",
        "Answers questions",
    ]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)

    first, second = [await asyncio.to_thread(run) for _ in range(2)]
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    assert first.stdout == second.stdout
    with transaction(sessions) as s:
        assert s.scalar(select(func.count()).where(Agent.name == name)) == 1


async def test_a_repeated_provisioning_request_creates_one_nhi(
    http: httpx.AsyncClient, sessions: sessionmaker[Session]
) -> None:
    agent = await api_json(http, "POST", "/v1/agents", json=agent_body())
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"platform": "aws", "kind": "iam_role", "scope": ROLE_SCOPE, "trust_principal": TRUST}
    url = f"/v1/agents/{agent['id']}/nhis"
    first = await http.post(url, json=body, headers=key)
    again = await http.post(url, json=body, headers=key)
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    listed = await api_json(http, "GET", "/v1/nhis", params={"agent_id": agent["id"]})
    assert [n["id"] for n in listed] == [first.json()["id"]]


async def test_a_key_in_flight_is_409_until_its_server_is_presumed_dead(
    http: httpx.AsyncClient, sessions: sessionmaker[Session]
) -> None:
    from datetime import UTC, datetime, timedelta

    from api.idempotency import _request_hash

    body = agent_body()
    key = str(uuid.uuid4())
    raw = httpx.Request("POST", "http://x/v1/agents", json=body).content
    # The first request with this key is still being answered (as another API process would
    # have recorded it): a retry must not run it a second time.
    with transaction(sessions) as s:
        s.add(
            IdempotencyKey(
                principal="token:idem-ana",
                key=key,
                method="POST",
                path="/v1/agents",
                request_hash=_request_hash("POST", "/v1/agents", b"", raw),
            )
        )
    busy = await http.post("/v1/agents", json=body, headers={"Idempotency-Key": key})
    assert busy.status_code == 409 and busy.json()["field"] == "Idempotency-Key"
    with transaction(sessions) as s:
        assert s.scalar(select(func.count()).where(Agent.name == body["name"])) == 0
        row = s.scalar(select(IdempotencyKey).where(IdempotencyKey.key == key))
        assert row is not None
        row.created_at = datetime.now(UTC) - timedelta(minutes=10)
    # Its server died mid-request long ago: the retry takes the key over and is answered.
    taken = await http.post("/v1/agents", json=body, headers={"Idempotency-Key": key})
    assert taken.status_code == 201, taken.text
    replay = await http.post("/v1/agents", json=body, headers={"Idempotency-Key": key})
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == taken.json()["id"]
