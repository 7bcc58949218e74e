"""Parsing and normalizing: clean links, identities, dates, safe HTML, pictures, encodings.

The pure functions get unit and property tests (hypothesis); the behaviour a reader
sees (one story per press release, Japanese titles, no scripts) is checked through
``Service.fetch`` with the feed files in ``tests/data`` and the bundled examples.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import lxml.etree
import lxml.html
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterfeed.app.service import FeedOutcome, Service
from clusterfeed.config import load_config
from clusterfeed.ingest.normalize import (
    ALLOWED_ATTRIBUTES,
    ALLOWED_TAGS,
    clean_title,
    entry_dates,
    entry_identity,
    entry_image,
    html_to_text,
    link_key,
    normalize_entries,
    normalize_url,
    sanitize_html,
    single_line,
    stated_date,
)
from clusterfeed.ingest.parse import parse_feed
from clusterfeed.model import Entry, Story
from clusterfeed.store import Store
from tests.conftest import DATA, EXAMPLE_FEEDS, Clock, FeedServer, Route, write_config

NOW = datetime(2026, 11, 26, 7, 0, tzinfo=UTC)
HAFEN = DATA / "hafen-campus.rss"
NORDLICHT = DATA / "nordlicht-diagnostics.atom"
OSAKA = DATA / "osaka-saibo.rss"
KANSAI = EXAMPLE_FEEDS / "kansai-bio.rss"
HAFEN_SITE = "https://www.hafen-campus.example"

# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def make_service(tmp_path: Path, database_url: str, clock: Clock) -> Iterator[Any]:
    stores: list[Store] = []

    def make(feeds: list[dict[str, Any]]) -> Service:
        config = load_config(write_config(tmp_path, feeds, database_url=database_url))
        store = Store(config.database_url)
        stores.append(store)
        service = Service(config, store, clock=clock)
        service.prepare()
        return service

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def hafen_file(tmp_path: Path) -> Path:
    """A copy of the Hafen Campus feed the test may edit, read as a local file feed."""
    target = tmp_path / "feeds" / HAFEN.name
    target.parent.mkdir()
    shutil.copy(HAFEN, target)
    return target


def hafen_feed(path: Path) -> dict[str, Any]:
    return {
        "name": "Life Science Campus Hafen",
        "url": str(path),
        "site": HAFEN_SITE,
        "language": "de",
        "topics": ["research"],
    }


def fetch(service: Service) -> dict[str, FeedOutcome]:
    return {o.name: o for o in asyncio.run(service.fetch())}


def entries_by_title(service: Service) -> dict[str, Entry]:
    """The stored entry shown for each story, by title (one feed: every entry)."""
    result = {}
    for story in service.store.recent_stories():
        result[story.entry.title] = story.entry
    return result


def story_titled(service: Service, title: str) -> Story:
    (story,) = [s for s in service.store.recent_stories() if s.entry.title == title]
    return story


def parse_file(path: Path, base: str | None = None, now: datetime = NOW) -> list[Entry]:
    parsed = parse_feed(path.read_bytes(), {"content-type": "application/xml"}, base)
    return normalize_entries(
        parsed.entries,
        feed_name=path.stem,
        feed_topics=["research"],
        feed_language="de",
        base_url=base,
        now=now,
    )


# -- URL normalization ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            "https://www.helixvektor.example/press/2026/coastline-acquisition.html"
            "?utm_source=newsletter&utm_medium=email",
            "https://www.helixvektor.example/press/2026/coastline-acquisition.html",
            id="utm",
        ),
        pytest.param(
            "https://www.elbmed.example/presse/tovanerib?fbclid=IwAR3x&id=2207&gclid=Cj0&UTM_Term=x",
            "https://www.elbmed.example/presse/tovanerib?id=2207",
            id="fbclid-gclid-keeps-real-params",
        ),
        pytest.param(
            "https://WWW.HELIXVEKTOR.EXAMPLE/press/2026/coastline-acquisition.html#pressemitteilung",
            "https://www.helixvektor.example/press/2026/coastline-acquisition.html",
            id="host-case-and-fragment",
        ),
        pytest.param(
            "HTTPS://www.kansai-bio.example:443/news/",
            "https://www.kansai-bio.example/news/",
            id="scheme-case-default-https-port",
        ),
        pytest.param(
            "http://www.uk-foerde.example:80/presse",
            "http://www.uk-foerde.example/presse",
            id="default-http-port",
        ),
        pytest.param(
            "https://www.uk-foerde.example:8443/presse",
            "https://www.uk-foerde.example:8443/presse",
            id="other-port-kept",
        ),
        pytest.param(
            "https://www.kristallwerk.example", "https://www.kristallwerk.example/", id="empty-path"
        ),
        pytest.param(
            "https://www.kansai-bio.example/news/2026/神戸.html",
            "https://www.kansai-bio.example/news/2026/%E7%A5%9E%E6%88%B8.html",
            id="non-ascii-path-quoted",
        ),
        pytest.param(
            "https://www.lübeck-campus.example/news",
            "https://www.xn--lbeck-campus-dlb.example/news",
            id="idn-host",
        ),
        pytest.param(
            "  https://www.nordbio.example/de/aktuelles/  ",
            "https://www.nordbio.example/de/aktuelles/",
            id="whitespace",
        ),
    ],
)
def test_normalize_url(raw: str, expected: str) -> None:
    assert normalize_url(raw) == expected


def test_normalize_url_resolves_relative_links() -> None:
    base = "https://www.nordbio.example/de/aktuelles/index.html"
    assert normalize_url("/news/newsletter-abo.html", base) == (
        "https://www.nordbio.example/news/newsletter-abo.html"
    )
    assert normalize_url("webinar.html?utm_campaign=x", base) == (
        "https://www.nordbio.example/de/aktuelles/webinar.html"
    )


@pytest.mark.parametrize(
    "raw",
    [
        "javascript:alert(document.cookie)",
        " JavaScript:alert(1)",
        "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
        "mailto:presse@nordbio.example",
        "ftp://ftp.nordbio.example/pressemappe.zip",
        "file:///etc/passwd",
        "",
        "   ",
        "https://",
        "http://[::1",
        "https://www.nordbio.example:99999/",
    ],
)
def test_normalize_url_refuses_what_is_no_web_link(raw: str) -> None:
    assert normalize_url(raw) is None


def test_link_key_joins_scheme_www_and_trailing_slash() -> None:
    variants = [
        "https://www.hafen-campus.example/presse/2026/nordlicht-labor/",
        "http://hafen-campus.example/presse/2026/nordlicht-labor",
        "https://hafen-campus.example/presse/2026/nordlicht-labor/",
        "http://www.hafen-campus.example/presse/2026/nordlicht-labor",
    ]
    keys = {link_key(normalize_url(v)) for v in variants}
    assert keys == {"hafen-campus.example/presse/2026/nordlicht-labor"}


def test_link_key_keeps_different_pages_apart() -> None:
    teil_1 = "https://www.nordbio.example/de/veranstaltungen/webinar-gentherapie-teil-1.html"
    teil_2 = "https://www.nordbio.example/de/veranstaltungen/webinar-gentherapie-teil-2.html"
    assert link_key(teil_1) != link_key(teil_2)
    assert link_key("https://www.nordbio.example/news?id=1") != link_key(
        "https://www.nordbio.example/news?id=2"
    )
    assert link_key("https://www.nordbio.example:8443/a") != link_key(
        "https://www.nordbio.example/a"
    )
    assert link_key(None) is None


TRACKING = ["utm_source", "utm_medium", "utm_campaign", "fbclid", "gclid", "mc_eid", "pk_kwd"]
hosts = st.sampled_from(
    [
        "www.nordbio.example",
        "WWW.Helixvektor.Example",
        "kansai-bio.example",
        "www.lübeck-campus.example",
        "127.0.0.1",
        "[::1]",
        "uk-foerde.example.",
    ]
)
schemes = st.sampled_from(["http", "https", "HTTP", "HtTpS", "javascript", "ftp", "mailto", "data"])
path_text = st.text(
    alphabet=st.sampled_from(list("abcxyz019-_.~%/ äö神戸:@!$&'()*+,;=?#")), max_size=20
)
params = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(TRACKING), st.text(alphabet="abcdeUTM_", min_size=1, max_size=6)),
        st.text(alphabet="abc 123äö/?=&+%", max_size=6),
    ),
    max_size=4,
)


@st.composite
def web_urls(draw: st.DrawFn) -> str:
    """URLs as partners write them: odd case, ports, tracking params, fragments, junk."""
    scheme = draw(schemes)
    host = draw(hosts)
    port = draw(st.sampled_from(["", ":80", ":443", ":8080", ":0"]))
    path = "/" + draw(path_text)
    query = "&".join(f"{k}={v}" for k, v in draw(params))
    fragment = draw(st.sampled_from(["", "#top", "#pressemitteilung"]))
    return f"{scheme}://{host}{port}{path}{'?' + query if query else ''}{fragment}"


any_urls = st.one_of(web_urls(), st.text(max_size=40))


@settings(max_examples=400, deadline=None)
@given(any_urls)
def test_normalize_url_is_idempotent(url: str) -> None:
    once = normalize_url(url)
    if once is not None:
        assert normalize_url(once) == once


@settings(max_examples=400, deadline=None)
@given(any_urls, st.sampled_from([None, "https://www.nordbio.example/de/aktuelles/"]))
def test_normalize_url_only_returns_clean_web_links(url: str, base: str | None) -> None:
    result = normalize_url(url, base)
    if result is None:
        return
    parts = urlsplit(result)
    assert parts.scheme in {"http", "https"}
    assert parts.hostname
    assert parts.hostname == parts.hostname.lower()
    assert "#" not in result
    for key, _ in parse_qsl(parts.query, keep_blank_values=True):
        assert not key.lower().startswith(("utm_", "pk_")), result
        assert key.lower() not in {"fbclid", "gclid", "mc_eid"}, result
    assert not any(ch.isspace() for ch in result)


@settings(max_examples=200, deadline=None)
@given(web_urls())
def test_link_key_ignores_scheme_and_www(url: str) -> None:
    normalized = normalize_url(url)
    if normalized is None:
        return
    parts = urlsplit(normalized)
    host = parts.netloc.removeprefix("www.")
    for variant_scheme in ("http", "https"):
        for variant_host in (host, f"www.{host}"):
            variant = parts._replace(scheme=variant_scheme, netloc=variant_host).geturl()
            assert link_key(variant) == link_key(normalized)


# -- sanitizing ---------------------------------------------------------------------------


HELIX_BAD_HTML = (
    "<p>Our new 600 m² cleanroom suite lets us produce AAV vectors.</p>"
    '<img src="https://www.helixvektor.example/newsroom/img/cleanroom-inside.jpg" alt="Cleanroom"'
    ' onerror="alert(1)"><script>alert(1)</script><p><a href="https://www.helixvektor.example/'
    'newsroom/2026/gmp-cleanrooms.html" onclick="alert(1)">Take the virtual tour</a></p>'
)


def test_sanitize_removes_scripts_and_handlers_but_keeps_links_and_images() -> None:
    clean = sanitize_html(HELIX_BAD_HTML)
    assert "script" not in clean
    assert "alert" not in clean
    assert "onerror" not in clean and "onclick" not in clean
    assert '<a href="https://www.helixvektor.example/newsroom/2026/gmp-cleanrooms.html"' in clean
    assert 'rel="noopener noreferrer nofollow"' in clean
    assert 'src="https://www.helixvektor.example/newsroom/img/cleanroom-inside.jpg"' in clean
    assert 'alt="Cleanroom"' in clean
    assert "Take the virtual tour</a>" in clean
    assert "<p>Our new 600 m² cleanroom suite" in clean


@pytest.mark.parametrize(
    "attack",
    [
        '<a href="javascript:alert(1)">Bildergalerie</a>',
        '<a href="JaVaScRiPt:alert(1)">Bildergalerie</a>',
        '<a href="&#106;avascript:alert(1)">Bildergalerie</a>',
        '<a href="java&#x09;script:alert(1)">Bildergalerie</a>',
        '<a href=" javascript:alert(1)">Bildergalerie</a>',
        '<a href="vbscript:msgbox(1)">Bildergalerie</a>',
        '<a href="data:text/html;base64,PHNjcmlwdD4=">Bildergalerie</a>',
        # What feedparser leaves where it removed a javascript: URL: not a link either.
        '<a href="">Bildergalerie</a>',
    ],
)
def test_sanitize_drops_unsafe_and_empty_link_targets(attack: str) -> None:
    clean = sanitize_html(attack, "https://www.hafen-campus.example/presse/2026/nordlicht-labor/")
    assert "href" not in clean
    assert "Bildergalerie" in clean


@pytest.mark.parametrize(
    "attack",
    [
        "<iframe src='https://evil.example/'>x</iframe>",
        "<style>body{display:none}</style>",
        "<object data='x.swf'>x</object>",
        "<svg onload=alert(1)><circle/></svg>",
        "<form action='https://evil.example/'><input name=pw></form>",
        '<p style="background:url(javascript:alert(1))">',
        "<img src=x onerror=alert(1)//>",
        "<<script>script>alert(1)<</script>/script>",
        "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
        "<!-- <script>alert(1)</script> -->",
    ],
)
def test_sanitize_strips_active_content(attack: str) -> None:
    clean = sanitize_html(f"<p>Pressemitteilung</p>{attack}", "https://www.nordbio.example/")
    lowered = clean.lower()
    assert "<script" not in lowered
    assert not re.search(r"<(iframe|style|object|svg|form|input|math)\b", lowered)
    assert not re.search(r"\son\w+\s*=", lowered)
    assert "javascript:" not in lowered
    assert "style=" not in lowered
    assert "Pressemitteilung" in clean


def test_sanitize_resolves_relative_links_and_images() -> None:
    clean = sanitize_html(
        '<p><a href="/de/newsletter/2026-11.html">Newsletter im Browser lesen</a>'
        '<img src="img/team.jpg" alt="Team"><a href="mailto:presse@nordbio.example">Presse</a></p>',
        "https://www.nordbio.example/de/aktuelles/absichtserklaerung-kobe.html",
    )
    assert 'href="https://www.nordbio.example/de/newsletter/2026-11.html"' in clean
    assert 'src="https://www.nordbio.example/de/aktuelles/img/team.jpg"' in clean
    assert 'href="mailto:presse@nordbio.example"' in clean


ATTACK_ATTRIBUTES = [
    'href="javascript:alert(1)"',
    'href="JAVASCRIPT:alert(1)"',
    'href="&#106;avascript:alert(1)"',
    'src="java&#x0A;script:alert(1)"',
    'src="vbscript:x"',
    'href="data:text/html,x"',
    'onerror="alert(1)"',
    "onload=alert(1)",
    'ONCLICK="x()"',
    'onmouseover="x()"',
    'style="color:red"',
    'href="/relative/seite.html"',
    'href="https://www.nordbio.example/a"',
    'src="https://www.nordbio.example/b.jpg"',
    'href="mailto:presse@nordbio.example"',
    'alt="Bild"',
    'title="Hinweis"',
]
ATTACK_TAGS = [
    "a", "img", "p", "div", "script", "style", "iframe", "svg", "math", "object", "embed",
    "form", "input", "button", "template", "noscript", "base", "meta", "link", "table", "td",
]  # fmt: skip
safe_text = st.text(alphabet="abcdefgh äöüß日本 .,!?-()", max_size=12)


@st.composite
def html_fragments(draw: st.DrawFn, depth: int = 3) -> str:
    """HTML mixing allowed and dangerous tags and attributes around harmless text."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        if depth == 0 or draw(st.booleans()):
            parts.append(draw(safe_text))
            continue
        tag = draw(st.sampled_from(ATTACK_TAGS))
        attrs = draw(st.lists(st.sampled_from(ATTACK_ATTRIBUTES), max_size=3))
        inner = draw(html_fragments(depth=depth - 1))
        closing = draw(st.sampled_from([f"</{tag}>", ""]))
        parts.append(f"<{tag} {' '.join(attrs)}>{inner}{closing}")
    return "".join(parts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(html_fragments(), st.sampled_from([None, "https://www.nordbio.example/de/aktuelles/"]))
def test_sanitize_never_lets_active_content_through(fragment: str, base: str | None) -> None:
    clean = sanitize_html(fragment, base).lower()
    assert "<script" not in clean
    assert not re.search(r"\son\w+\s*=", clean)
    assert "javascript:" not in clean
    assert "vbscript:" not in clean
    assert "data:" not in clean
    assert "style=" not in clean


@settings(max_examples=300, deadline=None)
@given(st.one_of(html_fragments(), st.text(max_size=60)))
def test_sanitized_html_has_only_allowed_tags_attributes_and_schemes(fragment: str) -> None:
    clean = sanitize_html(fragment, "https://www.nordbio.example/de/")
    if not clean.strip():
        return
    for element in lxml.html.fragment_fromstring(clean, create_parent="div").iterdescendants():
        if not isinstance(element.tag, str):  # comments would be stripped anyway
            continue
        assert element.tag in ALLOWED_TAGS
        # nh3 (ammonia) also keeps its harmless generic attributes lang and title.
        allowed = ALLOWED_ATTRIBUTES.get(element.tag, set()) | {"lang", "title"}
        if element.tag == "a":
            allowed |= {"rel"}
        assert set(element.attrib) <= allowed, (element.tag, dict(element.attrib))
        for name in ("href", "src", "cite"):
            if name in element.attrib:
                assert urlsplit(element.attrib[name]).scheme in {"http", "https", "mailto"}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.sampled_from(["", "&#8;", "&#11;", "\x0b", "\x08", "\x00"]))
def test_sanitized_html_and_text_always_fit_in_xml(text: str, control: str) -> None:
    """A stray control character (pasted from a word processor) must not break publishing."""
    fragment = f"<p>Das Land{control} Schleswig-Holstein {text}</p>"
    element = lxml.etree.Element("summary")
    element.text = sanitize_html(fragment)  # raises ValueError for XML-incompatible text
    element.text = html_to_text(fragment)


def test_control_characters_are_removed_from_item_html() -> None:
    assert sanitize_html("<p>Schleswig\x08-Holstein&#8;</p>") == "<p>Schleswig-Holstein</p>"
    assert html_to_text("<p>Förder\x0bbescheid</p>") == "Förder bescheid"


# -- titles, dates, identity, images -------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "Förderbescheid über 2,4 Mio. Euro\r\nfür das Organoid-Labor",
            "Förderbescheid über 2,4 Mio. Euro für das Organoid-Labor",
        ),
        ("Campus-Stammtisch\u2028im Dezember", "Campus-Stammtisch im Dezember"),
        ("Absatz\u2029zwei", "Absatz zwei"),
        ("  Tab\there\x0bund\x85da  ", "Tab here und da"),
        ("R&amp;D centre <em>opens</em> in Hamburg", "R&D centre opens in Hamburg"),
        ("Subject: x\r\nBcc: victim@example.org", "Subject: x Bcc: victim@example.org"),
        ("秋季セミナー「創薬とAI」開催のお知らせ", "秋季セミナー「創薬とAI」開催のお知らせ"),
    ],
)
def test_titles_become_one_clean_line(raw: str, expected: str) -> None:
    assert clean_title(raw) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_single_line_has_no_line_breaks(text: str) -> None:
    line = single_line(text)
    assert not any(ch in line for ch in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
    assert line == line.strip()
    assert single_line(line) == line


def _struct(value: datetime) -> time.struct_time:
    return value.astimezone(UTC).utctimetuple()


def test_dates_are_utc_and_missing_means_first_seen() -> None:
    (shinkin, closed) = parse_file(OSAKA)
    # "Fri, 20 Nov 2026 15:00:00 +0900" in the feed.
    assert shinkin.published == datetime(2026, 11, 20, 6, 0, tzinfo=UTC)
    assert shinkin.published.utcoffset() == timedelta(0)
    # The closing-days notice has no date: it is dated when we first saw it.
    assert closed.published == closed.updated == NOW


def test_entry_dates_rules() -> None:
    published = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)
    later = datetime(2026, 11, 4, 8, 30, 15, tzinfo=UTC)
    assert entry_dates({"published_parsed": _struct(published)}, NOW) == (published, published)
    assert entry_dates({"updated_parsed": _struct(later)}, NOW) == (later, later)
    assert entry_dates(
        {"published_parsed": _struct(later), "updated_parsed": _struct(published)}, NOW
    ) == (later, later), "an update cannot come before the publication"
    # A partner's typo far in the future is clamped to now; a clock a little ahead is not.
    typo = datetime(2062, 11, 3, tzinfo=UTC)
    assert entry_dates({"published_parsed": _struct(typo)}, NOW) == (NOW, NOW)
    slightly = NOW + timedelta(minutes=3)
    assert entry_dates({"published_parsed": _struct(slightly)}, NOW)[0] == slightly
    assert entry_dates({}, NOW.replace(microsecond=123456)) == (NOW, NOW)
    # What the partner stated is kept beside the clamped date, for story matching.
    assert stated_date({"published_parsed": _struct(typo)}) == typo
    assert stated_date({"updated_parsed": _struct(later)}) == later
    assert stated_date({}) is None


def test_identity_prefers_guid_then_link_then_content_hash() -> None:
    link = "https://www.osaka-saibo.example/info/2026/1120_shinkin.html"
    assert entry_identity("kbf-news-2026-0083", link, "t", "x") == "guid:kbf-news-2026-0083"
    assert entry_identity(None, link, "t", "x") == f"link:{link}"
    hashed = entry_identity(None, None, "年末年始の休館日について", "12月29日から休館します。")
    assert hashed.startswith("hash:")
    assert hashed == entry_identity(
        None, None, "年末年始の休館日について", "12月29日から休館します。"
    )
    assert hashed != entry_identity(
        None, None, "年末年始の休館日について", "1月4日から開館します。"
    )


def test_identity_is_stable_across_runs() -> None:
    """Two reads on different days give each item the same identity (no new items)."""
    first = parse_file(OSAKA, now=NOW)
    second = parse_file(OSAKA, now=NOW + timedelta(days=3))
    assert [e.identity for e in first] == [e.identity for e in second]
    assert [e.identity.split(":")[0] for e in first] == ["link", "hash"]
    assert [e.content_hash for e in first] == [e.content_hash for e in second]


def test_image_sources_in_order_of_preference() -> None:
    base = "https://www.kansai-bio.example/news/"
    thumb = {"url": "img/thumb.jpg"}
    enclosure = {"href": "https://www.kansai-bio.example/img/signing.jpg", "type": "image/jpeg"}
    podcast = {"href": "https://www.kansai-bio.example/podcast.mp3", "type": "audio/mpeg"}
    body = '<p>x</p><img alt="調印式の様子" src="/img/first.jpg"><img src="/img/second.jpg">'

    assert entry_image({"media_thumbnail": [thumb], "enclosures": [enclosure]}, [body], base) == (
        "https://www.kansai-bio.example/news/img/thumb.jpg",
        None,
    )
    assert entry_image({"enclosures": [podcast, enclosure]}, [body], base) == (
        "https://www.kansai-bio.example/img/signing.jpg",
        None,
    )
    assert entry_image({"enclosures": [podcast]}, [body], base) == (
        "https://www.kansai-bio.example/img/first.jpg",
        "調印式の様子",
    )
    assert entry_image({"media_thumbnail": [{"url": "javascript:alert(1)"}]}, [], base) == (
        None,
        None,
    )
    assert entry_image({}, ["<p>Kein Bild</p>"], base) == (None, None)


# -- through the service: what ends up in the store -------------------------------------------


def test_hafen_campus_feed_is_normalized(make_service: Any, hafen_file: Path) -> None:
    service = make_service([hafen_feed(hafen_file)])

    outcome = fetch(service)["Life Science Campus Hafen"]

    # Six <item>s, one of them listed twice by the partner's CMS: five entries.
    assert outcome.new_entries == 5
    assert service.store.count_entries() == 5
    entries = entries_by_title(service)
    assert set(entries) == {
        "Nordlicht Diagnostics bezieht neues Labor auf dem Campus",
        "Förderbescheid über 2,4 Mio. Euro für das Organoid-Labor am Campus",
        "Campus-Stammtisch im Dezember: Zellkultur trifft KI",
        "Tag der offenen Labore 2027",
        "Pressestelle zwischen den Jahren eingeschränkt erreichbar",
    }

    labor = entries["Nordlicht Diagnostics bezieht neues Labor auf dem Campus"]
    # Tracking parameters, host case, default port and fragment are gone; lang stays.
    assert labor.link == "https://www.hafen-campus.example/presse/2026/nordlicht-labor/?lang=de"
    assert labor.published == datetime(2026, 11, 24, 8, 30, tzinfo=UTC)
    assert (
        labor.image_url == "https://www.hafen-campus.example/bilder/2026/nordlicht-labor-aussen.jpg"
    )
    assert labor.author == "Pressestelle Campus Hafen"
    assert labor.topics == ("diagnostik", "research")
    html = labor.summary_html
    assert "<script" not in html and "document.cookie" not in html
    assert "onerror" not in html and "onclick" not in html and "javascript:" not in html
    assert (
        '<img alt="Das Team von Nordlicht Diagnostics" src="https://www.hafen-campus.example/bilder/2026/nordlicht-team.jpg">'
        in html
    )
    assert (
        '<a href="https://www.hafen-campus.example/presse/2026/nordlicht-labor-faktenblatt.pdf"'
        in html
    )
    # The gallery link pointed at javascript: and is now plain text, not a link to the item.
    assert "Bildergalerie" in html
    assert not re.search(r"<a [^>]*href[^>]*>Bildergalerie", html)
    assert "document.location" not in labor.summary_text

    foerder = entries["Förderbescheid über 2,4 Mio. Euro für das Organoid-Labor am Campus"]
    assert foerder.published == NOW  # no pubDate: first seen
    assert foerder.image_url == (
        "https://www.hafen-campus.example/bilder/2026/foerderbescheid-uebergabe.jpg"
    )

    stammtisch = entries["Campus-Stammtisch im Dezember: Zellkultur trifft KI"]
    assert stammtisch.link == (
        "https://www.hafen-campus.example/veranstaltungen/2026/stammtisch-dezember.html"
    )
    assert stammtisch.image_url == "https://www.hafen-campus.example/bilder/2026/stammtisch.jpg"
    assert stammtisch.image_alt == "Stammtisch im Foyer & Café"
    assert (
        'href="https://www.hafen-campus.example/veranstaltungen/anmeldung.html?event=stammtisch-12"'
        in stammtisch.summary_html
    )

    # 5 June 2027 is a typo for 2026 or an announcement: never dated in the future.
    assert entries["Tag der offenen Labore 2027"].published == NOW
    notice = entries["Pressestelle zwischen den Jahren eingeschränkt erreichbar"]
    assert notice.link is None
    assert notice.identity.startswith("hash:")


def test_refetch_updates_changed_item_in_place(
    make_service: Any, hafen_file: Path, clock: Clock
) -> None:
    service = make_service([hafen_feed(hafen_file)])
    fetch(service)
    before = story_titled(service, "Tag der offenen Labore 2027")

    text = hafen_file.read_text(encoding="utf-8")
    text = text.replace(
        "<title>Tag der offenen Labore 2027</title>",
        "<title>Tag der offenen Labore 2027: Programm steht fest</title>",
    ).replace("öffnen 14 Unternehmen", "öffnen 17 Unternehmen")
    hafen_file.write_text(text, encoding="utf-8")
    clock.now = NOW + timedelta(hours=2)

    outcome = fetch(service)["Life Science Campus Hafen"]

    assert (outcome.new_entries, outcome.updated_entries) == (0, 1)
    assert service.store.count_entries() == 5
    assert service.store.count_stories() == 5
    after = story_titled(service, "Tag der offenen Labore 2027: Programm steht fest")
    assert after.id == before.id
    assert "öffnen 17 Unternehmen" in after.entry.summary_text
    assert after.updated == clock.now
    # The undated and link-less items were not seen as new a second time.
    titles = [s.entry.title for s in service.store.recent_stories()]
    assert titles.count("Pressestelle zwischen den Jahren eingeschränkt erreichbar") == 1
    assert titles.count("Förderbescheid über 2,4 Mio. Euro für das Organoid-Labor am Campus") == 1


def test_same_press_release_from_two_partners_is_one_story(
    make_service: Any, hafen_file: Path, feed_server: FeedServer, clock: Clock
) -> None:
    nordlicht = {
        "name": "Nordlicht Diagnostics",
        "url": feed_server.url("/en/news/feed.atom"),
        "site": "https://www.nordlicht-diagnostics.example",
        "topics": ["medtech"],
    }
    service = make_service([hafen_feed(hafen_file), nordlicht])
    fetch(service)  # Nordlicht's feed is not there yet (404): Hafen is first.
    clock.now = NOW + timedelta(hours=1)
    feed_server.serve_file("/en/news/feed.atom", NORDLICHT, content_type="application/atom+xml")

    outcomes = fetch(service)

    assert outcomes["Nordlicht Diagnostics"].new_entries == 2
    assert service.store.count_entries() == 7
    assert service.store.count_stories() == 6
    story = story_titled(service, "Nordlicht Diagnostics bezieht neues Labor auf dem Campus")
    assert [s.feed_name for s in story.sources] == [
        "Life Science Campus Hafen",
        "Nordlicht Diagnostics",
    ]
    assert (
        story.sources[1].entry_title == "We have moved: our new laboratory at Hafen Campus in Kiel"
    )
    assert story.sources[1].entry_link == (
        "http://hafen-campus.example/presse/2026/nordlicht-labor?lang=de"
    )
    assert story.topics == ("diagnostik", "medtech", "research")
    assert story.updated == clock.now


@pytest.mark.parametrize(
    "content_type",
    ["application/rss+xml", "text/xml; charset=utf-8", "local-file"],
    ids=["declared-in-xml", "server-claims-utf8", "local-file"],
)
def test_shift_jis_example_feed_has_correct_japanese_titles(
    make_service: Any, feed_server: FeedServer, content_type: str
) -> None:
    if content_type == "local-file":
        url = str(KANSAI)
    else:
        url = feed_server.serve_file("/news/rss.xml", KANSAI, content_type=content_type)
    service = make_service(
        [
            {
                "name": "Kansai Bio Frontier",
                "url": url,
                "site": "https://www.kansai-bio.example",
                "language": "ja",
            }
        ]
    )

    assert fetch(service)["Kansai Bio Frontier"].new_entries == 5

    entries = entries_by_title(service)
    assert set(entries) == {
        "国際シンポジウム「再生医療の社会実装」を12月に神戸で開催",
        "メールマガジン 2026年11月号を発行しました",
        "ドイツ・ノルトバイオ・クラスターと連携に関する覚書を締結 ― 神戸で調印式",
        "再生医療ベンチャー支援プログラム 第3期採択企業を決定",
        "秋季セミナー「創薬とAI」開催のお知らせ",
    }
    symposium = entries["国際シンポジウム「再生医療の社会実装」を12月に神戸で開催"]
    assert "神戸国際会議場にて国際シンポジウムを開催します" in symposium.summary_text
    assert symposium.language == "ja"
    # "Wed, 25 Nov 2026 10:00:00 +0900"
    assert symposium.published == datetime(2026, 11, 25, 1, 0, tzinfo=UTC)


def test_euc_jp_feed_without_guids_is_stored_once(
    make_service: Any, feed_server: FeedServer, clock: Clock
) -> None:
    body = OSAKA.read_bytes()
    feed_server.routes["/info/rss"] = Route(body, "application/rss+xml; charset=EUC-JP")
    service = make_service(
        [{"name": "大阪細胞医療パーク", "url": feed_server.url("/info/rss"), "language": "ja"}]
    )
    assert fetch(service)["大阪細胞医療パーク"].new_entries == 2

    # The park adds a new item on top; the two old ones (no GUIDs) must not come back.
    new_item = (
        "<item><title>見学会のご案内</title>"
        "<link>https://www.osaka-saibo.example/info/2026/1126_kengaku.html</link>"
        "<description>12月5日に施設見学会を開催します。</description></item>"
    ).encode("euc_jp")
    feed_server.routes["/info/rss"] = Route(
        body.replace(b"<item>", new_item + b"<item>", 1), "application/rss+xml; charset=EUC-JP"
    )
    clock.now = NOW + timedelta(hours=1)
    outcome = fetch(service)["大阪細胞医療パーク"]

    assert (outcome.new_entries, outcome.updated_entries) == (1, 0)
    assert set(entries_by_title(service)) == {
        "iPS細胞由来心筋シートの共同研究を開始",
        "年末年始の休館日について",
        "見学会のご案内",
    }


# -- every bundled and test feed: invariants a reader relies on -------------------------------

CORPUS = [
    path
    for folder in (EXAMPLE_FEEDS, DATA)
    for path in sorted(folder.iterdir())
    if path.suffix in {".rss", ".atom", ".rdf"}
]


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_corpus_entries_are_clean(path: Path) -> None:
    entries = parse_file(path, "https://www.partner.example/feed/")
    assert entries
    identities = [e.identity for e in entries]
    assert len(identities) == len(set(identities))
    for entry in entries:
        assert entry.title and entry.title == single_line(entry.title)
        assert "\ufffd" not in entry.title + entry.summary_text  # no mojibake
        if entry.link is not None:
            assert normalize_url(entry.link) == entry.link
            assert entry.link_key == link_key(entry.link)
        assert entry.published.tzinfo is not None and entry.published.utcoffset() == timedelta(0)
        assert entry.published <= entry.updated <= NOW
        for html in (entry.summary_html, entry.content_html):
            assert "<script" not in html.lower()
            assert not re.search(r"\son\w+\s*=", html)
            assert "javascript:" not in html.lower()
        if entry.image_url:
            assert entry.image_url.startswith(("https://", "http://"))
