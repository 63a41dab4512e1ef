"""A hostile-input corpus against the live API (real HTTP, Postgres, moto and Temporal).

Every field of every state-changing operation's request body, every query parameter and every
path segment, each taken from the app's own OpenAPI document (a new operation is covered
without touching this file), gets NUL bytes, lone surrogates, control characters, ANSI
escapes, a right-to-left override, oversized strings, huge, negative and non-integer numbers,
booleans for numbers and strings for lists. Each must be refused with a 4xx whose body names
the field, nothing may change, and the client's kept-alive connection must keep working.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from models.orm import Agent, ApiToken, AuditEvent, Nhi, Policy, Target
from models.schemas import MAX_BODY_BYTES
from nhi.infra.db import transaction
from tests.conftest import Service
from tests.helpers import ROLE_SCOPE, TRUST, agent_body, bearer

ADMIN = "hostile-admin"
PLATFORM = "hostile-platform"

# Refused in every field, whatever its type.
TEXT: dict[str, str] = {
    "nul": "a\x00b",
    "lone-surrogate": "a\ud800b",  # sent as the JSON escape \ud800
    "control": "a\x07b",
    "ansi-escape": "\x1b[31mred\x1b[0m",
    "rtl-override": "abc\u202edef",
    "zero-width": "ab\u200bc",
    "oversized": "a" * 70_000,
}
NUMBERS: dict[str, Any] = {
    "huge": 10**20,
    "negative": -1,
    "2**63": 2**63,
    "1e30": 1e30,
    "float-for-int": 1.5,
}
SHAPES: dict[str, Any] = {"boolean": True, "list": ["x"], "object": {"x": 1}}

# What a URL can carry: percent-encoded, so a lone surrogate arrives as invalid UTF-8.
RAW_SEGMENTS: dict[str, str] = {
    "nul": "a%00b",
    "invalid-utf8": "a%ED%A0%80b",
    "control": "a%07b",
    "ansi-escape": "%1B%5B31mred",
    "rtl-override": "abc%E2%80%AEdef",
    "oversized": "a" * 5000,
}
NUMERIC_SEGMENTS = {"huge": "1" + "0" * 20, "negative": "-1", "1e30": "1e30", "boolean": "true"}


def _json(body: Any) -> bytes:
    # ensure_ascii turns a lone surrogate into the escape `\ud800`, as an attacker would send it.
    return json.dumps(body, ensure_ascii=True).encode()


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    options = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
    if len(options) == 1 and "type" not in schema:
        return _resolve(spec, options[0])
    return schema


def _types(spec: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    schema = _resolve(spec, schema)
    if "anyOf" in schema:
        return set().union(*(_types(spec, s) for s in schema["anyOf"]))
    if "enum" in schema or "const" in schema:
        return {"string"}
    return {schema.get("type", "object")}


def _fields(
    spec: dict[str, Any], schema: dict[str, Any], prefix: tuple[str | int, ...] = ()
) -> list[tuple[tuple[str | int, ...], set[str]]]:
    """Every field of a body schema as a path, with the JSON types it admits: object members,
    the first element of each list, and the members of objects inside lists."""
    schema = _resolve(spec, schema)
    out: list[tuple[tuple[str | int, ...], set[str]]] = []
    for name, member in schema.get("properties", {}).items():
        path = (*prefix, name)
        out.append((path, _types(spec, member)))
        resolved = _resolve(spec, member)
        if resolved.get("type") == "array":
            item = _resolve(spec, resolved.get("items", {}))
            if "properties" in item:
                out += _fields(spec, item, (*path, 0))
            else:
                out.append(((*path, 0), _types(spec, item)))
        elif "properties" in resolved:
            out += _fields(spec, resolved, path)
    return out


def _field_name(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _with(body: Any, path: tuple[str | int, ...], value: Any) -> Any:
    body = json.loads(json.dumps(body))
    node = body
    for part, after in itertools.pairwise(path):
        empty: Any = [] if isinstance(after, int) else {}
        if isinstance(part, int):
            while len(node) <= part:
                node.append(empty)
            node = node[part]
        else:
            node = node.setdefault(part, empty)
    last = path[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append(None)
    node[last] = value
    return body


def _hostile_values(types: set[str]) -> dict[str, Any]:
    values: dict[str, Any] = {**TEXT, **NUMBERS}
    if "string" not in types:
        values["number-as-string"] = "12"
    if "boolean" not in types:
        values["boolean"] = True
    if "array" not in types:
        values["list"] = ["x"]
    if "object" not in types:
        values["object"] = {"x": 1}
    if "array" in types:
        values["string-for-list"] = "abc"
    return values


def _counts(sessions: sessionmaker[Session], actors: list[str]) -> dict[str, int]:
    """Rows in every table an operation can write, and the audit events of this test's callers
    (lifecycles left running by other tests may append their own events meanwhile)."""
    with transaction(sessions) as s:
        counts = {
            table.__tablename__: s.scalar(select(func.count()).select_from(table)) or 0
            for table in (Agent, Nhi, Policy, Target, ApiToken)
        }
        counts["audit_events(ours)"] = (
            s.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(or_(*(AuditEvent.actor.contains(a) for a in actors)))
            )
            or 0
        )
        counts["policies(ours)"] = (
            s.scalar(select(func.count()).select_from(Policy).where(Policy.updated_by.in_(actors)))
            or 0
        )
        return counts


class Caller:
    """One kept-alive connection: every answer is checked for a JSON `detail`, and the local
    port of each request is recorded to show the connection was never dropped."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.ports: set[Any] = set()
        self.sent = 0

    async def send(
        self, method: str, url: str, *, content: bytes | None = None, token: str
    ) -> httpx.Response:
        headers = bearer(token)
        if content is not None:
            headers["Content-Type"] = "application/json"
        response = await self.client.request(method, url, content=content, headers=headers)
        self.sent += 1
        stream = response.extensions.get("network_stream")
        if stream is not None:
            self.ports.add(stream.get_extra_info("client_addr"))
        return response


def _refused(response: httpx.Response, field: str | None, what: str) -> None:
    assert 400 <= response.status_code < 500, (what, response.status_code, response.text[:300])
    body = response.json()
    assert isinstance(body.get("detail"), str) and body["detail"], (what, body)
    if field is None or response.status_code != 422:
        return
    named = [body.get("field"), *(e["field"] for e in body.get("errors") or [])]
    assert any(n == field or str(n).startswith((f"{field}.", f"{field}[")) for n in named if n), (
        what,
        field,
        body,
    )


@pytest.fixture
async def caller(service: Service) -> AsyncIterator[Caller]:
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        yield Caller(client)


async def test_hostile_corpus_is_refused_naming_the_field_and_changes_nothing(
    service: Service, sessions: sessionmaker[Session], caller: Caller
) -> None:
    admin = service.token(ADMIN, "admin", email="hostile-admin@example.com")
    platform = service.token(PLATFORM, "platform", teams=["search"])
    agent = await caller.client.post(
        "/v1/agents", json=agent_body(team="search"), headers=bearer(platform)
    )
    assert agent.status_code == 201, agent.text
    agent_id = agent.json()["id"]
    policies = (await caller.client.get("/v1/policies", headers=bearer(admin))).json()
    seeded = policies[0]
    policy = {
        "platform": seeded["platform"],
        "kind": seeded["kind"],
        "environment": seeded["environment"],
        "allowed": seeded["allowed"],
        "default_ttl": seeded["default_ttl_seconds"],
        "max_lifetime": seeded["max_lifetime_seconds"],
        "reminder_offsets": seeded["reminder_offsets_seconds"],
        "forbidden_actions": seeded["forbidden_actions"],
    }
    nhi = {
        "platform": "aws",
        "kind": "iam_role",
        "scope": ROLE_SCOPE,
        "ttl": "1d",
        "allowed_cidrs": ["10.0.0.0/8"],
        "trust_principal": TRUST,
    }
    # A valid body per operation, so a value that slips through would reach the inventory and
    # be seen; an operation missing here is still fuzzed, field by field, from `{}`.
    bodies: dict[str, Any] = {
        "POST /v1/agents": agent_body(team="search", invokers=[TRUST]),
        "POST /v1/agents/{agent_id}/nhis": nhi,
        "PUT /v1/policies": {"policies": [policy]},
        "POST /v1/tokens": {
            "name": "hostile-new",
            "role": "platform",
            "ttl": "1d",
            "teams": ["search"],
            "email": "new@example.com",
        },
        "POST /v1/targets": {
            "name": "hostile-target",
            "dsn": "postgresql://nhi_admin@127.0.0.1:5432/app",
            "password_env": "NHI_TARGET_PASSWORD_HOSTILE",
            "connection_limit": 5,
        },
        "POST /v1/sweeps": {"provider": "aws", "dry_run": True},
        "POST /v1/nhis/{nhi_id}/renew": {"reason": "hostile", "extend_by": "1d"},
        "POST /v1/prompts/{prompt_id}/answer": {"reason": "hostile", "answer": "renew"},
        "POST /v1/agents/{agent_id}/nhis:batch": {"nhis": [nhi]},
        "POST /v1/agents/{agent_id}/invokers": {
            "kind": "person",
            "ref": "eve@example.com",
            "channel": "slack",
            "expires_at": "2030-01-01T00:00:00Z",
        },
        "POST /v1/nhis/{nhi_id}/credentials": {
            "ttl": "15m",
            "task_id": "hostile-task",
            "scope": ROLE_SCOPE,
        },
        "POST /v1/activity": {
            "source": "hostile",
            "events": [
                {
                    "id": "hostile-1",
                    "time": "2026-11-30T12:00:00Z",
                    "identity": "hostile-nobody",
                    "action": "s3:GetObject",
                    "resource": "arn:aws:s3:::hostile/x",
                    "source_ip": "10.0.0.1",
                    "user_agent": "hostile-agent",
                    "outcome": "success",
                }
            ],
        },
        "POST /v1/activity/imports": {"location": "s3://hostile-bucket/logs/"},
        "POST /v1/findings/{finding_id}/ack": {"reason": "hostile"},
        "POST /v1/approvals/{approval_id}/approve": {"reason": "hostile"},
        "POST /v1/approvals/{approval_id}/deny": {"reason": "hostile"},
        "POST /v1/agents/{agent_id}/contain": {"reason": "hostile"},
        "POST /v1/agents/{agent_id}/release": {"reason": "hostile"},
    }
    path_values = {"agent_id": agent_id, "name": "hostile-none"}
    spec = (await caller.client.get("/openapi.json")).json()
    before = _counts(sessions, [f"token:{ADMIN}", f"token:{PLATFORM}"])

    def url_of(path: str, override: dict[str, str] | None = None) -> str:
        for name in [p[1:-1] for p in path.split("/") if p.startswith("{")]:
            value = (override or {}).get(name) or path_values.get(name) or str(uuid.uuid4())
            path = path.replace(f"{{{name}}}", value)
        return path

    operations = [
        (method.upper(), path, op)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
    ]
    body_ops = [o for o in operations if "requestBody" in o[2]]
    assert len(body_ops) >= 12, [f"{m} {p}" for m, p, _ in body_ops]
    cases = 0
    for method, path, op in operations:
        key = f"{method} {path}"
        token = admin
        # 1. Every field of the request body.
        if "requestBody" in op:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            base = bodies.get(key, {})
            for field_path, types in _fields(spec, schema):
                field = _field_name(field_path)
                for label, value in _hostile_values(types).items():
                    response = await caller.send(
                        method, url_of(path), content=_json(_with(base, field_path, value)),
                        token=token,
                    )  # fmt: skip
                    _refused(response, field, f"{key} {field}={label}")
                    # Refused by validation, not by a later check it slipped through to.
                    assert response.status_code == 422, (key, field, label, response.text[:200])
                    cases += 1
            # 2. Bodies that are not JSON, not UTF-8, too deep, or too large.
            for label, raw in {
                "not-json": b"{not json",
                "not-utf8": b'{"reason": "\xff\xfe"}',
                "deep-json": b"[" * 10_000 + b"]" * 10_000,
                "deep-member": b'{"reason": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
                "huge-integer": b'{"reason": ' + b"9" * 5000 + b"}",
            }.items():
                response = await caller.send(method, url_of(path), content=raw, token=token)
                assert response.status_code in (400, 422), (key, label, response.text[:200])
                _refused(response, None, f"{key} {label}")
                cases += 1
            oversized = _json({"reason": "a" * (MAX_BODY_BYTES + 1)})
            response = await caller.send(method, url_of(path), content=oversized, token=token)
            assert response.status_code == 413, (key, response.status_code)
            _refused(response, None, f"{key} oversized body")
            cases += 1
        # 3. Every query parameter.
        for param in op.get("parameters", []):
            if param["in"] != "query":
                continue
            name, types = param["name"], _types(spec, param.get("schema", {}))
            numeric = types <= {"integer", "number"}
            values = {**RAW_SEGMENTS, **(NUMERIC_SEGMENTS if numeric else {})}
            for label, raw in values.items():
                response = await caller.send(method, f"{url_of(path)}?{name}={raw}", token=token)
                _refused(response, name, f"{key} ?{name}={label}")
                assert response.status_code == 422, (key, name, label, response.text[:200])
                cases += 1
            if not numeric:
                for label, raw in NUMERIC_SEGMENTS.items():
                    response = await caller.send(
                        method, f"{url_of(path)}?{name}={quote(raw)}", token=token
                    )
                    assert response.status_code < 500, (key, name, label, response.text[:200])
                    cases += 1
        # 4. Every path segment.
        for param in op.get("parameters", []):
            if param["in"] != "path":
                continue
            name = param["name"]
            for label, raw in {**RAW_SEGMENTS, **NUMERIC_SEGMENTS}.items():
                content = _json(bodies.get(key, {})) if "requestBody" in op else None
                response = await caller.send(
                    method, url_of(path, {name: raw}), content=content, token=token
                )
                _refused(response, name, f"{key} {{{name}}}={label}")
                if label in RAW_SEGMENTS:
                    assert response.status_code in (404, 422), (key, name, label, response.text)
                cases += 1

    print(f"{cases} hostile requests")
    assert cases > 500, cases
    after = _counts(sessions, [f"token:{ADMIN}", f"token:{PLATFORM}"])
    assert after == before
    # The same kept-alive connection answered everything: a dropped connection would show a
    # new local port.
    assert len(caller.ports) == 1, caller.ports
    assert (await caller.send("GET", "/v1/whoami", token=admin)).status_code == 200


async def test_oversized_bodies_are_413_however_they_arrive(
    service: Service, sessions: sessionmaker[Session], caller: Caller
) -> None:
    admin = service.token(ADMIN, "admin", email="hostile-admin@example.com")
    before = _counts(sessions, [f"token:{ADMIN}"])
    chunk = b" " * 65536

    async def streamed() -> AsyncIterator[bytes]:
        # Chunked, no Content-Length: the limit is found while reading.
        yield b'{"name": "x", "purpose": "'
        for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
            yield chunk

    response = await caller.client.post(
        "/v1/agents",
        content=streamed(),
        headers={**bearer(admin), "Content-Type": "application/json"},
    )
    assert response.status_code == 413, response.text[:200]
    assert "larger than" in response.json()["detail"]
    # A middleware that reads the body first (idempotency keys hash it) is limited too.
    response = await caller.client.post(
        "/v1/agents",
        content=_json({"purpose": "a" * (MAX_BODY_BYTES + 1)}),
        headers={**bearer(admin), "Content-Type": "application/json", "Idempotency-Key": "k-1"},
    )
    assert response.status_code == 413, response.text[:200]
    assert response.json()["detail"].startswith("the request body is larger than")
    assert (await caller.send("GET", "/v1/whoami", token=admin)).status_code == 200
    assert _counts(sessions, [f"token:{ADMIN}"]) == before
