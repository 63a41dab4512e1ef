"""inventory counts and indexes for the /metrics gauges

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 21:00:00.000000

The inventory gauges used to be one GROUP BY over every NHI joined to its agent: 0.7-1.1 s at
1,000,000 NHIs, every refresh. Now:

- `nhi_counts`: NHIs by (platform, kind, environment, status) as signed deltas. Statement
  triggers on `nhis` append one row per combination a statement changed (+n for rows that
  arrived in it, -n for rows that left it); the metrics refresh folds the deltas into one row
  per combination. Appending instead of updating one row per combination means two
  transactions that activate NHIs at the same time never wait on each other's row lock. The
  trigger reads the agent's environment, which never changes after creation (a trigger on
  `agents` moves the counts if it ever does).
- `ix_nhis_usable_expires_at`: usable NHIs (active, rotating, expiring) by expiry, carrying
  platform, kind and agent: overdue and expiring-within-24h/7d become an index-only range scan.
- `ix_nhis_revoke_failed`: the few revoke_failed NHIs, for the oldest-failure age.

Open prompts need nothing new: `ix_prompts_status_created_at` already counts them index-only
(measured at 1,000,000 NHIs, bench/metrics_scrape.py), and open approvals are the
`pending_approval` count of `nhi_counts`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

USABLE = "status IN ('active', 'rotating', 'expiring')"

# One function for the three statement triggers: transition tables give the statement's rows,
# so a bulk insert or update costs one aggregate, not one trigger call per row. A statement
# that changed no counted column (most updates: expiry, timestamps) appends nothing.
TRACK_NHIS = """
CREATE FUNCTION nhi_counts_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO nhi_counts (platform, kind, environment, status, n)
    SELECT d.platform, d.kind, a.environment, d.status, count(*)
    FROM new_rows d JOIN agents a ON a.id = d.agent_id
    GROUP BY 1, 2, 3, 4;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO nhi_counts (platform, kind, environment, status, n)
    SELECT d.platform, d.kind, a.environment, d.status, -count(*)
    FROM old_rows d JOIN agents a ON a.id = d.agent_id
    GROUP BY 1, 2, 3, 4;
  ELSE
    INSERT INTO nhi_counts (platform, kind, environment, status, n)
    SELECT d.platform, d.kind, a.environment, d.status, sum(d.n)
    FROM (SELECT platform, kind, agent_id, status, -1 AS n FROM old_rows
          UNION ALL
          SELECT platform, kind, agent_id, status, 1 AS n FROM new_rows) d
    JOIN agents a ON a.id = d.agent_id
    GROUP BY 1, 2, 3, 4
    HAVING sum(d.n) <> 0;
  END IF;
  RETURN NULL;
END $$;
"""

# TRUNCATE fires no row or statement triggers with transition tables: start over from zero.
RESET_COUNTS = """
CREATE FUNCTION nhi_counts_reset() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM nhi_counts;
  RETURN NULL;
END $$;
"""

# An agent's environment never changes today; if it ever does, its NHIs' counts move with it.
MOVE_AGENT = """
CREATE FUNCTION nhi_counts_agent_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO nhi_counts (platform, kind, environment, status, n)
  SELECT n.platform, n.kind, e.environment, n.status, e.sign * count(*)
  FROM nhis n
  JOIN (SELECT NEW.id AS id, NEW.environment AS environment, 1 AS sign
        UNION ALL SELECT OLD.id, OLD.environment, -1) e ON e.id = n.agent_id
  GROUP BY 1, 2, 3, 4, e.sign;
  RETURN NULL;
END $$;
"""

SEED = """
INSERT INTO nhi_counts (platform, kind, environment, status, n)
SELECT n.platform, n.kind, a.environment, n.status, count(*)
FROM nhis n JOIN agents a ON a.id = n.agent_id
GROUP BY 1, 2, 3, 4
"""


def upgrade() -> None:
    op.create_table(
        "nhi_counts",
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("environment", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
    )
    op.execute(TRACK_NHIS)
    op.execute(RESET_COUNTS)
    op.execute(MOVE_AGENT)
    # Seed and start tracking under one lock, so no NHI changes between the two.
    op.execute("LOCK TABLE nhis IN SHARE ROW EXCLUSIVE MODE")
    op.execute(SEED)
    for event, tables in (
        ("INSERT", "NEW TABLE AS new_rows"),
        ("UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
        ("DELETE", "OLD TABLE AS old_rows"),
    ):
        op.execute(
            f"CREATE TRIGGER nhis_counts_{event.lower()} AFTER {event} ON nhis"
            f" REFERENCING {tables} FOR EACH STATEMENT EXECUTE FUNCTION nhi_counts_track()"
        )
    op.execute(
        "CREATE TRIGGER nhis_counts_truncate AFTER TRUNCATE ON nhis"
        " FOR EACH STATEMENT EXECUTE FUNCTION nhi_counts_reset()"
    )
    op.execute(
        "CREATE TRIGGER agents_counts_environment AFTER UPDATE OF environment ON agents"
        " FOR EACH ROW WHEN (OLD.environment IS DISTINCT FROM NEW.environment)"
        " EXECUTE FUNCTION nhi_counts_agent_moved()"
    )
    op.create_index(
        "ix_nhis_usable_expires_at",
        "nhis",
        ["expires_at"],
        postgresql_include=["platform", "kind", "agent_id"],
        postgresql_where=sa.text(USABLE),
    )
    op.create_index(
        "ix_nhis_revoke_failed",
        "nhis",
        ["id"],
        postgresql_where=sa.text("status = 'revoke_failed'"),
    )


def downgrade() -> None:
    op.drop_index("ix_nhis_revoke_failed", table_name="nhis")
    op.drop_index("ix_nhis_usable_expires_at", table_name="nhis")
    op.execute("DROP TRIGGER agents_counts_environment ON agents")
    for event in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER nhis_counts_{event} ON nhis")
    op.execute("DROP FUNCTION nhi_counts_agent_moved()")
    op.execute("DROP FUNCTION nhi_counts_reset()")
    op.execute("DROP FUNCTION nhi_counts_track()")
    op.drop_table("nhi_counts")
