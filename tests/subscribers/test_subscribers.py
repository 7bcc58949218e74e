"""The operator's subscriber tools: list, add, remove, import, export, erase.

The real ``clusterfeed`` command runs against a real store (SQLite file or PostgreSQL);
confirmation mails land in the config's Maildir; a digest is really fetched and sent
before an erase, so the erase has history to delete.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, select

from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.model import Subscriber
from clusterfeed.store import Store
from tests.conftest import FeedServer, served_example_feeds, write_config


def _csv(folder: Path, text: str, name: str = "list.csv") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _store(config: Path) -> Store:
    store = Store(load_config(config).database_url)
    store.migrate()
    return store


def _states(config: Path) -> dict[str, str]:
    store = _store(config)
    try:
        return {m.subscriber.email: m.status for m in store.memberships()}
    finally:
        store.close()


def _mail_files(config: Path) -> list[str]:
    folder = load_config(config).mail.maildir / "new"
    return [p.read_text(encoding="utf-8", errors="replace") for p in folder.glob("*")]


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_import_without_confirmed_makes_pending_subscribers_and_mails_them(
    example_config: Path, tmp_path: Path, run_cli: Any
) -> None:
    listing = _csv(
        tmp_path,
        "email,topics,languages,frequency\n"
        "nina@example.org,research;medtech,de,weekly\n"
        "Omar@Example.org,,,\n",
    )

    result = run_cli("subscribers", "import", listing, "--config", example_config)

    assert result.exit_code == 0, result.output
    assert "imported 2 (pending, confirmation mails sent)" in result.stdout
    states = _states(example_config)
    assert states["nina@example.org"] == "pending"
    assert states["omar@example.org"] == "pending"
    mails = _mail_files(example_config)
    assert len(mails) == 2
    assert all("/confirm/" in m for m in mails)
    listed = run_cli("subscribers", "list", "--config", example_config)
    assert "nina@example.org" in listed.stdout and "pending" in listed.stdout
    assert "1 receives the digest" in listed.stdout  # only the config's reader so far


def test_import_errors_name_the_file_line_and_column_and_import_nothing(
    example_config: Path, tmp_path: Path, run_cli: Any
) -> None:
    listing = _csv(
        tmp_path,
        "email,frequency\nok@example.org,daily\nnot-an-address,daily\nb@example.org,hourly\n",
    )

    result = run_cli("subscribers", "import", listing, "--config", example_config)

    assert result.exit_code == 2
    assert f"{listing}: line 3, column email" in result.stderr
    assert f"{listing}: line 4, column frequency" in result.stderr
    assert "nothing imported" in result.stderr
    assert "ok@example.org" not in _states(example_config)

    unknown = _csv(tmp_path, "email,phone\na@example.org,123\n", "unknown.csv")
    result = run_cli("subscribers", "import", unknown, "--config", example_config)
    assert result.exit_code == 2
    assert f"{unknown}: line 1: unknown column(s) phone" in result.stderr


def test_export_and_import_round_trip_into_another_installation(
    example_config: Path, tmp_path: Path, run_cli: Any, feed_server: FeedServer
) -> None:
    listing = _csv(
        tmp_path,
        "email,name,topics,languages,frequency\n"
        "nina@example.org,Nina N,research;medtech,de,weekly\n"
        "omar@example.org,,,en;ja,daily\n"
        "gone@example.org,,,,daily\n",
    )
    assert run_cli("subscribers", "import", listing, "--confirmed", "--config", example_config)
    assert run_cli("subscribers", "remove", "gone@example.org", "--config", example_config)

    exported = run_cli("subscribers", "export", "--all", "--config", example_config)
    assert exported.exit_code == 0, exported.output
    rows = {r["email"]: r for r in _rows(exported.stdout)}
    assert rows["nina@example.org"]["topics"] == "research;medtech"
    assert rows["nina@example.org"]["status"] == "confirmed"
    assert rows["gone@example.org"]["status"] == "removed"
    out_file = tmp_path / "export.csv"
    assert run_cli("subscribers", "export", "--all", "--out", out_file, "--config", example_config)

    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = write_config(
        other_dir,
        served_example_feeds(feed_server),
        database_url=f"sqlite:///{other_dir / 'other.sqlite3'}",
        subscribers=[{"email": "someone@example.org"}],
    )
    imported = run_cli("subscribers", "import", out_file, "--confirmed", "--config", other)
    assert imported.exit_code == 0, imported.output

    again = {
        r["email"]: r for r in _rows(run_cli("subscribers", "export", "--config", other).stdout)
    }
    for email in ("nina@example.org", "omar@example.org", "reader@example.org"):
        for column in ("name", "topics", "languages", "frequency", "status"):
            assert again[email][column] == rows[email][column], (email, column)
    # Someone removed (or unsubscribed) is not brought back by a round trip.
    assert "gone@example.org" not in again
    assert "gone@example.org" not in _states(other)


def test_remove_and_add(example_config: Path, run_cli: Any) -> None:
    refused = run_cli("subscribers", "remove", "reader@example.org", "--config", example_config)
    assert refused.exit_code == 2
    assert "is listed in" in refused.stderr and "remove it there" in refused.stderr

    added = run_cli(
        "subscribers", "add", "pia@example.org", "--topic", "research", "--frequency", "weekly",
        "--config", example_config,
    )  # fmt: skip
    assert added.exit_code == 0 and "confirmation mail was sent" in added.stdout
    assert _states(example_config)["pia@example.org"] == "pending"
    bad = run_cli("subscribers", "add", "pia@@example.org", "--config", example_config)
    assert bad.exit_code == 2 and "not a valid e-mail address" in bad.stderr

    removed = run_cli("subscribers", "remove", "pia@example.org", "--config", example_config)
    assert removed.exit_code == 0 and "removed pia@example.org" in removed.stdout
    assert _states(example_config)["pia@example.org"] == "removed"
    listed = run_cli("subscribers", "list", "--all", "--config", example_config)
    assert "removed" in listed.stdout


def test_erase_deletes_every_personal_datum_and_blocks_a_later_import(
    example_config: Path, tmp_path: Path, run_cli: Any
) -> None:
    listing = _csv(tmp_path, "email,topics\nerika@example.org,\n")
    assert run_cli("subscribers", "import", listing, "--confirmed", "--config", example_config)
    run_cli("fetch", "--config", example_config)
    sent = run_cli("digest", "--config", example_config)
    assert sent.exit_code == 0, sent.output
    assert any("erika@example.org" in m for m in _mail_files(example_config))
    store = _store(example_config)
    assert "erika@example.org" in _everything_stored(store)
    store.close()

    erased = run_cli("subscribers", "erase", "Erika@example.org", "--config", example_config)

    assert erased.exit_code == 0, erased.output
    assert "erika@example.org: erased" in erased.stdout
    store = _store(example_config)
    dump = _everything_stored(store)
    assert "erika" not in dump.lower()
    assert all(c.email != "erika@example.org" for c in store.consents())
    # Others keep their history.
    assert any(c.email == "reader@example.org" for c in store.consents())
    store.close()

    again = run_cli("subscribers", "import", listing, "--confirmed", "--config", example_config)
    assert "erika@example.org was erased on request" in again.stderr
    assert "1 refused as erased" in again.stdout
    added = run_cli("subscribers", "add", "erika@example.org", "--config", example_config)
    assert added.exit_code == 2 and "suppression list" in added.stderr
    assert "erika@example.org" not in _states(example_config)


def _everything_stored(store: Store) -> str:
    """Every value in every table, as text, to look for what should be gone."""
    meta = MetaData()
    meta.reflect(store.engine)
    parts: list[str] = []
    with store.engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(select(table)):
                parts.extend(str(v) for v in row)
    return "\n".join(parts)


def test_an_erasure_holds_after_the_signing_secret_changes(
    example_config: Path, tmp_path: Path, run_cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The secret may move into the environment or be rotated; an address erased
    before must still be refused, and the stored key must not reveal the secret."""
    monkeypatch.delenv("CLUSTERFEED_SECRET", raising=False)
    listing = _csv(tmp_path, "email\nerika@example.org\n")
    assert run_cli("subscribers", "import", listing, "--config", example_config).exit_code == 0
    assert run_cli("subscribers", "erase", "erika@example.org", "--config", example_config)

    monkeypatch.setenv("CLUSTERFEED_SECRET", "a-new-secret-set-by-the-operator-later")
    again = run_cli("subscribers", "import", listing, "--config", example_config)

    assert "1 refused as erased" in again.stdout
    assert "erika@example.org" not in _states(example_config)
    store = _store(example_config)
    stored_key = store.get_setting("suppression_key")
    assert stored_key and store.secret() not in stored_key
    assert "a-new-secret" not in _everything_stored(store)
    store.close()


def test_an_erased_address_in_the_config_gets_no_mail_and_a_warning(
    example_config: Path, run_cli: Any, caplog: pytest.LogCaptureFixture
) -> None:
    erased = run_cli("subscribers", "erase", "reader@example.org", "--config", example_config)
    assert erased.exit_code == 0
    assert "still listed in" in erased.stderr

    config = load_config(example_config)
    service = Service(config, Store(config.database_url))
    try:
        with caplog.at_level("WARNING"):
            service.prepare()
        assert service.store.active_subscribers() == []
        assert service.store.membership(email="reader@example.org") is None
        assert "was erased on request" in caplog.text
    finally:
        service.close()
        service.store.close()


def test_the_consent_record_is_exported(example_config: Path, tmp_path: Path, run_cli: Any) -> None:
    listing = _csv(tmp_path, "email,topics,languages\nkai@example.org,research,de\n")
    run_cli("subscribers", "import", listing, "--config", example_config)

    result = run_cli("subscribers", "export", "--consents", "--config", example_config)

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "email,at,action,form_version,choices,ip_hash"
    rows = _rows(result.stdout)
    actions = {(r["email"], r["action"]) for r in rows}
    assert ("reader@example.org", "config") in actions
    assert ("kai@example.org", "import") in actions
    kai = next(r for r in rows if r["email"] == "kai@example.org")
    assert kai["choices"] == "topics=research languages=de frequency=daily"
    assert kai["at"].startswith("20")


# -- the store's rules, directly ----------------------------------------------------------

NOW = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    store = Store(database_url)
    store.migrate()
    yield store
    store.close()


def test_own_preference_changes_survive_a_restart_until_the_config_changes(store: Store) -> None:
    store.sync_subscribers([Subscriber(email="a@example.org", topics=("research",))], NOW)
    (a,) = store.active_subscribers()
    assert a.id is not None
    store.set_preferences(
        a.id, NOW, topics=("medtech",), languages=("de",), frequency="weekly", paused=False,
        form_version="1", ip_hash=None,
    )  # fmt: skip

    store.sync_subscribers([Subscriber(email="a@example.org", topics=("research",))], NOW)
    (a,) = store.active_subscribers()
    assert (a.topics, a.languages, a.frequency) == (("medtech",), ("de",), "weekly")

    store.sync_subscribers([Subscriber(email="a@example.org", topics=("financing",))], NOW)
    (a,) = store.active_subscribers()
    assert (a.topics, a.languages, a.frequency) == (("financing",), (), "daily")


def test_removed_from_the_config_then_added_again(store: Store) -> None:
    store.sync_subscribers([Subscriber(email="a@example.org")], NOW)
    store.sync_subscribers([], NOW)
    membership = store.membership(email="a@example.org")
    assert membership is not None and membership.status == "removed"
    assert store.active_subscribers() == []

    store.sync_subscribers([Subscriber(email="a@example.org")], NOW)
    assert [s.email for s in store.active_subscribers()] == ["a@example.org"]
    actions = [c.action for c in store.consents()]
    assert actions == ["config", "remove", "config"]


def test_unsubscribing_drops_the_digests_still_waiting(store: Store) -> None:
    store.sync_subscribers([Subscriber(email="a@example.org")], NOW)
    (a,) = store.active_subscribers()
    assert a.id is not None
    assert store.create_digest("scheduled:x", NOW, [(a, [], "<m1@nordbio.example>")], NOW)
    assert len(store.pending_deliveries()) == 1

    assert store.unsubscribe(a.id, NOW)

    assert store.pending_deliveries() == []
    assert not store.unsubscribe(a.id, NOW)  # a second click changes nothing


def test_pausing_drops_the_digests_still_waiting(store: Store) -> None:
    store.sync_subscribers([Subscriber(email="a@example.org")], NOW)
    (a,) = store.active_subscribers()
    assert a.id is not None
    assert store.create_digest("scheduled:x", NOW, [(a, [], "<m1@nordbio.example>")], NOW)

    store.set_preferences(
        a.id, NOW, topics=(), languages=(), frequency="daily", paused=True, form_version="1",
        ip_hash=None,
    )  # fmt: skip

    assert store.pending_deliveries() == []
    assert store.active_subscribers() == []


def test_rate_events_leave_the_window(store: Store) -> None:
    window = timedelta(hours=1)
    assert store.take_rate("client:x", NOW, window, 2)
    assert store.take_rate("client:x", NOW + timedelta(minutes=10), window, 2)
    assert not store.take_rate("client:x", NOW + timedelta(minutes=20), window, 2)
    assert store.take_rate("client:y", NOW + timedelta(minutes=20), window, 2)
    assert store.take_rate("client:x", NOW + timedelta(minutes=61), window, 2)


def test_an_unreachable_mail_server_is_a_sentence_not_a_traceback(
    tmp_path: Path, feed_server: FeedServer, database_url: str, run_cli: Any
) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(
        tmp_path,
        served_example_feeds(feed_server),
        database_url=database_url,
        mail={"transport": "smtp", "host": "127.0.0.1", "port": port, "security": "none",
              "timeout_seconds": 5},
    )  # fmt: skip

    result = run_cli("subscribers", "add", "new@example.org", "--config", config)

    assert result.exit_code == 2
    assert "new@example.org is stored as pending" in result.stderr
    assert "check [mail]" in result.stderr
    assert "Traceback" not in result.output
    assert _states(config)["new@example.org"] == "pending"
