"""GitHub platform (issue 20)

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30 21:00:00.000000

The `platform` and `kind` CHECK constraints of `nhis` and `policies` widened to `github` /
`github_app_token`, and `policies.allowed_resources` (the repositories a GitHub scope may
name; empty allows none). No policy is seeded: GitHub NHIs are refused until an operator applies one.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PLATFORMS_BEFORE = "platform IN ('aws', 'postgres')"
KINDS_BEFORE = "kind IN ('iam_role', 'iam_user_key', 'postgres_role')"
PLATFORMS_AFTER = "platform IN ('aws', 'postgres', 'github')"
KINDS_AFTER = "kind IN ('iam_role', 'iam_user_key', 'postgres_role', 'github_app_token')"


def _replace_checks(platforms: str, kinds: str) -> None:
    # Autogenerate does not compare CHECK constraints: these are written by hand.
    for table in ("nhis", "policies"):
        op.drop_constraint(op.f(f"ck_{table}_platform"), table, type_="check")
        op.drop_constraint(op.f(f"ck_{table}_kind"), table, type_="check")
        op.create_check_constraint(op.f(f"ck_{table}_platform"), table, platforms)
        op.create_check_constraint(op.f(f"ck_{table}_kind"), table, kinds)


def upgrade() -> None:
    _replace_checks(PLATFORMS_AFTER, KINDS_AFTER)
    op.add_column(
        "policies",
        sa.Column(
            "allowed_resources",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
    )


def downgrade() -> None:
    # Refuse to lose GitHub NHIs' history silently: the CHECK would fail on their rows anyway.
    op.execute(
        """
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM nhis WHERE platform = 'github') THEN
                RAISE EXCEPTION 'GitHub NHIs exist: remove them before downgrading below 0014';
            END IF;
        END $$
        """
    )
    op.execute("DELETE FROM policies WHERE platform = 'github'")
    op.drop_column("policies", "allowed_resources")
    _replace_checks(PLATFORMS_BEFORE, KINDS_BEFORE)
