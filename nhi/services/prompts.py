"""Prompts: the renewal reminders and escalations people answer (reads; the lifecycle
activities open and close them)."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.orm import Agent, Nhi, Prompt
from nhi.rules.owners import is_owner
from nhi.services.auth import Principal
from nhi.services.errors import NotFound
from nhi.services.transitions import note
from nhi.services.visibility import visible


def list_prompts(
    session: Session,
    status: str | None,
    nhi_id: uuid.UUID | None,
    visible_to: Principal | None = None,
) -> list[Prompt]:
    """Prompts, newest first."""
    query = visible(
        select(Prompt).join(Nhi).join(Agent).order_by(Prompt.created_at.desc()), visible_to
    )
    if status:
        query = query.where(Prompt.status == status)
    if nhi_id:
        query = query.where(Prompt.nhi_id == nhi_id)
    return list(session.scalars(query.limit(500)))


def get_prompt(session: Session, prompt_id: uuid.UUID) -> Prompt:
    """One prompt, or NotFound."""
    prompt = session.get(Prompt, prompt_id)
    if prompt is None:
        raise NotFound(f"prompt {prompt_id} not found")
    return prompt


def may_answer(session: Session, prompt: Prompt, email: str | None, slack_user_id: str) -> bool:
    """Whether the person with `email` may answer `prompt` from Slack: its agent's owner or
    backup owner (the owner rule). A refusal is audited."""
    agent = session.get_one(Nhi, prompt.nhi_id).agent
    if is_owner(email, agent.owner_email, agent.backup_owner_email):
        return True
    note(
        session,
        subject_type="nhi",
        subject_id=prompt.nhi_id,
        event="nhi.decision_refused",
        actor=f"slack:{email or slack_user_id}",
        reason="only the owner or backup owner may answer a renewal prompt",
        details={"prompt_id": str(prompt.id), "slack_user_id": slack_user_id},
    )
    return False
