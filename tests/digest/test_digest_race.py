"""Several digest runs at once on one store: every subscriber gets each story once.

A cron job overlapping a manual ``clusterfeed digest``, or two schedulers, start real
processes at the same moment against one database. Each round below adds news, then
starts two or three ``clusterfeed digest`` / ``run --once`` / ``run`` processes together
and reads what the mail server (aiosmtpd on 127.0.0.1) or the Maildir got. Before the
digests were planned in the transaction that writes them, about half of the mails of
a round went out twice.
"""

from __future__ import annotations

import asyncio
import email
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import Envelope, Session
from sqlalchemy import update

from clusterfeed.app.schedule import STARTED_KEY
from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.store import Store, deliveries
from tests.conftest import (
    FeedServer,
    RecordingHandler,
    Route,
    SmtpServer,
    digest_titles,
    write_config,
)

CLUSTERFEED = str(Path(sys.executable).with_name("clusterfeed"))
SUBSCRIBERS = 200
# The processes started together in each round: "once" is ``run --once``, "run" the
# scheduler (``clusterfeed run``) until it is told to stop. The rounds marked "maildir"
# write files instead of talking SMTP (quicker), the others go through the real SMTP
# server.
ROUNDS: list[tuple[str, tuple[str, ...]]] = [
    ("smtp", ("digest", "digest")),
    ("smtp", ("digest", "digest", "digest")),
    ("smtp", ("digest", "once")),
    ("maildir", ("digest", "digest")),
    ("smtp", ("run", "digest")),
    ("maildir", ("digest", "digest", "once")),
    ("smtp", ("digest", "digest")),
    ("maildir", ("digest", "once")),
    ("smtp", ("digest", "digest", "digest")),
    ("maildir", ("digest", "run", "once")),
]
COMMANDS = {"digest": ["digest"], "once": ["run", "--once"], "run": ["run"]}


class News:
    """A partner feed that gets two more items for every round."""

    def __init__(self, server: FeedServer, rss_feed: Any) -> None:
        self.server, self.rss_feed = server, rss_feed
        self.items: list[dict[str, str]] = []
        self.url = server.url("/partner.rss")

    def add_round(self, n: int) -> set[str]:
        titles = {f"Round {n}: Helix Vektor opens lab {k}" for k in "AB"}
        for i, title in enumerate(sorted(titles)):
            self.items.insert(
                0,
                {
                    "title": title,
                    "link": f"https://www.helixvektor.example/news/{n}-{i}",
                    "description": f"Lab {i} of round {n}, with sequencing and cell lines.",
                    "date": f"Fri, 20 Nov 2026 {n:02d}:{i:02d}:00 +0000",
                },
            )
        self.server.routes["/partner.rss"] = Route(self.rss_feed("Helix Vektor", self.items))
        return titles


def _config(folder: Path, news: News, database_url: str, mail: dict[str, Any]) -> Path:
    return write_config(
        folder,
        [{"name": "Helix Vektor", "url": news.url, "language": "en"}],
        database_url=database_url,
        mail=mail,
        subscribers=[{"email": f"reader{i:03d}@example.org"} for i in range(SUBSCRIBERS)],
        # A scheduler started in a round finds this minute's digest missed (the store
        # says it first started a day ago) and sends it at once.
        extra='[schedule]\ndigest_cron = "* * * * *"\ntimezone = "UTC"\n',
    )


def _fetch(config: Path) -> None:
    """Store this round's news before the digest runs start (in this process: a
    process start per round cost more than the fetch)."""
    loaded = load_config(config)
    store = Store(loaded.database_url)
    service = Service(loaded, store)
    try:
        service.prepare()
        started = (datetime.now(UTC) - timedelta(days=1)).isoformat()
        store.setting_or_create(STARTED_KEY, lambda: started)
        outcomes = asyncio.run(service.fetch())
    finally:
        service.close()
        store.close()
    assert [o.new_entries for o in outcomes] == [2], outcomes


def _together(config: Path, kinds: tuple[str, ...], logs: Path) -> list[str]:
    """Start one process per kind at once, wait for all; their outputs.

    A scheduler (``run``) runs until it is told to stop: once the others are done and
    it has started, SIGTERM lets it finish the digest it found missed and stop.
    """
    procs = []
    for i, kind in enumerate(kinds):
        with (logs / f"{i}-{kind}.log").open("w") as out:
            procs.append(
                subprocess.Popen(
                    [CLUSTERFEED, *COMMANDS[kind], "--config", str(config)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    for kind, proc in zip(kinds, procs, strict=True):
        if kind != "run":
            proc.wait(timeout=300)
    for i, (kind, proc) in enumerate(zip(kinds, procs, strict=True)):
        if kind == "run":
            log = logs / f"{i}-{kind}.log"
            deadline = time.monotonic() + 120
            while "clusterfeed running" not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
    outputs = [(logs / f"{i}-{kind}.log").read_text() for i, kind in enumerate(kinds)]
    for kind, proc, output in zip(kinds, procs, outputs, strict=True):
        assert proc.returncode == 0, f"{kind}: {output}"
    return outputs


def _parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=policy.default)  # type: ignore[return-value]


def test_digest_runs_started_together_mail_each_subscriber_each_story_once(
    tmp_path: Path,
    feed_server: FeedServer,
    smtp_server: SmtpServer,
    rss_feed: Any,
    database_url: str,
) -> None:
    news = News(feed_server, rss_feed)
    smtp_mail = {
        "transport": "smtp",
        "host": smtp_server.host,
        "port": smtp_server.port,
        "security": "none",
        "connections": 2,
    }
    maildir = tmp_path / "mail" / "new"
    seen_files: set[str] = set()
    had: dict[str, Counter[str]] = {
        f"reader{i:03d}@example.org": Counter() for i in range(SUBSCRIBERS)
    }
    duplicates = 0
    for n, (transport, kinds) in enumerate(ROUNDS, start=1):
        config = _config(
            tmp_path,
            news,
            database_url,
            smtp_mail if transport == "smtp" else {"transport": "maildir", "maildir": "mail"},
        )
        fresh = news.add_round(n)
        _fetch(config)
        before = len(smtp_server.handler.messages)
        logs = tmp_path / f"round-{n}"
        logs.mkdir()

        outputs = _together(config, kinds, logs)

        received: list[tuple[str, EmailMessage]] = []
        if transport == "smtp":
            for envelope in smtp_server.handler.messages[before:]:
                message = _parse(envelope.content)
                received += [(rcpt, message) for rcpt in envelope.rcpt_tos]
        else:
            for file in sorted(maildir.iterdir()):
                if file.name not in seen_files:
                    seen_files.add(file.name)
                    message = _parse(file.read_bytes())
                    received.append((message["To"].addresses[0].addr_spec, message))
        per_reader = Counter(rcpt for rcpt, _ in received)
        duplicates += sum(count - 1 for count in per_reader.values())
        for rcpt, message in received:
            titles = digest_titles(message)
            assert fresh <= titles, f"round {n}: {rcpt} lacks this round's news"
            had[rcpt].update(titles)
        assert set(per_reader) == set(had), f"round {n}: not every subscriber got a digest"
        assert duplicates == 0, f"round {n} ({' + '.join(kinds)}): {duplicates} duplicate mails"
        assert not [(r, t) for r, titles in had.items() for t, c in titles.items() if c > 1]
        store = Store(load_config(config).database_url)
        try:
            counts = store.delivery_counts()
        finally:
            store.close()
        assert counts == {"sent": SUBSCRIBERS * n}, (n, counts, outputs)


def test_a_run_that_finds_messages_claimed_by_another_run_says_so_and_leaves_them(
    tmp_path: Path, feed_server: FeedServer, rss_feed: Any, database_url: str, run_cli
) -> None:
    news = News(feed_server, rss_feed)
    config = _config(tmp_path, news, database_url, {"transport": "maildir", "maildir": "mail"})
    news.add_round(1)
    _fetch(config)
    loaded = load_config(config)
    store = Store(loaded.database_url)
    service = Service(loaded, store)
    assert service.create_digest("manual:elsewhere", datetime.now(UTC)) == (True, SUBSCRIBERS)
    # Another run, on another machine, is sending the first three right now.
    taken = store.claim_due("other-host:4242/abcd", datetime.now(UTC), 3)

    result = run_cli("digest", "--config", config)

    assert result.exit_code == 0, result.output
    assert "digest: 0 planned, 197 sent" in result.stdout
    assert (
        "3 messages are being sent by another run (a `clusterfeed digest` or `clusterfeed run` "
        "started at the same time); it records them, and nobody gets them twice"
    ) in result.stdout
    assert store.delivery_counts() == {"sent": SUBSCRIBERS - 3, "sending": 3}
    assert {d.subscriber.email for d in taken}.isdisjoint(
        m["To"].addresses[0].addr_spec
        for m in (_parse(f.read_bytes()) for f in (tmp_path / "mail" / "new").iterdir())
    )
    store.close()


class DyingNeighbour(RecordingHandler):
    """A mail server that accepts everything; while the first message comes in, a run
    beside the sender claims every row still waiting and is killed (its process is
    gone, its claims stay)."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()  # a pid of this host that no process has any more
        self.dead = f"{socket.gethostname()}:{child.pid}/gone"
        self.taken = 0

    async def handle_DATA(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        if not self.messages:
            with self.store.engine.begin() as conn:
                self.taken = conn.execute(
                    update(deliveries)
                    .where(deliveries.c.state == "pending")
                    .values(state="sending", claimed_by=self.dead, claimed_at=datetime.now(UTC))
                ).rowcount
        return await super().handle_DATA(server, session, envelope)


def test_a_run_takes_over_the_claims_of_a_run_beside_it_that_died(
    tmp_path: Path, feed_server: FeedServer, rss_feed: Any, database_url: str
) -> None:
    """Not only the next run: the one still sending picks up what the dead one held."""
    news = News(feed_server, rss_feed)
    config = _config(tmp_path, news, database_url, {"transport": "maildir", "maildir": "mail"})
    news.add_round(1)
    _fetch(config)
    store = Store(load_config(config).database_url)
    handler = DyingNeighbour(store)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        mail = {"transport": "smtp", "host": "127.0.0.1", "port": port, "security": "none"}
        loaded = load_config(_config(tmp_path, news, database_url, mail))
        service = Service(loaded, store)
        assert service.create_digest("manual:one", datetime.now(UTC)) == (True, SUBSCRIBERS)

        report = asyncio.run(service.send_pending())
    finally:
        controller.stop()

    assert handler.taken > 0, "the neighbour took nothing: the test proves nothing"
    assert report.sent == SUBSCRIBERS
    assert store.delivery_counts() == {"sent": SUBSCRIBERS}
    received = Counter(r for e in handler.messages for r in e.rcpt_tos)
    assert len(received) == SUBSCRIBERS and set(received.values()) == {1}
    store.close()
