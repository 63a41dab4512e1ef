"""Search attributes from inside a workflow (their names and values: nhi/rules/search_attributes).

A run tags itself only when it was started tagged: its starter (the API, or the provisioning run
for a lifecycle) thereby vouched that the namespace has the attributes registered, and an upsert
of an unregistered one would fail every workflow task of the run. Runs recorded before the
attributes existed carry none, so they replay without the patch marker or any upsert.
"""

from __future__ import annotations

from datetime import datetime

from temporalio import workflow
from temporalio.common import TypedSearchAttributes

with workflow.unsafe.imports_passed_through():
    from models.contracts import LifecycleConfig
    from models.enums import NhiStatus
    from nhi.rules import search_attributes as sa

PATCH = "search-attributes"


def tagged() -> bool:
    """Whether this run carries the NHI attributes and keeps them current."""
    return sa.carries(workflow.info().typed_search_attributes) and workflow.patched(PATCH)


def tag(attributes: TypedSearchAttributes) -> None:
    """Upsert every attribute (a run refreshes them from the inventory when it starts)."""
    if tagged():
        workflow.upsert_search_attributes(sa.as_updates(attributes))


def tag_nhi(cfg: LifecycleConfig, expires_at: datetime) -> None:
    """Upsert every attribute from the lifecycle's configuration (the inventory's view)."""
    tag(
        sa.nhi_attributes(
            nhi_id=cfg.nhi_id,
            agent_id=cfg.plan.agent_id,
            owner=cfg.owner_email,
            team=cfg.team,
            platform=cfg.plan.platform,
            kind=cfg.kind,
            status=cfg.status,
            expires_at=expires_at,
        )
    )


def tag_status(status: NhiStatus, expires_at: datetime | None = None) -> None:
    """Upsert a status change (and the expiry, when it moved)."""
    if tagged():
        workflow.upsert_search_attributes(sa.status_updates(status, expires_at))


def carried() -> TypedSearchAttributes | None:
    """The run's attributes for a child or continue-as-new start; None when it has none."""
    return sa.ours(workflow.info().typed_search_attributes) if tagged() else None
