"""Temporal search attributes of the NHI workflows: the one definition of their names and
types, the values a workflow carries, and the visibility queries over them.

Every provisioning and lifecycle run carries `NhiId`, `AgentId`, `Owner`, `Team`, `Platform`,
`NhiKind`, `NhiStatus` (upserted as the status changes) and `NhiExpiresAt`, so the Web UI and
`temporal workflow list --query` find "every workflow of agent X" or "every NHI expiring this
week" without the inventory. They are registered per namespace (`nhi temporal setup`, `nhi dev`,
the test fixtures).

Search attribute values are indexed by Temporal in clear text, by design, and never pass
through the payload codec: they are the deliberate exception to payload encryption. So they
hold identifiers, the owner's address and enums, never a scope, an ARN or a secret.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    SearchAttributeUpdate,
    TypedSearchAttributes,
)

from models.enums import NhiKind, NhiStatus, Platform
from nhi.rules.ids import LIFECYCLE_WORKFLOW

NHI_ID = SearchAttributeKey.for_keyword("NhiId")
AGENT_ID = SearchAttributeKey.for_keyword("AgentId")
OWNER = SearchAttributeKey.for_keyword("Owner")
TEAM = SearchAttributeKey.for_keyword("Team")
PLATFORM = SearchAttributeKey.for_keyword("Platform")
NHI_KIND = SearchAttributeKey.for_keyword("NhiKind")
NHI_STATUS = SearchAttributeKey.for_keyword("NhiStatus")
NHI_EXPIRES_AT = SearchAttributeKey.for_datetime("NhiExpiresAt")

KEYS: tuple[SearchAttributeKey[Any], ...] = (
    NHI_ID,
    AGENT_ID,
    OWNER,
    TEAM,
    PLATFORM,
    NHI_KIND,
    NHI_STATUS,
    NHI_EXPIRES_AT,
)

# The type names `temporal server start-dev --search-attribute Name=Type` and tcld accept.
_TYPE_NAMES = {"KEYWORD": "Keyword", "DATETIME": "Datetime"}


def type_name(key: SearchAttributeKey[Any]) -> str:
    """`Keyword` or `Datetime`, as the Temporal CLI and tcld spell a key's type."""
    return _TYPE_NAMES[key.indexed_value_type.name]


def dev_server_flags() -> list[str]:
    """`--search-attribute Name=Type` for every key (`temporal server start-dev`)."""
    return [arg for key in KEYS for arg in ("--search-attribute", f"{key.name}={type_name(key)}")]


def nhi_attributes(
    *,
    nhi_id: uuid.UUID,
    agent_id: uuid.UUID,
    owner: str,
    team: str,
    platform: Platform,
    kind: NhiKind,
    status: NhiStatus,
    expires_at: datetime,
) -> TypedSearchAttributes:
    """Every attribute of one NHI's workflow, as a start (or continue-as-new) sets them."""
    return TypedSearchAttributes(
        [
            SearchAttributePair(NHI_ID, str(nhi_id)),
            SearchAttributePair(AGENT_ID, str(agent_id)),
            SearchAttributePair(OWNER, owner),
            SearchAttributePair(TEAM, team),
            SearchAttributePair(PLATFORM, platform.value),
            SearchAttributePair(NHI_KIND, kind.value),
            SearchAttributePair(NHI_STATUS, status.value),
            SearchAttributePair(NHI_EXPIRES_AT, expires_at),
        ]
    )


def as_updates(attributes: TypedSearchAttributes) -> list[SearchAttributeUpdate[Any]]:
    """The same values as an upsert."""
    return [pair.key.value_set(pair.value) for pair in attributes]


def status_updates(
    status: NhiStatus, expires_at: datetime | None = None
) -> list[SearchAttributeUpdate[Any]]:
    """A status change (and the new expiry, when it moved) as an upsert."""
    updates: list[SearchAttributeUpdate[Any]] = [NHI_STATUS.value_set(status.value)]
    if expires_at is not None:
        updates.append(NHI_EXPIRES_AT.value_set(expires_at))
    return updates


def ours(attributes: TypedSearchAttributes) -> TypedSearchAttributes | None:
    """Only our attributes of a run (not the SDK's `TemporalChangeVersion`), to start the next
    run of the NHI with; None when the run carries none."""
    if not carries(attributes):
        return None
    names = {key.name for key in KEYS}
    return TypedSearchAttributes([pair for pair in attributes if pair.key.name in names])


def carries(attributes: TypedSearchAttributes) -> bool:
    """Whether a run was started tagged: only then are the attributes known to be registered
    in its namespace (an upsert of an unregistered one fails every workflow task)."""
    return attributes.get(NHI_ID) is not None


def unregistered(message: str) -> bool:
    """Whether an INVALID_ARGUMENT from Temporal (a start, an upsert, a query) means that the
    namespace lacks one of our search attributes ("... no mapping defined for search attribute
    X", "search attribute X is not defined", "invalid search attribute: X")."""
    return any(key.name in message for key in KEYS) and "search attribute" in message


# ---- visibility queries ----------------------------------------------------------------------

_SAFE = re.compile(r"^[A-Za-z0-9_.:@+\-]*$")


def _quoted(value: str) -> str:
    # Visibility queries have no parameters: only values that cannot close the quote go in.
    if not _SAFE.fullmatch(value):
        raise ValueError(f"not usable in a visibility query: {value!r}")
    return f'"{value}"'


def _instant(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def by_agent(agent_id: uuid.UUID) -> str:
    """Every workflow of one agent (provisioning and lifecycles of all its NHIs)."""
    return f"{AGENT_ID.name} = {_quoted(str(agent_id))}"


def expiring_between(start: datetime, end: datetime) -> str:
    """NHIs whose expiry lies in [start, end]: their running lifecycles, one per NHI (a closed
    run, continued-as-new or provisioning, keeps the expiry it had when it closed)."""
    return (
        f"{running(LIFECYCLE_WORKFLOW)} AND "
        f"{NHI_EXPIRES_AT.name} BETWEEN {_quoted(_instant(start))} AND {_quoted(_instant(end))}"
    )


def with_status(statuses: Sequence[NhiStatus]) -> str:
    """`NhiStatus IN (...)`."""
    return f"{NHI_STATUS.name} IN ({', '.join(_quoted(s.value) for s in statuses)})"


def running(workflow_type: str, platform: Platform | None = None) -> str:
    """Running workflows of a type; with a platform, those tagged with it and those not tagged
    at all (runs started before the attributes, or on a namespace without them)."""
    query = f'WorkflowType = {_quoted(workflow_type)} AND ExecutionStatus = "Running"'
    if platform is None:
        return query
    return f"{query} AND ({PLATFORM.name} = {_quoted(platform.value)} OR {PLATFORM.name} IS NULL)"
