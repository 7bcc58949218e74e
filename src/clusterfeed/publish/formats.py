"""Stories to feed documents: Atom 1.0, RSS 2.0 and JSON Feed 1.1; atomic writes.

The bytes depend only on the stories and the config, never on the clock: a feed's
``updated`` is its newest story's, so publishing twice with nothing new produces the
same file, and feed readers polling it see an unchanged ETag. Atom and RSS are built
with feedgen; JSON Feed is plain ``json``. Which files exist, and what goes into
each, is decided in ``clusterfeed.publish.feedset``.
"""

from __future__ import annotations

import html
import json
import mimetypes
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from feedgen.ext.base import BaseEntryExtension, BaseExtension
from feedgen.feed import FeedGenerator
from feedgen.util import xml_elem

from clusterfeed import __version__
from clusterfeed.ingest.teaser import entry_teaser
from clusterfeed.model import Source, Story

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
HISTORY_NS = "http://purl.org/syndication/history/1.0"  # RFC 5005
GENERATOR_URI = "https://github.com/clusterfeed/clusterfeed"
JSON_FEED_VERSION = "https://jsonfeed.org/version/1.1"
SUMMARY_CHARS = 500


@dataclass(frozen=True)
class FeedMeta:
    """What one feed document says about itself.

    ``feed_url`` is the document's own address (its ``self`` link, and JSON Feed's
    ``feed_url``); ``feed_id`` is the Atom id of the logical feed, which archive pages
    share with the feed they belong to. ``language`` is set for a feed of one language.
    """

    title: str
    feed_url: str
    site_url: str
    author: str
    subtitle: str | None = None
    logo_url: str | None = None
    feed_id: str | None = None
    language: str | None = None
    hub: str | None = None  # a WebSub hub that readers may subscribe through

    @property
    def id(self) -> str:
        return self.feed_id or self.feed_url


@dataclass(frozen=True)
class Paging:
    """RFC 5005 links of an archived feed: the subscription document or an archive page.

    The subscription document (the main feed) has only ``prev_archive``; an archive
    page has ``archive=True`` (``<fh:archive/>``), ``current`` (the main feed) and its
    neighbours.
    """

    prev_archive: str | None = None
    next_archive: str | None = None
    current: str | None = None
    archive: bool = False


@dataclass(frozen=True)
class SourceFeed:
    """A partner feed as the JSON Feed's ``_clusterfeed`` extension lists it."""

    name: str
    title: str
    url: str | None
    site_url: str | None = None


class _NoFeedExtension(BaseExtension):  # type: ignore[misc]
    pass


class _HistoryExtension(BaseExtension):  # type: ignore[misc]
    """``<fh:archive/>``: marks an Atom document as an archive page (RFC 5005 §4)."""

    def extend_ns(self) -> dict[str, str]:
        return {"fh": HISTORY_NS}

    def extend_atom(self, feed: Any) -> Any:
        xml_elem(f"{{{HISTORY_NS}}}archive", feed)
        return feed


class _SourceExtension(BaseEntryExtension):  # type: ignore[misc]
    """Adds an entry's links and a complete ``atom:source`` (id, title, links, updated).

    feedgen's own source element carries only a title and link; RFC 4287 asks that a
    copied entry keep the original feed's id and updated too, which is what lets a
    reader credit and find the partner. The partner's feed itself is linked with
    ``rel="self"`` whenever it is on the web, so the source names the partner feed even
    when the config gives no ``site`` for it (then there is no ``alternate`` link).
    """

    def __init__(self) -> None:
        self._source: dict[str, str] | None = None
        self._links: list[dict[str, str]] = []
        self._language: str | None = None

    def language(self, code: str) -> None:
        """The entry's ``xml:lang``: a combined feed mixes languages, so each entry says its own."""
        self._language = code

    def add_link(self, **attributes: str) -> None:
        """An entry link written with all its attributes.

        feedgen 1.0's ``FeedEntry.link`` loses ``rel``, ``type`` and ``title`` when it
        writes Atom (its loop variable shadows the link's data), which turned every
        ``related`` link into a second ``alternate`` one; entry links are written here.
        """
        self._links.append(attributes)

    def set(
        self,
        *,
        id: str,
        title: str,
        link: str | None,
        updated: datetime,
        self_link: str | None = None,
    ) -> None:
        self._source = {
            "id": id,
            "title": title,
            "link": link or "",
            "self": self_link or "",
            "updated": updated.isoformat(),
        }

    def extend_atom(self, entry: Any) -> Any:
        if self._language:
            entry.set("{http://www.w3.org/XML/1998/namespace}lang", self._language)
        for attributes in self._links:
            xml_elem("link", entry, **attributes)
        if self._source is None:
            return entry
        source = xml_elem("source", entry)
        xml_elem("id", source).text = self._source["id"]
        xml_elem("title", source).text = self._source["title"]
        if self._source["link"]:
            xml_elem("link", source, rel="alternate", href=self._source["link"])
        if self._source["self"]:
            xml_elem("link", source, rel="self", href=self._source["self"])
        xml_elem("updated", source).text = self._source["updated"]
        return entry


def tag_uri(site_url: str, kind: str, key: str) -> str:
    """A permanent id (RFC 4151 tag URI) that does not change if the feed moves."""
    host = urlsplit(site_url).hostname or "clusterfeed.invalid"
    # Quoted: a key can be a feed's name ("Universitätsklinikum Förde"), and a URI may
    # hold neither spaces nor non-ASCII letters. Story keys are unchanged by this.
    return f"tag:{host},2026:{kind}/{quote(key, safe='-._~')}"


def _is_web_url(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def source_id(source: Source) -> str:
    """The partner feed's id: its URL when it has one on the web, else a tag URI."""
    if _is_web_url(source.feed_url):
        return source.feed_url
    return tag_uri(source.site_url or "https://clusterfeed.invalid", "source", source.feed_name)


def story_html(story: Story) -> str:
    """The entry body: picture, the representative's text, and every other source."""
    entry = story.entry
    parts = []
    if entry.image_url:
        alt = html.escape(entry.image_alt or entry.title, quote=True)
        parts.append(f'<p><img src="{html.escape(entry.image_url, quote=True)}" alt="{alt}"/></p>')
    parts.append(
        entry.content_html or entry.summary_html or f"<p>{html.escape(entry.summary_text)}</p>"
    )
    first = story.sources[0]
    parts.append(f"<p>Source: {_source_link(first)}</p>")
    if story.also_reported_by:
        items = "".join(f"<li>{_source_link(s)}</li>" for s in story.also_reported_by)
        parts.append(f"<p>Also reported by:</p><ul>{items}</ul>")
    return "\n".join(parts)


def _source_link(source: Source) -> str:
    name = html.escape(source.feed_title)
    if source.entry_link:
        title = html.escape(source.entry_title, quote=True)
        return f'<a href="{html.escape(source.entry_link, quote=True)}" title="{title}">{name}</a>'
    return name


def build_atom(stories: Sequence[Story], meta: FeedMeta, paging: Paging | None = None) -> bytes:
    """The Atom document for ``stories`` (already ordered and limited)."""
    fg = FeedGenerator()
    fg.register_extension(
        "cfsource",
        extension_class_feed=_NoFeedExtension,
        extension_class_entry=_SourceExtension,
        atom=True,
        rss=False,
    )
    if paging is not None and paging.archive:
        fg.register_extension(
            "cfhistory",
            extension_class_feed=_HistoryExtension,
            extension_class_entry=None,
            atom=True,
            rss=False,
        )
    fg.id(meta.id)
    fg.title(meta.title)
    if meta.subtitle:
        fg.subtitle(meta.subtitle)
    fg.author({"name": meta.author, "uri": meta.site_url})
    fg.link(href=meta.site_url, rel="alternate", type="text/html")
    fg.link(href=meta.feed_url, rel="self", type="application/atom+xml")
    if meta.hub:
        fg.link(href=meta.hub, rel="hub")
    if paging is not None:
        for rel, href in (
            ("current", paging.current),
            ("prev-archive", paging.prev_archive),
            ("next-archive", paging.next_archive),
        ):
            if href:
                fg.link(href=href, rel=rel, type="application/atom+xml")
    if meta.logo_url:
        fg.logo(meta.logo_url)
    fg.generator("clusterfeed", version=__version__, uri=GENERATOR_URI)
    fg.language(None)
    fg.updated(newest_update(stories))

    # feedgen prepends entries by default; add oldest first so the document lists newest first.
    for story in reversed(list(stories)):
        entry = story.entry
        source = story.sources[0]
        fe = fg.add_entry(order="prepend")
        fe.id(story_id(meta.site_url, story))
        fe.title(entry.title)
        fe.cfsource.language(entry.language)
        if entry.link:
            fe.cfsource.add_link(rel="alternate", type="text/html", href=entry.link)
        linked = {entry.link}
        for other in story.also_reported_by:
            if other.entry_link and other.entry_link not in linked:
                linked.add(other.entry_link)
                fe.cfsource.add_link(rel="related", href=other.entry_link, title=other.feed_title)
        fe.published(entry.published)
        fe.updated(story_updated(story))
        fe.author(
            {"name": source.feed_title, **({"uri": source.site_url} if source.site_url else {})}
        )
        for other in story.also_reported_by:
            fe.contributor({"name": other.feed_title})
        if teaser := entry_teaser(entry):
            fe.summary(_truncate(teaser, SUMMARY_CHARS))
        fe.content(story_html(story), type="html")
        for topic in story.topics:
            fe.category(term=topic, label=topic)
        fe.cfsource.set(
            id=source_id(source),
            title=source.feed_title,
            link=source.site_url,
            updated=entry.updated,
            self_link=source.feed_url if _is_web_url(source.feed_url) else None,
        )
    result: bytes = fg.atom_str(pretty=True, encoding="UTF-8", xml_declaration=True)
    return result


def build_rss(stories: Sequence[Story], meta: FeedMeta) -> bytes:
    """The RSS 2.0 document for ``stories`` (already ordered and limited).

    Each item names its partner twice: ``<source url="…">`` is the partner's feed (RSS
    2.0's own element for an item copied from another channel; left out for a feed read
    from a local file) and ``dc:creator`` its name (RSS ``author`` must be an e-mail
    address). The guid is the story id, the same
    tag URI as the Atom entry's, marked ``isPermaLink="false"``.
    """
    fg = FeedGenerator()
    fg.load_extension("dc", atom=False, rss=True)
    fg.title(meta.title)
    fg.description(meta.subtitle or meta.title)
    # feedgen uses the last link given as the channel's <link>: the web site.
    fg.link(href=meta.feed_url, rel="self", type="application/rss+xml")
    fg.link(href=meta.site_url, rel="alternate")
    if meta.logo_url:
        fg.image(url=meta.logo_url, title=meta.title, link=meta.site_url)
    if meta.language:
        fg.language(meta.language)
    fg.generator(f"clusterfeed {__version__}")
    # Also lastBuildDate, which feedgen would otherwise set to the current time.
    fg.updated(newest_update(stories))

    for story in reversed(list(stories)):
        entry = story.entry
        source = story.sources[0]
        fe = fg.add_entry(order="prepend")
        fe.title(entry.title)
        if entry.link:
            fe.link(href=entry.link)
        fe.guid(story_id(meta.site_url, story), permalink=False)
        fe.published(entry.published)
        if teaser := entry_teaser(entry):
            fe.description(_truncate(teaser, SUMMARY_CHARS))
        fe.content(story_html(story))
        fe.dc.dc_creator(source.feed_title)
        for topic in story.topics:
            fe.category(term=topic)
        if _is_web_url(source.feed_url):  # a local file is no feed a reader can open
            fe.source(url=source.feed_url, title=source.feed_title)
        picture_type = image_type(entry.image_url)
        if entry.image_url and picture_type:
            # The length is unknown without fetching the picture; 0 is what the RSS
            # Advisory Board's best practices ask for then.
            fe.enclosure(entry.image_url, "0", picture_type)
    result: bytes = fg.rss_str(pretty=True, encoding="UTF-8", xml_declaration=True)
    if meta.hub:
        result = _with_rss_hub(result, meta.hub)
    return result


def _with_rss_hub(document: bytes, hub: str) -> bytes:
    """Add ``<atom:link rel="hub">`` beside the self link (feedgen writes only ``self``)."""
    from lxml import etree  # type: ignore[import-untyped]

    root = etree.fromstring(document)
    channel = root.find("channel")
    atom = "http://www.w3.org/2005/Atom"
    self_link = channel.find(f"{{{atom}}}link")
    hub_link = etree.Element(f"{{{atom}}}link", href=hub, rel="hub")
    if self_link is not None:
        self_link.addnext(hub_link)
    else:
        channel.insert(0, hub_link)
    out: bytes = etree.tostring(root, pretty_print=True, encoding="UTF-8", xml_declaration=True)
    return out


def build_json_feed(
    stories: Sequence[Story], meta: FeedMeta, sources: Sequence[SourceFeed] = ()
) -> bytes:
    """The JSON Feed 1.1 document for ``stories`` (already ordered and limited).

    Every item credits its partner in ``authors``; the extension object
    ``_clusterfeed`` (JSON Feed's rule: unknown keys start with an underscore) lists
    every partner that told the story, and at the top every partner feed.
    """
    items = [_json_item(story, meta) for story in stories]
    document: dict[str, Any] = {
        "version": JSON_FEED_VERSION,
        "title": meta.title,
        "home_page_url": meta.site_url,
        "feed_url": meta.feed_url,
    }
    if meta.subtitle:
        document["description"] = meta.subtitle
    if meta.logo_url:
        document["icon"] = meta.logo_url
    document["authors"] = [{"name": meta.author, "url": meta.site_url}]
    if meta.hub:
        document["hubs"] = [{"type": "WebSub", "url": meta.hub}]
    if meta.language:
        document["language"] = meta.language
    document["items"] = items
    document["_clusterfeed"] = {
        "about": GENERATOR_URI,
        "sources": [_drop_none(name=s.name, url=s.url, title=s.title, home_page_url=s.site_url)
                    for s in sources],
    }  # fmt: skip
    text = json.dumps(document, ensure_ascii=False, indent=2)
    return (text + "\n").encode("utf-8")


def _json_item(story: Story, meta: FeedMeta) -> dict[str, Any]:
    entry = story.entry
    source = story.sources[0]
    item = _drop_none(
        id=story_id(meta.site_url, story),
        url=entry.link,
        title=entry.title,
        content_html=story_html(story),
        summary=_truncate(teaser, SUMMARY_CHARS) if (teaser := entry_teaser(entry)) else None,
        image=entry.image_url,
        date_published=entry.published.isoformat(),
        date_modified=story_updated(story).isoformat(),
        tags=list(story.topics) or None,
        authors=[_drop_none(name=source.feed_title, url=source.site_url)],
        language=entry.language,
    )
    item["_clusterfeed"] = {
        "sources": [
            _drop_none(name=s.feed_title, url=s.entry_link, title=s.entry_title)
            for s in story.sources
        ]
    }
    return item


def _drop_none(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def story_id(site_url: str, story: Story) -> str:
    """A story's permanent id, the same in every format and every file it appears in."""
    return tag_uri(site_url, "story", story.key)


def reading_order(stories: Iterable[Story]) -> list[Story]:
    """Stories newest first by the date readers see: their representative's.

    The store orders by a story's first report (the earliest of its versions), but the
    feeds and the site show the representative version's date; a story told first by a
    partner on 27 Oct and shown with the cluster's own version of 29 Oct was listed
    below one of 28 Oct. Ties keep the newer story first.
    """
    return sorted(stories, key=lambda s: (s.entry.published, s.id), reverse=True)


def story_updated(story: Story) -> datetime:
    return max(story.updated, story.entry.updated)


def newest_update(stories: Sequence[Story]) -> datetime:
    """A document's date: its newest story's, so an unchanged document keeps its bytes."""
    return max((story_updated(s) for s in stories), default=EPOCH)


def image_type(url: str | None) -> str | None:
    """The picture's media type when its file name says it (``.jpg``, ``.png``, …), else None.

    An RSS enclosure must state its type, and guessing one wrongly would make readers
    offer a photo as a download of the wrong kind; without a known type there is none.
    """
    if not url:
        return None
    guessed, _ = mimetypes.guess_type(unquote(urlsplit(url).path), strict=False)
    return guessed if guessed and guessed.startswith("image/") else None


def _truncate(text: str, limit: int) -> str:
    from clusterfeed.ingest.normalize import truncate

    return truncate(text, limit)


def remove_stale(folder: Path, planned: Iterable[str]) -> list[Path]:
    """Delete the feed files of topics and languages that no longer exist (and archive
    pages beyond the last); see ``feedset.stale_files``. Returns what was removed."""
    from clusterfeed.publish.feedset import GENERATED_DIRS, stale_files

    existing = [
        f"{sub}/{entry.name}"
        for sub in GENERATED_DIRS
        if (folder / sub).is_dir()
        for entry in (folder / sub).iterdir()
        if entry.is_file()
    ]
    removed = []
    for relative in stale_files(existing, planned):
        (folder / relative).unlink(missing_ok=True)
        removed.append(folder / relative)
    return removed


def write_atomic(path: Path, data: bytes) -> bool:
    """Replace ``path`` with ``data`` in one step; do nothing if it already holds them.

    A reader or a web server never sees a half-written file, and an unchanged feed keeps
    its modification time, so Last-Modified based caching keeps working.
    """
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True
