"""Feeds' rows: many 304s in one go, and only what the config changed is written."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import event, select, update

from clusterfeed.model import PollFacts
from clusterfeed.store import Store, feeds
from tests.store.kit import NOW


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
