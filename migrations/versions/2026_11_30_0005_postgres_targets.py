"""postgres targets

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 09:44:42.049003

Adds the second platform: registered Postgres targets, `nhis.target`, the platform and kind
CHECK constraints widened to `postgres`/`postgres_role`, and seeded Postgres policies that are
read-only by default (writes need an approver).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the vocabularies: a migration must not change when app code does.
PLATFORMS_BEFORE = "platform IN ('aws')"
KINDS_BEFORE = "kind IN ('iam_role', 'iam_user_key')"
PLATFORMS_AFTER = "platform IN ('aws', 'postgres')"
KINDS_AFTER = "kind IN ('iam_role', 'iam_user_key', 'postgres_role')"


def _replace_checks(platforms: str, kinds: str) -> None:
    # Autogenerate does not compare CHECK constraints: these are written by hand.
    for table in ("nhis", "policies"):
        op.drop_constraint(op.f(f"ck_{table}_platform"), table, type_="check")
        op.drop_constraint(op.f(f"ck_{table}_kind"), table, type_="check")
        op.create_check_constraint(op.f(f"ck_{table}_platform"), table, platforms)
        op.create_check_constraint(op.f(f"ck_{table}_kind"), table, kinds)


def upgrade() -> None:
    op.create_table(
        "targets",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("dbname", sa.String(length=63), nullable=False),
        sa.Column("admin_user", sa.String(length=63), nullable=False),
        sa.Column("password_ref", sa.Text(), nullable=False),
        sa.Column("sslmode", sa.String(length=16), server_default="prefer", nullable=False),
        sa.Column("connection_limit", sa.Integer(), server_default="10", nullable=False),
        sa.Column("created_by", sa.String(length=254), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "password_ref ~ '^(env|secret):.'", name=op.f("ck_targets_password_ref")
        ),
        sa.CheckConstraint(
            "sslmode IN ('disable', 'allow', 'prefer', 'require', 'verify-ca', 'verify-full')",
            name=op.f("ck_targets_sslmode"),
        ),
        sa.CheckConstraint(
            "connection_limit BETWEEN 1 AND 1000", name=op.f("ck_targets_connection_limit_range")
        ),
        sa.CheckConstraint("port BETWEEN 1 AND 65535", name=op.f("ck_targets_port_range")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_targets")),
        sa.UniqueConstraint("name", name=op.f("uq_targets_name")),
    )
    op.add_column("nhis", sa.Column("target", sa.String(length=63), nullable=True))
    op.create_index(op.f("ix_nhis_target"), "nhis", ["target"], unique=False)
    _replace_checks(PLATFORMS_AFTER, KINDS_AFTER)
    _seed_policies()


DAY = 86400
# Privileges that make a role more than a data reader or writer: never handed out.
FORBIDDEN = ["SUPERUSER", "CREATEROLE", "CREATEDB", "BYPASSRLS", "REPLICATION", "CREATE", "ALL"]
# Writes: the default is read-only, and anything that changes data needs an approver.
SENSITIVE = ["INSERT", "UPDATE", "DELETE", "TRUNCATE", "TRIGGER", "REFERENCES"]


def _seed_policies() -> None:
    table = sa.table(
        "policies",
        sa.column("platform", sa.String),
        sa.column("kind", sa.String),
        sa.column("environment", sa.String),
        sa.column("allowed", sa.Boolean),
        sa.column("default_ttl_seconds", sa.Integer),
        sa.column("max_lifetime_seconds", sa.Integer),
        sa.column("rotation_period_seconds", sa.Integer),
        sa.column("reminder_offsets_seconds", postgresql.JSONB),
        sa.column("grace_period_seconds", sa.Integer),
        sa.column("max_session_duration_seconds", sa.Integer),
        sa.column("allow_resource_wildcard", sa.Boolean),
        sa.column("revert_drift", sa.Boolean),
        sa.column("forbidden_actions", postgresql.JSONB),
        sa.column("sensitive_actions", postgresql.JSONB),
        sa.column("updated_by", sa.String),
    )
    op.bulk_insert(
        table,
        [
            {
                "platform": "postgres",
                "kind": "postgres_role",
                "environment": env,
                "allowed": True,
                "default_ttl_seconds": 30 * DAY,
                "max_lifetime_seconds": 90 * DAY,
                "rotation_period_seconds": 30 * DAY,
                "reminder_offsets_seconds": [14 * DAY, 3 * DAY, 1 * DAY],
                "grace_period_seconds": 7 * DAY if env == "prod" else 1 * DAY,
                # Sessions are an IAM notion; the column's range still applies.
                "max_session_duration_seconds": 3600,
                "allow_resource_wildcard": False,
                "revert_drift": False,
                "forbidden_actions": FORBIDDEN,
                "sensitive_actions": SENSITIVE,
                "updated_by": "migration:0005",
            }
            for env in ("dev", "staging", "prod")
        ],
    )


def downgrade() -> None:
    # Narrowing the constraints would fail on postgres NHIs anyway; say why, and delete nothing
    # that records an identity.
    op.execute(
        """
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM nhis WHERE platform = 'postgres') THEN
                RAISE EXCEPTION 'postgres NHIs exist: decommission them before downgrading';
            END IF;
        END $$;
        """
    )
    op.execute("DELETE FROM policies WHERE platform = 'postgres'")
    _replace_checks(PLATFORMS_BEFORE, KINDS_BEFORE)
    op.drop_index(op.f("ix_nhis_target"), table_name="nhis")
    op.drop_column("nhis", "target")
    op.drop_table("targets")
