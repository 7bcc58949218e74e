"""Partners without a feed: turn a news listing page into entries with CSS selectors.

Many partner sites have a "News" page (a picture, a headline, two lines and "Read
more", like the cluster page in the domain notes) but no RSS or Atom. The operator
names, in the config, the CSS selectors for one item on that page and for its title,
link, date, summary and picture; this module applies them with BeautifulSoup (on the
lxml parser, which copes with the broken HTML that real CMSs emit) and returns entries
shaped like feedparser's, so the rest of the pipeline treats them like any feed.

A listing page whose item selector matches nothing is an error, not an empty feed:
that is what a site redesign looks like, and the operator has to update the selectors.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

from bs4 import BeautifulSoup, Tag
from soupsieve import SelectorSyntaxError

from clusterfeed.ingest.dates import parse_human_date
from clusterfeed.ingest.parse import FeedParseError
from clusterfeed.model import ParsedFeed


@dataclass(frozen=True)
class ListingSelectors:
    """CSS selectors for one news listing page; all but ``item`` are relative to an item."""

    item: str
    title: str
    link: str = "a"
    date: str | None = None
    date_format: str | None = None
    summary: str | None = None
    image: str | None = None


def check_selector(selector: str) -> str | None:
    """None if ``selector`` is valid CSS, else the reason (for the config check)."""
    try:
        BeautifulSoup("<p></p>", "lxml").select(selector)
    except (SelectorSyntaxError, ValueError) as exc:
        return str(exc).splitlines()[0]
    return None


def _text(node: Tag | None) -> str:
    return " ".join(node.get_text(" ", strip=True).split()) if node is not None else ""


def _first(item: Tag, selector: str | None) -> Tag | None:
    if not selector:
        return None
    found = item.select_one(selector)
    return found if isinstance(found, Tag) else None


def _attribute_url(node: Tag | None, *names: str) -> str | None:
    if node is None:
        return None
    for name in names:
        value = node.get(name)
        if isinstance(value, list):
            value = " ".join(value)
        # A lazy-loading page puts a tiny data: placeholder in src and the real picture
        # in data-src or srcset: taking the placeholder lost every picture of the page.
        if value and value.strip() and not value.strip().lower().startswith("data:"):
            if name == "srcset":
                return value.split(",")[0].split()[0]
            return value.strip()
    return None


def scrape_listing(
    body: bytes,
    headers: Mapping[str, str],
    page_url: str,
    selectors: ListingSelectors,
    *,
    timezone: str = "UTC",
) -> ParsedFeed:
    """Entries from a listing page; raise FeedParseError when the selectors find nothing."""
    encoding = None
    content_type = headers.get("content-type", "")
    if "charset=" in content_type:
        encoding = content_type.split("charset=")[-1].split(";")[0].strip().strip('"') or None
    soup = BeautifulSoup(body, "lxml", from_encoding=encoding)
    base_tag = soup.find("base")
    base = page_url
    if isinstance(base_tag, Tag) and base_tag.get("href"):
        base = urljoin(page_url, str(base_tag["href"]))
    items = soup.select(selectors.item)
    if not items:
        raise FeedParseError(
            f"the listing page has no element matching the item selector {selectors.item!r}; "
            "the site may have changed: check the selectors in the config"
        )
    entries: list[dict[str, Any]] = []
    unreadable_dates = 0
    for item in items:
        title_node = _first(item, selectors.title) or item
        title = _text(title_node)
        link_node = item if item.name == "a" else _first(item, selectors.link)
        href = _attribute_url(link_node, "href")
        if not title and not href:
            continue
        entry: dict[str, Any] = {"title": title}
        if href:
            entry["link"] = urljoin(base, href)
        summary_node = _first(item, selectors.summary)
        if summary_node is not None:
            entry["summary"] = str(summary_node)
            entry["summary_detail"] = {"type": "text/html"}
        image_node = _first(item, selectors.image)
        image = _attribute_url(image_node, "src", "data-src", "srcset")
        if image:
            entry["media_thumbnail"] = [{"url": urljoin(base, image)}]
            alt = image_node.get("alt") if image_node is not None else None
            if alt:
                entry["media_thumbnail"][0]["alt"] = str(alt)
        date_node = _first(item, selectors.date)
        if date_node is not None:
            raw_date = str(date_node.get("datetime") or _text(date_node))
            when = parse_human_date(raw_date, selectors.date_format, timezone)
            if when is None:
                unreadable_dates += 1
            else:
                entry["published_parsed"] = time.gmtime(when.timestamp())
        entries.append(entry)
    if not entries:
        raise FeedParseError(
            f"the item selector {selectors.item!r} matches {len(items)} elements, but none has "
            f"a title ({selectors.title!r}) or a link ({selectors.link!r}); check the selectors"
        )
    warning = None
    if unreadable_dates:
        warning = (
            f"{unreadable_dates} of {len(entries)} dates could not be read"
            + (f" with date_format {selectors.date_format!r}" if selectors.date_format else "")
            + "; those items are dated when first seen"
        )
    title_tag = soup.find("title")
    return ParsedFeed(
        title=_text(title_tag) if isinstance(title_tag, Tag) else None,
        link=page_url,
        feed_id=page_url,
        entries=entries,
        warning=warning,
    )


FEED_TYPES = (
    "application/rss+xml",
    "application/atom+xml",
    "application/rdf+xml",
    "application/feed+json",
    "application/json",
)


def discover_feed_links(body: bytes, page_url: str) -> list[str]:
    """The feeds an HTML page announces with ``<link rel="alternate" type=...>``.

    When an operator pastes a partner's news page instead of its feed, this is how
    clusterfeed can tell them which address to use (or use it, with ``discover``).
    """
    soup = BeautifulSoup(body, "lxml")
    base_tag = soup.find("base")
    base = page_url
    if isinstance(base_tag, Tag) and base_tag.get("href"):
        base = urljoin(page_url, str(base_tag["href"]))
    found: list[str] = []
    for link in soup.find_all("link"):
        if not isinstance(link, Tag):
            continue
        rel: Any = link.get("rel") or []
        rels = [str(r) for r in rel] if isinstance(rel, list) else str(rel).split()
        kind = str(link.get("type") or "").split(";")[0].strip().lower()
        href = link.get("href")
        if "alternate" in [r.lower() for r in rels] and kind in FEED_TYPES and href:
            url = urljoin(base, str(href).strip())
            if url.startswith(("http://", "https://")) and url not in found:
                found.append(url)
    return found
