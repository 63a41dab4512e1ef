"""prompts: renewal reminders and escalations

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 06:46:00.635188
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "prompts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("nhi_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("for_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("offset_seconds", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("deliveries", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("decision", sa.String(length=32), nullable=True),
        sa.Column("decided_by", sa.String(length=254), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("kind IN ('reminder', 'escalation')", name=op.f("ck_prompts_kind")),
        sa.CheckConstraint(
            "status IN ('open', 'decided', 'superseded')", name=op.f("ck_prompts_status")
        ),
        sa.ForeignKeyConstraint(["nhi_id"], ["nhis.id"], name=op.f("fk_prompts_nhi_id_nhis")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompts")),
        sa.UniqueConstraint(
            "nhi_id",
            "kind",
            "for_expires_at",
            "offset_seconds",
            name="uq_prompts_once",
        ),
    )
    op.create_index(op.f("ix_prompts_nhi_id"), "prompts", ["nhi_id"], unique=False)
    op.create_index(
        "ix_prompts_status_created_at", "prompts", ["status", "created_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_prompts_status_created_at", table_name="prompts")
    op.drop_index(op.f("ix_prompts_nhi_id"), table_name="prompts")
    op.drop_table("prompts")
