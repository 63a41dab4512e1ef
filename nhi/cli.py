"""`nhi`: the command line for platform teams. A thin client of the HTTP API, plus `nhi dev`."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import httpx
import yaml

from nhi.infra.config import get_settings

if TYPE_CHECKING:
    from temporalio.client import Client


class CliError(click.ClickException):
    """Printed as one line on stderr; exit code 1."""


def _fail(message: str) -> NoReturn:
    raise CliError(message)


def token_file() -> Path:
    """Where `nhi login` keeps the token: $XDG_CONFIG_HOME/nhi/token (~/.config by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "nhi" / "token"


def _stored_token() -> str | None:
    path = token_file()
    return path.read_text().strip() if path.is_file() else None


class Api:
    """HTTP calls to the nhi-lifecycle API with errors turned into one-line messages."""

    def __init__(
        self, base_url: str, token: str | None, idempotency_key: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=self.base_url, timeout=30.0, headers=headers)
        self._idempotency_key = idempotency_key

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._idempotency_key and method.upper() != "GET":
            # Re-running the same command with the same key is answered, not applied twice.
            kwargs["headers"] = {
                **kwargs.get("headers", {}),
                "Idempotency-Key": self._idempotency_key,
            }
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError:
            _fail(f"cannot reach the API at {self.base_url} (is `make dev` running?)")
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            _fail(f"{detail} (HTTP {response.status_code})")
        # A 204 (a removal) has no body.
        return response.json() if response.content else None


class Ctx:
    """What every command gets: the API client and the output mode."""

    def __init__(self, api: Api, as_json: bool) -> None:
        self.api = api
        self.as_json = as_json

    def emit(self, data: Any, columns: list[str] | None = None) -> None:
        if self.as_json or columns is None:
            click.echo(json.dumps(data, indent=2, default=str))
            return
        rows = data if isinstance(data, list) else [data]
        widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
        click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
        for r in rows:
            click.echo(
                "  ".join(str(r.get(c, "") or "").ljust(widths[c]) for c in columns).rstrip()
            )


pass_ctx = click.make_pass_decorator(Ctx)


@click.group()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--api-url", envvar="NHI_API_URL", default=None, help="API base URL.")
@click.option(
    "--token",
    envvar="NHI_TOKEN",
    default=None,
    help="API token or OIDC JWT (default: NHI_TOKEN, then the file `nhi login` wrote).",
)
@click.option(
    "--idempotency-key",
    envvar="NHI_IDEMPOTENCY_KEY",
    default=None,
    help="Sent as Idempotency-Key on the command's state-changing call: repeating the command "
    "with the same key is applied once.",
)
@click.pass_context
def cli(
    ctx: click.Context,
    as_json: bool,
    api_url: str | None,
    token: str | None,
    idempotency_key: str | None,
) -> None:
    """Govern the non-human identities your AI agents use."""
    api = Api(api_url or get_settings().api_url, token or _stored_token(), idempotency_key)
    ctx.obj = Ctx(api, as_json)


# ---- agents ---------------------------------------------------------------------------------
AGENT_COLUMNS = ["id", "name", "category", "environment", "owner_email", "team", "status"]
NHI_COLUMNS = ["id", "kind", "status", "name", "expires_at", "credential_ref"]


@cli.group()
def agents() -> None:
    """Register and inspect AI agents."""


@agents.command("create")
@click.option("--name", required=True, help="Unique within its environment, e.g. 'support-bot'.")
@click.option(
    "--category",
    required=True,
    type=click.Choice(
        [
            "chatbot",
            "rag",
            "cloud_model",
            "llm_api",
            "enterprise_platform",
            "browser_agent",
            "computer_agent",
        ]
    ),
)
@click.option(
    "--environment", "--env", required=True, type=click.Choice(["dev", "staging", "prod"])
)
@click.option("--owner", required=True, help="Owner's email.")
@click.option("--backup-owner", help="Backup owner's email.")
@click.option("--owner-slack-id", help="Owner's Slack user id (U...).")
@click.option("--team", required=True)
@click.option("--purpose", required=True)
@click.option("--expected-end", help="When the agent's task ends (ISO 8601 with timezone).")
@click.option("--invoker", "invokers", multiple=True, help="Principal that may invoke the agent.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the new agent's id.")
@pass_ctx
def agents_create(
    ctx: Ctx,
    name: str,
    category: str,
    environment: str,
    owner: str,
    backup_owner: str | None,
    owner_slack_id: str | None,
    team: str,
    purpose: str,
    expected_end: str | None,
    invokers: tuple[str, ...],
    quiet: bool,
) -> None:
    """Register an agent."""
    body: dict[str, Any] = {
        "name": name,
        "category": category,
        "environment": environment,
        "owner_email": owner,
        "team": team,
        "purpose": purpose,
        "invokers": list(invokers),
    }
    if backup_owner:
        body["backup_owner_email"] = backup_owner
    if owner_slack_id:
        body["owner_slack_id"] = owner_slack_id
    if expected_end:
        body["expected_end_at"] = expected_end
    created = ctx.api.call("POST", "/v1/agents", json=body)
    if quiet:
        click.echo(created["id"])
        return
    ctx.emit(created, AGENT_COLUMNS)


@agents.command("list")
@click.option("--environment", "--env", type=click.Choice(["dev", "staging", "prod"]))
@click.option("--owner")
@click.option("--team")
@click.option("--status", type=click.Choice(["active", "completed", "decommissioned"]))
@pass_ctx
def agents_list(
    ctx: Ctx, environment: str | None, owner: str | None, team: str | None, status: str | None
) -> None:
    """List agents."""
    params = {
        k: v
        for k, v in {
            "environment": environment,
            "owner": owner,
            "team": team,
            "status": status,
        }.items()
        if v
    }
    ctx.emit(ctx.api.call("GET", "/v1/agents", params=params), AGENT_COLUMNS)


@agents.command("show")
@click.argument("agent_id")
@pass_ctx
def agents_show(ctx: Ctx, agent_id: str) -> None:
    """Show an agent and every NHI it holds."""
    agent = ctx.api.call("GET", f"/v1/agents/{agent_id}")
    if ctx.as_json:
        ctx.emit(agent)
        return
    for key in [*AGENT_COLUMNS, "backup_owner_email", "purpose", "expected_end_at"]:
        click.echo(f"{key}: {agent.get(key) or ''}")
    click.echo(f"nhis: {len(agent['nhis'])}")
    if agent["nhis"]:
        ctx.emit(agent["nhis"], NHI_COLUMNS)


# ---- invokers and footprints (issue 16) ----------------------------------------------------
INVOKER_COLUMNS = ["id", "kind", "ref", "channel", "expires_at", "added_by"]


@agents.group("invokers")
def agents_invokers() -> None:
    """Who or what can make an agent act."""


@agents_invokers.command("add")
@click.argument("agent_id")
@click.option(
    "--kind",
    required=True,
    type=click.Choice(["person", "group", "service", "schedule", "agent"]),
)
@click.option(
    "--ref",
    required=True,
    help="An email, group name, service name, cron expression, or another agent's id.",
)
@click.option(
    "--channel", required=True, type=click.Choice(["slack", "api", "ui", "webhook", "cron"])
)
@click.option("--expires-at", help="When it stops counting (ISO 8601 with timezone).")
@pass_ctx
def invokers_add(
    ctx: Ctx, agent_id: str, kind: str, ref: str, channel: str, expires_at: str | None
) -> None:
    """Record an invoker of the agent."""
    body: dict[str, Any] = {"kind": kind, "ref": ref, "channel": channel}
    if expires_at:
        body["expires_at"] = expires_at
    added = ctx.api.call("POST", f"/v1/agents/{agent_id}/invokers", json=body)
    ctx.emit(added, INVOKER_COLUMNS)


@agents_invokers.command("list")
@click.argument("agent_id")
@pass_ctx
def invokers_list(ctx: Ctx, agent_id: str) -> None:
    """List the agent's invokers."""
    ctx.emit(ctx.api.call("GET", f"/v1/agents/{agent_id}/invokers"), INVOKER_COLUMNS)


@agents_invokers.command("remove")
@click.argument("agent_id")
@click.argument("invoker_id")
@pass_ctx
def invokers_remove(ctx: Ctx, agent_id: str, invoker_id: str) -> None:
    """Forget an invoker of the agent."""
    ctx.api.call("DELETE", f"/v1/agents/{agent_id}/invokers/{invoker_id}")
    click.echo(f"removed invoker {invoker_id}")


# ---- workload identities (issue 15) -------------------------------------------------------
WORKLOAD_COLUMNS = ["id", "issuer", "subject", "created_by", "created_at"]


@agents.group("workloads")
def agents_workloads() -> None:
    """Workload identities (JWT subjects of trusted issuers) that act as an agent."""


@agents_workloads.command("add")
@click.argument("agent_id")
@click.option("--issuer", required=True, help="A trusted issuer (NHI_WORKLOAD_OIDC_ISSUERS).")
@click.option(
    "--subject",
    required=True,
    help="The tokens' exact `sub`, e.g. system:serviceaccount:agents:kb-bot.",
)
@click.option("--reason", default="", help="Why (recorded in the audit trail).")
@pass_ctx
def workloads_add(ctx: Ctx, agent_id: str, issuer: str, subject: str, reason: str) -> None:
    """Bind a workload identity to the agent."""
    body = {"issuer": issuer, "subject": subject, "reason": reason}
    ctx.emit(ctx.api.call("POST", f"/v1/agents/{agent_id}/workloads", json=body), WORKLOAD_COLUMNS)


@agents_workloads.command("list")
@click.argument("agent_id")
@pass_ctx
def workloads_list(ctx: Ctx, agent_id: str) -> None:
    """List the workload identities bound to the agent."""
    ctx.emit(ctx.api.call("GET", f"/v1/agents/{agent_id}/workloads"), WORKLOAD_COLUMNS)


@agents_workloads.command("remove")
@click.argument("agent_id")
@click.argument("workload_id")
@click.option("--reason", default="", help="Why (recorded in the audit trail).")
@pass_ctx
def workloads_remove(ctx: Ctx, agent_id: str, workload_id: str, reason: str) -> None:
    """Unbind a workload identity: its next request is refused."""
    ctx.api.call(
        "DELETE", f"/v1/agents/{agent_id}/workloads/{workload_id}", params={"reason": reason}
    )
    click.echo(f"removed workload {workload_id}")


@cli.command("footprint")
@click.argument("agent_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole footprint as JSON.")
@pass_ctx
def footprint_cmd(ctx: Ctx, agent_id: str, as_json: bool) -> None:
    """Everything the agent can do, who can make it act, and its risk score."""
    fp = ctx.api.call("GET", f"/v1/agents/{agent_id}/footprint")
    if as_json or ctx.as_json:
        click.echo(json.dumps(fp, indent=2, default=str))
        return
    click.echo(f"agent: {fp['name']} ({fp['environment']}, team {fp['team']})")
    click.echo(f"risk: {fp['risk']['score']}/100")
    for reason in fp["risk"]["reasons"]:
        click.echo(f"  +{reason['points']} {reason['code']}: {reason['detail']}")
    click.echo(f"nhis: {len(fp['nhis'])}  task credentials: {len(fp['task_credentials'])}")
    click.echo(f"expiry horizon: {fp['expiry_horizon'] or '-'}")
    for grant in fp["permissions"]["aws"]:
        mark = " (sensitive)" if grant["sensitive"] else ""
        click.echo(f"  aws {grant['action']} on {', '.join(grant['resources'])}{mark}")
    for grant in fp["permissions"]["postgres"]:
        privileges = " ".join(grant["privileges"])
        click.echo(f"  postgres {grant['target']}:{grant['object']} {privileges}")
    stores = fp["data_stores"]
    pg = [f"{s['target']}:{s['schema_name']}" for s in stores["postgres"]]
    click.echo(f"data stores: {', '.join(stores['s3_buckets'] + stores['dynamodb_tables'] + pg)}")
    who = [f"{i['kind']} {i['ref']} ({i['channel']})" for i in fp["invokers"]]
    who += [f"{i['kind']} {i['ref']} via agent {i['via']}" for i in fp["reachable_invokers"]]
    click.echo(f"invokers: {', '.join(who) or '-'}")
    chain = [f"{a['name']} (depth {a['depth']})" for a in fp["reachable_agents"]]
    click.echo(f"agents that can make it act: {', '.join(chain) or '-'}")


# ---- provisioning ---------------------------------------------------------------------------
def _scope(scope: str | None, actions: tuple[str, ...], resources: tuple[str, ...]) -> list[Any]:
    if scope:
        text = Path(scope[1:]).read_text() if scope.startswith("@") else scope
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            _fail("--scope: not valid JSON or YAML")
        if isinstance(parsed, dict):
            parsed = [parsed]
        if not isinstance(parsed, list):
            _fail("--scope: must be a list of {actions, resources} statements")
        return parsed
    if not actions or not resources:
        _fail("give --scope, or at least one --action and one --resource")
    return [{"actions": list(actions), "resources": list(resources)}]


# The platform each kind lives on, so `--platform` can be left out.
PLATFORM_OF_KIND = {
    "iam_role": "aws",
    "iam_user_key": "aws",
    "postgres_role": "postgres",
    "github_app_token": "github",
}


@cli.command()
@click.argument("agent_id")
@click.option("--kind", type=click.Choice(sorted(PLATFORM_OF_KIND)))
@click.option(
    "--file",
    "bundle_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A bundle: YAML/JSON list of NHI requests (or {nhis: [...]}), all or nothing.",
)
@click.option(
    "--platform",
    type=click.Choice(sorted(set(PLATFORM_OF_KIND.values()))),
    help="Platform of the kind (implied by --kind).",
)
@click.option("--scope", help="Statements as JSON/YAML, or @FILE.")
@click.option(
    "--action",
    "actions",
    multiple=True,
    help="IAM action (or Postgres privilege) for a one-statement scope.",
)
@click.option(
    "--resource",
    "resources",
    multiple=True,
    help="Resource ARN (or schema.table) for that statement.",
)
@click.option("--ttl", help="Seconds or a duration such as 30d or 12h (policy default if unset).")
@click.option("--cidr", "cidrs", multiple=True, help="Allowed source CIDR (repeatable).")
@click.option("--trust-principal", help="iam_role: the agent runtime's principal.")
@click.option("--target", help="postgres_role: the registered target database (`nhi targets`).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the new NHI's id.")
@pass_ctx
def provision(
    ctx: Ctx,
    agent_id: str,
    kind: str,
    platform: str | None,
    scope: str | None,
    actions: tuple[str, ...],
    resources: tuple[str, ...],
    ttl: str | None,
    cidrs: tuple[str, ...],
    trust_principal: str | None,
    target: str | None,
    quiet: bool,
    bundle_file: Path | None = None,
) -> None:
    """Request an identity for an agent (or, with --file, a bundle of them); prints the NHI
    id and its workflow."""
    if bundle_file is not None:
        _provision_bundle(ctx, agent_id, bundle_file, quiet)
        return
    if kind is None:
        _fail("give --kind, or --file with a bundle")
    body: dict[str, Any] = {
        "platform": platform or PLATFORM_OF_KIND[kind],
        "kind": kind,
        "scope": _scope(scope, actions, resources),
        "allowed_cidrs": list(cidrs),
    }
    if ttl:
        body["ttl"] = int(ttl) if ttl.isdigit() else ttl
    if trust_principal:
        body["trust_principal"] = trust_principal
    if target:
        body["target"] = target
    accepted = ctx.api.call("POST", f"/v1/agents/{agent_id}/nhis", json=body)
    if quiet:
        click.echo(accepted["id"])
        return
    ctx.emit(accepted, ["id", "status", "workflow_id", "expires_at"])


def _provision_bundle(ctx: Ctx, agent_id: str, file: Path, quiet: bool) -> None:
    """POST the bundle as it is written: the API names the item and field at fault."""
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        _fail(f"{file}: not YAML/JSON ({err.__class__.__name__})")
    items = data.get("nhis") if isinstance(data, dict) else data
    if not isinstance(items, list):
        _fail(f"{file}: expected a list of NHI requests (or a mapping with 'nhis')")
    for item in items:
        if isinstance(item, dict) and "kind" in item and "platform" not in item:
            item["platform"] = PLATFORM_OF_KIND.get(str(item["kind"]), "")
    accepted = ctx.api.call("POST", f"/v1/agents/{agent_id}/nhis:batch", json={"nhis": items})
    if quiet:
        click.echo(accepted["bundle_id"])
        return
    if ctx.as_json:
        ctx.emit(accepted)
        return
    click.echo(f"bundle {accepted['bundle_id']} ({accepted['workflow_id']})")
    ctx.emit(accepted["nhis"], ["id", "status", "workflow_id", "expires_at"])
    if accepted.get("approval"):
        approval = accepted["approval"]
        reasons = "; ".join(approval["reasons"])
        click.echo(f"waits for approval {approval['approval_id']}: {reasons}")


@cli.group()
def approvals() -> None:
    """Requests waiting for approvers (the policy's `approvers`)."""


APPROVAL_COLUMNS = ["id", "status", "agent_id", "requested_by", "approvals_required", "expires_at"]


@approvals.command("list")
@click.option("--all", "everything", is_flag=True, help="Decided and expired ones too.")
@pass_ctx
def approvals_list(ctx: Ctx, everything: bool) -> None:
    """Pending requests you may decide (security and admin: every one)."""
    params = {"all": "true"} if everything else {}
    ctx.emit(ctx.api.call("GET", "/v1/approvals", params=params), APPROVAL_COLUMNS)


@approvals.command("approve")
@click.argument("approval_id")
@click.option("--reason", required=True)
@pass_ctx
def approvals_approve(ctx: Ctx, approval_id: str, reason: str) -> None:
    """Approve a request (a bundle as a whole)."""
    ctx.emit(
        ctx.api.call("POST", f"/v1/approvals/{approval_id}/approve", json={"reason": reason}),
        APPROVAL_COLUMNS,
    )


@approvals.command("deny")
@click.argument("approval_id")
@click.option("--reason", required=True)
@pass_ctx
def approvals_deny(ctx: Ctx, approval_id: str, reason: str) -> None:
    """Deny a request, with the reason."""
    ctx.emit(
        ctx.api.call("POST", f"/v1/approvals/{approval_id}/deny", json={"reason": reason}),
        APPROVAL_COLUMNS,
    )


@cli.group()
def credentials() -> None:
    """Task credentials: short-lived credentials from an active NHI, for one task."""


def _task_exports(issued: dict[str, Any]) -> list[tuple[str, str]]:
    """The credential as the variables its platform's clients read (libpq, the AWS SDKs)."""
    if issued.get("postgres"):
        pg = issued["postgres"]
        return [
            ("PGHOST", str(pg["host"])),
            ("PGPORT", str(pg["port"])),
            ("PGDATABASE", str(pg["dbname"])),
            ("PGUSER", str(pg["username"])),
            ("PGPASSWORD", str(pg["password"])),
            ("PGSSLMODE", str(pg["sslmode"])),
        ]
    aws = issued["aws"]
    return [
        ("AWS_ACCESS_KEY_ID", str(aws["AccessKeyId"])),
        ("AWS_SECRET_ACCESS_KEY", str(aws["SecretAccessKey"])),
        ("AWS_SESSION_TOKEN", str(aws["SessionToken"])),
    ]


@credentials.command("issue")
@click.argument("nhi_id")
@click.option("--ttl", default="15m", show_default=True, help="e.g. 15m, 1h or 900 (seconds).")
@click.option("--task", "task_id", help="The task it is for (session tags and audit name it).")
@click.option(
    "--action", "actions", multiple=True, help="Narrow the scope: IAM action or privilege."
)
@click.option(
    "--resource", "resources", multiple=True, help="Narrow the scope: ARN or schema.table."
)
@pass_ctx
def credentials_issue(
    ctx: Ctx,
    nhi_id: str,
    ttl: str,
    task_id: str | None,
    actions: tuple[str, ...],
    resources: tuple[str, ...],
) -> None:
    """Issue a task credential; printed once as `export` lines (`eval "$(nhi credentials
    issue ...)"`), or whole with --json. It is never shown again."""
    body: dict[str, Any] = {"ttl": int(ttl) if ttl.isdigit() else ttl}
    if task_id:
        body["task_id"] = task_id
    if actions or resources:
        body["scope"] = _scope(None, actions, resources)
    issued = ctx.api.call("POST", f"/v1/nhis/{nhi_id}/credentials", json=body)
    if ctx.as_json:
        ctx.emit(issued)
        return
    click.echo(
        f"# task credential {issued['id']} ({issued['name']}), expires {issued['expires_at']}"
    )
    for name, value in _task_exports(issued):
        click.echo(f"export {name}={shlex.quote(value)}")


@cli.group()
def nhis() -> None:
    """Inspect the NHI inventory."""


@nhis.command("list")
@click.option("--agent", "agent_id")
@click.option("--status")
@click.option("--owner")
@pass_ctx
def nhis_list(ctx: Ctx, agent_id: str | None, status: str | None, owner: str | None) -> None:
    """List NHIs."""
    params = {
        k: v for k, v in {"agent_id": agent_id, "status": status, "owner": owner}.items() if v
    }
    ctx.emit(ctx.api.call("GET", "/v1/nhis", params=params), NHI_COLUMNS)


@nhis.command("show")
@click.argument("nhi_id")
@click.option("--events", is_flag=True, help="Also print the audit trail.")
@pass_ctx
def nhis_show(ctx: Ctx, nhi_id: str, events: bool) -> None:
    """Show one NHI."""
    nhi = ctx.api.call("GET", f"/v1/nhis/{nhi_id}")
    trail = ctx.api.call("GET", f"/v1/nhis/{nhi_id}/events") if events else None
    if ctx.as_json:
        ctx.emit({**nhi, "events": trail} if events else nhi)
        return
    for key, value in nhi.items():
        click.echo(f"{key}: {json.dumps(value) if isinstance(value, list | dict) else value}")
    if trail:
        ctx.emit(trail, ["created_at", "event", "actor", "reason"])


@cli.command()
@click.argument("nhi_id")
@click.option("--reason", required=True)
@pass_ctx
def approve(ctx: Ctx, nhi_id: str, reason: str) -> None:
    """Approve a request that asks for sensitive actions."""
    ctx.emit(
        ctx.api.call("POST", f"/v1/nhis/{nhi_id}/approve", json={"reason": reason}), NHI_COLUMNS
    )


@cli.command()
@click.argument("nhi_id")
@click.option("--reason", required=True)
@pass_ctx
def deny(ctx: Ctx, nhi_id: str, reason: str) -> None:
    """Deny a request that asks for sensitive actions."""
    ctx.emit(ctx.api.call("POST", f"/v1/nhis/{nhi_id}/deny", json={"reason": reason}), NHI_COLUMNS)


# ---- lifecycle ------------------------------------------------------------------------------
LIFECYCLE_COLUMNS = ["nhi_id", "phase", "expires_at", "next_rotation_at", "message"]


def _lifecycle(ctx: Ctx, nhi_id: str, action: str, body: dict[str, Any]) -> None:
    ctx.emit(ctx.api.call("POST", f"/v1/nhis/{nhi_id}/{action}", json=body), LIFECYCLE_COLUMNS)


@cli.command()
@click.argument("nhi_id")
@click.option(
    "--extend-by", help="Seconds or a duration such as 30d (policy default TTL if unset)."
)
@click.option("--reason", default="")
@pass_ctx
def renew(ctx: Ctx, nhi_id: str, extend_by: str | None, reason: str) -> None:
    """Extend an NHI's expiry (owner or backup owner)."""
    body: dict[str, Any] = {"reason": reason}
    if extend_by:
        body["extend_by"] = int(extend_by) if extend_by.isdigit() else extend_by
    _lifecycle(ctx, nhi_id, "renew", body)


@cli.command()
@click.argument("nhi_id")
@click.option("--reason", default="")
@pass_ctx
def rotate(ctx: Ctx, nhi_id: str, reason: str) -> None:
    """Rotate an NHI's credential now, without downtime."""
    _lifecycle(ctx, nhi_id, "rotate", {"reason": reason})


@cli.command()
@click.argument("nhi_id")
@click.option("--reason", default="")
@pass_ctx
def decommission(ctx: Ctx, nhi_id: str, reason: str) -> None:
    """Quarantine an NHI now; it is deleted after the grace period."""
    _lifecycle(ctx, nhi_id, "decommission", {"reason": reason})


@cli.command()
@click.argument("nhi_id")
@click.option("--reason", default="")
@pass_ctx
def restore(ctx: Ctx, nhi_id: str, reason: str) -> None:
    """Undo a quarantine during the grace period."""
    _lifecycle(ctx, nhi_id, "restore", {"reason": reason})


# ---- containment (issue 17) -----------------------------------------------------------------
INCIDENT_COLUMNS = ["id", "agent_id", "status", "opened_by", "opened_at", "contained_at"]
PROOF_COLUMNS = ["credential", "platform", "action", "proof", "proven", "at"]


@cli.command()
@click.argument("agent_id")
@click.option("--reason", required=True, help="Why (recorded on the incident).")
@pass_ctx
def contain(ctx: Ctx, agent_id: str, reason: str) -> None:
    """Contain an agent now: every credential quarantined and proven dead (security)."""
    ctx.emit(
        ctx.api.call("POST", f"/v1/agents/{agent_id}/contain", json={"reason": reason}),
        INCIDENT_COLUMNS,
    )


@cli.command()
@click.argument("agent_id")
@click.option("--reason", required=True, help="Why containment is lifted.")
@pass_ctx
def release(ctx: Ctx, agent_id: str, reason: str) -> None:
    """Lift an agent's containment (a second person: not the one who contained it)."""
    ctx.emit(
        ctx.api.call("POST", f"/v1/agents/{agent_id}/release", json={"reason": reason}),
        [*INCIDENT_COLUMNS, "released_by"],
    )


@cli.group("incidents")
def incidents_group() -> None:
    """Containment incidents."""


@incidents_group.command("list")
@click.option("--agent", "agent_id", help="Only this agent's incidents.")
@click.option(
    "--status",
    type=click.Choice(["containing", "contained", "partially_contained", "released"]),
)
@pass_ctx
def incidents_list(ctx: Ctx, agent_id: str | None, status: str | None) -> None:
    """Incidents, newest first."""
    params = {k: v for k, v in (("agent_id", agent_id), ("status", status)) if v}
    ctx.emit(ctx.api.call("GET", "/v1/incidents", params=params), INCIDENT_COLUMNS)


@incidents_group.command("show")
@click.argument("incident_id")
@pass_ctx
def incidents_show(ctx: Ctx, incident_id: str) -> None:
    """One incident: each credential with the proof it is dead, and the timeline."""
    incident = ctx.api.call("GET", f"/v1/incidents/{incident_id}")
    if ctx.as_json:
        ctx.emit(incident)
        return
    ctx.emit(incident, [*INCIDENT_COLUMNS, "released_by", "reason"])
    report = incident.get("report") or {}
    if report.get("cause"):
        click.echo(f"\ncause: {report['cause']}")
    click.echo("")
    ctx.emit(report.get("credentials") or [], PROOF_COLUMNS)
    click.echo("")
    ctx.emit(report.get("timeline") or [], ["at", "event", "detail"])


@agents.command("complete")
@click.argument("agent_id")
@click.option("--reason", default="")
@pass_ctx
def agents_complete(ctx: Ctx, agent_id: str, reason: str) -> None:
    """The agent's task has ended: decommission all its NHIs."""
    ctx.emit(ctx.api.call("POST", f"/v1/agents/{agent_id}/complete", json={"reason": reason}))


PROMPT_COLUMNS = ["id", "nhi_id", "kind", "for_expires_at", "status", "decision", "decided_by"]


@cli.group(invoke_without_command=True)
@click.option("--all", "show_all", is_flag=True, help="Include answered prompts.")
@click.pass_context
def prompts(click_ctx: click.Context, show_all: bool) -> None:
    """Renewal prompts (what Slack would show); `nhi prompts answer` answers one."""
    if click_ctx.invoked_subcommand is None:
        ctx: Ctx = click_ctx.obj
        params = {"status": "all" if show_all else "open"}
        ctx.emit(ctx.api.call("GET", "/v1/prompts", params=params), PROMPT_COLUMNS)


@prompts.command("answer")
@click.argument("prompt_id")
@click.argument("answer", type=click.Choice(["renew", "let-expire", "decommission-now"]))
@click.option("--reason", default="")
@pass_ctx
def prompts_answer(ctx: Ctx, prompt_id: str, answer: str, reason: str) -> None:
    """Answer a prompt as the owner or backup owner."""
    body = {"answer": answer.replace("-", "_"), "reason": reason}
    ctx.emit(ctx.api.call("POST", f"/v1/prompts/{prompt_id}/answer", json=body), LIFECYCLE_COLUMNS)


# ---- policies -------------------------------------------------------------------------------
@cli.group()
def policies() -> None:
    """Show and apply policies."""


@policies.command("list")
@pass_ctx
def policies_list(ctx: Ctx) -> None:
    """List policies."""
    ctx.emit(
        ctx.api.call("GET", "/v1/policies"),
        [
            "platform",
            "kind",
            "environment",
            "allowed",
            "default_ttl_seconds",
            "max_lifetime_seconds",
        ],
    )


@policies.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_ctx
def policies_apply(ctx: Ctx, file: Path) -> None:
    """Create or replace the policies in FILE (YAML or JSON: a list, or {policies: [...]})."""
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        _fail(f"{file}: not valid YAML or JSON ({err.__class__.__name__})")
    if isinstance(data, list):
        data = {"policies": data}
    if not isinstance(data, dict):
        _fail(f"{file}: expected a list of policies or {{policies: [...]}}")
    ctx.emit(
        ctx.api.call("PUT", "/v1/policies", json=data),
        [
            "platform",
            "kind",
            "environment",
            "allowed",
            "default_ttl_seconds",
            "max_lifetime_seconds",
        ],
    )


# ---- identity and tokens --------------------------------------------------------------------
TOKEN_COLUMNS = ["name", "role", "teams", "email", "expires_at", "revoked_at", "last_used_at"]


@cli.command()
@click.option("--token", "new_token", required=True, help="The token to use from now on.")
@pass_ctx
def login(ctx: Ctx, new_token: str) -> None:
    """Check a token against the API and keep it for later commands (file mode 0600)."""
    who = Api(ctx.api.base_url, new_token).call("GET", "/v1/whoami")
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(new_token + "\n")
    click.echo(
        f"logged in as {who['actor']} ({', '.join(who['roles']) or 'no role'}); token in {path}"
    )


@cli.command()
@pass_ctx
def whoami(ctx: Ctx) -> None:
    """Who the API thinks you are."""
    ctx.emit(ctx.api.call("GET", "/v1/whoami"), ["actor", "roles", "teams", "email"])


@cli.group()
def tokens() -> None:
    """API tokens (admin role): shown once, stored as a hash, always expiring."""


@tokens.command("create")
@click.option("--name", required=True)
@click.option(
    "--role",
    required=True,
    type=click.Choice(["platform", "approver", "security", "auditor", "admin", "agent"]),
)
@click.option("--ttl", required=True, help="Lifetime, e.g. 30d (at most 366d).")
@click.option("--team", "teams", multiple=True, help="Team a platform token acts for (repeatable).")
@click.option("--email", help="The person the token is for (owner rights).")
@click.option("--agent", "agent_id", help="Agent id an `agent` token acts as (required for it).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the token.")
@pass_ctx
def tokens_create(
    ctx: Ctx,
    name: str,
    role: str,
    ttl: str,
    teams: tuple[str, ...],
    email: str | None,
    agent_id: str | None,
    quiet: bool,
) -> None:
    """Issue a token; it is printed once and never again."""
    body: dict[str, Any] = {"name": name, "role": role, "ttl": int(ttl) if ttl.isdigit() else ttl}
    if teams:
        body["teams"] = list(teams)
    if email:
        body["email"] = email
    if agent_id:
        body["agent_id"] = agent_id
    created = ctx.api.call("POST", "/v1/tokens", json=body)
    if quiet:
        click.echo(created["token"])
        return
    ctx.emit(created, ["name", "role", "expires_at", "token"])


@tokens.command("list")
@pass_ctx
def tokens_list(ctx: Ctx) -> None:
    """Every token the service issued (never the tokens themselves)."""
    ctx.emit(ctx.api.call("GET", "/v1/tokens"), TOKEN_COLUMNS)


@tokens.command("revoke")
@click.argument("name")
@pass_ctx
def tokens_revoke(ctx: Ctx, name: str) -> None:
    """Revoke a token at once."""
    ctx.emit(ctx.api.call("POST", f"/v1/tokens/{name}/revoke"), TOKEN_COLUMNS)


@tokens.command("bootstrap")
@click.option("--name", default="bootstrap-admin", show_default=True)
@click.option("--ttl", default="1d", show_default=True)
def tokens_bootstrap(name: str, ttl: str) -> None:
    """Create the first admin token straight in the database (needs NHI_DATABASE_URL)."""
    from models.enums import Role
    from nhi.infra.db import make_engine, make_sessionmaker, transaction
    from nhi.rules.policy import RuleViolation
    from nhi.services.tokens import issue_token

    try:
        engine = make_engine(get_settings().require_database_url())
    except RuntimeError as err:
        _fail(str(err))
    try:
        with transaction(make_sessionmaker(engine)) as session:
            _, plaintext = issue_token(
                session, name=name, role=Role.ADMIN, ttl=ttl, created_by="cli:bootstrap"
            )
    except RuleViolation as err:
        _fail(str(err))
    finally:
        engine.dispose()
    click.echo(plaintext)


# ---- Postgres targets ------------------------------------------------------------------------
TARGET_COLUMNS = ["name", "host", "port", "dbname", "admin_user", "password_ref", "source"]


@cli.group()
def targets() -> None:
    """Postgres databases where postgres_role NHIs are created (admin registers them)."""


@targets.command("add")
@click.argument("name")
@click.option("--dsn", required=True, help="postgresql://admin_user@host:5432/dbname, no password.")
@click.option("--password-env", help="Worker environment variable holding the admin password.")
@click.option("--password-secret", help="Secrets Manager ARN or name of the admin password.")
@click.option(
    "--sslmode",
    type=click.Choice(["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]),
    default=None,
    help="Default: verify-full (prefer when the service runs with NHI_DEV_MODE).",
)
@click.option(
    "--connection-limit",
    type=click.IntRange(1, 1000),
    default=10,
    show_default=True,
    help="At most this many admin connections at once.",
)
@pass_ctx
def targets_add(
    ctx: Ctx,
    name: str,
    dsn: str,
    password_env: str | None,
    password_secret: str | None,
    sslmode: str | None,
    connection_limit: int,
) -> None:
    """Register a target; its admin password stays in the environment or the secret store."""
    from nhi.rules.policy import RuleViolation
    from nhi.rules.targets import parse_dsn

    # Checked here as well, so a DSN holding a password never leaves this machine.
    if bool(password_env) == bool(password_secret):
        _fail("give exactly one of --password-env or --password-secret")
    try:
        parse_dsn(dsn, "--dsn")
    except RuleViolation as err:
        _fail(str(err))
    body: dict[str, Any] = {
        "name": name,
        "dsn": dsn,
        "connection_limit": connection_limit,
    }
    if sslmode:
        body["sslmode"] = sslmode
    if password_env:
        body["password_env"] = password_env
    if password_secret:
        body["password_secret"] = password_secret
    ctx.emit(ctx.api.call("POST", "/v1/targets", json=body), TARGET_COLUMNS)


@targets.command("list")
@pass_ctx
def targets_list(ctx: Ctx) -> None:
    """Every target, registered or from settings (never a password)."""
    ctx.emit(ctx.api.call("GET", "/v1/targets"), TARGET_COLUMNS)


@targets.command("remove")
@click.argument("name")
@pass_ctx
def targets_remove(ctx: Ctx, name: str) -> None:
    """Remove a target that no living NHI uses."""
    ctx.emit(ctx.api.call("DELETE", f"/v1/targets/{name}"), TARGET_COLUMNS)


# ---- sweeps and schedules -------------------------------------------------------------------
FINDING_COLUMNS = ["kind", "identity", "detail", "action"]


def _show_sweep(ctx: Ctx, sweep: dict[str, Any]) -> None:
    if ctx.as_json:
        ctx.emit(sweep)
        return
    mode = " (dry run)" if sweep["dry_run"] else ""
    click.echo(f"sweep {sweep['id']} of {sweep['provider']}{mode}: {sweep['status']}")
    if sweep.get("error"):
        click.echo(f"error: {sweep['error']}")
    counts = {k: v for k, v in sweep["summary"].items() if v}
    click.echo("summary: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    if sweep["findings"]:
        ctx.emit(sweep["findings"], FINDING_COLUMNS)


@cli.group(invoke_without_command=True)
@click.option(
    "--provider", default="aws", show_default=True, type=click.Choice(["aws", "postgres"])
)
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--no-wait", is_flag=True, help="Return once the sweep has started.")
@click.pass_context
def sweep(click_ctx: click.Context, provider: str, dry_run: bool, no_wait: bool) -> None:
    """Sweep a provider for orphaned, stale, expired and drifted NHIs (security role)."""
    if click_ctx.invoked_subcommand is not None:
        return
    ctx: Ctx = click_ctx.obj
    started = ctx.api.call("POST", "/v1/sweeps", json={"provider": provider, "dry_run": dry_run})
    if no_wait:
        ctx.emit(started, ["id", "provider", "dry_run", "status", "workflow_id"])
        return
    deadline = time.monotonic() + 600
    current = started
    while current["status"] == "running":
        if time.monotonic() > deadline:
            _fail(f"sweep {started['id']} still running; see `nhi sweep show {started['id']}`")
        time.sleep(1)
        current = ctx.api.call("GET", f"/v1/sweeps/{started['id']}")
    _show_sweep(ctx, current)
    if current["status"] == "failed":
        raise SystemExit(1)


@sweep.command("show")
@click.argument("sweep_id")
@pass_ctx
def sweep_show(ctx: Ctx, sweep_id: str) -> None:
    """One sweep's findings and actions."""
    _show_sweep(ctx, ctx.api.call("GET", f"/v1/sweeps/{sweep_id}"))


@sweep.command("list")
@pass_ctx
def sweep_list(ctx: Ctx) -> None:
    """Recent sweeps."""
    ctx.emit(
        ctx.api.call("GET", "/v1/sweeps"),
        ["id", "provider", "dry_run", "status", "started_at", "triggered_by"],
    )


# Whether this process started a Temporal client (see `main`).
_temporal_used = False


def _temporal(action: Any) -> Any:
    """Run `action(client, settings)` against Temporal (schedules are an operator's tool)."""
    import asyncio

    from nhi.infra.temporal_client import connect

    global _temporal_used
    settings = get_settings()
    _temporal_used = True

    async def go() -> Any:
        try:
            client = await connect(settings)
        except Exception:
            _fail(f"cannot reach Temporal at {settings.temporal_address}")
        return await action(client, settings)

    return asyncio.run(go())


@cli.group()
def schedules() -> None:
    """Temporal Schedules of the sweeps (talks to Temporal with NHI_TEMPORAL_* settings)."""


@schedules.command("apply")
def schedules_apply() -> None:
    """Create or update every sweep and task reaper schedule (the worker does it at start)."""
    from nhi.schedules import apply_schedules

    for line in _temporal(apply_schedules):
        click.echo(line)


@schedules.command("list")
def schedules_list() -> None:
    """Sweep and task reaper schedules, paused or not, and when they fire next."""
    from nhi.schedules import schedule_ids

    async def describe(client: Any, _settings: Any) -> list[str]:
        out = []
        for schedule_id in schedule_ids(_settings):
            d = await client.get_schedule_handle(schedule_id).describe()
            nxt = d.info.next_action_times[0] if d.info.next_action_times else None
            paused = "paused" if d.schedule.state.paused else "active"
            out.append(f"{schedule_id}  {paused}  next: {nxt}  runs: {d.info.num_actions}")
        return out

    for line in _temporal(describe):
        click.echo(line)


def _schedule_op(op: str, provider: str) -> None:
    from nhi.schedules import schedule_id_of

    async def act(client: Any, _settings: Any) -> None:
        handle = client.get_schedule_handle(schedule_id_of(provider))
        if op == "pause":
            await handle.pause(note="nhi schedules pause")
        elif op == "resume":
            await handle.unpause(note="nhi schedules resume")
        else:
            await handle.trigger()

    _temporal(act)
    schedule_id = schedule_id_of(provider)
    click.echo(f"{schedule_id}: {op}d" if op != "trigger" else f"{schedule_id}: triggered")


@schedules.command("pause")
@click.argument("provider", default="aws")
def schedules_pause(provider: str) -> None:
    """Pause a provider's sweeps (or `task-reaper`)."""
    _schedule_op("pause", provider)


@schedules.command("resume")
@click.argument("provider", default="aws")
def schedules_resume(provider: str) -> None:
    """Resume a provider's sweeps (or `task-reaper`)."""
    _schedule_op("resume", provider)


@schedules.command("trigger")
@click.argument("provider", default="aws")
def schedules_trigger(provider: str) -> None:
    """Run a provider's sweep (or the `task-reaper`) now."""
    _schedule_op("trigger", provider)


async def register_search_attributes(client: Client, namespace: str) -> list[str]:
    """Register every NHI search attribute in `namespace` (operator API; idempotent): one line
    per attribute. Temporal Cloud refuses the operator API: there, tcld or the UI (notes below)."""
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import (
        AddSearchAttributesRequest,
        ListSearchAttributesRequest,
    )
    from temporalio.service import RPCError, RPCStatusCode

    from nhi.rules import search_attributes as sa

    ops = client.operator_service
    cloud = "tcld namespace search-attributes add -n <namespace> " + " ".join(
        f"--sa {k.name}={sa.type_name(k)}" for k in sa.KEYS
    )
    try:
        listed = await ops.list_search_attributes(ListSearchAttributesRequest(namespace=namespace))
        known = {**listed.system_attributes, **listed.custom_attributes}
        lines, missing = [], {}
        for key in sa.KEYS:
            want = IndexedValueType.ValueType(key.indexed_value_type.value)
            if key.name not in known:
                missing[key.name] = want
                lines.append(f"{key.name} ({sa.type_name(key)}): registered")
            elif known[key.name] != want:
                have = IndexedValueType.Name(known[key.name]).removeprefix("INDEXED_VALUE_TYPE_")
                _fail(f"{key.name} is registered as {have.title()}, not {sa.type_name(key)}")
            else:
                lines.append(f"{key.name} ({sa.type_name(key)}): already registered")
        if missing:
            await ops.add_search_attributes(
                AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
            )
        return lines
    except RPCError as err:
        if err.status is RPCStatusCode.ALREADY_EXISTS:  # registered meanwhile by another setup
            return [f"{k.name} ({sa.type_name(k)}): already registered" for k in sa.KEYS]
        if err.status in (RPCStatusCode.PERMISSION_DENIED, RPCStatusCode.UNIMPLEMENTED):
            _fail(f"the operator API is refused ({err.message}); on Temporal Cloud run: {cloud}")
        _fail(f"registering search attributes failed: {err.message}")


@cli.group()
def temporal() -> None:
    """The Temporal namespace the service runs in (talks to Temporal with NHI_TEMPORAL_*)."""


@temporal.command("setup")
def temporal_setup() -> None:
    """Register the NHI search attributes in the namespace (safe to run again)."""
    for line in _temporal(
        lambda client, s: register_search_attributes(client, s.temporal_namespace)
    ):
        click.echo(line)


# ---- activity and findings (issue 17) -------------------------------------------------------
FINDING_COLUMNS = ["id", "severity", "kind", "nhi_id", "occurred_at", "summary", "acked_by"]
IMPORT_COLUMNS = [
    "file_count",
    "failed_files",
    "events",
    "new",
    "duplicates",
    "unmatched",
    "findings",
]


@cli.group()
def activity() -> None:
    """Import NHI activity (CloudTrail, Postgres csvlog) and judge it against baselines."""


@activity.command("import")
@click.argument("location")
@click.option("--no-wait", is_flag=True, help="Return once the import has started.")
@pass_ctx
def activity_import(ctx: Ctx, location: str, no_wait: bool) -> None:
    """Import log files from s3://bucket/prefix (or, in dev mode, a path on the worker)."""
    started = ctx.api.call("POST", "/v1/activity/imports", json={"location": location})
    if no_wait:
        ctx.emit(started, ["workflow_id"])
        return
    deadline = time.monotonic() + 3600
    current = ctx.api.call("GET", f"/v1/activity/imports/{started['workflow_id']}")
    while current["status"] == "running":
        if time.monotonic() > deadline:
            _fail(f"import {started['workflow_id']} still running")
        time.sleep(1)
        current = ctx.api.call("GET", f"/v1/activity/imports/{started['workflow_id']}")
    outcome = current.get("outcome")
    if current["status"] != "completed" or outcome is None:
        _fail(f"import {started['workflow_id']} {current['status']}")
    if ctx.as_json:
        ctx.emit(outcome)
        return
    ctx.emit(outcome, IMPORT_COLUMNS)
    for f in outcome["files"]:
        if f["error"]:
            click.echo(f"FAILED {f['name']}: {f['error']}", err=True)
    if outcome["failed_files"]:
        raise SystemExit(1)


@cli.group(invoke_without_command=True)
@click.option("--agent", default=None, help="Only this agent's findings (its id).")
@click.option("--since", default=None, help="ISO 8601 time with a timezone.")
@click.option("--severity", default=None, type=click.Choice(["low", "medium", "high", "critical"]))
@click.option("--limit", default=100, show_default=True, type=int)
@click.pass_context
def findings(
    click_ctx: click.Context,
    agent: str | None,
    since: str | None,
    severity: str | None,
    limit: int,
) -> None:
    """Activity findings, newest first; `nhi findings ack ID --reason ...` acknowledges one."""
    if click_ctx.invoked_subcommand is not None:
        return
    ctx: Ctx = click_ctx.obj
    params: dict[str, str | int] = {"limit": limit}
    for key, value in (("agent", agent), ("since", since), ("severity", severity)):
        if value is not None:
            params[key] = value
    ctx.emit(ctx.api.call("GET", "/v1/findings", params=params), FINDING_COLUMNS)


@findings.command("ack")
@click.argument("finding_id")
@click.option("--reason", required=True, help="Why it needs nothing more (audited).")
@pass_ctx
def findings_ack(ctx: Ctx, finding_id: str, reason: str) -> None:
    """Acknowledge a finding (security or admin)."""
    body = {"reason": reason}
    ctx.emit(ctx.api.call("POST", f"/v1/findings/{finding_id}/ack", json=body), FINDING_COLUMNS)


# ---- operations -----------------------------------------------------------------------------
@cli.command()
def migrate() -> None:
    """Apply database migrations to NHI_DATABASE_URL (a deploy step before API and workers)."""
    from nhi.infra.db import upgrade_head

    try:
        url = get_settings().require_database_url()
    except RuntimeError as err:
        _fail(str(err))
    upgrade_head(url)
    click.echo("database at head")


@cli.command()
def dev() -> None:
    """Run the whole service locally: Temporal dev server, Postgres, moto, worker and API."""
    from nhi.dev import run_dev

    raise SystemExit(run_dev(get_settings()))


def main() -> None:
    """Console-script entry: one-line errors and exit code 1 on any bad input."""
    code = _run()
    if _temporal_used:
        # The Temporal client's runtime threads can outlive the interpreter's teardown and
        # abort it after the command succeeded ("PyGILState_Release ... finalizing", exit
        # -6; temporalio/sdk-python#300): after a command that used Temporal, leave without
        # the teardown, the output flushed first.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _run() -> int:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as err:
        click.echo(f"error: {' '.join(err.format_message().split())}", err=True)
        return 1
    except click.exceptions.Exit as err:
        return err.exit_code
    except SystemExit as err:
        if err.code is None or isinstance(err.code, int):
            return err.code or 0
        click.echo(str(err.code), err=True)
        return 1
    return 0
