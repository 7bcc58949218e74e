"""Schema version 4: consent. Subscribers get a status (pending, confirmed,
unsubscribed, removed), a pause and the preferences the config last gave; the consent
record, the suppressed (erased) addresses and the sign-up rate limits get tables.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column(
        "subscribers",
        sa.Column("status", sa.String(20), nullable=False, server_default="confirmed"),
    )
    op.add_column(
        "subscribers", sa.Column("paused", sa.Boolean, nullable=False, server_default="0")
    )
    op.add_column("subscribers", sa.Column("confirmed_at", sa.DateTime(timezone=True)))
    op.add_column("subscribers", sa.Column("unsubscribed_at", sa.DateTime(timezone=True)))
    op.add_column("subscribers", sa.Column("config_prefs", sa.JSON))
    subscribers = sa.table(
        "subscribers",
        sa.column("active", sa.Boolean),
        sa.column("status", sa.String),
        sa.column("confirmed_at", sa.DateTime(timezone=True)),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    # Everyone already in the store came from the config, whose consent the operator
    # holds: active ones are confirmed (since they were added), the others removed.
    op.execute(
        subscribers.update()
        .where(subscribers.c.active.is_(True))
        .values(status="confirmed", confirmed_at=subscribers.c.created_at)
    )
    op.execute(subscribers.update().where(subscribers.c.active.is_(False)).values(status="removed"))
    present = set(sa.inspect(op.get_bind()).get_table_names())
    if "consents" not in present:
        op.create_table(
            "consents",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("subscriber_id", sa.Integer, sa.ForeignKey("subscribers.id"), nullable=False),
            sa.Column("at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("action", sa.String(20), nullable=False),
            sa.Column("form_version", sa.String(50)),
            sa.Column("choices", sa.JSON, nullable=False),
            sa.Column("ip_hash", sa.String(64)),
        )
        op.create_index("ix_consents_subscriber", "consents", ["subscriber_id"])
    if "suppressions" not in present:
        op.create_table(
            "suppressions",
            sa.Column("email_hash", sa.String(64), primary_key=True),
            sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        )
    if "rate_events" not in present:
        op.create_table(
            "rate_events",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("key", sa.String(100), nullable=False),
            sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        )
        op.create_index("ix_rate_events_key_at", "rate_events", ["key", "at"])
