"""The store on a real SQLite file and, when CLUSTERFEED_TEST_DATABASE_URL is set, on a
real PostgreSQL database (every test here runs on both through ``database_url``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, inspect, select, update
from sqlalchemy.engine import Connection

from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.digest.planning import OutboxFacts
from clusterfeed.model import Entry, PollFacts, Subscriber
from clusterfeed.store import (
    SCHEMA_VERSION,
    Delivery,
    PlannedDelivery,
    Store,
    StoreError,
    deliveries,
    entries,
    feeds,
    schema_info,
    sent_stories,
    subscribers,
)
from tests.conftest import FeedServer, Route, allow_inserts, refuse_inserts, write_config

NOW = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


def _entry(
    feed: str,
    identity: str,
    *,
    title: str,
    link: str | None = None,
    guid: str | None = None,
    topics: tuple[str, ...] = ("research",),
    language: str = "en",
    published: datetime = NOW - timedelta(hours=2),
) -> Entry:
    summary = f"Summary of {title}"
    return Entry(
        feed_name=feed,
        identity=identity,
        guid=guid,
        link=link,
        link_key=link.lower().removeprefix("https://") if link else None,
        title=title,
        summary_html=f"<p>{summary}</p>",
        summary_text=summary,
        content_html="",
        image_url=None,
        image_alt=None,
        author=None,
        topics=topics,
        language=language,
        published=published,
        updated=published,
        content_hash=hashlib.sha256(f"{title}{summary}{link}".encode()).hexdigest(),
    )


def _apply(store: Store, feed: str, items: list[Entry], now: datetime = NOW):
    return store.apply_feed_update(
        feed, items, status=200, etag='"v1"', last_modified=None, title=feed, warning=None, now=now
    )


@pytest.fixture
def store(database_url: str):
    store = Store(database_url)
    store.migrate()
    store.sync_feeds(
        [
            ("Helix Vektor", "https://www.helixvektor.example/feed", None),
            ("Elbmed Pharma", "https://www.elbmed.example/news.atom", None),
            ("Kansai Bio Frontier", "https://kansai-bio.example/rss", None),
        ]
    )
    yield store
    store.close()


def _subscribers(store: Store, *emails: str) -> list[Subscriber]:
    store.sync_subscribers([Subscriber(email=e) for e in emails], NOW)
    return store.active_subscribers()


def _one_digest(store: Store, key: str = "scheduled:2026-11-20T06:00:00+00:00") -> Delivery:
    _apply(store, "Helix Vektor", [_entry("Helix Vektor", "guid:a", title="A", guid="a")])
    (sub,) = _subscribers(store, "rita@example.org")
    story_ids = [s.id for s in store.recent_stories()]
    assert store.create_digest(key, NOW, [(sub, story_ids, "<m1@nordbio.example>")], NOW)
    (delivery,) = store.pending_deliveries()
    return delivery


def _dead_pid() -> int:
    """The pid of a process of ours that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- schema ---------------------------------------------------------------------------


def test_migrate_creates_the_current_schema_and_is_idempotent(database_url: str) -> None:
    store = Store(database_url)
    assert store.schema_version() == 0

    assert store.migrate() == SCHEMA_VERSION == 10
    assert store.schema_version() == 10
    tables = set(inspect(store.engine).get_table_names())
    assert {"feeds", "entries", "stories", "subscribers", "digests", "deliveries"} <= tables
    assert "alerts" in tables

    store.sync_feeds([("Helix Vektor", "https://www.helixvektor.example/feed", None)])
    assert store.migrate() == 10  # a second start changes nothing and loses nothing
    assert [s.name for s in store.feed_statuses()] == ["Helix Vektor"]
    with store.engine.connect() as conn:
        assert conn.execute(select(schema_info.c.version)).scalars().all() == [10]
    store.close()


V2_FEED_COLUMNS = ("state", "next_attempt_at", "failing_since", "moved_to", "discovered_url")
V4_SUBSCRIBER_COLUMNS = ("status", "paused", "confirmed_at", "unsubscribed_at", "config_prefs")
V4_TABLES = ("consents", "suppressions", "rate_events")


V5_DELIVERY_COLUMNS = (
    ("deliveries", "next_attempt_at"),
    ("subscribers", "hard_bounces"),
    ("subscribers", "bouncing_since"),
)


def _back_to_version_9(conn: Connection) -> None:
    """Undo what schema version 10 added (the stated publication date of entries)."""
    conn.exec_driver_sql("DROP INDEX ix_entries_dated")
    conn.exec_driver_sql("ALTER TABLE entries DROP COLUMN dated_at")
    conn.execute(update(schema_info).values(version=9))


def _back_to_version_8(conn: Connection) -> None:
    """Undo what schema versions 10 and 9 added (story corrections from ``stories split``)."""
    _back_to_version_9(conn)
    conn.exec_driver_sql("DROP TABLE story_corrections")
    conn.execute(update(schema_info).values(version=8))


def _back_to_version_7(conn: Connection) -> None:
    """Undo what schema versions 9 and 8 added, leaving what version 7 wrote."""
    _back_to_version_8(conn)
    conn.exec_driver_sql("ALTER TABLE deliveries DROP COLUMN left_out_ids")
    conn.execute(update(schema_info).values(version=7))


def _back_to_version_6(conn: Connection) -> None:
    """Undo what schema versions 9 to 7 added (corrections, the cap's record, features)."""
    _back_to_version_7(conn)
    conn.exec_driver_sql("DROP TABLE story_features")
    conn.execute(update(schema_info).values(version=6))


def _back_to_version_5(conn: Connection) -> None:
    """Undo what schema versions 7 and 6 added, leaving what version 5 wrote."""
    _back_to_version_6(conn)
    conn.exec_driver_sql("DROP INDEX ix_sent_stories_story")
    conn.execute(update(schema_info).values(version=5))


def _back_to_version_4(conn: Connection) -> None:
    """Undo what schema versions 6 and 5 added, leaving what version 4 wrote."""
    _back_to_version_5(conn)
    for table, column in V5_DELIVERY_COLUMNS:
        conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
    conn.execute(update(schema_info).values(version=4))


def _back_to_version_3(conn: Connection) -> None:
    """Undo what schema versions 6, 5 and 4 added, leaving what version 3 wrote."""
    _back_to_version_4(conn)
    for table in V4_TABLES:
        conn.exec_driver_sql(f"DROP TABLE {table}")
    for column in V4_SUBSCRIBER_COLUMNS:
        conn.exec_driver_sql(f"ALTER TABLE subscribers DROP COLUMN {column}")
    conn.execute(update(schema_info).values(version=3))


def test_a_version_1_database_is_upgraded_without_losing_data(database_url: str) -> None:
    store = Store(database_url)
    store.migrate()
    now = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    store.sync_feeds(
        [
            ("Helix Vektor", "https://www.helixvektor.example/feed", None),
            ("Elbmed Pharma", "https://www.elbmed.example/feed", None),
        ]
    )
    store.record_failure(
        "Elbmed Pharma", status=500, error="HTTP 500 Internal Server Error", now=now
    )
    # Turn it into what version 1 wrote: no alerts table, none of the version-2 columns.
    with store.engine.begin() as conn:
        _back_to_version_3(conn)
        conn.exec_driver_sql("DROP TABLE alerts")
        for column in V2_FEED_COLUMNS:
            conn.exec_driver_sql(f"ALTER TABLE feeds DROP COLUMN {column}")
        conn.exec_driver_sql("ALTER TABLE entries DROP COLUMN join_reason")  # version 3
        conn.execute(update(schema_info).values(version=1))
    store.close()

    upgraded = Store(database_url)
    assert upgraded.migrate() == SCHEMA_VERSION
    columns = {c["name"] for c in inspect(upgraded.engine).get_columns("feeds")}
    assert set(V2_FEED_COLUMNS) <= columns
    assert "join_reason" in {c["name"] for c in inspect(upgraded.engine).get_columns("entries")}
    assert "alerts" in inspect(upgraded.engine).get_table_names()
    statuses = {s.name: s for s in upgraded.feed_statuses()}
    assert statuses["Elbmed Pharma"].consecutive_failures == 1
    assert statuses["Elbmed Pharma"].last_error == "HTTP 500 Internal Server Error"
    with upgraded.engine.connect() as conn:
        states = dict(conn.exec_driver_sql("SELECT name, state FROM feeds").all())
    assert states == {"Helix Vektor": "new", "Elbmed Pharma": "failing"}
    upgraded.close()


def test_a_version_3_database_is_upgraded_with_its_subscribers_confirmed_or_removed(
    database_url: str,
) -> None:
    store = Store(database_url)
    store.migrate()
    with store.engine.begin() as conn:
        _back_to_version_3(conn)
        # What version 3 held: two config subscribers, one of them taken off the config.
        for email, active in (("rita@example.org", True), ("old@example.org", False)):
            conn.execute(
                subscribers.insert().values(
                    email=email, topics=[], languages=["de"], frequency="weekly",
                    active=active, origin="config", created_at=NOW,
                )
            )  # fmt: skip
    store.close()

    upgraded = Store(database_url)
    assert upgraded.migrate() == SCHEMA_VERSION
    tables = set(inspect(upgraded.engine).get_table_names())
    assert set(V4_TABLES) <= tables
    states = {m.subscriber.email: m for m in upgraded.memberships()}
    assert states["rita@example.org"].status == "confirmed"
    assert states["rita@example.org"].confirmed_at == NOW
    assert states["rita@example.org"].subscriber.languages == ("de",)
    assert states["old@example.org"].status == "removed"
    assert [s.email for s in upgraded.active_subscribers()] == ["rita@example.org"]
    # The new tables work on the upgraded database.
    assert upgraded.take_rate("k", NOW, timedelta(hours=1), 1)
    assert not upgraded.take_rate("k", NOW, timedelta(hours=1), 1)
    upgraded.close()


def test_a_version_4_outbox_is_upgraded_and_its_pending_mail_is_due_at_once(
    store: Store, database_url: str
) -> None:
    delivery = _one_digest(store)
    with store.engine.begin() as conn:
        _back_to_version_4(conn)
    store.close()

    upgraded = Store(database_url)
    assert upgraded.migrate() == SCHEMA_VERSION

    (due,) = upgraded.pending_deliveries(now=NOW)
    assert (due.id, due.message_id) == (delivery.id, "<m1@nordbio.example>")
    assert upgraded.bouncing() == []
    with upgraded.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT hard_bounces FROM subscribers").scalars().all() == [0]
    # The new columns work: a refusal counts, a delivery resets the count.
    (claimed,) = upgraded.claim_due("w:1", NOW, 10)
    assert upgraded.mark_failed(claimed, "550 no", refused_address=True, now=NOW, bounce_after=1)
    assert [b.email for b in upgraded.bouncing()] == ["rita@example.org"]
    upgraded.close()


def test_a_version_5_store_is_upgraded_and_keeps_what_each_subscriber_was_sent(
    store: Store, database_url: str
) -> None:
    delivery = _one_digest(store)
    store.claim(delivery.id, "worker-a:1", NOW)
    store.mark_sent(delivery, NOW, claimed_by="worker-a:1")
    with store.engine.begin() as conn:
        _back_to_version_5(conn)
    store.close()
    upgraded = Store(database_url)

    assert upgraded.migrate() == SCHEMA_VERSION

    indexes = {i["name"] for i in inspect(upgraded.engine).get_indexes("sent_stories")}
    assert "ix_sent_stories_story" in indexes
    assert upgraded.delivery_counts() == {"sent": 1}
    # A digest planned now finds the story sent, through the new index.
    facts = upgraded.outbox_facts(delivery.story_ids)
    assert facts.had == {delivery.subscriber.id: frozenset(delivery.story_ids)}
    assert facts.last_sent == {delivery.subscriber.id: NOW}
    upgraded.close()


def test_a_version_6_outbox_is_upgraded_and_records_stories_the_cap_left_out(
    store: Store, database_url: str
) -> None:
    delivery = _one_digest(store)
    with store.engine.begin() as conn:
        _back_to_version_6(conn)
    store.close()
    upgraded = Store(database_url)

    assert upgraded.migrate() == SCHEMA_VERSION

    # The waiting mail is as it was, with nothing left out.
    (due,) = upgraded.pending_deliveries(now=NOW)
    assert (due.id, due.story_ids, due.left_out) == (delivery.id, delivery.story_ids, ())
    # A new digest records what the cap left out; planning and its web version see it.
    _apply(upgraded, "Helix Vektor", [_entry("Helix Vektor", "guid:b", title="B", guid="b")])
    (sub,) = _subscribers(upgraded, "rita@example.org")
    new = [s.id for s in upgraded.recent_stories() if s.id not in delivery.story_ids]
    row = PlannedDelivery(sub, [], "<m2@nordbio.example>", new)
    assert upgraded.create_digest("manual:b", NOW, [row], NOW)
    assert upgraded.outbox_facts(new).offered == {sub.id: frozenset(new)}
    (digest,) = [d for d in upgraded.sent_digests() if d.key == "manual:b"]
    assert upgraded.digest_story_ids(digest.id) == new
    upgraded.close()


def test_a_version_9_store_is_upgraded_and_its_entries_keep_their_dates(
    store: Store, database_url: str
) -> None:
    _apply(store, "Helix Vektor", [_entry("Helix Vektor", "guid:a", title="A", guid="a")])
    (before,) = store.recent_stories()
    with store.engine.begin() as conn:
        _back_to_version_9(conn)
    store.close()
    upgraded = Store(database_url)

    assert upgraded.migrate() == SCHEMA_VERSION
    (after,) = upgraded.recent_stories()
    assert (after.id, after.entry.title, after.entry.published) == (
        before.id, "A", before.entry.published,
    )  # fmt: skip
    # The only date an old row kept is the one matching compares from now on.
    with upgraded.engine.connect() as conn:
        dated, published = conn.execute(select(entries.c.dated_at, entries.c.published_at)).one()
    assert dated == published
    upgraded.close()


def test_a_newer_schema_is_refused_with_a_clear_message(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(schema_info).values(version=SCHEMA_VERSION + 1))

    with pytest.raises(StoreError, match="newer than this clusterfeed understands"):
        store.migrate()


def test_a_second_process_sees_the_same_data(store: Store, database_url: str) -> None:
    _apply(
        store,
        "Kansai Bio Frontier",
        [
            _entry(
                "Kansai Bio Frontier",
                "guid:k1",
                title="関西バイオ、新しい共同研究を開始",
                guid="k1",
            )
        ],
    )
    code = (
        "import sys\n"
        "from clusterfeed.store import Store\n"
        "s = Store(sys.argv[1]); s.migrate()\n"
        "sys.stdout.buffer.write(s.recent_stories()[0].entry.title.encode())\n"
        "print(); print(s.count_entries())\n"
    )

    other = subprocess.run(
        [sys.executable, "-c", code, database_url], capture_output=True, check=True, timeout=60
    )

    title, count = other.stdout.decode().split("\n")[:2]
    assert title == "関西バイオ、新しい共同研究を開始"
    assert count == "1"


def test_a_second_store_instance_sees_writes_at_once(store: Store, database_url: str) -> None:
    second = Store(database_url)
    assert second.migrate() == SCHEMA_VERSION
    assert second.count_entries() == 0

    _apply(store, "Helix Vektor", [_entry("Helix Vektor", "guid:a", title="A", guid="a")])

    assert second.count_entries() == 1
    assert second.secret() == store.secret()  # one signing secret for every process
    second.close()


# -- entries and stories ------------------------------------------------------------------


def test_storing_the_same_fetch_again_creates_no_duplicates(store: Store) -> None:
    items = [
        _entry("Helix Vektor", "guid:a", title="Vector plant opens", guid="a"),
        _entry("Helix Vektor", "guid:b", title="Phase I results", guid="b"),
    ]

    first = _apply(store, "Helix Vektor", items)
    again = _apply(store, "Helix Vektor", items)

    assert (first.new_entries, first.new_stories) == (2, 2)
    assert (again.new_entries, again.updated_entries, again.new_stories) == (0, 0, 0)
    assert store.count_entries() == 2
    assert store.count_stories() == 2


def test_a_changed_item_is_updated_in_place(store: Store) -> None:
    _apply(store, "Helix Vektor", [_entry("Helix Vektor", "guid:a", title="Old title", guid="a")])

    summary = _apply(
        store, "Helix Vektor", [_entry("Helix Vektor", "guid:a", title="New title", guid="a")]
    )

    assert (summary.new_entries, summary.updated_entries) == (0, 1)
    assert store.count_entries() == 1
    assert [s.entry.title for s in store.recent_stories()] == ["New title"]


def test_a_second_source_of_the_same_item_is_recorded_on_the_story(store: Store) -> None:
    link = "https://www.helixvektor.example/news/acquisition"
    _apply(store, "Helix Vektor", [_entry("Helix Vektor", "h1", title="Helix acquired", link=link)])

    summary = _apply(
        store,
        "Elbmed Pharma",
        [
            _entry(
                "Elbmed Pharma",
                "e1",
                title="Elbmed übernimmt Helix Vektor",
                link=link,
                language="de",
                topics=("drug-discovery",),
                published=NOW - timedelta(hours=1),  # reported an hour after Helix's release
            )
        ],
        now=NOW + timedelta(minutes=30),
    )

    assert (summary.new_entries, summary.new_stories) == (1, 0)
    (story,) = store.recent_stories()
    assert [s.feed_name for s in story.sources] == ["Helix Vektor", "Elbmed Pharma"]
    assert [s.entry_title for s in story.sources] == [
        "Helix acquired",
        "Elbmed übernimmt Helix Vektor",
    ]
    assert story.entry.title == "Helix acquired"  # the earliest version represents it
    assert set(story.topics) == {"research", "drug-discovery"}
    assert set(story.languages) == {"en", "de"}
    assert store.count_entries() == 2


def test_refetching_a_feed_over_http_creates_no_duplicates(
    tmp_path: Path, feed_server: FeedServer, database_url: str, rss_feed
) -> None:
    items = [{"title": f"Item {i}", "link": f"https://partner.example/news/{i}"} for i in range(5)]
    # No validators: the second fetch gets the whole body again and parses it again.
    feed_server.routes["/feed.rss"] = Route(
        rss_feed("Partner", items), etag=False, last_modified=False
    )
    config = load_config(
        write_config(
            tmp_path,
            [{"name": "Partner", "url": feed_server.url("/feed.rss")}],
            database_url=database_url,
        )
    )
    service = Service(config, Store(config.database_url))
    service.prepare()

    first = asyncio.run(service.fetch())
    second = asyncio.run(service.fetch())

    requests = feed_server.requests_for("/feed.rss")
    assert len(requests) == 2 and "if-none-match" not in requests[1].headers
    assert [(o.state, o.new_entries) for o in first] == [("new", 5)]
    assert [(o.state, o.new_entries) for o in second] == [("unchanged", 0)]
    assert service.store.count_entries() == 5
    assert service.store.count_stories() == 5
    service.store.close()


# -- the outbox -----------------------------------------------------------------------------


def test_create_digest_twice_with_one_key_is_a_no_op(store: Store) -> None:
    delivery = _one_digest(store)
    sub = delivery.subscriber

    again = store.create_digest(
        delivery.digest_key, NOW, [(sub, list(delivery.story_ids), "<m2@nordbio.example>")], NOW
    )

    assert again is False
    assert store.digest_exists(delivery.digest_key)
    assert [d.message_id for d in store.pending_deliveries()] == ["<m1@nordbio.example>"]


def test_a_digest_planned_while_another_is_written_waits_and_sees_its_rows(
    store: Store, database_url: str
) -> None:
    """Two digests built at once on two connections: the second one's planning reads
    the outbox only after the first one committed, so it plans nothing twice."""
    _apply(store, "Helix Vektor", [_entry("Helix Vektor", "guid:a", title="A", guid="a")])
    (sub,) = _subscribers(store, "rita@example.org")
    story_ids = [s.id for s in store.recent_stories()]
    other = Store(database_url)
    second_started = threading.Event()
    seen: list[OutboxFacts] = []

    def first(facts: OutboxFacts) -> list[PlannedDelivery]:
        # Inside the first transaction, with its rows not yet written: let the second
        # build start and run into the lock, then finish.
        assert second_started.wait(30)
        time.sleep(0.3)
        return [(sub, story_ids, "<first@nordbio.example>")]

    def second(facts: OutboxFacts) -> list[PlannedDelivery]:
        seen.append(facts)
        new = [i for i in story_ids if i not in facts.had.get(sub.id or 0, ())]
        return [(sub, new, "<second@nordbio.example>")] if new else []

    def build_second() -> int | None:
        second_started.set()
        return other.build_digest("manual:b", NOW, NOW, story_ids, second)

    with ThreadPoolExecutor(max_workers=2) as pool:
        a = pool.submit(store.build_digest, "manual:a", NOW, NOW, story_ids, first)
        b = pool.submit(build_second)
        assert (a.result(60), b.result(60)) == (1, 0)
    other.close()

    (facts,) = seen
    assert facts.had == {sub.id: frozenset(story_ids)}
    assert set(facts.waiting_since) == {sub.id}
    assert [d.message_id for d in store.pending_deliveries()] == ["<first@nordbio.example>"]


def test_a_delivery_can_be_claimed_only_once(store: Store, database_url: str) -> None:
    delivery = _one_digest(store)
    other_worker = Store(database_url)

    assert store.claim(delivery.id, "worker-a:1", NOW) is True
    assert other_worker.claim(delivery.id, "worker-b:2", NOW) is False
    assert store.claim(delivery.id, "worker-a:1", NOW) is False
    assert store.pending_deliveries() == []

    store.mark_sent(delivery, NOW, claimed_by="worker-a:1")
    assert store.delivery_counts() == {"sent": 1}
    assert other_worker.claim(delivery.id, "worker-b:2", NOW) is False
    # The stories of a sent delivery are never offered to that subscriber again.
    assert store.unavailable_story_ids(delivery.subscriber.id) == set(delivery.story_ids)
    other_worker.close()


def test_a_stale_worker_cannot_mark_a_delivery_sent(store: Store) -> None:
    delivery = _one_digest(store)
    store.claim(delivery.id, "worker-a:1", NOW)

    store.mark_sent(delivery, NOW, claimed_by="worker-b:2")

    assert store.delivery_counts() == {"sending": 1}


def _sent_story_rows(store: Store) -> int:
    with store.engine.connect() as conn:
        return len(conn.execute(select(sent_stories.c.story_id)).all())


def test_a_recorded_acceptance_is_read_back_as_written(store: Store) -> None:
    delivery = _one_digest(store)
    store.claim(delivery.id, "worker-a:1", NOW)
    later = NOW + timedelta(minutes=7, microseconds=123456)
    with store.sent_recorder() as recorder:
        assert recorder.record(delivery, later, claimed_by="worker-a:1") is True
        # Recorded once: the row is no longer this worker's claim.
        assert recorder.record(delivery, later, claimed_by="worker-a:1") is False
    assert store.last_sent_at(delivery.subscriber.id) == later
    # Stored in the same form as the timestamps SQLAlchemy writes (claimed_at here), so
    # the database compares and sorts them alike.
    with store.engine.connect() as conn:
        sent_at, claimed_at = conn.exec_driver_sql(
            "SELECT sent_at, claimed_at FROM deliveries"
        ).one()
    if isinstance(sent_at, str):  # SQLite keeps text
        assert len(sent_at) == len(claimed_at) and sent_at[10] == claimed_at[10]
        assert sent_at > claimed_at
    else:
        assert (sent_at, claimed_at) == (later, NOW)
    assert store.delivery_counts() == {"sent": 1}
    assert _sent_story_rows(store) == len(set(delivery.story_ids)) > 0


def test_a_failed_record_of_acceptance_writes_nothing_and_says_so(store: Store) -> None:
    delivery = _one_digest(store)
    store.claim(delivery.id, "worker-a:1", NOW)
    refuse_inserts(store, "sent_stories", "database or disk is full")
    try:
        with store.sent_recorder() as recorder:
            with pytest.raises(StoreError) as caught:
                recorder.record(delivery, NOW, claimed_by="worker-a:1")
            message = str(caught.value)
            assert "rita@example.org" in message and "database or disk is full" in message
            assert "sent again by the next run" in message
            # Nothing of that transaction stayed: still claimed, no stories had.
            assert store.delivery_counts() == {"sending": 1}
            assert _sent_story_rows(store) == 0
            allow_inserts(store, "sent_stories")
            # The recorder's connection works again once the database does.
            assert recorder.record(delivery, NOW, claimed_by="worker-a:1") is True
    finally:
        with contextlib.suppress(Exception):
            allow_inserts(store, "sent_stories")
    assert store.delivery_counts() == {"sent": 1}


def test_recover_claims_releases_the_claim_of_a_dead_process(store: Store) -> None:
    delivery = _one_digest(store)
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    assert store.claim(delivery.id, dead, NOW)

    released = store.recover_claims(NOW, timedelta(minutes=15), lambda d: False)

    assert released == 1
    assert [d.id for d in store.pending_deliveries()] == [delivery.id]
    assert store.claim(delivery.id, "worker-new:3", NOW)


def test_recover_claims_marks_a_delivery_the_transport_has_as_sent(store: Store) -> None:
    delivery = _one_digest(store)
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    store.claim(delivery.id, dead, NOW)

    store.recover_claims(NOW, timedelta(minutes=15), lambda d: d.id == delivery.id)

    assert store.delivery_counts() == {"sent": 1}
    assert store.unavailable_story_ids(delivery.subscriber.id) == set(delivery.story_ids)


def test_recover_claims_leaves_live_claims_alone(store: Store) -> None:
    delivery = _one_digest(store)
    store.claim(delivery.id, f"{socket.gethostname()}:{os.getpid()}", NOW)

    released = store.recover_claims(NOW + timedelta(days=1), timedelta(minutes=15), lambda d: False)

    assert released == 0
    assert store.delivery_counts() == {"sending": 1}


def test_recover_claims_of_another_host_waits_for_the_lease(store: Store) -> None:
    delivery = _one_digest(store)
    store.claim(delivery.id, "other-host.example:4242", NOW)
    lease = timedelta(minutes=15)

    assert store.recover_claims(NOW + timedelta(minutes=5), lease, lambda d: False) == 0
    assert store.delivery_counts() == {"sending": 1}
    assert store.recover_claims(NOW + timedelta(minutes=16), lease, lambda d: False) == 1
    assert store.delivery_counts() == {"pending": 1}


def test_retry_and_failure_are_recorded_with_the_reason(store: Store) -> None:
    delivery = _one_digest(store)
    store.claim(delivery.id, "w:1", NOW)

    store.mark_retry(delivery, "451 try later")
    (pending,) = store.pending_deliveries()
    assert pending.attempts == 1
    store.claim(delivery.id, "w:1", NOW)
    store.mark_failed(delivery, "550 no such user")

    assert store.delivery_counts() == {"failed": 1}
    with store.engine.connect() as conn:
        row = conn.execute(select(deliveries.c.last_error, deliveries.c.attempts)).one()
    assert row.last_error == "550 no such user"
    assert row.attempts == 2


def test_subscribers_removed_from_the_config_are_deactivated(store: Store) -> None:
    store.sync_subscribers(
        [Subscriber(email="a@example.org"), Subscriber(email="b@example.org", topics=("x",))], NOW
    )

    store.sync_subscribers([Subscriber(email="b@example.org", languages=("de",))], NOW)

    (only,) = store.active_subscribers()
    assert only.email == "b@example.org"
    assert (only.topics, only.languages) == ((), ("de",))


def test_the_earliest_version_represents_a_story_whatever_the_fetch_order(store: Store) -> None:
    link = "https://www.helixvektor.example/news/acquisition"
    store.sync_feeds([("Hanse Innovationsfonds", "https://www.hanse.example/feed", None)])
    # The investor's later report is fetched first, the company's own release second.
    _apply(store, "Hanse Innovationsfonds", [
        _entry("Hanse Innovationsfonds", "h1", title="Exit: Helix Vektor verkauft", link=link,
               published=NOW - timedelta(days=1))
    ])  # fmt: skip
    _apply(store, "Helix Vektor", [
        _entry("Helix Vektor", "x1", title="Coastline acquires Helix Vektor", link=link,
               published=NOW - timedelta(days=2))
    ], now=NOW + timedelta(minutes=5))  # fmt: skip

    (story,) = store.recent_stories()
    assert story.entry.title == "Coastline acquires Helix Vektor"
    assert [s.feed_name for s in story.sources] == ["Helix Vektor", "Hanse Innovationsfonds"]
    # The story is dated by its earliest version, so it sorts where the news happened.
    assert story.entry.published == NOW - timedelta(days=2)


def test_many_304s_are_recorded_in_one_go_as_one_by_one(store: Store) -> None:
    """The batched 304 path writes what record_not_modified writes, feed by feed."""
    later = NOW + timedelta(hours=1)
    store.record_failure("Helix Vektor", status=503, error="HTTP 503", now=NOW)
    store.record_not_modified(
        "Elbmed Pharma", status=304, etag='"a"', last_modified=None, now=NOW,
        poll=PollFacts("ok", later, moved_to="https://www.elbmed.example/new.atom"),
    )  # fmt: skip
    store.record_not_modified_many(
        [
            ("Helix Vektor", 304, '"h2"', "Tue, 24 Nov 2026 10:00:00 GMT", PollFacts("ok", later)),
            ("Elbmed Pharma", 304, '"a2"', None, PollFacts("ok", later)),
            ("Kansai Bio Frontier", 304, None, None,
             PollFacts("ok", later, discovered_url="https://kansai-bio.example/feed")),
        ],
        later,
    )  # fmt: skip
    status = {s.name: s for s in store.feed_statuses(later)}
    helix, elbmed, kansai = (
        status["Helix Vektor"],
        status["Elbmed Pharma"],
        status["Kansai Bio Frontier"],
    )
    assert (helix.etag, helix.last_modified) == ('"h2"', "Tue, 24 Nov 2026 10:00:00 GMT")
    assert (helix.state, helix.consecutive_failures, helix.last_error) == ("ok", 0, None)
    assert helix.failing_since is None and helix.last_success_at == later
    assert helix.next_attempt_at == later and helix.last_status == 304
    # An answer that learnt nothing new keeps what an earlier one learnt.
    assert elbmed.etag == '"a2"' and elbmed.moved_to == "https://www.elbmed.example/new.atom"
    assert kansai.discovered_url == "https://kansai-bio.example/feed"


def test_sync_feeds_writes_only_what_the_config_changed(database_url: str) -> None:
    store = Store(database_url)
    store.migrate()
    config = [
        ("Helix Vektor", "https://www.helixvektor.example/feed", None),
        ("Elbmed Pharma", "https://www.elbmed.example/feed", "https://www.elbmed.example/"),
    ]
    store.sync_feeds(config)
    with store.engine.begin() as conn:
        conn.execute(update(feeds).values(etag='"v1"', last_modified="Fri, 20 Nov 2026"))
    writes: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            writes.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    store.sync_feeds(config)  # every start of every command does this
    assert writes == []
    assert store.feed_validators("Helix Vektor") == ('"v1"', "Fri, 20 Nov 2026")

    store.sync_feeds(
        [
            ("Helix Vektor", "https://www.helixvektor.example/news.rss", None),  # moved
            ("Elbmed Pharma", "https://www.elbmed.example/feed", "https://elbmed.example/"),
            ("Kansai Bio Frontier", "https://kansai-bio.example/rss", None),  # new
        ]
    )
    assert len(writes) == 3
    assert store.feed_validators("Helix Vektor") == (None, None)  # a new URL starts afresh
    assert store.feed_validators("Elbmed Pharma") == ('"v1"', "Fri, 20 Nov 2026")
    with store.engine.connect() as conn:
        rows = dict(conn.execute(select(feeds.c.name, feeds.c.site_url)).all())
    assert rows == {
        "Helix Vektor": None,
        "Elbmed Pharma": "https://elbmed.example/",
        "Kansai Bio Frontier": None,
    }
    store.close()
