"""Task credentials: `POST /v1/nhis/{id}/credentials` issues one, shown once.

Issuance runs here, in the API process, synchronously against the platform (issue 15: off the
workflow path); see nhi/services/task_credentials.py for the rules and the order of writes.
The response is the only place the credential ever appears: `Cache-Control: no-store`, and the
Idempotency-Key middleware keeps only that the key was used (api/idempotency.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, StringConstraints

from activities.providers.registry import build_task_providers
from api.deps import AppState, principal_of
from api.idempotency import IdempotencyKeyHeader
from models.enums import PLATFORM_OF, Platform
from models.schemas import Body, Duration, Scope
from nhi.infra.aws_clients import make_aws_clients
from nhi.rules.task_credentials import (
    TASK_ID_RE,
    IssuedCredential,
    TaskGrant,
    session_tags,
    source_identity,
)
from nhi.services import task_credentials
from nhi.services.auth import (
    TOKEN_PREFIX,
    Principal,
    cached_principal_from_token,
    hash_token,
    principal_cache,
)
from nhi.services.target_registry import TargetRegistry

T = TypeVar("T")


# Issues run here, off the event loop: a plain executor is a cheaper hop than anyio's
# worker threads (no cancel-scope checkpoints, no capacity limiter), measured on this path.
_ISSUING = ThreadPoolExecutor(max_workers=32, thread_name_prefix="nhi-issue")


async def _off_loop(call: Callable[[], T]) -> T:
    """`call` on an issuing thread, in a copy of this context (request id, trace)."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_ISSUING, context.run, call)


async def _app_state(request: Request) -> AppState:
    """`api.deps.State` without its worker-thread hop (FastAPI runs a sync dependency on a
    worker thread: two thread switches per request on the issuing path)."""
    state: AppState = request.app.state.nhi
    return state


AppStateHere = Annotated[AppState, Depends(_app_state)]


async def _caller(request: Request, state: AppStateHere) -> Principal:
    """The caller, as every route authenticates it, except that an `nhi_` token's principal
    is reused for up to `auth.PRINCIPAL_CACHE_S` (issuance is the hot path of agents asking
    for a credential per task; see nhi/services/auth.py for what that means for revocation)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token.startswith(TOKEN_PREFIX):
        found = principal_cache.get(hash_token(token))
        if found is not None:
            return found  # no thread hop, no database
        return await run_in_threadpool(cached_principal_from_token, state.sessions, token)
    return await run_in_threadpool(principal_of, request, state)


Caller = Annotated[Principal, Depends(_caller)]
router = APIRouter(prefix="/v1/nhis", tags=["credentials"], dependencies=[Depends(_caller)])

TaskId = Annotated[str, StringConstraints(pattern=TASK_ID_RE.pattern)]


class TaskCredentialIn(Body):
    """A task credential: how long (at most the policy's `task_credential_max_ttl`), for
    which task, and optionally a narrower scope than the NHI's."""

    ttl: Duration | None = Field(
        default=None, description="e.g. 15m, 1h or 900 (seconds); default 15m."
    )
    task_id: TaskId | None = Field(
        default=None, description="The agent's task (session tags and the audit trail name it)."
    )
    scope: list[Scope] | None = Field(
        default=None,
        min_length=1,
        max_length=20,
        description="Statements narrowing the NHI's scope (never widening it).",
    )


class PostgresTaskSecret(BaseModel):
    """A Postgres login for the task (RDS-style, as delivered secrets are)."""

    username: str
    password: str
    host: str
    port: int
    dbname: str
    sslmode: str
    dsn: str = Field(description="Without the password.")


class AwsTaskSecret(BaseModel):
    """STS session credentials, in the shape of a `credential_process` answer."""

    AccessKeyId: str
    SecretAccessKey: str
    SessionToken: str
    Expiration: str
    AssumedRoleArn: str
    SourceIdentity: str
    SessionTags: dict[str, str]


class GithubTaskSecret(BaseModel):
    """An installation token narrowed to one repository (`Authorization: Bearer <token>`)."""

    token: str
    expires_at: str = Field(description="GitHub's own expiry of the token (one hour).")
    repository: str
    permissions: dict[str, str]
    api_url: str


class TaskCredentialIssued(BaseModel):
    """The credential itself, shown this once and never again."""

    id: uuid.UUID
    nhi_id: uuid.UUID
    agent_id: uuid.UUID
    platform: Platform
    name: str = Field(description="The Postgres login role or the STS session name.")
    task_id: str | None
    ttl_seconds: int
    expires_at: datetime
    scope: list[dict[str, Any]] | None
    postgres: PostgresTaskSecret | None = None
    aws: AwsTaskSecret | None = None
    github: GithubTaskSecret | None = None


def _issuers(state: AppState) -> task_credentials.IssuerFor:
    """The platform issuers, built once per app from the same factories the worker uses."""
    if state.task_issuers is None:
        aws = make_aws_clients(state.settings)
        targets = TargetRegistry(state.sessions, state.settings, aws.secrets)
        state.task_issuers = build_task_providers(aws, targets, state.settings)
    issuers = state.task_issuers
    return issuers.__getitem__


def _answer(grant: TaskGrant, platform: Platform, issued: IssuedCredential) -> TaskCredentialIssued:
    secret, public = issued.secret, issued.public
    out = TaskCredentialIssued(
        id=grant.credential_id,
        nhi_id=grant.nhi_id,
        agent_id=grant.agent_id,
        platform=platform,
        name=grant.name,
        task_id=grant.task_id,
        ttl_seconds=grant.ttl_seconds,
        expires_at=issued.expires_at,
        scope=None if grant.scope is None else [s.model_dump() for s in grant.scope],
    )
    if platform is Platform.POSTGRES:
        out.postgres = PostgresTaskSecret.model_validate({**public, **secret})
    elif platform is Platform.GITHUB:
        permissions = public["permissions"]
        out.github = GithubTaskSecret(
            token=str(secret["token"]),
            expires_at=str(public["github_expires_at"]),
            repository=str(public["repository"]),
            permissions=(
                {str(k): str(v) for k, v in permissions.items()}
                if isinstance(permissions, dict)
                else {}
            ),
            api_url=str(public["api_url"]),
        )
    else:
        out.aws = AwsTaskSecret(
            AccessKeyId=str(secret["access_key_id"]),
            SecretAccessKey=str(secret["secret_access_key"]),
            SessionToken=str(secret["session_token"]),
            Expiration=str(public["expiration"]),
            AssumedRoleArn=str(public["assumed_role_arn"]),
            SourceIdentity=source_identity(grant.agent_id),
            SessionTags=session_tags(grant),
        )
    return out


@router.post(
    "/{nhi_id}/credentials",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskCredentialIssued,
    responses={
        502: {"description": "The platform refused or failed; nothing usable was left behind."}
    },
)
async def issue_task_credential(
    nhi_id: uuid.UUID,
    body: TaskCredentialIn,
    state: AppStateHere,
    p: Caller,
    _key: IdempotencyKeyHeader = None,
) -> Response:
    """Issue a short-lived credential from an active NHI for one task of its agent (the
    agent's own `agent` token, or its owner). The response is the only time it is shown; a
    retry with the same Idempotency-Key is refused (409), never answered with it again."""
    request = task_credentials.TaskRequest(ttl=body.ttl, task_id=body.task_id, scope=body.scope)
    issuers = _issuers(state)
    try:
        grant, issued = await _off_loop(
            partial(task_credentials.issue, state.sessions, p, nhi_id, request, issuers)
        )
    except task_credentials.IssueFailed as err:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(err)) from None
    answer = _answer(grant, PLATFORM_OF[grant.kind], issued)
    # Returned as built (the model above is the documented schema): FastAPI would otherwise
    # validate and serialize it a second time on every issue.
    return Response(
        answer.model_dump_json(),
        status_code=status.HTTP_201_CREATED,
        media_type="application/json",
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )
