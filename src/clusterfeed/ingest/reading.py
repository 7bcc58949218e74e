"""Turn one fetched document into entries: parse (or scrape), then normalize.

This is the unit of work of the parsing processes, so it imports only what reading
needs: a worker that unpickles ``read_feed`` loads this module, feedparser, nh3 and
the model, not the store, the web layer or the mailer, which kept about 40 MB more in
every worker. BeautifulSoup (for listing pages and for the feeds an HTML page
announces) is imported when such a page comes along.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from clusterfeed.ingest.normalize import normalize_entries
from clusterfeed.ingest.parse import FeedParseError, parse_feed
from clusterfeed.model import Entry, FetchResult

if TYPE_CHECKING:
    from clusterfeed.ingest.scrape import ListingSelectors


@dataclass(frozen=True)
class ReadSpec:
    """What reading needs to know about a feed's config, as plain (picklable) data."""

    url: str
    site: str | None = None
    is_remote: bool = True
    topics: tuple[str, ...] = ()
    language: str = "en"
    selectors: ListingSelectors | None = None  # a listing page (kind "html"), else a feed


@dataclass(frozen=True)
class ReadFeed:
    """One fetched document, parsed and normalized: entries, or why there are none."""

    entries: list[Entry] = field(default_factory=list)
    warning: str | None = None
    error: str | None = None
    announced_feeds: list[str] = field(default_factory=list)


def read_feed(result: FetchResult, spec: ReadSpec, timezone: str, now: datetime) -> ReadFeed:
    """Parse and normalize one fetched document; pure, so it can run in a worker process.

    This is where a fetch cycle spends its CPU (feedparser, the sanitizer); keeping it
    free of the store and the event loop lets it run on every core while the main
    process goes on talking to the network.
    """
    body = result.body or b""
    remote_base = result.final_url if spec.is_remote else None
    try:
        if spec.selectors is not None:
            from clusterfeed.ingest.scrape import scrape_listing

            parsed = scrape_listing(
                body,
                result.headers,
                remote_base or spec.site or spec.url,
                spec.selectors,
                timezone=timezone,
            )
        else:
            parsed = parse_feed(body, result.headers, remote_base or spec.site)
    except FeedParseError as exc:
        reason = str(exc)
        links = []
        if "HTML page" in reason:
            from clusterfeed.ingest.scrape import discover_feed_links

            links = discover_feed_links(body, result.final_url or result.url)
        return ReadFeed(error=reason, announced_feeds=links)
    entries = normalize_entries(
        parsed.entries,
        feed_name=result.feed_name,
        feed_topics=spec.topics,
        feed_language=spec.language,
        base_url=remote_base or spec.site or parsed.link,
        now=now,
    )
    return ReadFeed(entries=entries, warning=parsed.warning)
