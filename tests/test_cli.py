"""The ``clusterfeed`` command as an operator uses it: what it prints and where things go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import feedparser
import pytest

from tests.conftest import FeedServer, Route, served_example_feeds, write_config

CLUSTERFEED = str(Path(sys.executable).with_name("clusterfeed"))


@pytest.fixture
def one_broken(tmp_path: Path, feed_server: FeedServer, database_url: str) -> Path:
    """Two good partner feeds over HTTP and one whose server answers 500."""
    good = served_example_feeds(feed_server)[2:4]  # Helix Vektor, Hanse Innovationsfonds
    feed_server.routes["/broken.rss"] = Route(b"internal error", "text/plain", status=500)
    broken = {"name": "Elbe Diagnostics", "url": feed_server.url("/broken.rss")}
    return write_config(tmp_path, [*good, broken], database_url=database_url)


def _status_table(config: Path) -> str:
    """``clusterfeed status`` in a new process with a wide terminal, as an operator sees it."""
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [CLUSTERFEED, "status", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _row(table: str, name: str) -> list[str]:
    rows = [line for line in table.splitlines() if "│" in line or "┃" in line]
    (line,) = [line for line in rows if f" {name} " in line]
    cells = line.replace("┃", "│").strip().strip("│").split("│")
    return [cell.strip() for cell in cells]


def test_fetch_reports_new_items_and_the_broken_feed(one_broken: Path, run_cli) -> None:
    result = run_cli("fetch", "--config", one_broken)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "fetched 3 feeds: 10 new items, 1 failed"
    assert lines[1] == "  FAILED Elbe Diagnostics: HTTP 500 Internal Server Error"
    # Without a terminal, progress is plain log lines, one per feed.
    assert "Helix Vektor: new (5 new, 0 updated)" in result.stderr

    again = run_cli("fetch", "--config", one_broken)

    assert again.stdout.splitlines()[0] == "fetched 3 feeds: 0 new items, 1 failed"


def test_status_table_shows_each_feed_and_its_problem(one_broken: Path, run_cli) -> None:
    run_cli("fetch", "--config", one_broken)
    run_cli("fetch", "--config", one_broken)

    table = _status_table(one_broken)

    assert "3 feeds" in table
    header = _row(table, "feed")
    assert header == [
        "feed", "state", "last attempt", "last success", "HTTP", "errors",
        "next attempt", "items (30 d)", "problem",
    ]  # fmt: skip
    helix = dict(zip(header, _row(table, "Helix Vektor"), strict=True))
    assert helix["HTTP"] == "304"  # the second fetch was answered "not modified"
    assert helix["state"] == "ok"
    # "5 (n)": five items, n of them published in the last 30 days (depends on today).
    assert helix["items (30 d)"].startswith("5 (")
    assert (helix["errors"], helix["problem"]) == ("0", "")
    assert helix["last attempt"].endswith(" UTC")
    assert helix["next attempt"].endswith(" UTC")
    broken = dict(zip(header, _row(table, "Elbe Diagnostics"), strict=True))
    assert (broken["HTTP"], broken["items (30 d)"], broken["errors"]) == ("500", "0 (0)", "2")
    assert (broken["state"], broken["last success"]) == ("failing", "never")
    assert broken["problem"] == "HTTP 500 Internal Server Error"
    assert "stories: 9, items: 10, deliveries: none" in table


def test_status_json_lists_every_feed(one_broken: Path, feed_server: FeedServer, run_cli) -> None:
    run_cli("fetch", "--config", one_broken)

    result = run_cli("status", "--config", one_broken, "--json")

    assert result.exit_code == 0, result.output
    feeds = {f["name"]: f for f in json.loads(result.stdout)}
    assert set(feeds) == {"Helix Vektor", "Hanse Innovationsfonds", "Elbe Diagnostics"}
    for feed in feeds.values():
        assert {"name", "url", "state", "last_error"} <= set(feed)
    broken = feeds["Elbe Diagnostics"]
    assert broken["url"] == feed_server.url("/broken.rss")
    assert broken["state"] == "failing"
    assert broken["last_error"] == "HTTP 500 Internal Server Error"
    assert (broken["http_status"], broken["consecutive_errors"], broken["items"]) == (500, 1, 0)
    helix = feeds["Helix Vektor"]
    assert (helix["state"], helix["last_error"], helix["items"]) == ("ok", None, 5)
    assert helix["http_status"] == 200

    # The partner repairs its feed: the next fetch clears the error.
    feed_server.routes["/broken.rss"] = Route(
        feed_server.routes["/feeds/helix-vektor.rss"].body.replace(b"helixvektor", b"elbe-dx")
    )
    run_cli("fetch", "--config", one_broken)
    repaired = {
        f["name"]: f for f in json.loads(run_cli("status", "--config", one_broken, "--json").stdout)
    }["Elbe Diagnostics"]
    assert (repaired["state"], repaired["last_error"], repaired["consecutive_errors"]) == (
        "ok",
        None,
        0,
    )
    assert repaired["items"] > 0


def test_status_shows_the_last_attempt_after_a_server_stops(
    tmp_path: Path, database_url: str, run_cli
) -> None:
    # The operator's own feed: read once while its server ran, then the server stopped.
    own = FeedServer()
    try:
        feeds = served_example_feeds(own)[2:3]  # Helix Vektor
        config = write_config(tmp_path, feeds, database_url=database_url)
        assert run_cli("fetch", "--config", config).exit_code == 0
        first = _status_table(config)
        assert (
            dict(zip(_row(first, "feed"), _row(first, "Helix Vektor"), strict=True))["HTTP"]
            == "200"
        )
    finally:
        own.close()

    refused = run_cli("fetch", "--config", config)

    assert "1 failed" in refused.stdout
    table = _status_table(config)
    cells = dict(zip(_row(table, "feed"), _row(table, "Helix Vektor"), strict=True))
    assert cells["HTTP"] == "–"  # no answer at all; it was never a file
    assert (cells["state"], cells["errors"]) == ("failing", "1")
    assert "refused" in cells["problem"] or "connect" in cells["problem"]
    assert cells["last success"] != "never"  # history, and says so by its column
    (feed,) = json.loads(run_cli("status", "--config", config, "--json").stdout)
    assert (feed["http_status"], feed["state"]) == (None, "failing")


def test_a_file_feed_shows_file_in_the_http_column(tmp_path: Path, run_cli) -> None:
    from tests.conftest import EXAMPLE_FEEDS

    feed = {"name": "Helix Vektor", "url": str(EXAMPLE_FEEDS / "helix-vektor.rss")}
    config = write_config(tmp_path, [feed])
    run_cli("fetch", "--config", config)

    table = _status_table(config)

    assert dict(zip(_row(table, "feed"), _row(table, "Helix Vektor"), strict=True))["HTTP"] == (
        "file"
    )


def test_status_before_any_fetch(one_broken: Path, run_cli) -> None:
    result = run_cli("status", "--config", one_broken, "--json")

    assert [f["state"] for f in json.loads(result.stdout)] == ["new", "new", "new"]


def test_publish_says_where_the_feed_went(one_broken: Path, run_cli) -> None:
    run_cli("fetch", "--config", one_broken)
    feed = one_broken.parent / "public" / "feed.atom"

    first = run_cli("publish", "--config", one_broken)
    second = run_cli("publish", "--config", one_broken)

    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines()[0] == f"wrote: {feed}"
    written = sum(1 for p in feed.parent.rglob("*") if p.is_file())
    assert first.stdout.splitlines()[1] == (
        f"published {feed.parent}: {written} files written, 0 unchanged"
    )
    parsed = feedparser.parse(feed.read_bytes())
    # Ten items, but Helix Vektor and Hanse Innovationsfonds tell one story together.
    assert not parsed.bozo and len(parsed.entries) == 9
    assert second.stdout.splitlines() == [
        f"unchanged: {feed}",
        f"published {feed.parent}: 0 files written, {written} unchanged",
    ]


def test_digest_says_where_the_mail_went(one_broken: Path, run_cli) -> None:
    run_cli("fetch", "--config", one_broken)

    result = run_cli("digest", "--config", one_broken)

    maildir = one_broken.parent / "mail"
    assert result.stdout.strip() == (
        f"digest: 1 planned, 1 sent, 0 deferred, 0 failed (mail in {maildir}/new)"
    )
    assert len(list((maildir / "new").iterdir())) == 1


def test_version_and_help(run_cli) -> None:
    from clusterfeed import __version__

    assert run_cli("--version").stdout.strip() == f"clusterfeed, version {__version__}"
    help_text = run_cli("--help").stdout
    for command in ("check", "fetch", "publish", "digest", "run", "status"):
        assert command in help_text


def test_an_unusable_database_is_a_sentence_not_a_traceback(tmp_path: Path, run_cli) -> None:
    (tmp_path / "data").write_text("a file where the store's folder should be")
    path = write_config(
        tmp_path,
        [{"name": "Partner", "url": "https://partner.example/feed"}],
        database_url="sqlite:///data/store.sqlite3",
    )

    result = run_cli("status", "--config", path)

    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: cannot open database sqlite:///{tmp_path}/data/")
    assert result.exception is None or isinstance(result.exception, SystemExit)


# A worker process (parsing, rendering) starts by importing the script that started its
# parent; the generated ``clusterfeed`` script imports the entry point's module. This
# runs the same steps: load the installed entry point, start a worker the way the
# service does, and ask the worker what it imported.
WORKER_PROBE = """
import sys
from importlib.metadata import entry_points

(command,) = [e for e in entry_points(group="console_scripts") if e.name == "clusterfeed"]
command.load()
if __name__ == "__main__":
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["clusterfeed.ingest.reading"])
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        print(pool.submit(eval, "sorted(m for m in __import__('sys').modules)").result())
"""


def test_workers_started_by_the_command_import_only_what_they_need(tmp_path: Path) -> None:
    script = tmp_path / "clusterfeed-script.py"
    script.write_text(WORKER_PROBE, encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True
    )
    imported = set(eval(out.stdout.strip().splitlines()[-1]))
    assert "clusterfeed.ingest.reading" in imported  # the worker is really one of ours
    heavy = {"clusterfeed.cli", "clusterfeed.app.service", "clusterfeed.store", "sqlalchemy"}
    assert not heavy & imported, sorted(heavy & imported)
