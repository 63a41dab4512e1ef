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

from models.contracts import ApprovalMessage, PromptAnswerKind, PromptKind, PromptMessage


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


# --- approvals (issue 16) -----------------------------------------------------------------------


class ApprovalAction(StrEnum):
    """`action_id`s of the approval buttons, and the callback id of the Deny reason modal."""

    APPROVE = "nhi_approval_approve"
    DENY = "nhi_approval_deny"
    DENY_MODAL = "nhi_approval_deny_reason"


# The Deny modal's one input: its block and action ids.
DENY_REASON_BLOCK = "reason"
DENY_REASON_INPUT = "reason_input"
SENSITIVE_MARK = "⚠️"


def approval_value(approval_id: uuid.UUID) -> str:
    """The JSON an approval button (and the Deny modal's metadata) carries back."""
    return json.dumps({"approval_id": str(approval_id)})


def parse_approval_value(value: str) -> uuid.UUID:
    """The approval id from a button value or modal metadata; ValueError if it is not ours."""
    data = json.loads(value)
    if not isinstance(data, dict) or "approval_id" not in data:
        raise ValueError("not an approval button")
    return uuid.UUID(str(data["approval_id"]))


def mark_scope(scope: list[dict[str, Any]], sensitive: list[str]) -> list[str]:
    """One line per statement; each sensitive entry (as the policy's catalogue matched it)
    wrapped in the warning mark, so approvers see at once what makes the request sensitive."""
    flagged = {entry.lower() for entry in sensitive}
    lines = []
    for statement in scope:
        actions = [
            f"{SENSITIVE_MARK}*{a}*" if a.lower() in flagged else a
            for a in statement.get("actions", [])
        ]
        lines.append(f"{', '.join(actions)} on {', '.join(statement.get('resources', []))}")
    return lines


def approval_text(msg: ApprovalMessage) -> str:
    """Plain-text version (notification text and the dev-mode log)."""
    items = "; ".join(f"{i.label}: {' | '.join(i.scope)}" for i in msg.items)
    moved = f" Moved by: {', '.join(msg.moved)}." if msg.moved else ""
    return (
        f"Approval needed: agent {msg.agent_name} ({msg.environment}), requested by "
        f"{msg.requested_by}, owner {msg.owner_email}. {items}. Risk "
        f"{msg.risk_before} -> {msg.risk_after}.{moved}"
    )


def approval_blocks(msg: ApprovalMessage) -> list[dict[str, Any]]:
    """The facts, the scope with sensitive parts marked, the footprint change, and
    Approve / Deny (Deny opens a modal asking why)."""
    value = approval_value(msg.approval_id)
    needed = "two distinct approvers" if msg.approvals_required > 1 else "one approver"
    threshold = f" (threshold {msg.risk_threshold})" if msg.risk_threshold is not None else ""
    fields = [
        f"*Agent*\n{msg.agent_name} ({msg.environment})",
        f"*Requested by*\n{msg.requested_by}",
        f"*Owner*\n{msg.owner_email}",
        f"*Risk score*\n{msg.risk_before} → {msg.risk_after}{threshold}",
    ]
    scope = "\n".join(
        f"*{i.label}*\n" + "\n".join(f"• {line}" for line in i.scope) for i in msg.items
    )
    blocks: list[dict[str, Any]] = [
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": f":lock: *An AI agent asks for access that needs {needed}*",
            },
        },
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields]},
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": f"*Requested scope*\n{scope}"[:2900]},
        },
    ]
    if msg.moved:
        moved = "\n".join(f"• {m}" for m in msg.moved)
        blocks.append(
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"*What moves the score*\n{moved}"[:2900]},
            }
        )
    blocks.append(
        {
            "type": "actions",
            "block_id": f"approval-{msg.approval_id}",
            "elements": [
                {
                    "type": "button",
                    "action_id": ApprovalAction.APPROVE.value,
                    "text": {"type": "plain_text", "text": "Approve"},
                    "style": "primary",
                    "value": value,
                },
                {
                    "type": "button",
                    "action_id": ApprovalAction.DENY.value,
                    "text": {"type": "plain_text", "text": "Deny"},
                    "style": "danger",
                    "value": value,
                },
            ],
        }
    )
    return blocks


def deny_modal(approval_id: uuid.UUID, channel: str = "") -> dict[str, Any]:
    """The modal Deny opens: one required reason. Its metadata carries the approval id and
    the channel clicked in (where a refusal is told)."""
    return {
        "type": "modal",
        "callback_id": ApprovalAction.DENY_MODAL.value,
        "private_metadata": json.dumps({"approval_id": str(approval_id), "channel": channel}),
        "title": {"type": "plain_text", "text": "Deny the request"},
        "submit": {"type": "plain_text", "text": "Deny"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {
                "type": "input",
                "block_id": DENY_REASON_BLOCK,
                "label": {"type": "plain_text", "text": "Why?"},
                "element": {
                    "type": "plain_text_input",
                    "action_id": DENY_REASON_INPUT,
                    "multiline": True,
                    "max_length": 2000,
                },
            }
        ],
    }


def approval_decided_text(agent_name: str, verdict: str, deciders: list[str]) -> str:
    """What an approval message says once decided (or expired: no deciders)."""
    if not deciders:
        return f"Request for agent {agent_name}: {verdict}."
    return f"Request for agent {agent_name}: {verdict} by {' and '.join(deciders)}."
