"""Workers and the scheduler on PostgreSQL: every feed fetched, every subscriber mailed once,
while a worker is killed with SIGKILL again and again.

The crash test runs real processes (`clusterfeed scheduler`, `clusterfeed worker`) against
the test PostgreSQL, feeds on a real HTTP server and subscribers behind a real SMTP server
(aiosmtpd), all on 127.0.0.1. Its size is CLUSTERFEED_CRASH_SIZE="feeds,subscribers,kills"
(default 60,300,4, about a minute here); the issue's size, "300,2000,20", is run by hand
(docs/development.md).
"""

from __future__ import annotations

import asyncio
import email
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FeedServer, SmtpServer, postgres_schema, write_config

PG = os.environ.get("CLUSTERFEED_TEST_DATABASE_URL")


def test_worker_on_sqlite_says_postgresql_is_needed(run_cli: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "A", "url": "https://a.example/feed"}])
    for command in ("worker", "scheduler"):
        result = run_cli(command, "--config", config)
        assert result.exit_code == 2
        assert "need PostgreSQL" in result.stderr
        assert "postgresql+psycopg://" in result.stderr  # how to set it
        assert "clusterfeed run" in result.stderr  # or what to run instead
        assert str(config) in result.stderr


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A fresh schema in the test PostgreSQL, as the store's database_url."""
    if not PG:
        pytest.skip("needs CLUSTERFEED_TEST_DATABASE_URL (workers run on PostgreSQL only)")
    with postgres_schema(PG, "w") as url:
        yield url


def test_scheduler_queues_a_due_feed_once_and_a_worker_fetches_it_once(
    tmp_path: Path, feed_server: FeedServer, pg_schema_url: str, rss_feed: Any, open_service: Any
) -> None:
    """In one process: the scheduler's look, twice, queues each due feed once; a worker
    that runs the queue fetches each once; the next look finds nothing due."""
    from clusterfeed.app.workers import ensure_schema, make_app, tick

    recent = formatdate(time.time() - 3600, usegmt=True)
    feeds = []
    for i in range(3):
        item = {"title": f"Partner {i} news", "link": f"https://p{i}.example/1", "date": recent}
        feed_server.routes[f"/p{i}.rss"] = _route(rss_feed(f"P{i}", [item]))
        feeds.append({"name": f"P{i}", "url": feed_server.url(f"/p{i}.rss"), "language": "en"})
    config = write_config(
        tmp_path,
        feeds,
        database_url=pg_schema_url,
        extra="[fetch]\nallow_private_addresses = true\n",
    )
    service = open_service(config)

    async def scenario() -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        app = make_app(service)
        async with app.open_async():
            await ensure_schema(app)
            first = await tick(service, app)
            second = await tick(service, app)  # the same feeds still queued: not again
            await app.run_worker_async(wait=False, install_signal_handlers=False)
            third = await tick(service, app)  # fetched: not due for fetch_interval_minutes
        return first, second, third

    first, second, third = asyncio.run(scenario())
    assert (first["fetch"], second["fetch"], third["fetch"]) == (3, 0, 0)
    requests = [r.path for r in feed_server.requests]
    assert sorted(requests) == ["/p0.rss", "/p1.rss", "/p2.rss"]
    assert service.store.count_entries() == 3


def _size() -> tuple[int, int, int]:
    feeds, subscribers, kills = os.environ.get("CLUSTERFEED_CRASH_SIZE", "60,300,4").split(",")
    return int(feeds), int(subscribers), int(kills)


class Workers:
    """The scheduler and N worker processes; worker 0 is the one that gets killed."""

    def __init__(self, config: Path, folder: Path, count: int) -> None:
        self.config, self.folder = config, folder
        self.logs: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scheduler = self._start("scheduler")
        self.procs = [self._start("worker", "--concurrency", "4") for _ in range(count)]
        self.kills: list[float] = []

    def _start(self, *args: str) -> subprocess.Popen[bytes]:
        log = self.folder / f"{args[0]}-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "clusterfeed", *args, "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill_and_restart(self) -> None:
        victim = self.procs[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.kills.append(time.monotonic())
        self.procs[0] = self._start("worker", "--concurrency", "4")

    def working(self, timeout: float = 60) -> None:
        """Wait until the restarted worker takes tasks, so that kills hit work, not start-up."""
        log = self.logs[-1]
        end = time.monotonic() + timeout
        while time.monotonic() < end and b"running" not in log.read_bytes():
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in [self.scheduler, *self.procs]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [self.scheduler, *self.procs]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def tail(self) -> str:
        return "\n".join(f"== {p.name}\n" + p.read_text()[-3000:] for p in self.logs[-4:])


def _until(condition: Any, timeout: float, what: str, workers: Workers) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what} not done within {timeout:.0f} s\n{workers.tail()}")
        time.sleep(0.5)
    return time.monotonic() - start


def test_killed_worker_loses_nothing_and_repeats_nothing(
    tmp_path: Path,
    feed_server: FeedServer,
    smtp_server: SmtpServer,
    pg_schema_url: str,
    rss_feed: Any,
) -> None:
    import sqlalchemy

    n_feeds, n_subscribers, n_kills = _size()
    recent = formatdate(time.time() - 3600, usegmt=True)
    feeds = []
    for i in range(n_feeds):
        items = [
            {
                "title": f"Partner {i} opens laboratory number {i * 7 + k} in district {k}",
                "link": f"https://partner{i}.example/news/{k}",
                "date": recent,
            }
            for k in range(2)
        ]
        path = f"/p{i}.rss"
        feed_server.routes[path] = _route(rss_feed(f"Partner {i}", items))
        feeds.append({"name": f"Partner {i}", "url": feed_server.url(path), "language": "en"})
    subscribers = [{"email": f"reader{i}@example.org"} for i in range(n_subscribers)]
    config = write_config(
        tmp_path,
        feeds,
        database_url=pg_schema_url,
        mail={
            "transport": "smtp",
            "host": smtp_server.host,
            "port": smtp_server.port,
            "security": "none",
        },
        subscribers=subscribers,
        extra="\n".join(
            [
                "[schedule]",
                "fetch_interval_minutes = 600",
                'digest_cron = "0 0 * * *"',  # today's slot passed before the first start
                'timezone = "UTC"',
                "[fetch]",
                "allow_private_addresses = true",
                "[workers]",
                "tick_seconds = 1",
                "heartbeat_seconds = 1",
                "stalled_after_seconds = 10",
            ]
        ),
    )
    engine = sqlalchemy.create_engine(pg_schema_url)
    bound = 10 + 1 + 20  # stalled_after + tick + a task's own time, seconds

    def count(sql: str) -> int:
        try:
            with engine.connect() as conn:
                return int(conn.execute(sqlalchemy.text(sql)).scalar() or 0)
        except sqlalchemy.exc.ProgrammingError:  # the processes have not made the table yet
            return 0

    workers = Workers(config, tmp_path, 3)
    killer_stop = threading.Event()

    mailing = threading.Event()

    def killer() -> None:
        # Half the kills while feeds are fetched, the rest while the digest is planned
        # and sent, each at a random moment.
        rng = random.Random()
        while len(workers.kills) < n_kills and not killer_stop.is_set():
            if len(workers.kills) == n_kills // 2:
                mailing.wait()
            workers.working()
            if killer_stop.wait(rng.uniform(0.3, 3.0)):
                return
            workers.kill_and_restart()

    try:
        # Phase 1: the scheduler queues every feed; the workers fetch them.
        made = "SELECT count(*) FROM feeds"
        t_start = _until(lambda: count(made) == n_feeds, 120, "start", workers)
        kills = threading.Thread(target=killer, daemon=True)
        kills.start()
        fetched = "SELECT count(*) FROM feeds WHERE last_success_at IS NOT NULL"
        t_fetch = _until(lambda: count(fetched) == n_feeds, 300, "fetching every feed", workers)
        # Phase 2: make today's 00:00 slot one that passed while running (the service
        # "first started" yesterday): the scheduler queues its digest.
        yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat()
        with engine.begin() as conn:
            conn.execute(
                sqlalchemy.text("UPDATE settings SET value = :v WHERE key = :k"),
                {"v": yesterday, "k": "scheduler_first_started_at"},
            )

        mailing.set()

        def all_sent() -> bool:
            return count("SELECT count(*) FROM deliveries WHERE state = 'sent'") == n_subscribers

        t_mail = _until(all_sent, 600, "mailing every subscriber", workers)
        kills.join(timeout=120)
        killer_stop.set()
        # The work of the last killed worker is finished by another within the bound.
        since_last_kill = time.monotonic() - workers.kills[-1] if workers.kills else 0.0
        idle = "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        waited = _until(lambda: count(idle) == 0, bound + 30, "the queue emptying", workers)
        assert len(workers.kills) == n_kills
    finally:
        killer_stop.set()
        workers.stop()

    # Every feed fetched, each item stored once.
    assert count(fetched) == n_feeds
    assert count("SELECT count(*) FROM entries") == 2 * n_feeds
    assert count("SELECT count(DISTINCT link) FROM entries") == 2 * n_feeds
    # One digest, every subscriber exactly one message of it.
    assert count("SELECT count(*) FROM digests") == 1
    ids: dict[str, set[str]] = {}
    received = Counter()
    for envelope in smtp_server.handler.messages:
        message = email.message_from_bytes(envelope.original_content or b"")
        for rcpt in envelope.rcpt_tos:
            ids.setdefault(rcpt, set()).add(message["Message-ID"])
            received[rcpt] += 1
    assert len(ids) == n_subscribers
    assert all(len(v) == 1 for v in ids.values()), "a subscriber got two different digests"
    # A worker killed between the server's "250" and recording it sends that message
    # again on recovery, with the same Message-ID (SMTP cannot say what was received):
    # at most one per connection open at the kill.
    resent = sum(c - 1 for c in received.values())
    print(f"crash test: {n_feeds} feeds, {n_subscribers} subscribers, {n_kills} kills; "
          f"{resent} messages resent after a kill; queue empty {since_last_kill + waited:.1f} s "
          "after the last kill; "
          f"start {t_start:.1f} s, fetch {t_fetch:.1f} s, mail {t_mail:.1f} s")  # fmt: skip
    assert resent <= n_kills * 4


def _route(body: bytes) -> Any:
    from tests.conftest import Route

    return Route(body, content_type="application/rss+xml")
