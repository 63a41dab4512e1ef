"""workload identities bound to agents (issue 15)

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-30 23:00:00.000000

- `agent_workloads`: a JWT subject of a trusted workload issuer (`NHI_WORKLOAD_OIDC_ISSUERS`:
  a Kubernetes service account, a GitHub Actions workflow, a cloud workload identity) bound to
  one agent, so the agent's runtime asks for task credentials with its platform-issued token.
  UNIQUE(issuer, subject): a subject stands for one agent only.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agent_workloads",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("issuer", sa.String(length=200), nullable=False),
        sa.Column("subject", sa.String(length=240), nullable=False),
        sa.Column("created_by", sa.String(length=254), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_agent_workloads_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_workloads")),
        sa.UniqueConstraint("issuer", "subject", name="uq_agent_workloads_issuer_subject"),
    )
    op.create_index(op.f("ix_agent_workloads_agent_id"), "agent_workloads", ["agent_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_agent_workloads_agent_id"), table_name="agent_workloads")
    op.drop_table("agent_workloads")
