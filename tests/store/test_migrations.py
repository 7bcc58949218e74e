"""The schema's versions: a new database, an upgrade from every older version (made by an
Alembic-era release or by the last release before Alembic), a database newer than the
code, two processes starting at once, and ``clusterfeed migrate``. Every test runs on a
SQLite file and on the test PostgreSQL (``database_url``)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.command import upgrade as alembic_upgrade
from alembic.migration import MigrationContext
from sqlalchemy import event, inspect, select, update
from sqlalchemy.engine import Engine

from clusterfeed.model import Subscriber
from clusterfeed.store import (
    _LOCK_KEY,
    SCHEMA_VERSION,
    PlannedDelivery,
    Store,
    StoreError,
    entries,
    metadata,
    schema_info,
    story_corrections,
    story_features,
)
from clusterfeed.store import subscribers as subscribers_table
from clusterfeed.store.versioning import _config, revision_id, script_directory
from tests.conftest import write_config
from tests.store.kit import FEEDS, NOW, apply, entry, one_digest, subscribers
from tests.store.old_schemas import V2_FEED_COLUMNS, V4_TABLES, as_previous_release, back_to_version

ORIGINS = ["alembic", "previous-release"]
HEAD = SCHEMA_VERSION
PARTNER = [{"name": "Partner", "url": "https://partner.example/feed"}]


def _old_store(database_url: str, version: int, origin: str, fill: Any = None) -> None:
    """A store at ``version`` as ``origin`` left it, with what ``fill`` wrote first."""
    store = Store(database_url)
    store.migrate()
    store.sync_feeds(FEEDS)
    if fill is not None:
        fill(store)
    with store.engine.begin() as conn:
        back_to_version(conn, version)
        if origin == "previous-release":
            as_previous_release(conn)
    store.close()


def _alembic_revisions(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars())


def _dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, each as a tuple of its columns sorted by name."""
    tables: dict[str, list[tuple[Any, ...]]] = {}
    inspector = inspect(engine)
    with engine.connect() as conn:
        for table in inspector.get_table_names():
            if table == "alembic_version":
                continue
            names = sorted(c["name"] for c in inspector.get_columns(table))
            rows = conn.exec_driver_sql(f"SELECT {', '.join(names)} FROM {table}").all()
            tables[table] = sorted((tuple(zip(names, r, strict=True)) for r in rows), key=repr)
    return tables


def _fill_every_table(store: Store) -> None:
    """A row or more in every table, through the store as the service writes them."""
    apply(
        store,
        "Helix Vektor",
        [
            entry("Helix Vektor", "guid:a", title="Vector plant opens", guid="a",
                  link="https://www.helixvektor.example/news/plant"),
            entry("Helix Vektor", "guid:b", title="Phase I results", guid="b"),
        ],
    )  # fmt: skip
    apply(
        store,
        "Elbmed Pharma",
        [entry("Elbmed Pharma", "e1", title="Plant opens", link="https://www.helixvektor.example/news/plant")],
    )  # fmt: skip
    store.record_failure("Kansai Bio Frontier", status=500, error="HTTP 500", now=NOW)
    store.record_alert("Kansai Bio Frontier", "failing", "Kansai Bio Frontier fails", NOW)
    store.put_setting("signing_secret", "s3cret")
    rita = {s.email: s for s in subscribers(store, "rita@example.org", "gone@example.org")}[
        "rita@example.org"
    ]
    store.record_signup(
        Subscriber(email="new@example.org", topics=("research",)), NOW, status="pending",
        origin="web", action="signup", form_version="1", ip_hash="ab" * 32,
    )  # fmt: skip
    assert store.erase("gone@example.org", "cd" * 32, NOW)
    assert store.take_rate("client", NOW, timedelta(hours=1), 5)
    story_ids = [s.id for s in store.recent_stories()]
    row = PlannedDelivery(rita, story_ids[:1], "<m1@nordbio.example>", story_ids[1:])
    assert store.create_digest("scheduled:2026-11-20T06:00:00+00:00", NOW, [row], NOW)
    (delivery,) = store.pending_deliveries()
    assert store.claim(delivery.id, "worker-a:1", NOW)
    store.mark_sent(delivery, NOW, claimed_by="worker-a:1")
    with store.engine.begin() as conn:
        entry_id = conn.exec_driver_sql("SELECT min(id) FROM entries").scalar_one()
        conn.execute(
            story_features.insert().values(
                entry_id=entry_id, fingerprint="f" * 64, vector=b"\x00\x01" * 8,
                evidence={"names": ["Helix"]},
            )
        )  # fmt: skip
        conn.execute(
            story_corrections.insert().values(
                link_a="a.example/1", link_b="b.example/2", verdict="apart", created_at=NOW
            )
        )


# -- a new database ----------------------------------------------------------------------


def test_migrate_creates_the_current_schema_and_is_idempotent(database_url: str) -> None:
    store = Store(database_url)
    assert store.schema_version() == 0

    assert store.migrate() == SCHEMA_VERSION == 10
    assert store.schema_version() == 10
    tables = set(inspect(store.engine).get_table_names())
    assert {"feeds", "entries", "stories", "subscribers", "digests", "deliveries"} <= tables
    assert "alerts" in tables
    assert _alembic_revisions(store.engine) == ["0010"]

    store.sync_feeds([("Helix Vektor", "https://www.helixvektor.example/feed", None)])
    assert store.migrate() == 10  # a second start changes nothing and loses nothing
    assert [s.name for s in store.feed_statuses()] == ["Helix Vektor"]
    with store.engine.connect() as conn:
        assert conn.execute(select(schema_info.c.version)).scalars().all() == [10]
    store.close()


def test_the_newest_revision_is_the_schema_version_the_code_writes() -> None:
    assert script_directory().get_heads() == [revision_id(SCHEMA_VERSION)]
    # One unbroken line of history from version 1, each revision named by its version.
    revisions = [r.revision for r in script_directory().walk_revisions()]
    assert revisions == [revision_id(v) for v in range(SCHEMA_VERSION, 0, -1)]


def test_replaying_every_revision_gives_the_tables_a_new_database_gets(database_url: str) -> None:
    """The two ways to today's schema (``create_all`` for a new database, the chain of
    revisions for an old one) agree, column for column and index for index."""
    engine = sqlalchemy.create_engine(database_url)
    with engine.begin() as conn:
        alembic_upgrade(_config(conn), "head")
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []
    engine.dispose()


# -- older databases -----------------------------------------------------------------------


@pytest.mark.parametrize("origin", ORIGINS)
@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_an_older_store_is_upgraded_and_loses_no_row(
    database_url: str, version: int, origin: str
) -> None:
    _old_store(database_url, version, origin, _fill_every_table)
    before = Store(database_url)
    old_rows = _dump(before.engine)
    assert before.schema_version() == version
    before.close()

    upgraded = Store(database_url)
    change = upgraded.upgrade_schema()

    assert (change.before, change.after) == (version, SCHEMA_VERSION)
    assert _alembic_revisions(upgraded.engine) == [revision_id(SCHEMA_VERSION)]
    new_rows = _dump(upgraded.engine)
    assert old_rows.pop("schema_info") == [(("id", 1), ("version", version))]
    assert all(old_rows.values()), "every table of the old store has rows"
    for table, rows in old_rows.items():
        # Every row and every value that was there, whatever columns were added.
        old_columns = {name for name, _ in rows[0]} if rows else set()
        kept = sorted(
            (tuple((n, v) for n, v in row if n in old_columns) for row in new_rows[table]),
            key=repr,
        )
        assert kept == rows, table
    assert set(new_rows) == set(metadata.tables)
    # And the upgraded store works: the stories and the mail that was sent are there.
    assert upgraded.count_entries() == 3
    assert upgraded.delivery_counts() == {"sent": 1}
    assert upgraded.get_setting("signing_secret") == "s3cret"
    upgraded.close()


def test_a_version_1_store_gets_each_feeds_state_from_its_history(database_url: str) -> None:
    def fill(store: Store) -> None:
        store.record_failure(
            "Elbmed Pharma", status=500, error="HTTP 500 Internal Server Error", now=NOW
        )
        apply(store, "Helix Vektor", [])

    _old_store(database_url, 1, "previous-release", fill)

    upgraded = Store(database_url)
    assert upgraded.migrate() == SCHEMA_VERSION
    columns = {c["name"] for c in inspect(upgraded.engine).get_columns("feeds")}
    assert set(V2_FEED_COLUMNS) <= columns
    statuses = {s.name: s for s in upgraded.feed_statuses()}
    assert statuses["Elbmed Pharma"].consecutive_failures == 1
    assert statuses["Elbmed Pharma"].last_error == "HTTP 500 Internal Server Error"
    with upgraded.engine.connect() as conn:
        states = dict(conn.exec_driver_sql("SELECT name, state FROM feeds").all())
        failing_since = conn.exec_driver_sql(
            "SELECT failing_since FROM feeds WHERE name = 'Elbmed Pharma'"
        ).scalar_one()
    assert states == {
        "Helix Vektor": "ok",
        "Elbmed Pharma": "failing",
        "Kansai Bio Frontier": "new",
    }
    assert failing_since is not None
    upgraded.close()


@pytest.mark.parametrize("origin", ORIGINS)
def test_a_version_3_store_has_its_subscribers_confirmed_or_removed(
    database_url: str, origin: str
) -> None:
    _old_store(database_url, 3, origin)
    store = Store(database_url)
    with store.engine.begin() as conn:
        # What version 3 held: two config subscribers, one of them taken off the config.
        for email, active in (("rita@example.org", True), ("old@example.org", False)):
            conn.execute(
                subscribers_table.insert().values(
                    email=email, topics=[], languages=["de"], frequency="weekly",
                    active=active, origin="config", created_at=NOW,
                )
            )  # fmt: skip
    store.close()

    upgraded = Store(database_url)
    assert upgraded.migrate() == SCHEMA_VERSION
    assert set(V4_TABLES) <= set(inspect(upgraded.engine).get_table_names())
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
    database_url: str,
) -> None:
    made: dict[str, Any] = {}
    _old_store(database_url, 4, "previous-release", lambda s: made.update(d=one_digest(s)))
    delivery = made["d"]

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


def test_a_version_5_store_keeps_what_each_subscriber_was_sent(database_url: str) -> None:
    made: dict[str, Any] = {}

    def fill(store: Store) -> None:
        delivery = one_digest(store)
        store.claim(delivery.id, "worker-a:1", NOW)
        store.mark_sent(delivery, NOW, claimed_by="worker-a:1")
        made["d"] = delivery

    _old_store(database_url, 5, "previous-release", fill)
    delivery = made["d"]
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
    database_url: str,
) -> None:
    made: dict[str, Any] = {}
    _old_store(database_url, 6, "previous-release", lambda s: made.update(d=one_digest(s)))
    delivery = made["d"]
    upgraded = Store(database_url)

    assert upgraded.migrate() == SCHEMA_VERSION

    # The waiting mail is as it was, with nothing left out.
    (due,) = upgraded.pending_deliveries(now=NOW)
    assert (due.id, due.story_ids, due.left_out) == (delivery.id, delivery.story_ids, ())
    # A new digest records what the cap left out; planning and its web version see it.
    apply(upgraded, "Helix Vektor", [entry("Helix Vektor", "guid:b", title="B", guid="b")])
    (sub,) = subscribers(upgraded, "rita@example.org")
    new = [s.id for s in upgraded.recent_stories() if s.id not in delivery.story_ids]
    row = PlannedDelivery(sub, [], "<m2@nordbio.example>", new)
    assert upgraded.create_digest("manual:b", NOW, [row], NOW)
    assert upgraded.outbox_facts(new).offered == {sub.id: frozenset(new)}
    (digest,) = [d for d in upgraded.sent_digests() if d.key == "manual:b"]
    assert upgraded.digest_story_ids(digest.id) == new
    upgraded.close()


def test_a_version_9_store_is_upgraded_and_its_entries_keep_their_dates(
    database_url: str,
) -> None:
    made: dict[str, Any] = {}

    def fill(store: Store) -> None:
        apply(store, "Helix Vektor", [entry("Helix Vektor", "guid:a", title="A", guid="a")])
        (made["story"],) = store.recent_stories()

    _old_store(database_url, 9, "previous-release", fill)
    before = made["story"]
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


def test_a_current_store_of_the_previous_release_is_adopted_as_it_is(database_url: str) -> None:
    _old_store(database_url, SCHEMA_VERSION, "previous-release", _fill_every_table)
    store = Store(database_url)
    rows = _dump(store.engine)

    change = store.upgrade_schema()

    assert (change.before, change.after, change.changed) == (HEAD, HEAD, False)
    assert _alembic_revisions(store.engine) == [revision_id(HEAD)]
    assert _dump(store.engine) == rows
    store.close()


# -- running it again, and at once -------------------------------------------------------


def _writes(engine: Engine) -> list[str]:
    """Collects every statement that is not a read, for as long as the test runs."""
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _record(_c: Any, _cur: Any, statement: str, *_args: Any) -> None:
        if not statement.lstrip().upper().startswith(("SELECT", "PRAGMA", "SHOW", "BEGIN")):
            seen.append(statement)

    return seen


@pytest.mark.parametrize("origin", ORIGINS)
def test_migrating_twice_does_nothing_the_second_time(database_url: str, origin: str) -> None:
    _old_store(database_url, 2, origin, _fill_every_table)
    store = Store(database_url)
    first = store.upgrade_schema()
    rows = _dump(store.engine)
    writes = _writes(store.engine)

    second = store.upgrade_schema()

    assert (first.before, first.after) == (2, HEAD)
    assert (second.before, second.after, second.changed) == (HEAD, HEAD, False)
    assert writes == []
    assert _dump(store.engine) == rows
    store.close()


RACER = """
import sys
from clusterfeed.store import Store
print("ready", flush=True)
change = Store(sys.argv[1]).upgrade_schema()
print(change.before, change.after, flush=True)
"""


def test_two_processes_starting_at_once_create_the_schema_once(database_url: str) -> None:
    """Both processes find an empty database; the lock makes the second wait for the
    first and then find its work, instead of creating the tables a second time."""
    tag = f"cf-race-{uuid.uuid4().hex[:8]}"
    postgres = database_url.startswith("postgresql")
    url = f"{database_url}&application_name={tag}" if postgres else database_url
    holder = sqlalchemy.create_engine(database_url)
    with holder.connect() as held:
        # Hold the writers' lock so both processes are surely waiting for it at once.
        if postgres:
            held.exec_driver_sql(f"SELECT pg_advisory_lock({_LOCK_KEY})")
        else:
            held.exec_driver_sql("PRAGMA journal_mode=WAL")  # as the store opens it
            held.exec_driver_sql("BEGIN IMMEDIATE")
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, url],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        for racer in racers:
            assert racer.stdout is not None
            assert racer.stdout.readline().strip() == "ready"
        if postgres:
            _wait_for_lock_waiters(holder, tag, 2)
        else:
            time.sleep(1.0)  # both are past their read and wait in BEGIN IMMEDIATE
        if postgres:
            held.exec_driver_sql(f"SELECT pg_advisory_unlock({_LOCK_KEY})")
        else:
            held.exec_driver_sql("ROLLBACK")
        results = [r.communicate(timeout=60) for r in racers]
    holder.dispose()

    assert [r.returncode for r in racers] == [0, 0], [err for _, err in results]
    changes = sorted(out.split()[-2:] for out, _ in results)
    assert changes == [["0", str(HEAD)], [str(HEAD), str(HEAD)]]  # one made it, one found it
    store = Store(database_url)
    assert _alembic_revisions(store.engine) == [revision_id(HEAD)]
    with store.engine.connect() as conn:
        assert conn.execute(select(schema_info.c.version)).scalars().all() == [HEAD]
    store.close()


def _wait_for_lock_waiters(engine: Engine, tag: str, count: int) -> None:
    deadline = time.monotonic() + 30
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %(tag)s"
                " AND wait_event_type = 'Lock'",
                {"tag": tag},
            ).scalar_one()
            if waiting == count:
                return
            conn.rollback()  # pg_stat_activity holds still within one transaction
            time.sleep(0.05)
    raise AssertionError(f"the processes never both waited for the writers' lock ({tag})")


# -- newer databases ----------------------------------------------------------------------


def test_a_newer_schema_is_refused_with_a_clear_message(store: Store) -> None:
    with store.engine.begin() as conn:
        # What a newer clusterfeed leaves: its revision, and the number older ones read.
        conn.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{revision_id(HEAD + 1)}'")
        conn.execute(update(schema_info).values(version=SCHEMA_VERSION + 1))

    with pytest.raises(StoreError, match="newer than this clusterfeed understands") as caught:
        store.migrate()
    assert f"schema version {HEAD + 1}" in str(caught.value)
    assert "Upgrade clusterfeed" in str(caught.value)


def test_a_newer_store_of_the_previous_kind_is_refused(store: Store) -> None:
    with store.engine.begin() as conn:
        as_previous_release(conn)
        conn.execute(update(schema_info).values(version=SCHEMA_VERSION + 1))

    with pytest.raises(StoreError, match="newer than this clusterfeed understands"):
        store.migrate()


def test_another_programs_alembic_revision_is_refused(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ae1027a6acf'")

    with pytest.raises(StoreError, match="ae1027a6acf, which is not one of clusterfeed's"):
        store.migrate()


# -- the command --------------------------------------------------------------------------


def test_the_migrate_command_says_from_which_version_to_which(
    tmp_path: Path, database_url: str, run_cli: Any
) -> None:
    config = write_config(tmp_path, PARTNER, database_url=database_url)
    _old_store(database_url, 3, "previous-release", _fill_every_table)

    first = run_cli("migrate", "--config", config)
    second = run_cli("migrate", "--config", config)

    assert first.exit_code == 0, first.output
    assert first.stdout.endswith(f": upgraded the schema from version 3 to {HEAD}\n")
    assert first.stdout.startswith("database ")
    assert second.stdout.endswith(f": the schema is at version {HEAD} already; nothing to do\n")
    store = Store(database_url)
    assert store.count_entries() == 3  # and nothing was lost on the way
    store.close()


def test_the_migrate_command_creates_a_new_database(
    tmp_path: Path, database_url: str, run_cli: Any
) -> None:
    config = write_config(tmp_path, PARTNER, database_url=database_url)

    result = run_cli("migrate", "--config", config)

    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(f": created the schema at version {HEAD}\n")


def test_the_migrate_command_refuses_a_newer_database(
    tmp_path: Path, database_url: str, run_cli: Any
) -> None:
    config = write_config(tmp_path, PARTNER, database_url=database_url)
    store = Store(database_url)
    store.migrate()
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{revision_id(HEAD + 1)}'")
    store.close()

    result = run_cli("migrate", "--config", config)

    assert result.exit_code == 2
    assert "newer than this clusterfeed understands" in result.stderr
    assert "Upgrade clusterfeed" in result.stderr
