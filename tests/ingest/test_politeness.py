"""Politeness towards partners' servers, wired end to end (issue 8, point 1).

``tests/ingest/test_polling.py`` checks the pure rules; these tests check that the service
follows them over real HTTP on 127.0.0.1 with a real store: which requests the
partner's server actually received (its request log), what ``clusterfeed status``
shows the operator, and what the published feed contains. Time is a clock the test
moves by hand; nothing sleeps and nothing measures elapsed time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from clusterfeed.app.service import FeedOutcome, Service
from clusterfeed.config import load_config
from clusterfeed.model import FeedStatus
from clusterfeed.store import Store
from tests.conftest import EXAMPLE_FEEDS, Clock, FeedServer, Route, write_config

HELIX = EXAMPLE_FEEDS / "helix-vektor.rss"
ELBMED = EXAMPLE_FEEDS / "elbmed-pharma.atom"
INTERVAL = timedelta(minutes=30)  # schedule.fetch_interval_minutes by default
ONE_DAY = timedelta(days=1)


@pytest.fixture
def make_service(tmp_path: Path, database_url: str, clock: Clock) -> Iterator[Any]:
    """A prepared Service for a list of feeds; calling it again rewrites the config
    (as an operator editing the file) and builds a new Service on the same store."""
    stores: dict[str, Store] = {}

    def make(feeds: list[dict[str, Any]], extra: str = "") -> Service:
        config = load_config(write_config(tmp_path, feeds, database_url=database_url, extra=extra))
        store = stores.get(config.database_url) or Store(config.database_url)
        stores[config.database_url] = store
        service = Service(config, store, clock=clock)
        service.prepare()
        return service

    yield make
    for store in stores.values():
        store.close()


def fetch(service: Service, *, due_only: bool = False) -> dict[str, FeedOutcome]:
    return {o.name: o for o in asyncio.run(service.fetch(due_only=due_only))}


def status(service: Service, name: str) -> FeedStatus:
    return {s.name: s for s in service.store.feed_statuses()}[name]


def asked(server: FeedServer, path: str) -> int:
    """How many times the partner's server was asked for ``path``."""
    return len(server.requests_for(path))


def status_json(run_cli: Any, service: Service) -> dict[str, dict[str, Any]]:
    result = run_cli("status", "--config", service.config.source, "--json")
    assert result.exit_code == 0, result.output
    return {f["name"]: f for f in json.loads(result.stdout)}


def status_table_row(run_cli: Any, service: Service, name: str) -> dict[str, str]:
    """One feed's row of the ``clusterfeed status`` table, by column name."""
    result = run_cli("status", "--config", service.config.source)
    assert result.exit_code == 0, result.output

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.replace("┃", "│").strip().strip("│").split("│")]

    lines = result.stdout.splitlines()
    (header,) = [cells(line) for line in lines if "┃ feed " in line]
    (row,) = [cells(line) for line in lines if f"│ {name} " in line]
    return dict(zip(header, row, strict=True))


# -- back-off after failures ------------------------------------------------------------


def test_failing_feed_backs_off_growing_and_recovers(
    make_service: Any, feed_server: FeedServer, clock: Clock, run_cli: Any
) -> None:
    feed_server.routes["/broken.rss"] = Route(b"<h1>Datenbankfehler</h1>", "text/html", status=500)
    helix = feed_server.serve_file("/helix.rss", HELIX)
    service = make_service(
        [
            {"name": "Broken Partner", "url": feed_server.url("/broken.rss")},
            {"name": "Helix Vektor", "url": helix},
        ]
    )

    delays = []
    for failure in (1, 2):
        started = clock.now
        fetch(service, due_only=True)
        broken = status(service, "Broken Partner")
        assert asked(feed_server, "/broken.rss") == failure
        assert (broken.state, broken.consecutive_failures) == ("failing", failure)
        assert broken.last_error == "HTTP 500 Internal Server Error"
        assert broken.next_attempt_at is not None and broken.next_attempt_at > started
        delays.append(broken.next_attempt_at - started)
        # The good feed on the same server polls at its normal interval.
        assert status(service, "Helix Vektor").next_attempt_at == started + INTERVAL
        clock.now = broken.next_attempt_at

    # Half an hour after the second failure Helix Vektor is due again, Broken Partner
    # (at least 48 minutes of back-off) is not: the scheduler's fetch skips it.
    second_failure_at = status(service, "Broken Partner").last_attempt_at
    assert second_failure_at is not None
    clock.now = second_failure_at + INTERVAL
    helix_asked = asked(feed_server, "/helix.rss")
    fetch(service, due_only=True)
    assert asked(feed_server, "/helix.rss") == helix_asked + 1
    assert asked(feed_server, "/broken.rss") == 2
    skipped = status(service, "Broken Partner")
    assert (skipped.consecutive_failures, skipped.last_attempt_at) == (2, second_failure_at)
    assert skipped.next_attempt_at is not None
    clock.now = skipped.next_attempt_at - timedelta(seconds=1)
    fetch(service, due_only=True)
    assert asked(feed_server, "/broken.rss") == 2

    # The moment the back-off ends, it is asked again, and waits longer still.
    clock.now = skipped.next_attempt_at
    fetch(service, due_only=True)
    third = status(service, "Broken Partner")
    assert asked(feed_server, "/broken.rss") == 3
    assert third.consecutive_failures == 3
    assert third.next_attempt_at is not None
    delays.append(third.next_attempt_at - clock.now)
    # interval ±20 % jitter, doubled per failure, never under the interval:
    # 30–36 min, then 48–72 min, then 96–144 min.
    assert INTERVAL <= delays[0] <= INTERVAL * 1.2
    assert INTERVAL * 2 * 0.8 <= delays[1] <= INTERVAL * 2 * 1.2
    assert INTERVAL * 4 * 0.8 <= delays[2] <= INTERVAL * 4 * 1.2
    assert delays[0] < delays[1] < delays[2]

    shown = status_json(run_cli, service)["Broken Partner"]
    assert (shown["state"], shown["consecutive_errors"]) == ("failing", 3)
    assert shown["next_attempt"] == third.next_attempt_at.isoformat()
    assert shown["failing_since"] == datetime(2026, 11, 26, 7, 0, tzinfo=UTC).isoformat()

    # The operator types `clusterfeed fetch`: every feed is asked, back-off or not.
    clock.advance(timedelta(minutes=1))
    fetch(service)
    assert asked(feed_server, "/broken.rss") == 4
    assert status(service, "Broken Partner").consecutive_failures == 4

    # The partner repairs its server: one success and the feed is back to normal.
    feed_server.serve_file("/broken.rss", ELBMED, content_type="application/atom+xml")
    recovering = status(service, "Broken Partner")
    assert recovering.next_attempt_at is not None
    clock.now = recovering.next_attempt_at
    outcome = fetch(service, due_only=True)["Broken Partner"]
    repaired = status(service, "Broken Partner")
    assert (outcome.state, outcome.new_entries) == ("new", 5)
    assert (repaired.state, repaired.consecutive_failures) == ("ok", 0)
    assert (repaired.last_error, repaired.failing_since) == (None, None)
    assert repaired.next_attempt_at == clock.now + INTERVAL
    assert repaired.last_success_at == clock.now

    helix_status = status(service, "Helix Vektor")
    assert (helix_status.state, helix_status.consecutive_failures) == ("ok", 0)
    assert (helix_status.entries, helix_status.last_error) == (5, None)


# -- 410 Gone -----------------------------------------------------------------------


def test_gone_feed_is_never_asked_again_until_its_url_changes(
    make_service: Any, feed_server: FeedServer, clock: Clock, run_cli: Any
) -> None:
    feed_server.routes["/presse/rss.xml"] = Route(b"Gone", "text/plain", status=410)
    helix = feed_server.serve_file("/helix.rss", HELIX)
    feeds = [
        {"name": "Nordlicht Diagnostics", "url": feed_server.url("/presse/rss.xml")},
        {"name": "Helix Vektor", "url": helix},
    ]
    service = make_service(feeds)

    outcomes = fetch(service)

    gone = status(service, "Nordlicht Diagnostics")
    assert outcomes["Nordlicht Diagnostics"].state == "failed"
    assert (gone.state, gone.next_attempt_at, gone.last_status) == ("gone", None, 410)
    assert gone.last_error == (
        "HTTP 410 Gone: the partner removed this feed, so clusterfeed stopped asking for it; "
        "remove it from the config or give it a new url"
    )
    assert outcomes["Helix Vektor"].new_entries == 5

    # Neither the scheduler (two days later) nor the operator's own command asks again.
    clock.advance(timedelta(days=2))
    fetch(service, due_only=True)
    fetch(service)
    assert asked(feed_server, "/presse/rss.xml") == 1
    assert asked(feed_server, "/helix.rss") == 3
    assert status(service, "Nordlicht Diagnostics").state == "gone"

    shown = status_json(run_cli, service)["Nordlicht Diagnostics"]
    assert (shown["state"], shown["next_attempt"]) == ("gone", None)
    assert "remove it from the config or give it a new url" in shown["last_error"]
    row = status_table_row(run_cli, service, "Nordlicht Diagnostics")
    assert (row["state"], row["next attempt"]) == ("gone", "stopped")

    # The operator finds the partner's new feed and edits the config.
    new_url = feed_server.serve_file("/newsroom/feed.atom", ELBMED)
    feeds[0] = {"name": "Nordlicht Diagnostics", "url": new_url}
    service = make_service(feeds)

    back = status(service, "Nordlicht Diagnostics")
    assert (back.state, back.next_attempt_at, back.consecutive_failures) == ("new", None, 0)
    outcome = fetch(service, due_only=True)["Nordlicht Diagnostics"]
    assert (outcome.state, outcome.new_entries) == ("new", 5)
    assert asked(feed_server, "/newsroom/feed.atom") == 1
    assert asked(feed_server, "/presse/rss.xml") == 1
    back = status(service, "Nordlicht Diagnostics")
    assert (back.state, back.last_error, back.next_attempt_at) == ("ok", None, clock.now + INTERVAL)


# -- redirects ------------------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 308])
def test_permanent_redirect_is_stored_and_used_and_reported(
    make_service: Any,
    feed_server: FeedServer,
    clock: Clock,
    run_cli: Any,
    caplog: pytest.LogCaptureFixture,
    code: int,
) -> None:
    feed_server.serve_file("/de/news.atom", ELBMED, content_type="application/atom+xml")
    feed_server.routes["/feed.atom"] = Route(
        b"", status=code, headers={"Location": "/de/news.atom"}
    )
    service = make_service([{"name": "Elbmed", "url": feed_server.url("/feed.atom")}])
    new_url = feed_server.url("/de/news.atom")

    with caplog.at_level(logging.WARNING, logger="clusterfeed"):
        outcome = fetch(service)["Elbmed"]

    assert (outcome.state, outcome.new_entries) == ("new", 5)
    moved = status(service, "Elbmed")
    assert (moved.moved_to, moved.fetch_url, moved.state) == (new_url, new_url, "ok")
    assert moved.url == feed_server.url("/feed.atom")
    assert f"feed 'Elbmed' moved to {new_url}: update the config" in caplog.text

    clock.advance(INTERVAL)
    again = fetch(service, due_only=True)["Elbmed"]

    # Straight to the new address, conditionally; the old one is not asked again.
    assert asked(feed_server, "/feed.atom") == 1
    assert asked(feed_server, "/de/news.atom") == 2
    assert feed_server.requests_for("/de/news.atom")[-1].headers.get("if-none-match")
    assert (again.state, again.new_entries) == ("unchanged", 0)
    # That fetch saw no redirect, and must not have forgotten the move.
    assert status(service, "Elbmed").moved_to == new_url

    shown = status_json(run_cli, service)["Elbmed"]
    assert (shown["moved_to"], shown["fetch_url"]) == (new_url, new_url)
    assert shown["url"] == feed_server.url("/feed.atom")
    row = status_table_row(run_cli, service, "Elbmed")
    assert row["problem"] == f"moved to {new_url}: update the config."


@pytest.mark.parametrize("code", [302, 307])
def test_temporary_redirect_is_followed_but_not_stored(
    make_service: Any, feed_server: FeedServer, clock: Clock, run_cli: Any, code: int
) -> None:
    feed_server.serve_file("/maintenance/news.atom", ELBMED)
    feed_server.routes["/feed.atom"] = Route(
        b"", status=code, headers={"Location": "/maintenance/news.atom"}
    )
    service = make_service([{"name": "Elbmed", "url": feed_server.url("/feed.atom")}])

    assert fetch(service)["Elbmed"].new_entries == 5
    clock.advance(INTERVAL)
    fetch(service, due_only=True)

    assert asked(feed_server, "/feed.atom") == 2  # still asks the configured address
    assert asked(feed_server, "/maintenance/news.atom") == 2
    stored = status(service, "Elbmed")
    assert (stored.moved_to, stored.fetch_url) == (None, feed_server.url("/feed.atom"))
    shown = status_json(run_cli, service)["Elbmed"]
    assert (shown["moved_to"], shown["state"]) == (None, "ok")
    assert status_table_row(run_cli, service, "Elbmed")["problem"] == ""


@pytest.mark.parametrize(
    ("chain", "remembered", "asked_after_two_fetches"),
    [
        # 301 then 302: the first move is for good, the second is not, so the feed's
        # new address is the 301's target ("an unbroken chain of 301/308"), and the
        # next fetch starts there.
        pytest.param((301, 302), "/b", {"/a": 1, "/b": 2, "/c": 2}, id="301-then-302"),
        # 302 then 301: the move starts temporary; nothing about it is permanent.
        pytest.param((302, 301), None, {"/a": 2, "/b": 2, "/c": 2}, id="302-then-301"),
        pytest.param((308, 301), "/c", {"/a": 1, "/b": 1, "/c": 2}, id="308-then-301"),
    ],
)
def test_redirect_chain_stores_only_the_permanent_prefix(
    make_service: Any,
    feed_server: FeedServer,
    clock: Clock,
    chain: tuple[int, int],
    remembered: str | None,
    asked_after_two_fetches: dict[str, int],
) -> None:
    feed_server.routes["/a"] = Route(b"", status=chain[0], headers={"Location": "/b"})
    feed_server.routes["/b"] = Route(b"", status=chain[1], headers={"Location": "/c"})
    feed_server.serve_file("/c", HELIX, content_type="application/rss+xml")
    service = make_service([{"name": "Helix Vektor", "url": feed_server.url("/a")}])

    assert fetch(service)["Helix Vektor"].new_entries == 5
    expected = feed_server.url(remembered) if remembered else None
    assert status(service, "Helix Vektor").moved_to == expected

    clock.advance(INTERVAL)
    assert fetch(service, due_only=True)["Helix Vektor"].state == "unchanged"

    assert {p: asked(feed_server, p) for p in ("/a", "/b", "/c")} == asked_after_two_fetches
    assert status(service, "Helix Vektor").moved_to == expected


# -- what the server says about waiting ------------------------------------------------


@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_seconds_is_honoured(
    make_service: Any, feed_server: FeedServer, clock: Clock, code: int
) -> None:
    feed_server.routes["/feed.rss"] = Route(
        b"Slow down", "text/plain", status=code, headers={"Retry-After": "7200"}
    )
    service = make_service([{"name": "Hanse Fonds", "url": feed_server.url("/feed.rss")}])
    failed_at = clock.now

    fetch(service, due_only=True)

    waiting = status(service, "Hanse Fonds")
    assert (waiting.state, waiting.last_status) == ("failing", code)
    assert waiting.next_attempt_at == failed_at + timedelta(hours=2)
    clock.advance(timedelta(hours=1, minutes=59))
    fetch(service, due_only=True)
    assert asked(feed_server, "/feed.rss") == 1
    clock.now = failed_at + timedelta(hours=2)
    fetch(service, due_only=True)
    assert asked(feed_server, "/feed.rss") == 2


@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_as_http_date_is_honoured(
    make_service: Any, feed_server: FeedServer, clock: Clock, code: int
) -> None:
    # An HTTP date is a moment on the server's (here: the real) clock, three hours on.
    retry_at = formatdate(time.time() + 3 * 3600, usegmt=True)
    feed_server.routes["/feed.rss"] = Route(
        b"Please come back later", "text/plain", status=code, headers={"Retry-After": retry_at}
    )
    service = make_service([{"name": "Hanse Fonds", "url": feed_server.url("/feed.rss")}])

    fetch(service, due_only=True)

    wait = status(service, "Hanse Fonds").next_attempt_at
    assert wait is not None
    # Whole seconds in the header, and the few seconds this test takes to get there.
    assert timedelta(hours=3) - timedelta(minutes=5) <= wait - clock.now <= timedelta(hours=3)


@pytest.mark.parametrize(
    ("code", "retry_after", "expected"),
    [
        pytest.param(429, "259200", ONE_DAY, id="three-days-capped-at-one"),
        pytest.param(
            503,
            formatdate(time.time() + 7 * 86400, usegmt=True),
            ONE_DAY,
            id="date-next-week-capped-at-one-day",
        ),
    ],
)
def test_retry_after_is_capped_at_one_day(
    make_service: Any,
    feed_server: FeedServer,
    clock: Clock,
    code: int,
    retry_after: str,
    expected: timedelta,
) -> None:
    feed_server.routes["/feed.rss"] = Route(
        b"", "text/plain", status=code, headers={"Retry-After": retry_after}
    )
    service = make_service([{"name": "Hanse Fonds", "url": feed_server.url("/feed.rss")}])

    fetch(service, due_only=True)

    assert status(service, "Hanse Fonds").next_attempt_at == clock.now + expected


def test_retry_after_on_a_500_is_not_a_reason_to_wait(
    make_service: Any, feed_server: FeedServer, clock: Clock
) -> None:
    feed_server.routes["/feed.rss"] = Route(
        b"", "text/plain", status=500, headers={"Retry-After": "7200"}
    )
    service = make_service([{"name": "Hanse Fonds", "url": feed_server.url("/feed.rss")}])

    fetch(service, due_only=True)

    wait = status(service, "Hanse Fonds").next_attempt_at
    assert wait is not None
    assert INTERVAL <= wait - clock.now <= INTERVAL * 1.2


@pytest.mark.parametrize(
    ("max_age", "expected"),
    [
        pytest.param(7200, timedelta(hours=2), id="two-hours"),
        pytest.param(60, INTERVAL, id="shorter-than-the-interval"),
        pytest.param(172800, ONE_DAY, id="two-days-capped-at-one"),
    ],
)
def test_cache_control_max_age_is_a_lower_bound_on_the_next_poll(
    make_service: Any, feed_server: FeedServer, clock: Clock, max_age: int, expected: timedelta
) -> None:
    feed_server.serve_file(
        "/helix.rss",
        HELIX,
        content_type="application/rss+xml",
        headers={"Cache-Control": f"public, max-age={max_age}"},
    )
    service = make_service([{"name": "Helix Vektor", "url": feed_server.url("/helix.rss")}])
    first = clock.now

    assert fetch(service, due_only=True)["Helix Vektor"].new_entries == 5

    fresh = status(service, "Helix Vektor")
    assert (fresh.state, fresh.next_attempt_at) == ("ok", first + expected)
    clock.now = first + expected - timedelta(minutes=1)
    fetch(service, due_only=True)
    assert asked(feed_server, "/helix.rss") == 1
    clock.now = first + expected
    fetch(service, due_only=True)
    assert asked(feed_server, "/helix.rss") == 2
    # The 304 carries the same Cache-Control, and is believed the same way.
    again = status(service, "Helix Vektor")
    assert (again.last_status, again.next_attempt_at) == (304, clock.now + expected)


# -- at most N requests at once to one host --------------------------------------------


class GaugedFeedServer(FeedServer):
    """conftest's server, also counting the requests it is working on at once.

    A request counts from the moment the handler has it until the moment its answer
    starts (``send_response``), so the client cannot have seen that answer yet: two
    requests counted at the same time were both in flight at the client.
    """

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.peak = 0
        gauge_lock = threading.Lock()
        gauge = self
        base: Any = self.httpd.RequestHandlerClass

        class Gauged(base):  # type: ignore[misc]
            counted = False

            def do_GET(self) -> None:
                with gauge_lock:
                    gauge.in_flight += 1
                    gauge.peak = max(gauge.peak, gauge.in_flight)
                self.counted = True
                super().do_GET()

            def send_response(self, code: int, message: str | None = None) -> None:
                if self.counted:
                    self.counted = False
                    with gauge_lock:
                        gauge.in_flight -= 1
                super().send_response(code, message)

        self.httpd.RequestHandlerClass = Gauged


@pytest.fixture
def gauged_server() -> Iterator[GaugedFeedServer]:
    server = GaugedFeedServer()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize(
    ("fetch_table", "limit"),
    [
        pytest.param("concurrency = 8\nper_host = 2\n", 2, id="per_host-2"),
        pytest.param("concurrency = 8\n", 2, id="default-is-2"),
        pytest.param("concurrency = 8\nper_host = 6\n", 6, id="per_host-6"),
    ],
)
def test_one_host_never_sees_more_than_per_host_requests(
    make_service: Any, gauged_server: GaugedFeedServer, rss_feed: Any, fetch_table: str, limit: int
) -> None:
    feeds = []
    for i in range(6):
        partner = f"Partner {i + 1} (Shared Hosting)"
        body = rss_feed(
            partner,
            [
                {
                    "title": f"Neuigkeiten von Partner {i + 1}",
                    "link": f"https://partner-{i + 1}.example/news/1",
                }
            ],
            link=f"https://partner-{i + 1}.example/",
        )
        gauged_server.routes[f"/p{i}/feed.rss"] = Route(body, delay=0.3)
        feeds.append({"name": partner, "url": gauged_server.url(f"/p{i}/feed.rss")})
    service = make_service(feeds, extra=f"[fetch]\n{fetch_table}")

    outcomes = fetch(service)

    assert [o.new_entries for o in outcomes.values()] == [1] * 6
    assert all(len(gauged_server.requests_for(f"/p{i}/feed.rss")) == 1 for i in range(6))
    assert gauged_server.in_flight == 0
    if limit == 2:
        assert gauged_server.peak <= 2
    else:
        # The same server does see a burst when the limit allows it (so the gauge works).
        assert gauged_server.peak > 2


# -- a gzip bomb ----------------------------------------------------------------------


def test_gzip_bomb_stops_at_the_size_cap_with_bounded_memory(
    make_service: Any, feed_server: FeedServer
) -> None:
    # 50 MB of spaces in an RSS wrapper: it gzips to about 50 kB.
    bomb = (
        b'<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel>'
        b"<title>Elbe Archiv</title><link>https://elbe-archiv.example/</link><description>"
        + b" " * 50_000_000
        + b"</description></channel></rss>"
    )
    feed_server.routes["/archiv.rss"] = Route(bomb, gzip=True)
    del bomb
    helix = feed_server.serve_file("/helix.rss", HELIX)
    service = make_service(
        [
            {"name": "Elbe Archiv", "url": feed_server.url("/archiv.rss")},
            {"name": "Helix Vektor", "url": helix},
        ],
        extra="[fetch]\nmax_bytes = 100000\n",
    )

    tracemalloc.start()
    try:
        outcomes = fetch(service)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    archiv = status(service, "Elbe Archiv")
    assert outcomes["Elbe Archiv"].state == "failed"
    assert archiv.last_error == (
        "response is larger than the limit of 100000 bytes (fetch.max_bytes)"
    )
    assert (archiv.entries, archiv.state) == (0, "failing")
    assert outcomes["Helix Vektor"].new_entries == 5
    assert status(service, "Helix Vektor").last_error is None
    # The bomb was delivered compressed (so it really was a bomb) ...
    request = feed_server.requests_for("/archiv.rss")[0]
    assert "gzip" in request.headers["accept-encoding"]
    # ... and never unpacked beyond the cap: a fifth of its size would already be 10 MB.
    print(f"tracemalloc peak while fetching the 50 MB gzip bomb: {peak / 1e6:.1f} MB")
    assert peak < 10_000_000
