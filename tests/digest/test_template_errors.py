"""A template the operator broke: `check` finds it, a digest run stops with a sentence,
and no delivery is charged an attempt for it.

Real parts only: the real command (in-process through click, and once as a process to
see what the operator sees), a real SMTP server (aiosmtpd) that can greylist, feeds over
real HTTP, a real store.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from clusterfeed.config import load_config
from clusterfeed.store import Store, deliveries
from tests.conftest import TEMPLATES, FeedServer, Route, SmtpServer, write_config

CLUSTERFEED = str(Path(sys.executable).with_name("clusterfeed"))
GREYLISTED = "451 4.7.1 Greylisted, please try again later"


def _templates(tmp_path: Path) -> Path:
    folder = tmp_path / "templates"
    shutil.copytree(TEMPLATES, folder)
    return folder


def _config(
    tmp_path: Path,
    database_url: str,
    *,
    feeds: list[dict[str, Any]] | None = None,
    mail: dict[str, Any] | None = None,
) -> Path:
    templates = _templates(tmp_path)
    path = write_config(
        tmp_path,
        feeds or [{"name": "Helix", "url": "https://helix.example/feed.rss", "topics": ["x"]}],
        database_url=database_url,
        mail=mail,
    )
    text = path.read_text(encoding="utf-8").replace(str(TEMPLATES), str(templates))
    path.write_text(text, encoding="utf-8")
    return path


def _replace_line(file: Path, number: int, text: str) -> str:
    """Put ``text`` on line ``number`` of ``file``; returns the file's old content."""
    old = file.read_text(encoding="utf-8")
    lines = old.split("\n")
    lines[number - 1] = text
    file.write_text("\n".join(lines), encoding="utf-8")
    return old


def _line_of(file: Path, needle: str) -> int:
    for number, line in enumerate(file.read_text(encoding="utf-8").split("\n"), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {file}")


# -- check ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "needle", "broken", "problem"),
    [
        # a syntax error in the digest's HTML body
        ("digest.html", "<title>", "<title>{{ cluster.name ( }}</title>", "unexpected"),
        # a misspelt variable in the subject
        ("digest_subject.txt", "{{ cluster.name|shorten(40) }}", "{{ clustr.name }}", "'clustr'"),
        # a misspelt variable in a branch no sample takes (looked up statically)
        ("digest.txt", "{{ date_text }}", "{% if count > 999 %}{{ cnt }}{% endif %}", "'cnt'"),
        # the web page, a partial it includes, a sign-up page and a sign-up mail
        ("site.html", "<body", "<body>{% for %}", "Expected an expression"),
        ("site.html", "<body", '<body>{% include "nope.html" %}', "'nope.html' not found"),
        ("site_story.html", "story.title", "<h2>{{ story.titel }}</h2>", "titel"),
        ("subscribe.html", "{% block content %}", "{% block content %}{% endif %}", "endif"),
        ("confirm_email.txt", "{{ confirm_url }}", "{{ confirm_link }}", "'confirm_link'"),
    ],
)
def test_check_renders_every_template_and_names_file_and_line(
    tmp_path: Path, database_url: str, run_cli: Any, name: str, needle: str, broken: str,
    problem: str,
) -> None:  # fmt: skip
    path = _config(tmp_path, database_url)
    assert run_cli("check", "--config", path).exit_code == 0
    file = tmp_path / "templates" / name
    line = _line_of(file, needle)
    _replace_line(file, line, broken)

    result = run_cli("check", "--config", path)

    assert result.exit_code == 1, result.output
    assert f"{file}:{line}:" in result.output
    assert problem in result.output
    assert "OK" not in result.output


# -- digest ----------------------------------------------------------------------------------


def _delivery(path: Path) -> tuple[str, int, str | None]:
    store = Store(load_config(path).database_url)
    try:
        with store.engine.connect() as conn:
            row = conn.execute(
                select(deliveries.c.state, deliveries.c.attempts, deliveries.c.last_error)
            ).one()
        return row.state, row.attempts, row.last_error
    finally:
        store.close()


def _smtp_mail(smtp: SmtpServer) -> dict[str, Any]:
    # Retries come due a few seconds after a 4xx answer, so the test need not wait long.
    return {"transport": "smtp", "host": smtp.host, "port": smtp.port, "security": "none",
            "retry_first_minutes": 0.05, "retry_jitter": 0}  # fmt: skip


def _feed(feed_server: FeedServer, rss_feed: Any, items: int) -> list[dict[str, Any]]:
    items_ = [
        {"title": f"Helix news {i}", "link": f"https://helix.example/news/{i}"}
        for i in range(items)
    ]
    body = rss_feed("Helix", items_)
    feed_server.routes["/helix.rss"] = Route(body, content_type="application/rss+xml")
    return [{"name": "Helix", "url": feed_server.url("/helix.rss"), "topics": ["gene-therapy"]}]


def test_a_broken_digest_template_stops_each_run_and_costs_no_attempt(
    tmp_path: Path,
    database_url: str,
    feed_server: FeedServer,
    smtp_server: SmtpServer,
    rss_feed: Any,
    run_cli: Any,
) -> None:
    path = _config(
        tmp_path, database_url, feeds=_feed(feed_server, rss_feed, 3), mail=_smtp_mail(smtp_server)
    )
    assert run_cli("fetch", "--config", path).exit_code == 0
    smtp_server.handler.rcpt_replies = [GREYLISTED]
    assert run_cli("digest", "--config", path).exit_code == 0
    assert _delivery(path)[:2] == ("pending", 1)  # greylisted once: one attempt

    template = tmp_path / "templates" / "digest.html"
    line = _line_of(template, "<title>")
    good = _replace_line(template, line, "<title>{{ cluster.name ( }}</title>")
    checked = run_cli("check", "--config", path)
    assert checked.exit_code == 1 and f"{template}:{line}:" in checked.output

    # As the operator sees it: a sentence naming the file and line, exit 2, no traceback.
    seen = subprocess.run(
        [CLUSTERFEED, "digest", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert seen.returncode == 2, seen.stderr
    assert f"{template}:{line}:" in seen.stderr
    assert "no delivery attempt was counted" in seen.stderr
    assert "Traceback" not in seen.stderr + seen.stdout
    for _ in range(7):
        result = run_cli("digest", "--config", path)
        assert result.exit_code == 2, result.output
        assert f"{template}:{line}:" in result.stderr
    assert _delivery(path)[:2] == ("pending", 1)
    assert smtp_server.handler.messages == []

    # Fixed; the server greylists once more. Before, that was the ninth attempt and the
    # digest was given up; now it is the second, and the digest arrives.
    template.write_text(good, encoding="utf-8")
    smtp_server.handler.rcpt_replies = [GREYLISTED]
    assert run_cli("digest", "--config", path).exit_code == 0
    state, attempts, error = _delivery(path)
    assert state != "failed", error
    for _ in range(20):  # the retry comes due 3 s after the greylisting
        if _delivery(path)[0] == "sent":
            break
        time.sleep(0.5)
        assert run_cli("digest", "--config", path).exit_code == 0
    state, attempts, _error = _delivery(path)
    assert (state, attempts) == ("sent", 3)  # two greylistings and the delivery
    assert [m.rcpt_tos for m in smtp_server.handler.messages] == [["reader@example.org"]]


def test_a_template_failing_only_on_real_stories_gives_the_claim_back_uncounted(
    tmp_path: Path,
    database_url: str,
    feed_server: FeedServer,
    smtp_server: SmtpServer,
    rss_feed: Any,
    run_cli: Any,
) -> None:
    """The samples have three stories; a branch for more fails only at sending time.
    The message is composed after the row is claimed, so the claim goes back as it was."""
    path = _config(
        tmp_path, database_url, feeds=_feed(feed_server, rss_feed, 5), mail=_smtp_mail(smtp_server)
    )
    template = tmp_path / "templates" / "digest.txt"
    line = _line_of(template, "{{ date_text }}")
    good = _replace_line(
        template, line, "{{ date_text }}{% if count > 4 %}{{ stories[4].no_such }}{% endif %}"
    )
    assert run_cli("check", "--config", path).exit_code == 0  # no sample reaches it
    assert run_cli("fetch", "--config", path).exit_code == 0

    for _ in range(3):
        result = run_cli("digest", "--config", path)
        assert result.exit_code == 2, result.output
        assert f"{template}:{line}:" in result.stderr
        assert "no_such" in result.stderr
    assert _delivery(path)[:2] == ("pending", 0)
    assert smtp_server.handler.messages == []

    template.write_text(good, encoding="utf-8")
    assert run_cli("digest", "--config", path).exit_code == 0
    assert _delivery(path)[:2] == ("sent", 1)  # the one attempt that delivered it
    assert len(smtp_server.handler.messages) == 1
