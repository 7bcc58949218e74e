"""Schema version 2: politeness and health of each feed, and alerts to the operator.

A feed gets a state, its next attempt, since when it fails and the addresses it moved
to or announced; ``alerts`` records each incident the operator was told about, once.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("feeds", sa.Column("state", sa.String(20), nullable=False, server_default="new"))
    op.add_column("feeds", sa.Column("next_attempt_at", sa.DateTime(timezone=True)))
    op.add_column("feeds", sa.Column("failing_since", sa.DateTime(timezone=True)))
    op.add_column("feeds", sa.Column("moved_to", sa.Text))
    op.add_column("feeds", sa.Column("discovered_url", sa.Text))
    if not sa.inspect(op.get_bind()).has_table("alerts"):
        op.create_table(
            "alerts",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("feed_id", sa.Integer, sa.ForeignKey("feeds.id"), nullable=False),
            sa.Column("incident", sa.String(300), nullable=False),
            sa.Column("message", sa.Text, nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.UniqueConstraint("feed_id", "incident", name="uq_alerts_feed_incident"),
        )
    feeds = sa.table(
        "feeds",
        sa.column("state", sa.String),
        sa.column("failing_since", sa.DateTime(timezone=True)),
        sa.column("last_attempt_at", sa.DateTime(timezone=True)),
        sa.column("last_success_at", sa.DateTime(timezone=True)),
        sa.column("consecutive_failures", sa.Integer),
    )
    # Feeds that were failing when the upgrade ran count as failing since their last
    # attempt; feeds that answered before are "ok"; the others stay "new".
    op.execute(
        feeds.update()
        .where(feeds.c.consecutive_failures > 0)
        .values(state="failing", failing_since=feeds.c.last_attempt_at)
    )
    op.execute(
        feeds.update()
        .where(feeds.c.consecutive_failures == 0, feeds.c.last_success_at.is_not(None))
        .values(state="ok")
    )
