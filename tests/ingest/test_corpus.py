"""Every hostile or broken feed of the corpus, through the whole pipeline, next to a good feed.

Each case is served over real HTTP on 127.0.0.1 beside a well-behaved partner feed;
one cycle fetches, stores, publishes the Atom feed and mails a digest into a Maildir.
Whatever the case, nothing crashes, the good feed's items are all stored and published
as if the bad one were not there, the published feed is valid Atom, and nothing a
partner wrote reaches the output as markup, a script URL or a mail header. What each
case must leave behind (items recovered, the reason recorded for the operator, titles,
links, dates) is spelled out in ``tests/data/corpus/cases.toml``; the cases too large
to commit (a 5 MB item, 10,000 items) are generated here, and the feed that changes its
GUIDs on every fetch has tests of its own.

``pytest -rP tests/ingest/test_corpus.py`` shows the time each case took.
"""

from __future__ import annotations

import asyncio
import email
import re
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

import feedparser
import lxml.html
import pytest

from clusterfeed.app.sequences import CycleReport, cycle
from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.model import FeedStatus, Story
from clusterfeed.store import Store
from tests.conftest import DATA, EXAMPLE_FEEDS, FeedServer, Route, write_config

CORPUS = DATA / "corpus"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
PARTNER = "Partner unter Test"
GOOD = "KristallWerk Discovery"
GOOD_FILE = EXAMPLE_FEEDS / "kristallwerk.atom"


# -- what a case expects -------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What one case must leave in the store and the feed's status (see cases.toml)."""

    items: int | None = None
    min_items: int = 0
    reason: str = "none"  # "error", "warning" or "none"
    reason_contains: str | None = None
    titles: tuple[str, ...] = ()
    links: Mapping[str, str] = field(default_factory=dict)
    published: Mapping[str, str] = field(default_factory=dict)
    images: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    id: str
    make_body: Callable[[Path], bytes]
    content_type: str
    language: str
    expect: Expect
    about: str = ""
    # Fetch a second time and check nothing is new. Not for the generated giants: it
    # only parses the same document again, and costs more time than it shows.
    refetch: bool = True


def _file_case(entry: Mapping[str, Any]) -> Case:
    path = CORPUS / entry["file"]
    return Case(
        id=entry["id"],
        make_body=lambda _tmp: path.read_bytes(),
        content_type=entry["content_type"],
        language=entry["language"],
        about=entry.get("about", ""),
        expect=Expect(
            items=entry.get("items"),
            min_items=entry.get("min_items", 0),
            reason=entry.get("reason", "none"),
            reason_contains=entry.get("reason_contains"),
            titles=tuple(entry.get("titles", ())),
            links=entry.get("links", {}),
            published=entry.get("published", {}),
            images=entry.get("images", {}),
        ),
    )


def _rss(items: list[str], title: str, link: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<rss version="2.0"><channel>'
        f"<title>{escape(title)}</title><link>{escape(link)}</link>"
        "<description>Meldungen</description><language>de</language>\n"
        + "\n".join(items)
        + "\n</channel></rss>\n"
    ).encode()


def _item(guid: str, title: str, link: str, when: datetime, description: str = "") -> str:
    return (
        f"<item><title>{escape(title)}</title><link>{escape(link)}</link>"
        f'<guid isPermaLink="false">{escape(guid)}</guid>'
        f"<pubDate>{when.strftime('%a, %d %b %Y %H:%M:%S +0000')}</pubDate>"
        f"<description>{escape(description)}</description></item>"
    )


HUGE_TITLE = "Jahresbericht 2026 des Biobanken-Verbunds Nord mit allen Probenstatistiken"


def huge_item_feed(tmp_path: Path) -> bytes:
    """Three items, one of them about 5 MB of HTML (a report pasted whole into the feed)."""
    row = (
        "<tr><td>Kohorte Kiel-Nord</td><td>Serum</td><td>12.480</td>"
        "<td>−80 °C</td><td>Zugang nach Ethikvotum</td></tr>"
    )
    rows = row * (5_000_000 // len(escape(row).encode()))  # as it is written in the XML
    report = f"<p>Übersicht der Bestände aller Standorte.</p><table>{rows}</table>"
    base = "https://www.biobanken-nord.example/berichte/"
    body = _rss(
        [
            _item(
                "bbn-2026-90",
                HUGE_TITLE,
                base + "jahresbericht-2026",
                NOW - timedelta(days=1),
                report,
            ),
            _item(
                "bbn-2026-89",
                "Neue Probenannahme in Flensburg",
                base + "probenannahme-flensburg",
                NOW - timedelta(days=3),
                "<p>Ab Dezember auch samstags.</p>",
            ),
            _item(
                "bbn-2026-88",
                "Biobanken-Verbund Nord tritt europäischem Netzwerk bei",
                base + "europa",
                NOW - timedelta(days=9),
                "<p>Der Beitritt erleichtert den Probenaustausch.</p>",
            ),
        ],
        "Biobanken-Verbund Nord",
        base,
    )
    assert 5_000_000 < len(body) < 6_000_000
    path = tmp_path / "huge-item.rss"  # generated, not committed: 5 MB in git helps no one
    path.write_bytes(body)
    return path.read_bytes()


def many_items_feed(tmp_path: Path, count: int = 10_000) -> bytes:
    """A partner that publishes its whole archive, 10,000 items, older than the good feed's."""
    start = datetime(2025, 1, 1, 8, 0, tzinfo=UTC)
    base = "https://www.archiv-biotech.example/meldungen/"
    items = [
        _item(
            f"abt-{n:05d}",
            f"Meldung {n}: Laborgeräte-Sammelbestellung für Mitglieder, Los {n % 97}",
            f"{base}{n:05d}",
            start + timedelta(hours=n),
            f"<p>Bestellfenster {n}, Lieferung im Folgemonat.</p>",
        )
        for n in range(count)
    ]
    body = _rss(items, "Archiv Biotech Nord", base)
    path = tmp_path / "many-items.rss"
    path.write_bytes(body)
    return path.read_bytes()


GENERATED = [
    Case(
        id="huge-item-5mb",
        make_body=huge_item_feed,
        content_type="application/rss+xml",
        language="de",
        about="one item of about 5 MB, under the default fetch.max_bytes of 10 MB",
        refetch=False,
        expect=Expect(
            items=3,
            titles=(HUGE_TITLE, "Neue Probenannahme in Flensburg"),
            published={HUGE_TITLE: (NOW - timedelta(days=1)).isoformat()},
        ),
    ),
    Case(
        id="ten-thousand-items",
        make_body=many_items_feed,
        content_type="application/rss+xml",
        language="de",
        about="10,000 items in one document",
        refetch=False,
        expect=Expect(items=10_000),
    ),
]


def load_cases() -> list[Case]:
    with (CORPUS / "cases.toml").open("rb") as handle:
        manifest = tomllib.load(handle)
    return [_file_case(entry) for entry in manifest["case"]] + GENERATED


CASES = load_cases()


def test_every_corpus_file_has_a_case() -> None:
    """A file dropped into the corpus without saying what it should produce is a mistake."""
    with (CORPUS / "cases.toml").open("rb") as handle:
        described = {entry["file"] for entry in tomllib.load(handle)["case"]}
    present = {p.name for p in CORPUS.iterdir() if p.name != "cases.toml"}
    assert present == described


# -- running the pipeline ------------------------------------------------------------------


@dataclass
class Run:
    folder: Path
    service: Service
    report: CycleReport
    seconds: float

    @property
    def statuses(self) -> dict[str, FeedStatus]:
        return {s.name: s for s in self.service.store.feed_statuses()}

    def atom_bytes(self) -> bytes:
        return (self.folder / "public" / "feed.atom").read_bytes()

    def mails(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted((self.folder / "mail" / "new").iterdir())]

    def stories_of(self, feed: str, limit: int = 200) -> list[Story]:
        return [
            s
            for s in self.service.store.recent_stories(limit=limit)
            if s.sources[0].feed_name == feed
        ]


def start_service(
    folder: Path, partner_url: str, good_url: str, database_url: str, language: str
) -> Service:
    config = load_config(
        write_config(
            folder,
            [
                {"name": PARTNER, "url": partner_url, "language": language, "topics": ["research"]},
                {"name": GOOD, "url": good_url, "language": "en", "topics": ["drug-discovery"]},
            ],
            database_url=database_url,
        )
    )
    service = Service(config, Store(config.database_url), clock=lambda: NOW)
    service.prepare()
    return service


@pytest.fixture
def started() -> Iterator[list[Service]]:
    """Services a test started, closed after it (parsing processes, store connections)."""
    services: list[Service] = []
    yield services
    for service in services:
        service.close()
        service.store.close()


def run_case(
    tmp_path: Path,
    feed_server: FeedServer,
    database_url: str,
    started: list[Service],
    body: bytes,
    content_type: str,
    language: str,
) -> Run:
    # No validators: every fetch gets the whole document again, so a second fetch
    # really parses it again (and shows that identities are stable).
    feed_server.routes["/partner"] = Route(
        body, content_type=content_type, etag=False, last_modified=False
    )
    good_url = feed_server.serve_file("/good.atom", GOOD_FILE, content_type="application/atom+xml")
    service = start_service(tmp_path, feed_server.url("/partner"), good_url, database_url, language)
    started.append(service)
    began = time.perf_counter()
    report = asyncio.run(cycle(service, with_digest=True))
    return Run(tmp_path, service, report, time.perf_counter() - began)


# -- what must hold for every case ---------------------------------------------------------

GOOD_FEED = feedparser.parse(GOOD_FILE.read_bytes())
GOOD_TITLES = [e.title for e in GOOD_FEED.entries]
GOOD_LINKS = [e.link for e in GOOD_FEED.entries]

# Where a URL can make a browser or mail client run or load something.
URL_ATTRIBUTES = {"href", "src", "action", "formaction", "data", "cite", "background", "poster"}
SAFE_SCHEMES = {"http", "https", "mailto"}
ACTIVE_TAGS = {"script", "iframe", "frame", "object", "embed", "applet", "form", "base"}
# Words of the corpus's payloads: none may survive in any form, text included.
PAYLOAD_WORDS = ("<script", "onerror", "onload")
# A script URL in any attribute, however spelled. (A partner's "JaVaScRiPt&#58;x" href is
# resolved as a relative path by feedparser, into a harmless http URL that ends in
# "/JaVaScRiPt:x"; that is not a scheme, so it is not matched here.)
SCRIPT_URL = re.compile(r"""=\s*["']?\s*(?:javascript|vbscript|data)\s*:""", re.IGNORECASE)
MAIL_HEADERS = {
    "from",
    "to",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "precedence",
    "auto-submitted",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
}


def assert_harmless(text: str, where: str, *, html: bool, document: bool = False) -> None:
    """No payload word anywhere, and as HTML: no active element, handler or unsafe URL."""
    lower = text.lower()
    for word in PAYLOAD_WORDS:
        assert word not in lower, (
            f"{word!r} in {where}: …{text[max(0, lower.find(word) - 80) :][:200]}…"
        )
    script_url = SCRIPT_URL.search(text)
    assert script_url is None, f"script URL in {where}: {text[script_url.start() - 40 :][:120]}"
    if not html or not text.strip():
        return
    tree = (
        lxml.html.document_fromstring(text)
        if document
        else lxml.html.fragment_fromstring(text, create_parent="div")
    )
    for element in tree.iter():
        if not isinstance(element.tag, str):
            continue  # comments and processing instructions
        tag = element.tag.lower()
        assert tag not in ACTIVE_TAGS, f"<{tag}> in {where}"
        if not document:  # the digest's own template has <meta> and <style>; content may not
            assert tag not in ("meta", "style", "link", "svg", "math", "noscript"), (
                f"<{tag}> in {where}"
            )
        for name, value in element.attrib.items():
            assert not name.lower().startswith("on"), f"{name}= on <{tag}> in {where}"
            assert name.lower() != "style" or document, f"style= on <{tag}> in {where}"
            if name.lower() in URL_ATTRIBUTES:
                scheme = urlsplit(value.strip()).scheme.lower()
                assert scheme in SAFE_SCHEMES, f"{name}={value!r} on <{tag}> in {where}"


def assert_published_feed_is_clean(atom: bytes) -> feedparser.FeedParserDict:
    assert b"<script" not in atom.lower()
    # Parsed without feedparser's own sanitizing, to see exactly what a reader gets.
    raw = feedparser.parse(atom, sanitize_html=False, resolve_relative_uris=False)
    assert not raw.bozo, raw.get("bozo_exception")
    for entry in raw.entries:
        where = f"published entry {entry.get('title', '')!r}"
        assert "\n" not in entry.title and "\r" not in entry.title
        assert_harmless(entry.title, where + " title", html=False)
        assert_harmless(entry.get("summary", ""), where + " summary", html=False)
        for content in entry.get("content", []):
            assert_harmless(content.value, where + " content", html=True)
        for link in entry.get("links", []):
            assert urlsplit(link.href).scheme in ("http", "https"), link.href
    return raw


def assert_mail_is_clean(raw: bytes) -> EmailMessage:
    head = raw.split(b"\r\n\r\n", 1)[0]
    # Every line ends in CRLF, and every header line is one the digest writes: a bare
    # CR or LF, or a line such as "Bcc: victim@example.com", would be an injection.
    assert b"\r" not in head.replace(b"\r\n", b"") and b"\n" not in head.replace(b"\r\n", b"")
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            continue  # a folded continuation of the header above
        name = line.split(b":", 1)[0].decode("ascii", "replace").lower()
        assert name in MAIL_HEADERS, f"unexpected header line {line[:120]!r}"
    message = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    assert message["Bcc"] is None and message["Cc"] is None
    assert len(message.get_all("To") or []) == 1 and len(message.get_all("Subject") or []) == 1
    subject = str(message["Subject"])
    assert "\n" not in subject and "\r" not in subject
    assert_harmless(subject, "mail subject", html=False)
    for part in message.walk():
        if part.get_content_maintype() != "text":
            continue
        body = part.get_content()
        is_html = part.get_content_subtype() == "html"
        assert_harmless(
            body, f"mail {part.get_content_type()} part", html=is_html, document=is_html
        )
    return message


def text_part(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


def check_good_feed_unaffected(
    run: Run, published: feedparser.FeedParserDict, mail_text: str
) -> None:
    outcomes = {o.name: o for o in run.report.feeds}
    assert outcomes[GOOD].state == "new" and outcomes[GOOD].new_entries == len(GOOD_TITLES)
    status = run.statuses[GOOD]
    assert status.last_error is None and status.last_warning is None
    assert status.entries == len(GOOD_TITLES)
    by_link = {e.link: e.title for e in published.entries}
    for title, link in zip(GOOD_TITLES, GOOD_LINKS, strict=True):
        assert by_link.get(link) == title, f"good item {title!r} not published"
        assert f"* {title}\n" in mail_text, f"good item {title!r} not in the digest"


def check_expectations(
    run: Run, expect: Expect, published: feedparser.FeedParserDict, mail_text: str
) -> None:
    status = run.statuses[PARTNER]
    if expect.items is not None:
        assert status.entries == expect.items
    assert status.entries >= expect.min_items
    reason = {"error": status.last_error, "warning": status.last_warning}
    if expect.reason == "none":
        assert status.last_error is None, status.last_error
        assert status.last_warning is None, status.last_warning
    else:
        recorded = reason[expect.reason]
        assert recorded and recorded.strip(), f"no {expect.reason} recorded"
        assert "\n" not in recorded, "a reason is one line"
        if expect.reason_contains:
            assert expect.reason_contains in recorded, recorded
    if expect.reason == "error":
        outcome = {o.name: o for o in run.report.feeds}[PARTNER]
        assert outcome.state == "failed"

    stories = {s.entry.title: s.entry for s in run.stories_of(PARTNER)}
    for title in expect.titles:
        assert title in stories, f"{title!r} not among {sorted(stories)}"
    for title, link in expect.links.items():
        assert title in stories, f"{title!r} not among {sorted(stories)}"
        assert (stories[title].link or "") == link
    for title, image in expect.images.items():
        assert stories[title].image_url == image
    for title, when in expect.published.items():
        actual = stories[title].published
        if when == "now":
            assert actual == NOW, title
        elif len(when) == len("2026-10-15"):
            assert actual.date().isoformat() == when, title
        else:
            assert actual == datetime.fromisoformat(when), title

    # Everything stored is published and mailed (while it fits the feed's and digest's size).
    total = run.service.store.count_stories()
    assert len(published.entries) == min(total, run.service.config.publish.max_entries)
    published_titles = {e.title for e in published.entries}
    for title in [*expect.titles, *expect.links, *expect.published]:
        assert title in published_titles, f"{title!r} not published"
        assert f"* {title}\n" in mail_text, f"{title!r} not in the digest"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_corpus_case(
    case: Case,
    tmp_path: Path,
    feed_server: FeedServer,
    database_url: str,
    started: list[Service],
    record_property: pytest.RecordProperty,
) -> None:
    body = case.make_body(tmp_path)
    run = run_case(
        tmp_path, feed_server, database_url, started, body, case.content_type, case.language
    )
    record_property("cycle_seconds", round(run.seconds, 2))
    print(f"{case.id}: {len(body):,} bytes, first cycle {run.seconds:.2f} s")

    published = assert_published_feed_is_clean(run.atom_bytes())
    mails = run.mails()
    assert len(mails) == 1
    message = assert_mail_is_clean(mails[0])
    mail_text = text_part(message)
    check_good_feed_unaffected(run, published, mail_text)
    check_expectations(run, case.expect, published, mail_text)

    # Fetched again (the server sends the same bytes, no validators): nothing new.
    if not case.refetch:
        return
    entries, stories = run.service.store.count_entries(), run.service.store.count_stories()
    started = time.perf_counter()
    again = asyncio.run(run.service.fetch())
    print(f"{case.id}: second fetch {time.perf_counter() - started:.2f} s")
    assert all(o.new_entries == 0 and o.updated_entries == 0 for o in again)
    assert (run.service.store.count_entries(), run.service.store.count_stories()) == (
        entries,
        stories,
    )


# -- a feed that changes every GUID on every fetch -------------------------------------------


ROTATING_ITEMS = [
    ("Zellbank Kiel erhält GMP-Zertifikat", "gmp-zertifikat", 2),
    ("Workshop: Organoide in der Wirkstoffprüfung", "workshop-organoide", 5),
    ("Neue Geschäftsführerin für das Biotech-Zentrum", "geschaeftsfuehrung", 8),
]


def rotating_feed() -> bytes:
    """The same three items under brand-new GUIDs, as a CMS that mints GUIDs per request."""
    base = "https://www.zellbank-kiel.example/aktuelles/"
    return _rss(
        [
            _item(f"urn:uuid:{uuid.uuid4()}", title, base + slug, NOW - timedelta(days=age))
            for title, slug, age in ROTATING_ITEMS
        ],
        "Zellbank Kiel",
        base,
    )


def run_rotating(
    tmp_path: Path, feed_server: FeedServer, database_url: str, started: list[Service]
) -> tuple[Run, int, int]:
    """Two cycles; between them the served document changes every GUID, not the links."""
    run = run_case(
        tmp_path, feed_server, database_url, started, rotating_feed(), "application/rss+xml", "de"
    )
    first = run.service.store.count_stories()
    feed_server.routes["/partner"] = Route(
        rotating_feed(), content_type="application/rss+xml", etag=False, last_modified=False
    )
    run.report = asyncio.run(cycle(run.service, with_digest=True))
    return run, first, run.service.store.count_stories()


def test_rotating_guids_harm_nothing_else(
    tmp_path: Path, feed_server: FeedServer, database_url: str, started: list[Service]
) -> None:
    run, first, _second = run_rotating(tmp_path, feed_server, database_url, started)
    assert first == len(ROTATING_ITEMS) + len(GOOD_TITLES)
    published = assert_published_feed_is_clean(run.atom_bytes())
    for raw in run.mails():
        assert_mail_is_clean(raw)
    status = run.statuses[GOOD]
    assert status.last_error is None and status.entries == len(GOOD_TITLES)
    assert set(GOOD_LINKS) <= {e.link for e in published.entries}


def test_rotating_guids_do_not_grow_stories(
    tmp_path: Path, feed_server: FeedServer, database_url: str, started: list[Service]
) -> None:
    _run, first, second = run_rotating(tmp_path, feed_server, database_url, started)
    assert second == first, f"{second - first} new stories from a re-fetch of the same items"
