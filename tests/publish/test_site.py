"""The news page for people, written by publish beside the feeds."""

from __future__ import annotations

import asyncio
from html.parser import HTMLParser
from pathlib import Path

from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.store import Store
from tests.conftest import EXAMPLE_STORIES, FeedServer, served_example_feeds, write_config


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.alternates: list[dict[str, str | None]] = []
        self.headlines: list[str] = []
        self.scripts = 0
        self.images: list[dict[str, str | None]] = []
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "link" and a.get("rel") == "alternate":
            self.alternates.append(a)
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.images.append(a)
        if tag == "h2":
            self._in_h2 = True
            self.headlines.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.headlines[-1] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_the_index_page_lists_the_stories_and_links_the_feeds(
    tmp_path: Path, feed_server: FeedServer
) -> None:
    config = load_config(write_config(tmp_path, served_example_feeds(feed_server)))
    service = Service(config, Store(config.database_url))
    service.prepare()
    asyncio.run(service.fetch())
    first = service.publish()
    index = tmp_path / "public" / "index.html"
    assert index in first.written

    page = _parse(index)
    assert {(a["type"], a["href"]) for a in page.alternates} == {
        ("application/atom+xml", "feed.atom"),
        ("application/rss+xml", "feed.rss"),
        ("application/feed+json", "feed.json"),
    }
    assert len(page.headlines) == EXAMPLE_STORIES
    assert "Coastline" in " ".join(page.headlines)
    assert page.scripts == 0  # no JavaScript, and the partner's <script> never got here
    assert all(img.get("alt") for img in page.images)
    text = index.read_text(encoding="utf-8")
    assert "Also reported by:" in text
    assert 'name="viewport"' in text

    topic = _parse(tmp_path / "public" / "topics" / "gene-therapy.html")
    assert ("application/atom+xml", "gene-therapy.atom") in {
        (a["type"], a["href"]) for a in topic.alternates
    }
    assert topic.headlines and len(topic.headlines) < EXAMPLE_STORIES

    again = service.publish()
    assert index in again.unchanged  # byte-identical when nothing changed
    service.store.close()
