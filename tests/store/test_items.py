"""Entries and stories as fetches store them: no duplicates, updates in place, a
second source joins the story, and the representative does not depend on fetch order."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.store import Store
from tests.conftest import FeedServer, Route, write_config
from tests.store.kit import NOW, apply, entry


def test_storing_the_same_fetch_again_creates_no_duplicates(store: Store) -> None:
    items = [
        entry("Helix Vektor", "guid:a", title="Vector plant opens", guid="a"),
        entry("Helix Vektor", "guid:b", title="Phase I results", guid="b"),
    ]

    first = apply(store, "Helix Vektor", items)
    again = apply(store, "Helix Vektor", items)

    assert (first.new_entries, first.new_stories) == (2, 2)
    assert (again.new_entries, again.updated_entries, again.new_stories) == (0, 0, 0)
    assert store.count_entries() == 2
    assert store.count_stories() == 2


def test_a_changed_item_is_updated_in_place(store: Store) -> None:
    apply(store, "Helix Vektor", [entry("Helix Vektor", "guid:a", title="Old title", guid="a")])

    summary = apply(
        store, "Helix Vektor", [entry("Helix Vektor", "guid:a", title="New title", guid="a")]
    )

    assert (summary.new_entries, summary.updated_entries) == (0, 1)
    assert store.count_entries() == 1
    assert [s.entry.title for s in store.recent_stories()] == ["New title"]


def test_a_second_source_of_the_same_item_is_recorded_on_the_story(store: Store) -> None:
    link = "https://www.helixvektor.example/news/acquisition"
    apply(store, "Helix Vektor", [entry("Helix Vektor", "h1", title="Helix acquired", link=link)])

    summary = apply(
        store,
        "Elbmed Pharma",
        [
            entry(
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


def test_the_earliest_version_represents_a_story_whatever_the_fetch_order(store: Store) -> None:
    link = "https://www.helixvektor.example/news/acquisition"
    store.sync_feeds([("Hanse Innovationsfonds", "https://www.hanse.example/feed", None)])
    # The investor's later report is fetched first, the company's own release second.
    apply(store, "Hanse Innovationsfonds", [
        entry("Hanse Innovationsfonds", "h1", title="Exit: Helix Vektor verkauft", link=link,
               published=NOW - timedelta(days=1))
    ])  # fmt: skip
    apply(store, "Helix Vektor", [
        entry("Helix Vektor", "x1", title="Coastline acquires Helix Vektor", link=link,
               published=NOW - timedelta(days=2))
    ], now=NOW + timedelta(minutes=5))  # fmt: skip

    (story,) = store.recent_stories()
    assert story.entry.title == "Coastline acquires Helix Vektor"
    assert [s.feed_name for s in story.sources] == ["Helix Vektor", "Hanse Innovationsfonds"]
    # The story is dated by its earliest version, so it sorts where the news happened.
    assert story.entry.published == NOW - timedelta(days=2)
