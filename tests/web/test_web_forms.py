"""Forms on our pages posted from another site are refused; our own and mail programs' work.

Real server on 127.0.0.1, real store (SQLite, and PostgreSQL when configured), mail in
a Maildir. The headers are the ones browsers send: ``Origin`` (``null`` from a page
with ``Referrer-Policy: no-referrer``, as ours are), ``Referer``, Fetch Metadata
(``Sec-Fetch-Site``, ``Sec-Fetch-Mode``); mail providers' one-click unsubscribe sends
none of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.store import Store
from tests.conftest import Clock, FeedServer, RunningServer, served_example_feeds, write_config
from tests.helpers import SIGNUP, Browser

PUBLIC = "https://news.nordbio.example"
EVIL = "https://evil.example"
READERS = [
    {"email": f"{name}@example.org", "name": name.title()}
    for name in ("rita", "gmail", "webmail", "addon", "plain")
]
# What a browser sends for a form on one of our pages (Referrer-Policy: no-referrer).
OWN_PAGE = {"Origin": "null", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"}
ONE_CLICK = b"List-Unsubscribe=One-Click"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _open(folder: Path, feeds: list[dict[str, str]], database_url: str, clock: Clock) -> Service:
    config = load_config(
        write_config(folder, feeds, database_url=database_url, subscribers=READERS, extra=SIGNUP)
    )
    service = Service(config, Store(config.database_url), clock)
    service.prepare()
    return service


@pytest.fixture
def service(
    tmp_path: Path, feed_server: FeedServer, database_url: str, clock: Clock
) -> Iterator[Service]:
    service = _open(tmp_path, served_example_feeds(feed_server), database_url, clock)
    yield service
    service.close()
    service.store.close()


def _path(service: Service, email: str, kind: str) -> str:
    membership = service.store.membership(email=email)
    assert membership is not None
    links = service.links_for(membership.subscriber)
    url = links.preferences_url if kind == "preferences" else links.unsubscribe_url
    return url.removeprefix(PUBLIC)


def _state(service: Service, email: str) -> tuple[str, str] | None:
    membership = service.store.membership(email=email)
    if membership is None:
        return None
    return membership.status, membership.subscriber.frequency


def _mails_to(service: Service, address: str) -> list[str]:
    folder = service.config.mail.maildir / "new"
    texts = [p.read_text(errors="replace") for p in folder.iterdir()] if folder.exists() else []
    return [t for t in texts if f"To: {address}" in t]


def _refused(answer: httpx.Response) -> bool:
    return answer.status_code == 403 and "This form came from another site" in answer.text


def test_forms_posted_from_another_site_are_refused_and_change_nothing(
    service: Service, web: RunningServer
) -> None:
    prefs = web.base + _path(service, "rita@example.org", "preferences")
    weekly = b"frequency=weekly"
    foreign = [
        {"Origin": EVIL},
        {"Origin": EVIL, "Referer": PUBLIC + "/"},  # Origin decides when there is one
        {"Referer": EVIL + "/newsletter-tricks.html"},
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},  # a sandboxed frame elsewhere
        {"Origin": "http://news.nordbio.example"},  # another scheme is another origin
        {"Origin": "https://news.nordbio.example:8443"},  # and another port
        {"Origin": "https://news.nordbio.example.evil.example"},
        {"Origin": "not an origin"},
    ]
    for headers in foreign:
        answer = httpx.post(prefs, content=weekly, headers={**FORM, **headers})
        assert _refused(answer), headers
        assert "location" not in answer.headers
    assert _state(service, "rita@example.org") == ("confirmed", "daily")

    # The unsubscribe button of our page, put on another site's page: a navigation.
    unsubscribe = web.base + _path(service, "rita@example.org", "unsubscribe")
    hijacked = httpx.post(
        unsubscribe,
        content=ONE_CLICK,
        headers={**FORM, "Origin": EVIL, "Sec-Fetch-Site": "cross-site",
                 "Sec-Fetch-Mode": "navigate"},
    )  # fmt: skip
    assert _refused(hijacked)
    assert _state(service, "rita@example.org") == ("confirmed", "daily")

    # Sign-up (with a valid form token and cookie) and confirmation, sent from elsewhere.
    browser = Browser(web.base)
    page = browser.client.get("/subscribe")
    token = re.search(r'name="form_token" value="([^"]+)"', page.text)
    assert token is not None
    signup = browser.client.post(
        "/subscribe",
        data={"form_token": token.group(1), "email": "nina@example.org", "website": ""},
        headers={"Origin": EVIL},
    )
    assert _refused(signup)
    assert (
        _state(service, "nina@example.org") is None and _mails_to(service, "nina@example.org") == []
    )

    Browser(web.base).sign_up("otto@example.org")
    (mail,) = _mails_to(service, "otto@example.org")
    found = re.search(r"https://news\.nordbio\.example(/confirm/\S+)", mail.replace("=\n", ""))
    assert found is not None
    confirm = web.base + found.group(1)
    assert _refused(httpx.post(confirm, headers={"Referer": EVIL + "/"}))
    assert _state(service, "otto@example.org") == ("pending", "daily")
    assert [c.action for c in service.store.consents() if c.email == "rita@example.org"] == [
        "config"
    ]


def test_our_own_pages_forms_work_as_browsers_send_them(
    service: Service, web: RunningServer
) -> None:
    prefs = web.base + _path(service, "rita@example.org", "preferences")
    own = [
        OWN_PAGE,  # Chrome and Firefox, from our no-referrer page
        {"Origin": "null"},  # an older browser: no Fetch Metadata
        {"Origin": PUBLIC},
        {"Origin": "https://NEWS.nordbio.example:443"},
        {"Referer": PUBLIC + "/preferences/x"},
        {},  # a script, curl: neither header
    ]
    for i, headers in enumerate(own):
        frequency = "weekly" if i % 2 == 0 else "daily"
        answer = httpx.post(
            prefs, content=f"frequency={frequency}".encode(), headers={**FORM, **headers}
        )
        assert answer.status_code == 303, (headers, answer.status_code, answer.text[:200])
        assert _state(service, "rita@example.org") == ("confirmed", frequency), headers

    browser = Browser(web.base)
    page = browser.client.get("/subscribe")
    token = re.search(r'name="form_token" value="([^"]+)"', page.text)
    assert token is not None
    signed_up = browser.client.post(
        "/subscribe",
        data={"form_token": token.group(1), "email": "nina@example.org", "website": ""},
        headers=OWN_PAGE,
    )
    assert signed_up.status_code == 200 and "check your inbox" in signed_up.text
    (mail,) = _mails_to(service, "nina@example.org")
    found = re.search(r"https://news\.nordbio\.example(/confirm/\S+)", mail.replace("=\n", ""))
    assert found is not None
    confirmed = httpx.post(web.base + found.group(1), headers={"Origin": PUBLIC})
    assert confirmed.status_code == 200 and "You are subscribed" in confirmed.text
    assert _state(service, "nina@example.org") == ("confirmed", "daily")


def test_one_click_unsubscribe_works_as_mail_programs_send_it(
    service: Service, web: RunningServer
) -> None:
    """RFC 8058: the body ``List-Unsubscribe=One-Click`` posted to the link, from the
    provider's servers (no Origin), from a web mail's page (its own Origin, a fetch, not
    a navigation), from a mail program's add-on (an extension origin, text/plain)."""
    senders = {
        "gmail@example.org": FORM,
        "webmail@example.org": {
            **FORM, "Origin": "https://mail.example", "Sec-Fetch-Site": "cross-site",
            "Sec-Fetch-Mode": "cors",
        },
        "addon@example.org": {"Content-Type": "text/plain", "Origin": "moz-extension://4f1c"},
        "plain@example.org": OWN_PAGE,  # the button on our own unsubscribe page
    }  # fmt: skip
    for email, headers in senders.items():
        answer = httpx.post(
            web.base + _path(service, email, "unsubscribe"), content=ONE_CLICK, headers=headers
        )
        assert answer.status_code == 200, (email, answer.status_code)
        assert "You are unsubscribed" in answer.text
        assert _state(service, email) == ("unsubscribed", "daily"), email
    assert [s.email for s in service.store.active_subscribers()] == ["rita@example.org"]


def test_without_base_url_our_origin_is_the_host_the_request_was_sent_to(
    tmp_path: Path, feed_server: FeedServer, database_url: str, clock: Clock
) -> None:
    config_file = write_config(
        tmp_path, served_example_feeds(feed_server), database_url=database_url,
        subscribers=READERS, extra=SIGNUP,
    )  # fmt: skip
    text = config_file.read_text(encoding="utf-8")
    config_file.write_text(text.replace(f'base_url = "{PUBLIC}"\n', ""), encoding="utf-8")
    config = load_config(config_file)
    assert "base_url" not in config.web.model_fields_set
    service = Service(config, Store(config.database_url), clock)
    service.prepare()
    running = RunningServer(service)
    try:
        membership = service.store.membership(email="rita@example.org")
        assert membership is not None
        path = service.links_for(membership.subscriber).preferences_url.removeprefix(
            config.web.base_url.rstrip("/")
        )
        url = running.base + path
        here = running.base.removeprefix("http://")
        cases = [
            ({"Origin": running.base}, 303),
            ({"Referer": running.base + "/preferences/x"}, 303),
            # Behind a proxy that passes on the Host without a port, over https.
            ({"Host": "news.example", "Origin": "https://news.example"}, 303),
            ({"Origin": EVIL}, 403),
            ({"Host": here, "Origin": "http://127.0.0.1:1"}, 403),
            ({"Host": "news.example", "Origin": "https://evil.example"}, 403),
            ({"Origin": "http://127.0.0.1"}, 403),  # the Host names a port: it must match
        ]
        for headers, status in cases:
            answer = httpx.post(url, content=b"frequency=weekly", headers={**FORM, **headers})
            assert answer.status_code == status, (headers, answer.status_code)
    finally:
        running.stop()
        service.close()
        service.store.close()


HEADER_VALUES = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60),
    st.sampled_from(["null", "[", "http://[::1", "https://a:99999", "//x", "https://ü.example",
                     "https://" + "a" * 70 + ".example", "http://127.0.0.1:0", "file:///"]),
)  # fmt: skip


@given(
    headers=st.dictionaries(
        st.sampled_from(["origin", "referer", "sec-fetch-site", "host"]), HEADER_VALUES
    ),
    exact=st.booleans(),
)
def test_the_origin_rule_decides_for_any_header_values(
    headers: dict[str, str], exact: bool
) -> None:
    """Whatever a client writes into these headers, the rule answers (never raises),
    and a request that names no site is never refused."""
    from clusterfeed.web.webguard import foreign_post, host_origin, parse_origin

    ours = parse_origin(PUBLIC) if exact else host_origin(headers.get("host", ""), "http")
    verdict = foreign_post(headers, ours, exact=exact)
    names_no_site = (
        headers.get("origin", "").strip().lower() in ("", "null")
        and not headers.get("referer", "").strip()
    )
    if names_no_site and headers.get("sec-fetch-site", "").strip().lower() != "cross-site":
        assert verdict is None
