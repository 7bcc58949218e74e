"""Keyword and topic filters, global and per feed, and the representative rule."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.ingest.filters import FilterRules, keep
from clusterfeed.model import Entry
from clusterfeed.store import Store
from tests.conftest import EXAMPLE_FEEDS, FeedServer, write_config

NOW = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def _entry(title: str, summary: str = "", topics: tuple[str, ...] = ()) -> Entry:
    return Entry(
        feed_name="Elbmed Pharma", identity=title, guid=None, link=None, link_key=None,
        title=title, summary_html="", summary_text=summary, content_html="",
        image_url=None, image_alt=None, author=None, topics=topics, language="de",
        published=NOW, updated=NOW, content_hash=title,
    )  # fmt: skip


def test_keywords_match_whole_words_case_insensitively() -> None:
    rules = [FilterRules(exclude_keywords=("Stelle",))]
    assert not keep(_entry("Offene Stelle: Laborleitung (m/w/d)"), rules)
    assert not keep(_entry("Wir suchen", "eine neue stelle in Kiel"), rules)
    assert keep(_entry("Neue Herstellung von Wirkstoffen in Wedel"), rules)


def test_include_lists_narrow_and_exclusion_wins() -> None:
    rules = [
        FilterRules(include_topics=("gene-therapy", "financing")),
        FilterRules(exclude_keywords=("webinar",)),
    ]
    assert keep(_entry("Series A closed", topics=("financing",)), rules)
    assert not keep(_entry("Plant opening", topics=("cluster",)), rules)
    assert not keep(_entry("Webinar on AAV", topics=("gene-therapy",)), rules)


def test_filters_keep_items_out_of_the_store_and_the_feed(
    tmp_path: Path, feed_server: FeedServer
) -> None:
    url = feed_server.serve_file("/nordbio-de.rss", EXAMPLE_FEEDS / "nordbio-de.rss")
    # The feed's own filter is a [feeds.filters] table of the (only) feed.
    extra = (
        '[filters]\nexclude_keywords = ["Newsletter"]\n\n'
        '[feeds.filters]\nexclude_keywords = ["Webinar-Reihe"]\n'
    )
    feeds = [{"name": "NordBio Cluster (Deutsch)", "url": url, "language": "de"}]
    config = load_config(write_config(tmp_path, feeds, extra=extra))
    service = Service(config, Store(config.database_url))
    service.prepare()
    (outcome,) = asyncio.run(service.fetch())
    titles = [s.entry.title for s in service.store.recent_stories()]
    assert outcome.new_entries == len(titles) == 3  # 7 items: 2 newsletters, 2 webinars out
    assert not any("Newsletter" in t or "Webinar-Reihe" in t for t in titles)
    service.store.close()


def test_the_clusters_own_version_represents_a_story(
    tmp_path: Path, feed_server: FeedServer
) -> None:
    helix = feed_server.serve_file("/h.rss", EXAMPLE_FEEDS / "helix-vektor.rss")
    nordbio = feed_server.serve_file("/n.atom", EXAMPLE_FEEDS / "nordbio-en.atom")
    feeds = [
        {"name": "Helix Vektor", "url": helix},
        {"name": "NordBio Cluster", "url": nordbio, "own": True},
    ]
    config = load_config(write_config(tmp_path, feeds))
    service = Service(config, Store(config.database_url))
    service.prepare()
    asyncio.run(service.fetch())
    (story,) = [
        s
        for s in service.store.recent_stories()
        if len(s.sources) > 1 and "Coastline" in s.entry.title
    ]
    # Helix's own release came first and is longer; the cluster's version still leads.
    assert story.sources[0].feed_name == "NordBio Cluster"
    assert story.entry.feed_name == "NordBio Cluster"
    assert story.sources[1].feed_name == "Helix Vektor"
    service.store.close()
