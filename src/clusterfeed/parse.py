"""Turn fetched bytes into a ``ParsedFeed`` with feedparser.

feedparser is given the raw bytes and the response headers rather than a decoded
string, because it is better than we are at reconciling a declared charset, an XML
declaration and a BOM that disagree (Japanese partners still serve Shift_JIS).
A feed that parses with problems but still yields entries is kept, with feedparser's
reason recorded as a warning for the operator.
"""

from __future__ import annotations

from collections.abc import Mapping

import feedparser

from clusterfeed.model import ParsedFeed


class FeedParseError(Exception):
    """The bytes are not a feed we can read; the message says why, in one line."""


def _looks_like_html(body: bytes, headers: Mapping[str, str]) -> bool:
    """Whether bytes that are no feed are a web page, for a more useful message.

    Checking only whether the body *starts* with ``<!doctype html`` missed the common
    real pages: a UTF-8 byte order mark, a leading comment or an XML declaration before
    the doctype (XHTML) all gave the cryptic "not an XML media type" instead.
    """
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("text/html", "application/xhtml+xml"):
        return True
    head = body[:1024].lower()
    return b"<!doctype html" in head or b"<html" in head


def parse_feed(body: bytes, headers: Mapping[str, str], base_url: str | None) -> ParsedFeed:
    """Parse one feed document; raise FeedParseError only when nothing can be recovered."""
    response_headers = {k.lower(): v for k, v in headers.items()}
    if base_url:
        response_headers["content-location"] = base_url
    else:
        response_headers.pop("content-location", None)
    parsed = feedparser.parse(
        body,
        response_headers=response_headers,
        resolve_relative_uris=True,
        sanitize_html=True,
    )
    warning = None
    if parsed.get("bozo"):
        exc = parsed.get("bozo_exception")
        warning = f"{type(exc).__name__}: {exc}" if exc else "feed is not well-formed"
    if not parsed.get("version") and not parsed.entries:
        if _looks_like_html(body, response_headers):
            raise FeedParseError(
                "the URL returned an HTML page, not a feed; open it in a browser and use "
                "the address of its RSS or Atom link"
            )
        raise FeedParseError(
            f"not a feed: {warning}" if warning else "not an RSS, Atom or RDF feed"
        )
    feed = parsed.get("feed", {})
    return ParsedFeed(
        title=feed.get("title") or None,
        link=feed.get("link") or None,
        feed_id=feed.get("id") or None,
        entries=list(parsed.entries),
        warning=warning,
    )
