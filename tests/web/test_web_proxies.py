"""X-Forwarded-For is believed only from the proxies named in ``web.trusted_proxies``.

The per-client sign-up limit and the consent log's client hash depend on it. Sign-ups
go over real HTTP to the server on 127.0.0.1 (so 127.0.0.1 is the "proxy"), the store is
real (SQLite, and PostgreSQL when configured).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clusterfeed.app.service import Service
from clusterfeed.config import ConfigError, load_config
from clusterfeed.store import Store
from clusterfeed.subscribers.subscribe import Subscriptions
from clusterfeed.web.proxies import client_address
from tests.conftest import Clock, FeedServer, RunningServer, served_example_feeds, write_config
from tests.helpers import SIGNUP, Browser  # client_limit = 8, address_limit = 3


def _service(
    folder: Path, feed_server: FeedServer, database_url: str, clock: Clock, web: str = ""
) -> Service:
    path = write_config(
        folder, served_example_feeds(feed_server), database_url=database_url, extra=SIGNUP
    )
    if web:
        text = path.read_text(encoding="utf-8").replace("[web]\n", f"[web]\n{web}\n", 1)
        path.write_text(text, encoding="utf-8")
    config = load_config(path)
    service = Service(config, Store(config.database_url), clock)
    service.prepare()
    return service


@pytest.fixture
def running(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    feed_server: FeedServer,
    database_url: str,
    clock: Clock,
) -> Iterator[tuple[Service, RunningServer]]:
    service = _service(tmp_path, feed_server, database_url, clock, getattr(request, "param", ""))
    server = RunningServer(service)
    yield service, server
    server.stop()
    service.close()
    service.store.close()


def _sign_up(server: RunningServer, email: str, forwarded_for: str | None) -> httpx.Response:
    browser = Browser(server.base)
    if forwarded_for is not None:
        browser.client.headers["X-Forwarded-For"] = forwarded_for
    return browser.sign_up(email)


def _client_of(service: Service, email: str) -> str | None:
    """The client hash the consent log recorded for an address's sign-up."""
    (row,) = [c for c in service.store.consents() if c.email == email and c.action == "signup"]
    return row.ip_hash


def test_without_trusted_proxies_x_forwarded_for_changes_nothing(
    running: tuple[Service, RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default nobody is trusted, 127.0.0.1 included (uvicorn's own default), and
    uvicorn's environment variable does not change that."""
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    service, server = running
    answers = [
        _sign_up(server, f"n{i}@example.org", f"203.0.113.{i}, 198.51.100.{i}") for i in range(9)
    ]
    assert [a.status_code for a in answers] == [200] * 8 + [429]
    local = Subscriptions(service).client_hash("127.0.0.1")
    assert {_client_of(service, f"n{i}@example.org") for i in range(8)} == {local}
    cookie = (
        Browser(server.base)
        .client.get("/subscribe", headers={"X-Forwarded-Proto": "https"})
        .headers["set-cookie"]
    )
    assert "secure" not in cookie.lower()


@pytest.mark.parametrize(
    "running", ['trusted_proxies = ["127.0.0.1", "192.0.2.0/24", "2001:db8:1::/48"]'],
    indirect=True,
)  # fmt: skip
def test_a_trusted_proxys_chain_is_read_from_the_right(
    running: tuple[Service, RunningServer],
) -> None:
    service, server = running
    subs = Subscriptions(service)
    cases = {
        "198.51.100.7": "198.51.100.7",
        # The left part is what the client claimed; the proxy wrote the right-most.
        "10.9.9.9, 198.51.100.8": "198.51.100.8",
        # Two proxies of ours: the client is the first address that is not one of them.
        "203.0.113.5, 192.0.2.20": "203.0.113.5",
        "203.0.113.6, 2001:db8:1::9, 192.0.2.21": "203.0.113.6",
        "[2001:db8:2::5]:4711": "2001:db8:2::5",
        # Not an address: the last one a trusted proxy vouched for counts.
        "made-up-name, 192.0.2.22": "192.0.2.22",
    }
    for i, (chain, client) in enumerate(cases.items()):
        email = f"c{i}@example.org"
        assert _sign_up(server, email, chain).status_code == 200, chain
        assert _client_of(service, email) == subs.client_hash(client), chain

    # Changing the claimed part does not escape the limit: one client, one count.
    spoofed = [
        _sign_up(server, f"s{i}@example.org", f"10.0.{i}.1, 198.51.100.99") for i in range(9)
    ]
    assert [a.status_code for a in spoofed] == [200] * 8 + [429]
    # Another client behind the same proxy has its own.
    assert _sign_up(server, "other@example.org", "198.51.100.100").status_code == 200

    # The scheme the proxy saw: the form's cookie is Secure behind an https proxy.
    cookie = (
        Browser(server.base)
        .client.get("/subscribe", headers={"X-Forwarded-Proto": "https"})
        .headers["set-cookie"]
    )
    assert "secure" in cookie.lower()


def test_trusted_proxies_are_checked_with_a_clear_message(
    tmp_path: Path, feed_server: FeedServer
) -> None:
    path = write_config(tmp_path, served_example_feeds(feed_server))
    text = path.read_text(encoding="utf-8")
    bad = 'trusted_proxies = ["127.0.0.1", "10.0.0.1/8", "proxy.internal", "::1/200"]'
    path.write_text(text.replace("[web]\n", f"[web]\n{bad}\n", 1), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = {p.key: p.message for p in caught.value.problems}
    assert set(problems) == {
        "web.trusted_proxies[1]",
        "web.trusted_proxies[2]",
        "web.trusted_proxies[3]",
    }
    assert "did you mean 10.0.0.0/8?" in problems["web.trusted_proxies[1]"]
    assert '"proxy.internal"' in problems["web.trusted_proxies[2]"]
    assert "host names are not accepted" in problems["web.trusted_proxies[2]"]
    assert str(caught.value).startswith(str(path))

    good = 'trusted_proxies = ["127.0.0.1", "10.0.0.0/8", "::1"]'
    path.write_text(text.replace("[web]\n", f"[web]\n{good}\n", 1), encoding="utf-8")
    assert load_config(path).web.trusted_proxies == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    path.write_text(text, encoding="utf-8")
    assert load_config(path).web.trusted_proxies == []


def test_client_address_rule() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert client_address("203.0.113.1", ["198.51.100.1"], trusted) == "203.0.113.1"
    assert client_address("10.0.0.2", ["198.51.100.1"], trusted) == "198.51.100.1"
    assert client_address("10.0.0.2", ["1.1.1.1, 198.51.100.1"], trusted) == "198.51.100.1"
    assert client_address("10.0.0.2", ["1.1.1.1", "10.0.0.3"], trusted) == "1.1.1.1"
    assert client_address("10.0.0.2", ["10.0.0.5, 10.0.0.3"], trusted) == "10.0.0.5"
    assert client_address("10.0.0.2", [], trusted) == "10.0.0.2"
    assert client_address("10.0.0.2", [" , "], trusted) == "10.0.0.2"
    assert client_address("::ffff:10.0.0.2", ["198.51.100.1:80"], trusted) == "198.51.100.1"
    assert client_address("::1", ["x, [2001:db8::1]:443"], trusted) == "2001:db8::1"
    assert client_address("10.0.0.2", ["198.51.100.1"], ()) == "10.0.0.2"
    assert client_address(None, ["198.51.100.1"], trusted) is None
