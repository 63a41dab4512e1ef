"""task credentials and agent tokens

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 20:40:00.000000

- `task_credentials`: one row per short-lived credential issued for an agent's task (issue 15).
  It never holds the credential itself: only where it lives (`name`: the Postgres login role
  or the STS session name), for which NHI, task and caller, its narrowed scope and expiry, and
  whether the reaper has ended it.
- `api_tokens.agent_id`: an `agent` token is bound to exactly one agent; the role CHECK admits
  `agent`, and a CHECK ties the two together.
- `policies.allow_task_credentials` (default false) and
  `policies.task_credential_max_ttl_seconds` (default 3600, between 60 s and 12 h): whether, and
  for how long at most, task credentials may be derived from the policy's NHIs.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "policies",
        sa.Column("allow_task_credentials", sa.Boolean(), server_default="false", nullable=False),
    )
    op.add_column(
        "policies",
        sa.Column(
            "task_credential_max_ttl_seconds",
            sa.Integer(),
            server_default="3600",
            nullable=False,
        ),
    )
    op.create_check_constraint(
        op.f("ck_policies_task_credential_max_ttl_range"),
        "policies",
        "task_credential_max_ttl_seconds BETWEEN 60 AND 43200",
    )
    op.create_table(
        "task_credentials",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("nhi_id", sa.Uuid(), nullable=False),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("task_id", sa.String(length=128), nullable=True),
        sa.Column("issued_by", sa.String(length=254), nullable=False),
        sa.Column(
            "issued_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("scope", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="active", nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.String(length=64), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('active', 'ended', 'reap_failed')", name=op.f("ck_task_credentials_status")
        ),
        sa.ForeignKeyConstraint(
            ["nhi_id"], ["nhis.id"], name=op.f("fk_task_credentials_nhi_id_nhis")
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_task_credentials_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_credentials")),
        sa.UniqueConstraint("name", name=op.f("uq_task_credentials_name")),
    )
    op.create_index(op.f("ix_task_credentials_nhi_id"), "task_credentials", ["nhi_id"])
    # The reaper's one query: live credentials past their expiry, oldest first.
    op.create_index(
        "ix_task_credentials_live_expiry",
        "task_credentials",
        ["expires_at"],
        postgresql_where=sa.text("status <> 'ended'"),
    )
    op.add_column("api_tokens", sa.Column("agent_id", sa.Uuid(), nullable=True))
    op.create_foreign_key(
        op.f("fk_api_tokens_agent_id_agents"), "api_tokens", "agents", ["agent_id"], ["id"]
    )
    op.drop_constraint(op.f("ck_api_tokens_role"), "api_tokens", type_="check")
    op.create_check_constraint(
        op.f("ck_api_tokens_role"),
        "api_tokens",
        "role IN ('platform', 'approver', 'security', 'auditor', 'admin', 'agent')",
    )
    op.create_check_constraint(
        op.f("ck_api_tokens_agent_bound"),
        "api_tokens",
        "(role = 'agent') = (agent_id IS NOT NULL)",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_api_tokens_agent_bound"), "api_tokens", type_="check")
    op.drop_constraint(op.f("ck_api_tokens_role"), "api_tokens", type_="check")
    op.create_check_constraint(
        op.f("ck_api_tokens_role"),
        "api_tokens",
        "role IN ('platform', 'approver', 'security', 'auditor', 'admin')",
    )
    op.drop_constraint(op.f("fk_api_tokens_agent_id_agents"), "api_tokens", type_="foreignkey")
    op.drop_column("api_tokens", "agent_id")
    op.drop_index("ix_task_credentials_live_expiry", table_name="task_credentials")
    op.drop_index(op.f("ix_task_credentials_nhi_id"), table_name="task_credentials")
    op.drop_table("task_credentials")
    op.drop_constraint(op.f("ck_policies_task_credential_max_ttl_range"), "policies", type_="check")
    op.drop_column("policies", "task_credential_max_ttl_seconds")
    op.drop_column("policies", "allow_task_credentials")
