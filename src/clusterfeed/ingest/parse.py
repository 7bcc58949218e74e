"""Turn fetched bytes into a ``ParsedFeed``: RSS, Atom and RDF by feedparser, JSON Feed here.

feedparser is given the raw bytes and the response headers rather than a decoded
string, because it is better than we are at reconciling a declared charset, an XML
declaration and a BOM that disagree (Japanese partners still serve Shift_JIS).
A feed that parses with problems but still yields entries is kept, with feedparser's
reason recorded as a warning for the operator.

feedparser does not read JSON Feed (https://jsonfeed.org/version/1.1), so a JSON
document is turned into entries here, shaped like feedparser's (``link``, ``content``,
``summary_detail``, ``published_parsed`` …) so that ``normalize`` treats both alike and
is the one place that sanitizes and decides identity.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

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
    if _is_json(body, response_headers):
        return parse_json_feed(body)
    if base_url:
        response_headers["content-location"] = base_url
    else:
        response_headers.pop("content-location", None)
    parsed = feedparser.parse(
        body,
        response_headers=response_headers,
        resolve_relative_uris=True,
        # normalize sanitizes every fragment with nh3, and that is the sanitizer we
        # trust; feedparser's own pass over the same HTML cost a quarter of the parse.
        sanitize_html=False,
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
    entries = list(parsed.entries)
    if warning and _ends_inside_entry(body, parsed.get("encoding")):
        # A document cut off inside an item (a full disk or a crashed CMS) gives a last
        # entry with whatever came before the cut: no GUID, or half a title. Stored, it
        # became an "Untitled" story, and one that never went away, because the whole
        # item came back later under another identity. The complete items are kept.
        entries = entries[:-1]
        warning += "; the document ends inside an item, which was skipped"
    feed = parsed.get("feed", {})
    return ParsedFeed(
        title=feed.get("title") or None,
        link=feed.get("link") or None,
        feed_id=feed.get("id") or None,
        entries=entries,
        warning=warning,
    )


_ENTRY_OPEN = re.compile(r"<(?:[\w.-]+:)?(?:item|entry)[\s>/]")
_ENTRY_CLOSE = re.compile(r"</(?:[\w.-]+:)?(?:item|entry)\s*>|<(?:[\w.-]+:)?(?:item|entry)\s*/>")


def _ends_inside_entry(body: bytes, encoding: str | None) -> bool:
    """Whether the last item or entry of a broken document was never closed."""
    try:
        text = body.decode(encoding or "utf-8", errors="replace")
    except LookupError:
        text = body.decode("utf-8", errors="replace")
    last_open = max((m.start() for m in _ENTRY_OPEN.finditer(text)), default=-1)
    last_close = max((m.start() for m in _ENTRY_CLOSE.finditer(text)), default=-1)
    return last_open > last_close


# -- JSON Feed ---------------------------------------------------------------------------

JSON_TYPES = frozenset({"application/feed+json", "application/json"})
JSON_FEED_VERSION = "https://jsonfeed.org/version/"
_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_json(body: bytes, headers: Mapping[str, str]) -> bool:
    """A JSON document: declared as JSON (and not XML after all), or starting with ``{``.

    No XML document starts with ``{``, so such a body is read as JSON whatever its
    content type says (partners serve JSON Feeds as text/plain, too).
    """
    start = body.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    if start == b"{":
        return True
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    return ctype in JSON_TYPES and start != b"<"


def _text(value: Any) -> str | None:
    """A JSON string as text, or None for anything else (a number, a list, null).

    JSON may hold lone surrogates (``"\\ud800"``), which no encoder accepts: one would
    make hashing or storing the item fail, so they become U+FFFD here.
    """
    if not isinstance(value, str):
        return None
    return _SURROGATE.sub("\ufffd", value)


def _json_date(value: Any) -> time.struct_time | None:
    """An RFC 3339 date (or, leniently, an RFC 822 one) as a UTC struct_time."""
    text = _text(value)
    if not text or not text.strip():
        return None
    text = text.strip()
    try:
        when = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # RFC 3339 requires an offset; UTC is the best guess
    try:
        return when.astimezone(UTC).utctimetuple()
    except (OverflowError, ValueError):
        return None


def _text_to_html(text: str) -> str:
    """Plain text as escaped HTML that keeps its paragraphs and line breaks."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "".join(
        "<p>" + "<br>".join(html.escape(line) for line in p.splitlines()) + "</p>"
        for p in paragraphs
    )


def _json_author(item: Mapping[str, Any]) -> str | None:
    """The first author's name: ``authors`` (1.1) or ``author`` (1.0)."""
    authors = item.get("authors")
    candidates = authors if isinstance(authors, list) else []
    if isinstance(item.get("author"), dict):
        candidates = [*candidates, item["author"]]
    for author in candidates:
        if isinstance(author, dict):
            name = _text(author.get("name"))
            if name and name.strip():
                return name
    return None


def _json_entry(item: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """One JSON Feed item as a feedparser-shaped entry."""
    entry: dict[str, Any] = {}
    raw_id = item.get("id")
    # The spec says a string; numbers are common in the wild and mean the same.
    numeric = isinstance(raw_id, int | float) and not isinstance(raw_id, bool)
    ident = str(raw_id) if numeric else _text(raw_id)
    if ident and ident.strip():
        entry["id"] = ident
    link = _text(item.get("url")) or _text(item.get("external_url"))
    if link:
        entry["link"] = link
        entry["links"] = [{"rel": "alternate", "type": "text/html", "href": link}]
    title = _text(item.get("title"))
    if title:
        entry["title"] = title
    content = []
    content_html = _text(item.get("content_html"))
    if content_html:
        content.append({"type": "text/html", "value": content_html})
    content_text = _text(item.get("content_text"))
    if content_text and not content_html:
        content.append({"type": "text/html", "value": _text_to_html(content_text)})
    if content:
        entry["content"] = content
    summary = _text(item.get("summary"))
    if summary:
        entry["summary"] = summary
        entry["summary_detail"] = {"type": "text/plain", "value": summary}
    for field, key in (("date_published", "published"), ("date_modified", "updated")):
        if item.get(field) is None or item[field] == "":
            continue
        parsed = _json_date(item[field])
        if parsed is None:
            problems.append(f"unreadable {field} {str(item[field])[:40]!r}")
            continue
        entry[key] = _text(item[field]) or ""
        entry[f"{key}_parsed"] = parsed
    thumbnails = [
        {"url": url} for url in (_text(item.get("image")), _text(item.get("banner_image"))) if url
    ]
    if thumbnails:
        entry["media_thumbnail"] = thumbnails
    attachments = item.get("attachments")
    enclosures = []
    for attachment in attachments if isinstance(attachments, list) else []:
        if isinstance(attachment, dict) and _text(attachment.get("url")):
            enclosures.append(
                {
                    "href": _text(attachment.get("url")),
                    "type": _text(attachment.get("mime_type")) or "",
                    "length": str(attachment.get("size_in_bytes") or ""),
                }
            )
    if enclosures:
        entry["enclosures"] = enclosures
    tags = item.get("tags")
    terms = [t for t in (_text(tag) for tag in (tags if isinstance(tags, list) else [])) if t]
    if terms:
        entry["tags"] = [{"term": term, "scheme": None, "label": None} for term in terms]
    author = _json_author(item)
    if author:
        entry["author"] = author
    return entry


def parse_json_feed(body: bytes) -> ParsedFeed:
    """A JSON Feed (1.0 or 1.1) as a ParsedFeed; FeedParseError when it is none.

    A document that is JSON but breaks the spec in a way that still leaves items (an
    item that is not an object, an unreadable date, no version) is read, and what was
    wrong is the warning, as with a not-well-formed RSS feed.
    """
    try:
        document = json.loads(body.removeprefix(b"\xef\xbb\xbf"))
    except UnicodeDecodeError as exc:
        raise FeedParseError(f"not valid JSON: the bytes are not UTF-8 ({exc.reason})") from None
    except RecursionError:
        raise FeedParseError("not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and over-long integers
        raise FeedParseError(f"not valid JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(document, dict):
        raise FeedParseError(
            f"not a JSON Feed: the document is a JSON {type(document).__name__}, not an object"
        )
    items = document.get("items")
    if not isinstance(items, list):
        raise FeedParseError('not a JSON Feed: the document has no "items" list')
    problems: list[str] = []
    version = _text(document.get("version")) or ""
    if not version.startswith(JSON_FEED_VERSION):
        problems.append(f'no JSON Feed "version" (got {version[:60]!r}); read as JSON Feed 1.1')
    entries = []
    skipped = 0
    for item in items:
        if isinstance(item, dict):
            entries.append(_json_entry(item, problems))
        else:
            skipped += 1
    if skipped:
        problems.append(f"skipped {skipped} item(s) that are not JSON objects")
    warning = None
    if problems:
        shown = "; ".join(problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        warning = f"JSON Feed: {shown}{more}"
    return ParsedFeed(
        title=_text(document.get("title")) or None,
        link=_text(document.get("home_page_url")) or None,
        feed_id=_text(document.get("feed_url")) or None,
        entries=entries,
        warning=warning,
    )
