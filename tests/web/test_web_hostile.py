"""Crafted URLs against the real web server: never an error, never a way off the site.

The requests go out byte for byte as written (``http.client`` with the target as given:
an HTTP library would normalise ``..`` and ``//`` away before they reach the server),
to ``clusterfeed serve``'s server on 127.0.0.1 over a real SQLite file or PostgreSQL.
"""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.store import Store
from tests.conftest import Clock, FeedServer, RunningServer, served_example_feeds, write_config

SIGNUP = "[signup]\nenabled = true\n"
PUBLIC = "https://news.nordbio.example"


@pytest.fixture
def service(
    tmp_path: Path, feed_server: FeedServer, database_url: str, clock: Clock
) -> Iterator[Service]:
    config = load_config(
        write_config(
            tmp_path, served_example_feeds(feed_server), database_url=database_url, extra=SIGNUP
        )
    )
    service = Service(config, Store(config.database_url), clock)
    service.prepare()
    asyncio.run(service.fetch())
    service.publish()
    yield service
    service.close()
    service.store.close()


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def send(
    web: RunningServer,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Answer:
    """One request with ``target`` exactly as given (no normalisation on the way; only
    characters outside ASCII are percent-encoded, as the request line must be ASCII)."""
    target = "".join(ch if ch.isascii() else quote(ch) for ch in target)
    parts = urlsplit(web.base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        sent = {"Host": parts.netloc, **(headers or {})}
        if body is not None:
            sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
            sent["Content-Length"] = str(len(body))
        for name, value in sent.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()


def stays_on_site(location: str) -> bool:
    """Whether a browser that follows ``location`` from one of our pages stays here.

    Browsers read ``//host`` and ``/\\host`` as another host, and ignore tabs and line
    breaks in URLs; only a plain path qualifies.
    """
    if not location.startswith("/") or location.startswith(("//", "/\\")):
        return False
    if any(ch in location for ch in "\\\t\r\n"):
        return False
    followed = urlsplit(urljoin(PUBLIC + "/some/page", location))
    return (followed.scheme, followed.netloc) == ("https", "news.nordbio.example")


def assert_harmless(answer: Answer, what: str) -> None:
    assert answer.status < 500, f"{what}: HTTP {answer.status} {answer.body[:300]!r}"
    for location in answer.headers.get_all("location") or []:
        assert stays_on_site(location), f"{what}: Location {location!r} leaves the site"
    assert b"Traceback" not in answer.body, what
    assert b'File "' not in answer.body, what


# -- point 3: open redirect ------------------------------------------------------------------

OFF_SITE = [
    "/%2Fevil.example%2F..",
    "//evil.example/..",
    "//evil.example/%2e%2e",
    "//evil.example/../",
    "/%2F%2Fevil.example",
    "/%5Cevil.example%2F..",
    "/\\evil.example/..",
    "/%09/evil.example/..",
    "/digests/..%2F%2Fevil.example%2F..",
    "/digests/%2E%2E//evil.example/..",
    "//evil.example/digests",
    "///evil.example/..",
    "/./evil.example/..",
    "/%2F%5Cevil.example%2F..",
    "/https:%2F%2Fevil.example/..",
]


def test_no_answer_sends_a_browser_to_another_site(service: Service, web: RunningServer) -> None:
    for target in OFF_SITE:
        for method in ("GET", "HEAD"):
            answer = send(web, method, target)
            assert_harmless(answer, f"{method} {target}")
            assert "location" not in answer.headers, (target, answer.headers["location"])
            assert answer.status == 404, (target, answer.status)


def test_a_folder_without_its_slash_still_redirects_to_itself_on_this_site(
    service: Service, web: RunningServer
) -> None:
    """The one redirect of published files: /digests → /digests/, relative links work;
    the Host the request names plays no part in it."""
    for host in (None, "evil.example", "evil.example:8080"):
        answer = send(web, "GET", "/digests", headers={"Host": host} if host else None)
        assert answer.status == 301
        assert answer.headers["location"] == "/digests/"
    assert send(web, "GET", "/digests/").status == 200
    # Starlette's "add or drop the trailing slash" redirect (built from the Host header)
    # is off: a path without a route is not found, whatever the Host says.
    for target in ("/subscribe/", "/healthz/", "/metrics/"):
        answer = send(web, "GET", target, headers={"Host": "evil.example"})
        assert answer.status == 404 and "location" not in answer.headers, target
    posted = send(web, "POST", "/subscribe/", headers={"Host": "evil.example"}, body=b"")
    assert posted.status in (404, 405) and "location" not in posted.headers


def test_saving_preferences_redirects_to_the_same_page_on_this_site(
    service: Service, web: RunningServer
) -> None:
    (rita,) = service.store.active_subscribers()
    path = service.links_for(rita).preferences_url.removeprefix(PUBLIC)
    answer = send(web, "POST", path, headers={"Host": "evil.example"}, body=b"frequency=weekly")
    assert answer.status == 303
    assert answer.headers["location"] == f"{path}?saved=1"
    assert_harmless(answer, "preferences")


# -- point 4: crafted URLs are a 4xx, never a 500 ----------------------------------------------

CRAFTED = [
    "/preferences/99999999999999999999999.x",
    "/preferences/%C2%B2.x",
    "/unsubscribe/%C2%B2%C2%B3.abc",
    "/confirm/%D9%A3.x",  # an Arabic-Indic digit
    "/confirm/99999999999999999999999.x.y",
    "/preferences/2147483648.x",  # one past PostgreSQL's integer
    "/unsubscribe/9223372036854775808.x",  # one past SQLite's
    "/preferences/-1.x",
    "/preferences/0.x",
    "/preferences/1%00.x",
    "/unsubscribe/" + "9" * 400 + ".x",
    "/index.html%00.txt",
    "/feed.atom%00",
    "/%00",
    "/digests/%00/",
    "/" + "a" * 300,
    "/digests/" + "b" * 300 + ".html",
    "/" + "a/" * 2100,
    "/" + "x" * 4200,
    "/%ff%fe%fd",
    "/feed.atom/",
    "/digests/index.html/",
    "/%C0%AF",
    "/%",
    "/%zz",
    "/index.html%0d%0aSet-Cookie:%20x=1",
    "/preferences/%0d%0a.x",
]


def test_crafted_urls_get_a_4xx(service: Service, web: RunningServer) -> None:
    for target in CRAFTED:
        for method in ("GET", "HEAD", "POST"):
            answer = send(web, method, target, body=b"" if method == "POST" else None)
            assert_harmless(answer, f"{method} {target[:80]}")
            assert 400 <= answer.status < 500, (method, target[:80], answer.status)
            assert "set-cookie" not in {k.lower() for k in answer.headers}


# -- the property: any path, token, method, query ------------------------------------------

PIECES = st.sampled_from(
    [
        "", ".", "..", "%2e", "%2E%2e", "%2F", "%2f", "%5C", "\\", "%00", "%0a", "%09", "%C2%B2",
        "²", "%", "%%", "%ff", "evil.example", "digests", "archive", "index.html", "feed.atom",
        "preferences", "unsubscribe", "confirm", "subscribe", "healthz", "metrics", "https:",
        "99999999999999999999999", "2147483648", "1", "0", "-1", "x" * 300, ";", "?", "#",
    ]
)  # fmt: skip
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


def _encoded(text: str) -> str:
    return quote(text, safe="")


SEGMENT = st.one_of(PIECES, TEXT.map(_encoded))
PATHS = st.one_of(
    st.lists(SEGMENT, max_size=8).map(lambda s: "/" + "/".join(s)),
    st.tuples(st.integers(1, 3), st.lists(SEGMENT, max_size=5)).map(
        lambda t: "/" * t[0] + "/".join(t[1])
    ),
    st.builds(lambda n: "/" + "a/" * n, st.integers(0, 2500)),
)
# "{TOKEN}" stands for a real subscriber's token, put in by the test: a valid link
# with something before or after it.
REAL = "{TOKEN}"
TOKENS = st.one_of(
    TEXT.map(_encoded),
    st.builds(lambda pre, post: pre + REAL + post, st.sampled_from(["", "0", "%00"]), PIECES),
    st.builds(
        lambda digits, rest: digits + "." + rest,
        st.from_regex(r"-?[0-9\u00b2\u0663]{1,30}", fullmatch=True).map(_encoded),
        st.from_regex(r"[A-Za-z0-9_.%-]{0,60}", fullmatch=True),
    ),
)
TOKEN_PATHS = st.builds(
    lambda page, token: f"/{page}/{token}",
    st.sampled_from(["preferences", "unsubscribe", "confirm"]),
    TOKENS,
)
QUERIES = st.one_of(
    st.just(""),
    st.lists(st.tuples(TEXT, TEXT), max_size=4).map(
        lambda pairs: "?" + "&".join(f"{_encoded(k)}={_encoded(v)}" for k, v in pairs)
    ),
    st.sampled_from(["?saved=1", "?%", "?a=%ff", "?=", "?&&", "?" + "q" * 3000]),
)
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
HEADERS = st.dictionaries(
    st.sampled_from(
        ["Origin", "Referer", "X-Forwarded-For", "Cookie", "If-Modified-Since",
         "If-None-Match", "Accept-Encoding", "Sec-Fetch-Site", "Content-Type", "Host"]
    ),
    HEADER_TEXT,
    max_size=3,
)  # fmt: skip
BODIES = st.one_of(
    st.just(b""),
    st.just(b"List-Unsubscribe=One-Click"),
    st.lists(st.tuples(TEXT, TEXT), max_size=4).map(
        lambda pairs: "&".join(f"{_encoded(k)}={_encoded(v)}" for k, v in pairs).encode()
    ),
    st.binary(max_size=200),
)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    path=st.one_of(PATHS, TOKEN_PATHS),
    query=QUERIES,
    headers=HEADERS,
    body=BODIES,
)
def test_no_request_line_gets_an_error_or_leaves_the_site(
    service: Service,
    web: RunningServer,
    method: str,
    path: str,
    query: str,
    headers: dict[str, str],
    body: bytes,
) -> None:
    """Whatever the path, token, method, query and a few headers: no 5xx, no Location
    off the site, no traceback, on SQLite and on PostgreSQL."""
    rita = service.store.membership(email="reader@example.org")
    assert rita is not None
    path = path.replace(REAL, service.links_for(rita.subscriber).preferences_url.split("/")[-1])
    answer = send(web, method, path + query, headers, body if method == "POST" else None)
    assert_harmless(answer, f"{method} {(path + query)[:120]!r} {headers!r}")


# -- the rules themselves ----------------------------------------------------------------------


def test_local_location_makes_only_paths_on_this_site() -> None:
    from clusterfeed.web.webguard import is_local_location, local_location

    assert local_location("/digests/") == "/digests/"
    assert local_location("/preferences/12.ab-c_d", "saved=1") == "/preferences/12.ab-c_d?saved=1"
    assert local_location("/a b/ü?#/") == "/a%20b/%C3%BC%3F%23/"
    for bad in ("//evil.example/", "/\\evil.example", "evil.example/", "/a/../b", "/a/./b",
                "https://evil.example/", "/a\x00b", "/a\tb", "/a//b"):  # fmt: skip
        with pytest.raises(ValueError):
            local_location(bad)
    for location in ("//evil.example", "/\\evil.example", "https://evil.example/", "/\t/x",
                     "/%0a", " /x", "/x\\y"):  # fmt: skip
        assert not is_local_location(location) or stays_on_site(location), location
    assert not is_local_location("//evil.example") and not is_local_location("/\\evil")


def test_an_answer_redirecting_off_the_site_is_stopped_at_the_last_step() -> None:
    """``LocalRedirectsOnly`` wraps the app: a redirect some future route builds from a
    browser's input never leaves the server with its Location."""
    from clusterfeed.web.webguard import LocalRedirectsOnly

    async def app(scope: object, receive: object, send: object) -> None:
        location = dict(scope)["query_string"].decode()  # type: ignore[call-overload]
        await send(  # type: ignore[operator]
            {"type": "http.response.start", "status": 302,
             "headers": [(b"location", location.encode()), (b"content-length", b"0")]}
        )  # fmt: skip
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    def answer(location: str) -> dict[str, object]:
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/x", "query_string": location.encode()}
        asyncio.run(LocalRedirectsOnly(app)(scope, None, send))
        return sent[0]

    assert answer("/digests/")["status"] == 302
    for location in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        start = answer(location)
        assert start["status"] == 404
        assert all(name != b"location" for name, _ in start["headers"])  # type: ignore[attr-defined]
