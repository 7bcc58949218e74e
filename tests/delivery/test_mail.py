"""Delivery: through a real SMTP server (aiosmtpd) or into a Maildir, each digest exactly once.

The kill tests run ``clusterfeed digest`` as a separate process, SIGKILL it in the
middle of sending, start it again, and count what every subscriber received.
"""

from __future__ import annotations

import email
import subprocess
import sys
import time
from collections import Counter
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from clusterfeed.config import load_config
from clusterfeed.store import Store, deliveries, subscribers
from tests.conftest import FeedServer, Route, SmtpServer, served_example_feeds, write_config

CLUSTERFEED = str(Path(sys.executable).with_name("clusterfeed"))

ITEMS = [
    {
        "title": "Helix Vektor opens vector plant in Kiel",
        "link": "https://www.helixvektor.example/news/plant",
        "description": "The new plant doubles the capacity for AAV vectors.",
    },
    {
        "title": "Phase I results for HV-101",
        "link": "https://www.helixvektor.example/news/phase-1",
        "description": "First patients dosed.",
    },
]


def _smtp(server: SmtpServer, connections: int = 2) -> dict[str, Any]:
    return {
        "transport": "smtp",
        "host": server.host,
        "port": server.port,
        "security": "none",
        "connections": connections,
    }


def _readers(n: int) -> list[dict[str, Any]]:
    return [{"email": f"reader{i:03d}@example.org"} for i in range(n)]


def _parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=policy.default)  # type: ignore[return-value]


def _received(server: SmtpServer) -> list[tuple[list[str], EmailMessage]]:
    return [(list(e.rcpt_tos), _parse(e.content)) for e in list(server.handler.messages)]


def _states(config_path: Path) -> dict[str, tuple[str, str | None]]:
    """Each subscriber's delivery state and last error, read from the store's tables."""
    store = Store(load_config(config_path).database_url)
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(subscribers.c.email, deliveries.c.state, deliveries.c.last_error).join(
                subscribers, subscribers.c.id == deliveries.c.subscriber_id
            )
        ).all()
    store.close()
    result: dict[str, tuple[str, str | None]] = {}
    for row in rows:
        assert row.email not in result, f"two deliveries for {row.email}"
        result[row.email] = (row.state, row.last_error)
    return result


@pytest.fixture
def smtp_config(
    tmp_path: Path, feed_server: FeedServer, smtp_server: SmtpServer, database_url: str, rss_feed
) -> Path:
    feed_server.routes["/helix.rss"] = Route(rss_feed("Helix Vektor", ITEMS))
    return write_config(
        tmp_path,
        [
            {
                "name": "Helix Vektor",
                "url": feed_server.url("/helix.rss"),
                "topics": ["gene-therapy"],
            }
        ],
        database_url=database_url,
        mail=_smtp(smtp_server),
        subscribers=_readers(5),
    )


def _fetch(run_cli, config_path: Path) -> None:
    result = run_cli("fetch", "--config", config_path)
    assert result.exit_code == 0, result.output


def _digest(run_cli, config_path: Path) -> str:
    result = run_cli("digest", "--config", config_path)
    assert result.exit_code == 0, result.output
    return result.stdout


# -- SMTP ------------------------------------------------------------------------------


def test_every_subscriber_gets_exactly_one_message_over_smtp(
    smtp_config: Path, smtp_server: SmtpServer, run_cli
) -> None:
    _fetch(run_cli, smtp_config)

    out = _digest(run_cli, smtp_config)

    assert "digest: 5 planned, 5 sent, 0 deferred, 0 failed" in out
    received = _received(smtp_server)
    assert sorted(r for rcpts, _m in received for r in rcpts) == [
        f"reader{i:03d}@example.org" for i in range(5)
    ]
    for rcpts, msg in received:
        # The envelope goes to the one subscriber the message is addressed to.
        assert rcpts == [msg["To"].addresses[0].addr_spec]
        text = msg.get_body(("plain",)).get_content()
        assert all(f"* {item['title']}" in text for item in ITEMS)
    assert len({m["Message-ID"] for _r, m in received}) == 5
    assert {e.mail_from for e in smtp_server.handler.messages} == {"news@nordbio.example"}
    assert {s for s, _e in _states(smtp_config).values()} == {"sent"}

    again = _digest(run_cli, smtp_config)

    assert "digest: 0 planned, 0 sent" in again
    assert len(smtp_server.handler.messages) == 5


@pytest.mark.parametrize("stage", ["rcpt", "data"])
def test_a_temporary_refusal_waits_for_its_retry_time(
    smtp_config: Path, smtp_server: SmtpServer, run_cli, stage: str
) -> None:
    # When it is sent later is tested with a hand-moved clock in test_delivery.py.
    _fetch(run_cli, smtp_config)
    replies = (
        smtp_server.handler.rcpt_replies if stage == "rcpt" else smtp_server.handler.data_replies
    )
    replies.append("451 4.3.0 try later")

    out = _digest(run_cli, smtp_config)

    assert "5 planned, 4 sent, 1 deferred, 0 failed" in out
    assert "deferred deliveries are tried again from" in out
    states = _states(smtp_config)
    (deferred,) = [e for e, (s, _err) in states.items() if s == "pending"]
    assert "451" in (states[deferred][1] or "")
    assert deferred not in {r for rcpts, _m in _received(smtp_server) for r in rcpts}

    again = _digest(run_cli, smtp_config)

    # Too early: nothing is sent, and the waiting delivery is still reported.
    assert "0 planned, 0 sent, 1 deferred, 0 failed" in again
    assert len(smtp_server.handler.messages) == 4
    assert _states(smtp_config)[deferred][0] == "pending"


def test_a_permanent_refusal_is_recorded_and_never_retried(
    smtp_config: Path, smtp_server: SmtpServer, feed_server: FeedServer, run_cli, rss_feed
) -> None:
    _fetch(run_cli, smtp_config)
    smtp_server.handler.rcpt_replies.append("550 5.1.1 no such user")

    out = _digest(run_cli, smtp_config)

    assert "5 planned, 4 sent, 0 deferred, 1 failed" in out
    states = _states(smtp_config)
    (refused,) = [e for e, (s, _err) in states.items() if s == "failed"]
    assert "550 5.1.1 no such user" in (states[refused][1] or "")

    again = _digest(run_cli, smtp_config)

    # Not the refused message again, nor its stories in a new digest.
    assert "0 planned, 0 sent" in again
    assert len(smtp_server.handler.messages) == 4
    assert refused not in {r for rcpts, _m in _received(smtp_server) for r in rcpts}
    assert _states(smtp_config)[refused][0] == "failed"

    # Later news still reaches the address (the refusal was about one message).
    news = {"title": "Helix Vektor hires a CSO", "link": "https://www.helixvektor.example/news/cso"}
    feed_server.routes["/helix.rss"] = Route(rss_feed("Helix Vektor", [news, *ITEMS]))
    _fetch(run_cli, smtp_config)
    assert "5 planned, 5 sent" in _digest(run_cli, smtp_config)


def test_a_title_cannot_add_recipients_over_smtp(
    smtp_config: Path, smtp_server: SmtpServer, feed_server: FeedServer, run_cli, rss_feed
) -> None:
    hostile = {
        "title": "",
        "raw_title": "Results&#13;&#10;Bcc: victim@example.com&#13;&#10;To: victim@example.com",
        "link": "https://www.helixvektor.example/news/q3",
    }
    feed_server.routes["/helix.rss"] = Route(rss_feed("Helix Vektor", [hostile]))
    _fetch(run_cli, smtp_config)

    _digest(run_cli, smtp_config)

    received = _received(smtp_server)
    assert len(received) == 5
    for rcpts, msg in received:
        assert len(rcpts) == 1 and rcpts[0].startswith("reader")
        assert msg["Bcc"] is None
        assert [a.addr_spec for a in msg["To"].addresses] == rcpts


# -- the kill tests ------------------------------------------------------------------------


def _start_digest(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [CLUSTERFEED, "digest", "--config", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _kill_when(proc: subprocess.Popen[bytes], count, target: int, total: int) -> int:
    """SIGKILL ``proc`` once ``count()`` reaches ``target``; return the count after it died."""
    while count() < target:
        assert proc.poll() is None, "the digest finished before it could be killed"
        time.sleep(0.002)
    proc.kill()
    proc.wait()  # reaped, so the next run sees the claim's process is gone
    after = count()
    assert 0 < after < total, f"killed at {after} of {total}: not in the middle of sending"
    return after


N = 150
# Kill points: how many more messages the next run may deliver before it is killed.
KILL_AFTER = [1, 30, 12, 45]


def test_killed_in_the_middle_of_sending_every_subscriber_gets_exactly_one(
    tmp_path: Path, feed_server: FeedServer, database_url: str, run_cli
) -> None:
    config = write_config(
        tmp_path,
        served_example_feeds(feed_server),
        database_url=database_url,
        subscribers=_readers(N),
    )
    _fetch(run_cli, config)
    new = tmp_path / "mail" / "new"
    log = tmp_path / "digest.log"

    def count() -> int:
        return len(list(new.iterdir())) if new.is_dir() else 0

    for more in KILL_AFTER:
        _kill_when(_start_digest(config, log), count, count() + more, N)

    final = _start_digest(config, log)
    assert final.wait(timeout=120) == 0, log.read_text()

    recipients = Counter(_parse(f.read_bytes())["To"].addresses[0].addr_spec for f in new.iterdir())
    assert recipients == {f"reader{i:03d}@example.org": 1 for i in range(N)}
    assert all(f.name.endswith(".eml") for f in new.iterdir())
    store = Store(load_config(config).database_url)
    assert store.delivery_counts() == {"sent": N}
    store.close()


def test_killed_in_the_middle_of_smtp_sending_at_most_one_duplicate_per_kill(
    tmp_path: Path,
    feed_server: FeedServer,
    smtp_server: SmtpServer,
    database_url: str,
    run_cli,
) -> None:
    # One connection: the documented window is one message per open connection.
    config = write_config(
        tmp_path,
        served_example_feeds(feed_server),
        database_url=database_url,
        mail=_smtp(smtp_server, connections=1),
        subscribers=_readers(N),
    )
    _fetch(run_cli, config)
    log = tmp_path / "digest.log"

    def count() -> int:
        return len(smtp_server.handler.messages)

    for more in KILL_AFTER[:3]:
        _kill_when(_start_digest(config, log), count, count() + more, N)

    final = _start_digest(config, log)
    assert final.wait(timeout=120) == 0, log.read_text()

    received = _received(smtp_server)
    per_subscriber = Counter(r for rcpts, _m in received for r in rcpts)
    assert set(per_subscriber) == {f"reader{i:03d}@example.org" for i in range(N)}
    copies = Counter(m["Message-ID"] for _r, m in received)
    assert len(copies) == N, "one digest per subscriber, resent copies keep their Message-ID"
    duplicates = sum(n - 1 for n in copies.values())
    assert duplicates <= 3, f"{duplicates} duplicates after 3 kills"
    store = Store(load_config(config).database_url)
    assert store.delivery_counts() == {"sent": N}
    store.close()
