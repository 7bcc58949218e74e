"""A partner's answer never leads clusterfeed to a local file or an internal address (issue 14.1).

Real servers on 127.0.0.1 play the partners and the "internal" service. A feed the
operator configured on a loopback address is the operator's choice, so to play a
partner on the public internet one server listens on 127.0.0.2 and the service is told
that this one address counts as public (``Service.address_check``, the only stand-in
here: this machine has no internet). Everything else is the real code path: httpx, the
guarded connection backend, the system's resolver, the store and the command line.
The pure rule (``netguard.address_problem``) is checked over all addresses with
hypothesis against Python's own classification.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import httpcore
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.ingest.fetch import FetchLimits, FetchRequest, fetch_all, fetch_local
from clusterfeed.ingest.netguard import (
    AddressRefused,
    AddressRule,
    GuardedBackend,
    address_problem,
    host_address,
)
from clusterfeed.model import PollFacts
from clusterfeed.store import Store
from tests.conftest import EXAMPLE_FEEDS, Clock, FeedServer, Route, write_config
from tests.helpers import fetch, status

HELIX = EXAMPLE_FEEDS / "helix-vektor.rss"
PUBLIC = IPv4Address("127.0.0.2")  # the stand-in for a partner on the internet


def internet(address: IPv4Address | IPv6Address) -> str | None:
    """The real rule, except that 127.0.0.2 counts as a public address."""
    return None if address == PUBLIC else address_problem(address)


@pytest.fixture
def partner() -> Iterator[FeedServer]:
    """A partner's server "on the internet" (127.0.0.2, public for ``internet``)."""
    server = FeedServer("127.0.0.2")
    yield server
    server.close()


@pytest.fixture
def internal(rss_feed: Any) -> Iterator[tuple[FeedServer, str]]:
    """A service on this machine that no partner may reach, with a secret feed."""
    server = FeedServer()
    marker = f"INTERNAL-{uuid.uuid4().hex}"
    body = rss_feed(marker, [{"title": marker, "link": "https://intranet.example/1"}])
    server.routes["/secret.rss"] = Route(body, content_type="application/rss+xml")
    yield server, marker
    server.close()


@pytest.fixture
def make_service(tmp_path: Path, database_url: str, clock: Clock) -> Iterator[Any]:
    stores: list[Store] = []

    def make(feeds: list[dict[str, Any]], extra: str = "", public: bool = True) -> Service:
        config = load_config(write_config(tmp_path, feeds, database_url=database_url, extra=extra))
        store = Store(config.database_url)
        stores.append(store)
        service = Service(config, store, clock=clock)
        if public:
            service.address_check = internet
        service.prepare()
        return service

    yield make
    for store in stores:
        store.close()


def everything_stored(service: Service) -> str:
    return "\n".join(
        s.entry.title + s.entry.summary_text for s in service.store.recent_stories(limit=1000)
    )


# -- the rule, over all addresses -----------------------------------------------------------


def _python_says_not_public(a: IPv4Address | IPv6Address) -> bool:
    return bool(
        not a.is_global
        or a.is_private
        or a.is_loopback
        or a.is_link_local
        or a.is_multicast
        or a.is_unspecified
        or a.is_reserved
    )


@given(st.ip_addresses(v=4))
def test_every_ipv4_address_python_calls_non_public_is_refused(address: IPv4Address) -> None:
    if _python_says_not_public(address):
        assert address_problem(address) is not None


@given(st.ip_addresses(v=4))
def test_ipv4_inside_ipv6_is_judged_as_the_ipv4_address(address: IPv4Address) -> None:
    expected = address_problem(address)
    n = int(address)
    for wrapped in (
        IPv6Address(f"::ffff:{address}"),  # IPv4-mapped
        IPv6Address((0x0064FF9B << 96) | n),  # NAT64, 64:ff9b::/96
        IPv6Address((0x2002 << 112) | (n << 80) | 1),  # 6to4
    ):
        assert address_problem(wrapped) == expected, wrapped


@given(st.ip_addresses(v=6))
def test_every_ipv6_address_python_calls_non_public_is_refused(address: IPv6Address) -> None:
    carries_ipv4 = address.ipv4_mapped or address.sixtofour or str(address).startswith("64:ff9b::")
    if _python_says_not_public(address) and not carries_ipv4:
        assert address_problem(address) is not None
    if address_problem(address) is None:
        assert carries_ipv4 or address in IPv6Network("2000::/3")


@pytest.mark.parametrize(
    "text",
    ["8.8.8.8", "1.1.1.1", "193.99.144.80", "2606:4700:4700::1111", "2a00:1450:4001::200e"],
)
def test_public_addresses_are_allowed(text: str) -> None:
    assert address_problem(host_address(text)) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("2130706433", "loopback"),  # decimal
        ("0x7f.1", "loopback"),  # hex, short form
        ("0177.0.0.1", "loopback"),  # octal
        ("127.1", "loopback"),
        ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("::ffff:7f00:1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("0", "unspecified"),
        ("[::]", "unspecified"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.31.255.255", "private"),
        ("100.64.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("2852039166", "link-local"),  # 169.254.169.254 in decimal
        ("[fd00:ec2::254]", "private"),
        ("fe80::1%25eth0", "link-local"),
        ("224.0.0.1", "multicast"),
        ("[ff02::1]", "multicast"),
        ("255.255.255.255", "reserved"),
        ("[::127.0.0.1]", "reserved"),  # IPv4-compatible, deprecated
    ],
)
def test_every_spelling_of_an_internal_address_is_recognised(host: str, kind: str) -> None:
    address = host_address(host)
    assert address is not None
    assert address_problem(address) == kind


PUBLIC_ORIGIN = AddressRule.for_feed("https://partner.example/feed.rss", allow_private=False)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "FILE:///etc/passwd",
        "File://localhost/etc/passwd",
        "/etc/passwd",
        "data:application/rss+xml,<rss/>",
        "ftp://partner.example/feed.rss",
        "gopher://127.0.0.1:70/",
        "javascript:alert(1)",
        "http://127.0.0.1/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0:8080/",
        "http://public.example@127.0.0.1/",
        "http://user:pw@partner.example/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "HTTP://10.0.0.1/",
        "http://[::1",
        "http:///feed",
    ],
)
def test_a_partner_may_not_send_clusterfeed_there(url: str) -> None:
    assert PUBLIC_ORIGIN.url_problem(url) is not None


def test_web_addresses_on_names_are_left_to_the_connection_check() -> None:
    for url in ("https://partner.example/feed.rss", "HTTP://Partner.Example/x", "http://8.8.8.8/"):
        assert PUBLIC_ORIGIN.url_problem(url) is None


def test_the_operator_chooses_private_addresses_by_naming_them() -> None:
    own = AddressRule.for_feed("http://127.0.0.1:8000/feed.rss", allow_private=False)
    assert own.url_problem("http://127.0.0.1:8000/other") is None  # the same host and port
    assert own.url_problem("http://2130706433:8000/other") is None  # another spelling of it
    assert own.url_problem("http://127.0.0.1:6379/") is not None  # another service
    assert own.url_problem("http://[::1]:8000/") is not None  # another host
    web = AddressRule.for_feed("http://10.1.2.3/feed.rss", allow_private=False)
    assert web.url_problem("https://10.1.2.3/feed.rss") is None  # from http to https
    assert web.url_problem("http://10.1.2.3:8080/feed.rss") is not None
    assert own.url_problem("http://10.0.0.1/") is not None
    assert own.url_problem("file:///etc/passwd") is not None
    assert AddressRule.for_feed("http://localhost:8000/", allow_private=False).trusted_host
    assert (
        AddressRule.for_feed("https://partner.example/", allow_private=False).trusted_host is None
    )
    anywhere = AddressRule.for_feed("https://partner.example/", allow_private=True)
    assert anywhere.url_problem("http://10.0.0.1/") is None
    assert anywhere.url_problem("file:///etc/passwd") is not None


# -- redirects ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 302, 307, 308])
@pytest.mark.parametrize(
    "location",
    ["file://{secret}", "FILE://{secret}", "file:///dev/zero", "ftp://127.0.0.1/", "data:,x"],
)
def test_a_redirect_to_a_local_file_is_never_read_nor_remembered(
    make_service: Any,
    feed_server: FeedServer,
    tmp_path: Path,
    rss_feed: Any,
    code: int,
    location: str,
) -> None:
    marker = f"LOCAL-FILE-{uuid.uuid4().hex}"
    secret = tmp_path / "secret.rss"
    secret.write_bytes(rss_feed(marker, [{"title": marker, "link": "https://x.example/1"}]))
    target = location.format(secret=secret)
    feed_server.routes["/feed.rss"] = Route(b"", status=code, headers={"Location": target})
    # Configured on 127.0.0.1 by the operator: even that feed's redirects stay on the web.
    service = make_service([{"name": "Nordlicht", "url": feed_server.url("/feed.rss")}])

    for _ in range(2):  # the second fetch is where the stored move used to be read
        outcome = fetch(service)["Nordlicht"]
        assert outcome.state == "failed"
        assert outcome.message is not None and "not fetched" in outcome.message

    stored = status(service, "Nordlicht")
    assert (stored.moved_to, stored.discovered_url) == (None, None)
    assert stored.fetch_url == feed_server.url("/feed.rss")
    assert marker not in everything_stored(service)
    assert len(feed_server.requests_for("/feed.rss")) == 2


REDIRECT_TARGETS = [
    "http://127.0.0.1:{port}/secret.rss",
    "http://localhost:{port}/secret.rss",  # a name: refused where the connection is made
    "http://2130706433:{port}/secret.rss",
    "http://0x7f.1:{port}/secret.rss",
    "http://0177.0.0.1:{port}/secret.rss",
    "http://[::ffff:127.0.0.1]:{port}/secret.rss",
    "http://0.0.0.0:{port}/secret.rss",
    "http://public.example@127.0.0.1:{port}/secret.rss",
    "//127.0.0.1:{port}/secret.rss",
]


@pytest.mark.parametrize("code", [301, 302])
@pytest.mark.parametrize("target", REDIRECT_TARGETS)
def test_a_public_feed_never_redirects_clusterfeed_inward(
    make_service: Any,
    partner: FeedServer,
    internal: tuple[FeedServer, str],
    code: int,
    target: str,
) -> None:
    inside, marker = internal
    location = target.format(port=inside.port)
    partner.routes["/feed.rss"] = Route(b"", status=code, headers={"Location": location})
    service = make_service([{"name": "Partner", "url": partner.url("/feed.rss")}])

    outcome = fetch(service)["Partner"]
    again = fetch(service)["Partner"]

    assert inside.requests == []  # not one request reached the internal service
    for o in (outcome, again):
        assert o.state == "failed"
        # Refused by the address rule, or (0177.0.0.1) already by httpx's URL parser.
        assert o.message is not None
        assert "not fetched: " in o.message or "Invalid URL" in o.message
    assert status(service, "Partner").moved_to is None
    assert marker not in everything_stored(service)


def test_a_name_that_resolves_inward_is_refused_when_connecting(
    make_service: Any, partner: FeedServer, internal: tuple[FeedServer, str]
) -> None:
    """No address in the URL to judge beforehand: the system resolver says where
    ``localhost`` is, and the guarded connection refuses it."""
    inside, _ = internal
    partner.routes["/feed.rss"] = Route(
        b"", status=301, headers={"Location": f"http://localhost:{inside.port}/secret.rss"}
    )
    service = make_service([{"name": "Partner", "url": partner.url("/feed.rss")}])

    message = fetch(service)["Partner"].message or ""

    assert inside.requests == []
    assert f"not fetched: localhost:{inside.port} (" in message
    assert "a loopback address" in message


def test_the_operator_may_let_partners_reach_an_internal_network(
    make_service: Any, partner: FeedServer, internal: tuple[FeedServer, str]
) -> None:
    inside, marker = internal
    location = f"http://localhost:{inside.port}/secret.rss"
    partner.routes["/feed.rss"] = Route(b"", status=302, headers={"Location": location})
    service = make_service(
        [{"name": "Partner", "url": partner.url("/feed.rss")}],
        extra="[fetch]\nallow_private_addresses = true\n",
    )

    outcome = fetch(service)["Partner"]

    assert (outcome.state, outcome.new_entries) == ("new", 1)
    assert marker in everything_stored(service)


def test_a_feed_on_a_private_address_may_redirect_within_its_host_and_port(
    make_service: Any, feed_server: FeedServer, internal: tuple[FeedServer, str], rss_feed: Any
) -> None:
    """The operator named 127.0.0.1 and one port: that service, not the machine."""
    inside, marker = internal
    feed_server.routes["/new.rss"] = Route(
        rss_feed("Own", [{"title": "Own news", "link": "https://own.example/1"}])
    )
    moves = {
        "/feed.rss": "/new.rss",
        "/other-port.rss": inside.url("/secret.rss"),
        "/other-host.rss": f"http://localhost:{feed_server.port}/new.rss",
    }
    for path, location in moves.items():
        feed_server.routes[path] = Route(b"", status=301, headers={"Location": location})
    service = make_service(
        [{"name": path, "url": feed_server.url(path)} for path in moves], public=False
    )

    outcomes = fetch(service)

    assert (outcomes["/feed.rss"].state, outcomes["/feed.rss"].new_entries) == ("new", 1)
    assert status(service, "/feed.rss").moved_to == feed_server.url("/new.rss")
    for refused in ("/other-port.rss", "/other-host.rss"):
        assert outcomes[refused].state == "failed"
        assert "not fetched" in (outcomes[refused].message or "")
        assert status(service, refused).moved_to is None
    assert inside.requests == []
    assert marker not in everything_stored(service)


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's own backend, noting the host each connection was asked for."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.hosts: list[str] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        self.hosts.append(host)
        return await self.inner.connect_tcp(host, port, timeout, local_address, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def test_the_connection_goes_to_the_very_address_that_was_checked(
    internal: tuple[FeedServer, str],
) -> None:
    """DNS rebinding needs a second look-up between the check and the connection: the
    name is resolved once, and the connection is made to the number that passed."""
    inside, _ = internal
    loopback_v4 = IPv4Address("127.0.0.1")

    async def connect(check: Any) -> list[str]:
        recording = RecordingBackend()
        backend = GuardedBackend(AddressRule(check=check), inner=recording)
        stream = await backend.connect_tcp("localhost", inside.port, timeout=5)
        await stream.aclose()
        return recording.hosts

    # Only 127.0.0.1 counts as public here; ::1, which localhost may also resolve to,
    # does not, so it is never tried.
    hosts = asyncio.run(connect(lambda a: None if a == loopback_v4 else address_problem(a)))
    assert hosts == ["127.0.0.1"]
    with pytest.raises(AddressRefused, match=r"localhost:\d+ \(.*\) is a loopback address"):
        asyncio.run(connect(address_problem))


def _same_port_pair() -> tuple[socket.socket, socket.socket, int]:
    """A socket on 127.0.0.3 that takes no more connections and a listening one on
    127.0.0.1, on the same port."""
    for _ in range(20):
        hole = socket.socket()
        hole.bind(("127.0.0.3", 0))
        hole.listen(0)
        port = hole.getsockname()[1]
        good = socket.socket()
        try:
            good.bind(("127.0.0.1", port))
        except OSError:
            hole.close()
            good.close()
            continue
        good.listen(8)
        return hole, good, port
    raise RuntimeError("no port free on both addresses")


def test_an_address_that_never_answers_does_not_hold_up_the_next() -> None:
    """A host name may resolve to an address whose packets are dropped (a broken IPv6
    route): the next address is tried meanwhile, as anyio did before clusterfeed
    resolved names itself."""
    hole, good, port = _same_port_pair()
    # One connection fills the accept queue of a listen(0) socket that never accepts;
    # Linux then drops further SYNs, so a connection there waits forever.
    filler = socket.create_connection(("127.0.0.3", port))
    backend = GuardedBackend(AddressRule(allow_private=True))

    async def connect() -> Any:
        # No connect timeout at all: trying the addresses one after the other would
        # wait here forever (the bound below only turns that into a failure).
        async with asyncio.timeout(60):
            stream = await backend.connect_first(
                [IPv4Address("127.0.0.3"), IPv4Address("127.0.0.1")], port, timeout=None
            )
        peer = stream.get_extra_info("server_addr")
        await stream.aclose()
        return peer

    try:
        assert asyncio.run(connect())[0] == "127.0.0.1"
    finally:
        for sock in (filler, hole, good):
            sock.close()


# -- announced feeds and listing pages ---------------------------------------------------------


def _page_announcing(url: str) -> bytes:
    return (
        "<!doctype html><html><head><title>News</title>"
        f'<link rel="alternate" type="application/rss+xml" href="{url}">'
        "</head><body><h1>News</h1></body></html>"
    ).encode()


@pytest.mark.parametrize(
    "announced",
    [
        "http://127.0.0.1:{port}/secret.rss",
        "//[::ffff:127.0.0.1]:{port}/secret.rss",
        "http://localhost:{port}/secret.rss",
    ],
)
def test_discovery_never_follows_a_page_inward(
    make_service: Any,
    partner: FeedServer,
    internal: tuple[FeedServer, str],
    run_cli: Any,
    announced: str,
) -> None:
    inside, marker = internal
    partner.routes["/news/"] = Route(
        _page_announcing(announced.format(port=inside.port)), content_type="text/html"
    )
    service = make_service([{"name": "Partner", "url": partner.url("/news/"), "discover": True}])

    outcome = fetch(service)["Partner"]
    fetch(service)

    assert inside.requests == []
    assert outcome.state == "failed"
    assert "not fetched" in (outcome.message or "")
    stored = status(service, "Partner")
    assert (stored.discovered_url, stored.fetch_url) == (None, partner.url("/news/"))
    assert marker not in everything_stored(service)


def test_discovery_from_a_page_on_this_machine_stays_on_its_port(
    make_service: Any, feed_server: FeedServer, internal: tuple[FeedServer, str]
) -> None:
    """The operator named 127.0.0.1 and one port; the page may not point at another."""
    inside, marker = internal
    feed_server.routes["/news/"] = Route(
        _page_announcing(inside.url("/secret.rss")), content_type="text/html"
    )
    service = make_service(
        [{"name": "Local", "url": feed_server.url("/news/"), "discover": True}], public=False
    )

    outcome = fetch(service)["Local"]

    assert inside.requests == []
    assert "not fetched" in (outcome.message or "")
    assert status(service, "Local").discovered_url is None
    assert marker not in everything_stored(service)


def test_a_listing_page_s_item_links_are_never_fetched_nor_published_as_files(
    make_service: Any, partner: FeedServer, internal: tuple[FeedServer, str], tmp_path: Path
) -> None:
    inside, _ = internal
    secret = tmp_path / "secret.txt"
    secret.write_text(f"LISTING-SECRET-{uuid.uuid4().hex}", encoding="utf-8")
    links = [
        f"file://{secret}",
        inside.url("/secret.rss"),
        f"http://localhost:{inside.port}/secret.rss",
        "javascript:alert(1)",
    ]
    items = "".join(
        f'<div class="item"><a href="{link}">Item {i}</a></div>' for i, link in enumerate(links)
    )
    partner.routes["/news/"] = Route(
        f"<html><body>{items}</body></html>".encode(), content_type="text/html"
    )
    selectors = '[feeds.selectors]\nitem = "div.item"\ntitle = "a"\n'
    feed = {"name": "Partner", "url": partner.url("/news/"), "kind": "html"}
    service = make_service([], extra=f"[[feeds]]\n{_toml_table(feed)}\n{selectors}")

    outcome = fetch(service)["Partner"]

    assert (outcome.state, outcome.new_entries) == ("new", 4)
    assert inside.requests == []
    published = {s.entry.title: s.entry.link for s in service.store.recent_stories()}
    assert published["Item 0"] is None or published["Item 0"].startswith("http")
    assert published["Item 3"] is None
    assert secret.read_text(encoding="utf-8") not in everything_stored(service)


def _toml_table(values: dict[str, Any]) -> str:
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())


# -- remembered addresses from an older run ------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("moved_to", "file:///dev/zero"),
        ("moved_to", "file://{secret}"),
        ("moved_to", "FILE://{secret}"),
        ("moved_to", "{secret}"),
        ("moved_to", "http://169.254.169.254/latest/meta-data/"),
        ("moved_to", "http://[::1]:9/feed.rss"),
        ("moved_to", "gopher://127.0.0.1:70/"),
        ("discovered_url", "file://{secret}"),
        ("discovered_url", "http://2130706434:9/feed.rss"),  # 127.0.0.2: another host
    ],
)
def test_a_bad_remembered_address_is_dropped_with_a_warning_in_status(
    tmp_path: Path,
    feed_server: FeedServer,
    database_url: str,
    run_cli: Any,
    rss_feed: Any,
    field: str,
    bad: str,
) -> None:
    marker = f"STORED-{uuid.uuid4().hex}"
    secret = tmp_path / "secret.rss"
    secret.write_bytes(rss_feed(marker, [{"title": marker, "link": "https://x.example/1"}]))
    bad = bad.format(secret=secret)
    url = feed_server.serve_file("/feed.rss", HELIX, content_type="application/rss+xml")
    config = write_config(tmp_path, [{"name": "Helix", "url": url}], database_url=database_url)
    assert run_cli("fetch", "--config", config).exit_code == 0
    # What an older clusterfeed stored after a partner's redirect or page.
    store = Store(database_url)
    poll = PollFacts("failing", None, **{field: bad})
    store.record_failure("Helix", status=301, error="an older run", now=_now(), poll=poll)
    store.close()

    fetched = run_cli("fetch", "--config", config)
    shown = run_cli("status", "--config", config, "--json")
    table = run_cli("status", "--config", config)

    assert fetched.exit_code == 0, fetched.output
    assert "was dropped" in fetched.output
    (feed,) = json.loads(shown.stdout)
    assert (feed["moved_to"], feed["discovered_url"], feed["fetch_url"]) == (None, None, url)
    assert feed["state"] == "ok"
    assert feed["warning"].startswith(f"the remembered address {bad} (")
    assert "was dropped and the configured url is used again" in feed["warning"]
    assert "remembered" in table.stdout and "dropped" in table.stdout  # (wrapped in its cell)
    assert len(feed_server.requests_for("/feed.rss")) == 2
    store = Store(database_url)
    assert marker not in "\n".join(s.entry.title for s in store.recent_stories())
    store.close()


def _now() -> datetime:
    return datetime.now(UTC)


def test_a_remembered_move_whose_name_now_resolves_inward_is_dropped(
    make_service: Any, partner: FeedServer, internal: tuple[FeedServer, str]
) -> None:
    """The move passed every check when it was stored; its host's DNS changed since."""
    inside, marker = internal
    partner.serve_file("/feed.rss", HELIX, content_type="application/rss+xml")
    service = make_service([{"name": "Partner", "url": partner.url("/feed.rss")}])
    moved = f"http://localhost:{inside.port}/secret.rss"
    poll = PollFacts("ok", None, moved_to=moved)
    service.store.record_not_modified(
        "Partner", status=304, etag=None, last_modified=None, now=_now(), poll=poll
    )

    outcome = fetch(service)["Partner"]

    assert inside.requests == []
    # The configured url was asked in the same cycle.
    assert (outcome.state, outcome.new_entries) == ("new", 5)
    stored = status(service, "Partner")
    assert (stored.moved_to, stored.fetch_url) == (None, partner.url("/feed.rss"))
    assert stored.last_warning is not None
    assert stored.last_warning.startswith(f"the remembered address {moved} was dropped")
    assert marker not in everything_stored(service)


# -- local files ----------------------------------------------------------------------------------


def test_a_local_file_is_read_only_where_the_config_names_it(tmp_path: Path) -> None:
    secret = tmp_path / "secret.rss"
    secret.write_text("<rss/>", encoding="utf-8")
    limits = FetchLimits()
    moved = FetchRequest("Partner", str(secret), configured_url="http://127.0.0.1:9/feed.rss")
    named = FetchRequest("Local", str(secret))

    results = {r.feed_name: r for r in asyncio.run(fetch_all([moved, named], limits))}

    assert (results["Partner"].body, results["Partner"].refused) == (None, True)
    assert results["Local"].body == b"<rss/>"


def test_a_local_read_stops_at_max_bytes_whatever_the_file_claims() -> None:
    """/dev/zero says it is 0 bytes long and never ends; the read stops at the limit.

    In a child process with 1 GiB of address space, so the old unbounded read fails
    there (MemoryError) instead of taking this machine's memory."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
        "from clusterfeed.ingest.fetch import FetchLimits, FetchRequest, fetch_local\n"
        "r = fetch_local(FetchRequest('Zero', '/dev/zero'), FetchLimits(max_bytes=100_000))\n"
        "print(r.error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "larger than the limit of 100000 bytes (fetch.max_bytes)" in done.stdout


def test_a_local_file_within_the_limit_is_read_whole(tmp_path: Path) -> None:
    exact = tmp_path / "exact.xml"
    exact.write_bytes(b"x" * 10_000)
    result = fetch_local(FetchRequest("Exact", str(exact)), FetchLimits(max_bytes=10_000))
    assert result.body == b"x" * 10_000
    exact.write_bytes(b"x" * 10_001)
    assert fetch_local(FetchRequest("Exact", str(exact)), FetchLimits(max_bytes=10_000)).error


def test_a_broken_address_fails_one_feed_not_the_cycle(feed_server: FeedServer) -> None:
    good = feed_server.serve_file("/helix.rss", HELIX, content_type="application/rss+xml")
    requests = [FetchRequest("Broken", "http://[::1"), FetchRequest("Helix", good)]

    results = {r.feed_name: r for r in asyncio.run(fetch_all(requests, FetchLimits()))}

    assert "not a valid web address" in (results["Broken"].error or "")
    assert results["Helix"].body


@pytest.mark.parametrize("url", ["http://[::1", "http://partner.example:port/", "https://"])
def test_check_refuses_a_feed_url_that_is_no_web_address(
    tmp_path: Path, run_cli: Any, url: str
) -> None:
    config = write_config(tmp_path, [{"name": "Broken", "url": url}])

    result = run_cli("check", "--config", config)

    assert result.exit_code == 1
    assert 'feeds "Broken" (entry 1), url' in result.output
    assert "not a valid web address" in result.output


# -- check ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.170.2/v2/credentials",
        "http://[fd00:ec2::254]/latest/",
        "http://[::ffff:169.254.169.254]/",
        "http://2852039166/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://[fe80::1]/",
    ],
)
def test_check_warns_about_a_feed_on_a_metadata_address(
    tmp_path: Path, run_cli: Any, url: str
) -> None:
    config = write_config(
        tmp_path,
        [
            {"name": "Metadata", "url": url},
            {"name": "Fine", "url": "https://partner.example/feed.rss"},
        ],
    )

    result = run_cli("check", "--config", config)

    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "'Metadata'" in warnings[0] and "metadata" in warnings[0]
