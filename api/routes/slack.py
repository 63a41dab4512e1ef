"""`POST /slack/interactions`: owners' button clicks on renewal prompts, and approvers'
Approve / Deny clicks (Deny's reason comes back from a modal) on approval requests.

The signature is checked over the raw body before anything is parsed; the request is answered
at once (Slack allows 3 seconds) and the decision goes to the workflow afterwards, with an
update id derived from the click so a redelivered request is applied once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs

from fastapi import APIRouter, BackgroundTasks, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from slack_sdk.errors import SlackApiError
from temporalio.service import RPCError

from api.deps import AppState, State, TemporalUnavailable
from api.errors import LifecycleNotReady, documented
from api.routes import approvals as approvals_api
from api.routes.lifecycle import STILL_RUNNING, send_update, temporal_client
from models.contracts import PromptAnswer, PromptAnswerKind
from models.orm import Prompt
from nhi.infra.db import transaction
from nhi.rules.ids import lifecycle_workflow_id, slack_answer_update_id
from nhi.rules.slack_messages import (
    ANSWER_OF_ACTION,
    DENY_REASON_BLOCK,
    DENY_REASON_INPUT,
    ApprovalAction,
    PromptAction,
    deny_modal,
    parse_approval_value,
    parse_button_value,
)
from nhi.services import prompts
from nhi.services.errors import Conflict, Forbidden, PolicyViolation
from workflows.lifecycle import NhiLifecycleWorkflow

log = logging.getLogger(__name__)
router = APIRouter(tags=["slack"])


# Slack's own rule: a request signed more than five minutes ago is a replay.
MAX_SKEW_SECONDS = 300
_TIMESTAMP_RE = re.compile(rb"^[0-9]{1,12}$")
_SIGNATURE_RE = re.compile(rb"^v0=[0-9a-f]{64}$")
MAX_BODY_BYTES = 64 * 1024


def _refuse(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def _header(request: Request, name: str) -> bytes | None:
    # Raw bytes: a header that is not ASCII is refused, never decoded.
    values = [v for k, v in request.scope["headers"] if k == name.encode()]
    return values[0] if len(values) == 1 else None


def _signed(secret: str, request: Request, body: bytes) -> bool:
    """Slack's v0 signature over the raw bytes, checked before anything is parsed or decoded."""
    timestamp = _header(request, "x-slack-request-timestamp")
    signature = _header(request, "x-slack-signature")
    if timestamp is None or signature is None:
        return False
    if not _TIMESTAMP_RE.fullmatch(timestamp) or not _SIGNATURE_RE.fullmatch(signature):
        return False
    if abs(time.time() - int(timestamp)) > MAX_SKEW_SECONDS:
        return False
    expected = hmac.new(secret.encode(), b"v0:" + timestamp + b":" + body, hashlib.sha256)
    return hmac.compare_digest(b"v0=" + expected.hexdigest().encode(), signature)


class _NotOurs(ValueError):
    """A signed request that is not a renewal prompt action."""


def _action(body: bytes) -> tuple[PromptAnswerKind, uuid.UUID, str, str, str] | None:
    """The click in a signed interaction payload; None for payloads that are not clicks.

    Raises _NotOurs for anything malformed: wrong shapes and types are a 400, never a 500."""
    try:
        form = parse_qs(body.decode("utf-8"), strict_parsing=False, max_num_fields=10)
        payload = json.loads(form["payload"][0])
    except (KeyError, IndexError, ValueError, RecursionError) as err:
        raise _NotOurs("payload: not form-encoded JSON") from err
    if not isinstance(payload, dict):
        raise _NotOurs("payload: not a JSON object")
    if payload.get("type") != "block_actions":
        return None
    actions, user, channel = payload.get("actions"), payload.get("user"), payload.get("channel")
    if not isinstance(actions, list) or not actions or not isinstance(actions[0], dict):
        raise _NotOurs("payload.actions: not a list of actions")
    action = actions[0]
    if not isinstance(user, dict) or not isinstance(user.get("id"), str):
        raise _NotOurs("payload.user.id: missing")
    action_id, value = action.get("action_id"), action.get("value")
    if not isinstance(action_id, str) or not isinstance(value, str):
        raise _NotOurs("payload.actions[0]: no action_id or value")
    try:
        answer = ANSWER_OF_ACTION[PromptAction(action_id)]
        prompt_id = parse_button_value(value)
    except (KeyError, ValueError, TypeError, RecursionError) as err:
        raise _NotOurs("payload.actions[0]: not a renewal prompt button") from err
    click = action.get("action_ts") or payload.get("trigger_id") or ""
    channel_id = channel.get("id") if isinstance(channel, dict) else ""
    if not isinstance(click, str) or not isinstance(channel_id, str | None):
        raise _NotOurs("payload: action_ts or channel of the wrong type")
    user_id = str(user["id"])
    if not user_id.isprintable() or len(user_id) > 64 or len(click) > 64:
        raise _NotOurs("payload.user.id: not a Slack id")
    return answer, prompt_id, user_id, click, channel_id or ""


# Signed by Slack, not a bearer token: 401 for a bad signature, 400 for a signed payload that is
# not a prompt action, 404 while no signing secret is configured (api/errors.py documents them).
@router.post("/slack/interactions", responses=documented(400, 401, 404))
async def interactions(request: Request, background: BackgroundTasks, state: State) -> Response:
    """Verify, acknowledge, and hand the decision to the NHI's lifecycle workflow.

    Authentication comes first: an unsigned, stale or malformed request (bad timestamp,
    non-ASCII signature, body that is not what was signed) is a 401 before anything is parsed.
    A signed payload that is not a renewal prompt action is a 400."""
    secret = state.settings.slack_signing_secret
    if secret is None:
        return _refuse(404, "Slack is not configured (NHI_SLACK_SIGNING_SECRET)")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES or not _signed(secret.get_secret_value(), request, body):
        return _refuse(401, "invalid Slack signature or stale timestamp")
    try:
        approval = _approval_event(body)
        if approval is not None:
            background.add_task(_on_approval, state, approval)
            return Response(status_code=200)
        click = _action(body)
    except _NotOurs as err:
        return _refuse(400, str(err))
    if click is None:
        return Response(status_code=200)
    answer, prompt_id, user_id, click_ts, channel = click
    background.add_task(_decide, state, prompt_id, answer.value, user_id, click_ts, channel)
    return Response(status_code=200)


@dataclass(frozen=True)
class _ApprovalEvent:
    """An Approve or Deny click on an approval message, or a submitted Deny modal."""

    action: ApprovalAction
    approval_id: uuid.UUID
    user_id: str
    click: str
    channel: str
    trigger_id: str = ""
    reason: str = ""


def _str(value: object, name: str, limit: int = 64) -> str:
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise _NotOurs(f"{name}: missing or not a Slack value")
    return value


def _approval_event(body: bytes) -> _ApprovalEvent | None:
    """The approval click or Deny submission in a signed payload; None for anything else
    (renewal prompt clicks go on to `_action`). Raises _NotOurs for a malformed one."""
    try:
        form = parse_qs(body.decode("utf-8"), strict_parsing=False, max_num_fields=10)
        payload = json.loads(form["payload"][0])
    except (KeyError, IndexError, ValueError, RecursionError) as err:
        raise _NotOurs("payload: not form-encoded JSON") from err
    if not isinstance(payload, dict):
        raise _NotOurs("payload: not a JSON object")
    user = payload.get("user")
    if payload.get("type") == "view_submission":
        view = payload.get("view")
        if not isinstance(view, dict) or view.get("callback_id") != ApprovalAction.DENY_MODAL:
            return None
        if not isinstance(user, dict):
            raise _NotOurs("payload.user.id: missing")
        try:
            meta = json.loads(_str(view.get("private_metadata"), "view.private_metadata", 400))
            approval_id = parse_approval_value(json.dumps(meta))
            reason = view["state"]["values"][DENY_REASON_BLOCK][DENY_REASON_INPUT]["value"]
        except (KeyError, TypeError, ValueError, RecursionError) as err:
            raise _NotOurs("payload.view: not the Deny reason modal") from err
        if not isinstance(reason, str) or not reason.strip():
            raise _NotOurs("payload.view: the reason is empty")
        channel = meta.get("channel") if isinstance(meta.get("channel"), str) else ""
        return _ApprovalEvent(
            action=ApprovalAction.DENY_MODAL,
            approval_id=approval_id,
            user_id=_str(user.get("id"), "payload.user.id"),
            click=_str(view.get("id", ""), "payload.view.id"),
            channel=channel,
            reason=reason.strip()[:2000],
        )
    if payload.get("type") != "block_actions":
        return None
    actions = payload.get("actions")
    if not isinstance(actions, list) or not actions or not isinstance(actions[0], dict):
        return None  # `_action` says what is wrong
    try:
        action = ApprovalAction(str(actions[0].get("action_id")))
    except ValueError:
        return None
    if not isinstance(user, dict):
        raise _NotOurs("payload.user.id: missing")
    try:
        approval_id = parse_approval_value(_str(actions[0].get("value"), "value", 200))
    except (ValueError, TypeError, RecursionError) as err:
        raise _NotOurs("payload.actions[0]: not an approval button") from err
    channel = payload.get("channel")
    channel_id = channel.get("id") if isinstance(channel, dict) else ""
    return _ApprovalEvent(
        action=action,
        approval_id=approval_id,
        user_id=_str(user.get("id"), "payload.user.id"),
        click=_str(actions[0].get("action_ts") or payload.get("trigger_id") or "", "action_ts"),
        channel=channel_id if isinstance(channel_id, str) else "",
        trigger_id=str(payload.get("trigger_id") or "")[:200],
    )


async def _on_approval(state: AppState, event: _ApprovalEvent) -> None:
    """Approve: decide now. Deny: ask for the reason in a modal (only of someone who may
    decide), then decide when it is submitted."""
    if event.action is ApprovalAction.DENY:
        refused = await run_in_threadpool(
            approvals_api.may_decide_in_slack, state, event.approval_id, event.user_id
        )
        if refused is not None:
            await run_in_threadpool(
                approvals_api.tell, state, event.channel, event.user_id, f"Not applied: {refused}"
            )
            return
        if state.slack is not None:
            try:
                await run_in_threadpool(
                    lambda: state.slack.views_open(  # type: ignore[union-attr]
                        trigger_id=event.trigger_id,
                        view=deny_modal(event.approval_id, event.channel),
                    )
                )
            except SlackApiError as err:
                log.warning("deny modal not opened: %s", err.response.get("error"))
        return
    approve = event.action is ApprovalAction.APPROVE
    await approvals_api.decide_slack(
        state,
        event.approval_id,
        approve,
        event.user_id,
        event.click,
        event.channel,
        "approved in Slack" if approve else event.reason,
    )


def _email_of(state: AppState, prompt: Prompt, user_id: str) -> str | None:
    for delivery in prompt.deliveries:
        if delivery.get("slack_user_id") == user_id and delivery.get("email"):
            return str(delivery["email"]).lower()
    if state.slack is None:
        return None
    # A click in the team channel: the person is whoever Slack says this user is.
    try:
        profile = state.slack.users_info(user=user_id)["user"].get("profile", {})
    except SlackApiError:
        return None
    email = profile.get("email")
    return str(email).lower() if email else None


def _who_may_answer(
    state: AppState, prompt_id: uuid.UUID, user_id: str
) -> tuple[Prompt, str | None, bool]:
    """The prompt, the clicker's email, and whether they may answer (NotFound, a LookupError,
    for an unknown prompt)."""
    with transaction(state.sessions) as session:
        prompt = prompts.get_prompt(session, prompt_id)
        email = _email_of(state, prompt, user_id)
        permitted = email is not None and prompts.may_answer(session, prompt, email, user_id)
        return prompt, email, permitted


def _ephemeral(state: AppState, channel: str, user_id: str, text: str) -> None:
    if state.slack is None or not channel:
        return
    try:
        state.slack.chat_postEphemeral(channel=channel, user=user_id, text=text)
    except SlackApiError as err:
        log.warning("could not tell %s: %s", user_id, err.response.get("error"))


async def _decide(
    state: AppState, prompt_id: uuid.UUID, answer: str, user_id: str, click: str, channel: str
) -> None:
    try:
        prompt, email, permitted = await run_in_threadpool(
            _who_may_answer, state, prompt_id, user_id
        )
    except LookupError:
        await run_in_threadpool(
            _ephemeral, state, channel, user_id, "This prompt is no longer known."
        )
        return
    if not permitted or email is None:
        await run_in_threadpool(
            _ephemeral, state, channel, user_id,
            "Only the agent's owner or backup owner can answer this prompt. "
            "Your attempt was recorded.",
        )  # fmt: skip
        return
    request = PromptAnswer(
        actor=email,
        channel="slack",
        reason="answered in Slack",
        prompt_id=prompt_id,
        answer=PromptAnswerKind(answer),
    )
    try:
        client = await temporal_client(state)
        handle = client.get_workflow_handle_for(
            NhiLifecycleWorkflow.run, lifecycle_workflow_id(prompt.nhi_id)
        )
        # Same deadline as the API: a click the lifecycle could not take in time (worker down)
        # is told "not applied" and is never applied behind the owner's back later.
        result = await send_update(
            state,
            handle,
            NhiLifecycleWorkflow.answer,
            lambda not_after: request.model_copy(update={"not_after": not_after}),
            update_id=slack_answer_update_id(prompt_id, user_id, click),
        )
    except (Forbidden, Conflict, PolicyViolation, LifecycleNotReady) as err:
        # The lifecycle refused the answer (api.errors.refusal): tell the person why.
        await run_in_threadpool(_ephemeral, state, channel, user_id, f"Not applied: {err}")
        return
    except (RPCError, TemporalUnavailable) as err:
        log.error("decision on prompt %s not delivered: %s", prompt_id, err)
        await run_in_threadpool(
            _ephemeral, state, channel, user_id, "Not applied: try again shortly."
        )
        return
    if isinstance(result, JSONResponse):  # accepted, still running (202)
        await run_in_threadpool(
            _ephemeral, state, channel, user_id, f"Not applied: {STILL_RUNNING}"
        )
