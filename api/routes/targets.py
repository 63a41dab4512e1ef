"""Postgres targets: the databases `postgres_role` NHIs are created in (admin registers them).

A target is where the worker sends an admin password, so registering one is checked against
the rules in `nhi.services.target_registry` (allowed hosts, password sources, TLS), and
every registration or removal is audited and alerted to the security channel.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, status
from fastapi.concurrency import run_in_threadpool

from api.deps import AppState, CurrentPrincipal, SessionDep, State, authenticated
from models.enums import Role
from models.schemas import TargetIn, TargetName, TargetOut
from nhi.rules.targets import parse_dsn, password_ref
from nhi.services import targets
from nhi.services.auth import require_role
from nhi.services.target_registry import TargetSpec, check_target

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/targets", tags=["targets"], dependencies=[authenticated])


def _alert(state: AppState, text: str) -> None:
    """Tell the security channel, through the service's Slack client; without Slack (as in
    `nhi dev`) the log is the channel. A lost alert never undoes the committed change."""
    channel = state.settings.slack_security_channel
    if state.slack is None:
        log.warning("ALERT to %s: %s", channel, text)
        return
    try:
        state.slack.chat_postMessage(channel=channel, text=text)
    except Exception:
        log.exception("ALERT to %s could not be posted: %s", channel, text)


def _describe(spec: TargetSpec) -> str:
    return (
        f"{spec.dsn} (admin password from {spec.password_ref}, sslmode {spec.sslmode}, "
        f"at most {spec.connection_limit} connections)"
    )


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TargetOut)
async def add_target(body: TargetIn, state: State, p: CurrentPrincipal) -> TargetOut:
    """Register a target (admin role). The DSN carries no password: `password_env` (a variable
    named `NHI_TARGET_PASSWORD_*`) or `password_secret` (under `NHI_TARGET_SECRET_PREFIX`) says
    where the worker finds it; the host must match `NHI_TARGET_ALLOWED_HOSTS`, and `sslmode`
    is `verify-full` (the default) outside dev mode."""
    require_role(p, Role.ADMIN)
    settings = state.settings
    if "sslmode" not in body.model_fields_set:
        # Verified TLS unless asked otherwise; dev mode keeps libpq's lenient default.
        body = body.model_copy(update={"sslmode": "prefer" if settings.dev_mode else "verify-full"})
    parsed = parse_dsn(body.dsn)
    ref = password_ref(body.password_env, body.password_secret)
    check_target(settings, parsed.host, ref, body.sslmode)
    actor = p.actor
    spec = await state.db(lambda s: targets.add_target(s, settings, body, actor))
    await run_in_threadpool(
        _alert, state, f"Postgres target {spec.name} registered by {actor}: {_describe(spec)}"
    )
    return TargetOut.model_validate(spec)


@router.get("", response_model=list[TargetOut])
def list_targets(session: SessionDep, state: State, p: CurrentPrincipal) -> list[TargetOut]:
    """Every target, registered here or in settings (platform, security, auditor, admin)."""
    require_role(p, Role.PLATFORM, Role.SECURITY, Role.AUDITOR, Role.ADMIN)
    return [TargetOut.model_validate(t) for t in targets.list_targets(session, state.settings)]


@router.delete("/{name}", response_model=TargetOut)
async def remove_target(name: TargetName, state: State, p: CurrentPrincipal) -> TargetOut:
    """Remove a target no living NHI uses (admin role); targets from settings stay."""
    require_role(p, Role.ADMIN)
    actor = p.actor
    spec = await state.db(lambda s: targets.remove_target(s, state.settings, name, actor))
    await run_in_threadpool(
        _alert, state, f"Postgres target {spec.name} removed by {actor}: {_describe(spec)}"
    )
    return TargetOut.model_validate(spec)
