"""Slack message content for renewal prompts: pure functions, no I/O.

Button values carry only the prompt id; who may answer is decided server-side from the
inventory, never from anything in the payload.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from models.contracts import PromptAnswerKind, PromptKind, PromptMessage


class PromptAction(StrEnum):
    """`action_id`s of the prompt buttons."""

    RENEW = "nhi_renew"
    LET_EXPIRE = "nhi_let_expire"
    DECOMMISSION_NOW = "nhi_decommission_now"


ANSWER_OF_ACTION = {
    PromptAction.RENEW: PromptAnswerKind.RENEW,
    PromptAction.LET_EXPIRE: PromptAnswerKind.LET_EXPIRE,
    PromptAction.DECOMMISSION_NOW: PromptAnswerKind.DECOMMISSION_NOW,
}
ANSWER_WORDS = {
    PromptAnswerKind.RENEW: "renewed",
    PromptAnswerKind.LET_EXPIRE: "chose to let it expire",
    PromptAnswerKind.DECOMMISSION_NOW: "decommissioned it now",
}


def _when(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC")


def prompt_text(msg: PromptMessage) -> str:
    """Plain-text version (notification text, the dev-mode log, `nhi prompts`)."""
    lead = (
        "Escalation: no answer from the owner"
        if msg.kind is PromptKind.ESCALATION
        else "Renewal needed"
    )
    reason = f" ({msg.reason})" if msg.reason else ""
    return (
        f"{lead}{reason}. {msg.nhi_kind} {msg.nhi_name} of agent {msg.agent_name} "
        f"({msg.environment}, owner {msg.owner_email}) expires {_when(msg.expires_at)}. "
        f"Scope: {msg.scope_summary}."
    )


def button_value(prompt_id: uuid.UUID) -> str:
    """The JSON a button carries back."""
    return json.dumps({"prompt_id": str(prompt_id)})


def parse_button_value(value: str) -> uuid.UUID:
    """The prompt id from a button value; ValueError if it is not ours."""
    data = json.loads(value)
    if not isinstance(data, dict) or "prompt_id" not in data:
        raise ValueError("not a prompt button")
    return uuid.UUID(str(data["prompt_id"]))


def prompt_blocks(msg: PromptMessage) -> list[dict[str, Any]]:
    """Section with the facts, then Renew / Let expire / Decommission now."""
    value = button_value(msg.prompt_id)
    fields = [
        f"*Agent*\n{msg.agent_name} ({msg.environment})",
        f"*Identity*\n{msg.nhi_kind} `{msg.nhi_name}`",
        f"*Expires*\n{_when(msg.expires_at)}",
        f"*Owner*\n{msg.owner_email}",
    ]
    title = (
        ":rotating_light: *Escalation*: the owner has not answered"
        if msg.kind is PromptKind.ESCALATION
        else ":hourglass: *An AI agent's identity is about to expire*"
    )
    if msg.reason:
        title += f" ({msg.reason})"
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": title}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields]},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*Scope*: {msg.scope_summary}"}},
        {
            "type": "actions",
            "block_id": f"prompt-{msg.prompt_id}",
            "elements": [
                {
                    "type": "button",
                    "action_id": PromptAction.RENEW.value,
                    "text": {"type": "plain_text", "text": "Renew"},
                    "style": "primary",
                    "value": value,
                },
                {
                    "type": "button",
                    "action_id": PromptAction.LET_EXPIRE.value,
                    "text": {"type": "plain_text", "text": "Let expire"},
                    "value": value,
                },
                {
                    "type": "button",
                    "action_id": PromptAction.DECOMMISSION_NOW.value,
                    "text": {"type": "plain_text", "text": "Decommission now"},
                    "style": "danger",
                    "value": value,
                    "confirm": {
                        "title": {"type": "plain_text", "text": "Decommission now?"},
                        "text": {
                            "type": "plain_text",
                            "text": "The credential stops working now and is deleted "
                            "after the grace period.",
                        },
                        "confirm": {"type": "plain_text", "text": "Decommission"},
                        "deny": {"type": "plain_text", "text": "Cancel"},
                    },
                },
            ],
        },
    ]


def decided_text(nhi_name: str, answer: str, actor: str, at: datetime) -> str:
    """What a prompt shows once someone has decided."""
    try:
        words = ANSWER_WORDS[PromptAnswerKind(answer)]
    except ValueError:
        words = answer
    return f"{nhi_name}: {actor} {words} at {_when(at)}."


def decided_blocks(text: str) -> list[dict[str, Any]]:
    """The decided message: the decision, no buttons."""
    return [{"type": "section", "text": {"type": "mrkdwn", "text": f":white_check_mark: {text}"}}]


def scope_summary(scope: list[dict[str, Any]], limit: int = 300) -> str:
    """`s3:GetObject on arn:...; ...`, shortened for a message."""
    parts = [
        f"{', '.join(s.get('actions', []))} on {', '.join(s.get('resources', []))}" for s in scope
    ]
    text = "; ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"
