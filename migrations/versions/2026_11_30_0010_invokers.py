"""agent invokers

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 21:00:00.000000

- `agent_invokers`: who or what can make an agent act (issue 16): a person, group, service,
  schedule or another agent (`ref`), the channel (slack, api, ui, webhook, cron), an optional
  expiry, and who added it. One row per (agent, kind, ref, channel).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agent_invokers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("ref", sa.String(length=254), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("added_by", sa.String(length=254), nullable=False),
        sa.Column(
            "added_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.CheckConstraint(
            "kind IN ('person', 'group', 'service', 'schedule', 'agent')",
            name=op.f("ck_agent_invokers_kind"),
        ),
        sa.CheckConstraint(
            "channel IN ('slack', 'api', 'ui', 'webhook', 'cron')",
            name=op.f("ck_agent_invokers_channel"),
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_agent_invokers_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_invokers")),
        sa.UniqueConstraint("agent_id", "kind", "ref", "channel", name="uq_agent_invokers_once"),
    )
    op.create_index(op.f("ix_agent_invokers_agent_id"), "agent_invokers", ["agent_id"])
    op.create_index("ix_agent_invokers_kind_ref", "agent_invokers", ["kind", "ref"])


def downgrade() -> None:
    op.drop_index("ix_agent_invokers_kind_ref", table_name="agent_invokers")
    op.drop_index(op.f("ix_agent_invokers_agent_id"), table_name="agent_invokers")
    op.drop_table("agent_invokers")
