"""Sweep rules: compare what a platform holds with what the inventory says. Pure, no I/O.

The sweep is the safety net under the per-NHI timers: a missed timer, a manual change in the
console or a deleted inventory row all show up here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from models.contracts import Finding, FindingKind, ScopeStatement
from nhi.rules.task_credentials import STOCK_NHI_ID

ALIVE = frozenset({"active", "rotating", "quarantined", "revoke_failed", "expiring"})
GONE = frozenset({"decommissioned", "failed"})


@dataclass(frozen=True)
class PlatformIdentity:
    """An identity found on the platform under our marker."""

    name: str
    kind: str
    created_at: datetime
    managed: bool  # carries managed-by=nhi-lifecycle
    nhi_id: str | None = None
    secret_arn: str | None = None
    last_used_at: datetime | None = None
    target: str | None = None  # the place it lives in (a Postgres target); None on AWS
    # How the platform's permissions differ from the granted scope, as the provider judged it
    # (only for identities the inventory holds active); None when they match.
    drift: str | None = None
    # A task credential's login role standing alone (its NHI's group is gone from the
    # platform): `nhi_id` is its parent NHI, and the role is an orphan only once that parent
    # is no longer alive.
    task: bool = False


@dataclass(frozen=True)
class InventoryItem:
    """An inventory NHI as the sweep needs it."""

    nhi_id: uuid.UUID
    name: str
    kind: str
    status: str
    expires_at: datetime
    agent_status: str
    last_used_at: datetime | None = None
    supervised: bool = True
    target: str | None = None
    granted_scope: tuple[ScopeStatement, ...] = ()
    allowed_cidrs: tuple[str, ...] = ()
    activated_at: datetime | None = None


@dataclass
class Rules:
    """Sweep thresholds."""

    propagation: timedelta = timedelta(minutes=10)
    expiry_slack: timedelta = timedelta(minutes=5)
    stale_after: timedelta = timedelta(days=90)
    checks: set[FindingKind] = field(default_factory=lambda: set(FindingKind))


def classify(
    platform: list[PlatformIdentity], inventory: list[InventoryItem], now: datetime, rules: Rules
) -> list[Finding]:
    """Every finding, most urgent first (orphans and expired credentials before reports)."""
    by_name = {i.name: i for i in inventory}
    by_id = {str(i.nhi_id): i for i in inventory}
    on_platform = {p.name for p in platform}
    findings: list[Finding] = []
    for identity in platform:
        item = by_name.get(identity.name)
        young = now - identity.created_at < rules.propagation
        if identity.task and identity.managed:
            parent = by_id.get(identity.nhi_id or "")
            if not young and (parent is None or parent.status not in ALIVE):
                findings.append(_task_orphan(identity, parent))
            continue
        if not identity.managed:
            if item is None:
                findings.append(
                    Finding(
                        kind=FindingKind.UNTAGGED,
                        identity=identity.name,
                        identity_kind=identity.kind,
                        detail="under our IAM path but not tagged managed-by=nhi-lifecycle",
                        action="reported only: never touched",
                    )
                )
            continue
        if item is None or item.status in GONE:
            if young:
                continue  # may be mid-provisioning: the inventory row commits first, but IAM lags
            findings.append(
                Finding(
                    kind=FindingKind.ORPHAN,
                    identity=identity.name,
                    identity_kind=identity.kind,
                    nhi_id=uuid.UUID(identity.nhi_id) if identity.nhi_id else None,
                    detail="not in the inventory"
                    if item is None
                    else f"the inventory says it is {item.status}",
                    action="quarantine now, delete after the grace period",
                    secret_arn=identity.secret_arn,
                    target=identity.target,
                )
            )
            continue
        if item.status not in ALIVE:
            continue
        if item.agent_status != "active" and item.status == "active":
            findings.append(
                _about(
                    item,
                    FindingKind.AGENT_GONE,
                    f"the agent is {item.agent_status}",
                    "decommission",
                )
            )
        elif item.status == "active" and item.expires_at + rules.expiry_slack < now:
            findings.append(
                _about(
                    item,
                    FindingKind.EXPIRED_ALIVE,
                    f"expired {item.expires_at:%Y-%m-%d %H:%M} UTC but still active",
                    "decommission now",
                )
            )
        if not item.supervised:
            findings.append(
                _about(item, FindingKind.UNSUPERVISED, "no lifecycle workflow runs", "restart it")
            )
        if item.status == "active" and identity.drift:
            findings.append(_about(item, FindingKind.DRIFT, identity.drift, "alert"))
        last_used = identity.last_used_at or item.last_used_at
        if (
            item.status == "active"
            and now - identity.created_at > rules.stale_after
            and (last_used is None or now - last_used > rules.stale_after)
        ):
            findings.append(
                _about(
                    item,
                    FindingKind.STALE,
                    f"unused for over {rules.stale_after.days} days",
                    "tell the owner",
                )
            )
    for item in inventory:
        # Callers pass only what a complete listing covered (an unreachable target's NHIs are
        # left out), so absence here is absence on the platform. An identity activated within
        # the propagation window may simply not be listed yet (IAM lags).
        just_made = item.activated_at is not None and now - item.activated_at < rules.propagation
        if item.status == "active" and item.name not in on_platform and not just_made:
            findings.append(
                _about(
                    item,
                    FindingKind.MISSING,
                    "active in the inventory, gone from the platform",
                    "mark missing, alert the owner and security, stop its lifecycle",
                )
            )
    order = list(FindingKind)
    return [
        f for f in sorted(findings, key=lambda f: order.index(f.kind)) if f.kind in rules.checks
    ]


def _task_orphan(identity: PlatformIdentity, parent: InventoryItem | None) -> Finding:
    """A task credential's login role outliving its parent NHI: removed as any orphan is.
    (While the parent lives, its lifecycle, containment and the reaper answer for it.)"""
    state = f"is {parent.status}" if parent is not None else "is not alive in the inventory"
    detail = f"task credential role of NHI {identity.nhi_id}, which {state}"
    if identity.nhi_id == str(STOCK_NHI_ID):
        detail = "task role made ahead (stock) and never handed out: its API process stopped"
    return Finding(
        kind=FindingKind.ORPHAN,
        identity=identity.name,
        identity_kind=identity.kind,
        nhi_id=uuid.UUID(identity.nhi_id) if identity.nhi_id else None,
        detail=detail,
        action="quarantine now, delete after the grace period",
        target=identity.target,
    )


def _about(item: InventoryItem, kind: FindingKind, detail: str, action: str) -> Finding:
    return Finding(
        kind=kind,
        identity=item.name,
        identity_kind=item.kind,
        nhi_id=item.nhi_id,
        detail=detail,
        action=action,
    )
