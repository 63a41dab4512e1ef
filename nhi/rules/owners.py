"""The owner rule: who holds owner rights over an agent and its identities."""

from __future__ import annotations


def is_owner(email: str | None, owner_email: str, backup_owner_email: str | None) -> bool:
    """Whether `email` is the agent's owner or backup owner (emails compare case-blind).

    The one statement of the rule: the API's principals (`nhi.services.auth.Principal.owns`), Slack
    clicks (`nhi.services.prompts.may_answer`) and the lifecycle workflow's update validators
    all ask it.
    """
    if not email:
        return False
    owners = {owner_email.lower()}
    if backup_owner_email:
        owners.add(backup_owner_email.lower())
    return email.lower() in owners
