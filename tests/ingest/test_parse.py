"""Parsing: JSON Feed as input, and what parse_feed keeps of a broken XML document.

JSON Feed items become entries shaped like feedparser's, so ``normalize`` treats both
formats alike: the strongest check is that the same news item, once as RSS and once as
JSON Feed, normalizes to the same ``Entry``. Broken documents raise ``FeedParseError``
with a one-line reason, or are read with a warning; nothing else escapes. The last test
serves a JSON Feed over real HTTP and reads the published Atom feed back.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import feedparser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.ingest.normalize import normalize_entry
from clusterfeed.ingest.parse import FeedParseError, parse_feed, parse_json_feed
from clusterfeed.model import ParsedFeed
from clusterfeed.store import Store
from tests.conftest import DATA, FeedServer, Route, write_config

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
JSON_HEADERS = {"Content-Type": "application/feed+json"}
BASE = "https://www.genomics-hub.example/news/feed.json"


def json_feed(*items: dict[str, Any], **feed: Any) -> bytes:
    document = {
        "version": "https://jsonfeed.org/version/1.1",
        "title": "Hamburg Genomics Hub",
        "home_page_url": "https://www.genomics-hub.example/",
        "feed_url": BASE,
        **feed,
        "items": list(items),
    }
    return json.dumps(document, ensure_ascii=False).encode()


SEQUENCER = {
    "id": "hgh-2026-118",
    "url": "https://www.genomics-hub.example/news/long-read-capacity?utm_source=json",
    "title": "Sequencing facility doubles its long-read capacity",
    "content_html": '<p>Two new instruments.</p><img src="/img/sequencer.jpg" alt="Sequencer">',
    "summary": "Two new instruments cut waiting times <below> three weeks.",
    "date_published": "2026-11-24T09:00:00+01:00",
    "date_modified": "2026-11-24T10:30:00.250+01:00",
    "tags": ["Genomics", "Core Facilities"],
    "authors": [{"name": "Press Office"}, {"name": "Second Author"}],
    "image": "https://www.genomics-hub.example/img/hero.jpg",
}


def utc_struct(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> time.struct_time:
    return datetime(year, month, day, hour, minute, tzinfo=UTC).utctimetuple()


def entry_of(raw: dict[str, Any], base: str | None = BASE) -> Any:
    return normalize_entry(
        raw,
        feed_name="Hamburg Genomics Hub",
        feed_topics=["genomics"],
        feed_language="en",
        base_url=base,
        now=NOW,
    )


# -- JSON Feed: shape of the entries ------------------------------------------------------------


def test_json_feed_items_become_feedparser_shaped_entries() -> None:
    parsed = parse_feed(json_feed(SEQUENCER), JSON_HEADERS, BASE)

    assert parsed == ParsedFeed(
        title="Hamburg Genomics Hub",
        link="https://www.genomics-hub.example/",
        feed_id=BASE,
        entries=parsed.entries,
        warning=None,
    )
    (raw,) = parsed.entries
    assert raw["id"] == "hgh-2026-118"
    assert raw["link"] == SEQUENCER["url"]
    assert raw["title"] == SEQUENCER["title"]
    assert raw["content"] == [{"type": "text/html", "value": SEQUENCER["content_html"]}]
    assert raw["summary"] == SEQUENCER["summary"]
    assert raw["summary_detail"]["type"] == "text/plain"
    assert raw["published_parsed"] == utc_struct(2026, 11, 24, 8, 0)
    assert raw["updated_parsed"] == utc_struct(2026, 11, 24, 9, 30)
    assert raw["media_thumbnail"] == [{"url": SEQUENCER["image"]}]
    assert [t["term"] for t in raw["tags"]] == ["Genomics", "Core Facilities"]
    assert raw["author"] == "Press Office"


def test_json_feed_item_normalizes_like_the_same_item_in_rss() -> None:
    rss = f"""<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0" xmlns:media="http://search.yahoo.com/mrss/"><channel>
<title>Hamburg Genomics Hub</title><link>https://www.genomics-hub.example/</link>
<item>
  <guid isPermaLink="false">hgh-2026-118</guid>
  <link>{SEQUENCER["url"].replace("&", "&amp;")}</link>
  <title>{SEQUENCER["title"]}</title>
  <description>Two new instruments cut waiting times &amp;lt;below&amp;gt; three weeks.
  </description>
  <pubDate>Tue, 24 Nov 2026 09:00:00 +0100</pubDate>
  <category>Genomics</category><category>Core Facilities</category>
  <author>Press Office</author>
  <media:thumbnail url="{SEQUENCER["image"]}"/>
</item></channel></rss>""".encode()
    from_rss = entry_of(dict(parse_feed(rss, {}, BASE).entries[0]))
    from_json = entry_of(dict(parse_feed(json_feed(SEQUENCER), JSON_HEADERS, BASE).entries[0]))

    for field in ("identity", "guid", "link", "link_key", "title", "summary_text", "image_url"):
        assert getattr(from_json, field) == getattr(from_rss, field), field
    assert from_json.topics == from_rss.topics == ("core-facilities", "genomics")
    assert from_json.author == "Press Office"
    assert from_json.published == datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
    assert from_json.updated == datetime(2026, 11, 24, 9, 30, tzinfo=UTC)
    assert from_json.link == "https://www.genomics-hub.example/news/long-read-capacity"
    # The plain-text summary is escaped, never read as markup.
    assert (
        from_json.summary_html == "Two new instruments cut waiting times &lt;below&gt; three weeks."
    )
    assert 'src="https://www.genomics-hub.example/img/sequencer.jpg"' in from_json.content_html


def test_content_text_is_escaped_and_keeps_its_paragraphs() -> None:
    item = {
        "id": "1",
        "url": "https://www.genomics-hub.example/news/1",
        "content_text": "Apply by 15 January <apply@genomics-hub.example>.\n\nLine one\nline two",
    }
    raw = parse_json_feed(json_feed(item)).entries[0]
    entry = entry_of(dict(raw))

    assert entry.content_html == (
        "<p>Apply by 15 January &lt;apply@genomics-hub.example&gt;.</p><p>Line one<br>line two</p>"
    )
    assert (
        entry.summary_text == "Apply by 15 January <apply@genomics-hub.example>. Line one line two"
    )
    assert entry.title == "Apply by 15 January <apply@genomics-hub.example>. Line one line two"


def test_json_feed_1_0_author_and_numeric_ids() -> None:
    parsed = parse_feed((DATA / "corpus" / "jsonfeed-10.json").read_bytes(), {}, None)
    assert parsed.warning is None
    first = entry_of(dict(parsed.entries[0]), base=None)
    assert first.author == "広報室"
    assert first.published == datetime(2026, 11, 22, 5, 0, tzinfo=UTC)

    raw = parse_json_feed(json_feed({"id": 119, "url": "https://a.example/1"})).entries[0]
    assert raw["id"] == "119"
    raw = parse_json_feed(json_feed({"id": True, "url": "https://a.example/1"})).entries[0]
    assert "id" not in raw  # a boolean is no identity; the link is used instead


def test_external_url_and_banner_image_stand_in() -> None:
    item = {
        "external_url": "https://www.partner-journal.example/interview",
        "title": "Interview",
        "banner_image": "https://www.genomics-hub.example/img/banner.jpg",
        "attachments": [
            {"url": "https://www.genomics-hub.example/report.pdf", "mime_type": "application/pdf"}
        ],
    }
    entry = entry_of(dict(parse_json_feed(json_feed(item)).entries[0]))
    assert entry.link == "https://www.partner-journal.example/interview"
    assert entry.identity == "link:https://www.partner-journal.example/interview"
    assert entry.image_url == "https://www.genomics-hub.example/img/banner.jpg"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-24T09:00:00Z", utc_struct(2026, 11, 24, 9)),
        ("2026-11-24t09:00:00z", utc_struct(2026, 11, 24, 9)),
        ("2026-11-24T18:00:00+09:00", utc_struct(2026, 11, 24, 9)),
        ("2026-11-24T09:00:00.123456-00:30", utc_struct(2026, 11, 24, 9, 30)),
        ("2026-11-24T09:00:00", utc_struct(2026, 11, 24, 9)),  # no offset: taken as UTC
        ("2026-11-24", utc_struct(2026, 11, 24)),
        ("Tue, 24 Nov 2026 10:00:00 +0100", utc_struct(2026, 11, 24, 9)),  # RFC 822, leniently
    ],
)
def test_json_feed_dates(value: str, expected: time.struct_time) -> None:
    parsed = parse_json_feed(json_feed({"id": "1", "date_published": value}))
    assert parsed.entries[0]["published_parsed"] == expected
    assert parsed.warning is None


@pytest.mark.parametrize("value", ["next Tuesday", "2026-13-45T99:00:00Z", 1732000000, ""])
def test_unreadable_json_feed_date_is_a_warning_and_means_first_seen(value: Any) -> None:
    parsed = parse_json_feed(json_feed({"id": "1", "date_published": value}))
    assert "published_parsed" not in parsed.entries[0]
    if value == "":
        assert parsed.warning is None  # empty is missing, not wrong
    else:
        assert parsed.warning and "unreadable date_published" in parsed.warning
    assert entry_of(dict(parsed.entries[0])).published == NOW


# -- JSON Feed: detection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "content_type"),
    [
        (b"", "application/feed+json"),
        (b"", "application/json; charset=utf-8"),
        (b"\xef\xbb\xbf  \n", "application/feed+json"),  # a BOM and blank lines
        (b"", "text/plain"),  # misdeclared, but no XML document starts with "{"
        (b"\n", "application/rss+xml"),
        (b"", ""),
    ],
)
def test_json_feed_is_recognized(prefix: bytes, content_type: str) -> None:
    parsed = parse_feed(prefix + json_feed(SEQUENCER), {"Content-Type": content_type}, BASE)
    assert [e["title"] for e in parsed.entries] == [SEQUENCER["title"]]


def test_xml_served_as_json_is_still_read_as_xml() -> None:
    body = (DATA / "corpus" / "rss-10.rdf").read_bytes()
    parsed = parse_feed(body, {"Content-Type": "application/json"}, None)
    assert len(parsed.entries) == 3


# -- JSON Feed: what is not a feed --------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"version": "https://jsonfeed.org/version/1.1", "items": [', "not valid JSON:"),
        (b"{'single': 'quotes'}", "not valid JSON:"),
        (b'{"items": [{"title": "\xff\xfe caf\xe9"}]}', "not valid JSON: the bytes are not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # JSON, but nested too deeply
        (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"items": [], "n": ' + b"9" * 5000 + b"}", "not valid JSON:"),  # over-long integer
        (b'["https://jsonfeed.org/version/1.1"]', "a JSON list, not an object"),
        (b'{"version": "https://jsonfeed.org/version/1.1", "title": "x"}', 'no "items" list'),
        (b'{"version": "https://jsonfeed.org/version/1.1", "items": {"a": 1}}', 'no "items" list'),
        (b'{"error": "rate limited"}', 'no "items" list'),
    ],
)
def test_what_is_no_json_feed_says_why_in_one_line(body: bytes, reason: str) -> None:
    with pytest.raises(FeedParseError) as caught:
        parse_feed(body, {"Content-Type": "application/json"}, BASE)
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message and len(message) < 300


def test_spec_breaches_that_leave_items_are_warnings() -> None:
    body = json.dumps(
        {
            "version": "1.1",
            "title": ["not", "text"],
            "items": [
                "a string",
                None,
                {
                    "id": "ok",
                    "url": "https://a.example/1",
                    "title": 42,
                    "tags": "not-a-list",
                    "authors": "not-a-list",
                    "summary": {"x": 1},
                    "attachments": ["x", {"url": 3}],
                },
            ],
        }
    ).encode()
    parsed = parse_json_feed(body)
    assert parsed.title is None
    assert len(parsed.entries) == 1
    assert parsed.warning is not None
    assert "no JSON Feed \"version\" (got '1.1')" in parsed.warning
    assert "skipped 2 item(s) that are not JSON objects" in parsed.warning
    entry = entry_of(dict(parsed.entries[0]))
    assert entry.title == "https://a.example/1"  # no usable title or text: the link
    assert entry.topics == ("genomics",)


def test_lone_surrogates_and_nul_cannot_break_hashing_or_storage() -> None:
    body = (
        b'{"version": "https://jsonfeed.org/version/1.1", "items": [{"id": "a\\ud800",'
        b' "url": "https://a.example/x\\u0000y",'
        b' "title": "Watt \\ud83e\\uddeb \\udc00 NUL\\u0000!",'
        b' "content_html": "<p>x\\u0000\\udfff</p>"}]}'
    )
    raw = parse_json_feed(body).entries[0]
    assert raw["title"] == "Watt \U0001f9eb \ufffd NUL\x00!"  # a valid pair stays one character
    entry = entry_of(dict(raw))
    assert entry.title == "Watt \U0001f9eb \ufffd NUL !"
    assert entry.guid == "a\ufffd"
    for text in (entry.title, entry.content_html, entry.link or "", entry.identity):
        text.encode("utf-8")  # would raise on a surrogate
        assert "\x00" not in text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=15), children, max_size=4)
    ),
    max_leaves=20,
)
item_keys = st.sampled_from(
    [
        "id", "url", "external_url", "title", "content_html", "content_text", "summary",
        "image", "banner_image", "date_published", "date_modified", "authors", "author",
        "tags", "attachments", "language",
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(
        st.dictionaries(item_keys, json_values | st.text(max_size=80), max_size=10) | json_values,
        max_size=4,
    ),
    version=json_values,
)
def test_any_json_is_a_feed_or_a_parse_error_never_a_crash(items: Any, version: Any) -> None:
    body = json.dumps({"version": version, "items": items}).encode()
    try:
        parsed = parse_feed(body, JSON_HEADERS, BASE)
    except FeedParseError:
        return
    for raw in parsed.entries:
        entry = entry_of(dict(raw))
        assert "\n" not in entry.title and entry.title
        assert entry.link is None or entry.link.startswith(("http://", "https://"))


# -- broken XML ---------------------------------------------------------------------------------


def test_truncated_document_keeps_the_complete_items_only() -> None:
    parsed = parse_feed((DATA / "corpus" / "truncated.rss").read_bytes(), {}, None)
    assert [e["title"] for e in parsed.entries] == [
        "Rostocker Labor entwickelt Schnelltest für Vibrionen im Badewasser",
        "Greifswalder Plasmamedizin erhält EU-Förderung",
    ]
    assert parsed.warning is not None
    assert parsed.warning.startswith("SAXParseException")
    assert parsed.warning.endswith("the document ends inside an item, which was skipped")


@pytest.mark.parametrize(
    "cut",
    [
        b"<item><title>Dritte Meldung</title><link>https://a.example/3</li",
        b"<item><title>Dritte Meldung</title><guid>g-3</guid><description>Am 3. Dez",
        b"<item>",
        b"<item><title>Dritte",
    ],
)
def test_truncated_in_any_part_of_an_item(cut: bytes) -> None:
    head = (
        b'<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>T</title>'
        b"<item><title>Eins</title><link>https://a.example/1</link></item>"
        b"<item><title>Zwei</title><link>https://a.example/2</link></item>"
    )
    parsed = parse_feed(head + cut, {}, None)
    assert [e["title"] for e in parsed.entries] == ["Eins", "Zwei"]


def test_truncated_atom_and_unclosed_root_with_complete_entries() -> None:
    atom = (
        b'<?xml version="1.0" encoding="utf-8"?><feed xmlns="http://www.w3.org/2005/Atom">'
        b"<title>T</title><entry><title>Eins</title><id>urn:x:1</id></entry>"
        b"<entry><title>Zw"
    )
    assert [e["title"] for e in parse_feed(atom, {}, None).entries] == ["Eins"]
    # Cut after a complete item: nothing is dropped.
    rss = (
        b'<?xml version="1.0"?><rss version="2.0"><channel><title>T</title>'
        b"<item><title>Eins</title></item><item><title>Zwei</title></item>"
    )
    parsed = parse_feed(rss, {}, None)
    assert [e["title"] for e in parsed.entries] == ["Eins", "Zwei"]
    assert parsed.warning and "ends inside an item" not in parsed.warning


def test_well_formed_but_bozo_document_keeps_every_item() -> None:
    parsed = parse_feed((DATA / "corpus" / "html-entities.rss").read_bytes(), {}, None)
    assert len(parsed.entries) == 3
    assert parsed.warning and "undefined entity" in parsed.warning
    assert "ends inside an item" not in parsed.warning


# -- through the pipeline -------------------------------------------------------------------------


@pytest.fixture
def service_for(tmp_path: Path, database_url: str) -> Iterator[Any]:
    started: list[Service] = []

    def make(feeds: list[dict[str, Any]]) -> Service:
        config = load_config(write_config(tmp_path, feeds, database_url=database_url))
        service = Service(config, Store(config.database_url), clock=lambda: NOW)
        service.prepare()
        started.append(service)
        return service

    yield make
    for service in started:
        service.close()
        service.store.close()


def test_json_feed_over_http_is_published_in_the_atom_feed(
    feed_server: FeedServer, service_for: Any
) -> None:
    feed_server.routes["/news/feed.json"] = Route(
        (DATA / "corpus" / "jsonfeed-11.json").read_bytes(), content_type="application/feed+json"
    )
    service = service_for(
        [
            {
                "name": "Hamburg Genomics Hub",
                "url": feed_server.url("/news/feed.json"),
                "language": "en",
                "topics": ["genomics"],
            }
        ]
    )

    outcomes = asyncio.run(service.fetch())
    assert [(o.state, o.new_entries, o.message) for o in outcomes] == [("new", 4, None)]
    assert service.publish()

    published = feedparser.parse(service.feed_path().read_bytes())
    assert not published.bozo
    by_title = {e.title: e for e in published.entries}
    assert set(by_title) == {
        "Sequencing facility doubles its long-read capacity",
        "Call for pilot projects: a single-cell atlas of North Sea cod",
        "Genome data day: registration open Bcc: victim@example.com",
        "Interview: why a cluster runs its own sequencing core",
    }
    sequencer = by_title["Sequencing facility doubles its long-read capacity"]
    assert sequencer.link == "https://www.genomics-hub.example/news/long-read-capacity"
    assert calendar.timegm(sequencer.published_parsed) == calendar.timegm(
        utc_struct(2026, 11, 24, 8, 0)
    )
    assert "<script" not in sequencer.content[0].value
    assert 'src="https://www.genomics-hub.example/img/sequencer-hero.jpg"' in (
        sequencer.content[0].value
    )
    assert {t.term for t in sequencer.tags} >= {"genomics", "infrastructure"}
    cod = by_title["Call for pilot projects: a single-cell atlas of North Sea cod"]
    assert calendar.timegm(cod.published_parsed) == calendar.timegm(
        utc_struct(2026, 11, 20, 16, 30)
    )
    assert calendar.timegm(cod.updated_parsed) >= calendar.timegm(utc_struct(2026, 11, 21, 8, 0))
    interview = by_title["Interview: why a cluster runs its own sequencing core"]
    assert (
        interview.link == "https://www.partner-journal.example/2026/11/hamburg-genomics-interview"
    )
    # The javascript: url is no link at all, and a date in 2099 is clamped to now.
    data_day = by_title["Genome data day: registration open Bcc: victim@example.com"]
    assert not [link for link in data_day.get("links", []) if link.get("rel") == "alternate"]
    assert calendar.timegm(data_day.published_parsed) == calendar.timegm(NOW.utctimetuple())

    # Read again (the server answers 304): nothing new, nothing changed.
    again = asyncio.run(service.fetch())
    assert [(o.state, o.new_entries) for o in again] == [("unchanged", 0)]
    assert not service.publish()
