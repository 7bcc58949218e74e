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

import os
import re
import secrets
import socket
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
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
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from clusterfeed.dedup import EntryChange, plan_feed_update
from clusterfeed.model import Entry, FeedStatus, PollFacts, Source, Story, Subscriber
from clusterfeed.stories import (
    Candidate,
    Corpus,
    Match,
    StoryItem,
    StoryMatcher,
    candidate_keys,
    choose_story,
)


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
    # Schema version 3: why this entry joined its story (empty for the first one).
    Column("join_reason", Text),
    UniqueConstraint("feed_id", "identity", name="uq_entries_feed_identity"),
)
Index("ix_entries_link_key", entries.c.link_key)
Index("ix_entries_guid", entries.c.guid)
Index("ix_entries_story", entries.c.story_id)

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
)

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

SCHEMA_VERSION = 3

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


# MIGRATIONS[n] brings a version-n+1 database to version n+2 (version 1 was the first
# released schema). Append, never edit: a database in the field may be at any version.
MIGRATIONS: list[Callable[[Connection], None]] = [_migrate_1_to_2, _migrate_2_to_3]


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
    host, _, pid = claimed_by.rpartition(":")
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
            with self._tx() as conn:
                _create_current(conn)
                conn.execute(insert(schema_info).values(id=1, version=SCHEMA_VERSION))
            return SCHEMA_VERSION
        for version in range(current, SCHEMA_VERSION):
            # One transaction per step: PostgreSQL and SQLite both run DDL in transactions,
            # so a failed step leaves the database at the previous version, not half-way.
            with self._tx() as conn:
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
        try:
            with self._tx() as conn:
                conn.execute(insert(settings).values(key=key, value=make()))
        except IntegrityError:
            pass
        value = self.get_setting(key)
        assert value is not None
        return value

    def secret(self) -> str:
        """A signing secret that survives restarts when none is configured."""
        return self.setting_or_create("signing_secret", lambda: secrets.token_urlsafe(32))

    # -- feeds ------------------------------------------------------------------

    def sync_feeds(self, configured: Iterable[tuple[str, str, str | None]]) -> None:
        """Make sure every configured feed has a row; a changed URL forgets old validators."""
        with self._tx() as conn:
            for name, url, site in configured:
                row = conn.execute(
                    select(feeds.c.id, feeds.c.url).where(feeds.c.name == name)
                ).first()
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
                else:
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
        matcher: StoryMatcher | None = None,
    ) -> FeedUpdateSummary:
        """Store one successful fetch: entries, story links and caching headers, atomically.

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
                    "join_reason": "the same GUID or page" if e.identity in matched else None,
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
        readers or subscribers have already seen changes identity. The items around the
        new ones are loaded once and indexed by their evidence, so each new item is
        scored only against stories it shares a name, number, link or word with; a
        first fetch of 15,000 backlog items stays a matter of seconds. Returns how many
        items joined another story.
        """
        with self._tx() as conn:
            new_rows = conn.execute(
                select(entries.c.id, entries.c.story_id, entries.c.published_at)
                .join(stories, stories.c.id == entries.c.story_id)
                .where(entries.c.first_seen_at >= since, stories.c.first_seen_at >= since)
            ).all()
            if not new_rows:
                return 0
            window = timedelta(days=matcher.rules.window_days)
            low = min(_utc(r.published_at) or r.published_at for r in new_rows) - window
            high = max(_utc(r.published_at) or r.published_at for r in new_rows) + window
            rows = conn.execute(
                select(
                    entries.c.id, entries.c.story_id, entries.c.language, entries.c.title,
                    entries.c.summary_text, entries.c.content_html, entries.c.link,
                    entries.c.identity, entries.c.published_at, feeds.c.name.label("feed_name"),
                )
                .join(feeds, feeds.c.id == entries.c.feed_id)
                .where(entries.c.published_at >= low, entries.c.published_at <= high)
            ).all()  # fmt: skip
            items = {
                row.id: StoryItem(
                    id=f"entry:{row.id}",
                    feed=row.feed_name,
                    language=row.language,
                    title=row.title,
                    text=_matching_text(row.summary_text, row.content_html),
                    link=row.link,
                    published=_utc(row.published_at) or row.published_at,
                    links=_hrefs(row.content_html),
                )
                for row in rows
            }
            story_of = {row.id: int(row.story_id) for row in rows}
            order = {row.id: (items[row.id].published, row.feed_name, row.identity) for row in rows}
            sizes = Counter(story_of.values())
            new_ids = sorted(
                (r.id for r in new_rows if sizes[int(r.story_id)] == 1 and r.id in items),
                key=lambda i: order[i],
            )
            decisions = join_batch(matcher, items, story_of, new_ids)
            if decisions:
                self._write_joins(conn, decisions, new_rows, items, since)
        return len(decisions)

    @staticmethod
    def _write_joins(
        conn: Connection,
        decisions: Sequence[tuple[int, int, Match]],
        new_rows: Sequence[Any],
        items: Mapping[int, StoryItem],
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
                {"b_id": story_id, "b_published": items[entry_id].published}
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
    def _near_story(
        conn: Connection, feed_name: str, entry: Entry, matcher: StoryMatcher
    ) -> tuple[int | None, Match]:
        """The story of another partner's item that tells the same event in other words."""
        window = timedelta(days=matcher.rules.window_days)
        rows = conn.execute(
            select(
                entries.c.id, entries.c.story_id, entries.c.language, entries.c.title,
                entries.c.summary_text, entries.c.content_html, entries.c.link,
                entries.c.published_at, feeds.c.name.label("feed_name"),
            )
            .join(feeds, feeds.c.id == entries.c.feed_id)
            .where(
                entries.c.published_at >= entry.published - window,
                entries.c.published_at <= entry.published + window,
                feeds.c.name != feed_name,
            )
        ).all()  # fmt: skip
        if not rows:
            return None, Match(0.0, ("new story",))
        candidates = [
            (
                StoryItem(
                    id=f"entry:{row.id}",
                    feed=row.feed_name,
                    language=row.language,
                    title=row.title,
                    text=_matching_text(row.summary_text, row.content_html),
                    link=row.link,
                    published=_utc(row.published_at) or row.published_at,
                    links=_hrefs(row.content_html),
                ),
                int(row.story_id),
            )
            for row in rows
        ]
        item = StoryItem(
            id=f"new:{feed_name}:{entry.identity}",
            feed=feed_name,
            language=entry.language,
            title=entry.title,
            text=_matching_text(entry.summary_text, entry.content_html),
            link=entry.link,
            published=entry.published,
            links=_hrefs(entry.summary_html + entry.content_html),
        )
        return matcher.choose(item, candidates)

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
        """The story another feed already holds for each new entry (same GUID or page).

        Per entry, the earliest other-feed entry sharing its GUID or its link key wins,
        as one ``ORDER BY id LIMIT 1`` per entry would say; found by chunks of keys.
        """
        first: dict[tuple[str, str], tuple[int, int]] = {}
        for column, name in ((entries.c.guid, "guid"), (entries.c.link_key, "link")):
            values = sorted({v for e in new if (v := e.guid if name == "guid" else e.link_key)})
            for chunk in _chunks(values, 500):
                for row in conn.execute(
                    select(column.label("value"), entries.c.id, entries.c.story_id).where(
                        entries.c.feed_id != feed_id, column.in_(chunk)
                    )
                ):
                    key = (name, row.value)
                    if key not in first or row.id < first[key][0]:
                        first[key] = (int(row.id), int(row.story_id))
        found: dict[str, int] = {}
        for entry in new:
            hits = [
                hit
                for hit in (
                    first.get(("guid", entry.guid)) if entry.guid else None,
                    first.get(("link", entry.link_key)) if entry.link_key else None,
                )
                if hit is not None
            ]
            if hits:
                found[entry.identity] = min(hits)[1]
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

    def sync_subscribers(self, configured: Iterable[Subscriber], now: datetime) -> None:
        """Mirror the config's subscriber list: add new ones, update changed preferences,
        deactivate those that were removed from the config (their history stays)."""
        wanted = {s.email.lower(): s for s in configured}
        with self._tx() as conn:
            rows = {
                r.email: r
                for r in conn.execute(select(subscribers).where(subscribers.c.origin == "config"))
            }
            for email, sub in wanted.items():
                values = {
                    "name": sub.name,
                    "topics": list(sub.topics),
                    "languages": list(sub.languages),
                    "frequency": sub.frequency,
                    "active": True,
                }
                existing = conn.execute(
                    select(subscribers.c.id).where(subscribers.c.email == email)
                ).first()
                if existing is None:
                    conn.execute(
                        insert(subscribers).values(
                            email=email, origin="config", created_at=now, **values
                        )
                    )
                else:
                    conn.execute(
                        update(subscribers).where(subscribers.c.id == existing.id).values(**values)
                    )
            for email, row in rows.items():
                if email not in wanted and row.active:
                    conn.execute(
                        update(subscribers).where(subscribers.c.id == row.id).values(active=False)
                    )

    def active_subscribers(self) -> list[Subscriber]:
        with self.engine.connect() as conn:
            return [
                _row_to_subscriber(r)
                for r in conn.execute(
                    select(subscribers)
                    .where(subscribers.c.active.is_(True))
                    .order_by(subscribers.c.id)
                )
            ]

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
        plan: Sequence[tuple[Subscriber, Sequence[int], str]],
        now: datetime,
    ) -> bool:
        """Record a digest and its outbox rows in one transaction.

        Returns False when a digest with this key exists already (another worker or an
        earlier run built it): building is then a no-op, which makes it idempotent.
        """
        try:
            with self._tx() as conn:
                digest_id = conn.execute(
                    insert(digests)
                    .values(key=key, created_at=now, slot_at=slot)
                    .returning(digests.c.id)
                ).scalar_one()
                for subscriber, story_ids, message_id in plan:
                    conn.execute(
                        insert(deliveries).values(
                            digest_id=digest_id,
                            subscriber_id=subscriber.id,
                            state="pending",
                            story_ids=list(story_ids),
                            message_id=message_id,
                            attempts=0,
                        )
                    )
        except IntegrityError:
            return False
        return True

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
                subscribers.c.email,
                subscribers.c.name,
                subscribers.c.topics,
                subscribers.c.languages,
                subscribers.c.frequency,
            )
            .join(digests, digests.c.id == deliveries.c.digest_id)
            .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
        )

    def pending_deliveries(self, limit: int | None = None) -> list[Delivery]:
        query = (
            self._delivery_query().where(deliveries.c.state == "pending").order_by(deliveries.c.id)
        )
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [_row_to_delivery(r) for r in conn.execute(query)]

    def claim(self, delivery_id: int, worker: str, now: datetime) -> bool:
        """Take a pending delivery for this worker; False if someone else has it."""
        with self._tx() as conn:
            result = conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id, deliveries.c.state == "pending")
                .values(
                    state="sending",
                    claimed_by=worker,
                    claimed_at=now,
                    attempts=deliveries.c.attempts + 1,
                )
            )
            return bool(result.rowcount == 1)

    def mark_sent(self, delivery: Delivery, now: datetime, claimed_by: str | None = None) -> None:
        """Record acceptance and which stories the subscriber now has, in one commit."""
        with self._tx() as conn:
            conditions = [deliveries.c.id == delivery.id, deliveries.c.state == "sending"]
            if claimed_by is not None:
                conditions.append(deliveries.c.claimed_by == claimed_by)
            result = conn.execute(
                update(deliveries)
                .where(and_(*conditions))
                .values(state="sent", sent_at=now, last_error=None)
            )
            if result.rowcount != 1:
                return
            for story_id in delivery.story_ids:
                exists = conn.execute(
                    select(sent_stories.c.story_id).where(
                        sent_stories.c.subscriber_id == delivery.subscriber.id,
                        sent_stories.c.story_id == story_id,
                    )
                ).first()
                if exists is None:
                    conn.execute(
                        insert(sent_stories).values(
                            subscriber_id=delivery.subscriber.id,
                            story_id=story_id,
                            delivery_id=delivery.id,
                        )
                    )

    def mark_retry(self, delivery: Delivery, error: str) -> None:
        with self._tx() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery.id)
                .values(state="pending", claimed_by=None, claimed_at=None, last_error=error)
            )

    def mark_failed(self, delivery: Delivery, error: str) -> None:
        with self._tx() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery.id)
                .values(state="failed", claimed_by=None, last_error=error)
            )

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
    "content_hash",
)  # fmt: skip
_STMT = _Statements()


_HREF = re.compile(r"href=[\"']([^\"']+)")


def _hrefs(html: str) -> tuple[str, ...]:
    return tuple(_HREF.findall(html or ""))


def _matching_text(summary: str, content_html: str, limit: int = 6000) -> str:
    """The text matching looks at: the summary, then the full text, cut at a limit
    (the first paragraphs carry the names and numbers; a 5 MB release need not)."""
    from clusterfeed.normalize import html_to_text

    text = summary
    if content_html and len(text) < limit:
        text = f"{text} {html_to_text(content_html[: limit * 4])}"
    return text[:limit]


def join_batch(
    matcher: StoryMatcher,
    items: Mapping[int, StoryItem],
    story_of: dict[int, int],
    new_ids: Sequence[int],
) -> list[tuple[int, int, Match]]:
    """For each new item in order, the story it joins (pure apart from the feature cache).

    ``story_of`` is updated as items join, so a later new item can join a story an
    earlier one joined in the same cycle.
    """
    corpus = Corpus()
    feats = {i: matcher.features_of(item) for i, item in items.items()}
    for f in feats.values():
        corpus.add(f)
    keys = {i: candidate_keys(f) for i, f in feats.items()}
    index: defaultdict[str, list[int]] = defaultdict(list)
    for i, item_keys in keys.items():
        for key in item_keys:
            index[key].append(i)
    members: defaultdict[int, list[int]] = defaultdict(list)
    for i, story in story_of.items():
        members[story].append(i)
    max_postings = max(50, len(items) // 20)
    window = timedelta(days=matcher.rules.window_days)
    decisions: list[tuple[int, int, Match]] = []
    for new_id in new_ids:
        item = items[new_id]
        own_story = story_of[new_id]
        if len(members[own_story]) > 1:
            continue  # an earlier new item of this cycle joined it: it anchors a story now
        found: set[int] = set()
        for key in keys[new_id]:
            postings = index.get(key)
            if postings and len(postings) <= max_postings:
                found.update(postings)
        related = {
            story_of[o]
            for o in found
            if story_of[o] != own_story and abs(items[o].published - item.published) <= window
        }
        candidates = [Candidate(items[m], feats[m], s) for s in related for m in members[s]]
        chosen, match = choose_story(
            item, feats[new_id], candidates, corpus, matcher.rules, forced=matcher.forced
        )
        if chosen is None:
            continue
        decisions.append((new_id, chosen, match))
        members[own_story].remove(new_id)
        members[chosen].append(new_id)
        story_of[new_id] = chosen
    return decisions


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
    )
