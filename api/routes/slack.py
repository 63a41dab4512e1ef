"""`POST /slack/interactions`: owners' button clicks on renewal prompts.

The signature is checked over the raw body before anything is parsed; the request is answered
at once (Slack allows 3 seconds) and the decision goes to the workflow afterwards, with an
update id derived from the click so a redelivered request is applied once.
"""

from __future__ import annotations

import json
import logging
import uuid
from urllib.parse import parse_qs

from fastapi import APIRouter, BackgroundTasks, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from api.deps import AppState, State
from models.contracts import PromptAnswer, PromptAnswerKind
from models.orm import Agent, Nhi, Prompt
from nhi import audit
from nhi.db import transaction
from nhi.slack_messages import ANSWER_OF_ACTION, PromptAction, parse_button_value
from workflows.lifecycle import NhiLifecycleWorkflow, lifecycle_workflow_id

log = logging.getLogger(__name__)
router = APIRouter(tags=["slack"])


def _refuse(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


@router.post("/slack/interactions", include_in_schema=True)
async def interactions(request: Request, background: BackgroundTasks, state: State) -> Response:
    """Verify, acknowledge, and hand the decision to the NHI's lifecycle workflow."""
    secret = state.settings.slack_signing_secret
    if secret is None:
        return _refuse(404, "Slack is not configured (NHI_SLACK_SIGNING_SECRET)")
    body = await request.body()
    if not SignatureVerifier(secret.get_secret_value()).is_valid_request(
        body, dict(request.headers)
    ):
        return _refuse(401, "invalid Slack signature or stale timestamp")
    try:
        payload = json.loads(parse_qs(body.decode())["payload"][0])
        if payload.get("type") != "block_actions":
            return Response(status_code=200)
        action = payload["actions"][0]
        answer = ANSWER_OF_ACTION[PromptAction(action["action_id"])]
        prompt_id = parse_button_value(action["value"])
        user_id = str(payload["user"]["id"])
        click = str(action.get("action_ts") or payload.get("trigger_id") or "")
        channel = str((payload.get("channel") or {}).get("id") or "")
    except (KeyError, IndexError, ValueError, TypeError):
        return _refuse(400, "payload: not a renewal prompt action")
    background.add_task(_decide, state, prompt_id, answer.value, user_id, click, channel)
    return Response(status_code=200)


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
    with transaction(state.sessions) as session:
        prompt = session.get(Prompt, prompt_id)
        if prompt is None:
            raise LookupError(prompt_id)
        nhi = session.get_one(Nhi, prompt.nhi_id)
        agent = session.get_one(Agent, nhi.agent_id)
        allowed = {agent.owner_email.lower()} | (
            {agent.backup_owner_email.lower()} if agent.backup_owner_email else set()
        )
        email = _email_of(state, prompt, user_id)
        permitted = email is not None and email in allowed
        if not permitted:
            audit.record(
                session,
                subject_type="nhi",
                subject_id=nhi.id,
                event="nhi.decision_refused",
                actor=f"slack:{email or user_id}",
                reason="only the owner or backup owner may answer a renewal prompt",
                details={"prompt_id": str(prompt_id), "slack_user_id": user_id},
            )
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
        client = await state.temporal()
        handle = client.get_workflow_handle_for(
            NhiLifecycleWorkflow.run, lifecycle_workflow_id(prompt.nhi_id)
        )
        await handle.execute_update(
            NhiLifecycleWorkflow.answer, request, id=f"slack-{prompt_id}-{user_id}-{click}"
        )
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        text = cause.message if isinstance(cause, ApplicationError) else str(cause)
        await run_in_threadpool(_ephemeral, state, channel, user_id, f"Not applied: {text}")
    except RPCError as err:
        log.error("decision on prompt %s not delivered: %s", prompt_id, err.message)
        await run_in_threadpool(
            _ephemeral, state, channel, user_id, "Not applied: try again shortly."
        )
