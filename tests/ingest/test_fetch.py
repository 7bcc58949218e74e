"""Fetching partner feeds over real HTTP (127.0.0.1) and from files, into a real store.

Every test drives ``Service.fetch`` (fetch -> parse -> store) and checks what an
operator would see: the feed's status row (HTTP status, error text, consecutive
failures, validators), the stored entries, and what the partner's server received.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clusterfeed import __version__
from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.ingest.fetch import FetchLimits, FetchRequest, fetch_all
from clusterfeed.store import Store
from tests.conftest import EXAMPLE_FEEDS, Clock, FeedServer, Route, write_config
from tests.helpers import fetch, status

HELIX = EXAMPLE_FEEDS / "helix-vektor.rss"
KANSAI = EXAMPLE_FEEDS / "kansai-bio.rss"
ELBMED = EXAMPLE_FEEDS / "elbmed-pharma.atom"
# The Last-Modified date the test server sends for every route.
SERVER_LAST_MODIFIED = "Mon, 21 Sep 2026 14:13:20 GMT"


@pytest.fixture
def make_service(tmp_path: Path, database_url: str, clock: Clock) -> Iterator[Any]:
    """Build a prepared Service for a list of feeds (and extra TOML, e.g. a [fetch] table)."""
    stores: list[Store] = []

    def make(feeds: list[dict[str, Any]], extra: str = "") -> Service:
        config = load_config(write_config(tmp_path, feeds, database_url=database_url, extra=extra))
        store = Store(config.database_url)
        stores.append(store)
        service = Service(config, store, clock=clock)
        service.prepare()
        return service

    yield make
    for store in stores:
        store.close()


def titles(service: Service) -> set[str]:
    return {s.entry.title for s in service.store.recent_stories()}


def big_feed(items: int) -> bytes:
    """A valid RSS feed of about 600 bytes per item (German cluster news)."""
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>\n<rss version="2.0"><channel>'
        "<title>Elbe Life Science Archiv</title><link>https://www.elbe-ls.example/</link>"
        "<description>Alle Meldungen seit 2009</description>"
    ]
    for i in range(items):
        parts.append(
            f"<item><title>Meldung {i}: Neue Kooperation im Bereich Zelltherapie</title>"
            f"<link>https://www.elbe-ls.example/archiv/{i}.html</link>"
            f'<guid isPermaLink="false">elbe-ls-{i}</guid>'
            "<pubDate>Mon, 02 Nov 2026 09:00:00 +0100</pubDate>"
            "<description>&lt;p&gt;Das Hamburger Unternehmen und das Universitätsklinikum "
            "vereinbaren eine Zusammenarbeit bei der Herstellung autologer Zelltherapien "
            "für Patientinnen und Patienten mit Lymphomen.&lt;/p&gt;</description></item>"
        )
    parts.append("</channel></rss>")
    return "".join(parts).encode()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- conditional requests -------------------------------------------------------------


def test_second_fetch_is_conditional_and_304_changes_nothing(
    make_service: Any, feed_server: FeedServer, clock: Clock
) -> None:
    url = feed_server.serve_file("/helix.rss", HELIX, content_type="application/rss+xml")
    service = make_service([{"name": "Helix Vektor", "url": url}])

    first = fetch(service)["Helix Vektor"]
    assert (first.state, first.new_entries) == ("new", 5)
    stored = status(service, "Helix Vektor")
    assert stored.etag and stored.etag.startswith('"')
    assert stored.last_modified == SERVER_LAST_MODIFIED
    stories_before = service.store.recent_stories()
    assert feed_server.requests_for("/helix.rss")[0].headers.get("if-none-match") is None

    clock.advance()
    second = fetch(service)["Helix Vektor"]

    request = feed_server.requests_for("/helix.rss")[-1]
    assert request.headers["if-none-match"] == stored.etag
    assert request.headers["if-modified-since"] == stored.last_modified
    assert (second.state, second.new_entries, second.updated_entries) == ("unchanged", 0, 0)
    after = status(service, "Helix Vektor")
    assert after.last_status == 304
    assert after.last_error is None
    assert after.consecutive_failures == 0
    assert after.last_success_at == clock.now
    assert (after.etag, after.last_modified) == (stored.etag, stored.last_modified)
    assert after.entries == 5
    assert service.store.recent_stories() == stories_before


def test_304_carries_no_body_to_parse(feed_server: FeedServer) -> None:
    """The fetcher hands a 304 on as "not modified" with no bytes, so nothing is parsed."""
    url = feed_server.serve_file("/helix.rss", HELIX)
    limits = FetchLimits(user_agent="clusterfeed-test")
    (first,) = asyncio.run(fetch_all([FetchRequest("Helix", url)], limits))
    assert first.status == 200 and first.body == HELIX.read_bytes()

    again = FetchRequest("Helix", url, etag=first.etag, last_modified=first.last_modified)
    (second,) = asyncio.run(fetch_all([again], limits))
    assert second.ok and second.not_modified
    assert second.status == 304
    assert second.body is None
    assert second.etag == first.etag


def test_last_modified_alone_is_sent_back(make_service: Any, feed_server: FeedServer) -> None:
    """A server without ETags still gets If-Modified-Since (and no If-None-Match)."""
    feed_server.routes["/elbmed.atom"] = Route(
        ELBMED.read_bytes(), content_type="application/atom+xml", etag=False
    )
    service = make_service([{"name": "Elbmed Pharma", "url": feed_server.url("/elbmed.atom")}])
    fetch(service)
    assert status(service, "Elbmed Pharma").etag is None

    again = fetch(service)["Elbmed Pharma"]
    request = feed_server.requests_for("/elbmed.atom")[-1]
    assert request.headers["if-modified-since"] == SERVER_LAST_MODIFIED
    assert "if-none-match" not in request.headers
    # This server ignores If-Modified-Since and answers 200: same items, nothing new.
    assert (again.state, again.new_entries) == ("unchanged", 0)
    assert status(service, "Elbmed Pharma").entries == 5


# -- content encodings and limits -----------------------------------------------------


def test_gzip_encoded_feed_is_decoded(make_service: Any, feed_server: FeedServer) -> None:
    url = feed_server.serve_file("/kansai.rss", KANSAI, gzip=True)
    service = make_service([{"name": "Kansai Bio Frontier", "url": url, "language": "ja"}])

    outcome = fetch(service)["Kansai Bio Frontier"]

    assert "gzip" in feed_server.requests_for("/kansai.rss")[0].headers["accept-encoding"]
    assert (outcome.state, outcome.new_entries) == ("new", 5)
    assert "国際シンポジウム「再生医療の社会実装」を12月に神戸で開催" in titles(service)


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        pytest.param(
            Route(big_feed(40)),
            "response is larger than the limit of 10000 bytes (fetch.max_bytes)",
            id="streamed-body",
        ),
        pytest.param(
            # Compresses to a few kB but unpacks to ~300 kB: the cap applies after gzip.
            Route(big_feed(500), gzip=True),
            "response is larger than the limit of 10000 bytes (fetch.max_bytes)",
            id="gzip-bomb",
        ),
        pytest.param(
            Route(big_feed(500)),
            "far above the limit of 10000 (fetch.max_bytes)",
            id="announced-length",
        ),
    ],
)
def test_feed_over_size_cap_fails_alone(
    make_service: Any, feed_server: FeedServer, route: Route, reason: str
) -> None:
    feed_server.routes["/archiv.rss"] = route
    helix = feed_server.serve_file("/helix.rss", HELIX)
    service = make_service(
        [
            {"name": "Elbe Archiv", "url": feed_server.url("/archiv.rss")},
            {"name": "Helix Vektor", "url": helix},
        ],
        extra="[fetch]\nmax_bytes = 10000\n",
    )

    outcomes = fetch(service)

    assert outcomes["Elbe Archiv"].state == "failed"
    archiv = status(service, "Elbe Archiv")
    assert reason in (archiv.last_error or "")
    assert archiv.entries == 0
    assert archiv.consecutive_failures == 1
    assert outcomes["Helix Vektor"].new_entries == 5
    assert status(service, "Helix Vektor").last_error is None


def test_slow_server_times_out_with_clear_reason(
    make_service: Any, feed_server: FeedServer
) -> None:
    feed_server.routes["/slow.rss"] = Route(HELIX.read_bytes(), delay=3.0)
    elbmed = feed_server.serve_file("/elbmed.atom", ELBMED)
    service = make_service(
        [
            {"name": "Slow Partner", "url": feed_server.url("/slow.rss")},
            {"name": "Elbmed Pharma", "url": elbmed},
        ],
        extra="[fetch]\ntimeout_seconds = 0.5\n",
    )

    outcomes = fetch(service)

    slow = status(service, "Slow Partner")
    assert outcomes["Slow Partner"].state == "failed"
    assert slow.last_error in {
        "the server stopped answering (read timeout)",
        "the whole request took longer than fetch.timeout_seconds",
    }
    assert slow.entries == 0
    assert outcomes["Elbmed Pharma"].new_entries == 5


# -- failures are recorded per feed ------------------------------------------------------


def test_http_errors_are_counted_and_reset_after_success(
    make_service: Any, feed_server: FeedServer, clock: Clock
) -> None:
    feed_server.routes["/broken.rss"] = Route(b"<h1>Oops</h1>", "text/html", status=500)
    helix = feed_server.serve_file("/helix.rss", HELIX)
    service = make_service(
        [
            {"name": "Gone Partner", "url": feed_server.url("/moved-away.rss")},
            {"name": "Broken Partner", "url": feed_server.url("/broken.rss")},
            {"name": "Helix Vektor", "url": helix},
        ]
    )

    for cycle in (1, 2):
        outcomes = fetch(service)
        gone, broken = status(service, "Gone Partner"), status(service, "Broken Partner")
        assert (gone.last_status, gone.last_error) == (404, "HTTP 404 Not Found")
        assert (broken.last_status, broken.last_error) == (500, "HTTP 500 Internal Server Error")
        assert gone.consecutive_failures == broken.consecutive_failures == cycle
        assert outcomes["Gone Partner"].message == "HTTP 404 Not Found"
        assert status(service, "Helix Vektor").consecutive_failures == 0
        clock.advance()

    assert status(service, "Helix Vektor").entries == 5
    assert status(service, "Gone Partner").last_success_at is None

    feed_server.serve_file("/moved-away.rss", ELBMED)
    outcomes = fetch(service)

    gone = status(service, "Gone Partner")
    assert outcomes["Gone Partner"].new_entries == 5
    assert (gone.last_status, gone.last_error, gone.consecutive_failures) == (200, None, 0)
    assert gone.last_success_at == clock.now
    assert status(service, "Broken Partner").consecutive_failures == 3


def test_connection_refused_gives_one_line_reason(
    make_service: Any, feed_server: FeedServer
) -> None:
    service = make_service(
        [
            {"name": "Offline Partner", "url": f"http://127.0.0.1:{closed_port()}/feed.rss"},
            {"name": "Helix Vektor", "url": feed_server.serve_file("/helix.rss", HELIX)},
        ]
    )

    outcomes = fetch(service)

    offline = status(service, "Offline Partner")
    assert offline.last_error == "connection refused by the server"
    assert offline.last_status is None
    assert outcomes["Offline Partner"].state == "failed"
    assert outcomes["Helix Vektor"].new_entries == 5


def test_redirects_are_followed_but_not_forever(make_service: Any, feed_server: FeedServer) -> None:
    feed_server.serve_file("/new/elbmed.atom", ELBMED)
    feed_server.routes["/old/elbmed.atom"] = Route(
        b"", status=301, headers={"Location": "/new/elbmed.atom"}
    )
    feed_server.routes["/loop.rss"] = Route(b"", status=302, headers={"Location": "/loop.rss"})
    service = make_service(
        [
            {"name": "Elbmed Pharma", "url": feed_server.url("/old/elbmed.atom")},
            {"name": "Looping Partner", "url": feed_server.url("/loop.rss")},
        ]
    )

    outcomes = fetch(service)

    assert outcomes["Elbmed Pharma"].new_entries == 5
    looping = status(service, "Looping Partner")
    assert looping.last_error is not None
    assert looping.last_error.startswith("more than 5 redirects (last to http://127.0.0.1:")


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        pytest.param(
            b"<!DOCTYPE html>\n<html lang='de'><head><title>Aktuelles</title></head>"
            b"<body><h1>Aktuelles</h1><a href='/feed.rss'>RSS</a></body></html>",
            "text/html; charset=utf-8",
            "the URL returned an HTML page, not a feed",
            id="html-page",
        ),
        pytest.param(
            # A CMS page with a byte order mark and a comment before the doctype.
            b"\xef\xbb\xbf<!-- TYPO3 CMS -->\n<!DOCTYPE html><html><body>News</body></html>",
            "text/html",
            "the URL returned an HTML page, not a feed",
            id="html-page-with-bom",
        ),
        pytest.param(
            b"Fatal error: database connection lost in /var/www/feed.php on line 12\n",
            "application/rss+xml",
            "not a feed",
            id="garbage",
        ),
        pytest.param(
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00",
            "application/xml",
            "not a feed",
            id="binary",
        ),
    ],
)
def test_not_a_feed_is_recorded_and_good_feeds_unaffected(
    make_service: Any, feed_server: FeedServer, body: bytes, content_type: str, reason: str
) -> None:
    feed_server.routes["/news"] = Route(body, content_type)
    service = make_service(
        [
            {"name": "Wrong URL", "url": feed_server.url("/news")},
            {"name": "Helix Vektor", "url": feed_server.serve_file("/helix.rss", HELIX)},
            {"name": "Elbmed Pharma", "url": feed_server.serve_file("/elbmed.atom", ELBMED)},
        ]
    )

    outcomes = fetch(service)

    wrong = status(service, "Wrong URL")
    assert outcomes["Wrong URL"].state == "failed"
    assert (wrong.last_error or "").startswith(reason)
    assert "\n" not in (wrong.last_error or "")
    assert wrong.last_status == 200
    assert wrong.entries == 0
    assert outcomes["Helix Vektor"].new_entries == 5
    assert outcomes["Elbmed Pharma"].new_entries == 5
    assert service.store.count_entries() == 10


def test_user_agent_names_clusterfeed_and_cluster(
    make_service: Any, feed_server: FeedServer
) -> None:
    service = make_service([{"name": "Helix Vektor", "url": feed_server.serve_file("/h", HELIX)}])
    fetch(service)
    agent = feed_server.requests_for("/h")[0].headers["user-agent"]
    assert agent.startswith(f"clusterfeed/{__version__}")
    assert "https://www.nordbio.example" in agent
    assert "NordBio Cluster" in agent


def test_configured_user_agent_is_sent(make_service: Any, feed_server: FeedServer) -> None:
    service = make_service(
        [{"name": "Helix Vektor", "url": feed_server.serve_file("/h", HELIX)}],
        extra='[fetch]\nuser_agent = "NordBioNewsBot/2.0 (+https://news.nordbio.example/bot)"\n',
    )
    fetch(service)
    agent = feed_server.requests_for("/h")[0].headers["user-agent"]
    assert agent == "NordBioNewsBot/2.0 (+https://news.nordbio.example/bot)"


# -- local files -------------------------------------------------------------------------


def test_local_file_feed_second_read_is_not_modified(
    make_service: Any, tmp_path: Path, clock: Clock
) -> None:
    feed = tmp_path / "feeds" / "elbmed.atom"
    feed.parent.mkdir()
    feed.write_bytes(ELBMED.read_bytes())
    service = make_service(
        [
            {
                "name": "Elbmed Pharma",
                "url": "feeds/elbmed.atom",
                "site": "https://www.elbmed.example",
            }
        ]
    )

    first = fetch(service)["Elbmed Pharma"]
    assert (first.state, first.new_entries) == ("new", 5)
    etag = status(service, "Elbmed Pharma").etag
    assert etag and etag.startswith('"sha256-')

    clock.advance()
    second = fetch(service)["Elbmed Pharma"]
    assert (second.state, second.new_entries) == ("unchanged", 0)
    assert status(service, "Elbmed Pharma").last_success_at == clock.now
    assert status(service, "Elbmed Pharma").etag == etag

    # An edited file is read again: the new item arrives.
    text = feed.read_text(encoding="utf-8")
    entry = (
        "<entry><id>tag:elbmed.example,2026:presse/2026-11-26</id>"
        "<title>Elbmed Pharma ernennt neue Forschungsvorständin</title>"
        '<link href="https://www.elbmed.example/presse/2026-11-26-vorstand"/>'
        "<updated>2026-11-26T06:00:00Z</updated>"
        "<summary>Dr. Ilka Brandes übernimmt zum 1. Januar 2027 das Ressort Forschung.</summary>"
        "</entry>"
    )
    feed.write_text(text.replace("</feed>", entry + "</feed>"), encoding="utf-8")
    third = fetch(service)["Elbmed Pharma"]
    assert (third.state, third.new_entries) == ("new", 1)
    assert "Elbmed Pharma ernennt neue Forschungsvorständin" in titles(service)

    feed.unlink()
    gone = fetch(service)["Elbmed Pharma"]
    assert gone.state == "failed"
    assert (
        status(service, "Elbmed Pharma").last_error == "cannot read file: No such file or directory"
    )
    assert status(service, "Elbmed Pharma").entries == 6
