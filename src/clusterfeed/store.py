"""All state, in SQLite or PostgreSQL, through one class.

SQLAlchemy Core (not the ORM) keeps the SQL visible and lets the same statements run
on both databases; the URL alone picks one. Every unit of work has a key here: a feed
by its name, an entry by (feed, identity), a story by its key, a digest by its slot,
a delivery by (digest, subscriber). Writes that belong together happen in one
transaction, so a crash leaves either the old state or the new one, never half.

The schema carries a version; ``MIGRATIONS`` lists the steps from each version to the
next, and ``Store.migrate`` applies the missing ones at start-up, in order.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
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
    and_,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from clusterfeed.digest.planning import OutboxFacts
from clusterfeed.ingest.dedup import EntryChange, plan_feed_update
from clusterfeed.model import (
    Consent,
    Entry,
    FeedStatus,
    Membership,
    PollFacts,
    Source,
    Story,
    Subscriber,
)
from clusterfeed.stories.cluster import Match
from clusterfeed.stories.features import ItemFeatures, StoryItem
from clusterfeed.stories.matcher import StoryMatcher
from clusterfeed.stories.split import SplitResult


class StoreError(Exception):
    """The database cannot be used; the message says which and why."""


class _UTCDateTime(DateTime):
    """Timestamps are stored and returned in UTC on both databases."""

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


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

SCHEMA_VERSION = 10

# Writers take one lock for the length of their transaction. Store writes are short
# (one feed's entries, one outbox row), so one lock costs little and rules out the
# races between "is there a story for this link?" and "insert a new story".
_WRITING: ContextVar[bool] = ContextVar("clusterfeed_store_writing", default=False)
_LOCK_KEY = 0x636C7573  # "clus"


def _create_current(conn: Connection) -> None:
    """A new database gets today's schema in one step, not by replaying history."""
    metadata.create_all(conn)


def _add_columns(conn: Connection, table: Table, names: Sequence[str]) -> None:
    for name in names:
        column = table.c[name]
        ddl = column.type.compile(dialect=conn.dialect)
        default = ""
        if column.server_default is not None:
            default = f" DEFAULT '{column.server_default.arg}' NOT NULL"  # type: ignore[attr-defined]
        conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {name} {ddl}{default}")


def _migrate_1_to_2(conn: Connection) -> None:
    _add_columns(
        conn,
        feeds,
        ["state", "next_attempt_at", "failing_since", "moved_to", "discovered_url"],
    )
    alerts.create(conn, checkfirst=True)
    # Feeds that were failing when the upgrade ran count as failing since their last attempt.
    conn.execute(
        update(feeds)
        .where(feeds.c.consecutive_failures > 0)
        .values(state="failing", failing_since=feeds.c.last_attempt_at)
    )
    conn.execute(
        update(feeds)
        .where(feeds.c.consecutive_failures == 0, feeds.c.last_success_at.is_not(None))
        .values(state="ok")
    )


def _migrate_2_to_3(conn: Connection) -> None:
    _add_columns(conn, entries, ["join_reason"])


def _migrate_3_to_4(conn: Connection) -> None:
    _add_columns(
        conn,
        subscribers,
        ["status", "paused", "confirmed_at", "unsubscribed_at", "config_prefs"],
    )
    # Everyone already in the store came from the config, whose consent the operator
    # holds: active ones are confirmed (since they were added), the others removed.
    conn.execute(
        update(subscribers)
        .where(subscribers.c.active.is_(True))
        .values(status="confirmed", confirmed_at=subscribers.c.created_at)
    )
    conn.execute(
        update(subscribers).where(subscribers.c.active.is_(False)).values(status="removed")
    )
    for table in (consents, suppressions, rate_events):
        table.create(conn, checkfirst=True)
    for index in (*consents.indexes, *rate_events.indexes):
        index.create(conn, checkfirst=True)


def _migrate_4_to_5(conn: Connection) -> None:
    # Pending rows get no next_attempt_at: they are due at once, as they were before.
    _add_columns(conn, deliveries, ["next_attempt_at"])
    _add_columns(conn, subscribers, ["hard_bounces", "bouncing_since"])


def _migrate_5_to_6(conn: Connection) -> None:
    for index in sent_stories.indexes:
        index.create(conn, checkfirst=True)


def _migrate_6_to_7(conn: Connection) -> None:
    # Features are computed on demand: entries stored before the upgrade get theirs the
    # first time a new item's window reaches them.
    story_features.create(conn, checkfirst=True)


def _migrate_7_to_8(conn: Connection) -> None:
    # Earlier digests left nothing out on record (NULL), as before.
    _add_columns(conn, deliveries, ["left_out_ids"])


def _migrate_8_to_9(conn: Connection) -> None:
    story_corrections.create(conn, checkfirst=True)


def _migrate_9_to_10(conn: Connection) -> None:
    # Rows stored before kept only the clamped date: it is the best stated date left.
    _add_columns(conn, entries, ["dated_at"])
    conn.execute(update(entries).values(dated_at=entries.c.published_at))
    for index in entries.indexes:
        if index.name == "ix_entries_dated":
            index.create(conn, checkfirst=True)


# MIGRATIONS[n] brings a version-n+1 database to version n+2 (version 1 was the first
# released schema). Append, never edit: a database in the field may be at any version.
MIGRATIONS: list[Callable[[Connection], None]] = [
    _migrate_1_to_2,
    _migrate_2_to_3,
    _migrate_3_to_4,
    _migrate_4_to_5,
    _migrate_5_to_6,
    _migrate_6_to_7,
    _migrate_7_to_8,
    _migrate_8_to_9,
    _migrate_9_to_10,
]


class PlannedDelivery(NamedTuple):
    """One outbox row to write: the subscriber, the ids of the stories its mail shows,
    its Message-ID, and the ids of the subscriber's stories the cap left out."""

    subscriber: Subscriber
    story_ids: Sequence[int]
    message_id: str
    left_out: Sequence[int] = ()


@dataclass(frozen=True)
class Delivery:
    """One (digest, subscriber) row of the outbox."""

    id: int
    digest_id: int
    digest_key: str
    digest_slot: datetime
    subscriber: Subscriber
    story_ids: tuple[int, ...]
    message_id: str
    state: str
    attempts: int
    # When the digest was built: retries stop once it is older than the configured age.
    digest_created: datetime | None = None
    last_error: str | None = None
    # The subscriber's stories the cap left out of this mail (see PlannedDelivery).
    left_out: tuple[int, ...] = ()


@dataclass(frozen=True)
class Bouncing:
    """An address that refused mail for good several times in a row."""

    email: str
    since: datetime
    refusals: int
    last_error: str | None


@dataclass(frozen=True)
class DigestRecord:
    """A digest that has outbox rows: what its web version is named and dated by."""

    id: int
    key: str
    slot: datetime


@dataclass(frozen=True)
class FeedUpdateSummary:
    new_entries: int
    updated_entries: int
    new_stories: int


def worker_id() -> str:
    """Who holds a claim: host and process, so a restarted process can tell its own dead claims."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _claim_is_dead(
    claimed_by: str | None, claimed_at: datetime | None, lease: timedelta, now: datetime
) -> bool:
    if not claimed_by or claimed_at is None:
        return True
    # "host:pid", or "host:pid/run" for one of several sending runs in one process.
    host, _, pid = claimed_by.split("/", 1)[0].rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        if int(pid) == os.getpid():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return now - claimed_at > lease


class SentRecorder:
    """Records that the server accepted a message: one commit per message, on a
    database connection of its own for a whole sending run.

    This commit is what bounds the duplicate window, so it runs once per message,
    before that SMTP connection takes its next one. Through SQLAlchemy's connection
    pool, transaction events and statement cache it cost about three times what the
    database itself spends on it (0.45 against 0.15 ms a message on a 2-core machine,
    a tenth of the sending process's time), so these few statements are written out
    in SQL once and run on the driver's connection. The SQL is the same on SQLite and
    PostgreSQL except for the parameter style; timestamps go through the column
    type's own conversion, so they are stored exactly as everywhere else.
    """

    _UPDATE = (
        "UPDATE deliveries SET state = 'sent', sent_at = :now, last_error = NULL,"
        " next_attempt_at = NULL, attempts = attempts + 1"
        " WHERE id = :did AND state = 'sending'"
    )
    _MINE = " AND claimed_by = :by"
    # A story the subscriber already had (sent again by an earlier digest) is
    # skipped by the database, which saves a query per message.
    _STORIES = (
        "INSERT INTO sent_stories (subscriber_id, story_id, delivery_id)"
        " VALUES (:sid, :story, :did) ON CONFLICT DO NOTHING"
    )
    # A delivered message ends a run of permanent refusals.
    _BOUNCES = "UPDATE subscribers SET hard_bounces = 0 WHERE id = :sid AND hard_bounces > 0"

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        self._sqlite = dialect.name == "sqlite"

        def sql(statement: str) -> str:
            if self._sqlite:
                return statement  # sqlite3 takes :name as it is
            return re.sub(r":(\w+)", r"%(\1)s", statement)

        self._update_any = sql(self._UPDATE)
        self._update_mine = sql(self._UPDATE + self._MINE)
        self._stories = sql(self._STORIES)
        self._bounces = sql(self._BOUNCES)
        self._lock = sql("SELECT pg_advisory_xact_lock(:key)")
        convert = deliveries.c.sent_at.type.dialect_impl(dialect).bind_processor(dialect)
        self._timestamp: Callable[[datetime], Any] = convert or (lambda v: v)
        self._errors: type[Exception] = dialect.loaded_dbapi.Error
        self._raw = engine.raw_connection()

    def record(self, delivery: Delivery, now: datetime, claimed_by: str | None = None) -> bool:
        """Mark ``delivery`` sent and its stories as had, in one commit; False (and
        nothing written) if the row is not this worker's claim any more."""
        params: dict[str, Any] = {"did": delivery.id, "now": self._timestamp(now)}
        if claimed_by is not None:
            params["by"] = claimed_by
        raw = self._raw
        cursor = raw.cursor()
        try:
            if self._sqlite:
                cursor.execute("BEGIN IMMEDIATE")
            else:  # the writers' lock that ``Store._tx`` takes
                cursor.execute(self._lock, {"key": _LOCK_KEY})
            cursor.execute(self._update_any if claimed_by is None else self._update_mine, params)
            if cursor.rowcount != 1:
                raw.rollback()
                return False
            sid, did = delivery.subscriber.id, delivery.id
            if delivery.story_ids:
                cursor.executemany(
                    self._stories,
                    [
                        {"sid": sid, "story": s, "did": did}
                        for s in dict.fromkeys(delivery.story_ids)
                    ],
                )
            cursor.execute(self._bounces, {"sid": sid})
            raw.commit()
        except self._errors as exc:
            self._roll_back()
            raise StoreError(
                f"could not record that the message to {delivery.subscriber.email} was "
                f"accepted: {exc}. It goes back to the queue and is sent again by the next "
                "run; check that the database is reachable and has free space"
            ) from exc
        except BaseException:
            self._roll_back()
            raise
        finally:
            cursor.close()
        return True

    def _roll_back(self) -> None:
        # After a lost connection the rollback fails too; the first error is the news.
        with contextlib.suppress(self._errors):
            self._raw.rollback()

    def close(self) -> None:
        self._raw.close()  # back to the pool

    def __enter__(self) -> SentRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Store:
    """The one gateway to the database."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        connect_args: dict[str, Any] = {}
        if url.startswith("sqlite"):
            connect_args = {"timeout": 30, "check_same_thread": False}
        try:
            self.engine: Engine = create_engine(
                url, echo=echo, connect_args=connect_args, future=True
            )
        except Exception as exc:  # bad URL or a missing driver: tell the operator which
            raise StoreError(f"cannot use database {self._safe_url()}: {exc}") from exc
        if url.startswith("sqlite"):
            self._tune_sqlite(self.engine)

    def _safe_url(self) -> str:
        try:
            from sqlalchemy.engine import make_url

            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:
            return "(unparseable URL)"

    @staticmethod
    def _tune_sqlite(engine: Engine) -> None:
        # WAL lets readers go on while a cycle writes; a busy timeout lets a second
        # process wait for the lock instead of failing.
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        # A write transaction takes the write lock when it begins (BEGIN IMMEDIATE), not
        # at its first write: two feeds' updates that both look for a matching story
        # then run one after the other instead of both deciding "new story".
        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if _WRITING.get() else "BEGIN")

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """A write transaction, serialized against other writers on both databases."""
        token = _WRITING.set(True)
        try:
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
                yield conn
        finally:
            _WRITING.reset(token)

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ---------------------------------------------------------------

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            if not self.engine.dialect.has_table(conn, "schema_info"):
                return 0
            version = conn.execute(select(schema_info.c.version)).scalar()
            return int(version or 0)

    def migrate(self) -> int:
        """Bring the schema to the current version; safe to call on every start."""
        try:
            # Inside the try: a folder that cannot be made (a file of that name is in
            # the way) is an operator's mistake to report, not a traceback.
            if self.url.startswith("sqlite:///"):
                path = self.url.removeprefix("sqlite:///")
                if path and path != ":memory:":
                    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            current = self.schema_version()
        except Exception as exc:
            raise StoreError(f"cannot open database {self._safe_url()}: {exc}") from exc
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"database {self._safe_url()} has schema version {current}, newer than this "
                f"clusterfeed understands ({SCHEMA_VERSION}); upgrade clusterfeed"
            )
        if current == 0:
            # Looked at again under the writers' lock: workers and the scheduler starting
            # together on a new database must create it once, not each of them.
            with self._tx() as conn:
                if not self.engine.dialect.has_table(conn, "schema_info"):
                    _create_current(conn)
                    conn.execute(insert(schema_info).values(id=1, version=SCHEMA_VERSION))
                    return SCHEMA_VERSION
            current = self.schema_version()
        for version in range(current, SCHEMA_VERSION):
            # One transaction per step: PostgreSQL and SQLite both run DDL in transactions,
            # so a failed step leaves the database at the previous version, not half-way.
            with self._tx() as conn:
                if conn.execute(select(schema_info.c.version)).scalar() != version:
                    continue  # another process starting beside this one took the step
                MIGRATIONS[version - 1](conn)
                conn.execute(update(schema_info).values(version=version + 1))
        return SCHEMA_VERSION

    # -- settings ---------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            value = conn.execute(select(settings.c.value).where(settings.c.key == key)).scalar()
            return None if value is None else str(value)

    def setting_or_create(self, key: str, make: Callable[[], str]) -> str:
        """Read a setting, creating it once; two processes racing agree on one value."""
        existing = self.get_setting(key)
        if existing is not None:
            return existing
        made = make()  # before the transaction: making it may read or write settings
        try:
            with self._tx() as conn:
                conn.execute(insert(settings).values(key=key, value=made))
        except IntegrityError:
            pass
        value = self.get_setting(key)
        assert value is not None
        return value

    def put_setting(self, key: str, value: str) -> None:
        """Set a setting, replacing what it held."""
        with self._tx() as conn:
            changed = conn.execute(
                update(settings).where(settings.c.key == key).values(value=value)
            )
            if not changed.rowcount:
                conn.execute(insert(settings).values(key=key, value=value))

    def reschedule(self, next_attempts: Mapping[str, datetime]) -> None:
        """Move feeds' next attempts (by feed name), e.g. after the interval changed."""
        if not next_attempts:
            return
        with self._tx() as conn:
            for name, when in next_attempts.items():
                conn.execute(update(feeds).where(feeds.c.name == name).values(next_attempt_at=when))

    def secret(self) -> str:
        """A signing secret that survives restarts when none is configured."""
        return self.setting_or_create("signing_secret", lambda: secrets.token_urlsafe(32))

    # -- feeds ------------------------------------------------------------------

    def sync_feeds(self, configured: Iterable[tuple[str, str, str | None]]) -> None:
        """Make sure every configured feed has a row; a changed URL forgets old validators.

        Runs at every start of every command: the rows are read in one query and only
        what differs from the config is written (500 feeds: one statement, not 1,000).
        """
        with self._tx() as conn:
            stored = {
                row.name: row
                for row in conn.execute(
                    select(feeds.c.id, feeds.c.name, feeds.c.url, feeds.c.site_url)
                )
            }
            for name, url, site in configured:
                row = stored.get(name)
                if row is None:
                    conn.execute(
                        insert(feeds).values(
                            name=name, url=url, site_url=site, consecutive_failures=0
                        )
                    )
                elif row.url != url:
                    # The operator changed the URL: a fresh start for that feed, with
                    # no validators, no back-off and no stale "moved" or "gone" verdict.
                    conn.execute(
                        update(feeds)
                        .where(feeds.c.id == row.id)
                        .values(
                            url=url,
                            site_url=site,
                            etag=None,
                            last_modified=None,
                            state="new",
                            next_attempt_at=None,
                            failing_since=None,
                            consecutive_failures=0,
                            moved_to=None,
                            discovered_url=None,
                        )
                    )
                elif row.site_url != site:
                    conn.execute(update(feeds).where(feeds.c.id == row.id).values(site_url=site))

    def feed_validators(self, name: str) -> tuple[str | None, str | None]:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(feeds.c.etag, feeds.c.last_modified).where(feeds.c.name == name)
            ).first()
            return (row.etag, row.last_modified) if row else (None, None)

    @staticmethod
    def _poll_values(poll: PollFacts | None) -> dict[str, Any]:
        if poll is None:
            return {}
        values: dict[str, Any] = {"state": poll.state, "next_attempt_at": poll.next_attempt}
        # Only overwritten when this attempt learnt something: the next fetch goes to the
        # new address directly and sees no redirect, which must not erase what we know.
        if poll.moved_to:
            values["moved_to"] = poll.moved_to
        if poll.discovered_url:
            values["discovered_url"] = poll.discovered_url
        return values

    def record_failure(
        self,
        name: str,
        *,
        status: int | None,
        error: str,
        now: datetime,
        poll: PollFacts | None = None,
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                update(feeds)
                .where(feeds.c.name == name)
                .values(
                    last_attempt_at=now,
                    last_status=status,
                    last_error=error,
                    consecutive_failures=feeds.c.consecutive_failures + 1,
                    failing_since=func.coalesce(feeds.c.failing_since, now),
                    **({"state": "failing"} | self._poll_values(poll)),
                )
            )

    def forget_moves(
        self, name: str, *, moved_to: bool, discovered_url: bool, warning: str
    ) -> None:
        """Drop a remembered new address that may no longer be used, saying so.

        The validators go too: they belong to the answers of the forgotten address.
        """
        values: dict[str, Any] = {"last_warning": warning, "etag": None, "last_modified": None}
        if moved_to:
            values["moved_to"] = None
        if discovered_url:
            values["discovered_url"] = None
        with self._tx() as conn:
            conn.execute(update(feeds).where(feeds.c.name == name).values(**values))

    def record_not_modified(
        self,
        name: str,
        *,
        status: int | None,
        etag: str | None,
        last_modified: str | None,
        now: datetime,
        poll: PollFacts | None = None,
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                update(feeds)
                .where(feeds.c.name == name)
                .values(
                    last_attempt_at=now,
                    last_success_at=now,
                    last_status=status,
                    last_error=None,
                    consecutive_failures=0,
                    failing_since=None,
                    etag=etag,
                    last_modified=last_modified,
                    **({"state": "ok"} | self._poll_values(poll)),
                )
            )

    def record_not_modified_many(
        self,
        answers: Sequence[tuple[str, int | None, str | None, str | None, PollFacts]],
        now: datetime,
    ) -> None:
        """``record_not_modified`` for many feeds in one transaction and one statement.

        ``answers`` holds (feed name, status, ETag, Last-Modified, poll facts) per feed.
        A cycle of 304s is mostly this bookkeeping; one transaction per feed cost more
        than the UPDATE itself. Each feed's row is still written whole or not at all.
        """
        if not answers:
            return
        with self._tx() as conn:
            conn.execute(
                _STMT.not_modified,
                [
                    {
                        "b_name": name,
                        "b_now": now,
                        "b_status": status,
                        "b_etag": etag,
                        "b_last_modified": last_modified,
                        "b_state": poll.state,
                        "b_next": poll.next_attempt,
                        "b_moved_to": poll.moved_to,
                        "b_discovered_url": poll.discovered_url,
                    }
                    for name, status, etag, last_modified, poll in answers
                ],
            )

    def apply_feed_update(
        self,
        name: str,
        new_entries: Sequence[Entry],
        *,
        status: int | None,
        etag: str | None,
        last_modified: str | None,
        title: str | None,
        warning: str | None,
        now: datetime,
        poll: PollFacts | None = None,
    ) -> FeedUpdateSummary:
        """Store one successful fetch: entries, story links and caching headers, atomically.

        A new entry joins the story of another feed's entry with the same GUID or page,
        else gets a story of its own; joining near-duplicates (other words, other
        links) is ``join_new_stories``, once per cycle.

        The validators are saved in the same transaction as the entries: if the process
        dies before the commit, the next fetch is unconditional and nothing is lost.
        """
        with self._tx() as conn:
            feed_id = conn.execute(select(feeds.c.id).where(feeds.c.name == name)).scalar_one()
            identities = [e.identity for e in new_entries]
            existing: dict[str, tuple[int, str]] = {}
            for chunk in _chunks(identities, 500):
                for row in conn.execute(
                    select(entries.c.identity, entries.c.id, entries.c.content_hash).where(
                        entries.c.feed_id == feed_id, entries.c.identity.in_(chunk)
                    )
                ):
                    existing[row.identity] = (row.id, row.content_hash)
            # Links of unknown entries, looked up among this feed's entries that this
            # fetch no longer lists: a rotated GUID for the same page (see dedup).
            unknown_links = [
                e.link_key for e in new_entries if e.identity not in existing and e.link_key
            ]
            fetched_ids = set(identities)
            by_link: dict[str, tuple[int, str]] = {}
            for chunk in _chunks(unknown_links, 500):
                for link_row in conn.execute(
                    select(entries.c.link_key, entries.c.identity, entries.c.id,
                           entries.c.content_hash)
                    .where(entries.c.feed_id == feed_id, entries.c.link_key.in_(chunk))
                    .order_by(entries.c.id.desc())
                ):  # fmt: skip
                    if link_row.identity not in fetched_ids:
                        by_link.setdefault(link_row.link_key, (link_row.id, link_row.content_hash))
            changes = plan_feed_update(new_entries, existing, by_link)
            summary = self._write_changes(conn, feed_id, changes, now)
            conn.execute(
                update(feeds)
                .where(feeds.c.id == feed_id)
                .values(
                    last_attempt_at=now,
                    last_success_at=now,
                    last_status=status,
                    last_error=None,
                    last_warning=warning,
                    consecutive_failures=0,
                    failing_since=None,
                    etag=etag,
                    last_modified=last_modified,
                    title=title,
                    **({"state": "ok"} | self._poll_values(poll)),
                )
            )
            return summary

    def _write_changes(
        self, conn: Connection, feed_id: int, changes: Sequence[EntryChange], now: datetime
    ) -> FeedUpdateSummary:
        """Apply one feed's planned changes with a handful of statements, whatever their number.

        A first fetch brings a feed's whole backlog (30 items, or 10,000); one INSERT per
        entry and story cost about 20 ms of SQLAlchemy bookkeeping per feed, on the one
        thread that writes. So the lookups go by chunks of keys and the writes are
        executemany calls of statements built once (``_STMT``), which the database
        driver runs in a loop of its own. The result is the same as entry by entry:
        the lookups only see other feeds' rows, which this feed's writes do not change.
        """
        updates = [c for c in changes if c.kind == "update"]
        new = [c.entry for c in changes if c.kind == "new"]
        if updates:
            conn.execute(
                _STMT.update_entry,
                [
                    {"b_id": c.entry_id, "identity": c.entry.identity, **_entry_values(c.entry)}
                    for c in updates
                ],
            )
            ids = [c.entry_id for c in updates]
            touched: set[int] = set()
            for chunk in _chunks(ids, 500):
                touched.update(
                    int(story_id)
                    for story_id in conn.execute(
                        select(entries.c.story_id).where(entries.c.id.in_(chunk))
                    ).scalars()
                )
            conn.execute(
                _STMT.touch_story, [{"b_id": i, "updated_at": now} for i in sorted(touched)]
            )
        if not new:
            return FeedUpdateSummary(0, len(updates), 0)
        matched = self._matching_stories(conn, feed_id, new)
        unmatched = [e for e in new if e.identity not in matched]
        story_ids: dict[str, int] = {}
        if unmatched:
            keys = {f"{feed_id}-{_short_hash(e.identity)}": e.identity for e in unmatched}
            conn.execute(
                _STMT.insert_story,
                [
                    {"key": key, "first_seen_at": now, "updated_at": now,
                     "published_at": e.published}
                    for key, e in zip(keys, unmatched, strict=True)
                ],
            )  # fmt: skip
            for chunk in _chunks(list(keys), 500):
                for row in conn.execute(
                    select(stories.c.id, stories.c.key).where(stories.c.key.in_(chunk))
                ):
                    story_ids[keys[row.key]] = int(row.id)
        for entry in new:
            story_id = matched.get(entry.identity)
            if story_id is not None:
                # A second partner told a story we already have: it gains a source and
                # a new updated date, but stays one story.
                self._touch_story(conn, story_id, now, entry.published)
                story_ids[entry.identity] = story_id
        conn.execute(
            _STMT.insert_entry,
            [
                {
                    "feed_id": feed_id,
                    "story_id": story_ids[e.identity],
                    "identity": e.identity,
                    "first_seen_at": now,
                    "join_reason": "the same page" if e.identity in matched else None,
                    **_entry_values(e),
                }
                for e in new
            ],
        )
        return FeedUpdateSummary(len(new), len(updates), len(unmatched))

    def join_new_stories(self, since: datetime, matcher: StoryMatcher) -> int:
        """Join this cycle's new one-item stories to the story they tell, if any.

        Runs once after all feeds of a cycle are stored, over the new items in order of
        publication, so the result does not depend on which partner's server answered
        first. Only stories created in this cycle are folded into others: nothing that
        readers or subscribers have already seen changes identity. Each entry's
        features (embedding and evidence) are computed the first time it is in a
        window and stored (``story_features``); deciding reads only those
        (``clusterfeed.stories.cluster.join_new``). Returns how many items joined.
        """
        from clusterfeed.stories.cluster import join_new

        with self._tx() as conn:
            new_rows = conn.execute(
                select(entries.c.id, entries.c.story_id, entries.c.dated_at)
                .join(stories, stories.c.id == entries.c.story_id)
                .where(entries.c.first_seen_at >= since, stories.c.first_seen_at >= since)
            ).all()
            if not new_rows:
                return 0
            window = timedelta(days=matcher.model.window_days)
            low = min(_utc(r.dated_at) or r.dated_at for r in new_rows) - window
            high = max(_utc(r.dated_at) or r.dated_at for r in new_rows) + window
            rows = conn.execute(
                select(
                    entries.c.id, entries.c.story_id, entries.c.link, entries.c.identity,
                    entries.c.published_at, entries.c.dated_at, entries.c.content_hash,
                    entries.c.language, entries.c.link_key, feeds.c.name.label("feed_name"),
                )
                .join(feeds, feeds.c.id == entries.c.feed_id)
                .where(entries.c.dated_at >= low, entries.c.dated_at <= high)
            ).all()  # fmt: skip
            feats = self._story_features(conn, rows, matcher)
            story_of = {int(r.id): int(r.story_id) for r in rows}
            links = {int(r.id): r.link for r in rows}
            order = {
                int(r.id): (_utc(r.dated_at) or r.dated_at, r.feed_name, r.identity) for r in rows
            }
            sizes = Counter(story_of.values())
            new_ids = sorted(
                (int(r.id) for r in new_rows if sizes[int(r.story_id)] == 1 and r.id in feats),
                key=lambda i: order[i],
            )
            forced = None
            apart = self._stored_apart(conn, {r.link_key for r in rows if r.link_key})
            keys = {int(r.id): r.link_key for r in rows}
            if matcher.forces_pairs or apart:

                def forced(a: int, b: int) -> str | None:
                    if keys[b] in apart.get(keys[a], ()):
                        return "apart"
                    return matcher.forced_links(links[a], links[b])

            ordered = {i: feats[i] for i in sorted(feats, key=lambda i: (order[i], i))}
            decisions = join_new(ordered, story_of, new_ids, matcher.model, forced=forced)
            if decisions:
                # The story's shown date is its earliest version's clamped date.
                published = {int(r.id): _utc(r.published_at) or r.published_at for r in rows}
                self._write_joins(conn, decisions, new_rows, published, since)
        return len(decisions)

    @staticmethod
    def _stored_apart(conn: Connection, keys: set[str]) -> dict[str, set[str]]:
        """The pages among ``keys`` that ``stories split`` set apart, page -> pages."""
        apart: dict[str, set[str]] = {}
        for chunk in _chunks(sorted(keys), 500):
            for row in conn.execute(
                select(story_corrections.c.link_a, story_corrections.c.link_b).where(
                    story_corrections.c.verdict == "apart",
                    story_corrections.c.link_a.in_(chunk),
                )
            ):
                apart.setdefault(row.link_a, set()).add(row.link_b)
                apart.setdefault(row.link_b, set()).add(row.link_a)
        return apart

    def split_story(self, url: str, now: datetime) -> SplitResult:
        """Take the item at ``url`` out of its story and keep its page apart from the
        pages left there (``clusterfeed.stories.split``)."""
        from clusterfeed.stories.split import split_entry

        with self._tx() as conn:
            return split_entry(conn, url, now)

    @staticmethod
    def _story_features(
        conn: Connection, rows: Sequence[Any], matcher: StoryMatcher
    ) -> dict[int, ItemFeatures]:
        """Every row's stored features; those missing or computed from another text or
        encoder are computed now (in one batch) and stored."""
        from clusterfeed.stories.features import EVIDENCE_VERSION, Evidence, item_features

        prints = {
            int(r.id): _short_hash(
                f"{r.content_hash}\x1f{matcher.encoder.name}\x1f{EVIDENCE_VERSION}"
            )
            for r in rows
        }
        by_id = {int(r.id): r for r in rows}
        stored: dict[int, Any] = {}
        for chunk in _chunks(sorted(prints), 500):
            for row in conn.execute(
                select(story_features).where(story_features.c.entry_id.in_(chunk))
            ):
                stored[int(row.entry_id)] = row
        result: dict[int, ItemFeatures] = {}
        missing: list[int] = []
        for i, fingerprint in prints.items():
            found = stored.get(i)
            if found is None or found.fingerprint != fingerprint:
                missing.append(i)
                continue
            r = by_id[i]
            result[i] = ItemFeatures(
                feed=r.feed_name,
                language=r.language,
                published=_utc(r.dated_at) or r.dated_at,
                vector=np.frombuffer(found.vector, dtype=np.float16).astype(np.float32),
                evidence=Evidence.from_json(found.evidence),
            )
        if not missing:
            return result
        stale = [i for i in missing if i in stored]
        for chunk in _chunks(stale, 500):
            conn.execute(story_features.delete().where(story_features.c.entry_id.in_(chunk)))
        for chunk in _chunks(missing, 500):
            texts = conn.execute(
                select(
                    entries.c.id, entries.c.language, entries.c.title, entries.c.summary_text,
                    entries.c.summary_html, entries.c.content_html, entries.c.link,
                    entries.c.dated_at.label("published_at"), feeds.c.name.label("feed_name"),
                )
                .join(feeds, feeds.c.id == entries.c.feed_id)
                .where(entries.c.id.in_(chunk))
                .order_by(entries.c.id)
            ).all()  # fmt: skip
            computed = item_features([_story_item(t) for t in texts], matcher.encoder)
            conn.execute(
                insert(story_features),
                [
                    {
                        "entry_id": int(t.id),
                        "fingerprint": prints[int(t.id)],
                        "vector": np.asarray(f.vector, dtype=np.float16).tobytes(),
                        "evidence": f.evidence.to_json(),
                    }
                    for t, f in zip(texts, computed, strict=True)
                ],
            )
            result.update({int(t.id): f for t, f in zip(texts, computed, strict=True)})
        return result

    @staticmethod
    def _write_joins(
        conn: Connection,
        decisions: Sequence[tuple[int, int, Match]],
        new_rows: Sequence[Any],
        published: Mapping[int, datetime],
        since: datetime,
    ) -> None:
        """Move the joined items to their stories and drop the stories they leave.

        In a few statements for all of them: a first cycle of 15,000 items joins
        thousands, and five statements each (and a scan of the new rows each, to find
        the story an item left) took longer than deciding the joins.
        """
        left = {int(r.id): int(r.story_id) for r in new_rows}
        conn.execute(
            _STMT.join_entry,
            [
                {
                    "b_id": entry_id,
                    "story_id": story_id,
                    "join_reason": f"score {match.score:.2f}: " + "; ".join(match.reasons),
                }
                for entry_id, story_id, match in decisions
            ],
        )
        # A story changed (a new source): new ``updated``; and its date is that of its
        # earliest version, which is also the one shown (as _touch_story does).
        conn.execute(
            _STMT.touch_story,
            [{"b_id": story_id, "updated_at": since} for _, story_id, _ in decisions],
        )
        conn.execute(
            _STMT.earlier_story,
            [
                {"b_id": story_id, "b_published": published[entry_id]}
                for entry_id, story_id, _ in decisions
            ],
        )
        emptied = sorted({left[entry_id] for entry_id, _, _ in decisions})
        for chunk in _chunks(emptied, 500):
            kept = set(
                conn.execute(
                    select(sent_stories.c.story_id).where(sent_stories.c.story_id.in_(chunk))
                ).scalars()
            )
            gone = [story_id for story_id in chunk if story_id not in kept]
            if gone:
                conn.execute(stories.delete().where(stories.c.id.in_(gone)))

    @staticmethod
    def _touch_story(
        conn: Connection, story_id: int, now: datetime, published: datetime | None = None
    ) -> None:
        """A story changed (an update, a new source): new ``updated``; and its date is
        that of its earliest version, which is also the one shown."""
        conn.execute(update(stories).where(stories.c.id == story_id).values(updated_at=now))
        if published is not None:
            conn.execute(
                update(stories)
                .where(stories.c.id == story_id, stories.c.published_at > published)
                .values(published_at=published)
            )

    @staticmethod
    def _matching_stories(conn: Connection, feed_id: int, new: Sequence[Entry]) -> dict[str, int]:
        """The story another feed already holds for each new entry (the same page).

        Per entry, the earliest other-feed entry with its link key wins, as one
        ``ORDER BY id LIMIT 1`` per entry would say; found by chunks of keys. GUIDs are
        not compared across feeds: many CMSs number items per feed (``news-2861``,
        ``?p=123``), so two feeds' equal GUIDs say nothing about the event.
        """
        first: dict[str, tuple[int, int]] = {}
        values = sorted({e.link_key for e in new if e.link_key})
        for chunk in _chunks(values, 500):
            for row in conn.execute(
                select(entries.c.link_key, entries.c.id, entries.c.story_id).where(
                    entries.c.feed_id != feed_id, entries.c.link_key.in_(chunk)
                )
            ):
                if row.link_key not in first or row.id < first[row.link_key][0]:
                    first[row.link_key] = (int(row.id), int(row.story_id))
        found: dict[str, int] = {}
        for entry in new:
            hit = first.get(entry.link_key) if entry.link_key else None
            if hit is not None:
                found[entry.identity] = hit[1]
        return found

    def feed_statuses(
        self, now: datetime | None = None, *, with_counts: bool = True
    ) -> list[FeedStatus]:
        """Every feed's conversation with its server, and how much it published lately.

        ``with_counts=False`` leaves out the entry counts (0 and None then), which take
        three passes over all entries that a fetch cycle, asking only for validators and
        back-off state, does not need.
        """
        month_ago = (now or datetime.now(UTC)) - timedelta(days=30)
        counts: dict[int, int] = {}
        recent: dict[int, int] = {}
        newest: dict[int, datetime] = {}
        with self.engine.connect() as conn:
            if with_counts:
                counts, recent, newest = self._entry_counts(conn, month_ago)
            result = []
            for row in conn.execute(select(feeds).order_by(feeds.c.name)):
                result.append(
                    FeedStatus(
                        name=row.name,
                        url=row.url,
                        title=row.title,
                        etag=row.etag,
                        last_modified=row.last_modified,
                        last_attempt_at=_utc(row.last_attempt_at),
                        last_success_at=_utc(row.last_success_at),
                        last_status=row.last_status,
                        last_error=row.last_error,
                        last_warning=row.last_warning,
                        consecutive_failures=row.consecutive_failures or 0,
                        entries=int(counts.get(row.id, 0)),
                        state=row.state or "new",
                        next_attempt_at=_utc(row.next_attempt_at),
                        failing_since=_utc(row.failing_since),
                        moved_to=row.moved_to,
                        discovered_url=row.discovered_url,
                        entries_30_days=int(recent.get(row.id, 0)),
                        newest_entry_at=_utc(newest.get(row.id)),
                    )
                )
            return result

    @staticmethod
    def _entry_counts(
        conn: Connection, month_ago: datetime
    ) -> tuple[dict[int, int], dict[int, int], dict[int, datetime]]:
        """Per feed id: entries, entries published since ``month_ago``, newest date."""
        counts: dict[int, int] = dict(
            conn.execute(select(entries.c.feed_id, func.count()).group_by(entries.c.feed_id)).all()
        )
        recent: dict[int, int] = dict(
            conn.execute(
                select(entries.c.feed_id, func.count())
                .where(entries.c.published_at >= month_ago)
                .group_by(entries.c.feed_id)
            ).all()
        )
        newest: dict[int, datetime] = dict(
            conn.execute(
                select(entries.c.feed_id, func.max(entries.c.published_at)).group_by(
                    entries.c.feed_id
                )
            ).all()
        )
        return counts, recent, newest

    # -- operator alerts ------------------------------------------------------------

    def alert_recorded(self, feed_name: str, incident: str) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(alerts.c.id)
                    .join(feeds, feeds.c.id == alerts.c.feed_id)
                    .where(feeds.c.name == feed_name, alerts.c.incident == incident)
                ).first()
                is not None
            )

    def record_alert(self, feed_name: str, incident: str, message: str, now: datetime) -> bool:
        """Remember that the operator was told; False if this incident was already recorded."""
        try:
            with self._tx() as conn:
                feed_id = conn.execute(
                    select(feeds.c.id).where(feeds.c.name == feed_name)
                ).scalar_one()
                conn.execute(
                    insert(alerts).values(
                        feed_id=feed_id, incident=incident, message=message, created_at=now
                    )
                )
        except IntegrityError:
            return False
        return True

    # -- stories ------------------------------------------------------------------

    def recent_stories(
        self,
        *,
        limit: int | None = None,
        since: datetime | None = None,
        exclude_ids: Iterable[int] = (),
        only_ids: Iterable[int] | None = None,
    ) -> list[Story]:
        """Stories newest first (by their representative's publication date)."""
        query = select(stories).order_by(stories.c.published_at.desc(), stories.c.id.desc())
        if since is not None:
            query = query.where(stories.c.first_seen_at >= since)
        excluded = set(exclude_ids)
        if only_ids is not None:
            wanted = list(only_ids)
            if not wanted:
                return []
            query = query.where(stories.c.id.in_(wanted))
        with self.engine.connect() as conn:
            rows = [r for r in conn.execute(query) if r.id not in excluded]
            if limit is not None:
                rows = rows[:limit]
            return self._load_stories(conn, rows)

    def _load_stories(self, conn: Connection, story_rows: Sequence[Any]) -> list[Story]:
        if not story_rows:
            return []
        ids = [r.id for r in story_rows]
        members: dict[int, list[Any]] = {}
        for chunk in _chunks(ids, 500):
            query = (
                select(
                    entries,
                    feeds.c.name.label("feed_name"),
                    feeds.c.title.label("feed_title"),
                    feeds.c.url.label("feed_url"),
                    feeds.c.site_url,
                )
                .join(feeds, feeds.c.id == entries.c.feed_id)
                .where(entries.c.story_id.in_(chunk))
                .order_by(entries.c.first_seen_at, entries.c.id)
            )
            for row in conn.execute(query):
                members.setdefault(row.story_id, []).append(row)
        result = []
        for s in story_rows:
            rows = self._representative_first(members.get(s.id, []))
            if not rows:
                continue
            rep = rows[0]
            topics = sorted({t for r in rows for t in (r.topics or [])})
            sources = tuple(
                Source(
                    feed_name=r.feed_name,
                    feed_title=r.feed_title or r.feed_name,
                    feed_url=r.feed_url,
                    site_url=r.site_url,
                    entry_title=r.title,
                    entry_link=r.link,
                    guid=r.guid,
                    published=_utc(r.published_at),
                    language=r.language,
                    join_reason=r.join_reason,
                )
                for r in rows
            )
            result.append(
                Story(
                    id=s.id,
                    key=s.key,
                    entry=_row_to_entry(rep),
                    sources=sources,
                    topics=tuple(topics),
                    languages=tuple(sorted({r.language for r in rows})),
                    first_seen=_utc(s.first_seen_at) or s.first_seen_at,
                    updated=_utc(s.updated_at) or s.updated_at,
                )
            )
        return result

    def configure_stories(self, representative: str, own_feeds: Iterable[str]) -> None:
        """How a story's representative is chosen: "own" (the cluster's own version
        where there is one, else the most complete), "complete" or "earliest"."""
        self._representative = representative
        self._own_feeds = frozenset(own_feeds)

    def _representative_first(self, rows: Sequence[Any]) -> list[Any]:
        """The story's members, the representative first, then by publication.

        Every rule ends in the same tie-breaks (earliest, then feed name), so the choice
        never depends on which feed happened to answer first in a concurrent cycle.
        """
        by_time = sorted(rows, key=lambda r: (_utc(r.published_at), r.feed_name, r.identity))
        if not by_time:
            return []
        rule = getattr(self, "_representative", "earliest")
        own: frozenset[str] = getattr(self, "_own_feeds", frozenset())

        def completeness(r: Any) -> int:
            return len(r.summary_text or "") + len(r.content_html or "") // 2

        best = by_time[0]
        if rule in ("own", "complete"):
            pool = [r for r in by_time if r.feed_name in own] if rule == "own" else []
            pool = pool or by_time
            best = max(pool, key=lambda r: (completeness(r), -by_time.index(r)))
        return [best, *(r for r in by_time if r is not best)]

    def count_entries(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(entries)).scalar_one())

    def count_stories(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(stories)).scalar_one())

    # -- subscribers ----------------------------------------------------------------

    def sync_subscribers(
        self,
        configured: Iterable[Subscriber],
        now: datetime,
        email_hash: Callable[[str], str] | None = None,
    ) -> list[str]:
        """Mirror the config's subscriber list; return the addresses refused as erased.

        The operator holds the consent of config subscribers, so a new one is confirmed at
        once (and the consent log says "config"). A subscriber's own choices survive a
        restart: preferences are copied from the config only when the config changed
        them. Someone who unsubscribed stays unsubscribed however often the config
        names them, and an erased address (``email_hash`` on the suppression list) is
        not added again. One taken off the config is marked removed; their history stays.
        """
        wanted = {s.email.lower(): s for s in configured}
        refused: list[str] = []
        with self._tx() as conn:
            rows = {
                r.email: r
                for r in conn.execute(select(subscribers).where(subscribers.c.origin == "config"))
            }
            for email, sub in wanted.items():
                prefs = {
                    "name": sub.name,
                    "topics": list(sub.topics),
                    "languages": list(sub.languages),
                    "frequency": sub.frequency,
                }
                existing = conn.execute(
                    select(subscribers).where(subscribers.c.email == email)
                ).first()
                if existing is None:
                    if email_hash is not None and self._suppressed(conn, email_hash(email)):
                        refused.append(email)
                        continue
                    new_id = conn.execute(
                        insert(subscribers)
                        .values(
                            email=email,
                            origin="config",
                            created_at=now,
                            status="confirmed",
                            active=True,
                            paused=False,
                            confirmed_at=now,
                            config_prefs=prefs,
                            **prefs,
                        )
                        .returning(subscribers.c.id)
                    ).scalar_one()
                    self._log_consent(conn, new_id, now, "config", None, prefs, None)
                    continue
                values: dict[str, Any] = {"origin": "config", "config_prefs": prefs}
                if existing.config_prefs != prefs:
                    values.update(prefs)
                if existing.status in ("removed", "pending") or (
                    existing.status == "confirmed" and existing.origin != "config"
                ):
                    values.update(status="confirmed", confirmed_at=existing.confirmed_at or now)
                    values["active"] = not existing.paused
                    if existing.status != "confirmed" or existing.origin != "config":
                        self._log_consent(conn, existing.id, now, "config", None, prefs, None)
                conn.execute(
                    update(subscribers).where(subscribers.c.id == existing.id).values(**values)
                )
            for email, row in rows.items():
                if email not in wanted and row.status in ("confirmed", "pending"):
                    conn.execute(
                        update(subscribers)
                        .where(subscribers.c.id == row.id)
                        .values(active=False, status="removed")
                    )
                    self._log_consent(conn, row.id, now, "remove", None, {}, None)
        return refused

    def active_subscribers(self) -> list[Subscriber]:
        """Who gets digests: confirmed and not paused."""
        with self.engine.connect() as conn:
            return [
                _row_to_subscriber(r)
                for r in conn.execute(
                    select(subscribers)
                    .where(subscribers.c.status == "confirmed", subscribers.c.paused.is_(False))
                    .order_by(subscribers.c.id)
                )
            ]

    def memberships(self) -> list[Membership]:
        """Every subscriber the store knows, in any state, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(subscribers).order_by(subscribers.c.id)).all()
        return [_row_to_membership(r) for r in rows]

    def membership(self, *, email: str | None = None, id: int | None = None) -> Membership | None:
        query = select(subscribers)
        if email is not None:
            query = query.where(subscribers.c.email == email.lower())
        elif id is not None:
            query = query.where(subscribers.c.id == id)
        else:
            raise ValueError("membership() needs an email or an id")
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else _row_to_membership(row)

    def email_of(self, subscriber_id: int) -> str | None:
        """The address behind an id, for checking signed tokens."""
        with self.engine.connect() as conn:
            value = conn.execute(
                select(subscribers.c.email).where(subscribers.c.id == subscriber_id)
            ).scalar()
        return None if value is None else str(value)

    @staticmethod
    def _log_consent(
        conn: Connection,
        subscriber_id: int,
        now: datetime,
        action: str,
        form_version: str | None,
        choices: Mapping[str, Any],
        ip_hash: str | None,
    ) -> None:
        conn.execute(
            insert(consents).values(
                subscriber_id=subscriber_id,
                at=now,
                action=action,
                form_version=form_version,
                choices=dict(choices),
                ip_hash=ip_hash,
            )
        )

    def record_signup(
        self,
        sub: Subscriber,
        now: datetime,
        *,
        status: str,
        origin: str,
        action: str,
        form_version: str | None,
        ip_hash: str | None,
    ) -> Membership:
        """Store a sign-up, import or operator add, and log it as consent.

        A new address gets a row in ``status``; an existing one that does not receive
        digests (pending, unsubscribed, removed) takes the new choices and ``status``; a
        confirmed subscriber keeps their choices and state (asking again changes nothing
        a stranger could use). Either way the attempt is in the consent log.
        """
        email = sub.email.lower()
        prefs = {
            "name": sub.name,
            "topics": list(sub.topics),
            "languages": list(sub.languages),
            "frequency": sub.frequency,
        }
        confirmed = status == "confirmed"
        with self._tx() as conn:
            row = conn.execute(select(subscribers).where(subscribers.c.email == email)).first()
            if row is None:
                subscriber_id = conn.execute(
                    insert(subscribers)
                    .values(
                        email=email,
                        origin=origin,
                        created_at=now,
                        status=status,
                        active=confirmed,
                        paused=False,
                        confirmed_at=now if confirmed else None,
                        **prefs,
                    )
                    .returning(subscribers.c.id)
                ).scalar_one()
            else:
                subscriber_id = row.id
                if row.status != "confirmed":
                    conn.execute(
                        update(subscribers)
                        .where(subscribers.c.id == row.id)
                        .values(
                            status=status,
                            active=confirmed,
                            paused=False,
                            origin=origin,
                            confirmed_at=now if confirmed else None,
                            unsubscribed_at=None,
                            **prefs,
                        )
                    )
            self._log_consent(conn, subscriber_id, now, action, form_version, prefs, ip_hash)
            fresh = conn.execute(select(subscribers).where(subscribers.c.id == subscriber_id)).one()
        return _row_to_membership(fresh)

    def confirm(
        self, subscriber_id: int, now: datetime, *, form_version: str | None, ip_hash: str | None
    ) -> Membership | None:
        """Confirm a pending sign-up (a second click changes nothing and logs nothing)."""
        with self._tx() as conn:
            row = conn.execute(select(subscribers).where(subscribers.c.id == subscriber_id)).first()
            if row is None:
                return None
            if row.status == "pending":
                conn.execute(
                    update(subscribers)
                    .where(subscribers.c.id == subscriber_id)
                    .values(status="confirmed", active=True, paused=False, confirmed_at=now)
                )
                choices = {
                    "topics": row.topics,
                    "languages": row.languages,
                    "frequency": row.frequency,
                }
                self._log_consent(
                    conn, subscriber_id, now, "confirm", form_version, choices, ip_hash
                )
            fresh = conn.execute(select(subscribers).where(subscribers.c.id == subscriber_id)).one()
        return _row_to_membership(fresh)

    def set_preferences(
        self,
        subscriber_id: int,
        now: datetime,
        *,
        topics: Sequence[str],
        languages: Sequence[str],
        frequency: str,
        paused: bool,
        form_version: str | None,
        ip_hash: str | None,
    ) -> None:
        """A confirmed subscriber's own change of what they get, and whether for now."""
        choices = {
            "topics": list(topics),
            "languages": list(languages),
            "frequency": frequency,
            "paused": paused,
        }
        with self._tx() as conn:
            row = conn.execute(
                select(subscribers.c.status).where(subscribers.c.id == subscriber_id)
            ).first()
            if row is None or row.status != "confirmed":
                return
            if paused:
                # "Send nothing for now" includes a digest already waiting in the outbox.
                _drop_pending(conn, subscriber_id, "subscriber paused")
            conn.execute(
                update(subscribers)
                .where(subscribers.c.id == subscriber_id)
                .values(
                    topics=list(topics),
                    languages=list(languages),
                    frequency=frequency,
                    paused=paused,
                    active=not paused,
                )
            )
            self._log_consent(
                conn, subscriber_id, now, "preferences", form_version, choices, ip_hash
            )

    def unsubscribe(
        self,
        subscriber_id: int,
        now: datetime,
        *,
        action: str = "unsubscribe",
        ip_hash: str | None = None,
        status: str = "unsubscribed",
    ) -> bool:
        """Stop all mail to a subscriber at once; True if they were receiving or pending.

        Pending outbox rows of theirs are dropped in the same commit, so no digest that
        was already planned goes out after the click.
        """
        with self._tx() as conn:
            row = conn.execute(
                select(subscribers.c.status).where(subscribers.c.id == subscriber_id)
            ).first()
            if row is None or row.status in ("unsubscribed", "removed"):
                return False
            conn.execute(
                update(subscribers)
                .where(subscribers.c.id == subscriber_id)
                .values(status=status, active=False, unsubscribed_at=now)
            )
            _drop_pending(conn, subscriber_id, f"subscriber {status}")
            self._log_consent(conn, subscriber_id, now, action, None, {}, ip_hash)
        return True

    def forget_unconfirmed(self, before: datetime) -> int:
        """Delete sign-ups that were never confirmed and were last asked for before ``before``.

        Without confirmation there is no consent to keep an address for; someone who was
        a subscriber earlier (and has digests on record) keeps their history.
        """
        last = (
            select(consents.c.subscriber_id, func.max(consents.c.at).label("last_at"))
            .group_by(consents.c.subscriber_id)
            .subquery()
        )
        has_history = (
            select(deliveries.c.id).where(deliveries.c.subscriber_id == subscribers.c.id).exists()
        )
        with self._tx() as conn:
            ids = (
                conn.execute(
                    select(subscribers.c.id)
                    .join(last, last.c.subscriber_id == subscribers.c.id)
                    .where(
                        subscribers.c.status == "pending",
                        last.c.last_at < before,
                        ~has_history,
                    )
                )
                .scalars()
                .all()
            )
            if ids:
                conn.execute(consents.delete().where(consents.c.subscriber_id.in_(ids)))
                conn.execute(subscribers.delete().where(subscribers.c.id.in_(ids)))
        return len(ids)

    def erase(self, email: str, email_hash: str, now: datetime) -> bool:
        """Delete every personal datum of one address and keep only its keyed hash.

        Their consent rows, their outbox rows and the record of which stories they got
        go with them; the suppression row lets a later import or sign-up be refused.
        True if the address was in the store.
        """
        with self._tx() as conn:
            row = conn.execute(
                select(subscribers.c.id).where(subscribers.c.email == email.lower())
            ).first()
            if row is not None:
                sid = row.id
                conn.execute(sent_stories.delete().where(sent_stories.c.subscriber_id == sid))
                conn.execute(deliveries.delete().where(deliveries.c.subscriber_id == sid))
                conn.execute(consents.delete().where(consents.c.subscriber_id == sid))
                conn.execute(subscribers.delete().where(subscribers.c.id == sid))
            exists = conn.execute(
                select(suppressions.c.email_hash).where(suppressions.c.email_hash == email_hash)
            ).first()
            if exists is None:
                conn.execute(insert(suppressions).values(email_hash=email_hash, at=now))
        return row is not None

    def is_suppressed(self, email_hash: str) -> bool:
        with self.engine.connect() as conn:
            return self._suppressed(conn, email_hash)

    @staticmethod
    def _suppressed(conn: Connection, email_hash: str) -> bool:
        found = conn.execute(
            select(suppressions.c.email_hash).where(suppressions.c.email_hash == email_hash)
        ).first()
        return found is not None

    def consents(self) -> list[Consent]:
        """The whole consent record, by subscriber then time, for export."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(consents, subscribers.c.email)
                .join(subscribers, subscribers.c.id == consents.c.subscriber_id)
                .order_by(subscribers.c.email, consents.c.at, consents.c.id)
            ).all()
        return [
            Consent(
                email=r.email,
                at=_utc(r.at) or r.at,
                action=r.action,
                form_version=r.form_version,
                choices=dict(r.choices or {}),
                ip_hash=r.ip_hash,
            )
            for r in rows
        ]

    def take_rate(self, key: str, now: datetime, window: timedelta, limit: int) -> bool:
        """Count one attempt under ``key``; False when ``limit`` were made within ``window``.

        Refused attempts are not counted, so a client that keeps trying is let in again
        once its earlier attempts leave the window. Rows older than the window go.
        """
        since = now - window
        with self._tx() as conn:
            conn.execute(
                rate_events.delete().where(rate_events.c.key == key, rate_events.c.at < since)
            )
            used = conn.execute(
                select(func.count()).select_from(rate_events).where(rate_events.c.key == key)
            ).scalar_one()
            if used >= limit:
                return False
            conn.execute(insert(rate_events).values(key=key, at=now))
        return True

    # -- digests and the outbox -------------------------------------------------------

    def digest_exists(self, key: str) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(select(digests.c.id).where(digests.c.key == key)).first() is not None
            )

    def last_digest_slot(self, prefix: str) -> datetime | None:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(func.max(digests.c.slot_at)).where(digests.c.key.like(f"{prefix}%"))
            ).scalar()
            return _utc(value)

    def unavailable_story_ids(self, subscriber_id: int) -> set[int]:
        """Stories this subscriber was sent, that wait in one of their pending mails, or
        whose mail was refused for good (a 5xx, or too many 4xx): without that, the next
        digest put the refused stories into a new mail and so retried a permanent failure.
        """
        with self.engine.connect() as conn:
            sent = {
                r[0]
                for r in conn.execute(
                    select(sent_stories.c.story_id).where(
                        sent_stories.c.subscriber_id == subscriber_id
                    )
                )
            }
            for (ids,) in conn.execute(
                select(deliveries.c.story_ids).where(
                    deliveries.c.subscriber_id == subscriber_id,
                    deliveries.c.state.in_(("pending", "sending", "failed")),
                )
            ):
                sent.update(int(i) for i in ids)
            return sent

    def create_digest(
        self,
        key: str,
        slot: datetime,
        plan: Sequence[PlannedDelivery],
        now: datetime,
    ) -> bool:
        """Record a digest with these outbox rows, decided beforehand; False when a
        digest with this key exists already. A digest planned from the store's own
        facts goes through ``build_digest`` instead."""
        return self.build_digest(key, slot, now, (), lambda _facts: plan) is not None

    def build_digest(
        self,
        key: str,
        slot: datetime,
        now: datetime,
        story_ids: Iterable[int],
        decide: Callable[[OutboxFacts], Sequence[PlannedDelivery]],
        *,
        offered_since: datetime | None = None,
    ) -> int | None:
        """Plan a digest from the outbox's facts and write it, in one transaction.

        ``decide`` gets the facts about ``story_ids`` (the stories that may go into it,
        see ``OutboxFacts``) and returns the rows: (subscriber, story ids, Message-ID).
        The facts are read after the writers' lock is taken (BEGIN IMMEDIATE on SQLite,
        the advisory lock on PostgreSQL), so a run that plans while another writes its
        digest waits, then sees that digest's rows and does not plan their stories
        again. Returns the number of rows written, or None when a digest with this key
        exists already (another worker or an earlier run built it): building is then a
        no-op, which makes it idempotent. ``offered_since``: stories left out by the cap
        are looked up in digests built since then only (none of the stories that may
        go into this digest is older, see ``digest.lookback_days``).
        """
        wanted = list(dict.fromkeys(story_ids))
        try:
            with self._tx() as conn:
                if conn.execute(select(digests.c.id).where(digests.c.key == key)).first():
                    return None
                facts = self._outbox_facts(conn, wanted, offered_since)
                plan = [PlannedDelivery(*row) for row in decide(facts)]
                digest_id = conn.execute(
                    insert(digests)
                    .values(key=key, created_at=now, slot_at=slot)
                    .returning(digests.c.id)
                ).scalar_one()
                if plan:  # one statement for all rows, in the plan's order
                    conn.execute(
                        insert(deliveries),
                        [
                            {
                                "digest_id": digest_id,
                                "subscriber_id": row.subscriber.id,
                                "state": "pending",
                                "story_ids": list(row.story_ids),
                                "message_id": row.message_id,
                                "attempts": 0,
                                "left_out_ids": list(row.left_out) or None,
                            }
                            for row in plan
                        ],
                    )
        except IntegrityError:
            return None
        return len(plan)

    def outbox_facts(
        self, story_ids: Iterable[int], *, offered_since: datetime | None = None
    ) -> OutboxFacts:
        """The facts a digest would be planned from now (for a dry run or a preview:
        nothing is locked, nothing written)."""
        with self.engine.connect() as conn:
            return self._outbox_facts(conn, list(dict.fromkeys(story_ids)), offered_since)

    @staticmethod
    def _outbox_facts(
        conn: Connection, story_ids: Sequence[int], offered_since: datetime | None = None
    ) -> OutboxFacts:
        """Read ``OutboxFacts`` on ``conn``: a few queries for all subscribers, not a
        few per subscriber, since a digest's planning holds the writers' lock."""
        active = [
            _row_to_subscriber(r)
            for r in conn.execute(
                select(subscribers)
                .where(subscribers.c.status == "confirmed", subscribers.c.paused.is_(False))
                .order_by(subscribers.c.id)
            )
        ]
        bouncing = frozenset(
            int(r[0])
            for r in conn.execute(
                select(subscribers.c.id).where(subscribers.c.bouncing_since.is_not(None))
            )
        )
        last_sent = {
            int(sid): when
            for sid, value in conn.execute(
                select(deliveries.c.subscriber_id, func.max(deliveries.c.sent_at))
                .where(deliveries.c.state == "sent")
                .group_by(deliveries.c.subscriber_id)
            )
            if (when := _utc(value)) is not None
        }
        waiting_since = {
            int(sid): when
            for sid, value in conn.execute(
                select(deliveries.c.subscriber_id, func.max(digests.c.created_at))
                .join(digests, digests.c.id == deliveries.c.digest_id)
                .where(deliveries.c.state.in_(("pending", "sending")))
                .group_by(deliveries.c.subscriber_id)
            )
            if (when := _utc(value)) is not None
        }
        # What unavailable_story_ids answers for one subscriber, for all of them and
        # only for the stories that matter now.
        wanted = set(story_ids)
        had: dict[int, set[int]] = {}
        for chunk in _chunks(list(wanted), 500):
            for sid, story in conn.execute(
                select(sent_stories.c.subscriber_id, sent_stories.c.story_id).where(
                    sent_stories.c.story_id.in_(chunk)
                )
            ):
                had.setdefault(int(sid), set()).add(int(story))
        if wanted:
            for sid, ids in conn.execute(
                select(deliveries.c.subscriber_id, deliveries.c.story_ids).where(
                    deliveries.c.state.in_(("pending", "sending", "failed"))
                )
            ):
                if found := wanted.intersection(int(i) for i in ids):
                    had.setdefault(int(sid), set()).update(found)
        offered: dict[int, set[int]] = {}
        if wanted:
            query = select(deliveries.c.subscriber_id, deliveries.c.left_out_ids).where(
                deliveries.c.left_out_ids.is_not(None)
            )
            if offered_since is not None:
                query = query.join(digests, digests.c.id == deliveries.c.digest_id).where(
                    digests.c.created_at >= offered_since
                )
            for sid, ids in conn.execute(query):
                if found := wanted.intersection(int(i) for i in ids or ()):
                    offered.setdefault(int(sid), set()).update(found)
        return OutboxFacts(
            subscribers=active,
            bouncing=bouncing,
            last_sent=last_sent,
            waiting_since=waiting_since,
            had={sid: frozenset(ids) for sid, ids in had.items()},
            offered={sid: frozenset(ids) for sid, ids in offered.items()},
        )

    def sent_digests(self) -> list[DigestRecord]:
        """Digests with at least one outbox row, in the order they were created.

        A digest nobody had anything new for has no rows and no web version. Rows are
        written with their digest in one transaction, so this list only ever grows at
        its end and a digest's place in it (which names its web page) never changes.
        """
        has_rows = select(deliveries.c.id).where(deliveries.c.digest_id == digests.c.id).exists()
        query = select(digests.c.id, digests.c.key, digests.c.slot_at).where(has_rows)
        with self.engine.connect() as conn:
            return [
                DigestRecord(id=r.id, key=r.key, slot=_utc(r.slot_at) or r.slot_at)
                for r in conn.execute(query.order_by(digests.c.id))
            ]

    def digest_story_ids(self, digest_id: int) -> list[int]:
        """Every story of this digest (its general version): those any subscriber's
        mail holds, and those the cap left out of a mail (which says they are here).

        Read from the outbox rows, which are fixed when the digest is created, so the
        answer never changes; a story merged into another since is left out by the
        caller that loads the stories.
        """
        ids: set[int] = set()
        with self.engine.connect() as conn:
            for story_ids, left_out in conn.execute(
                select(deliveries.c.story_ids, deliveries.c.left_out_ids).where(
                    deliveries.c.digest_id == digest_id
                )
            ):
                ids.update(int(i) for i in story_ids)
                ids.update(int(i) for i in left_out or ())
        return sorted(ids)

    def recover_claims(
        self, now: datetime, lease: timedelta, is_delivered: Callable[[Delivery], bool]
    ) -> int:
        """Release deliveries held by a dead worker; those already delivered become sent.

        ``is_delivered`` lets the transport answer for the uncertain window between
        handing a message over and committing that fact (the Maildir transport can say
        for sure; SMTP cannot, so such a message is sent again, at most one per
        connection that was open when the process died).
        """
        with self.engine.connect() as conn:
            rows = conn.execute(self._delivery_query().where(deliveries.c.state == "sending")).all()
        released = 0
        for row in rows:
            if not _claim_is_dead(row.claimed_by, _utc(row.claimed_at), lease, now):
                continue
            delivery = _row_to_delivery(row)
            if is_delivered(delivery):
                self.mark_sent(delivery, now, claimed_by=row.claimed_by)
            else:
                with self._tx() as conn:
                    conn.execute(
                        update(deliveries)
                        .where(
                            deliveries.c.id == row.id,
                            deliveries.c.state == "sending",
                            deliveries.c.claimed_by == row.claimed_by,
                        )
                        .values(state="pending", claimed_by=None, claimed_at=None)
                    )
            released += 1
        return released

    @staticmethod
    def _delivery_query() -> Any:
        return (
            select(
                deliveries,
                digests.c.key.label("digest_key"),
                digests.c.slot_at.label("digest_slot"),
                digests.c.created_at.label("digest_created"),
                subscribers.c.email,
                subscribers.c.name,
                subscribers.c.topics,
                subscribers.c.languages,
                subscribers.c.frequency,
            )
            .join(digests, digests.c.id == deliveries.c.digest_id)
            .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
        )

    @staticmethod
    def _due(now: datetime | None) -> Any:
        condition = deliveries.c.state == "pending"
        if now is not None:
            condition = and_(
                condition,
                or_(deliveries.c.next_attempt_at.is_(None), deliveries.c.next_attempt_at <= now),
            )
        return condition

    def pending_deliveries(
        self, limit: int | None = None, *, now: datetime | None = None
    ) -> list[Delivery]:
        """Pending deliveries in outbox order; with ``now``, only those due by then."""
        query = self._delivery_query().where(self._due(now)).order_by(deliveries.c.id)
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [_row_to_delivery(r) for r in conn.execute(query)]

    def count_due(self, now: datetime) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(deliveries).where(self._due(now))
                ).scalar_one()
            )

    def next_retry_at(self) -> datetime | None:
        """When the earliest deferred delivery is due, for the operator's summary."""
        with self.engine.connect() as conn:
            value = conn.execute(
                select(func.min(deliveries.c.next_attempt_at)).where(
                    deliveries.c.state == "pending"
                )
            ).scalar()
            return _utc(value)

    def claim_due(self, worker: str, now: datetime, limit: int) -> list[Delivery]:
        """Take up to ``limit`` due deliveries for this worker in one transaction.

        Claiming a batch does not widen the duplicate window: a claimed row that was
        never handed to the server is simply released on restart; only the step from
        the server's acceptance to ``mark_sent`` matters, and that stays one commit
        per message.
        """
        with self._tx() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    select(deliveries.c.id)
                    .where(self._due(now))
                    .order_by(deliveries.c.id)
                    .limit(limit)
                )
            ]
            if not ids:
                return []
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id.in_(ids), deliveries.c.state == "pending")
                .values(state="sending", claimed_by=worker, claimed_at=now)
            )
            rows = conn.execute(
                self._delivery_query()
                .where(
                    deliveries.c.id.in_(ids),
                    deliveries.c.state == "sending",
                    deliveries.c.claimed_by == worker,
                )
                .order_by(deliveries.c.id)
            ).all()
        # ``attempts`` grows when an answer is recorded, not here: claims that a
        # stopped run gives back were no attempt.
        return [_row_to_delivery(r) for r in rows]

    def claim(self, delivery_id: int, worker: str, now: datetime) -> bool:
        """Take a pending delivery for this worker; False if someone else has it."""
        with self._tx() as conn:
            result = conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id, deliveries.c.state == "pending")
                .values(state="sending", claimed_by=worker, claimed_at=now)
            )
            return bool(result.rowcount == 1)

    def mark_sent(self, delivery: Delivery, now: datetime, claimed_by: str | None = None) -> None:
        """Record acceptance and which stories the subscriber now has, in one commit.

        A sending run keeps one ``sent_recorder()`` instead of calling this per message.
        """
        with self.sent_recorder() as recorder:
            recorder.record(delivery, now, claimed_by)

    def sent_recorder(self) -> SentRecorder:
        """A recorder of accepted messages for one sending run (close it, or use
        ``with``); it holds one database connection until then."""
        return SentRecorder(self.engine)

    def release_claims(self, worker: str) -> int:
        """Give back what this worker claimed but did not finish (a run that stopped)."""
        with self._tx() as conn:
            result = conn.execute(
                update(deliveries)
                .where(deliveries.c.state == "sending", deliveries.c.claimed_by == worker)
                .values(state="pending", claimed_by=None, claimed_at=None)
            )
            return int(result.rowcount or 0)

    def release_claim(self, delivery: Delivery, error: str) -> None:
        """Give one claimed delivery back as it was, noting ``error``, without counting
        an attempt: the run stopped for a reason of ours (a refused login), not the
        recipient's."""
        with self._tx() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery.id, deliveries.c.state == "sending")
                .values(state="pending", claimed_by=None, claimed_at=None, last_error=error)
            )

    def mark_retry(
        self, delivery: Delivery, error: str, next_attempt_at: datetime | None = None
    ) -> None:
        """Put a delivery back in the queue, due at ``next_attempt_at`` (None: at once)."""
        with self._tx() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery.id)
                .values(
                    state="pending",
                    claimed_by=None,
                    claimed_at=None,
                    last_error=error,
                    next_attempt_at=next_attempt_at,
                    attempts=deliveries.c.attempts + 1,
                )
            )

    def mark_failed(
        self,
        delivery: Delivery,
        error: str,
        *,
        refused_address: bool = False,
        now: datetime | None = None,
        bounce_after: int = 0,
    ) -> bool:
        """Record a delivery that will not be tried again.

        ``refused_address`` counts a permanent refusal against the address; the
        ``bounce_after``-th one in a row marks it bouncing, and its other waiting
        deliveries fail with that reason in the same transaction. True if the address
        became bouncing now.
        """
        with self._tx() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery.id)
                .values(
                    state="failed",
                    claimed_by=None,
                    last_error=error,
                    next_attempt_at=None,
                    attempts=deliveries.c.attempts + 1,
                )
            )
            if not refused_address:
                return False
            subscriber_id = delivery.subscriber.id
            conn.execute(
                update(subscribers)
                .where(subscribers.c.id == subscriber_id)
                .values(hard_bounces=subscribers.c.hard_bounces + 1)
            )
            row = conn.execute(
                select(subscribers.c.hard_bounces, subscribers.c.bouncing_since).where(
                    subscribers.c.id == subscriber_id
                )
            ).one()
            if not bounce_after or row.hard_bounces < bounce_after or row.bouncing_since:
                return False
            conn.execute(
                update(subscribers)
                .where(subscribers.c.id == subscriber_id)
                .values(bouncing_since=now or datetime.now(UTC))
            )
            conn.execute(
                update(deliveries)
                .where(
                    deliveries.c.subscriber_id == subscriber_id,
                    deliveries.c.state == "pending",
                )
                .values(
                    state="failed",
                    next_attempt_at=None,
                    last_error=f"not sent: the address is bouncing ({error})",
                )
            )
            return True

    def bouncing(self) -> list[Bouncing]:
        """Bouncing addresses with the refusal that tipped them over, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(subscribers.c.id, subscribers.c.email, subscribers.c.bouncing_since,
                       subscribers.c.hard_bounces)
                .where(subscribers.c.bouncing_since.is_not(None))
                .order_by(subscribers.c.bouncing_since, subscribers.c.email)
            ).all()  # fmt: skip
            result = []
            for row in rows:
                last = conn.execute(
                    select(deliveries.c.last_error)
                    .where(
                        deliveries.c.subscriber_id == row.id,
                        deliveries.c.state == "failed",
                        deliveries.c.last_error.not_like("not sent: %"),
                    )
                    .order_by(deliveries.c.id.desc())
                    .limit(1)
                ).scalar()
                since = _utc(row.bouncing_since)
                assert since is not None
                result.append(Bouncing(row.email, since, int(row.hard_bounces), last))
            return result

    def bouncing_subscriber_ids(self) -> set[int]:
        with self.engine.connect() as conn:
            return {
                int(r[0])
                for r in conn.execute(
                    select(subscribers.c.id).where(subscribers.c.bouncing_since.is_not(None))
                )
            }

    def clear_bouncing(self, email: str) -> bool:
        """The operator says the address works again; False if it was not bouncing."""
        with self._tx() as conn:
            result = conn.execute(
                update(subscribers)
                .where(
                    func.lower(subscribers.c.email) == email.strip().lower(),
                    subscribers.c.bouncing_since.is_not(None),
                )
                .values(bouncing_since=None, hard_bounces=0)
            )
            return bool(result.rowcount)

    def last_sent_at(self, subscriber_id: int) -> datetime | None:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(func.max(deliveries.c.sent_at)).where(
                    deliveries.c.subscriber_id == subscriber_id, deliveries.c.state == "sent"
                )
            ).scalar()
            return _utc(value)

    def delivery_counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                str(state): int(n)
                for state, n in conn.execute(
                    select(deliveries.c.state, func.count()).group_by(deliveries.c.state)
                ).all()
            }


def _drop_pending(conn: Connection, subscriber_id: int, reason: str) -> None:
    """Take a subscriber's waiting digests out of the outbox (kept as failed, with why)."""
    conn.execute(
        update(deliveries)
        .where(deliveries.c.subscriber_id == subscriber_id, deliveries.c.state == "pending")
        .values(state="failed", last_error=reason)
    )


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _entry_values(entry: Entry) -> dict[str, Any]:
    """The columns an entry's content fills, the same for an insert and an update."""
    return {
        "guid": entry.guid,
        "link": entry.link,
        "link_key": entry.link_key,
        "title": entry.title,
        "summary_html": entry.summary_html,
        "summary_text": entry.summary_text,
        "content_html": entry.content_html,
        "image_url": entry.image_url,
        "image_alt": entry.image_alt,
        "author": entry.author,
        "topics": list(entry.topics),
        "language": entry.language,
        "published_at": entry.published,
        "updated_at": entry.updated,
        "content_hash": entry.content_hash,
        "dated_at": entry.dated or entry.published,
    }


class _Statements:
    """The feed-update statements, built once: building one per row (``.values(...)``)
    cost more than running it, in SQLAlchemy's cache-key computation alone."""

    def __init__(self) -> None:
        self.insert_entry = insert(entries)
        self.insert_story = insert(stories)
        self.update_entry = (
            update(entries)
            .where(entries.c.id == bindparam("b_id"))
            .values({c: bindparam(c) for c in ("identity", *_ENTRY_CONTENT)})
        )
        self.touch_story = (
            update(stories)
            .where(stories.c.id == bindparam("b_id"))
            .values(updated_at=bindparam("updated_at"))
        )
        self.earlier_story = (
            update(stories)
            .where(
                stories.c.id == bindparam("b_id"),
                stories.c.published_at > bindparam("b_published", type_=_UTCDateTime()),
            )
            .values(published_at=bindparam("b_published", type_=_UTCDateTime()))
        )
        self.join_entry = (
            update(entries)
            .where(entries.c.id == bindparam("b_id"))
            .values(story_id=bindparam("story_id"), join_reason=bindparam("join_reason"))
        )
        # What record_not_modified writes, with moved_to and discovered_url kept
        # unless this answer learnt something (see _poll_values).
        self.not_modified = (
            update(feeds)
            .where(feeds.c.name == bindparam("b_name"))
            .values(
                last_attempt_at=bindparam("b_now", type_=_UTCDateTime()),
                last_success_at=bindparam("b_now", type_=_UTCDateTime()),
                last_status=bindparam("b_status", type_=Integer()),
                last_error=None,
                consecutive_failures=0,
                failing_since=None,
                etag=bindparam("b_etag", type_=Text()),
                last_modified=bindparam("b_last_modified", type_=Text()),
                state=bindparam("b_state", type_=String()),
                next_attempt_at=bindparam("b_next", type_=_UTCDateTime()),
                moved_to=func.coalesce(bindparam("b_moved_to", type_=Text()), feeds.c.moved_to),
                discovered_url=func.coalesce(
                    bindparam("b_discovered_url", type_=Text()), feeds.c.discovered_url
                ),
            )
        )


_ENTRY_CONTENT = (
    "guid", "link", "link_key", "title", "summary_html", "summary_text", "content_html",
    "image_url", "image_alt", "author", "topics", "language", "published_at", "updated_at",
    "content_hash", "dated_at",
)  # fmt: skip
_STMT = _Statements()


_HREF = re.compile(r"href=[\"']([^\"']+)")


def _hrefs(html: str) -> tuple[str, ...]:
    return tuple(_HREF.findall(html or ""))


def _story_item(row: Any) -> StoryItem:
    """What story matching needs of a stored entry (joined with its feed's name)."""
    return StoryItem(
        id=f"entry:{row.id}",
        feed=row.feed_name,
        language=row.language,
        title=row.title,
        text=_matching_text(row.summary_text, row.content_html),
        link=row.link,
        published=_utc(row.published_at) or row.published_at,
        links=_hrefs(f"{row.summary_html or ''} {row.content_html or ''}"),
    )


def _matching_text(summary: str, content_html: str, limit: int = 6000) -> str:
    """The text matching looks at: the summary, then the full text, cut at a limit
    (the first paragraphs carry the names and numbers; a 5 MB release need not)."""
    from clusterfeed.ingest.normalize import html_to_text

    text = summary
    if content_html and len(text) < limit:
        text = f"{text} {html_to_text(content_html[: limit * 4])}"
    return text[:limit]


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _row_to_entry(row: Any) -> Entry:
    return Entry(
        feed_name=row.feed_name,
        identity=row.identity,
        guid=row.guid,
        link=row.link,
        link_key=row.link_key,
        title=row.title,
        summary_html=row.summary_html,
        summary_text=row.summary_text,
        content_html=row.content_html,
        image_url=row.image_url,
        image_alt=row.image_alt,
        author=row.author,
        topics=tuple(row.topics or ()),
        language=row.language,
        published=_utc(row.published_at) or row.published_at,
        updated=_utc(row.updated_at) or row.updated_at,
        content_hash=row.content_hash,
        dated=_utc(row.dated_at) if row.dated_at is not None else None,
    )


def _row_to_subscriber(row: Any) -> Subscriber:
    return Subscriber(
        id=row.id,
        email=row.email,
        name=row.name,
        topics=tuple(row.topics or ()),
        languages=tuple(row.languages or ()),
        frequency=row.frequency,
    )


def _row_to_membership(row: Any) -> Membership:
    return Membership(
        subscriber=_row_to_subscriber(row),
        status=row.status,
        paused=bool(row.paused),
        origin=row.origin,
        created_at=_utc(row.created_at) or row.created_at,
        confirmed_at=_utc(row.confirmed_at),
        unsubscribed_at=_utc(row.unsubscribed_at),
    )


def _row_to_delivery(row: Any) -> Delivery:
    return Delivery(
        id=row.id,
        digest_id=row.digest_id,
        digest_key=row.digest_key,
        digest_slot=_utc(row.digest_slot) or row.digest_slot,
        subscriber=Subscriber(
            id=row.subscriber_id,
            email=row.email,
            name=row.name,
            topics=tuple(row.topics or ()),
            languages=tuple(row.languages or ()),
            frequency=row.frequency,
        ),
        story_ids=tuple(int(i) for i in row.story_ids),
        message_id=row.message_id,
        state=row.state,
        attempts=row.attempts,
        digest_created=_utc(row.digest_created),
        last_error=row.last_error,
        left_out=tuple(int(i) for i in row.left_out_ids or ()),
    )
