"""inventory: agents, nhis, policies, audit events

Revision ID: 0001
Revises:
Create Date: 2026-11-30 06:23:56.171621

Also makes audit_events insert-only (a trigger refuses UPDATE and DELETE) and seeds the
shipped default policies: roles everywhere, static access keys outside prod only.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("category", sa.String(length=32), nullable=False),
        sa.Column("environment", sa.String(length=16), nullable=False),
        sa.Column("owner_email", sa.String(length=254), nullable=False),
        sa.Column("owner_slack_id", sa.String(length=32), nullable=True),
        sa.Column("backup_owner_email", sa.String(length=254), nullable=True),
        sa.Column("team", sa.String(length=100), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("expected_end_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("invokers", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
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
            "category IN ('chatbot', 'rag', 'cloud_model', 'llm_api', 'enterprise_platform', 'browser_agent', 'computer_agent')",
            name=op.f("ck_agents_category"),
        ),
        sa.CheckConstraint(
            "environment IN ('dev', 'staging', 'prod')", name=op.f("ck_agents_environment")
        ),
        sa.CheckConstraint(
            "status IN ('active', 'completed', 'decommissioned')", name=op.f("ck_agents_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
        sa.UniqueConstraint("name", "environment", name="uq_agents_name_environment"),
    )
    op.create_index(op.f("ix_agents_owner_email"), "agents", ["owner_email"], unique=False)
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("subject_type", sa.String(length=32), nullable=False),
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=254), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(
        "ix_audit_events_subject",
        "audit_events",
        ["subject_type", "subject_id", "id"],
        unique=False,
    )
    op.create_table(
        "policies",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("environment", sa.String(length=16), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("default_ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("max_lifetime_seconds", sa.Integer(), nullable=False),
        sa.Column("rotation_period_seconds", sa.Integer(), nullable=True),
        sa.Column(
            "reminder_offsets_seconds", postgresql.JSONB(astext_type=sa.Text()), nullable=False
        ),
        sa.Column("grace_period_seconds", sa.Integer(), nullable=False),
        sa.Column("max_session_duration_seconds", sa.Integer(), nullable=False),
        sa.Column("allow_resource_wildcard", sa.Boolean(), nullable=False),
        sa.Column("forbidden_actions", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("sensitive_actions", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("updated_by", sa.String(length=254), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "environment IN ('dev', 'staging', 'prod')", name=op.f("ck_policies_environment")
        ),
        sa.CheckConstraint("kind IN ('iam_role', 'iam_user_key')", name=op.f("ck_policies_kind")),
        sa.CheckConstraint("platform IN ('aws')", name=op.f("ck_policies_platform")),
        sa.CheckConstraint(
            "default_ttl_seconds > 0 AND default_ttl_seconds <= max_lifetime_seconds",
            name=op.f("ck_policies_default_ttl_bounded"),
        ),
        sa.CheckConstraint(
            "grace_period_seconds >= 0", name=op.f("ck_policies_grace_period_nonnegative")
        ),
        sa.CheckConstraint(
            "max_lifetime_seconds > 0 AND max_lifetime_seconds <= 31622400",
            name=op.f("ck_policies_max_lifetime_bounded"),
        ),
        sa.CheckConstraint(
            "max_session_duration_seconds BETWEEN 3600 AND 43200",
            name=op.f("ck_policies_max_session_duration_range"),
        ),
        sa.CheckConstraint(
            "rotation_period_seconds IS NULL OR rotation_period_seconds > 0",
            name=op.f("ck_policies_rotation_period_positive"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policies")),
        sa.UniqueConstraint("platform", "kind", "environment", name="uq_policies_target"),
    )
    op.create_table(
        "nhis",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("external_id", sa.String(length=2048), nullable=True),
        sa.Column("granted_scope", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("allowed_cidrs", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("trust_principal", sa.String(length=2048), nullable=True),
        sa.Column("credential_ref", sa.String(length=2048), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("workflow_id", sa.String(length=255), nullable=True),
        sa.Column("requested_by", sa.String(length=254), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("max_lifetime_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decommissioned_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rotation_period_seconds", sa.Integer(), nullable=True),
        sa.CheckConstraint("kind IN ('iam_role', 'iam_user_key')", name=op.f("ck_nhis_kind")),
        sa.CheckConstraint("platform IN ('aws')", name=op.f("ck_nhis_platform")),
        sa.CheckConstraint(
            "status IN ('requested', 'pending_approval', 'provisioning', 'active', 'rotating', 'expiring', 'quarantined', 'decommissioned', 'failed', 'revoke_failed')",
            name=op.f("ck_nhis_status"),
        ),
        sa.CheckConstraint(
            "expires_at <= max_lifetime_at", name=op.f("ck_nhis_expiry_within_max_lifetime")
        ),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_nhis_agent_id_agents")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nhis")),
        sa.UniqueConstraint("name", name=op.f("uq_nhis_name")),
    )
    op.create_index(op.f("ix_nhis_agent_id"), "nhis", ["agent_id"], unique=False)
    op.create_index("ix_nhis_status_expires_at", "nhis", ["status", "expires_at"], unique=False)
    op.execute(
        """
        CREATE FUNCTION audit_events_insert_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP;
        END $$;
        """
    )
    op.execute(
        "CREATE TRIGGER audit_events_insert_only BEFORE UPDATE OR DELETE OR TRUNCATE "
        "ON audit_events FOR EACH STATEMENT EXECUTE FUNCTION audit_events_insert_only()"
    )
    _seed_policies()


DAY = 86400
# Frozen copy of the shipped defaults: a migration must not change when app code does.
FORBIDDEN = ["*", "iam:*", "organizations:*", "account:*", "sts:*"]
SENSITIVE = [
    "iam:PassRole",
    "*:Delete*",
    "*:Put*Policy",
    "kms:Decrypt",
    "secretsmanager:GetSecretValue",
]


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
        sa.column("forbidden_actions", postgresql.JSONB),
        sa.column("sensitive_actions", postgresql.JSONB),
        sa.column("updated_by", sa.String),
    )
    rows = []
    for env, role_ttl, role_max, key_allowed in (
        ("dev", 30, 90, True),
        ("staging", 30, 90, True),
        ("prod", 30, 180, False),
    ):
        common = {
            "platform": "aws",
            "environment": env,
            "reminder_offsets_seconds": [14 * DAY, 3 * DAY, 1 * DAY],
            "grace_period_seconds": 7 * DAY if env == "prod" else 1 * DAY,
            "max_session_duration_seconds": 3600,
            "allow_resource_wildcard": False,
            "forbidden_actions": FORBIDDEN,
            "sensitive_actions": SENSITIVE,
            "updated_by": "migration:0001",
        }
        rows.append(
            common
            | {
                "kind": "iam_role",
                "allowed": True,
                "default_ttl_seconds": role_ttl * DAY,
                "max_lifetime_seconds": role_max * DAY,
                # A role has no static secret: nothing to rotate.
                "rotation_period_seconds": None,
            }
        )
        rows.append(
            common
            | {
                "kind": "iam_user_key",
                "allowed": key_allowed,
                "default_ttl_seconds": 30 * DAY,
                "max_lifetime_seconds": 90 * DAY,
                "rotation_period_seconds": 30 * DAY,
            }
        )
    op.bulk_insert(table, rows)


def downgrade() -> None:
    op.execute("DROP TRIGGER audit_events_insert_only ON audit_events")
    op.execute("DROP FUNCTION audit_events_insert_only()")
    op.drop_index("ix_nhis_status_expires_at", table_name="nhis")
    op.drop_index(op.f("ix_nhis_agent_id"), table_name="nhis")
    op.drop_table("nhis")
    op.drop_table("policies")
    op.drop_index("ix_audit_events_subject", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index(op.f("ix_agents_owner_email"), table_name="agents")
    op.drop_table("agents")
