"""Delivery a mail server can trust: retries with growing delays, bouncing addresses,
a rate limit, DKIM signatures, and a sender killed at random points.

Everything runs against a real SMTP server (aiosmtpd on 127.0.0.1) and a real store;
time is the hand-moved test clock, so "five minutes later" costs nothing.
"""

from __future__ import annotations

import asyncio
import base64
import email
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import Envelope, Session
from sqlalchemy import select

from clusterfeed.app.sequences import digest_run
from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.delivery.pacing import RateLimiter, RetryPolicy, next_attempt
from clusterfeed.digest.message import message_bytes
from clusterfeed.store import Store, StoreError, deliveries, subscribers
from tests.conftest import (
    REALCLIENTS,
    TEMPLATES,
    Clock,
    FeedServer,
    RecordingHandler,
    Route,
    SmtpServer,
    allow_inserts,
    refuse_inserts,
    served_example_feeds,
    write_config,
)

CLUSTERFEED = str(Path(sys.executable).with_name("clusterfeed"))
T0 = datetime(2026, 11, 26, 7, 0, tzinfo=UTC)


class ScriptedHandler(RecordingHandler):
    """Answers per recipient from a script, notes when each message arrived, and can
    take its time before accepting (so that a kill lands in the middle of sending)."""

    def __init__(self, data_delay: float = 0.0) -> None:
        super().__init__()
        self.script: dict[str, list[str]] = {}
        self.rcpt_seen: Counter[str] = Counter()
        self.arrivals: list[float] = []
        self.data_delay = data_delay
        self.mail_reply: str | None = None

    async def handle_MAIL(
        self,
        server: SMTPProtocol,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTPProtocol,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        self.rcpt_seen[address] += 1
        replies = self.script.get(address)
        if replies and not replies[0].startswith("250"):
            return replies.pop(0)
        if replies:
            replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        self.arrivals.append(time.monotonic())
        self.messages.append(envelope)
        return "250 Message accepted for delivery"


def _start_smtp(handler: ScriptedHandler, **options: Any) -> tuple[Controller, SmtpServer]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(handler, hostname="127.0.0.1", port=port, **options)
    controller.start()
    return controller, SmtpServer("127.0.0.1", port, handler)


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    controller, server = _start_smtp(ScriptedHandler())
    try:
        yield server
    finally:
        controller.stop()


def _readers(n: int) -> list[dict[str, Any]]:
    return [{"email": f"reader{i:03d}@example.org"} for i in range(n)]


def _mail(server: SmtpServer, **extra: Any) -> dict[str, Any]:
    return {
        "transport": "smtp",
        "host": server.host,
        "port": server.port,
        "security": "none",
        "connections": 2,
        **extra,
    }


def _parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=policy.default)  # type: ignore[return-value]


def _per_recipient(server: SmtpServer) -> Counter[str]:
    return Counter(r for e in list(server.handler.messages) for r in e.rcpt_tos)


class News:
    """A partner feed that gets one more item whenever ``add`` is called."""

    def __init__(self, server: FeedServer, rss_feed: Any) -> None:
        self.server, self.rss_feed, self.items = server, rss_feed, []
        self.url = server.url("/helix.rss")
        self.add()

    def add(self) -> None:
        n = len(self.items)
        self.items.insert(
            0,
            {
                "title": f"Helix Vektor news number {n}",
                "link": f"https://www.helixvektor.example/news/{n}",
                "description": f"Item {n}.",
            },
        )
        self.server.routes["/helix.rss"] = Route(self.rss_feed("Helix Vektor", self.items))


def _helix_config(tmp_path: Path, news: News, database_url: str, **settings: Any) -> Path:
    """A config with one partner feed (Helix Vektor, served by ``news``) and ``settings``
    (mail, subscribers, extra) for ``write_config``."""
    return write_config(
        tmp_path, [{"name": "Helix Vektor", "url": news.url}], database_url=database_url, **settings
    )


def _service(path: Path, clock: Clock) -> Service:
    config = load_config(path)
    service = Service(config, Store(config.database_url), clock=clock)
    service.prepare()
    return service


def _state(service: Service, address: str) -> list[Any]:
    with service.store.engine.connect() as conn:
        return list(
            conn.execute(
                select(
                    deliveries.c.state,
                    deliveries.c.last_error,
                    deliveries.c.next_attempt_at,
                    deliveries.c.attempts,
                )
                .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
                .where(subscribers.c.email == address)
                .order_by(deliveries.c.id)
            )
        )


def _round(service: Service, clock: Clock, label: str) -> Any:
    """One digest as the scheduler would build it at the clock's time."""
    asyncio.run(service.fetch())
    report = asyncio.run(digest_run(service, f"test:{label}", clock())).send
    return report


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# -- the retry decision (pure) ---------------------------------------------------------


# -- a real mail server ----------------------------------------------------------------


def test_a_real_mail_server_delivers_every_digest_byte_for_byte(
    tmp_path: Path, feed_server: FeedServer, database_url: str, open_service: Any, clock: Clock
) -> None:
    """Postfix (a private instance on 127.0.0.1, delivering into its own Maildir) takes
    the digests over SMTP and delivers each exactly as composed, an IDN address too."""
    script = REALCLIENTS / "postfix_relay.sh"
    if not script.is_file():
        pytest.skip(f"the Postfix relay is not available here ({script} is absent)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Postfix's own users must reach its folder: not under pytest's private tmp_path.
    folder = Path(tempfile.mkdtemp(prefix="clusterfeed-postfix-"))
    folder.chmod(0o755)
    env = {**os.environ, "RELAY_DIR": str(folder), "RELAY_PORT": str(port)}

    def relay(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=600
        )

    started = relay("start")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        readers = [
            {"email": "lena.vogt@example.org", "name": "Lena Vogt"},
            {"email": "jürgen@bücher.example", "name": "Jürgen Müller", "languages": ["de"]},
            {"email": "kenji@example.jp", "name": "田中 健二", "languages": ["ja", "en"]},
        ]
        mail = {"transport": "smtp", "host": "127.0.0.1", "port": port, "security": "none"}
        config = write_config(
            tmp_path,
            served_example_feeds(feed_server),
            database_url=database_url,
            mail=mail,
            subscribers=readers,
        )
        service = open_service(config)
        asyncio.run(service.fetch())
        service.create_digest("test:postfix", clock())
        expected = [service.compose_prepared(d) for d in service.store.pending_deliveries()]
        assert len(expected) == len(readers)

        report = asyncio.run(service.send_pending())

        assert (report.sent, report.failed, report.retry) == (len(readers), 0, 0)
        for n, prepared in enumerate(expected):
            sent = tmp_path / f"sent-{n}.eml"
            sent.write_bytes(prepared.data)
            (recipient,) = prepared.recipients
            checked = relay("check", str(sent), recipient)
            assert checked.returncode == 0, checked.stdout + checked.stderr
            delivered = Path(checked.stdout.split("delivered: ", 1)[1].split("\n", 1)[0])
            # Postfix puts its trace headers on top and stores lines with LF endings;
            # everything else is what clusterfeed composed.
            body = delivered.read_bytes()
            assert body.endswith(prepared.data.replace(b"\r\n", b"\n")), recipient
            assert b"Received: from " in body.split(b"\nFrom: ", 1)[0]
        assert {p.recipients[0] for p in expected} >= {"jürgen@xn--bcher-kva.example"}
    finally:
        relay("stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_delays_grow_by_the_factor_up_to_the_cap_within_the_jitter() -> None:
    policy = RetryPolicy(
        first=timedelta(minutes=5),
        factor=3,
        longest=timedelta(hours=1),
        jitter=0.1,
        attempts=10,
        max_age=timedelta(days=2),
    )

    def delay(attempts: int, spread: float) -> timedelta:
        when = next_attempt(policy, attempts, T0, built_at=T0, spread=spread)
        assert when is not None
        return when - T0

    assert [delay(n, 0.5) for n in (1, 2, 3, 4, 5)] == [
        timedelta(minutes=5),
        timedelta(minutes=15),
        timedelta(minutes=45),
        timedelta(hours=1),
        timedelta(hours=1),
    ]
    assert delay(1, 0.0) == timedelta(minutes=4.5)
    assert delay(1, 0.999999) < timedelta(minutes=5.5)
    assert delay(3, 0.0) == timedelta(minutes=40.5)


def test_retrying_stops_after_the_attempts_or_the_age() -> None:
    policy = RetryPolicy(attempts=4, max_age=timedelta(hours=6), jitter=0)

    assert next_attempt(policy, 3, T0, built_at=T0, spread=0.5) is not None
    assert next_attempt(policy, 4, T0, built_at=T0, spread=0.5) is None
    # 5 hours after the digest was built, a 15-minute delay still fits, a 45-minute one not.
    late = T0 + timedelta(hours=5, minutes=30)
    assert next_attempt(policy, 2, late, built_at=T0, spread=0.5) is not None
    assert next_attempt(policy, 3, late, built_at=T0, spread=0.5) is None


# -- 4xx: later, after the delay, exactly once -----------------------------------------


def test_a_4xx_answer_is_delivered_on_a_later_run_after_the_delay_exactly_once(
    tmp_path: Path, feed_server: FeedServer, smtp: SmtpServer, database_url: str, rss_feed
) -> None:
    news = News(feed_server, rss_feed)
    path = _helix_config(
        tmp_path,
        news,
        database_url,
        mail=_mail(smtp, retry_first_minutes=5, retry_jitter=0.1),
        subscribers=_readers(3),
    )
    clock = Clock(T0)
    service = _service(path, clock)
    greylisted = "reader001@example.org"
    smtp.handler.script[greylisted] = ["451 4.7.1 Greylisted, please try again later"]

    report = _round(service, clock, "1")

    assert (report.sent, report.retry, report.failed) == (2, 1, 0)
    ((state, error, when, attempts),) = _state(service, greylisted)
    assert state == "pending" and attempts == 1
    assert error == "451 4.7.1 Greylisted, please try again later"
    assert T0 + timedelta(minutes=4.5) <= _utc(when) <= T0 + timedelta(minutes=5.5)

    # Before the delay is over, nothing is tried, not even by a fresh digest run.
    clock.advance(minutes=4)
    assert asyncio.run(service.send_pending()).sent == 0
    assert smtp.handler.rcpt_seen[greylisted] == 1

    clock.advance(minutes=2)
    later = asyncio.run(service.send_pending())

    assert (later.sent, later.retry, later.failed) == (1, 0, 0)
    assert _per_recipient(smtp) == {f"reader{i:03d}@example.org": 1 for i in range(3)}
    assert [s for s, *_ in _state(service, greylisted)] == ["sent"]
    clock.advance(minutes=30)
    assert asyncio.run(service.send_pending()).sent == 0
    assert len(smtp.handler.messages) == 3
    service.store.close()


def test_the_schedulers_fetch_cycle_sends_deferred_deliveries_once_they_are_due(
    tmp_path: Path, feed_server: FeedServer, smtp: SmtpServer, database_url: str, rss_feed
) -> None:
    from clusterfeed.app.schedule import _fetch_and_publish

    news = News(feed_server, rss_feed)
    path = _helix_config(
        tmp_path,
        news,
        database_url,
        mail=_mail(smtp, retry_first_minutes=10, retry_jitter=0),
        subscribers=_readers(2),
    )
    clock = Clock(T0)
    service = _service(path, clock)
    smtp.handler.script["reader000@example.org"] = ["421 4.7.0 Try again later"]
    _round(service, clock, "1")
    assert _per_recipient(smtp) == {"reader001@example.org": 1}

    clock.advance(minutes=5)  # a fetch cycle before the retry is due sends nothing
    asyncio.run(_fetch_and_publish(service))
    assert _per_recipient(smtp) == {"reader001@example.org": 1}

    clock.advance(minutes=6)
    asyncio.run(_fetch_and_publish(service))

    assert _per_recipient(smtp) == {"reader000@example.org": 1, "reader001@example.org": 1}
    assert service.store.delivery_counts() == {"sent": 2}
    service.store.close()


def test_repeated_4xx_answers_wait_longer_each_time_then_fail_with_the_last_answer(
    tmp_path: Path, feed_server: FeedServer, smtp: SmtpServer, database_url: str, rss_feed
) -> None:
    news = News(feed_server, rss_feed)
    path = _helix_config(
        tmp_path,
        news,
        database_url,
        mail=_mail(smtp, retry_first_minutes=5, retry_factor=3, retry_jitter=0, retry_attempts=4),
        subscribers=_readers(2),
    )
    clock = Clock(T0)
    service = _service(path, clock)
    full = "reader000@example.org"
    smtp.handler.script[full] = [f"452 4.2.2 Mailbox full ({i})" for i in range(10)]

    _round(service, clock, "1")
    delays = []
    for _ in range(3):
        ((_s, _e, when, _a),) = _state(service, full)
        delays.append(_utc(when) - clock())
        clock.now = _utc(when)
        asyncio.run(service.send_pending())

    assert delays == [timedelta(minutes=5), timedelta(minutes=15), timedelta(minutes=45)]
    ((state, error, when, attempts),) = _state(service, full)
    assert (state, when, attempts) == ("failed", None, 4)
    assert error == "gave up after 4 attempts: 452 4.2.2 Mailbox full (3)"
    assert smtp.handler.rcpt_seen[full] == 4
    assert _per_recipient(smtp) == {"reader001@example.org": 1}
    service.store.close()


# -- 5xx: failed at once, bouncing after N in a row -------------------------------------


def test_a_5xx_answer_fails_at_once_and_repeated_ones_mark_the_address_bouncing(
    tmp_path: Path,
    feed_server: FeedServer,
    smtp: SmtpServer,
    database_url: str,
    rss_feed,
    run_cli,
) -> None:
    news = News(feed_server, rss_feed)
    path = _helix_config(
        tmp_path, news, database_url, mail=_mail(smtp, bounce_after=3), subscribers=_readers(3)
    )
    clock = Clock(T0)
    service = _service(path, clock)
    gone = "reader002@example.org"
    refuse = "550 5.1.1 <reader002@example.org>: Recipient address rejected"
    # Two refusals, one delivery (which ends the run), then three refusals in a row.
    smtp.handler.script[gone] = [refuse, refuse, "250 OK", refuse, refuse, refuse]
    outcomes = []
    for day in range(6):
        clock.now = T0 + timedelta(days=day)
        news.add()
        report = _round(service, clock, str(day))
        outcomes.append((report.sent, report.retry, report.failed, report.bouncing))

    assert outcomes == [
        (2, 0, 1, []),
        (2, 0, 1, []),
        (3, 0, 0, []),
        (2, 0, 1, []),
        (2, 0, 1, []),
        (2, 0, 1, [gone]),
    ]
    states = _state(service, gone)
    assert [s for s, *_ in states] == ["failed", "failed", "sent", "failed", "failed", "failed"]
    assert states[0][1] == refuse and states[0][3] == 1  # one attempt, never retried
    (bouncing,) = service.store.bouncing()
    assert (bouncing.email, bouncing.since, bouncing.refusals) == (gone, clock(), 3)
    assert bouncing.last_error == refuse

    status = run_cli("status", "--config", path)
    assert status.exit_code == 0, status.output
    assert f"{gone}: since" in status.stdout and "3 refusals in a row" in status.stdout
    assert refuse in status.stdout

    # Later digests leave the address out without asking the server.
    asked = smtp.handler.rcpt_seen[gone]
    clock.now += timedelta(days=1)
    news.add()
    _round(service, clock, "skipped")
    assert smtp.handler.rcpt_seen[gone] == asked
    assert _state(service, gone)[-1][0] == "failed"  # no new row: the last one is old

    cleared = run_cli("bounces", "clear", "--config", path, gone)
    assert cleared.exit_code == 0, cleared.output
    assert service.store.bouncing() == []
    clock.now += timedelta(days=1)
    news.add()
    assert _round(service, clock, "cleared").sent == 3
    assert _per_recipient(smtp)[gone] == 2
    service.store.close()


INTERNATIONAL = "jürgen@bücher.example"  # a non-ASCII mailbox, not only the domain


def _digest_to(
    readers: list[dict[str, Any]], folder: Path, feeds: FeedServer, url: str, rss: Any, **smtp: Any
) -> tuple[Service, ScriptedHandler, Any]:
    """One digest of one partner feed to ``readers``, through an aiosmtpd server started
    with ``smtp`` options; (service, what the server received, the send report)."""
    handler = ScriptedHandler()
    controller, server = _start_smtp(handler, **smtp)
    try:
        news = News(feeds, rss)
        path = _helix_config(folder, news, url, mail=_mail(server), subscribers=readers)
        service = _service(path, Clock(T0))
        return service, handler, _round(service, service.clock, "once")
    finally:
        controller.stop()


def test_an_internationalized_mailbox_goes_out_with_smtputf8_and_utf8_headers(
    tmp_path: Path, feed_server: FeedServer, database_url: str, rss_feed: Any
) -> None:
    readers = [{"email": INTERNATIONAL, "name": "Jürgen Müller"}, *_readers(1)]
    service, handler, report = _digest_to(
        readers, tmp_path, feed_server, database_url, rss_feed, enable_SMTPUTF8=True
    )
    assert (report.sent, report.failed) == (2, 0)
    by_rcpt = {tuple(m.rcpt_tos): m for m in handler.messages}
    utf8 = by_rcpt[("jürgen@xn--bcher-kva.example",)]
    assert "SMTPUTF8" in utf8.mail_options
    assert "SMTPUTF8" not in by_rcpt[("reader000@example.org",)].mail_options
    head = utf8.original_content.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    assert "\r\nTo: Jürgen Müller <jürgen@xn--bcher-kva.example>\r\n" in head
    parsed = email.message_from_string(utf8.original_content.decode("utf-8"), policy=policy.default)
    assert parsed["To"].addresses[0].username == "jürgen"
    service.store.close()


def test_a_server_without_smtputf8_fails_only_that_delivery_and_says_why(
    tmp_path: Path, feed_server: FeedServer, database_url: str, rss_feed: Any
) -> None:
    readers = [{"email": INTERNATIONAL}, *_readers(2)]
    service, handler, report = _digest_to(
        readers, tmp_path, feed_server, database_url, rss_feed, enable_SMTPUTF8=False
    )
    assert (report.sent, report.failed, report.retry) == (2, 1, 0)
    assert {r for m in handler.messages for r in m.rcpt_tos} == {
        "reader000@example.org",
        "reader001@example.org",
    }
    ((state, error, _when, _attempts),) = _state(service, INTERNATIONAL)
    assert state == "failed"
    assert "does not offer SMTPUTF8" in error and "jürgen@xn--bcher-kva.example" in error
    assert service.store.bouncing() == []  # the server's limit, not the address's fault
    service.store.close()


def test_a_database_failure_while_sending_stops_cleanly_and_loses_nothing(
    tmp_path: Path, feed_server: FeedServer, smtp: SmtpServer, database_url: str, rss_feed: Any
) -> None:
    """The commit after an accepted message fails (a full disk): every connection stops,
    nothing stays claimed, the error names the address, and the next run delivers the
    rest, repeating at most one accepted message per connection."""
    news = News(feed_server, rss_feed)
    path = _helix_config(
        tmp_path, news, database_url, mail=_mail(smtp, connections=2), subscribers=_readers(6)
    )
    service = _service(path, Clock(T0))
    asyncio.run(service.fetch())
    service.create_digest("test:disk-full", service.clock())
    refuse_inserts(service.store, "sent_stories", "database or disk is full")
    try:
        with pytest.raises(StoreError, match="could not record that the message to reader"):
            asyncio.run(service.send_pending())
        assert service.store.delivery_counts() == {"pending": 6}  # none left claimed
        first = len(smtp.handler.messages)
        assert 1 <= first <= 2  # what the server accepted before each connection stopped
    finally:
        allow_inserts(service.store, "sent_stories")

    report = asyncio.run(service.send_pending())

    assert report.sent == 6 and service.store.delivery_counts() == {"sent": 6}
    received = Counter(r for m in smtp.handler.messages for r in m.rcpt_tos)
    assert set(received) == {f"reader{i:03d}@example.org" for i in range(6)}
    assert sum(received.values()) - 6 == first  # only those were sent twice
    service.store.close()


def test_a_refused_sender_stops_the_run_and_fails_no_delivery(
    tmp_path: Path, feed_server: FeedServer, smtp: SmtpServer, database_url: str, rss_feed, run_cli
) -> None:
    news = News(feed_server, rss_feed)
    path = _helix_config(tmp_path, news, database_url, mail=_mail(smtp), subscribers=_readers(3))
    assert run_cli("fetch", "--config", path).exit_code == 0
    smtp.handler.mail_reply = "553 5.7.1 Sender address not allowed for this login"

    result = run_cli("digest", "--config", path)

    assert result.exit_code == 2
    assert "refuses the sender news@nordbio.example" in result.output
    assert "553 5.7.1 Sender address not allowed" in result.output
    assert "Nothing was marked failed" in result.output
    store = Store(load_config(path).database_url)
    assert store.delivery_counts() == {"pending": 3}
    assert store.bouncing() == []
    store.close()

    smtp.handler.mail_reply = None
    again = run_cli("digest", "--config", path)
    assert again.exit_code == 0, again.output
    assert "3 sent" in again.stdout
    assert _per_recipient(smtp) == {f"reader{i:03d}@example.org": 1 for i in range(3)}


@pytest.mark.parametrize("shared", [True, False], ids=["shared-rendering", "worker-processes"])
def test_a_large_outbox_sends_the_same_messages(
    tmp_path: Path, feed_server: FeedServer, smtp: SmtpServer, database_url: str, shared: bool
) -> None:
    """Templates that only print a subscriber's values are rendered once per story list
    in the sending process; others in full, in worker processes. Same bytes either way."""
    path = write_config(
        tmp_path,
        served_example_feeds(feed_server),
        database_url=database_url,
        mail=_mail(smtp, connections=3),
        subscribers=[
            {"email": "ada@example.org", "name": "Ada", "topics": ["gene-therapy"]},
            {"email": "ben@example.org", "languages": ["de"]},
            {"email": "kenji@example.org", "languages": ["ja", "en"]},
            {"email": "lena@example.org", "topics": ["research", "financing"]},
            {"email": "ole@example.org"},
        ],
    )
    if not shared:
        templates = tmp_path / "templates"
        shutil.copytree(TEMPLATES, templates)
        with (templates / "digest.txt").open("a", encoding="utf-8") as handle:
            handle.write("{{ subscriber.name | upper }}\n")  # a filter: no sharing
        text = path.read_text(encoding="utf-8").replace(str(TEMPLATES), str(templates))
        path.write_text(text, encoding="utf-8")
    clock = Clock(T0)
    service = _service(path, clock)
    asyncio.run(service.fetch())
    service.create_digest("test:pool", clock())
    expected = {d.subscriber.email: service.compose(d) for d in service.store.pending_deliveries()}
    service.render_threshold = 1  # what a large outbox does
    assert (service._render_processes(5) == 0) is shared

    report = asyncio.run(service.send_pending())

    assert report.sent == 5
    received = {e.rcpt_tos[0]: _parse(e.content) for e in smtp.handler.messages}
    assert set(received) == set(expected) and len(smtp.handler.messages) == 5
    for address, message in received.items():
        sent = next(e.content for e in smtp.handler.messages if e.rcpt_tos[0] == address)
        assert sent == message_bytes(expected[address])
        mine = _parse(message_bytes(expected[address]))  # the same CRLF wire form
        assert message["Message-ID"] == mine["Message-ID"]
        assert message["Subject"] == mine["Subject"]
        assert message.get_body(("plain",)).get_content() == mine.get_body(("plain",)).get_content()
    assert service.store.delivery_counts() == {"sent": 5}
    service.close()
    service.store.close()


# -- the rate limit ------------------------------------------------------------------


class FakeTime:
    """A clock and a sleep that only move when something sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.sleep(0)


def test_the_rate_limiter_spaces_concurrent_callers_and_allows_a_burst() -> None:
    fake = FakeTime()
    limiter = RateLimiter(2, clock=fake, sleep=fake.sleep)

    async def five() -> list[float]:
        return list(await asyncio.gather(*(limiter.acquire() for _ in range(5))))

    assert asyncio.run(five()) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert fake.slept == [0.5, 1.0, 1.5, 2.0]

    fake = FakeTime()
    bursty = RateLimiter(2, burst=3, clock=fake, sleep=fake.sleep)
    grants = asyncio.run(_gather(bursty, 5))
    assert grants == [0.0, 0.0, 0.0, 0.5, 1.0]
    # After a quiet spell the bucket is full again, but never fuller than the burst.
    fake.now = 100.0
    assert asyncio.run(_gather(bursty, 4)) == [100.0, 100.0, 100.0, 100.5]


async def _gather(limiter: RateLimiter, n: int) -> list[float]:
    return list(await asyncio.gather(*(limiter.acquire() for _ in range(n))))


def test_the_configured_rate_holds_across_connections_at_the_server(
    tmp_path: Path, feed_server: FeedServer, smtp: SmtpServer, database_url: str, rss_feed
) -> None:
    news = News(feed_server, rss_feed)
    n, per_minute = 8, 1200  # 20 a second: one every 50 ms
    path = _helix_config(
        tmp_path,
        news,
        database_url,
        mail=_mail(smtp, connections=3, rate_per_minute=per_minute),
        subscribers=_readers(n),
    )
    clock = Clock(T0)
    service = _service(path, clock)
    asyncio.run(service.fetch())
    service.create_digest("test:rate", clock())
    started = time.monotonic()

    assert asyncio.run(service.send_pending()).sent == n

    # The k-th message to arrive needed k earlier slots, each 60/per_minute apart: a
    # lower bound that holds however slow the machine is, so it cannot flake.
    interval = 60 / per_minute
    arrivals = sorted(smtp.handler.arrivals)
    assert len(arrivals) == n
    for k, arrived in enumerate(arrivals):
        assert arrived - started >= k * interval, (k, arrived - started)
    service.store.close()


# -- DKIM ------------------------------------------------------------------------------


def _key_pair(folder: Path) -> tuple[Path, bytes]:
    """A fresh RSA key as a PEM file, and its public half as a DNS TXT record."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = folder / "dkim.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def _dns(records: dict[bytes, bytes]) -> Any:
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return lookup


DKIM_TABLE = '[mail.dkim]\nselector = "news2026"\ndomain = "nordbio.example"\n'


def test_digests_are_dkim_signed_and_the_signature_verifies(
    tmp_path: Path, feed_server: FeedServer, smtp: SmtpServer, database_url: str, rss_feed, run_cli
) -> None:
    news = News(feed_server, rss_feed)
    _pem, txt = _key_pair(tmp_path)
    path = _helix_config(
        tmp_path,
        news,
        database_url,
        mail=_mail(smtp),
        subscribers=_readers(2),
        extra=DKIM_TABLE + 'private_key_file = "dkim.pem"\n',
    )
    assert run_cli("fetch", "--config", path).exit_code == 0
    result = run_cli("digest", "--config", path)
    assert result.exit_code == 0, result.output

    dns = _dns({b"news2026._domainkey.nordbio.example.": txt})
    (tmp_path / "other").mkdir()
    _other_pem, other = _key_pair(tmp_path / "other")
    received = [bytes(e.original_content or e.content) for e in smtp.handler.messages]
    assert len(received) == 2
    for data in received:
        message = _parse(data)
        signature = message["DKIM-Signature"]
        assert "d=nordbio.example" in signature and "s=news2026" in signature
        signed = signature.replace(" ", "").replace("\r\n", "").replace("\n", "")
        assert "list-unsubscribe:list-unsubscribe-post" in signed.lower()
        assert dkim.verify(data, dnsfunc=dns)
        # A changed subject, or another domain's key, does not verify.
        assert not dkim.verify(data.replace(b"Subject: ", b"Subject: Re: ", 1), dnsfunc=dns)
        assert not dkim.verify(data, dnsfunc=_dns({b"news2026._domainkey.nordbio.example.": other}))


def test_other_mail_the_transport_sends_is_signed_too(
    tmp_path: Path, feed_server: FeedServer, database_url: str, rss_feed, monkeypatch
) -> None:
    news = News(feed_server, rss_feed)
    pem, txt = _key_pair(tmp_path)
    monkeypatch.setenv("TEST_DKIM_KEY", pem.read_text())
    path = _helix_config(
        tmp_path, news, database_url, extra=DKIM_TABLE + 'private_key_env = "TEST_DKIM_KEY"\n'
    )
    service = _service(path, Clock(T0))
    alert = EmailMessage()
    alert["From"] = "news@nordbio.example"
    alert["To"] = "presse@nordbio.example"
    alert["Subject"] = "Feed Helix Vektor has failed for 24 hours"
    alert.set_content("Please look at the feed.")

    asyncio.run(service.transport().send(alert, "alert-1", 0))

    (stored,) = (tmp_path / "mail" / "new").iterdir()
    data = stored.read_bytes()
    assert dkim.verify(data, dnsfunc=_dns({b"news2026._domainkey.nordbio.example.": txt}))
    service.store.close()


@pytest.mark.parametrize(
    ("key_line", "problem"),
    [
        (
            'private_key_file = "missing.pem"',
            "mail.dkim.private_key_file: cannot read the DKIM key",
        ),
        ('private_key_file = "broken.pem"', "is not a PEM RSA private key"),
        ('private_key_env = "NO_SUCH_DKIM_VARIABLE"', "NO_SUCH_DKIM_VARIABLE is not set"),
        ("", "DKIM needs a key: set private_key_file"),
    ],
)
def test_a_missing_or_unreadable_dkim_key_is_named_before_anything_is_sent(
    tmp_path: Path,
    feed_server: FeedServer,
    smtp: SmtpServer,
    database_url: str,
    rss_feed,
    run_cli,
    key_line: str,
    problem: str,
) -> None:
    news = News(feed_server, rss_feed)
    (tmp_path / "broken.pem").write_text("-----BEGIN RSA PRIVATE KEY-----\nnot a key\n")
    path = _helix_config(
        tmp_path, news, database_url, mail=_mail(smtp), extra=DKIM_TABLE + key_line + "\n"
    )

    check = run_cli("check", "--config", path)

    assert check.exit_code == 1
    assert problem in check.output
    assert str(path) in check.output
    digest = run_cli("digest", "--config", path)
    assert digest.exit_code == 2
    assert problem in digest.output
    assert smtp.handler.messages == []
    assert smtp.handler.rcpt_seen == {}


# -- the kill test -----------------------------------------------------------------------

SUBSCRIBERS = 40
KILLS = 20
CONNECTIONS = 3


def _kill_repeatedly(
    config: Path, log: Path, received: Any, count: Any, rng: random.Random
) -> tuple[int, int]:
    """Start ``clusterfeed digest``, SIGKILL it at a random point, KILLS times.

    ``received()`` counts the copies of each Message-ID delivered so far, ``count()``
    (cheap enough to poll) how many messages there are. Returns the kills that landed
    and how many messages were, at the moment of a kill, delivered during that run but
    still "sending" in the store: the window.
    """
    in_window = kills = 0
    while kills < KILLS:
        had = received()
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [CLUSTERFEED, "digest", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        # A random point after the run started to send: 0-2 more messages, then
        # 0-15 ms, so kills fall before, during and after the server's answer.
        target = count() + rng.randint(0, 2)
        while count() < target and proc.poll() is None:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.015))
        if proc.poll() is not None:
            break  # everything was sent before this kill: the final run checks it
        proc.kill()
        proc.wait()
        kills += 1
        store = Store(load_config(config).database_url)
        with store.engine.connect() as conn:
            sending = set(
                conn.execute(
                    select(deliveries.c.message_id).where(deliveries.c.state == "sending")
                ).scalars()
            )
        store.close()
        now_has = received()
        window = sum(1 for m in sending if now_has[m] > had[m])
        assert window <= CONNECTIONS, f"kill {kills}: {window} accepted but not recorded"
        in_window += window
    final = subprocess.run(
        [CLUSTERFEED, "digest", "--config", str(config)], capture_output=True, timeout=120
    )
    assert final.returncode == 0, final.stdout + final.stderr
    assert kills >= 10, f"only {kills} kills landed before the digest was complete"
    return kills, in_window


def _fetch_in_subprocess(config: Path) -> None:
    fetch = subprocess.run(
        [CLUSTERFEED, "fetch", "--config", str(config)], capture_output=True, timeout=120
    )
    assert fetch.returncode == 0, fetch.stderr


def test_a_smtp_sender_killed_20_times_at_random_points_delivers_each_digest_once_but_the_window(
    tmp_path: Path, feed_server: FeedServer, database_url: str
) -> None:
    """SIGKILL ``clusterfeed digest`` at random points, start it again, 20 times.

    Duplicates are allowed only inside the window docs/delivery.md documents, and counted
    exactly: after each kill, the deliveries the store still has as "sending" although
    the server already holds their message are the only ones that may arrive twice.
    """
    handler = ScriptedHandler(data_delay=0.01)  # slow enough that kills land mid-send
    controller, server = _start_smtp(handler)
    try:
        config = write_config(
            tmp_path,
            served_example_feeds(feed_server),
            database_url=database_url,
            mail=_mail(server, connections=CONNECTIONS),
            subscribers=_readers(SUBSCRIBERS),
        )
        _fetch_in_subprocess(config)

        def received() -> Counter[str]:
            return Counter(_parse(e.content)["Message-ID"] for e in list(handler.messages))

        kills, in_window = _kill_repeatedly(
            config,
            tmp_path / "digest.log",
            received,
            lambda: len(handler.messages),
            random.Random(4),
        )

        copies = received()
        recipients = Counter(r for e in handler.messages for r in e.rcpt_tos)
        assert set(recipients) == {r["email"] for r in _readers(SUBSCRIBERS)}
        assert len(copies) == SUBSCRIBERS, "one digest per subscriber"
        duplicates = sum(n - 1 for n in copies.values())
        print(f"{kills} kills, {duplicates} duplicates, all in the documented window")
        assert duplicates == in_window, (duplicates, in_window)
        assert duplicates <= kills * CONNECTIONS
        store = Store(load_config(config).database_url)
        assert store.delivery_counts() == {"sent": SUBSCRIBERS}
        store.close()
    finally:
        controller.stop()


def test_a_maildir_sender_killed_20_times_at_random_points_delivers_each_digest_exactly_once(
    tmp_path: Path, feed_server: FeedServer, database_url: str
) -> None:
    # More subscribers than over SMTP: writing a file is quicker than an SMTP exchange,
    # and the kills must land before the digest is complete.
    n = 150
    config = write_config(
        tmp_path,
        served_example_feeds(feed_server),
        database_url=database_url,
        subscribers=_readers(n),
    )
    _fetch_in_subprocess(config)
    new = tmp_path / "mail" / "new"

    def received() -> Counter[str]:
        if not new.is_dir():
            return Counter()
        return Counter(_parse(f.read_bytes())["Message-ID"] for f in new.iterdir())

    def count() -> int:
        return len(os.listdir(new)) if new.is_dir() else 0

    kills, in_window = _kill_repeatedly(
        config, tmp_path / "digest.log", received, count, random.Random(8)
    )

    copies = received()
    print(f"{kills} kills, {in_window} files written but not recorded at a kill, no duplicate")
    assert len(copies) == n and set(copies.values()) == {1}, "exactly one file per subscriber"
    store = Store(load_config(config).database_url)
    assert store.delivery_counts() == {"sent": n}
    store.close()
