"""The `nhi` console script as a user runs it, against the API over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Service
from tests.helpers import eventually, unique

NHI = str(Path(sys.executable).parent / "nhi")


# Who the tests act as: role, teams, email. Token names come from the key.
PEOPLE: dict[str, tuple[str, list[str] | None, str | None]] = {
    "carla": ("platform", ["platform"], None),
    "alice": ("platform", ["platform"], None),
    "bob": ("approver", None, None),
    "carol": ("approver", None, None),
    "admin": ("admin", None, None),
    "dana@example.com": ("platform", ["platform"], "dana@example.com"),
    "eli@example.com": ("platform", ["platform"], "eli@example.com"),
    "carla@example.com": ("platform", ["platform"], "carla@example.com"),
}


def token_name(actor: str) -> str:
    return actor.replace("@", "-at-").replace(".", "-")


def run(
    service: Service, *args: str, actor: str = "carla", url: str | None = None
) -> subprocess.CompletedProcess[str]:
    role, teams, email = PEOPLE[actor]
    token = service.token(token_name(actor), role, teams=teams, email=email)
    env = dict(os.environ, NHI_API_URL=url or service.url, NHI_TOKEN=token)
    return subprocess.run([NHI, *args], env=env, capture_output=True, text=True, timeout=60)


def ok(service: Service, *args: str, actor: str = "carla") -> str:
    result = run(service, *args, actor=actor)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def arun(
    service: Service, *args: str, actor: str = "carla", url: str | None = None
) -> subprocess.CompletedProcess[str]:
    # Off the event loop: the in-process worker shares it and must keep running meanwhile.
    return await asyncio.to_thread(run, service, *args, actor=actor, url=url)


async def aok(service: Service, *args: str, actor: str = "carla") -> str:
    return await asyncio.to_thread(ok, service, *args, actor=actor)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert result.stdout == ""
    return lines[0]


async def create_agent(service: Service, environment: str = "dev") -> str:
    return (await aok(
        service, "agents", "create", "-q", "--name", unique("cli"), "--category", "llm_api",
        "--env", environment, "--owner", "dana@example.com", "--backup-owner", "eli@example.com",
        "--team", "platform", "--purpose", "Summarises incidents",
    )).strip()  # fmt: skip


async def test_agent_and_role_through_the_cli(service: Service) -> None:
    agent_id = await create_agent(service)
    shown = json.loads(await aok(service, "--json", "agents", "show", agent_id))
    assert shown["owner_email"] == "dana@example.com" and shown["created_by"] == "token:carla"
    nhi_id = (await aok(
        service, "provision", agent_id, "--kind", "iam_role", "--ttl", "2d", "-q",
        "--action", "s3:GetObject", "--action", "s3:ListBucket",
        "--resource", "arn:aws:s3:::incidents", "--resource", "arn:aws:s3:::incidents/*",
        "--trust-principal", "arn:aws:iam::123456789012:role/agent-runtime", "--cidr", "10.1.0.0/16",
    )).strip()  # fmt: skip

    async def active() -> dict[str, Any]:
        nhi = json.loads(await aok(service, "--json", "nhis", "show", nhi_id))
        assert nhi["status"] == "active", nhi
        return dict(nhi)

    nhi = await eventually(active)
    assert nhi["granted_scope"][0]["actions"] == ["s3:GetObject", "s3:ListBucket"]
    assert nhi["allowed_cidrs"] == ["10.1.0.0/16"]
    table = await aok(service, "nhis", "list", "--agent", agent_id)
    assert table.splitlines()[0].split()[:3] == ["ID", "KIND", "STATUS"]
    assert nhi_id in table and "active" in table
    trail = json.loads(await aok(service, "--json", "nhis", "show", nhi_id, "--events"))["events"]
    assert [e["event"] for e in trail] == ["nhi.requested", "nhi.provisioning", "nhi.activated"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["agents", "create", "--name", "x"], "Missing option"),
        (["agents", "create", "-q", "--name", "ok-name", "--category", "rag", "--env", "dev",
          "--owner", "nope", "--team", "t", "--purpose", "p"], "owner_email"),
        (["agents", "show", "not-a-uuid"], "agent_id"),
        (["nhis", "show", "00000000-0000-0000-0000-000000000000"], "not found"),
        (["provision", "00000000-0000-0000-0000-000000000000", "--kind", "iam_role"], "--scope"),
        (["frobnicate"], "No such command"),
        (["targets", "add", "docs", "--dsn", "postgresql://nhi_admin:hunter2@db/app",
          "--password-env", "DOCS_PW"], "--password-env"),
        (["targets", "add", "docs", "--dsn", "postgresql://nhi_admin@db/app"], "exactly one"),
        (["targets", "add", "docs", "--dsn", "postgresql://nhi_admin@db/app",
          "--password-env", "A", "--password-secret", "b"], "exactly one"),
        (["targets", "add", "docs", "--dsn", "postgresql://nhi_admin@db/app",
          "--password-env", "A", "--connection-limit", "0"], "connection-limit"),
    ],
)  # fmt: skip
async def test_bad_input_is_one_line_and_exit_code_1(
    service: Service, args: list[str], words: str
) -> None:
    assert words in one_line_error(await arun(service, *args))


async def test_refused_scope_names_the_statement_and_creates_nothing(service: Service) -> None:
    agent_id = await create_agent(service)
    line = one_line_error(
        await arun(service, "provision", agent_id, "--kind", "iam_role", "--action", "s3:GetObject",
            "--action", "iam:*", "--resource", "arn:aws:iam::123456789012:role/x",
            "--trust-principal", "arn:aws:iam::123456789012:role/agent-runtime")
    )  # fmt: skip
    assert "scope[0].actions[1]" in line and "(HTTP 422)" in line
    assert json.loads(await aok(service, "--json", "agents", "show", agent_id))["nhis"] == []


async def test_unreachable_api_is_one_line(service: Service) -> None:
    line = one_line_error(await arun(service, "agents", "list", url="http://127.0.0.1:9"))
    assert "cannot reach the API" in line


async def test_sensitive_request_needs_someone_else_to_approve(service: Service) -> None:
    agent_id = await create_agent(service)
    accepted = json.loads(
        await aok(service, "--json", "provision", agent_id, "--kind", "iam_role",
           "--action", "s3:DeleteObject", "--resource", "arn:aws:s3:::scratch/*",
           "--trust-principal", "arn:aws:iam::123456789012:role/agent-runtime", actor="alice")
    )  # fmt: skip
    assert accepted["status"] == "pending_approval"
    line = one_line_error(
        await arun(service, "approve", accepted["id"], "--reason", "mine", actor="alice")
    )
    assert "token:alice needs the approver role" in line
    approved = json.loads(
        await aok(
            service, "--json", "approve", accepted["id"], "--reason", "ok for cleanup", actor="bob"
        )
    )
    assert approved["id"] == accepted["id"]

    async def active() -> None:
        nhi = json.loads(await aok(service, "--json", "nhis", "show", accepted["id"], "--events"))
        assert nhi["status"] == "active"
        approval = [e for e in nhi["events"] if e["event"] == "nhi.approved"]
        assert approval and approval[0]["actor"] == "token:bob"

    await eventually(active)
    line = one_line_error(
        await arun(service, "deny", accepted["id"], "--reason", "late", actor="carol")
    )
    assert "not pending_approval" in line


async def test_policies_apply_validates_then_replaces(service: Service, tmp_path: Path) -> None:
    async def staging_role() -> dict[str, Any]:
        listed = json.loads(await aok(service, "--json", "policies", "list"))
        return next(p for p in listed if p["kind"] == "iam_role" and p["environment"] == "staging")

    original = await staging_role()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "policies:\n- {platform: aws, kind: iam_role, environment: staging, allowed: true,\n"
        "   default_ttl: 10d, max_lifetime: 400d}\n"
    )
    assert "max_lifetime" in one_line_error(
        await arun(service, "policies", "apply", str(bad), actor="admin")
    )
    assert (await staging_role()) == original

    good = tmp_path / "good.yaml"
    good.write_text(
        "- platform: aws\n  kind: iam_role\n  environment: staging\n  allowed: true\n"
        "  default_ttl: 10d\n  max_lifetime: 60d\n  reminder_offsets: [1d, 7d]\n  grace_period: 2d\n"
        "  forbidden_actions: ['*', 'iam:*']\n  sensitive_actions: ['*:Delete*']\n"
    )
    try:
        await aok(service, "policies", "apply", str(good), actor="admin")
        applied = await staging_role()
        assert applied["default_ttl_seconds"] == 10 * 86400
        assert applied["max_lifetime_seconds"] == 60 * 86400
        assert applied["reminder_offsets_seconds"] == [7 * 86400, 86400]
        assert applied["updated_by"] == "token:admin"
    finally:
        restore = tmp_path / "restore.json"
        restore.write_text(
            json.dumps(
                [{
                    "platform": "aws", "kind": "iam_role", "environment": "staging", "allowed": True,
                    "default_ttl": original["default_ttl_seconds"], "max_lifetime": original["max_lifetime_seconds"],
                    "reminder_offsets": original["reminder_offsets_seconds"],
                    "grace_period": original["grace_period_seconds"],
                    "max_session_duration": original["max_session_duration_seconds"],
                    "forbidden_actions": original["forbidden_actions"],
                    "sensitive_actions": original["sensitive_actions"],
                }]
            )
        )  # fmt: skip
        await aok(service, "policies", "apply", str(restore), actor="admin")


async def test_lifecycle_commands_for_owners(service: Service) -> None:
    agent_id = await create_agent(service)
    nhi_id = (
        await aok(service, "provision", agent_id, "--kind", "iam_user_key", "-q",
                  "--action", "s3:GetObject", "--resource", "arn:aws:s3:::incidents/*")
    ).strip()  # fmt: skip

    async def status(expected: str) -> dict[str, Any]:
        nhi = json.loads(await aok(service, "--json", "nhis", "show", nhi_id, "--events"))
        assert nhi["status"] == expected, nhi["status"]
        return dict(nhi)

    await eventually(lambda: status("active"))
    owner, backup = "dana@example.com", "eli@example.com"

    async def lifecycle_ready() -> None:
        result = await arun(service, "--json", "renew", nhi_id, "--extend-by", "45d", actor=owner)
        assert result.returncode == 0, result.stderr

    await eventually(lifecycle_ready)
    assert "not the owner or backup owner" in one_line_error(
        await arun(service, "renew", nhi_id, actor="carla@example.com")
    )
    assert "token:carla is not the owner" in one_line_error(
        await arun(service, "renew", nhi_id, actor="carla")
    )
    assert "past the maximum lifetime" in one_line_error(
        await arun(service, "renew", nhi_id, "--extend-by", "300d", actor=owner)
    )

    rotated = json.loads(
        await aok(service, "--json", "rotate", nhi_id, "--reason", "cli test", actor=owner)
    )
    assert rotated["message"] == "rotation started"

    async def has_rotated() -> None:
        events = [e["event"] for e in (await status("active"))["events"]]
        assert "nhi.rotated" in events

    await eventually(has_rotated)
    await aok(service, "decommission", nhi_id, "--reason", "done", actor=owner)
    await eventually(lambda: status("quarantined"))
    restored = json.loads(await aok(service, "--json", "restore", nhi_id, actor=backup))
    assert restored["phase"] == "active"
    header = (await aok(service, "prompts")).splitlines()[0]
    assert header.split()[:3] == ["ID", "NHI_ID", "KIND"]

    completed = json.loads(
        await aok(service, "--json", "agents", "complete", agent_id, "--reason", "project closed")
    )
    assert completed["decommissioning"] == [nhi_id]
    trail = (await eventually(lambda: status("quarantined")))["events"]
    actors = {(e["event"], e["actor"]) for e in trail}
    assert ("nhi.renewed", f"token:{token_name(owner)}") in actors
    assert ("nhi.restored", f"token:{token_name(backup)}") in actors
    assert ("nhi.quarantined", "system:agent-completed") in actors


async def test_targets_through_the_cli(service: Service) -> None:
    name = unique("cli-tgt")
    added = json.loads(await aok(
        service, "--json", "targets", "add", name, "--dsn", "postgresql://nhi_admin@db.internal/app",
        "--password-secret", "nhi-targets/docs-admin", "--sslmode", "require", "--connection-limit", "4",
        actor="admin",
    ))  # fmt: skip
    assert added["password_ref"] == "secret:nhi-targets/docs-admin" and added["port"] == 5432
    assert (added["sslmode"], added["connection_limit"], added["source"]) == (
        "require",
        4,
        "inventory",
    )
    table = await aok(service, "targets", "list")
    assert table.splitlines()[0].split() == [
        "NAME", "HOST", "PORT", "DBNAME", "ADMIN_USER", "PASSWORD_REF", "SOURCE",
    ]  # fmt: skip
    assert name in table and "secret:nhi-targets/docs-admin" in table
    assert "needs the admin role" in one_line_error(
        await arun(service, "targets", "add", unique("cli-tgt"), "--dsn",
                   "postgresql://nhi_admin@db/app", "--password-env", "NHI_TARGET_PASSWORD_PW")
    )  # fmt: skip
    assert "already exists" in one_line_error(
        await arun(service, "targets", "add", name, "--dsn", "postgresql://nhi_admin@db/app",
                   "--password-env", "NHI_TARGET_PASSWORD_PW", actor="admin")
    )  # fmt: skip
    leaked = await arun(
        service, "targets", "add", unique("cli-tgt"), "--dsn",
        "postgresql://nhi_admin:hunter2@db/app", "--password-env", "NHI_TARGET_PASSWORD_PW", actor="admin",
    )  # fmt: skip
    assert "hunter2" not in one_line_error(leaked)

    agent_id = await create_agent(service)
    assert "target: is required for postgres_role" in one_line_error(
        await arun(service, "provision", agent_id, "--kind", "postgres_role",
                   "--action", "SELECT", "--resource", "docs.articles")
    )  # fmt: skip
    accepted = json.loads(await aok(
        service, "--json", "provision", agent_id, "--kind", "postgres_role", "--target", name,
        "--action", "SELECT", "--action", "UPDATE", "--resource", "docs.articles",
    ))  # fmt: skip
    assert accepted["status"] == "pending_approval"
    nhi = json.loads(await aok(service, "--json", "nhis", "show", accepted["id"]))
    assert (nhi["platform"], nhi["target"]) == ("postgres", name)
    assert "decommission them first" in one_line_error(
        await arun(service, "targets", "remove", name, actor="admin")
    )

    spare = unique("cli-tgt")
    await aok(service, "targets", "add", spare, "--dsn", "postgresql://nhi_admin@db/app",
              "--password-env", "NHI_TARGET_PASSWORD_PW", actor="admin")  # fmt: skip
    removed = json.loads(await aok(service, "--json", "targets", "remove", spare, actor="admin"))
    assert removed["name"] == spare
    assert "not found" in one_line_error(
        await arun(service, "targets", "remove", spare, actor="admin")
    )
