"""Partners without a feed, and URLs that are a page rather than a feed (issue 8, 4 and 5).

A source of kind "html" turns a partner's news listing page into items with the CSS
selectors from the config; the pages in ``tests/data/listing/`` are modelled on real
cluster and hospital CMS output (TYPO3 news lists, a "More News" block with lazy
images, an ISO-8859-1 press table). Each page is served over real HTTP on 127.0.0.1
into a real store, and the tests check what the operator and the readers see: the
feed's status, ``clusterfeed status --json`` and the published Atom feed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import feedparser
import pytest

from clusterfeed.app.service import FeedOutcome, Service
from clusterfeed.config import ConfigError, load_config
from clusterfeed.model import FeedStatus
from clusterfeed.store import Store
from tests.conftest import DATA, EXAMPLE_FEEDS, Clock, FeedServer, Route, write_config

LISTING = DATA / "listing"
HELIX = EXAMPLE_FEEDS / "helix-vektor.rss"

# The TYPO3 "news" list of a German cluster association.
GERMAN_SELECTORS = {
    "item": "div.news-list-view div.article",
    "title": "h3 [itemprop=headline]",
    "link": "h3 a",
    "date": ".news-list-date",
    "date_format": "%d. %B %Y",
    "summary": "[itemprop=description] p",
    "image": ".news-img-wrap img",
}
# The "More News" block under an English article; dates like "Nov 20, 2026".
ENGLISH_SELECTORS = {
    "item": "section.more-news article.news-teaser",
    "title": "h3",
    "link": "a.read-more",
    "date": ".news-teaser__date",
    "summary": ".news-teaser__teaser",
    "image": "figure img",
}
# A hospital's press table in ISO-8859-1, with relative dates ("Heute").
PRESS_TABLE_SELECTORS = {
    "item": "table.presse tr.pm",
    "title": "a.titel",
    "link": "a.titel",
    "date": "td.datum",
    "date_format": "%d. %B %Y",
    "summary": "p.anriss",
}


def toml(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # strings, booleans, lists: valid TOML


def feeds_toml(feeds: list[dict[str, Any]]) -> str:
    """``[[feeds]]`` tables as an operator writes them, with a ``[feeds.selectors]`` table."""
    lines = []
    for feed in feeds:
        lines.append("[[feeds]]")
        selectors = feed.get("selectors")
        lines += [f"{k} = {toml(v)}" for k, v in feed.items() if k != "selectors"]
        if selectors is not None:
            lines.append("[feeds.selectors]")
            lines += [f"{k} = {toml(v)}" for k, v in selectors.items()]
        lines.append("")
    return "\n".join(lines)


def config_file(folder: Path, feeds: list[dict[str, Any]], database_url: str) -> Path:
    return write_config(folder, [], database_url=database_url, extra=feeds_toml(feeds))


@pytest.fixture
def make_service(tmp_path: Path, database_url: str, clock: Clock) -> Iterator[Any]:
    stores: list[Store] = []

    def make(feeds: list[dict[str, Any]]) -> Service:
        config = load_config(config_file(tmp_path, feeds, database_url))
        store = Store(config.database_url)
        stores.append(store)
        service = Service(config, store, clock=clock)
        service.prepare()
        return service

    yield make
    for store in stores:
        store.close()


def fetch(service: Service, *, due_only: bool = False) -> dict[str, FeedOutcome]:
    return {o.name: o for o in asyncio.run(service.fetch(due_only=due_only))}


def status(service: Service, name: str) -> FeedStatus:
    return {s.name: s for s in service.store.feed_statuses()}[name]


def published(service: Service) -> dict[str, Any]:
    """The published Atom feed as a reader's software sees it: entries by title."""
    service.publish()
    document = feedparser.parse(service.feed_path().read_bytes())
    assert not document.bozo, document.get("bozo_exception")
    return {entry.title: entry for entry in document.entries}


def utc(entry: Any) -> datetime:
    year, month, day, hour, minute, second = entry.published_parsed[:6]
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def status_json(run_cli: Any, service: Service) -> dict[str, dict[str, Any]]:
    result = run_cli("status", "--config", service.config.source, "--json")
    assert result.exit_code == 0, result.output
    return {f["name"]: f for f in json.loads(result.stdout)}


def serve_listing(server: FeedServer, path: str, file: str, ctype: str = "text/html") -> str:
    server.routes[path] = Route((LISTING / file).read_bytes(), ctype)
    return server.url(path)


# -- listing pages become items -----------------------------------------------------


def test_german_listing_page_becomes_items_in_the_published_feed(
    make_service: Any, feed_server: FeedServer
) -> None:
    url = serve_listing(
        feed_server, "/aktuelles/", "biotech-nord-aktuelles.html", "text/html; charset=utf-8"
    )
    service = make_service(
        [
            {
                "name": "BioTech Nord",
                "url": url,
                "kind": "html",
                "language": "de",
                "topics": ["cluster"],
                "selectors": GERMAN_SELECTORS,
            }
        ]
    )

    outcome = fetch(service)["BioTech Nord"]

    assert (outcome.state, outcome.new_entries, outcome.message) == ("new", 5, None)
    feed = status(service, "BioTech Nord")
    assert (feed.state, feed.last_error, feed.last_warning, feed.entries) == ("ok", None, None, 5)
    entries = published(service)
    detail = feed_server.url("/aktuelles/detail/")
    # Dates are midnight in the config's time zone (Europe/Berlin), written in UTC;
    # "12.&nbsp;November" and "2. März" are read like any other.
    expected = {
        "Helix Vektor schließt Series-B-Finanzierung über 42 Mio. Euro ab": (
            "helix-vektor-schliesst-series-b-finanzierung-ab/",
            datetime(2026, 11, 19, 23, 0, tzinfo=UTC),
        ),
        "Universitätsklinikum Förde eröffnet Zentrum für Zelltherapie": (
            "uk-foerde-eroeffnet-zentrum-fuer-zelltherapie/",
            datetime(2026, 11, 11, 23, 0, tzinfo=UTC),
        ),
        "KristallWerk erweitert Labor im tecHub Hamburg": (
            "kristallwerk-erweitert-labor-im-techhub/",
            datetime(2026, 11, 2, 23, 0, tzinfo=UTC),
        ),
        "BioTech Nord und Kansai Bio Frontier unterzeichnen Absichtserklärung": (
            "biotech-nord-und-kansai-unterzeichnen-absichtserklaerung/",
            datetime(2026, 10, 27, 23, 0, tzinfo=UTC),
        ),
        "Elbmed Pharma: Zulassung für Treosulfan vor Stammzelltransplantation": (
            "elbmed-pharma-erhaelt-zulassung-fuer-treosulfan/",
            datetime(2026, 3, 1, 23, 0, tzinfo=UTC),
        ),
    }
    assert set(entries) == set(expected)
    for title, (slug, when) in expected.items():
        assert entries[title].link == detail + slug
        assert utc(entries[title]) == when, title

    helix = entries["Helix Vektor schließt Series-B-Finanzierung über 42 Mio. Euro ab"]
    assert helix.summary.startswith(
        "Das Hamburger Gentherapie-Unternehmen will mit dem Kapital seine AAV-Plattform"
    )
    picture = feed_server.url("/fileadmin/_processed_/4/e/csm_helix-vektor-labor_8f2a1c.jpg")
    assert f'src="{picture}"' in helix.content[0].value
    assert "Weiterlesen" not in helix.summary
    kansai = entries["BioTech Nord und Kansai Bio Frontier unterzeichnen Absichtserklärung"]
    assert "<img" not in kansai.content[0].value  # that item has no picture
    assert [t.term for t in helix.tags] == ["cluster"]


def test_english_more_news_list_with_dates_lazy_images_and_relative_links(
    make_service: Any, feed_server: FeedServer
) -> None:
    url = serve_listing(
        feed_server, "/en/news/kansai-joint-mission.html", "hanse-life-science-more-news.html"
    )
    service = make_service(
        [{"name": "Hanse Life Science", "url": url, "kind": "html", "selectors": ENGLISH_SELECTORS}]
    )

    outcome = fetch(service)["Hanse Life Science"]

    assert (outcome.state, outcome.new_entries, outcome.message) == ("new", 3, None)
    entries = published(service)
    assert list(entries) == [  # newest first; the article above the list is not an item
        "Pacifica Therapeutics Acquires Helix Vektor",
        "KristallWerk Scales Operations...",
        "Strategic cornerstone for Elbmed Pharma: FDA approves treosulfan for alloHSCT",
    ]
    pacifica = entries["Pacifica Therapeutics Acquires Helix Vektor"]
    assert pacifica.link == feed_server.url("/en/news/pacifica-acquires-helix-vektor.html")
    assert utc(pacifica) == datetime(2026, 11, 19, 23, 0, tzinfo=UTC)
    assert pacifica.summary.startswith(
        "HTGF portfolio company Helix Vektor, pioneering a high-capacity adenovirus gene therapy "
        "vector platform, was acquired by Pacifica Therapeutics, Inc."
    )
    # The page lazy-loads its pictures: the real one is in data-src, not the placeholder.
    content = pacifica.content[0].value
    assert f'src="{feed_server.url("/media/news/helix-hcad-platform.jpg")}"' in content
    assert "data:image" not in content
    kristallwerk = entries["KristallWerk Scales Operations..."]
    assert utc(kristallwerk) == datetime(2026, 11, 12, 23, 0, tzinfo=UTC)
    assert feed_server.url("/media/news/kristallwerk-techhub.jpg") in kristallwerk.content[0].value
    elbmed = entries[
        "Strategic cornerstone for Elbmed Pharma: FDA approves treosulfan for alloHSCT"
    ]
    assert elbmed.link == "https://www.hanse-lifescience.example/en/news/elbmed-fda-treosulfan.html"
    assert utc(elbmed) == datetime(2026, 10, 29, 23, 0, tzinfo=UTC)
    assert feed_server.url("/media/news/elbmed-fda-approval.jpg") in elbmed.content[0].value


def test_redesigned_page_is_an_error_and_stored_items_are_kept(
    make_service: Any, feed_server: FeedServer, clock: Clock, run_cli: Any
) -> None:
    url = serve_listing(feed_server, "/aktuelles/", "biotech-nord-aktuelles.html")
    helix = feed_server.serve_file("/helix.rss", HELIX)
    service = make_service(
        [
            {"name": "BioTech Nord", "url": url, "kind": "html", "selectors": GERMAN_SELECTORS},
            {"name": "Helix Vektor", "url": helix},
        ]
    )
    assert fetch(service)["BioTech Nord"].new_entries == 5
    first_success = clock.now
    before = set(published(service))

    # The partner relaunches its site: same address, new markup.
    serve_listing(feed_server, "/aktuelles/", "biotech-nord-aktuelles-relaunch.html")
    clock.now += timedelta(minutes=30)
    outcome = fetch(service)["BioTech Nord"]

    reason = (
        "the listing page has no element matching the item selector "
        "'div.news-list-view div.article'; the site may have changed: "
        "check the selectors in the config"
    )
    assert (outcome.state, outcome.message) == ("failed", reason)
    feed = status(service, "BioTech Nord")
    assert (feed.state, feed.last_error, feed.last_status) == ("failing", reason, 200)
    assert (feed.consecutive_failures, feed.last_success_at) == (1, first_success)
    assert feed.entries == 5  # nothing lost
    assert feed.next_attempt_at is not None and feed.next_attempt_at > clock.now
    assert set(published(service)) == before
    assert status(service, "Helix Vektor").last_error is None
    shown = status_json(run_cli, service)["BioTech Nord"]
    assert (shown["state"], shown["last_error"], shown["items"]) == ("failing", reason, 5)


def test_unreadable_dates_are_a_warning_and_the_items_are_kept(
    make_service: Any, feed_server: FeedServer, clock: Clock, run_cli: Any
) -> None:
    # No charset in the header: the page declares ISO-8859-1 in a <meta> tag.
    url = serve_listing(feed_server, "/presse/", "uk-foerde-pressemitteilungen.html")
    service = make_service(
        [
            {
                "name": "UK Förde",
                "url": url,
                "kind": "html",
                "language": "de",
                "selectors": PRESS_TABLE_SELECTORS,
            }
        ]
    )

    outcome = fetch(service)["UK Förde"]

    warning = (
        "2 of 3 dates could not be read with date_format '%d. %B %Y'; "
        "those items are dated when first seen"
    )
    assert (outcome.state, outcome.new_entries, outcome.message) == ("new", 3, warning)
    feed = status(service, "UK Förde")
    assert (feed.state, feed.last_error, feed.last_warning) == ("ok", None, warning)
    entries = published(service)
    assert utc(entries["Förde-Klinikum prüft Sepsis-Schnelltest in der Notaufnahme"]) == clock.now
    assert utc(entries["Neue Professur für Gentherapie besetzt"]) == clock.now
    grundstein = entries["Grundsteinlegung für das Zentrum für Zelltherapie"]
    assert utc(grundstein) == datetime(2026, 11, 17, 23, 0, tzinfo=UTC)
    assert grundstein.link == feed_server.url("/presse/pm/2026/zentrum-zelltherapie.html")
    professur = entries["Neue Professur für Gentherapie besetzt"]
    assert professur.summary == "Prof. Dr. Jörg Überall übernimmt zum 1. Dezember den Lehrstuhl."
    shown = status_json(run_cli, service)["UK Förde"]
    assert (shown["state"], shown["warning"], shown["last_error"]) == ("ok", warning, None)


# -- the config names what is wrong with a listing source ------------------------------


@pytest.mark.parametrize(
    ("feed", "key", "message"),
    [
        pytest.param(
            {"kind": "html"},
            "feeds[1].selectors",
            'kind "html" needs a [feeds.selectors] table with at least item and title',
            id="html-without-selectors",
        ),
        pytest.param(
            {"kind": "html", "selectors": {**GERMAN_SELECTORS, "item": "div.news-list-view["}},
            "feeds[1].selectors.item",
            "not a valid CSS selector",
            id="invalid-item-selector",
        ),
        pytest.param(
            {"kind": "html", "selectors": {**GERMAN_SELECTORS, "date": "span:nth-child(x)"}},
            "feeds[1].selectors.date",
            "not a valid CSS selector",
            id="invalid-date-selector",
        ),
        pytest.param(
            {"kind": "html", "selectors": {**GERMAN_SELECTORS, "date_format": "DD.MM.YYYY"}},
            "feeds[1].selectors.date_format",
            'expected a strftime pattern such as "%d.%m.%Y" or "%d. %B %Y"',
            id="date-format-without-percent",
        ),
        pytest.param(
            {"selectors": GERMAN_SELECTORS},
            "feeds[1].selectors",
            'selectors are only used with kind = "html"',
            id="selectors-on-a-feed",
        ),
        pytest.param(
            {"kind": "html", "selectors": {"title": "h3"}},
            "feeds[1].selectors.item",
            "required key is missing",
            id="selectors-without-item",
        ),
    ],
)
def test_listing_config_problems_name_the_key(
    tmp_path: Path, feed: dict[str, Any], key: str, message: str
) -> None:
    path = config_file(
        tmp_path,
        [
            {"name": "Helix Vektor", "url": "https://www.helix-vektor.example/feed.rss"},
            {"name": "BioTech Nord", "url": "https://www.biotech-nord.example/aktuelles/", **feed},
        ],
        "sqlite:///state.sqlite3",
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    problems = {p.key: p.message for p in caught.value.problems}
    assert key in problems, caught.value
    assert message in problems[key]
    assert str(path) in str(caught.value)


# -- a page that announces its feed --------------------------------------------------------


def test_page_instead_of_feed_names_the_announced_feed(
    make_service: Any, feed_server: FeedServer, run_cli: Any
) -> None:
    url = serve_listing(feed_server, "/newsroom/", "kristallwerk-newsroom.html")
    feed_server.serve_file("/news/feed.rss", HELIX, content_type="application/rss+xml")
    service = make_service([{"name": "KristallWerk", "url": url}])

    outcome = fetch(service)["KristallWerk"]

    announced = feed_server.url("/news/feed.rss")
    assert outcome.state == "failed"
    feed = status(service, "KristallWerk")
    assert feed.last_error is not None
    assert feed.last_error.startswith("the URL returned an HTML page, not a feed")
    assert feed.last_error.endswith(
        f"; the page announces: {announced} "
        "(put one of them into the config as url, or set discover = true)"
    )
    assert (feed.entries, feed.discovered_url, feed.fetch_url) == (0, None, url)
    assert feed_server.requests_for("/news/feed.rss") == []
    shown = status_json(run_cli, service)["KristallWerk"]
    assert announced in shown["last_error"]
    assert shown["discovered_url"] is None


def test_discover_uses_the_announced_feed_now_and_later(
    make_service: Any, feed_server: FeedServer, clock: Clock, run_cli: Any
) -> None:
    url = serve_listing(feed_server, "/newsroom/", "kristallwerk-newsroom.html")
    feed_server.serve_file("/news/feed.rss", HELIX, content_type="application/rss+xml")
    service = make_service([{"name": "KristallWerk", "url": url, "discover": True}])

    outcome = fetch(service)["KristallWerk"]

    announced = feed_server.url("/news/feed.rss")
    # In the same cycle: the page, then the feed it announces.
    assert (outcome.state, outcome.new_entries) == ("new", 5)
    assert len(feed_server.requests_for("/newsroom/")) == 1
    assert len(feed_server.requests_for("/news/feed.rss")) == 1
    feed = status(service, "KristallWerk")
    assert (feed.state, feed.last_error, feed.consecutive_failures) == ("ok", None, 0)
    assert (feed.discovered_url, feed.fetch_url, feed.url) == (announced, announced, url)
    assert feed.entries == 5
    assert len(published(service)) == 5

    clock.now += timedelta(minutes=30)
    again = fetch(service, due_only=True)["KristallWerk"]

    # Straight to the discovered feed, conditionally; the page is not asked again.
    assert again.state == "unchanged"
    assert len(feed_server.requests_for("/newsroom/")) == 1
    requests = feed_server.requests_for("/news/feed.rss")
    assert len(requests) == 2
    assert requests[-1].headers.get("if-none-match") == feed.etag
    shown = status_json(run_cli, service)["KristallWerk"]
    assert (shown["discovered_url"], shown["fetch_url"], shown["url"]) == (
        announced,
        announced,
        url,
    )
    assert (shown["state"], shown["last_error"], shown["items"]) == ("ok", None, 5)
