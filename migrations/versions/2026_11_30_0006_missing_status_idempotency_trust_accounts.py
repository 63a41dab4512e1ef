"""missing status, idempotency keys, allowed trust accounts

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 17:40:00.000000

- `nhis.status` may be `missing`: an NHI gone from its platform without this service removing
  it is a state of its own, not `active`.
- `idempotency_keys`: one row per (caller, `Idempotency-Key`) of a state-changing POST, with
  a hash of the request and the response it got, so a client retry is answered, not re-applied.
- `policies.allowed_trust_accounts`: the AWS accounts whose principals may be named as an
  `iam_role`'s trust principal (empty: only this service's own account).
- `policies.allow_service_principals`: whether an `iam_role` may trust an AWS service
  principal such as `bedrock.amazonaws.com` (off unless a policy says so).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the vocabulary: a migration must not change when app code does.
STATUSES_BEFORE = (
    "requested",
    "pending_approval",
    "provisioning",
    "active",
    "rotating",
    "expiring",
    "quarantined",
    "decommissioned",
    "failed",
    "revoke_failed",
)
STATUSES_AFTER = (*STATUSES_BEFORE, "missing")


def _status_check(statuses: Sequence[str]) -> None:
    op.drop_constraint(op.f("ck_nhis_status"), "nhis", type_="check")
    op.create_check_constraint(
        op.f("ck_nhis_status"), "nhis", f"status IN ({', '.join(repr(s) for s in statuses)})"
    )


def upgrade() -> None:
    _status_check(STATUSES_AFTER)
    op.add_column(
        "policies",
        sa.Column(
            "allowed_trust_accounts",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
    )
    op.add_column(
        "policies",
        sa.Column(
            "allow_service_principals",
            sa.Boolean(),
            server_default=sa.text("false"),
            nullable=False,
        ),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("principal", sa.String(length=254), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=2048), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_keys")),
        sa.UniqueConstraint("principal", "key", name="uq_idempotency_keys_principal_key"),
    )
    op.create_index(
        op.f("ix_idempotency_keys_created_at"), "idempotency_keys", ["created_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_idempotency_keys_created_at"), table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_column("policies", "allow_service_principals")
    op.drop_column("policies", "allowed_trust_accounts")
    op.execute("UPDATE nhis SET status = 'active' WHERE status = 'missing'")
    _status_check(STATUSES_BEFORE)
