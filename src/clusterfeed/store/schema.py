"""The tables, as this version of clusterfeed writes them.

A new database is created from these definitions in one step; a database made by an
earlier version is brought here by the migrations in ``migrations/``, each of which
carries its own copy of the columns it adds, so later edits here never change what an
old migration does. ``tests/store/test_migrations.py`` checks that replaying every
migration gives exactly these tables.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)


class _UTCDateTime(DateTime):
    """Timestamps are stored and returned in UTC on both databases."""

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)


metadata = MetaData()

schema_info = Table(
    "schema_info",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)

settings = Table(
    "settings",
    metadata,
    Column("key", String(100), primary_key=True),
    Column("value", Text, nullable=False),
)

feeds = Table(
    "feeds",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(300), nullable=False, unique=True),
    Column("url", Text, nullable=False),
    Column("title", Text),
    Column("site_url", Text),
    Column("etag", Text),
    Column("last_modified", Text),
    Column("last_attempt_at", _UTCDateTime()),
    Column("last_success_at", _UTCDateTime()),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("last_warning", Text),
    Column("consecutive_failures", Integer, nullable=False, default=0),
    # Schema version 2: politeness and health (issue 8).
    Column("state", String(20), nullable=False, server_default="new"),
    Column("next_attempt_at", _UTCDateTime()),
    Column("failing_since", _UTCDateTime()),
    Column("moved_to", Text),
    Column("discovered_url", Text),
)

# One row per incident an operator was (or is to be) told about; the unique key is
# what makes "once per incident, not every cycle" hold across restarts and workers.
alerts = Table(
    "alerts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("feed_id", Integer, ForeignKey("feeds.id"), nullable=False),
    Column("incident", String(300), nullable=False),
    Column("message", Text, nullable=False),
    Column("created_at", _UTCDateTime(), nullable=False),
    UniqueConstraint("feed_id", "incident", name="uq_alerts_feed_incident"),
)

stories = Table(
    "stories",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(100), nullable=False, unique=True),
    Column("first_seen_at", _UTCDateTime(), nullable=False),
    Column("updated_at", _UTCDateTime(), nullable=False),
    Column("published_at", _UTCDateTime(), nullable=False),
)

entries = Table(
    "entries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("feed_id", Integer, ForeignKey("feeds.id"), nullable=False),
    Column("story_id", Integer, ForeignKey("stories.id"), nullable=False),
    Column("identity", String(1100), nullable=False),
    Column("guid", Text),
    Column("link", Text),
    Column("link_key", String(2000)),
    Column("title", Text, nullable=False),
    Column("summary_html", Text, nullable=False),
    Column("summary_text", Text, nullable=False),
    Column("content_html", Text, nullable=False),
    Column("image_url", Text),
    Column("image_alt", Text),
    Column("author", Text),
    Column("topics", JSON, nullable=False),
    Column("language", String(20), nullable=False),
    Column("published_at", _UTCDateTime(), nullable=False),
    Column("updated_at", _UTCDateTime(), nullable=False),
    Column("first_seen_at", _UTCDateTime(), nullable=False),
    Column("content_hash", String(64), nullable=False),
    # The publication date as the partner gave it, even when it lies in the future
    # (``published_at`` is then clamped to the time it was first seen, for readers).
    # Story matching compares these: a feed whose dates all lie ahead must not look
    # as if every item appeared at the same moment. Filled for every row.
    Column("dated_at", _UTCDateTime()),
    # Schema version 3: why this entry joined its story (empty for the first one).
    Column("join_reason", Text),
    UniqueConstraint("feed_id", "identity", name="uq_entries_feed_identity"),
)
Index("ix_entries_link_key", entries.c.link_key)
Index("ix_entries_guid", entries.c.guid)
Index("ix_entries_story", entries.c.story_id)
Index("ix_entries_dated", entries.c.dated_at)

subscribers = Table(
    "subscribers",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    Column("name", Text),
    Column("topics", JSON, nullable=False),
    Column("languages", JSON, nullable=False),
    Column("frequency", String(20), nullable=False, default="daily"),
    Column("active", Boolean, nullable=False, default=True),
    Column("origin", String(20), nullable=False, default="config"),
    Column("created_at", _UTCDateTime(), nullable=False),
    # Schema version 4: consent state. ``status`` is pending | confirmed | unsubscribed |
    # removed; ``paused`` keeps a confirmed subscriber but sends nothing. ``active`` is
    # kept in step (confirmed and not paused) for readers of older versions.
    Column("status", String(20), nullable=False, server_default="confirmed"),
    Column("paused", Boolean, nullable=False, server_default="0"),
    Column("confirmed_at", _UTCDateTime()),
    Column("unsubscribed_at", _UTCDateTime()),
    # The preferences the config last gave, so a subscriber's own changes survive a
    # restart and only an edit of the config overrides them.
    Column("config_prefs", JSON),
    # Schema version 5 (delivery): permanent refusals in a row, and since when the
    # address counts as bouncing (skipped by digests until the operator clears it).
    Column("hard_bounces", Integer, nullable=False, server_default="0"),
    Column("bouncing_since", _UTCDateTime()),
)

# Schema version 4: the consent record. One row per change of consent, kept as long as
# the subscriber exists and deleted with them on erase. ``ip_hash`` is a keyed hash:
# enough to see that two requests came from one client, never the address itself.
consents = Table(
    "consents",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("subscriber_id", Integer, ForeignKey("subscribers.id"), nullable=False),
    Column("at", _UTCDateTime(), nullable=False),
    Column("action", String(20), nullable=False),
    Column("form_version", String(50)),
    Column("choices", JSON, nullable=False),
    Column("ip_hash", String(64)),
)
Index("ix_consents_subscriber", consents.c.subscriber_id)

# Keyed hashes of erased addresses: enough to refuse a re-import, nothing to read back.
suppressions = Table(
    "suppressions",
    metadata,
    Column("email_hash", String(64), primary_key=True),
    Column("at", _UTCDateTime(), nullable=False),
)

# Sign-up attempts by key (a hashed address or client), for rate limits that hold
# across processes and restarts. Old rows are pruned as new ones come in.
rate_events = Table(
    "rate_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(100), nullable=False),
    Column("at", _UTCDateTime(), nullable=False),
)
Index("ix_rate_events_key_at", rate_events.c.key, rate_events.c.at)

digests = Table(
    "digests",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(200), nullable=False, unique=True),
    Column("created_at", _UTCDateTime(), nullable=False),
    Column("slot_at", _UTCDateTime(), nullable=False),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("digest_id", Integer, ForeignKey("digests.id"), nullable=False),
    Column("subscriber_id", Integer, ForeignKey("subscribers.id"), nullable=False),
    Column("state", String(20), nullable=False),  # pending | sending | sent | failed
    Column("story_ids", JSON, nullable=False),
    Column("message_id", String(300), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("claimed_by", String(200)),
    Column("claimed_at", _UTCDateTime()),
    Column("sent_at", _UTCDateTime()),
    # Schema version 5: a deferred delivery waits until then (NULL: due now).
    Column("next_attempt_at", _UTCDateTime()),
    # Schema version 8: the subscriber's stories the cap (digest.max_stories) left out
    # of this mail (NULL: none). They are on the digest's web version and count as
    # offered to the subscriber, so they are not mailed on their own later.
    Column("left_out_ids", JSON),
    UniqueConstraint("digest_id", "subscriber_id", name="uq_deliveries_digest_subscriber"),
)
Index("ix_deliveries_state", deliveries.c.state)

sent_stories = Table(
    "sent_stories",
    metadata,
    Column("subscriber_id", Integer, ForeignKey("subscribers.id"), primary_key=True),
    Column("story_id", Integer, ForeignKey("stories.id"), primary_key=True),
    Column("delivery_id", Integer, ForeignKey("deliveries.id"), nullable=False),
)
# Schema version 6: planning a digest asks who already had the few stories that may go
# into it, by story; the primary key only serves questions by subscriber.
Index("ix_sent_stories_story", sent_stories.c.story_id)

# Schema version 7: what story matching reads of an entry, computed once when the entry
# is first matched: the embedding of its title and lead (float16) and the evidence
# (names, numbers, links) as JSON. ``fingerprint`` says from which text and encoder.
story_features = Table(
    "story_features",
    metadata,
    Column("entry_id", Integer, ForeignKey("entries.id"), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("vector", LargeBinary, nullable=False),
    Column("evidence", JSON, nullable=False),
)

# Schema version 9: story corrections made with ``clusterfeed stories split``: the
# items at two pages (their link keys, in sorted order) are never one story. Kept by
# page, as the config's ``apart`` pairs are, so they hold for any later copy of a page.
story_corrections = Table(
    "story_corrections",
    metadata,
    Column("link_a", String(2000), primary_key=True),
    Column("link_b", String(2000), primary_key=True),
    Column("verdict", String(20), nullable=False),  # apart
    Column("created_at", _UTCDateTime(), nullable=False),
)

# The schema version this code writes: the number of the newest migration under
# ``migrations/versions`` (its revision id is this number, zero-padded to four digits).
SCHEMA_VERSION = 10
