"""Sign-up, confirmation, preferences and unsubscribe over real HTTP, with mail in a Maildir.

The web app runs in uvicorn on 127.0.0.1; the confirmation mails are the files the
configured Maildir transport wrote; the store is a real SQLite file or PostgreSQL.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import email
import email.policy
import re
from collections.abc import Iterator
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest

from clusterfeed.app.sequences import digest_run
from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.store import _LOCK_KEY, Store
from clusterfeed.subscribers.forms import Choices, FormError, read_signup, signup_outcome
from clusterfeed.subscribers.subscribe import Subscriptions
from tests.conftest import Clock, FeedServer, RunningServer, served_example_feeds, write_config
from tests.helpers import SIGNUP, Browser


def _service(
    tmp_path: Path, feed_server: FeedServer, database_url: str, clock: Clock, extra: str = SIGNUP
) -> Service:
    config = load_config(
        write_config(
            tmp_path, served_example_feeds(feed_server), database_url=database_url, extra=extra
        )
    )
    service = Service(config, Store(config.database_url), clock)
    service.prepare()
    return service


@pytest.fixture
def service(
    tmp_path: Path, feed_server: FeedServer, database_url: str, clock: Clock
) -> Iterator[Service]:
    service = _service(tmp_path, feed_server, database_url, clock)
    yield service
    service.close()
    service.store.close()


def _mails(service: Service) -> list[EmailMessage]:
    folder = service.config.mail.maildir / "new"
    if not folder.exists():
        return []
    files = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default) for p in files]


def _mails_to(service: Service, address: str) -> list[EmailMessage]:
    return [m for m in _mails(service) if address in str(m["To"])]


def _body(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def _link(message: EmailMessage, kind: str) -> str:
    found = re.search(rf"https://news\.nordbio\.example(/{kind}/\S+)", _body(message))
    assert found is not None, _body(message)
    return found.group(1)


def _status(service: Service, address: str) -> str | None:
    membership = service.store.membership(email=address)
    return None if membership is None else membership.status


# -- the whole way: sign up, confirm, change, pause, leave -----------------------------------


def test_sign_up_confirm_change_preferences_and_leave_in_one_click(
    service: Service, web: RunningServer
) -> None:
    browser = Browser(web.base)
    page = browser.client.get("/subscribe")
    assert "NordBio Cluster" in page.text and "#0b5d7a" in page.text
    assert 'name="viewport"' in page.text and "<script" not in page.text
    assert 'value="gene-therapy"' in page.text and 'value="ja"' in page.text
    assert "Gene therapy" in page.text and "Deutsch" in page.text and "日本語" in page.text

    answer = browser.sign_up(
        "nina@example.org", topics=["research", "financing"], languages=["de"], frequency="weekly"
    )

    assert answer.status_code == 200 and "check your inbox" in answer.text
    assert _status(service, "nina@example.org") == "pending"
    assert "nina@example.org" not in [s.email for s in service.store.active_subscribers()]
    (mail,) = _mails_to(service, "nina@example.org")
    assert mail["Subject"] == "Please confirm your subscription to NordBio Cluster news"
    assert str(mail["From"]) == "NordBio News <news@nordbio.example>"
    confirm = _link(mail, "confirm")

    # Opening the link only shows a button, so a mail scanner following links confirms nothing.
    shown = httpx.get(web.base + confirm)
    assert shown.status_code == 200 and "Yes, subscribe me" in shown.text
    assert _status(service, "nina@example.org") == "pending"
    done = httpx.post(web.base + confirm)
    assert done.status_code == 200 and "You are subscribed" in done.text
    assert _status(service, "nina@example.org") == "confirmed"
    (nina,) = [s for s in service.store.active_subscribers() if s.email == "nina@example.org"]
    assert (nina.topics, nina.languages, nina.frequency) == (
        ("financing", "research"),
        ("de",),
        "weekly",
    )

    # The links every digest carries now work.
    links = service.links_for(nina)
    prefs_path = links.preferences_url.removeprefix("https://news.nordbio.example")
    prefs = httpx.get(web.base + prefs_path)
    assert prefs.status_code == 200 and "nina@example.org" in prefs.text
    assert re.search(r'value="research" checked', prefs.text)
    changed = httpx.post(
        web.base + prefs_path,
        data={"topics": ["medtech"], "languages": ["en", "de"], "frequency": "daily"},
        follow_redirects=True,
    )
    assert changed.status_code == 200 and "Saved." in changed.text
    (nina,) = [s for s in service.store.active_subscribers() if s.email == "nina@example.org"]
    assert (nina.topics, nina.languages, nina.frequency) == (("medtech",), ("de", "en"), "daily")

    paused = httpx.post(
        web.base + prefs_path,
        data={"topics": ["medtech"], "frequency": "daily", "paused": "1"},
        follow_redirects=True,
    )
    assert paused.status_code == 200
    assert "nina@example.org" not in [s.email for s in service.store.active_subscribers()]
    assert _status(service, "nina@example.org") == "confirmed"

    # RFC 8058: a bare POST with the one-click body, no cookie, no form token.
    unsub_path = links.unsubscribe_url.removeprefix("https://news.nordbio.example")
    asked = httpx.get(web.base + unsub_path)
    assert asked.status_code == 200 and "<button" in asked.text
    assert _status(service, "nina@example.org") == "confirmed"
    gone = httpx.post(
        web.base + unsub_path,
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert gone.status_code == 200 and "You are unsubscribed" in gone.text
    assert _status(service, "nina@example.org") == "unsubscribed"
    assert "nina@example.org" not in [s.email for s in service.store.active_subscribers()]

    record = [c for c in service.store.consents() if c.email == "nina@example.org"]
    assert [c.action for c in record] == [
        "signup",
        "confirm",
        "preferences",
        "preferences",
        "unsubscribe",
    ]
    assert record[0].form_version == "2026-11"
    assert record[0].choices["topics"] == ["financing", "research"]
    assert record[0].ip_hash and "127.0.0.1" not in record[0].ip_hash
    assert record[3].choices["paused"] is True


def test_a_config_subscriber_keeps_an_unsubscribe_across_restarts(
    service: Service, web: RunningServer
) -> None:
    (rita,) = [s for s in service.store.active_subscribers() if s.email == "reader@example.org"]
    path = service.links_for(rita).unsubscribe_url.removeprefix("https://news.nordbio.example")

    assert httpx.post(web.base + path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    service.prepare()  # what the next start does with the same config

    assert _status(service, "reader@example.org") == "unsubscribed"
    assert service.store.active_subscribers() == []


# -- no way to learn who subscribed ------------------------------------------------------


def test_an_existing_address_gets_the_same_answer_as_a_new_one(
    service: Service, web: RunningServer
) -> None:
    new = Browser(web.base).sign_up("fresh@example.org")
    existing = Browser(web.base).sign_up("reader@example.org")  # confirmed, from the config

    assert (new.status_code, new.text) == (existing.status_code, existing.text)
    assert new.headers.get("content-type") == existing.headers.get("content-type")
    # Only the owner of the address learns the difference, by mail.
    (already,) = _mails_to(service, "reader@example.org")
    assert "You already get it" in _body(already)
    assert "/preferences/" in _body(already)
    assert _status(service, "reader@example.org") == "confirmed"


# -- links that must not work ------------------------------------------------------------


def test_an_expired_confirmation_link_is_refused(
    service: Service, web: RunningServer, clock: Clock
) -> None:
    Browser(web.base).sign_up("late@example.org")
    confirm = _link(_mails_to(service, "late@example.org")[0], "confirm")

    clock.advance(timedelta(hours=49))

    for answer in (httpx.get(web.base + confirm), httpx.post(web.base + confirm)):
        assert answer.status_code == 400
        assert "This link has expired" in answer.text
    assert _status(service, "late@example.org") == "pending"


def test_forged_links_and_links_of_another_address_are_refused(
    service: Service, web: RunningServer
) -> None:
    Browser(web.base).sign_up("anna@example.org")
    Browser(web.base).sign_up("bert@example.org")
    anna_confirm = _link(_mails_to(service, "anna@example.org")[0], "confirm")
    bert = service.store.membership(email="bert@example.org")
    assert bert is not None and bert.subscriber.id is not None

    # Anna's signature with Bert's id: the signature is bound to the address.
    anna_token = anna_confirm.removeprefix("/confirm/")
    swapped = f"{bert.subscriber.id}.{anna_token.partition('.')[2]}"
    tampered = anna_token[:-3] + ("AAA" if not anna_token.endswith("AAA") else "BBB")
    for token in (swapped, tampered, "12345", "not-a-token"):
        answer = httpx.post(f"{web.base}/confirm/{token}")
        assert answer.status_code == 403, token
        assert "This link is not valid" in answer.text
    assert _status(service, "bert@example.org") == "pending"
    assert _status(service, "anna@example.org") == "pending"

    (rita,) = service.store.active_subscribers()
    rita_token = service.links_for(rita).unsubscribe_url.rpartition("/")[2]
    other = f"{bert.subscriber.id}.{rita_token.partition('.')[2]}"
    for path in (f"/unsubscribe/{other}", f"/preferences/{other}", "/unsubscribe/1.x"):
        assert httpx.post(web.base + path, data={"frequency": "daily"}).status_code == 403
    assert [s.email for s in service.store.active_subscribers()] == ["reader@example.org"]


# -- abuse -----------------------------------------------------------------------------


def test_sign_ups_are_rate_limited_per_address_and_per_client(
    service: Service, web: RunningServer
) -> None:
    browser = Browser(web.base)
    answers = [browser.sign_up("often@example.org") for _ in range(5)]

    # Over the address limit the page stays the same (it must not reveal anything),
    # but no more mail goes out.
    assert {a.status_code for a in answers} == {200}
    assert len({a.text for a in answers}) == 1
    assert len(_mails_to(service, "often@example.org")) == 3

    # 5 attempts so far from this client; the limit is 8 per hour.
    for i in range(3):
        assert browser.sign_up(f"n{i}@example.org").status_code == 200
    refused = browser.sign_up("one-more@example.org")
    assert refused.status_code == 429 and "Too many sign-ups" in refused.text
    assert _status(service, "one-more@example.org") is None


def test_the_rate_limits_hold_across_processes(
    service: Service, tmp_path: Path, feed_server: FeedServer, database_url: str, clock: Clock
) -> None:
    """A second app on the same store (another worker, or a restart) sees the same counts."""
    first = RunningServer(service)
    try:
        for _ in range(3):
            Browser(first.base).sign_up("twice@example.org")
    finally:
        first.stop()
    other = Service(service.config, Store(service.config.database_url), clock)
    second = RunningServer(other)
    try:
        Browser(second.base).sign_up("twice@example.org")
    finally:
        second.stop()
        other.store.close()
    assert len(_mails_to(service, "twice@example.org")) == 3


@contextlib.contextmanager
def _writers_lock_held(service: Service) -> Iterator[None]:
    """Another process's write transaction, as a fetch cycle holds one: store writes
    wait for it (SQLite's write lock; on PostgreSQL the writers' advisory lock)."""
    raw = service.store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        if service.store.engine.dialect.name == "sqlite":
            cursor.execute("BEGIN IMMEDIATE")
        else:
            cursor.execute("SELECT pg_advisory_lock(%(key)s)", {"key": _LOCK_KEY})
        yield
    finally:
        if service.store.engine.dialect.name == "sqlite":
            raw.rollback()
        else:
            cursor.execute("SELECT pg_advisory_unlock(%(key)s)", {"key": _LOCK_KEY})
            raw.commit()
        raw.close()


def test_a_sign_up_waiting_for_the_database_does_not_hold_up_other_visitors(
    service: Service, web: RunningServer
) -> None:
    browser = Browser(web.base)
    browser.client.get("/subscribe")  # the page works before the database is busy
    with _writers_lock_held(service):
        waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
            browser.sign_up, "patient@example.org"
        )
        # The sign-up's write waits for the lock; meanwhile others are served.
        other = httpx.get(web.base + "/subscribe", timeout=10)
        assert other.status_code == 200 and "form_token" in other.text
        assert httpx.get(web.base + "/healthz", timeout=10).status_code in (200, 503)
        assert not waiting.done()
    answer = waiting.result(timeout=60)
    assert answer.status_code == 200 and "check your inbox" in answer.text
    assert len(_mails_to(service, "patient@example.org")) == 1


def test_a_form_without_its_token_or_with_the_honeypot_filled_is_refused(
    service: Service, web: RunningServer
) -> None:
    bare = httpx.post(web.base + "/subscribe", data={"email": "csrf@example.org"})
    assert bare.status_code == 403 and "Please try again" in bare.text

    # A token from one browser does not work with another browser's cookie.
    one = Browser(web.base)
    token = re.search(r'name="form_token" value="([^"]+)"', one.client.get("/subscribe").text)
    assert token is not None
    two = Browser(web.base)
    two.client.get("/subscribe")
    crossed = two.client.post(
        "/subscribe", data={"form_token": token.group(1), "email": "csrf@example.org"}
    )
    assert crossed.status_code == 403

    bot = Browser(web.base).sign_up("bot@example.org", website="https://spam.example")
    assert bot.status_code == 200  # a bot is not told it was caught
    assert _status(service, "csrf@example.org") is None
    assert _status(service, "bot@example.org") is None
    assert _mails(service) == []


@pytest.mark.parametrize(
    "fields",
    [
        {"email": "eve@example.org\r\nBcc: victim@example.org"},
        {"email": "eve@example.org\nBcc: victim@example.org"},
        {"email": "eve@example.org", "topics": "research\r\nX-Injected: 1"},
        {"email": "eve@example.org", "frequency": "daily\n"},
        {"email": "eve@example.org", "topics": "not-a-topic"},
        {"email": "not an address"},
        {"email": "eve@example.org", "frequency": "hourly"},
    ],
)
def test_header_tricks_and_bad_values_are_refused(
    service: Service, web: RunningServer, fields: dict[str, str]
) -> None:
    rest = {k: v for k, v in fields.items() if k != "email"}
    answer = Browser(web.base).sign_up(fields["email"], **rest)

    assert answer.status_code == 400
    assert 'class="error"' in answer.text
    assert "Bcc: victim" not in answer.text.replace("&#34;", '"')
    assert _status(service, "eve@example.org") is None
    assert _mails(service) == []


def test_an_internationalized_domain_is_accepted(service: Service, web: RunningServer) -> None:
    answer = Browser(web.base).sign_up("anna@bücher.example")

    assert answer.status_code == 200
    assert _status(service, "anna@bücher.example") == "pending"
    # The domain goes into the header in its IDNA form, never as an encoded word.
    (raw,) = [p.read_bytes() for p in (service.config.mail.maildir / "new").iterdir()]
    assert b"\r\nTo: anna@xn--bcher-kva.example\r\n" in raw
    assert b"=?utf-8?" not in raw.split(b"\r\n\r\n")[0].lower()


def test_an_erased_address_cannot_sign_up_again_but_is_told_by_mail(
    service: Service, web: RunningServer
) -> None:
    subs = Subscriptions(service)
    assert subs.erase("reader@example.org")

    again = Browser(web.base).sign_up("reader@example.org")
    new = Browser(web.base).sign_up("someone@example.org")

    assert (again.status_code, again.text) == (new.status_code, new.text)
    assert _status(service, "reader@example.org") is None
    (told,) = _mails_to(service, "reader@example.org")
    assert "erased from our list on request" in _body(told)
    assert "presse@nordbio.example" in _body(told)


def test_digests_to_an_internationalized_domain_carry_its_idna_form() -> None:
    from clusterfeed.digest.message import address

    assert str(address("Anna <anna@bücher.example>")) == "Anna <anna@xn--bcher-kva.example>"
    assert str(address("plain@example.org")) == "plain@example.org"


def test_sign_up_is_closed_unless_enabled(
    tmp_path: Path, feed_server: FeedServer, database_url: str, clock: Clock
) -> None:
    service = _service(tmp_path, feed_server, database_url, clock, extra="")
    running = RunningServer(service)
    try:
        assert httpx.get(running.base + "/subscribe").status_code == 404
        # The links in digests work all the same.
        (rita,) = service.store.active_subscribers()
        path = service.links_for(rita).preferences_url.removeprefix("https://news.nordbio.example")
        assert httpx.get(running.base + path).status_code == 200
    finally:
        running.stop()
        service.close()
        service.store.close()


def _menu(page: str) -> list[tuple[str, str]]:
    nav = re.search(r'<nav aria-label="Topics">(.*?)</nav>', page, flags=re.S)
    assert nav is not None
    return re.findall(r'<a href="[^"]*topics/([^"/]+)\.html"[^>]*>([^<]+)</a>', nav.group(1))


def test_the_news_page_and_digest_pages_lead_to_the_sign_up_form(
    service: Service, web: RunningServer
) -> None:
    import asyncio

    asyncio.run(service.fetch())
    now = service.clock()
    asyncio.run(digest_run(service, "manual:test", now))
    service.publish()
    form_url = "https://news.nordbio.example/subscribe"  # web.base_url: where the form is

    index = web.get("/").text
    assert f'href="{form_url}"' in index
    (digest_page,) = (service.config.publish.output_dir / "digests").glob("2*.html")
    assert f'href="{form_url}"' in web.get(f"/digests/{digest_page.name}").text

    # The form offers the topics the page's menu shows, named alike, in the same order.
    form = web.get("/subscribe").text
    offered = re.findall(
        r'<input type="checkbox" name="topics" value="([^"]+)"[^>]*>([^<]+)</label>', form
    )
    menu = _menu(index)
    assert menu and offered == menu
    for topic, _title in menu:  # every menu entry leads to a page
        assert web.get(f"/topics/{topic}.html").status_code == 200


def test_no_sign_up_link_while_sign_up_is_off(
    tmp_path: Path, feed_server: FeedServer, database_url: str, clock: Clock
) -> None:
    import asyncio

    service = _service(tmp_path, feed_server, database_url, clock, extra="")
    try:
        asyncio.run(service.fetch())
        service.publish()
        index = (service.config.publish.output_dir / "index.html").read_text(encoding="utf-8")
    finally:
        service.close()
        service.store.close()

    assert "/subscribe" not in index


# -- the pure decisions --------------------------------------------------------------------

CHOICES = Choices(topics=("medtech", "research"), languages=("de", "en"))


def test_read_signup_normalizes_and_keeps_the_offered_order() -> None:
    email_, prefs = read_signup(
        [("email", " Anna@Example.ORG "), ("topics", "research"), ("topics", "medtech")],
        CHOICES,
    )
    assert email_ == "Anna@example.org"
    assert prefs.topics == ("medtech", "research")
    assert (prefs.languages, prefs.frequency, prefs.paused) == ((), "daily", False)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ([("email", "")], "email"),
        ([("email", "a@example.org"), ("languages", "fr")], "languages"),
        ([("email", "a@example.org"), ("note\r\n", "x")], "note\r\n"),
        ([("email", "a@example.org\u2028b")], "email"),
        ([("email", "a" * 600 + "@example.org")], "email"),
    ],
)
def test_read_signup_names_the_bad_field(fields: list[tuple[str, str]], field: str) -> None:
    with pytest.raises(FormError) as caught:
        read_signup(fields, CHOICES)
    assert caught.value.field == field


def test_signup_outcome_depends_only_on_state_the_page_does_not_show() -> None:
    assert signup_outcome(None, suppressed=False) == "confirm"
    assert signup_outcome(None, suppressed=True) == "erased"


def test_the_confirmation_mail_goes_through_the_configured_smtp_server(
    tmp_path: Path, feed_server: FeedServer, database_url: str, clock: Clock, smtp_server: Any
) -> None:
    config = load_config(
        write_config(
            tmp_path,
            served_example_feeds(feed_server),
            database_url=database_url,
            mail={"transport": "smtp", "host": smtp_server.host, "port": smtp_server.port,
                  "security": "none"},
            extra=SIGNUP,
        )
    )  # fmt: skip
    service = Service(config, Store(config.database_url), clock)
    service.prepare()
    running = RunningServer(service)
    try:
        answer = Browser(running.base).sign_up("smtp-reader@example.org")
        assert answer.status_code == 200
        (envelope,) = smtp_server.handler.messages
        assert envelope.rcpt_tos == ["smtp-reader@example.org"]
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        confirm = _link(message, "confirm")  # type: ignore[arg-type]
        assert httpx.post(running.base + confirm).status_code == 200
        assert _status(service, "smtp-reader@example.org") == "confirmed"
    finally:
        running.stop()
        service.close()
        service.store.close()


def test_a_sign_up_never_confirmed_is_forgotten_after_its_link_expired_and_a_week(
    service: Service, web: RunningServer, clock: Clock
) -> None:
    Browser(web.base).sign_up("never@example.org")
    clock.advance(timedelta(hours=48) + timedelta(days=6))
    Browser(web.base).sign_up("other@example.org")
    assert _status(service, "never@example.org") == "pending"  # still within the week

    clock.advance(timedelta(days=1, hours=1))
    Browser(web.base).sign_up("third@example.org")

    assert _status(service, "never@example.org") is None
    assert all(c.email != "never@example.org" for c in service.store.consents())
    assert _status(service, "other@example.org") == "pending"
