"""OpenBao/Vault platform and vault_kv delivery (issue 20)

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30 21:00:00.000000

The `platform` and `kind` CHECK constraints of `nhis` and `policies` widened to `vault` /
`vault_approle`, and a `delivery` column on both (`aws_secrets_manager`, the default every
existing row keeps, or `vault_kv`): where an NHI's credential is delivered. No policy is
seeded: Vault NHIs are refused until an operator applies one.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the vocabularies: a migration must not change when app code does.
PLATFORMS_BEFORE = "platform IN ('aws', 'postgres', 'github')"
KINDS_BEFORE = "kind IN ('iam_role', 'iam_user_key', 'postgres_role', 'github_app_token')"
PLATFORMS_AFTER = "platform IN ('aws', 'postgres', 'github', 'vault')"
KINDS_AFTER = (
    "kind IN ('iam_role', 'iam_user_key', 'postgres_role', 'github_app_token', 'vault_approle')"
)
DELIVERIES = "delivery IN ('aws_secrets_manager', 'vault_kv')"
TABLES = ("nhis", "policies")


def _replace_checks(platforms: str, kinds: str) -> None:
    # Autogenerate does not compare CHECK constraints: these are written by hand.
    for table in TABLES:
        op.drop_constraint(op.f(f"ck_{table}_platform"), table, type_="check")
        op.drop_constraint(op.f(f"ck_{table}_kind"), table, type_="check")
        op.create_check_constraint(op.f(f"ck_{table}_platform"), table, platforms)
        op.create_check_constraint(op.f(f"ck_{table}_kind"), table, kinds)


def upgrade() -> None:
    _replace_checks(PLATFORMS_AFTER, KINDS_AFTER)
    for table in TABLES:
        op.add_column(
            table,
            sa.Column(
                "delivery",
                sa.String(length=32),
                server_default="aws_secrets_manager",
                nullable=False,
            ),
        )
        op.create_check_constraint(op.f(f"ck_{table}_delivery"), table, DELIVERIES)


def downgrade() -> None:
    # Refuse to lose Vault NHIs or Vault-delivered credentials' references silently.
    op.execute(
        """
        DO $$
        BEGIN
            IF EXISTS (
                SELECT 1 FROM nhis WHERE platform = 'vault' OR delivery <> 'aws_secrets_manager'
            ) THEN
                RAISE EXCEPTION 'Vault NHIs or vault_kv deliveries exist: remove them first';
            END IF;
        END $$
        """
    )
    op.execute("DELETE FROM policies WHERE platform = 'vault'")
    for table in TABLES:
        op.drop_constraint(op.f(f"ck_{table}_delivery"), table, type_="check")
        op.drop_column(table, "delivery")
    _replace_checks(PLATFORMS_BEFORE, KINDS_BEFORE)
