"""The published folder as a whole: which files, what goes where, and the archive.

The pure decisions (file names, archive pages) are tested on their own, with
hypothesis where a generator finds the cases nobody wrote down; the rest runs the
service on partner feeds served over real HTTP and looks at the files it wrote.
"""

from __future__ import annotations

import asyncio
import os
import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from clusterfeed.app.service import Service
from clusterfeed.config import ConfigError
from clusterfeed.model import Entry, Source, Story
from clusterfeed.publish.feedset import archive_pages, file_slug, stale_files
from clusterfeed.publish.formats import image_type
from clusterfeed.publish.opml import parse_opml
from tests.conftest import (
    EXAMPLE_FEED_META,
    Clock,
    FeedServer,
    Route,
    served_example_feeds,
    write_config,
)

NOW = datetime(2026, 11, 26, 7, 0, tzinfo=UTC)
ATOM = "http://www.w3.org/2005/Atom"
NS = {"a": ATOM}
SAFE_FILE = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(atom|rss|json|html)$")


def with_publish(path: Path, settings: str) -> Path:
    """The config at ``path`` with other ``[publish]`` settings than max_entries = 100."""
    path.write_text(path.read_text().replace("max_entries = 100", settings))
    return path


def entry_ids(path: Path) -> list[str]:
    root = etree.fromstring(path.read_bytes())
    return [e.findtext("a:id", namespaces=NS) for e in root.iterfind("a:entry", NS)]


def link(path: Path, rel: str) -> str | None:
    found = etree.fromstring(path.read_bytes()).find(f"a:link[@rel='{rel}']", NS)
    return None if found is None else found.get("href")


# -- file names ------------------------------------------------------------------------------


def test_configured_topics_and_languages_keep_their_names() -> None:
    for name in ("gene-therapy", "drug_discovery", "medtech", "de", "ja", "x" * 80):
        assert file_slug(name) == name


def test_odd_categories_get_safe_distinct_file_names() -> None:
    assert file_slug("Forschung & Lehre").startswith("forschung-lehre-")
    assert file_slug("über-uns").startswith("uber-uns-")
    assert file_slug("ueber-uns") == "ueber-uns"
    assert file_slug("再生医療").startswith("topic-")
    assert file_slug("再生医療") != file_slug("細胞治療")
    assert file_slug("_intern") != file_slug("intern")
    assert file_slug("../../etc/passwd").startswith("etc-passwd-")


@given(st.text(min_size=1, max_size=200))
def test_every_name_becomes_a_safe_file_name(name: str) -> None:
    slug = file_slug(name)
    assert re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,79}", slug)
    assert file_slug(name) == slug  # the same topic always lands in the same file


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_two_names_share_a_file_only_if_they_are_the_same(a: str, b: str) -> None:
    if a != b:
        assert file_slug(a) != file_slug(b)


def test_picture_types_are_known_only_from_the_file_name() -> None:
    assert image_type("https://partner.example/img/lab.jpg") == "image/jpeg"
    assert image_type("https://partner.example/img/Lab%20Team.PNG") == "image/png"
    assert image_type("https://partner.example/img/chart.png?w=800") == "image/png"
    assert image_type("https://partner.example/image?id=7") is None
    assert image_type("https://partner.example/report.pdf") is None
    assert image_type(None) is None


# -- archive pages (pure) ----------------------------------------------------------------------


def story(number: int, published: datetime) -> Story:
    entry = Entry(
        feed_name="Partner", identity=f"item-{number}", guid=None,
        link=f"https://partner.example/{number}", link_key=None, title=f"Story {number}",
        summary_html="", summary_text="", content_html="<p>Text</p>", image_url=None,
        image_alt=None, author=None, topics=(), language="en", published=published,
        updated=published, content_hash=str(number),
    )  # fmt: skip
    source = Source(
        feed_name="Partner", feed_title="Partner", feed_url="https://partner.example/feed",
        site_url=None, entry_title=entry.title, entry_link=entry.link,
    )  # fmt: skip
    return Story(
        id=number, key=f"s{number}", entry=entry, sources=(source,), topics=(),
        languages=("en",), first_seen=published, updated=published,
    )  # fmt: skip


def newest_first(stories: list[Story]) -> list[Story]:
    """The store's order: by publication date, then by id, newest first."""
    return sorted(stories, key=lambda s: (s.entry.published, s.id), reverse=True)


@given(
    batches=st.lists(
        st.lists(st.integers(min_value=0, max_value=2000), min_size=0, max_size=12),
        min_size=1,
        max_size=8,
    ),
    max_entries=st.integers(min_value=1, max_value=8),
    page_size=st.integers(min_value=1, max_value=6),
)
def test_a_complete_page_keeps_its_stories_whatever_arrives_later(
    batches: list[list[int]], max_entries: int, page_size: int
) -> None:
    """Stories arrive in batches, each with any date up to 2000 hours old (backlogs too)."""
    stories: list[Story] = []
    complete: dict[int, tuple[int, ...]] = {}
    for batch_number, ages in enumerate(batches):
        arrived = NOW + timedelta(days=batch_number)
        for age in ages:
            stories.append(story(len(stories) + 1, arrived - timedelta(hours=age)))
        ordered = newest_first(stories)
        pages = archive_pages(ordered, max_entries, page_size)

        for number, ids in complete.items():
            assert tuple(s.id for s in pages[number - 1].stories) == ids
        assert [p.number for p in pages] == list(range(1, len(pages) + 1))
        assert all(len(p.stories) == page_size for p in pages if p.complete)
        assert [p.complete for p in pages] == [True] * (len(pages) - 1) + [False] * bool(pages)
        archived = [s.id for p in pages for s in p.stories]
        assert archived == sorted(set(archived))  # the order first seen, none twice
        shown = {s.id for s in ordered[:max_entries]}
        assert set(archived) | shown == {s.id for s in stories}  # none in neither
        assert not archived or archived[-1] not in shown  # and no longer than that
        complete = {p.number: tuple(s.id for s in p.stories) for p in pages if p.complete}


def test_the_archive_starts_with_the_first_story_the_main_feed_no_longer_shows() -> None:
    # Stories first seen in the order they were published: no overlap.
    in_order = [story(n, NOW + timedelta(hours=n)) for n in range(1, 6)]
    assert archive_pages(newest_first(in_order), 5, 2) == []
    pages = archive_pages(newest_first(in_order), 2, 2)
    assert [[s.id for s in p.stories] for p in pages] == [[1, 2], [3]]
    assert [p.path for p in pages] == ["archive/1.atom", "archive/2.atom"]
    # A backlog first seen newest first (one partner's feed in one fetch): the archive
    # reaches the oldest story, so it also holds the two the main feed shows.
    backlog = [story(n, NOW - timedelta(hours=n)) for n in range(1, 6)]
    pages = archive_pages(newest_first(backlog), 2, 2)
    assert [[s.id for s in p.stories] for p in pages] == [[1, 2], [3, 4], [5]]


# -- the published folder ------------------------------------------------------------------------


@pytest.fixture
def example_service(example_config: Path, open_service: Any) -> Service:
    service: Service = open_service(example_config)
    asyncio.run(service.fetch())
    return service


def test_one_feed_per_topic_and_language_in_three_formats(example_service: Service) -> None:
    report = example_service.publish()
    folder = example_service.config.publish.output_dir
    stories = example_service.store.recent_stories()
    topics = {t for s in stories for t in s.topics}
    languages = {code for s in stories for code in s.languages}
    assert languages == {"de", "en", "ja"}
    expected = {"feed.atom", "feed.rss", "feed.json", "sources.opml", "index.html"}
    for kind, names in (("topics", topics), ("languages", languages)):
        expected |= {
            f"{kind}/{name}.{suffix}" for name in names for suffix in ("atom", "rss", "json")
        }
    expected |= {f"topics/{name}.html" for name in topics}  # the web page, per topic
    expected.add("digests/index.html")  # the list of sent digests, empty so far
    # max_entries = 100 holds all 36 stories: no archive yet, and no link to one.
    assert {p.relative_to(folder).as_posix() for p in report.written} == expected
    assert report.unchanged == []
    assert link(folder / "feed.atom", "prev-archive") is None

    def ids_with(test: Any) -> list[str]:
        return [f"tag:www.nordbio.example,2026:story/{s.key}" for s in stories if test(s)]

    for topic in topics:
        assert entry_ids(folder / "topics" / f"{topic}.atom") == ids_with(
            lambda s, topic=topic: topic in s.topics
        )
    for code in languages:
        # A story is in every language one of its versions is in.
        assert entry_ids(folder / "languages" / f"{code}.atom") == ids_with(
            lambda s, code=code: code in s.languages
        )
    release = "https://www.helixvektor.example/press/2026/coastline-acquisition.html"
    (coastline,) = [s for s in stories if s.entry.link == release]
    assert set(coastline.languages) == {"de", "en"}
    key = f"tag:www.nordbio.example,2026:story/{coastline.key}"
    assert key in entry_ids(folder / "languages" / "de.atom")
    assert key in entry_ids(folder / "languages" / "en.atom")

    gene = etree.fromstring((folder / "topics" / "gene-therapy.atom").read_bytes())
    assert gene.findtext("a:title", namespaces=NS) == (
        "NordBio Cluster – news from our partners – gene-therapy"
    )
    assert gene.find("a:link[@rel='self']", NS).get("href") == (
        "https://news.nordbio.example/topics/gene-therapy.atom"
    )


def test_sources_opml_lists_every_partner_feed(
    example_service: Service, feed_server: FeedServer
) -> None:
    example_service.publish()
    data = (example_service.config.publish.output_dir / "sources.opml").read_bytes()
    document = parse_opml(data, "sources.opml")

    served = {name: feed_server.url(f"/feeds/{file}") for name, file, *_ in EXAMPLE_FEED_META}
    assert {o.title: o.xml_url for o in document.outlines} == served
    assert {o.title: o.language for o in document.outlines} == {
        name: language for name, _, language, _ in EXAMPLE_FEED_META
    }
    # Dated by the newest story, not the clock: republishing later changes nothing.
    newest = max(max(s.updated, s.entry.updated) for s in example_service.store.recent_stories())
    dated = etree.fromstring(data).findtext("head/dateCreated")
    assert dated == format_datetime(newest, usegmt=True)


def test_odd_partner_categories_and_pictures(
    tmp_path: Path, feed_server: FeedServer, database_url: str, open_service: Any
) -> None:
    items = [
        ("Labor eröffnet", "https://partner.example/pictures/lab.png", ["Forschung & Lehre"]),
        ("Pressebild ohne Endung", "https://partner.example/image?id=7", ["再生医療"]),
        ("Ausflug", None, ["../../etc/passwd", "Über uns"]),
    ]
    parts = ['<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel>',
             "<title>Partner</title><link>https://partner.example/</link>",
             "<description>News</description>"]  # fmt: skip
    for number, (title, picture, categories) in enumerate(items):
        parts.append(f"<item><title>{title}</title><link>https://partner.example/{number}</link>")
        parts.append(f"<pubDate>Fri, 20 Nov 2026 0{number}:30:00 +0000</pubDate>")
        parts += [f"<category>{c.replace('&', '&amp;')}</category>" for c in categories]
        if picture:
            url = picture.replace("&", "&amp;")
            parts.append(f'<enclosure url="{url}" type="image/jpeg" length="1000"/>')
        parts.append("<description>Text</description></item>")
    parts.append("</channel></rss>")
    feed_server.routes["/partner.rss"] = Route("".join(parts).encode(), "application/rss+xml")
    feeds = [{"name": "Partner", "url": feed_server.url("/partner.rss"), "topics": ["campus"]}]
    service = open_service(write_config(tmp_path, feeds, database_url=database_url))
    asyncio.run(service.fetch())

    report = service.publish()

    folder = service.config.publish.output_dir.resolve()
    topic_files = sorted((folder / "topics").iterdir())
    assert all(SAFE_FILE.match(p.name) for p in topic_files), topic_files
    assert all(p.resolve().is_relative_to(folder) for p in report.written)
    titles = {
        p.name: etree.fromstring(p.read_bytes()).findtext("a:title", namespaces=NS)
        for p in topic_files
        if p.suffix == ".atom"
    }
    base = "NordBio Cluster – news from our partners – "
    assert titles == {
        "campus.atom": base + "campus",
        f"{file_slug('forschung-lehre')}.atom": base + "forschung-lehre",
        f"{file_slug('再生医療')}.atom": base + "再生医療",
        f"{file_slug('etc-passwd')}.atom": base + "etc-passwd",
        f"{file_slug('über-uns')}.atom": base + "über-uns",
    }
    # A picture is an RSS enclosure only when its type is known from its name.
    rss = etree.fromstring((folder / "feed.rss").read_bytes())
    enclosures = {
        item.findtext("title"): [(e.get("url"), e.get("type")) for e in item.iterfind("enclosure")]
        for item in rss.iterfind("channel/item")
    }
    assert enclosures == {
        "Labor eröffnet": [("https://partner.example/pictures/lab.png", "image/png")],
        "Pressebild ohne Endung": [],
        "Ausflug": [],
    }


def test_a_complete_archive_page_never_changes(
    tmp_path: Path,
    feed_server: FeedServer,
    database_url: str,
    open_service: Any,
    clock: Clock,
    rss_feed: Any,
) -> None:
    feeds = served_example_feeds(feed_server)
    feeds.append({"name": "Late Partner", "url": feed_server.url("/late.rss")})  # 404 for now
    path = with_publish(
        write_config(tmp_path, feeds, database_url=database_url),
        "max_entries = 5\narchive_size = 5",
    )
    service = open_service(path)
    asyncio.run(service.fetch())
    service.publish()
    archive = service.config.publish.output_dir / "archive"
    pages = sorted(archive.iterdir(), key=lambda p: int(p.stem))
    assert len(pages) >= 6
    complete = pages[:-1]
    before = {p: p.read_bytes() for p in complete}
    for page in complete:
        os.utime(page, (1_700_000_000, 1_700_000_000))

    # A partner corrects the headline of a story on the first page ...
    first_page = etree.fromstring(pages[0].read_bytes())
    served_titles = [
        (path, route, title)
        for title in first_page.xpath("a:entry/a:title/text()", namespaces=NS)
        for path, route in feed_server.routes.items()
        if re.fullmatch(r"[\w :,.'-]+", title) and title.encode() in route.body
    ]
    feed_path, route, title = served_titles[0]
    feed_server.routes[feed_path] = Route(
        route.body.replace(title.encode(), f"{title} (corrected)".encode()), route.content_type
    )
    # ... and a new partner brings three new stories.
    late = [
        {"title": f"Late news {n}", "link": f"https://late.example/news/{n}",
         "date": f"Thu, 26 Nov 2026 07:{10 * n}:00 +0000"}
        for n in (1, 2, 3)
    ]  # fmt: skip
    feed_server.routes["/late.rss"] = Route(rss_feed("Late Partner", late), "application/rss+xml")
    clock.now = NOW + timedelta(hours=1)
    outcomes = asyncio.run(service.fetch())
    assert {o.name: o.state for o in outcomes if o.state != "unchanged"} == {
        "Late Partner": "new",
        next(n for n, f, *_ in EXAMPLE_FEED_META if feed_path.endswith(f)): "new",
    }
    report = service.publish()

    stories = service.store.recent_stories()
    assert any(s.entry.title == f"{title} (corrected)" for s in stories)
    main = service.feed_path()
    assert main in report.written
    assert [t for t in etree.fromstring(main.read_bytes()).xpath(
        "a:entry/a:title/text()", namespaces=NS
    ) if t.startswith("Late news")] == ["Late news 3", "Late news 2", "Late news 1"]  # fmt: skip
    for page in complete:
        assert page.read_bytes() == before[page], f"{page.name} changed"
        assert page.stat().st_mtime == 1_700_000_000
        assert page not in report.written
    after = sorted(archive.iterdir(), key=lambda p: int(p.stem))
    assert link(main, "prev-archive") == (f"https://news.nordbio.example/archive/{len(after)}.atom")
    # The corrected headline is in the files that are not archived pages.
    assert f"{title} (corrected)".encode() in b"".join(
        p.read_bytes() for p in service.config.publish.output_dir.rglob("*.json")
    )


def test_publish_out_writes_every_file_to_another_folder(
    tmp_path: Path, feed_server: FeedServer, database_url: str, run_cli: Any
) -> None:
    path = write_config(tmp_path, served_example_feeds(feed_server), database_url=database_url)
    assert run_cli("fetch", "--config", path).exit_code == 0
    target = tmp_path / "static-site"

    first = run_cli("publish", "--config", path, "--out", target)
    second = run_cli("publish", "--config", path, "--out", target)

    assert first.exit_code == 0, first.output
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert {"feed.atom", "feed.rss", "feed.json", "sources.opml"} <= set(files)
    assert "topics/gene-therapy.rss" in files and "languages/ja.json" in files
    assert first.stdout.splitlines() == [
        f"wrote: {target / 'feed.atom'}",
        f"published {target}: {len(files)} files written, 0 unchanged",
    ]
    assert second.stdout.splitlines() == [
        f"unchanged: {target / 'feed.atom'}",
        f"published {target}: 0 files written, {len(files)} unchanged",
    ]
    assert not (tmp_path / "public").exists()  # publish.output_dir is left alone


def test_a_feed_file_name_that_another_file_uses_is_refused(
    tmp_path: Path, feed_server: FeedServer, database_url: str, open_service: Any, run_cli: Any
) -> None:
    path = with_publish(
        write_config(tmp_path, served_example_feeds(feed_server), database_url=database_url),
        'max_entries = 100\nfilename = "feed.rss"',
    )
    service = open_service(path)
    with pytest.raises(ConfigError, match=r"publish\.filename"):
        service.publish()

    result = run_cli("publish", "--config", path)
    assert result.exit_code == 2
    assert "publish.filename: 'feed.rss' is the name of another published file" in result.stderr


# -- files that no longer belong -----------------------------------------------------------


def test_stale_files_are_only_generated_feed_files_no_plan_includes() -> None:
    existing = [
        "topics/messe.atom", "topics/messe.html", "topics/campus.rss", "languages/fr.json",
        "archive/7.atom", "archive/1.atom", "topics/notes.txt", "own/page.atom", "feed.atom",
        "topics/deeper/x.atom",
    ]  # fmt: skip
    planned = ["topics/campus.rss", "archive/1.atom", "feed.atom"]

    assert stale_files(existing, planned) == [
        "archive/7.atom", "languages/fr.json", "topics/messe.atom", "topics/messe.html",
    ]  # fmt: skip


def test_the_files_of_a_vanished_topic_are_removed(
    tmp_path: Path, feed_server: FeedServer, database_url: str, open_service: Any, run_cli
) -> None:
    def partner(category: str, text: str = "Text") -> bytes:
        return (
            '<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel>'
            "<title>Partner</title><link>https://partner.example/</link>"
            "<description>News</description><item><title>Messe in Kiel</title>"
            "<link>https://partner.example/messe</link>"
            "<pubDate>Fri, 20 Nov 2026 09:30:00 +0000</pubDate>"
            f"<category>{category}</category><description>{text}</description></item>"
            "</channel></rss>"
        ).encode()

    feed_server.routes["/partner.rss"] = Route(partner("Messe"), "application/rss+xml")
    feeds = [{"name": "Partner", "url": feed_server.url("/partner.rss"), "topics": ["campus"]}]
    config = write_config(tmp_path, feeds, database_url=database_url)
    public = tmp_path / "public"
    (public / "topics").mkdir(parents=True)
    (public / "topics" / "README.txt").write_text("the operator's own note\n")
    assert run_cli("fetch", "--config", config).exit_code == 0
    assert run_cli("publish", "--config", config).exit_code == 0
    messe = {p.name for p in (public / "topics").glob("messe.*")}
    assert messe == {"messe.atom", "messe.rss", "messe.json", "messe.html"}

    # The partner revises the item and files it under another category: "messe" is no
    # topic any more.
    revised = partner("Veranstaltungen", "Text, revised")
    feed_server.routes["/partner.rss"] = Route(revised, "application/rss+xml")
    assert run_cli("fetch", "--config", config).exit_code == 0
    result = run_cli("publish", "--config", config)

    assert result.exit_code == 0
    assert ", 4 removed" in result.stdout
    assert not list((public / "topics").glob("messe.*"))
    assert (public / "topics" / "veranstaltungen.atom").is_file()
    assert (public / "topics" / "campus.atom").is_file()
    assert (public / "topics" / "README.txt").is_file()  # not ours: left alone
