"""The published feeds (Atom, RSS 2.0, JSON Feed 1.1), as feed readers and validators see them.

The files are produced the way the service produces them: partner feeds fetched over
real HTTP into a real store, then ``Service.publish``. Structure is checked on the
bytes with lxml (what any reader gets), each format with an independent parser
(feedparser for Atom and RSS, the JSON Feed 1.1 schema) and, where available, the
shared third-party validators next to the checkout (see ``REALCLIENTS`` in conftest).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import feedparser
import pytest
from lxml import etree

from clusterfeed.app.service import Service
from clusterfeed.publish.formats import write_atomic
from tests.conftest import (
    DATA,
    EXAMPLE_FEED_META,
    EXAMPLE_STORIES,
    REALCLIENTS,
    Clock,
    FeedServer,
    served_example_feeds,
    write_config,
)

NOW = datetime(2026, 11, 26, 7, 0, tzinfo=UTC)
ATOM = "http://www.w3.org/2005/Atom"
NS = {"a": ATOM}
FEED_URL = "https://news.nordbio.example/feed.atom"
PARTNER_NAMES = {name for name, *_ in EXAMPLE_FEED_META}


@pytest.fixture
def example_service(example_config: Path, open_service: Any) -> Service:
    """The nine example partner feeds fetched over HTTP into a fresh store."""
    service: Service = open_service(example_config)
    outcomes = asyncio.run(service.fetch())
    assert [o.state for o in outcomes] == ["new"] * 9
    return service


@pytest.fixture
def published(example_service: Service) -> bytes:
    assert example_service.publish().changed
    return example_service.feed_path().read_bytes()


def entries_of(document: bytes) -> list[Any]:
    return list(etree.fromstring(document).iterfind("a:entry", NS))


def text_of(element: Any, path: str) -> str:
    found = element.find(path, NS)
    assert found is not None, f"{path} missing in {etree.tostring(element)[:200]!r}"
    return str(found.text or "")


def entry_titled(document: bytes, title: str) -> Any:
    (entry,) = [e for e in entries_of(document) if text_of(e, "a:title") == title]
    return entry


def rfc3339(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, f"{value} has no time zone"
    return parsed


# -- the example cluster's feed ------------------------------------------------------------


def test_published_feed_parses_back_cleanly(published: bytes) -> None:
    parsed = feedparser.parse(published)
    assert not parsed.bozo, parsed.get("bozo_exception")
    assert parsed.version == "atom10"
    assert parsed.feed.title == "NordBio Cluster – news from our partners"
    # 47 partner items, 36 stories (config/example-feeds/README.md has the key).
    assert len(parsed.entries) == EXAMPLE_STORIES
    titles = {e.title for e in parsed.entries}
    assert "再生医療ベンチャー支援プログラム 第3期採択企業を決定" in titles  # Shift_JIS, read right
    assert "Forschungspreis für Kieler Herzchirurgie: Gewebezüchtung für Herzklappen" in titles


def test_feed_describes_itself(published: bytes) -> None:
    feed = etree.fromstring(published)
    assert feed.tag == f"{{{ATOM}}}feed"
    assert text_of(feed, "a:id") == FEED_URL
    assert text_of(feed, "a:title") == "NordBio Cluster – news from our partners"
    # Not the clock at publishing time: the newest story's date (first seen at NOW).
    assert rfc3339(text_of(feed, "a:updated")) == NOW
    assert text_of(feed, "a:author/a:name") == "NordBio Cluster"
    links = {link.get("rel"): link.get("href") for link in feed.iterfind("a:link", NS)}
    assert links["self"] == FEED_URL
    assert links["alternate"] == "https://www.nordbio.example"


def test_every_entry_is_complete_and_credits_its_partner_feed(
    published: bytes, feed_server: FeedServer
) -> None:
    entries = entries_of(published)
    ids = [text_of(e, "a:id") for e in entries]
    assert len(set(ids)) == len(ids) == EXAMPLE_STORIES
    served = {name: feed_server.url(f"/feeds/{file}") for name, file, *_ in EXAMPLE_FEED_META}
    for entry in entries:
        assert text_of(entry, "a:id").startswith("tag:www.nordbio.example,2026:story/")
        assert text_of(entry, "a:title").strip()
        assert rfc3339(text_of(entry, "a:updated")) <= NOW
        assert rfc3339(text_of(entry, "a:published")) <= rfc3339(text_of(entry, "a:updated"))
        (link,) = entry.findall("a:link[@rel='alternate']", NS)
        assert link.get("type") == "text/html"
        assert link.get("href").startswith("https://")

        source = entry.find("a:source", NS)
        assert source is not None
        partner = text_of(source, "a:title")
        assert partner in PARTNER_NAMES
        assert text_of(source, "a:id") == served[partner]
        source_links = source.findall("a:link", NS)
        assert [(s.get("rel"), s.get("href")) for s in source_links] == [("self", served[partner])]
        assert rfc3339(text_of(source, "a:updated"))
        assert text_of(entry, "a:author/a:name") == partner


def test_story_told_by_three_partners_credits_all(published: bytes) -> None:
    release = "https://www.helixvektor.example/press/2026/coastline-acquisition.html"
    (entry,) = [
        e
        for e in entries_of(published)
        if e.find("a:link[@rel='alternate']", NS) is not None
        and e.find("a:link[@rel='alternate']", NS).get("href") == release
    ]
    author = text_of(entry, "a:author/a:name")
    contributors = [c.text for c in entry.iterfind("a:contributor/a:name", NS)]
    assert {author, *contributors} == {
        "Helix Vektor",
        "Hanse Innovationsfonds",
        "NordBio Cluster (Deutsch)",
        "NordBio Cluster",  # its own page, in other words: joined by the story matcher
    }
    content = text_of(entry, "a:content")
    assert "Also reported by:" in content
    for name in contributors:
        assert f">{name}</a></li>" in content
    # Three link the same page (after removing utm_ and the fragment): only the
    # fourth, the cluster's own article, is a related link.
    related = [link.get("href") for link in entry.findall("a:link[@rel='related']", NS)]
    assert related == ["https://www.nordbio.example/en/news/coastline-acquires-helix-vektor.html"]


def test_entries_newest_first_and_limited_to_max_entries(
    tmp_path: Path, feed_server: FeedServer, database_url: str, open_service: Any
) -> None:
    path = write_config(tmp_path, served_example_feeds(feed_server), database_url=database_url)
    path.write_text(path.read_text().replace("max_entries = 100", "max_entries = 5"))
    service = open_service(path)
    asyncio.run(service.fetch())
    service.publish()

    entries = entries_of(service.feed_path().read_bytes())
    assert [text_of(e, "a:title") for e in entries] == [
        "Forschungspreis für Kieler Herzchirurgie: Gewebezüchtung für Herzklappen",
        "Webinar: Fragment screening meets machine learning",
        "国際シンポジウム「再生医療の社会実装」を12月に神戸で開催",
        "Call for applications: NordBio Digital Health Accelerator 2027",
        "Personalie: Dr. Friederike Claußen wird Forschungsvorständin",
    ]
    dates = [rfc3339(text_of(e, "a:published")) for e in entries]
    assert dates == sorted(dates, reverse=True)
    assert dates[0] == datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def test_publishing_again_with_nothing_new_changes_nothing(
    example_service: Service, clock: Clock
) -> None:
    assert example_service.publish().changed
    path = example_service.feed_path()
    first = path.read_bytes()
    os.utime(path, (1_700_000_000, 1_700_000_000))

    clock.now = NOW + timedelta(hours=1)
    assert not example_service.publish().changed
    # A whole cycle where every partner answers 304 does not touch the file either.
    outcomes = asyncio.run(example_service.fetch())
    assert {o.state for o in outcomes} == {"unchanged"}
    assert not example_service.publish().changed

    assert path.read_bytes() == first
    assert path.stat().st_mtime == 1_700_000_000
    # No temporary files are left beside the published ones.
    assert not [p for p in path.parent.rglob("*") if p.name.endswith(".tmp")]


def test_scripts_and_handlers_never_reach_the_feed(published: bytes) -> None:
    lowered = published.lower()
    for needle in (b"script", b"onerror", b"onclick", b"alert(", b"javascript:"):
        assert needle not in lowered, needle
    entry = entry_titled(
        published, "New GMP cleanrooms for vector production in Hamburg-Bahrenfeld"
    )
    content = text_of(entry, "a:content")
    assert '<img alt="Cleanroom" src="https://www.helixvektor.example/newsroom/img/' in content
    assert "Take the virtual tour</a>" in content


def test_published_feed_passes_the_feed_validator(published: bytes, tmp_path: Path) -> None:
    script = REALCLIENTS / "validate_feed.sh"
    if not script.is_file():
        pytest.skip(f"feed validator not installed here ({script} is absent)")
    feed = tmp_path / "published.atom"
    feed.write_bytes(published)
    result = subprocess.run(
        ["bash", str(script), str(feed)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"format=atom entries={EXAMPLE_STORIES} errors=0" in result.stdout


# -- stories from the test partners -----------------------------------------------------


@pytest.fixture
def hafen_and_nordlicht(
    tmp_path: Path, feed_server: FeedServer, database_url: str, open_service: Any, clock: Clock
) -> Service:
    """Hafen Campus (a local file) first; an hour later Nordlicht (HTTP) links the same page."""
    hafen = tmp_path / "feeds" / "hafen-campus.rss"
    hafen.parent.mkdir()
    # A vertical tab pasted from a word processor: not allowed in XML, common in feeds.
    hafen.write_bytes(
        (DATA / "hafen-campus.rss")
        .read_bytes()
        .replace(b"Das Land Schleswig-Holstein", b"Das Land\x0bSchleswig-Holstein")
    )
    feeds = [
        {
            "name": "Life Science Campus Hafen",
            "url": str(hafen),
            "site": "https://www.hafen-campus.example",
            "language": "de",
        },
        {
            "name": "Nordlicht Diagnostics",
            "url": feed_server.url("/en/news/feed.atom"),
            "site": "https://www.nordlicht-diagnostics.example",
        },
    ]
    service: Service = open_service(write_config(tmp_path, feeds, database_url=database_url))
    asyncio.run(service.fetch())  # Nordlicht answers 404 this time
    feed_server.serve_file("/en/news/feed.atom", DATA / "nordlicht-diagnostics.atom")
    clock.now = NOW + timedelta(hours=1)
    asyncio.run(service.fetch())
    assert service.publish().changed
    return service


def test_second_source_is_listed_and_linked_as_related(hafen_and_nordlicht: Service) -> None:
    document = hafen_and_nordlicht.feed_path().read_bytes()
    entry = entry_titled(document, "Nordlicht Diagnostics bezieht neues Labor auf dem Campus")

    (alternate,) = entry.findall("a:link[@rel='alternate']", NS)
    assert alternate.get("href") == (
        "https://www.hafen-campus.example/presse/2026/nordlicht-labor/?lang=de"
    )
    (related,) = entry.findall("a:link[@rel='related']", NS)
    assert related.get("href") == "http://hafen-campus.example/presse/2026/nordlicht-labor?lang=de"
    assert related.get("title") == "Nordlicht Diagnostics"
    assert [c.text for c in entry.iterfind("a:contributor/a:name", NS)] == ["Nordlicht Diagnostics"]
    content = text_of(entry, "a:content")
    assert "Source: <a href=" in content and ">Life Science Campus Hafen</a>" in content
    assert (
        '<p>Also reported by:</p><ul><li><a href="http://hafen-campus.example/presse/2026/'
        'nordlicht-labor?lang=de" title="We have moved: our new laboratory at Hafen Campus in '
        'Kiel">Nordlicht Diagnostics</a></li></ul>'
    ) in content
    # The partner's own feed is named in atom:source (site given: alternate link too).
    source = entry.find("a:source", NS)
    assert text_of(source, "a:title") == "Life Science Campus Hafen"
    # A file feed has no URL on the web: its id is a tag URI, a valid URI without spaces.
    assert text_of(source, "a:id") == (
        "tag:www.hafen-campus.example,2026:source/Life%20Science%20Campus%20Hafen"
    )
    assert {(s.get("rel"), s.get("href")) for s in source.iterfind("a:link", NS)} == {
        ("alternate", "https://www.hafen-campus.example")
    }
    # A second partner telling the story makes it current again.
    assert rfc3339(text_of(entry, "a:updated")) == NOW + timedelta(hours=1)


def test_feed_with_control_characters_and_scripts_publishes_cleanly(
    hafen_and_nordlicht: Service,
) -> None:
    document = hafen_and_nordlicht.feed_path().read_bytes()
    parsed = feedparser.parse(document)
    assert not parsed.bozo, parsed.get("bozo_exception")
    assert len(parsed.entries) == 6
    entry = entry_titled(
        document, "Förderbescheid über 2,4 Mio. Euro für das Organoid-Labor am Campus"
    )
    assert "Das Land Schleswig-Holstein fördert" in text_of(entry, "a:content")
    assert b"document.cookie" not in document and b"onerror" not in document
    script = REALCLIENTS / "validate_feed.sh"
    if script.is_file():
        path = str(hafen_and_nordlicht.feed_path())
        result = subprocess.run(["bash", str(script), path], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_feed_before_any_news_is_valid_and_empty(
    tmp_path: Path, feed_server: FeedServer, database_url: str, open_service: Any
) -> None:
    feeds = [{"name": "Helix Vektor", "url": feed_server.url("/not-yet.rss")}]
    service = open_service(write_config(tmp_path, feeds, database_url=database_url))
    asyncio.run(service.fetch())

    assert service.publish().changed
    parsed = feedparser.parse(service.feed_path().read_bytes())
    assert not parsed.bozo
    assert parsed.entries == []
    assert parsed.feed.title == "NordBio Cluster – news from our partners"


# -- every format, every file: the published folder through independent parsers -----------

BASE = "https://news.nordbio.example/"
FH = "http://purl.org/syndication/history/1.0"
ABSOLUTE_IRI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:\S+$")
JSON_FEED_KEYS = {
    "version", "title", "home_page_url", "feed_url", "description", "user_comment",
    "next_url", "icon", "favicon", "authors", "author", "language", "expired", "hubs", "items",
}  # fmt: skip
JSON_ITEM_KEYS = {
    "id", "url", "external_url", "title", "content_html", "content_text", "summary",
    "image", "banner_image", "date_published", "date_modified", "authors", "author",
    "tags", "language", "attachments",
}  # fmt: skip


@pytest.fixture
def archived_example(
    tmp_path: Path, feed_server: FeedServer, database_url: str, open_service: Any
) -> Service:
    """The example fetched over HTTP and published with 10 entries a feed, 10 a page."""
    path = write_config(tmp_path, served_example_feeds(feed_server), database_url=database_url)
    path.write_text(
        path.read_text().replace("max_entries = 100", "max_entries = 10\narchive_size = 10")
    )
    service: Service = open_service(path)
    asyncio.run(service.fetch())
    assert service.publish().changed
    return service


def folder_of(service: Service) -> Path:
    return service.config.publish.output_dir


def published_files(folder: Path, suffix: str = "") -> list[Path]:
    return sorted(p for p in folder.rglob(f"*{suffix}") if p.is_file())


def url_of(folder: Path, path: Path) -> str:
    return BASE + path.relative_to(folder).as_posix()


def validate_feed(path: Path) -> str:
    """The shared validator's verdict (xmllint RELAX NG + feed rules); skips if absent."""
    script = REALCLIENTS / "validate_feed.sh"
    if not script.is_file():
        pytest.skip(f"feed validator not installed here ({script} is absent)")
    result = subprocess.run(
        ["bash", str(script), str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{path}:\n{result.stdout}{result.stderr}"
    return result.stdout


def validate_json_feed(path: Path) -> str:
    """The shared JSON Feed 1.1 schema check (jsonschema, Draft 2020-12); skips if absent."""
    script = REALCLIENTS / "validate_jsonfeed.py"
    if not script.is_file():
        pytest.skip(f"JSON Feed validator not installed here ({script} is absent)")
    result = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{path}:\n{result.stdout}{result.stderr}"
    return result.stdout


def test_atom_and_rss_parse_back_with_feedparser_crediting_every_partner(
    archived_example: Service, feed_server: FeedServer
) -> None:
    folder = folder_of(archived_example)
    served = {name: feed_server.url(f"/feeds/{file}") for name, file, *_ in EXAMPLE_FEED_META}
    atom = feedparser.parse((folder / "feed.atom").read_bytes())
    rss = feedparser.parse((folder / "feed.rss").read_bytes())

    for parsed, version in ((atom, "atom10"), (rss, "rss20")):
        assert not parsed.bozo, parsed.get("bozo_exception")
        assert parsed.version == version
        assert parsed.feed.title == "NordBio Cluster – news from our partners"
        assert len(parsed.entries) == 10
        for entry in parsed.entries:
            assert entry.source.title in PARTNER_NAMES
            assert entry.author == entry.source.title  # atom:author / dc:creator
    # The same stories in the same order, under the same ids (Atom id = RSS guid).
    assert [e.id for e in rss.entries] == [e.id for e in atom.entries]
    assert [e.title for e in rss.entries] == [e.title for e in atom.entries]
    # RSS <source url> names the partner's feed, as atom:source's self link does.
    for entry in rss.entries:
        assert entry.source.href == served[entry.source.title]
    assert rss.feed.link == "https://www.nordbio.example"


def test_json_feed_passes_the_schema_and_credits_every_partner(
    archived_example: Service, feed_server: FeedServer
) -> None:
    folder = folder_of(archived_example)
    for path in published_files(folder, ".json"):
        summary = validate_json_feed(path)
        document = json.loads(path.read_bytes())
        assert f"items={len(document['items'])} errors=0 warnings=0" in summary, summary

    document = json.loads((folder / "feed.json").read_bytes())
    atom = feedparser.parse((folder / "feed.atom").read_bytes())
    assert document["version"] == "https://jsonfeed.org/version/1.1"
    assert document["feed_url"] == BASE + "feed.json"
    assert document["home_page_url"] == "https://www.nordbio.example"
    # Unknown keys start with "_" (the spec's extension rule), at the top and in items.
    assert all(k in JSON_FEED_KEYS or k.startswith("_") for k in document)
    assert [i["id"] for i in document["items"]] == [e.id for e in atom.entries]
    for item in document["items"]:
        assert all(k in JSON_ITEM_KEYS or k.startswith("_") for k in item)
        assert item["id"] and (item.get("content_html") or item.get("content_text"))
        assert [a["name"] for a in item["authors"]] == [item["_clusterfeed"]["sources"][0]["name"]]
        assert item["authors"][0]["name"] in PARTNER_NAMES
        assert datetime.fromisoformat(item["date_modified"]) >= datetime.fromisoformat(
            item["date_published"]
        )
    served = {name: feed_server.url(f"/feeds/{file}") for name, file, *_ in EXAMPLE_FEED_META}
    assert {s["name"]: s["url"] for s in document["_clusterfeed"]["sources"]} == served


def test_feeds_topics_languages_and_archive_pages_pass_the_feed_validator(
    archived_example: Service,
) -> None:
    folder = folder_of(archived_example)
    pages = published_files(folder / "archive")
    chosen = [
        folder / "feed.atom",
        folder / "feed.rss",
        folder / "topics" / "research.atom",
        folder / "topics" / "research.rss",
        folder / "languages" / "ja.atom",
        folder / "languages" / "de.rss",
        pages[0],
        pages[-1],
    ]
    for path in chosen:
        document = etree.fromstring(path.read_bytes())
        if path.suffix == ".atom":
            expected = f"format=atom entries={len(document.findall('a:entry', NS))} "
        else:
            expected = f"format=rss2 entries={len(document.findall('channel/item'))} "
        summary = validate_feed(path)
        assert expected + "errors=0 warnings=0" in summary, f"{path}: {summary}"


def test_every_atom_file_has_what_rfc_4287_requires(archived_example: Service) -> None:
    folder = folder_of(archived_example)
    atom_files = published_files(folder, ".atom")
    assert {p.relative_to(folder).parts[0] for p in atom_files} == {
        "feed.atom",
        "topics",
        "languages",
        "archive",
    }
    for path in atom_files:
        feed = etree.fromstring(path.read_bytes())
        where = path.relative_to(folder)
        for name in ("id", "title", "updated"):
            assert len(feed.findall(f"a:{name}", NS)) == 1, (where, name)
        assert ABSOLUTE_IRI.match(text_of(feed, "a:id")), where
        updated = rfc3339(text_of(feed, "a:updated"))
        links = feed.findall("a:link", NS)
        assert [x.get("href") for x in links if x.get("rel") == "self"] == [url_of(folder, path)]
        alternates = [
            (x.get("type"), x.get("hreflang")) for x in links if x.get("rel") == "alternate"
        ]
        assert len(alternates) == len(set(alternates)) == 1, where
        feed_author = feed.find("a:author/a:name", NS) is not None
        ids = []
        for entry in feed.iterfind("a:entry", NS):
            ids.append(text_of(entry, "a:id"))
            assert ABSOLUTE_IRI.match(ids[-1])
            assert text_of(entry, "a:title").strip()
            assert rfc3339(text_of(entry, "a:updated")) <= updated, where
            assert feed_author or entry.find("a:author/a:name", NS) is not None, where
            entry_alternates = [
                (x.get("type"), x.get("hreflang"))
                for x in entry.iterfind("a:link", NS)
                if x.get("rel", "alternate") == "alternate"
            ]
            assert len(entry_alternates) == len(set(entry_alternates)) <= 1, where
            assert entry.get("{http://www.w3.org/XML/1998/namespace}lang") in {"de", "en", "ja"}
        assert len(ids) == len(set(ids)), where


def test_every_rss_file_has_what_rss_2_requires(archived_example: Service) -> None:
    folder = folder_of(archived_example)
    rss_files = published_files(folder, ".rss")
    assert {p.relative_to(folder).parts[0] for p in rss_files} == {
        "feed.rss",
        "topics",
        "languages",
    }
    for path in rss_files:
        where = path.relative_to(folder)
        channel = etree.fromstring(path.read_bytes()).find("channel")
        for name in ("title", "link", "description"):
            assert (channel.findtext(name) or "").strip(), (where, name)
        (self_link,) = channel.findall(f"{{{ATOM}}}link[@rel='self']")
        assert self_link.get("href") == url_of(folder, path)
        assert parsedate_to_datetime(channel.findtext("lastBuildDate"))
        guids = []
        for item in channel.iterfind("item"):
            assert item.findtext("title") or item.findtext("description"), where
            guid = item.find("guid")
            assert guid is not None and guid.get("isPermaLink") == "false", where
            guids.append(guid.text)
            assert parsedate_to_datetime(item.findtext("pubDate")).tzinfo is not None
            source = item.find("source")
            assert source is not None and source.text in PARTNER_NAMES, where
            assert source.get("url", "").startswith("http://127.0.0.1:")
            for enclosure in item.iterfind("enclosure"):
                assert enclosure.get("type", "").startswith("image/"), where
                assert enclosure.get("length") == "0"
        assert len(guids) == len(set(guids)), where
    languages = {
        p.stem: etree.fromstring(p.read_bytes()).findtext("channel/language")
        for p in published_files(folder / "languages", ".rss")
    }
    assert languages == {"de": "de", "en": "en", "ja": "ja"}


def test_archive_pages_form_one_complete_chain(archived_example: Service) -> None:
    folder = folder_of(archived_example)
    main = etree.fromstring((folder / "feed.atom").read_bytes())
    pages = published_files(folder / "archive")
    numbers = sorted(int(p.stem) for p in pages)
    assert numbers == list(range(1, len(pages) + 1)) and len(pages) >= 3

    def link(document: Any, rel: str) -> str | None:
        found = document.findall(f"a:link[@rel='{rel}']", NS)
        assert len(found) <= 1
        return found[0].get("href") if found else None

    # Only archive pages say they are archives; the main feed points at the newest one.
    for path in published_files(folder, ".atom"):
        is_page = path.parent.name == "archive"
        assert (etree.fromstring(path.read_bytes()).find(f"{{{FH}}}archive") is not None) == (
            is_page
        ), path
    assert link(main, "prev-archive") == f"{BASE}archive/{len(pages)}.atom"
    assert link(main, "next-archive") is None and link(main, "current") is None

    # From the newest page back to the first along prev-archive, and forward along next-archive.
    seen: list[str] = []
    href = link(main, "prev-archive")
    while href is not None:
        number = int(href.rsplit("/", 1)[1].removesuffix(".atom"))
        page = etree.fromstring((folder / "archive" / f"{number}.atom").read_bytes())
        seen.append(href)
        assert link(page, "self") == href
        assert link(page, "current") == FEED_URL
        assert text_of(page, "a:id") == text_of(main, "a:id")  # one logical feed
        expected_next = f"{BASE}archive/{number + 1}.atom" if number < len(pages) else None
        assert link(page, "next-archive") == expected_next
        entries = entries_of(etree.tostring(page))
        if number < len(pages):
            assert len(entries) == 10  # every page but the newest is full
        href = link(page, "prev-archive")
    assert seen == [f"{BASE}archive/{n}.atom" for n in range(len(pages), 0, -1)]

    # Every story is in the main feed or the archive (or both), none twice in the archive,
    # and the pages hold them in the order they were first seen.
    stories = archived_example.store.recent_stories()
    ids_by_key = {f"tag:www.nordbio.example,2026:story/{s.key}": s.id for s in stories}
    archived = []
    for number in numbers:
        page = (folder / "archive" / f"{number}.atom").read_bytes()
        archived += sorted(ids_by_key[text_of(e, "a:id")] for e in entries_of(page))
    in_main = {ids_by_key[text_of(e, "a:id")] for e in entries_of(etree.tostring(main))}
    assert archived == sorted(archived) and len(archived) == len(set(archived))
    assert set(archived) | in_main == {s.id for s in stories}
    assert len(stories) == EXAMPLE_STORIES


def test_every_published_file_is_byte_identical_when_nothing_changed(
    archived_example: Service, clock: Clock
) -> None:
    folder = folder_of(archived_example)
    before = {p: p.read_bytes() for p in published_files(folder)}
    assert {p.suffix for p in before} == {".atom", ".rss", ".json", ".opml", ".html"}
    for path in before:
        os.utime(path, (1_700_000_000, 1_700_000_000))

    clock.now = NOW + timedelta(hours=3)
    report = archived_example.publish()
    assert report.written == [] and sorted(report.unchanged) == sorted(before)
    outcomes = asyncio.run(archived_example.fetch())  # every partner answers 304
    assert {o.state for o in outcomes} == {"unchanged"}
    assert not archived_example.publish().written

    after = {p: p.read_bytes() for p in published_files(folder)}
    assert after == before
    assert {p.stat().st_mtime for p in after} == {1_700_000_000}


# -- write_atomic ---------------------------------------------------------------------------


def test_write_atomic_replaces_only_when_bytes_change(tmp_path: Path) -> None:
    path = tmp_path / "public" / "feed.atom"
    assert write_atomic(path, b"<feed>eins</feed>") is True  # creates the folder
    assert path.read_bytes() == b"<feed>eins</feed>"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)  # the web server may read it
    os.utime(path, (1_700_000_000, 1_700_000_000))

    assert write_atomic(path, b"<feed>eins</feed>") is False
    assert path.stat().st_mtime == 1_700_000_000

    assert write_atomic(path, b"<feed>zwei</feed>") is True
    assert path.read_bytes() == b"<feed>zwei</feed>"
    assert path.stat().st_mtime != 1_700_000_000
    assert sorted(p.name for p in path.parent.iterdir()) == ["feed.atom"]


# -- the order readers see ---------------------------------------------------------------


def test_every_published_list_follows_the_dates_it_shows(
    tmp_path: Path, feed_server: FeedServer, database_url: str, run_cli
) -> None:
    """The example's EU approval is shown with the cluster's own version (29 Oct) but
    was first reported on 27 Oct; it was listed below "Zweiter Fonds" of 28 Oct."""
    import json as jsonlib
    import re as regex
    from datetime import datetime as dt

    import feedparser as fp

    feeds = served_example_feeds(feed_server)
    for feed in feeds:
        feed["own"] = feed["name"].startswith("NordBio Cluster")  # as in the example
    example_config = write_config(
        tmp_path, feeds, database_url=database_url, extra='[stories]\nrepresentative = "own"\n'
    )
    assert run_cli("fetch", "--config", example_config).exit_code == 0
    assert run_cli("publish", "--config", example_config).exit_code == 0
    public = example_config.parent / "public"

    def newest_first(dates: list[dt], where: str) -> None:
        assert len(dates) > 1, where
        assert dates == sorted(dates, reverse=True), where

    checked = 0
    for path in [
        public / "feed.atom",
        *public.glob("topics/*.atom"),
        *public.glob("languages/*.atom"),
    ]:
        newest_first([dt.fromisoformat(e.published) for e in fp.parse(path).entries], str(path))
        checked += 1
    for path in [public / "feed.rss", *public.glob("topics/*.rss")]:
        entries = fp.parse(path).entries
        newest_first([dt(*e.published_parsed[:6]) for e in entries], str(path))
    for path in [public / "feed.json", *public.glob("languages/*.json")]:
        items = jsonlib.loads(path.read_text(encoding="utf-8"))["items"]
        newest_first([dt.fromisoformat(i["date_published"]) for i in items], str(path))
    page = (public / "index.html").read_text(encoding="utf-8")
    shown = [dt.fromisoformat(d) for d in regex.findall(r'<time datetime="([^"]+)"', page)]
    newest_first(shown, "index.html")
    assert checked >= 5
    titles = [e.title for e in fp.parse(public / "feed.atom").entries]
    approval = next(i for i, t in enumerate(titles) if t.startswith("EU approval for Elbmed"))
    assert approval < titles.index(
        "Zweiter Fonds: Hanse Innovationsfonds II startet mit 120 Mio. Euro"
    )
