"""containment incidents (issue 17)

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30 21:00:00.000000

- `incidents`: one containment of an agent: who contained it and why, a per-credential
  report with each credential's proof of death and a timeline (JSONB), and who released it.
  A partial unique index keeps at most one unreleased incident per agent (a second contain
  joins the open one).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("opened_by", sa.String(length=254), nullable=False),
        sa.Column("opened_by_person", sa.String(length=254), nullable=False),
        sa.Column(
            "opened_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("contained_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_by", sa.String(length=254), nullable=True),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("release_reason", sa.Text(), nullable=True),
        sa.Column("finding_id", sa.Uuid(), nullable=True),
        sa.Column("report", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.CheckConstraint(
            "status IN ('containing', 'contained', 'partially_contained', 'released')",
            name=op.f("ck_incidents_status"),
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_incidents_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incidents")),
    )
    op.create_index("ix_incidents_opened_at", "incidents", ["opened_at"])
    op.create_index(
        "uq_incidents_agent_id_open",
        "incidents",
        ["agent_id"],
        unique=True,
        postgresql_where=sa.text("status <> 'released'"),
    )


def downgrade() -> None:
    op.drop_index("uq_incidents_agent_id_open", table_name="incidents")
    op.drop_index("ix_incidents_opened_at", table_name="incidents")
    op.drop_table("incidents")
