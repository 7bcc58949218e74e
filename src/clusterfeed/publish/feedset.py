"""Which files ``publish`` writes, and what goes into each; pure, so testable alone.

From the stored stories (newest first) this decides the whole published folder:

- the combined feed as Atom (``publish.filename``, ``feed.atom`` by default), RSS 2.0
  (``feed.rss``) and JSON Feed 1.1 (``feed.json``), the newest ``publish.max_entries``
  stories;
- the same three per topic (``topics/<topic>.atom`` …) and per language
  (``languages/<lang>.atom`` …), where a story belongs to every language one of its
  versions is in;
- ``sources.opml``, every partner feed (made by ``clusterfeed.publish.opml``);
- the Atom archive (RFC 5005): ``archive/1.atom``, ``archive/2.atom``, … (see
  ``archive_pages``).

Every file comes with a function that renders its bytes, so the caller renders only
what it is going to write; ``Service.publish`` applies the plan with ``write_atomic``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin

from lxml import etree  # type: ignore[import-untyped]

from clusterfeed.model import Story
from clusterfeed.publish.formats import (
    FeedMeta,
    Paging,
    SourceFeed,
    build_atom,
    build_json_feed,
    build_rss,
    story_id,
)
from clusterfeed.publish.opml import topic_slug

RSS_NAME = "feed.rss"
JSON_NAME = "feed.json"
OPML_NAME = "sources.opml"
TOPICS_DIR = "topics"
LANGUAGES_DIR = "languages"
ARCHIVE_DIR = "archive"
DIGESTS_DIR = "digests"  # the web versions of sent digests (clusterfeed.publish.site)
# publish.filename may not take a name the other files use.
RESERVED_NAMES = frozenset(
    {RSS_NAME, JSON_NAME, OPML_NAME, TOPICS_DIR, LANGUAGES_DIR, ARCHIVE_DIR, DIGESTS_DIR}
)

ATOM_NS = "http://www.w3.org/2005/Atom"
_SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,79}$")


@dataclass(frozen=True)
class SiteMeta:
    """What every published file says about the cluster, and where it lives on the web."""

    title: str
    feed_url: str  # the main Atom feed's public URL; the other files sit beside it
    main_filename: str
    site_url: str
    author: str
    subtitle: str | None = None
    logo_url: str | None = None
    hub: str | None = None

    def url(self, relative: str) -> str:
        """The public URL of a published file, relative to the folder of the main feed."""
        return urljoin(self.feed_url, relative)

    def meta(
        self, relative: str, *, title: str | None = None, language: str | None = None
    ) -> FeedMeta:
        return FeedMeta(
            title=title or self.title,
            feed_url=self.url(relative),
            site_url=self.site_url,
            author=self.author,
            subtitle=self.subtitle,
            logo_url=self.logo_url,
            language=language,
            hub=self.hub,
        )


@dataclass(frozen=True)
class ArchivePage:
    """One archive document: its number (from 1, the oldest) and its stories, oldest first."""

    number: int
    stories: tuple[Story, ...]
    complete: bool  # a later page exists: this one is never rewritten

    @property
    def path(self) -> str:
        return f"{ARCHIVE_DIR}/{self.number}.atom"


@dataclass(frozen=True)
class KeepIf:
    """A file that stays as it is on disk if it already holds these entries and links.

    A complete archive page must keep its bytes even when one of its stories is
    updated later (RFC 5005 §4: the entries of an archive document do not change), so
    it is rewritten only when it holds other stories or other links than planned:
    after a change of ``archive_size`` or of the feed's URL, or when it is new.
    """

    entry_ids: tuple[str, ...]
    links: frozenset[tuple[str, str]]

    def matches(self, existing: bytes) -> bool:
        try:
            root = etree.fromstring(existing)
        except etree.XMLSyntaxError:
            return False
        ids = tuple(e.findtext(f"{{{ATOM_NS}}}id") for e in root.iterfind(f"{{{ATOM_NS}}}entry"))
        links = frozenset(
            (link.get("rel", "alternate"), link.get("href", ""))
            for link in root.iterfind(f"{{{ATOM_NS}}}link")
        )
        return ids == self.entry_ids and links == self.links


@dataclass(frozen=True)
class KeepExisting:
    """A file that, once written, is never rewritten: a sent digest's web version.

    It shows the digest as it went out; a story corrected or joined by another partner
    later changes the feeds and the news page, not what a digest was.
    """

    def matches(self, existing: bytes) -> bool:
        return True


@dataclass(frozen=True)
class PlannedFile:
    """One file of the published folder: its path there, and how to make its bytes."""

    path: str
    render: Callable[[], bytes]
    keep_if: KeepIf | KeepExisting | None = None


def file_slug(name: str) -> str:
    """A file name for a topic or a language, safe in a URL and on any file system.

    Configured topics and language codes are already safe and stay as they are. A topic
    taken from a partner's item categories can be anything (``Forschung & Lehre``,
    ``再生医療``): it becomes lower-case ASCII letters, digits, ``-`` and ``_`` plus a
    short hash of the original, so two different topics never share a file.
    """
    if _SAFE_NAME.match(name):
        return name
    slug = (topic_slug(name) or "topic")[:60].strip("-_") or "topic"
    return f"{slug}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"


def archive_pages(
    newest_first: Sequence[Story], max_entries: int, page_size: int
) -> list[ArchivePage]:
    """The archive: the stories older than the main feed's, in pages of ``page_size``.

    Stories are taken in the order they were first seen (the store's order of ids, which
    neither a clock set back nor a later change of a story's date can reorder), so a new
    story only ever goes at the end and a page, once complete, keeps its stories. The
    archive is the shortest run of that order that reaches every story the main feed
    no longer shows: no story is in neither. A story first seen before, but published
    after, one that dropped out sits in both an archive page and the main feed (RFC 5005
    readers expect that and keep the most recently updated copy). Once stories arrive
    one cycle at a time, that is rare; a first fetch of partners' backlogs, listed
    newest first, makes more of it.
    """
    shown = {s.id for s in newest_first[:max_entries]}
    in_order = sorted(newest_first, key=lambda s: s.id)
    archived = 0
    for index, story in enumerate(in_order):
        if story.id not in shown:
            archived = index + 1
    chunks = [in_order[i : min(i + page_size, archived)] for i in range(0, archived, page_size)]
    return [
        ArchivePage(number, tuple(chunk), complete=number < len(chunks))
        for number, chunk in enumerate(chunks, start=1)
    ]


def plan_files(
    newest_first: Sequence[Story],
    site: SiteMeta,
    *,
    max_entries: int,
    archive_size: int,
    sources: Sequence[SourceFeed] = (),
    opml: bytes | None = None,
) -> list[PlannedFile]:
    """Every file of the published folder for these stories (newest first), in writing order."""
    pages = archive_pages(newest_first, max_entries, archive_size)
    # In the order to write them: a file comes after every file it links to, so a reader
    # who follows a link from a new main feed never finds a missing archive page.
    files = [_archive_file(page, len(pages), site) for page in reversed(pages)]
    for topic, stories in _grouped(newest_first, lambda s: s.topics).items():
        slug = file_slug(topic)
        files += _three_formats(
            stories[:max_entries],
            site,
            atom=f"{TOPICS_DIR}/{slug}.atom",
            rss=f"{TOPICS_DIR}/{slug}.rss",
            json=f"{TOPICS_DIR}/{slug}.json",
            sources=sources,
            title=f"{site.title} – {topic}",
        )
    # Language tags are case-insensitive (BCP 47): "pt-BR" and "pt-br" are one feed.
    by_language = _grouped(newest_first, lambda s: [code.lower() for code in s.languages])
    for language, stories in by_language.items():
        slug = file_slug(language)
        files += _three_formats(
            stories[:max_entries],
            site,
            atom=f"{LANGUAGES_DIR}/{slug}.atom",
            rss=f"{LANGUAGES_DIR}/{slug}.rss",
            json=f"{LANGUAGES_DIR}/{slug}.json",
            sources=sources,
            title=f"{site.title} ({language})",
            language=language,
        )
    if opml is not None:
        opml_bytes = opml
        files.append(PlannedFile(OPML_NAME, lambda: opml_bytes))
    # RFC 5005: the subscription document points at the newest archive page.
    latest = Paging(prev_archive=site.url(pages[-1].path)) if pages else None
    files += _three_formats(
        newest_first[:max_entries],
        site,
        atom=site.main_filename,
        rss=RSS_NAME,
        json=JSON_NAME,
        sources=sources,
        paging=latest,
    )
    return files


# The folders whose every feed file publish writes: a file there that no plan includes
# belongs to a topic or language no story has any more, or to an archive page beyond
# the last (after a change of archive_size).
GENERATED_DIRS = (TOPICS_DIR, LANGUAGES_DIR, ARCHIVE_DIR)
_FEED_SUFFIXES = (".atom", ".rss", ".json", ".html")  # .html: a topic's web page


def stale_files(existing: Iterable[str], planned: Iterable[str]) -> list[str]:
    """The published files (paths relative to the folder) that no longer belong there.

    Only feed files directly in the generated folders count, so an operator's own file
    elsewhere in the folder is never touched.
    """
    keep = set(planned)
    stale = []
    for path in existing:
        folder, _, name = path.partition("/")
        ours = folder in GENERATED_DIRS and "/" not in name and name.endswith(_FEED_SUFFIXES)
        if ours and path not in keep:
            stale.append(path)
    return sorted(stale)


def _three_formats(
    stories: Sequence[Story],
    site: SiteMeta,
    *,
    atom: str,
    rss: str,
    json: str,
    sources: Sequence[SourceFeed],
    title: str | None = None,
    language: str | None = None,
    paging: Paging | None = None,
) -> list[PlannedFile]:
    atom_meta = site.meta(atom, title=title, language=language)
    rss_meta = site.meta(rss, title=title, language=language)
    json_meta = site.meta(json, title=title, language=language)
    return [
        PlannedFile(atom, lambda: build_atom(stories, atom_meta, paging)),
        PlannedFile(rss, lambda: build_rss(stories, rss_meta)),
        PlannedFile(json, lambda: build_json_feed(stories, json_meta, sources)),
    ]


def _archive_file(page: ArchivePage, pages: int, site: SiteMeta) -> PlannedFile:
    main_url = site.url(site.main_filename)
    paging = Paging(
        current=main_url,
        prev_archive=site.url(f"{ARCHIVE_DIR}/{page.number - 1}.atom") if page.number > 1 else None,
        next_archive=(
            site.url(f"{ARCHIVE_DIR}/{page.number + 1}.atom") if page.number < pages else None
        ),
        archive=True,
    )
    meta = FeedMeta(
        title=f"{site.title} – archive {page.number}",
        feed_url=site.url(page.path),
        site_url=site.site_url,
        author=site.author,
        subtitle=site.subtitle,
        logo_url=site.logo_url,
        feed_id=main_url,  # the same logical feed as the main document
    )
    # Newest first inside the page too, like every other feed document.
    stories = tuple(reversed(page.stories))
    keep_if = None
    if page.complete:
        links = {
            ("alternate", site.site_url),
            ("self", meta.feed_url),
            *((rel, href) for rel, href in _paging_links(paging)),
        }
        keep_if = KeepIf(
            entry_ids=tuple(story_id(site.site_url, s) for s in stories),
            links=frozenset(links),
        )
    return PlannedFile(page.path, lambda: build_atom(stories, meta, paging), keep_if)


def _paging_links(paging: Paging) -> Iterable[tuple[str, str]]:
    for rel, href in (
        ("current", paging.current),
        ("prev-archive", paging.prev_archive),
        ("next-archive", paging.next_archive),
    ):
        if href:
            yield rel, href


def _grouped(
    newest_first: Sequence[Story], keys: Callable[[Story], Iterable[str]]
) -> dict[str, list[Story]]:
    """Stories by each of their keys (topics, languages), newest first, keys sorted."""
    groups: dict[str, list[Story]] = {}
    for story in newest_first:
        for key in dict.fromkeys(keys(story)):
            groups.setdefault(key, []).append(story)
    return {key: groups[key] for key in sorted(groups)}
