"""Databases as earlier versions of clusterfeed left them, made from a current one.

``back_to_version(conn, n)`` undoes, newest first, what each schema version after ``n``
added, with plain SQL written here (not the migrations under test), and records version
``n`` the way an Alembic-era release would. ``as_previous_release`` then removes
Alembic's record, leaving only ``schema_info``: a store made by the last release
before the migrations moved to Alembic.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.engine import Connection

from clusterfeed.store import SCHEMA_VERSION, schema_info

V2_FEED_COLUMNS = ("state", "next_attempt_at", "failing_since", "moved_to", "discovered_url")
V4_SUBSCRIBER_COLUMNS = ("status", "paused", "confirmed_at", "unsubscribed_at", "config_prefs")
V4_TABLES = ("consents", "suppressions", "rate_events")
V5_COLUMNS = (
    ("deliveries", "next_attempt_at"),
    ("subscribers", "hard_bounces"),
    ("subscribers", "bouncing_since"),
)

# What each version added, as the SQL that takes it away again; UNDO[n] leaves version n.
UNDO: dict[int, tuple[str, ...]] = {
    9: ("DROP INDEX ix_entries_dated", "ALTER TABLE entries DROP COLUMN dated_at"),
    8: ("DROP TABLE story_corrections",),
    7: ("ALTER TABLE deliveries DROP COLUMN left_out_ids",),
    6: ("DROP TABLE story_features",),
    5: ("DROP INDEX ix_sent_stories_story",),
    4: tuple(f"ALTER TABLE {table} DROP COLUMN {column}" for table, column in V5_COLUMNS),
    3: (
        *(f"DROP TABLE {table}" for table in V4_TABLES),
        *(f"ALTER TABLE subscribers DROP COLUMN {column}" for column in V4_SUBSCRIBER_COLUMNS),
    ),
    2: ("ALTER TABLE entries DROP COLUMN join_reason",),
    1: (
        "DROP TABLE alerts",
        *(f"ALTER TABLE feeds DROP COLUMN {column}" for column in V2_FEED_COLUMNS),
    ),
}


def back_to_version(conn: Connection, version: int) -> None:
    """Turn a current database into what ``version`` wrote."""
    for older in range(SCHEMA_VERSION - 1, version - 1, -1):
        for statement in UNDO[older]:
            conn.exec_driver_sql(statement)
    conn.execute(update(schema_info).values(version=version))
    conn.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{version:04d}'")


def as_previous_release(conn: Connection) -> None:
    """Leave only ``schema_info``, as releases before Alembic did."""
    conn.exec_driver_sql("DROP TABLE alembic_version")
