"""The schedule: cron slots in local time, missed digests, and the long-running service."""

from __future__ import annotations

import email
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email import policy
from pathlib import Path
from typing import Any

import feedparser
import pytest

from clusterfeed.app.schedule import (
    STARTED_KEY,
    digest_trigger,
    latest_slot,
    missed_slot,
    slot_key,
)
from clusterfeed.app.service import Service
from clusterfeed.config import all_subscribers, load_config
from clusterfeed.store import Store
from tests.conftest import EXAMPLE_STORIES, FeedServer, Route, served_example_feeds, write_config

CLUSTERFEED = str(Path(sys.executable).with_name("clusterfeed"))
BERLIN_7AM = digest_trigger("0 7 * * *", "Europe/Berlin")


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def _returns(call: Callable[[], Any]) -> Any:
    """Run ``call``; fail (instead of hanging the test run) if it never returns."""
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    worker.start()
    worker.join(60)
    assert result, "did not return: endless loop"
    return result[0]


# -- cron slots ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # Winter time: 07:00 in Berlin is 06:00 UTC.
        (_utc(2026, 3, 28, 12, 0), _utc(2026, 3, 28, 6, 0)),
        # The night of 29 March the clocks go forward: 07:00 is now 05:00 UTC.
        (_utc(2026, 3, 29, 4, 59), _utc(2026, 3, 28, 6, 0)),
        (_utc(2026, 3, 29, 5, 0), _utc(2026, 3, 29, 5, 0)),
        (_utc(2026, 3, 30, 4, 0), _utc(2026, 3, 29, 5, 0)),
        # The night of 25 October they go back: 07:00 is 06:00 UTC again.
        (_utc(2026, 10, 25, 5, 30), _utc(2026, 10, 24, 5, 0)),
        (_utc(2026, 10, 25, 6, 0), _utc(2026, 10, 25, 6, 0)),
    ],
)
def test_latest_slot_follows_berlin_time_across_dst(now: datetime, expected: datetime) -> None:
    slot = latest_slot(BERLIN_7AM, now)

    assert slot == expected
    assert slot.astimezone(BERLIN_7AM.timezone).hour == 7


def test_latest_slot_on_the_repeated_hour_when_clocks_go_back() -> None:
    # 02:30 happens twice on 25 October 2026 in Berlin (00:30 and 01:30 UTC).
    trigger = digest_trigger("30 2 * * *", "Europe/Berlin")

    first = _returns(lambda: latest_slot(trigger, _utc(2026, 10, 25, 1, 0)))
    second = _returns(lambda: latest_slot(trigger, _utc(2026, 10, 25, 12, 0)))
    weeks_later = _returns(lambda: latest_slot(trigger, _utc(2026, 11, 20, 12, 0)))

    # (Compared in UTC: Python never calls a time in the repeated hour equal to one
    # in another zone.)
    assert first.astimezone(UTC) == _utc(2026, 10, 25, 0, 30)
    assert second.astimezone(UTC) == _utc(2026, 10, 25, 1, 30)
    assert weeks_later.astimezone(UTC) == _utc(2026, 11, 20, 1, 30)


def test_weekday_numbers_mean_what_they_mean_in_crontab() -> None:
    # The bundled example's "weekdays at 07:00": Monday (1) to Friday (5), as in crontab.
    trigger = digest_trigger("0 7 * * 1-5", "Europe/Berlin")
    sunday_night = _utc(2026, 11, 22, 23, 0)

    slots = []
    for day in range(1, 8):
        slot = latest_slot(trigger, sunday_night + timedelta(days=day))
        if slot not in slots:
            slots.append(slot)

    assert [s.strftime("%a %H:%M") for s in slots] == [
        "Mon 07:00", "Tue 07:00", "Wed 07:00", "Thu 07:00", "Fri 07:00",
    ]  # fmt: skip
    # 0 and 7 are Sunday.
    assert latest_slot(digest_trigger("0 7 * * 0", "UTC"), sunday_night).strftime("%a") == "Sun"
    assert latest_slot(digest_trigger("0 7 * * 7", "UTC"), sunday_night).strftime("%a") == "Sun"


def test_latest_slot_in_tokyo_and_weekdays_only() -> None:
    trigger = digest_trigger("0 7 * * 1-5", "Asia/Tokyo")

    # Monday 23 November 2026, 03:00 in Tokyo: the last weekday slot was Friday.
    assert latest_slot(trigger, _utc(2026, 11, 22, 18, 0)) == _utc(2026, 11, 19, 22, 0)
    assert slot_key(_utc(2026, 11, 19, 22, 0)) == "scheduled:2026-11-19T22:00:00+00:00"


# -- missed digests ----------------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path, database_url: str):
    path = write_config(
        tmp_path,
        [{"name": "Partner", "url": "https://partner.example/feed"}],
        database_url=database_url,
        extra='[schedule]\ndigest_cron = "0 7 * * *"\ntimezone = "Europe/Berlin"\n',
    )
    config = load_config(path)
    service = Service(config, Store(config.database_url))
    service.prepare()
    yield service
    service.store.close()


def test_missed_slot_only_counts_slots_after_the_first_start(service: Service) -> None:
    first_start = _utc(2026, 3, 2, 5, 0)  # 06:00 in Berlin, before that day's digest

    assert missed_slot(service, first_start) is None  # yesterday's digest is not "missed"
    assert missed_slot(service, _utc(2026, 3, 2, 5, 30)) is None
    assert service.store.get_setting(STARTED_KEY) == first_start.isoformat()

    # Down from 06:30 to 09:00: the 07:00 digest was missed and is due once.
    slot = missed_slot(service, _utc(2026, 3, 2, 8, 0))
    assert slot == _utc(2026, 3, 2, 6, 0)

    created, _planned = service.create_digest(slot_key(slot), slot)
    assert created
    assert missed_slot(service, _utc(2026, 3, 2, 8, 0)) is None
    # A second worker starting at the same time cannot build it again.
    assert service.create_digest(slot_key(slot), slot) == (False, 0)


def test_a_long_outage_sends_only_the_latest_missed_digest(service: Service) -> None:
    missed_slot(service, _utc(2026, 3, 2, 5, 0))

    slot = missed_slot(service, _utc(2026, 3, 6, 12, 0))

    assert slot == _utc(2026, 3, 6, 6, 0)


# -- the service as a process -------------------------------------------------------------


class _Process:
    """``clusterfeed run`` as a child process, its log lines collected as they come."""

    def __init__(self, config: Path, *extra: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [CLUSTERFEED, "run", "--config", str(config), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None or self._reader.is_alive(), self.log
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.log}"
            time.sleep(0.02)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def running():
    started: list[_Process] = []

    def start(config: Path, *extra: str) -> _Process:
        started.append(_Process(config, *extra))
        return started[-1]

    yield start
    for process in started:
        process.kill()


def _mails(config: Path) -> list[Path]:
    folder = config.parent / "mail" / "new"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_run_fetches_on_start_and_stops_cleanly_on_sigterm(
    tmp_path: Path, feed_server: FeedServer, database_url: str, running
) -> None:
    config = write_config(
        tmp_path,
        served_example_feeds(feed_server),
        database_url=database_url,
        extra='[schedule]\nfetch_interval_minutes = 5\ndigest_cron = "0 0 1 1 *"\n',
    )
    service = running(config)

    service.wait_for("fetch cycle: 9 of 9 feeds due, 0 failed; next at ")
    service.wait_for("; feed updated (")
    assert service.stop() == 0

    log = service.log
    assert "clusterfeed running: fetching every 5 min, digest on '0 0 1 1 *'" in log
    assert log.index("stopping: finishing the work in flight") < log.index("stopped cleanly")
    assert "Traceback" not in service.log
    assert (tmp_path / "public" / "feed.atom").is_file()
    assert _mails(config) == []  # no digest is due: none was sent


def test_run_serve_logs_its_address_and_no_scheduler_chatter(
    tmp_path: Path, feed_server: FeedServer, database_url: str, running
) -> None:
    import socket

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(
        tmp_path,
        served_example_feeds(feed_server)[:1],
        database_url=database_url,
        extra='[schedule]\ndigest_cron = "0 0 1 1 *"\n',
    )
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("[web]\n", f'[web]\nhost = "127.0.0.1"\nport = {port}\n'))
    service = running(config, "--serve")

    service.wait_for(f"serving on http://127.0.0.1:{port}/")
    service.wait_for("fetch cycle: 1 of 1 feed due, 0 failed")
    deadline = time.monotonic() + 30
    while True:  # the log line comes just before the socket is bound
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            break
        except httpx.ConnectError:
            assert time.monotonic() < deadline, service.log
            time.sleep(0.05)
    assert service.stop() == 0

    assert answer.status_code in (200, 503)
    assert "apscheduler" not in service.log  # "Adding job tentatively", "Scheduler started"
    assert "1 feeds" not in service.log


def test_sigterm_lets_the_fetch_in_flight_finish(
    tmp_path: Path, feed_server: FeedServer, database_url: str, running, rss_feed
) -> None:
    feeds = served_example_feeds(feed_server)
    slow = [{"title": "Slow news", "link": "https://slow.example/news/1"}]
    feed_server.routes["/slow.rss"] = Route(rss_feed("Slow Partner", slow), delay=1.5)
    feeds.append({"name": "Slow Partner", "url": feed_server.url("/slow.rss")})
    config = write_config(tmp_path, feeds, database_url=database_url)
    service = running(config)
    while not feed_server.requests_for("/slow.rss"):
        assert service.proc.poll() is None, service.log
        time.sleep(0.01)

    assert service.stop() == 0  # SIGTERM while the slow feed is still being fetched

    log = service.log
    stopping = log.index("stopping: finishing the work in flight")
    assert stopping < log.index("fetch cycle: 10 of 10 feeds") < log.index("stopped cleanly")
    store = Store(load_config(config).database_url)
    assert {s.name: s.entries for s in store.feed_statuses()}["Slow Partner"] == 1
    store.close()


def _fetched_earlier(config: Path, minutes: int) -> None:
    """Move every feed's last and next attempt back, as if the fetch was that long ago."""
    from clusterfeed.store import feeds as feed_table

    store = Store(load_config(config).database_url)
    rows = [(s.name, s.last_attempt_at, s.next_attempt_at) for s in store.feed_statuses()]
    with store.engine.begin() as conn:
        for name, last, upcoming in rows:
            assert last is not None and upcoming is not None
            conn.execute(
                feed_table.update()
                .where(feed_table.c.name == name)
                .values(
                    last_attempt_at=last - timedelta(minutes=minutes),
                    next_attempt_at=upcoming - timedelta(minutes=minutes),
                )
            )
    store.close()


def _next_at(config: Path) -> str:
    store = Store(load_config(config).database_url)
    soonest = min(s.next_attempt_at for s in store.feed_statuses() if s.next_attempt_at)
    store.close()
    return soonest.astimezone(BERLIN_7AM.timezone).strftime("%H:%M")


def test_a_shorter_fetch_interval_applies_at_the_next_start(
    tmp_path: Path, feed_server: FeedServer, database_url: str, running, rss_feed
) -> None:
    feeds = served_example_feeds(feed_server)
    news = [{"title": "Erste Meldung", "link": "https://elbe.example/news/1"}]
    feed_server.routes["/elbe.rss"] = Route(rss_feed("Elbe Partner", news))
    feeds.append({"name": "Elbe Partner", "url": feed_server.url("/elbe.rss")})

    def configure(minutes: int) -> Path:
        schedule = f'[schedule]\nfetch_interval_minutes = {minutes}\ndigest_cron = "0 0 1 1 *"\n'
        return write_config(tmp_path, feeds, database_url=database_url, extra=schedule)

    config = configure(30)
    first = running(config)
    first.wait_for("fetch cycle: 10 of 10 feeds due, 0 failed")
    assert first.stop() == 0

    # Started again at once: nothing is due, and the log says why and until when.
    again = running(config)
    again.wait_for("fetch cycle:")
    assert again.stop() == 0
    assert (
        "fetch cycle: 0 of 10 feeds due (10 waiting for their interval), 0 failed; "
        f"next at {_next_at(config)}; feed unchanged"
    ) in again.log

    # Ten minutes later the partner publishes; the operator shortens the interval to a
    # minute and restarts. The old next attempts are 20 minutes away.
    _fetched_earlier(config, 10)
    news.append({"title": "Zweite Meldung", "link": "https://elbe.example/news/2"})
    feed_server.routes["/elbe.rss"] = Route(rss_feed("Elbe Partner", news))
    asked = len(feed_server.requests_for("/elbe.rss"))
    config = configure(1)
    shorter = running(config)
    shorter.wait_for("fetch cycle:")
    assert shorter.stop() == 0

    assert "fetch cycle: 10 of 10 feeds due, 0 failed" in shorter.log, shorter.log
    assert len(feed_server.requests_for("/elbe.rss")) == asked + 1
    titles = [e.title for e in feedparser.parse(tmp_path / "public" / "feed.atom").entries]
    assert "Zweite Meldung" in titles


def test_a_digest_missed_while_down_is_sent_once_on_start(
    tmp_path: Path, feed_server: FeedServer, database_url: str, running, run_cli
) -> None:
    config = write_config(
        tmp_path,
        served_example_feeds(feed_server),
        database_url=database_url,
        extra='[schedule]\ndigest_cron = "0 7 * * *"\n',
    )
    assert run_cli("fetch", "--config", config).exit_code == 0
    # The service was first started three days ago, and has been down since.
    store = Store(load_config(config).database_url)
    store.setting_or_create(
        STARTED_KEY, lambda: (datetime.now(UTC) - timedelta(days=3)).isoformat()
    )
    store.close()

    first = running(config)
    first.wait_for("planned, ")
    assert first.stop() == 0

    assert "while clusterfeed was not running: sending it now" in first.log
    assert "1 delivery planned, 1 sent" in first.log
    assert len(_mails(config)) == 1

    second = running(config)
    second.wait_for("clusterfeed running")
    second.wait_for("fetch cycle:")
    assert second.stop() == 0

    assert "not running: sending it now" not in second.log
    assert len(_mails(config)) == 1


# -- run --once on the bundled example ----------------------------------------------------


def test_run_once_on_a_copied_example_leaves_mail_and_feed(example_copy: Path) -> None:
    elsewhere = example_copy.parents[1] / "elsewhere"
    elsewhere.mkdir()

    result = subprocess.run(
        [CLUSTERFEED, "run", "--once", "--config", str(example_copy)],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    var = example_copy.parents[1] / "var"
    feed = var / "public" / "feed.atom"
    maildir = var / "mail" / "new"
    assert f"feed written: {feed}" in result.stdout
    assert "fetched 9 feeds: 47 new items, 0 failed" in result.stdout
    subscribers = {s.email for s in all_subscribers(load_config(example_copy))}
    assert f"digest: {len(subscribers)} sent of {len(subscribers)} planned → {maildir}" in (
        result.stdout
    )

    parsed = feedparser.parse(feed.read_bytes())
    assert not parsed.bozo and len(parsed.entries) == EXAMPLE_STORIES
    mails = sorted(maildir.iterdir())
    assert len(mails) == len(subscribers)
    assert all(m.name.endswith(".eml") for m in mails)
    recipients = {
        email.message_from_bytes(m.read_bytes(), policy=policy.default)["To"].addresses[0].addr_spec
        for m in mails
    }
    assert recipients == subscribers
    assert not any(elsewhere.iterdir())

    again = subprocess.run(
        [CLUSTERFEED, "run", "--once", "--config", str(example_copy)],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Nothing new was fetched, so nothing is sent, as docs/configuration.md promises: what the
    # first digest left out (it holds at most digest.max_stories) is on its web
    # version, not in a second mail.
    assert again.returncode == 0, again.stderr
    assert "fetched 9 feeds: 0 new items, 0 failed" in again.stdout
    assert f"feed unchanged: {feed}" in again.stdout
    assert sorted(maildir.iterdir()) == mails
    titles: dict[str, list[str]] = {}
    for mail in maildir.iterdir():
        msg = email.message_from_bytes(mail.read_bytes(), policy=policy.default)
        text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        titles.setdefault(msg["To"].addresses[0].addr_spec, []).extend(
            re.findall(r"^\* (.+?)\r?$", text, flags=re.M)
        )
    for address, seen in titles.items():
        assert len(seen) == len(set(seen)), f"{address} got a story twice"
