"""What a caller may see of the inventory: one query rule for agents, NHIs and prompts."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, false, or_, true

from models.enums import Role
from models.orm import Agent
from nhi.services.auth import Principal


def visible(query: Select[Any], principal: Principal | None) -> Select[Any]:
    """Restrict a query over agents (joined) to what `principal` may see."""
    if principal is None or principal.reads_everything():
        return query
    rules: list[ColumnElement[bool]] = []
    if principal.has(Role.PLATFORM):
        rules.append(true() if principal.teams is None else Agent.team.in_(sorted(principal.teams)))
    if principal.email:
        rules += [Agent.owner_email == principal.email, Agent.backup_owner_email == principal.email]
    return query.where(or_(*rules)) if rules else query.where(false())
