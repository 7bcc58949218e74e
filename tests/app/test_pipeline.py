"""The whole cycle over real HTTP, a real store and a real Maildir."""

from __future__ import annotations

import asyncio
import email
from email import policy
from pathlib import Path

import feedparser

from clusterfeed.app.sequences import cycle
from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.store import Store
from tests.conftest import EXAMPLE_STORIES, FeedServer


def _service(config_path: Path) -> Service:
    config = load_config(config_path)
    service = Service(config, Store(config.database_url))
    service.prepare()
    return service


def _maildir_messages(folder: Path) -> list[email.message.EmailMessage]:
    return [
        email.message_from_bytes(p.read_bytes(), policy=policy.default)  # type: ignore[misc]
        for p in sorted((folder / "new").iterdir())
    ]


def test_cycle_fetches_publishes_and_mails_once(
    example_config: Path, feed_server: FeedServer
) -> None:
    service = _service(example_config)
    report = asyncio.run(cycle(service, with_digest=True))

    assert [f.state for f in report.feeds] == ["new"] * 9
    assert sum(f.new_entries for f in report.feeds) == 47
    assert report.published
    assert report.digest is not None and report.digest.send.sent == 1
    mails = _maildir_messages(example_config.parent / "mail")
    assert len(mails) == 1
    assert mails[0]["To"].addresses[0].addr_spec == "reader@example.org"

    parsed = feedparser.parse(service.feed_path().read_bytes())
    assert not parsed.bozo
    # 47 items in 36 stories: the acquisition is told by four partners (three of them
    # link one release, plain, with utm_ parameters, with an upper-case host and a
    # fragment), the letter of intent in Kobe and the EU approval by three and four,
    # and three more events by two (see config/example-feeds/README.md).
    assert len(parsed.entries) == service.store.count_stories() == EXAMPLE_STORIES

    # Second cycle: every feed answers 304, nothing new is stored or mailed.
    before = feed_server.requests_for("/feeds/helix-vektor.rss")
    again = asyncio.run(cycle(service, with_digest=True))
    after = feed_server.requests_for("/feeds/helix-vektor.rss")
    assert len(after) == len(before) + 1
    assert after[-1].headers.get("if-none-match")
    assert [f.state for f in again.feeds] == ["unchanged"] * 9
    assert not again.published
    assert again.digest is not None and again.digest.sent == 0
    assert service.store.count_entries() == 47
    assert len(_maildir_messages(example_config.parent / "mail")) == 1
    service.store.close()


def test_parsing_in_worker_processes_stores_the_same_as_in_process(
    tmp_path: Path, feed_server: FeedServer
) -> None:
    """fetch.parse_processes moves parsing to a process pool; the result must not change."""
    from tests.conftest import served_example_feeds, write_config

    feeds = served_example_feeds(feed_server)
    stored = {}
    for processes in (0, 2):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        path = write_config(folder, feeds)
        path.write_text(
            path.read_text(encoding="utf-8").replace(
                "[mail]", f"[fetch]\nparse_processes = {processes}\n\n[mail]"
            ),
            encoding="utf-8",
        )
        service = _service(path)
        try:
            outcomes = asyncio.run(service.fetch())
            assert all(o.state == "new" for o in outcomes)
            if processes:
                assert service._pool is not None  # the pool really was used
            stored[processes] = sorted(
                (s.entry.feed_name, s.entry.identity, s.entry.title, s.entry.summary_html)
                for s in service.store.recent_stories()
            )
        finally:
            service.close()
            service.store.close()
    assert stored[0] == stored[2]
    assert len(stored[2]) == EXAMPLE_STORIES


def test_a_refused_store_write_fails_that_feed_only_and_loses_nothing(
    tmp_path: Path, feed_server: FeedServer
) -> None:
    """An error from the database (locked, full) is that feed's failure, not the cycle's.

    A real SQLite trigger refuses one feed's entries, as a full disk would. Its
    transaction rolls back with its validators, so the next cycle asks without them
    and stores everything once the database accepts writes again.
    """
    from sqlalchemy import text

    from tests.conftest import served_example_feeds, write_config

    path = write_config(tmp_path, served_example_feeds(feed_server))
    service = _service(path)
    broken = "Helix Vektor"
    with service.store.engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TRIGGER refuse BEFORE INSERT ON entries WHEN NEW.feed_id = "
                f"(SELECT id FROM feeds WHERE name = '{broken}') "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )
        )
    try:
        outcomes = {o.name: o for o in asyncio.run(service.fetch())}
        assert outcomes[broken].state == "failed"
        assert "database or disk is full" in (outcomes[broken].message or "")
        assert "next cycle fetches it again" in (outcomes[broken].message or "")
        assert all(o.state == "new" for n, o in outcomes.items() if n != broken)
        status = {s.name: s for s in service.store.feed_statuses()}[broken]
        assert status.entries == 0 and status.etag is None and status.last_modified is None

        with service.store.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse"))
        requests_before = len(feed_server.requests_for("/feeds/helix-vektor.rss"))
        again = {o.name: o for o in asyncio.run(service.fetch())}
        asked = feed_server.requests_for("/feeds/helix-vektor.rss")[requests_before:]
        assert [r.headers.get("if-none-match") for r in asked] == [None]
        assert again[broken].state == "new" and again[broken].new_entries > 0
        assert all(o.state == "unchanged" for n, o in again.items() if n != broken)
    finally:
        service.close()
        service.store.close()
