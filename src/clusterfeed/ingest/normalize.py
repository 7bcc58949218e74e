"""Turn feedparser's raw entries into clean, comparable ``Entry`` values.

Everything here is pure: the clock is an argument. This is the one place where item
HTML is sanitized (an allow-list, by nh3, the Python binding of the Rust ``ammonia``
sanitizer), so nothing a partner feed contains reaches a page or a mail unfiltered.
"""

from __future__ import annotations

import calendar
import hashlib
import html
import re
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urljoin, urlsplit, urlunsplit

import nh3

from clusterfeed.ingest.dates import parse_human_date
from clusterfeed.model import Entry

# Query parameters that only say where a click came from. Dropping them makes the same
# page under three campaign links one URL, and keeps subscribers from being tracked.
TRACKING_PARAMS = frozenset(
    {
        "fbclid",
        "gclid",
        "dclid",
        "gbraid",
        "wbraid",
        "msclkid",
        "yclid",
        "twclid",
        "igshid",
        "mc_cid",
        "mc_eid",
        "_hsenc",
        "_hsmi",
        "mkt_tok",
        "oly_anon_id",
        "oly_enc_id",
        "vero_id",
        "wickedid",
        "rb_clickid",
        "s_cid",
        "ref_src",
    }
)
TRACKING_PREFIXES = ("utm_", "pk_", "mtm_", "matomo_")
DEFAULT_PORTS = {"http": 80, "https": 443}

ALLOWED_TAGS = frozenset(
    {
        "a",
        "abbr",
        "b",
        "blockquote",
        "br",
        "caption",
        "cite",
        "code",
        "dd",
        "del",
        "dl",
        "dt",
        "em",
        "figcaption",
        "figure",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "hr",
        "i",
        "img",
        "ins",
        "li",
        "ol",
        "p",
        "pre",
        "q",
        "s",
        "small",
        "strong",
        "sub",
        "sup",
        "table",
        "tbody",
        "td",
        "tfoot",
        "th",
        "thead",
        "tr",
        "u",
        "ul",
    }
)
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title", "hreflang"},
    "img": {"src", "alt", "title", "width", "height"},
    "abbr": {"title"},
    "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan", "scope"},
    "blockquote": {"cite"},
    "q": {"cite"},
}
URL_ATTRIBUTES = frozenset({"href", "src", "cite"})
URL_SCHEMES = frozenset({"http", "https", "mailto"})

# A date this far ahead is a partner's clock or typo, not news from the future.
FUTURE_TOLERANCE = timedelta(minutes=5)


def normalize_url(url: str, base: str | None = None) -> str | None:
    """The canonical form of a link as readers should get it.

    Lower-cases scheme and host, drops default ports, fragments and tracking parameters,
    and resolves it against ``base``. Returns None for anything that is not http(s),
    so a ``javascript:`` link can never become an item's link.
    """
    url = url.strip()
    if not url:
        return None
    if base:
        url = urljoin(base, url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname.lower().rstrip(".")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if parts.username or parts.password:
        netloc = (
            f"{parts.username or ''}{':' if parts.password else ''}{parts.password or ''}@{netloc}"
        )
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k.lower() not in TRACKING_PARAMS and not k.lower().startswith(TRACKING_PREFIXES)
    ]
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    return urlunsplit((scheme, netloc, path, urlencode(query, doseq=True), ""))


def link_key(url: str | None) -> str | None:
    """A looser form of a normalized URL, for finding the same page across partners.

    http and https, a leading ``www.`` and a trailing slash do not make a different
    page; the key is only compared, never shown.
    """
    if not url:
        return None
    parts = urlsplit(url)
    host = (parts.hostname or "").removeprefix("www.")
    port = f":{parts.port}" if parts.port else ""
    path = parts.path.rstrip("/") or ""
    query = f"?{parts.query}" if parts.query else ""
    return f"{host}{port}{path}{query}"


def _attribute_filter(base: str | None) -> Any:
    def keep(tag: str, attribute: str, value: str) -> str | None:
        if attribute in URL_ATTRIBUTES:
            if not value.strip():
                # An empty URL is no link (feedparser leaves href="" where it removed a
                # javascript: URL); resolving it would turn it into a link to the item
                # itself, or an <img> of the article page.
                return None
            resolved = urljoin(base, value.strip()) if base else value.strip()
            scheme = urlsplit(resolved).scheme.lower()
            if scheme not in URL_SCHEMES:
                return None
            return resolved
        return value

    return keep


# Characters XML 1.0 forbids. feedparser's lenient parser keeps them (a vertical tab
# pasted from a word processor is common), and one of them in one item made lxml refuse
# to build the published Atom feed at all.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def xml_safe(text: str) -> str:
    """``text`` without characters that cannot appear in XML (form feeds become spaces)."""
    return _XML_INVALID.sub(lambda m: " " if m.group() in "\x0b\x0c" else "", text)


def sanitize_html(fragment: str, base: str | None = None) -> str:
    """Allow-listed HTML: no scripts, styles, event handlers, frames or unsafe URLs.

    Relative links and image sources are resolved against ``base`` so they still work
    when the item is shown on another site or in a mail.
    """
    if not fragment:
        return ""
    # After cleaning, too: the parser turns references such as "&#8;" into the character.
    return xml_safe(
        nh3.clean(
            fragment,
            tags=set(ALLOWED_TAGS),
            clean_content_tags={"script", "style", "template", "iframe", "noscript", "object"},
            attributes={k: set(v) for k, v in ALLOWED_ATTRIBUTES.items()},
            attribute_filter=_attribute_filter(base),
            url_schemes=set(URL_SCHEMES),
            link_rel="noopener noreferrer nofollow",
            strip_comments=True,
        )
    ).strip()


_WS = re.compile(r"\s+")
_BLOCK = re.compile(
    r"<(/?(?:p|div|br|li|ul|ol|h[1-6]|tr|td|th|blockquote|pre|figure|figcaption|hr)\b)", re.I
)


def html_to_text(fragment: str) -> str:
    """Plain text of an HTML fragment, for summaries, comparisons and the text mail."""
    if not fragment:
        return ""
    spaced = _BLOCK.sub(r" <\1", fragment)  # "</p><p>" must not glue two sentences
    text = nh3.clean(spaced, tags=set(), clean_content_tags={"script", "style"})
    return _WS.sub(" ", xml_safe(html.unescape(text))).strip()


def single_line(text: str) -> str:
    """The text on one line: every line break and control character becomes a space.

    Anything that can reach a mail header passes here, where a CR/LF is an attack.
    So does an RFC 2047 encoded word: Python's email package decodes
    ``=?utf-8?q?=0D=0ABcc:_x@example.com?=`` when a Subject is set and, before Python
    3.11.10 (CVE-2024-6923), writes the decoded CR/LF out as a real header line. A word
    joiner between ``=`` and ``?`` leaves the text as it reads and no longer encoded.
    """
    text = "".join(
        " " if (ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 or ch in "\u2028\u2029") else ch
        for ch in text
    )
    return _WS.sub(" ", text).strip().replace("=?", "=\u2060?")


def clean_title(title: str) -> str:
    """A title as plain text on one line: markup removed, entities decoded."""
    text = html_to_text(title) if "<" in title or "&" in title else title
    return single_line(text)


def truncate(text: str, limit: int) -> str:
    """Shorten at a word boundary and mark the cut with an ellipsis."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit * 0.6:
        cut = cut[:space]
    return cut.rstrip(" ,;:.-–") + "…"


def _struct_to_datetime(value: Any) -> datetime | None:
    if isinstance(value, time.struct_time):
        try:
            return datetime.fromtimestamp(calendar.timegm(value), tz=UTC)
        except (OverflowError, ValueError, OSError):
            return None
    return None


def _written_date(value: Any) -> datetime | None:
    """A date feedparser could not read, read the way people write dates.

    German CMSs write RFC 822 dates with German day or month names ("Mo, 16 Nov 2026",
    "Do, 15 Okt 2026") or none at all ("23. Oktober 2026"), and some leave out the
    zone; feedparser gives up on all of these. The item was then dated when first
    seen, so a partner's whole archive arrived as today's news, on top of the digest.
    """
    if not isinstance(value, str) or not value.strip():
        return None
    return parse_human_date(value[:200])


def _plain(raw: Mapping[str, Any], key: str) -> Any:
    # dict.get, not raw.get: feedparser's mapping silently aliases a missing
    # updated_parsed to published_parsed (with a deprecation warning).
    return dict.get(raw, key) if isinstance(raw, dict) else raw.get(key)


def _published_and_updated(raw: Mapping[str, Any]) -> tuple[datetime | None, datetime | None]:
    """The dates as the partner wrote them (UTC), each parsed once."""
    published = (
        _struct_to_datetime(_plain(raw, "published_parsed"))
        or _struct_to_datetime(_plain(raw, "created_parsed"))
        or _written_date(_plain(raw, "published"))
        or _written_date(_plain(raw, "created"))
    )
    updated = _struct_to_datetime(_plain(raw, "updated_parsed")) or _written_date(
        _plain(raw, "updated")
    )
    return published, updated


def stated_date(raw: Mapping[str, Any]) -> datetime | None:
    """The publication date as the partner wrote it (UTC), future or not; None if none.

    Readers get the clamped date of :func:`entry_dates`; story matching compares the
    stated one, since clamping every item of a feed dated ahead to one moment would
    make unrelated items look simultaneous.
    """
    return _stated(*_published_and_updated(raw))


def _stated(published: datetime | None, updated: datetime | None) -> datetime | None:
    stated = published or updated
    return stated.replace(microsecond=0) if stated is not None else None


def entry_dates(raw: Mapping[str, Any], now: datetime) -> tuple[datetime, datetime]:
    """(published, updated) in UTC; missing means first seen now, the future is clamped."""
    published, updated, _ = _dates(raw, now)
    return published, updated


def _dates(raw: Mapping[str, Any], now: datetime) -> tuple[datetime, datetime, datetime | None]:
    """(published, updated) as readers see them, and the stated publication date."""
    published, updated = _published_and_updated(raw)
    stated = _stated(published, updated)
    published = stated or now
    updated = updated or published
    limit = now + FUTURE_TOLERANCE
    published = min(published, now) if published > limit else published
    updated = min(updated, now) if updated > limit else updated
    updated = max(updated, published)
    return published.replace(microsecond=0), updated.replace(microsecond=0), stated


_IMG = re.compile(r"<img\b[^>]*?\bsrc\s*=\s*(['\"])(.*?)\1", re.IGNORECASE | re.DOTALL)
_ALT = re.compile(r"\balt\s*=\s*(['\"])(.*?)\1", re.IGNORECASE | re.DOTALL)


def entry_image(
    raw: Mapping[str, Any], html_fragments: Iterable[str], base: str | None
) -> tuple[str | None, str | None]:
    """The item's picture: a media thumbnail, an image enclosure or the first <img>."""
    candidates: list[tuple[str | None, str | None]] = []
    for thumb in raw.get("media_thumbnail") or []:
        candidates.append((thumb.get("url"), None))
    for media in raw.get("media_content") or []:
        if media.get("medium") == "image" or str(media.get("type", "")).startswith("image/"):
            candidates.append((media.get("url"), None))
    for enclosure in raw.get("enclosures") or []:
        if str(enclosure.get("type", "")).startswith("image/"):
            candidates.append((enclosure.get("href") or enclosure.get("url"), None))
    for fragment in html_fragments:
        for match in _IMG.finditer(fragment or ""):
            alt_match = _ALT.search(match.group(0))
            alt_text = html.unescape(alt_match.group(2)) if alt_match else None
            candidates.append((html.unescape(match.group(2)), alt_text))
            break
    for url, alt in candidates:
        if url:
            normalized = normalize_url(url, base)
            if normalized:
                return normalized, clean_title(alt) if alt else None
    return None, None


def _first_text(raw: Mapping[str, Any], *keys: str) -> str:
    for key in keys:
        value = raw.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return ""


def _content_html(raw: Mapping[str, Any]) -> str:
    contents = raw.get("content") or []
    for item in contents:
        if item.get("type") in ("text/html", "application/xhtml+xml") and item.get("value"):
            return str(item["value"])
    for item in contents:
        if item.get("value"):
            return html.escape(str(item["value"]))
    return ""


def _summary_html(raw: Mapping[str, Any]) -> str:
    summary = _first_text(raw, "summary")
    detail = raw.get("summary_detail") or {}
    if summary and detail.get("type") == "text/plain":
        return html.escape(summary)
    return summary


def entry_identity(guid: str | None, link: str | None, title: str, text: str) -> str:
    """A stable key for an item within its feed.

    The GUID when the feed gives one (it is the partner's promise of identity), else the
    normalized link, else a hash of the visible text: a feed with neither GUIDs nor
    links still does not produce a new item on every fetch.
    """
    if guid:
        return f"guid:{guid}"
    if link:
        return f"link:{link}"
    digest = hashlib.sha256(f"{title}\n{text}".encode()).hexdigest()[:32]
    return f"hash:{digest}"


def normalize_entry(
    raw: Mapping[str, Any],
    *,
    feed_name: str,
    feed_topics: Iterable[str],
    feed_language: str,
    base_url: str | None,
    now: datetime,
) -> Entry:
    """One raw feedparser entry as a clean Entry; never raises on odd input."""
    raw_link = _first_text(raw, "link")
    if not raw_link:
        for link in raw.get("links") or []:
            if link.get("rel", "alternate") == "alternate" and link.get("href"):
                raw_link = link["href"]
                break
    link = normalize_url(raw_link, base_url) if raw_link else None
    base = link or base_url
    guid_raw = _first_text(raw, "id", "guid").strip()
    guid = clean_title(guid_raw)[:1000] or None

    summary_raw = _summary_html(raw)
    content_raw = _content_html(raw)
    summary_html = sanitize_html(summary_raw, base)
    content_html = sanitize_html(content_raw, base)
    if summary_html and content_html and html_to_text(summary_html) == html_to_text(content_html):
        content_html = ""
    text = html_to_text(summary_html) or html_to_text(content_html)
    title = clean_title(_first_text(raw, "title")) or truncate(text, 80) or (link or "Untitled")

    topics = {t.strip() for t in feed_topics}
    for tag in raw.get("tags") or []:
        term = clean_title(str(tag.get("term") or tag.get("label") or "")).lower()
        term = re.sub(r"[^\w-]+", "-", term).strip("-")
        if term:
            topics.add(term)

    published, updated, dated = _dates(raw, now)
    image_url, image_alt = entry_image(raw, [content_raw, summary_raw], base)
    author = clean_title(_first_text(raw, "author")) or None
    content_hash = hashlib.sha256(
        "\x1f".join([title, summary_html, content_html, image_url or "", link or ""]).encode()
    ).hexdigest()
    return Entry(
        feed_name=feed_name,
        identity=entry_identity(guid, link, title, text),
        guid=guid,
        link=link,
        link_key=link_key(link),
        title=title,
        summary_html=summary_html,
        summary_text=text,
        content_html=content_html,
        image_url=image_url,
        image_alt=image_alt,
        author=author,
        topics=tuple(sorted(topics)),
        language=feed_language,
        published=published,
        updated=updated,
        content_hash=content_hash,
        dated=dated,
    )


def normalize_entries(
    raws: Iterable[Mapping[str, Any]],
    *,
    feed_name: str,
    feed_topics: Iterable[str],
    feed_language: str,
    base_url: str | None,
    now: datetime,
) -> list[Entry]:
    """All entries of one feed, the first of any repeated identity kept.

    Partners' CMSs sometimes list one item twice; keeping the first (the feed's own
    order, newest first by convention) means a re-fetch sees the same choice.
    """
    topics = tuple(feed_topics)
    seen: set[str] = set()
    result: list[Entry] = []
    for raw in raws:
        entry = normalize_entry(
            raw,
            feed_name=feed_name,
            feed_topics=topics,
            feed_language=feed_language,
            base_url=base_url,
            now=now,
        )
        if entry.identity in seen:
            continue
        seen.add(entry.identity)
        result.append(entry)
    return result
