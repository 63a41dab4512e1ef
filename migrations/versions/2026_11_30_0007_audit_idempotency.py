"""audit idempotency key

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 18:30:00.000000

- `audit_events.idempotency_key`: set by a state change that may be retried (an activity
  attempt after its transaction committed, a repeated request); unique where set, so the
  transition helper (`nhi.services.transitions`) writes the event with
  `INSERT ... ON CONFLICT DO NOTHING` and applies a change at most once per key, even when two
  attempts race. Events without a key stay unconstrained.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "audit_events", sa.Column("idempotency_key", sa.String(length=255), nullable=True)
    )
    op.create_index(
        "uq_audit_events_idempotency_key",
        "audit_events",
        ["idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_audit_events_idempotency_key",
        table_name="audit_events",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    # Dropping a column is not an UPDATE: the append-only trigger does not refuse it.
    op.drop_column("audit_events", "idempotency_key")
