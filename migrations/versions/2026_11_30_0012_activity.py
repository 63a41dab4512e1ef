"""activity events, import cursors, NHI profiles and findings (issue 17)

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 21:00:00.000000

- `activity_events`: what each NHI did, as its platform logged it; the id is the source's
  event id (or a hash of the log line), so a re-import adds nothing.
- `activity_cursors`: the last object key a scheduled import processed under its prefix.
- `nhi_profiles`: the learned profile of each NHI (actions, networks, hours, user agents, rate).
- `activity_findings`: deviations with severity and evidence, alert time and acknowledgement.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = (
    "out_of_scope",
    "new_network",
    "use_after_revocation",
    "burst",
    "reconnaissance",
    "human_use",
    "concurrent_networks",
)


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _now() -> sa.TextClause:
    return sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "activity_events",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("nhi_id", sa.Uuid(), nullable=False),
        sa.Column("task_credential_id", sa.Uuid(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(length=128), nullable=False),
        sa.Column("resource", sa.Text(), nullable=True),
        sa.Column("source_ip", sa.String(length=64), nullable=True),
        sa.Column("user_agent", sa.String(length=256), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("identity", sa.String(length=512), nullable=False),
        sa.CheckConstraint(
            _in("source", ("cloudtrail", "postgres", "api")),
            name=op.f("ck_activity_events_source"),
        ),
        sa.CheckConstraint(
            "outcome IN ('success', 'denied', 'error')", name=op.f("ck_activity_events_outcome")
        ),
        # No foreign key on nhi_id: see models/orm.py ActivityEvent (import rate).
        sa.PrimaryKeyConstraint("id", name=op.f("pk_activity_events")),
    )
    op.create_index(
        "ix_activity_events_nhi_id_occurred_at", "activity_events", ["nhi_id", "occurred_at"]
    )
    op.create_table(
        "activity_cursors",
        sa.Column("name", sa.String(length=1024), nullable=False),
        sa.Column("position", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_activity_cursors")),
    )
    op.create_table(
        "nhi_profiles",
        sa.Column("nhi_id", sa.Uuid(), nullable=False),
        sa.Column("profile", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.ForeignKeyConstraint(["nhi_id"], ["nhis.id"], name=op.f("fk_nhi_profiles_nhi_id_nhis")),
        sa.PrimaryKeyConstraint("nhi_id", name=op.f("pk_nhi_profiles")),
    )
    op.create_table(
        "activity_findings",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("nhi_id", sa.Uuid(), nullable=False),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("task_credential_id", sa.Uuid(), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("evidence", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.Column("alerted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acked_by", sa.String(length=254), nullable=True),
        sa.Column("ack_reason", sa.Text(), nullable=True),
        sa.CheckConstraint(_in("kind", KINDS), name=op.f("ck_activity_findings_kind")),
        sa.CheckConstraint(
            _in("severity", ("low", "medium", "high", "critical")),
            name=op.f("ck_activity_findings_severity"),
        ),
        sa.ForeignKeyConstraint(
            ["nhi_id"], ["nhis.id"], name=op.f("fk_activity_findings_nhi_id_nhis")
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_activity_findings_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_activity_findings")),
    )
    op.create_index("ix_activity_findings_created_at", "activity_findings", ["created_at"])
    op.create_index(
        "ix_activity_findings_agent_id_created_at", "activity_findings", ["agent_id", "created_at"]
    )
    op.create_index(
        "ix_activity_findings_nhi_id_kind_alerted_at",
        "activity_findings",
        ["nhi_id", "kind", "alerted_at"],
    )


def downgrade() -> None:
    op.drop_table("activity_findings")
    op.drop_table("nhi_profiles")
    op.drop_table("activity_cursors")
    op.drop_index("ix_activity_events_nhi_id_occurred_at", table_name="activity_events")
    op.drop_table("activity_events")
