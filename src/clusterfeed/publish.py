"""Stories to a combined Atom 1.0 feed, built with feedgen, written atomically.

The bytes depend only on the stories and the config, never on the clock: the feed's
``updated`` is the newest story's, so publishing twice with nothing new produces the
same file, and feed readers polling it see an unchanged ETag.
"""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from feedgen.ext.base import BaseEntryExtension, BaseExtension
from feedgen.feed import FeedGenerator
from feedgen.util import xml_elem

from clusterfeed import __version__
from clusterfeed.model import Source, Story

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class FeedMeta:
    """What the combined feed says about itself."""

    title: str
    feed_url: str
    site_url: str
    author: str
    subtitle: str | None = None
    logo_url: str | None = None


class _NoFeedExtension(BaseExtension):  # type: ignore[misc]
    pass


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


def build_atom(stories: Sequence[Story], meta: FeedMeta) -> bytes:
    """The combined Atom document for ``stories`` (already ordered and limited)."""
    fg = FeedGenerator()
    fg.register_extension(
        "cfsource",
        extension_class_feed=_NoFeedExtension,
        extension_class_entry=_SourceExtension,
        atom=True,
        rss=False,
    )
    fg.id(meta.feed_url)
    fg.title(meta.title)
    if meta.subtitle:
        fg.subtitle(meta.subtitle)
    fg.author({"name": meta.author, "uri": meta.site_url})
    fg.link(href=meta.site_url, rel="alternate", type="text/html")
    fg.link(href=meta.feed_url, rel="self", type="application/atom+xml")
    if meta.logo_url:
        fg.logo(meta.logo_url)
    fg.generator(
        "clusterfeed", version=__version__, uri="https://github.com/clusterfeed/clusterfeed"
    )
    fg.language(None)
    newest = max((s.updated for s in stories), default=EPOCH)
    fg.updated(newest)

    # feedgen prepends entries by default; add oldest first so the document lists newest first.
    for story in reversed(list(stories)):
        entry = story.entry
        source = story.sources[0]
        fe = fg.add_entry(order="prepend")
        fe.id(tag_uri(meta.site_url, "story", story.key))
        fe.title(entry.title)
        if entry.link:
            fe.cfsource.add_link(rel="alternate", type="text/html", href=entry.link)
        linked = {entry.link}
        for other in story.also_reported_by:
            if other.entry_link and other.entry_link not in linked:
                linked.add(other.entry_link)
                fe.cfsource.add_link(rel="related", href=other.entry_link, title=other.feed_title)
        fe.published(entry.published)
        fe.updated(max(story.updated, entry.updated))
        fe.author(
            {"name": source.feed_title, **({"uri": source.site_url} if source.site_url else {})}
        )
        for other in story.also_reported_by:
            fe.contributor({"name": other.feed_title})
        if entry.summary_text:
            fe.summary(_truncate(entry.summary_text, 500))
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


def _truncate(text: str, limit: int) -> str:
    from clusterfeed.normalize import truncate

    return truncate(text, limit)


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
