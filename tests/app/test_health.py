"""Operator alerts: feeds in trouble are mailed once per incident, not every cycle."""

from __future__ import annotations

import asyncio
import email
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path

from clusterfeed.app.health import feed_alerts
from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.model import FeedStatus
from clusterfeed.store import Store
from tests.conftest import EXAMPLE_FEEDS, Clock, FeedServer, Route, write_config

START = datetime(2026, 11, 20, 6, 0, tzinfo=UTC)


def _status(**overrides: object) -> FeedStatus:
    values: dict[str, object] = {
        "name": "Elbmed Pharma", "url": "https://www.elbmed.example/feed.atom", "title": None,
        "etag": None, "last_modified": None, "last_attempt_at": START, "last_success_at": START,
        "last_status": 200, "last_error": None, "last_warning": None,
        "consecutive_failures": 0, "entries": 5, "state": "ok",
    }  # fmt: skip
    values.update(overrides)
    return FeedStatus(**values)  # type: ignore[arg-type]


def _alerts(status: FeedStatus, now: datetime) -> list[str]:
    return [
        a.incident
        for a in feed_alerts(
            [status], now, failing_for=timedelta(hours=24), silent_for=timedelta(days=30)
        )
    ]


def test_a_failing_feed_is_an_alert_only_after_the_configured_time() -> None:
    failing = _status(
        state="failing",
        failing_since=START,
        consecutive_failures=3,
        last_error="HTTP 503 Service Unavailable",
    )
    assert _alerts(failing, START + timedelta(hours=23)) == []
    assert _alerts(failing, START + timedelta(hours=25)) == [f"failing:{START.isoformat()}"]
    # The same incident keeps its key however long it lasts.
    assert _alerts(failing, START + timedelta(days=9)) == [f"failing:{START.isoformat()}"]


def test_gone_moved_and_silent_feeds_are_alerts() -> None:
    assert _alerts(_status(state="gone", failing_since=START), START)[0].startswith("gone:")
    moved = _status(moved_to="https://news.elbmed.example/feed.atom")
    assert _alerts(moved, START) == ["moved:https://news.elbmed.example/feed.atom"]
    quiet = _status(newest_entry_at=START - timedelta(days=31))
    assert _alerts(quiet, START) == [f"silent:{(START - timedelta(days=31)).isoformat()}"]
    assert _alerts(_status(newest_entry_at=START - timedelta(days=3)), START) == []


def _mails(folder: Path) -> list[EmailMessage]:
    new = folder / "new"
    if not new.exists():
        return []
    return [
        email.message_from_bytes(p.read_bytes(), policy=policy.default)  # type: ignore[misc]
        for p in sorted(new.iterdir())
    ]


def test_the_operator_is_mailed_once_per_incident(tmp_path: Path, feed_server: FeedServer) -> None:
    feed_server.routes["/elbmed.atom"] = Route(b"oops", status=500)
    good = feed_server.serve_file("/kristallwerk.atom", EXAMPLE_FEEDS / "kristallwerk.atom")
    path = write_config(
        tmp_path,
        [
            {"name": "Elbmed Pharma", "url": feed_server.url("/elbmed.atom"), "language": "de"},
            {"name": "KristallWerk Discovery", "url": good},
        ],
        extra='[alerts]\nemail = "presse@nordbio.example"\nfailing_hours = 24\n',
    )
    config = load_config(path)
    clock = Clock(START)
    service = Service(config, Store(config.database_url), clock=clock)
    service.prepare()
    maildir = tmp_path / "mail"

    asyncio.run(service.fetch())
    assert asyncio.run(service.send_alerts()) == []  # failing, but not for long yet

    for hours in (12, 25, 26, 30):  # the scheduler keeps fetching; the partner stays down
        clock.now = START + timedelta(hours=hours)
        asyncio.run(service.fetch())
        asyncio.run(service.send_alerts())

    alerts = [
        m for m in _mails(maildir) if m["To"].addresses[0].addr_spec == "presse@nordbio.example"
    ]
    assert len(alerts) == 1
    assert "Elbmed Pharma" in alerts[0]["Subject"]
    assert "has failed for" in alerts[0]["Subject"]
    body = alerts[0].get_content()
    assert "HTTP 500" in body and feed_server.url("/elbmed.atom") in body

    # The partner recovers, then breaks again days later: a new incident, a new mail.
    feed_server.serve_file("/elbmed.atom", EXAMPLE_FEEDS / "elbmed-pharma.atom")
    clock.now = START + timedelta(days=2)
    asyncio.run(service.fetch())
    feed_server.routes["/elbmed.atom"] = Route(b"oops", status=502)
    for hours in (0, 30):
        clock.now = START + timedelta(days=3, hours=hours)
        asyncio.run(service.fetch())
        asyncio.run(service.send_alerts())
    alerts = [
        m for m in _mails(maildir) if m["To"].addresses[0].addr_spec == "presse@nordbio.example"
    ]
    assert len(alerts) == 2
    assert alerts[0]["Message-ID"] != alerts[1]["Message-ID"]
    service.store.close()


def test_without_an_alert_address_nothing_is_mailed(
    tmp_path: Path, feed_server: FeedServer
) -> None:
    feed_server.routes["/gone.rss"] = Route(b"", status=410)
    config = load_config(
        write_config(tmp_path, [{"name": "Alt", "url": feed_server.url("/gone.rss")}])
    )
    service = Service(config, Store(config.database_url), clock=Clock(START))
    service.prepare()
    asyncio.run(service.fetch())
    assert asyncio.run(service.send_alerts()) == []
    assert _mails(tmp_path / "mail") == []
    assert service.store.feed_statuses()[0].state == "gone"
    service.store.close()
