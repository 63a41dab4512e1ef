"""approvers, approval decisions, bundles and footprint thresholds (issue 16)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 21:00:00.000000

- `policies`: `approvers` (Slack user groups, channels or emails who decide requests),
  `approvals_required` (1 or 2), `approval_window_seconds` (no decision in it denies) and
  `risk_threshold` (0-100: a request raising the agent's risk score past it needs approval).
- `approvals`: one row per request (a single NHI or a bundle) that waits for approvers: who
  may decide, what they were shown, the decisions so far.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "policies",
        sa.Column(
            "approvers",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
    )
    op.add_column(
        "policies",
        sa.Column("approvals_required", sa.Integer(), server_default="1", nullable=False),
    )
    op.add_column(
        "policies",
        sa.Column("approval_window_seconds", sa.Integer(), server_default="259200", nullable=False),
    )
    op.add_column("policies", sa.Column("risk_threshold", sa.Integer(), nullable=True))
    op.create_check_constraint(
        op.f("ck_policies_approvals_required_range"), "policies", "approvals_required IN (1, 2)"
    )
    op.create_check_constraint(
        op.f("ck_policies_approval_window_range"),
        "policies",
        "approval_window_seconds BETWEEN 60 AND 2592000",
    )
    op.create_check_constraint(
        op.f("ck_policies_risk_threshold_range"),
        "policies",
        "risk_threshold IS NULL OR risk_threshold BETWEEN 0 AND 100",
    )
    op.create_table(
        "approvals",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("workflow_id", sa.String(length=255), nullable=False),
        sa.Column("bundle", sa.Boolean(), nullable=False),
        sa.Column("nhi_ids", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("approvers", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("approvals_required", sa.Integer(), nullable=False),
        sa.Column("requested_by", sa.String(length=254), nullable=False),
        sa.Column("requested_by_person", sa.String(length=254), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reasons", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("summary", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("decisions", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'approved', 'denied')", name=op.f("ck_approvals_status")
        ),
        sa.CheckConstraint(
            "approvals_required IN (1, 2)", name=op.f("ck_approvals_approvals_required_range")
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_approvals_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvals")),
        sa.UniqueConstraint("workflow_id", name=op.f("uq_approvals_workflow_id")),
    )
    op.create_index(op.f("ix_approvals_agent_id"), "approvals", ["agent_id"])
    op.create_index("ix_approvals_status_expires_at", "approvals", ["status", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_approvals_status_expires_at", table_name="approvals")
    op.drop_index(op.f("ix_approvals_agent_id"), table_name="approvals")
    op.drop_table("approvals")
    op.drop_constraint(op.f("ck_policies_risk_threshold_range"), "policies", type_="check")
    op.drop_constraint(op.f("ck_policies_approval_window_range"), "policies", type_="check")
    op.drop_constraint(op.f("ck_policies_approvals_required_range"), "policies", type_="check")
    op.drop_column("policies", "risk_threshold")
    op.drop_column("policies", "approval_window_seconds")
    op.drop_column("policies", "approvals_required")
    op.drop_column("policies", "approvers")
