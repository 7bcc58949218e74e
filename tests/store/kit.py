"""What the store tests build their data from: entries, fetches, subscribers, a digest."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from clusterfeed.model import Entry, Subscriber
from clusterfeed.store import Delivery, FeedUpdateSummary, Store

NOW = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)

FEEDS = [
    ("Helix Vektor", "https://www.helixvektor.example/feed", None),
    ("Elbmed Pharma", "https://www.elbmed.example/news.atom", None),
    ("Kansai Bio Frontier", "https://kansai-bio.example/rss", None),
]


def entry(
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


def apply(store: Store, feed: str, items: list[Entry], now: datetime = NOW) -> FeedUpdateSummary:
    """Store one successful fetch of ``feed`` that listed ``items``."""
    return store.apply_feed_update(
        feed, items, status=200, etag='"v1"', last_modified=None, title=feed, warning=None, now=now
    )


def subscribers(store: Store, *emails: str) -> list[Subscriber]:
    store.sync_subscribers([Subscriber(email=e) for e in emails], NOW)
    return store.active_subscribers()


def one_digest(store: Store, key: str = "scheduled:2026-11-20T06:00:00+00:00") -> Delivery:
    """One story, one subscriber, one digest: the outbox row waiting to be sent."""
    apply(store, "Helix Vektor", [entry("Helix Vektor", "guid:a", title="A", guid="a")])
    (sub,) = subscribers(store, "rita@example.org")
    story_ids = [s.id for s in store.recent_stories()]
    assert store.create_digest(key, NOW, [(sub, story_ids, "<m1@nordbio.example>")], NOW)
    (delivery,) = store.pending_deliveries()
    return delivery


def dead_pid() -> int:
    """The pid of a process of ours that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
