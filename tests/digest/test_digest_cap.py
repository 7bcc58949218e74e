"""A digest over ``digest.max_stories``: the mail says how many more there are and
links the web version, which lists them all; running ``digest`` again sends nothing.

Before, a subscriber with 32 new stories and a cap of 30 got 30, and the next run (a
minute later) mailed the 2 left over as a digest of their own, with a second web
version. The commands run for real against SQLite and PostgreSQL, mail goes to a real
SMTP server (aiosmtpd) or into a Maildir, and the web version is read from the
published folder.
"""

from __future__ import annotations

import email
import re
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import (
    EXAMPLE_STORIES,
    FeedServer,
    Route,
    SmtpServer,
    digest_titles,
    mail_html,
    mail_text,
    served_example_feeds,
    write_config,
)

BASE = "https://news.nordbio.example"
CAP = 10
EVERYTHING = "all.news@example.org"
KANSAI = "kansai.only@example.org"  # the Japanese partner only: fewer stories than the cap
SUBSCRIBERS = [
    {"email": EVERYTHING, "name": "Alma News"},
    {"email": KANSAI, "topics": ["international"]},
]


def _today() -> str:
    # The commands run on the real clock; the page is named by the digest's local date.
    return datetime.now(UTC).astimezone(ZoneInfo("Europe/Berlin")).date().isoformat()


class _Headlines(HTMLParser):
    """The story headlines (h3) of a web page."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.headlines: list[str] = []
        self._text: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "h3":
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "h3" and self._text is not None:
            self.headlines.append(re.sub(r"\s+", " ", "".join(self._text)).strip())
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


class Outbox:
    """What the subscribers received, through SMTP or a Maildir."""

    def __init__(self, kind: str, folder: Path, smtp: SmtpServer) -> None:
        self.kind, self.folder, self.smtp = kind, folder, smtp

    @property
    def mail(self) -> dict[str, Any]:
        if self.kind == "smtp":
            return {
                "transport": "smtp",
                "host": self.smtp.host,
                "port": self.smtp.port,
                "security": "none",
            }
        return {"transport": "maildir", "maildir": "mail"}

    def messages(self) -> list[EmailMessage]:
        if self.kind == "smtp":
            raws = [e.content for e in self.smtp.handler.messages]
        else:
            new = self.folder / "mail" / "new"
            raws = [f.read_bytes() for f in sorted(new.iterdir())] if new.is_dir() else []
        return [email.message_from_bytes(r, policy=policy.default) for r in raws]  # type: ignore[misc]

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages() if m["To"].addresses[0].addr_spec == address]


@pytest.fixture(params=["smtp", "maildir"])
def outbox(request: pytest.FixtureRequest, tmp_path: Path, smtp_server: SmtpServer) -> Outbox:
    return Outbox(request.param, tmp_path, smtp_server)


def _config(
    folder: Path,
    feeds: list[dict[str, Any]],
    database_url: str,
    outbox: Outbox,
    cap: int = CAP,
    **digest: Any,
) -> Path:
    path = write_config(
        folder, feeds, database_url=database_url, mail=outbox.mail, subscribers=SUBSCRIBERS
    )
    keys = "".join(f"\n{k} = {str(v).lower()}" for k, v in digest.items())
    text = path.read_text("utf-8").replace("max_stories = 100", f"max_stories = {cap}{keys}")
    path.write_text(text, "utf-8")
    return path


def _run(run_cli: Any, *args: str | Path) -> str:
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return str(result.output)


def test_a_capped_digest_points_to_the_rest_and_running_it_again_sends_nothing(
    tmp_path: Path, feed_server: FeedServer, database_url: str, outbox: Outbox, run_cli: Any
) -> None:
    config = _config(tmp_path, served_example_feeds(feed_server), database_url, outbox)
    _run(run_cli, "fetch", "--config", config)
    _run(run_cli, "digest", "--config", config)

    (capped,) = outbox.to(EVERYTHING)
    shown = digest_titles(capped)
    assert len(shown) == CAP
    left = EXAMPLE_STORIES - CAP
    page_url = f"{BASE}/digests/{_today()}.html"
    # The mail says how many more there are, and where: in words and as a link.
    text = mail_text(capped)
    assert f"… and {left} more stories on the website:\n{page_url}" in text
    html = mail_html(capped)
    assert re.search(
        rf'and {left} more stories on the website: <a href="{re.escape(page_url)}"[^>]*>'
        rf"all {EXAMPLE_STORIES} stories of this digest</a>",
        html,
    ), html
    # Under the cap, nothing is said.
    (whole,) = outbox.to(KANSAI)
    assert "more stories on the website" not in mail_text(whole)
    assert "more stories on the website" not in mail_html(whole)

    # The web version lists every story of the digest, the ones left out included.
    page = tmp_path / "public" / "digests" / f"{_today()}.html"
    headlines = _Headlines(page.read_text("utf-8")).headlines
    assert len(headlines) == len(set(headlines)) == EXAMPLE_STORIES
    assert shown <= set(headlines)

    # A minute later: nothing new, so nothing is sent, and there is no second page.
    again = _run(run_cli, "digest", "--config", config)
    assert "digest: 0 planned, 0 sent" in again
    assert len(outbox.to(EVERYTHING)) == 1 and len(outbox.to(KANSAI)) == 1
    assert sorted(p.name for p in page.parent.glob(f"{_today()}*.html")) == [page.name]


def _items(numbers: range) -> list[dict[str, str]]:
    """Distinct news of one partner, the higher the number the newer."""
    subjects = [
        "opens a vector plant", "signs a licence with Kyoto", "wins the innovation award",
        "starts a phase I trial", "hires a chief medical officer", "moves into Kiel harbour",
        "publishes capsid data in Nature", "closes a Series B round",
    ]  # fmt: skip
    return [
        {
            "title": f"Helix Vektor {subjects[n]}",
            "link": f"https://www.helixvektor.example/news/{n}",
            "description": f"<p>Item {n}: Helix Vektor {subjects[n]}.</p>",
            "date": f"Fri, {10 + n} Nov 2026 09:30:00 +0000",
        }
        for n in numbers
    ]


@pytest.mark.parametrize("carry_over", [False, True])
def test_stories_left_out_go_into_the_next_digest_with_news_only_when_asked(
    tmp_path: Path,
    feed_server: FeedServer,
    database_url: str,
    outbox: Outbox,
    run_cli: Any,
    rss_feed: Any,
    carry_over: bool,
) -> None:
    """Five stories, a cap of three: the two oldest wait on the web version. A run
    with nothing new sends nothing, whatever ``carry_over`` says; with it, the next
    digest that has news takes them along (newest first, within the cap)."""
    feed_server.routes["/helix.rss"] = Route(rss_feed("Helix Vektor", _items(range(5))))
    feeds = [{"name": "Helix Vektor", "url": feed_server.url("/helix.rss"), "language": "en"}]
    config = _config(tmp_path, feeds, database_url, outbox, cap=3, carry_over=carry_over)
    titles = [i["title"] for i in _items(range(6))]

    _run(run_cli, "fetch", "--config", config)
    _run(run_cli, "digest", "--config", config)
    (first,) = outbox.to(EVERYTHING)
    assert digest_titles(first) == set(titles[2:5])  # the newest three
    assert "… and 2 more stories on the website" in mail_text(first)

    again = _run(run_cli, "digest", "--config", config)
    assert "digest: 0 planned" in again
    assert len(outbox.to(EVERYTHING)) == 1

    # News: one more item.
    feed_server.routes["/helix.rss"] = Route(rss_feed("Helix Vektor", _items(range(6))))
    _run(run_cli, "fetch", "--config", config)
    _run(run_cli, "digest", "--config", config)
    (second,) = [m for m in outbox.to(EVERYTHING) if m["Message-ID"] != first["Message-ID"]]
    if carry_over:
        assert digest_titles(second) == {titles[5], *titles[:2]}
    else:
        assert digest_titles(second) == {titles[5]}
    assert "more stories on the website" not in mail_text(second)


def test_without_a_web_address_the_mail_says_it_in_words_without_a_link(
    tmp_path: Path, feed_server: FeedServer, smtp_server: SmtpServer, run_cli: Any
) -> None:
    """Without ``web.base_url`` the web version's address is unknown: no link that
    leads nowhere, but the reader still learns that there is more."""
    outbox = Outbox("maildir", tmp_path, smtp_server)
    config = _config(tmp_path, served_example_feeds(feed_server), "sqlite:///s.sqlite3", outbox)
    text = config.read_text("utf-8").replace(f'base_url = "{BASE}"', "")
    config.write_text(text, "utf-8")
    _run(run_cli, "fetch", "--config", config)
    _run(run_cli, "digest", "--config", config)

    (capped,) = outbox.to(EVERYTHING)
    left = EXAMPLE_STORIES - CAP
    assert f"… and {left} more stories on the website.\n" in mail_text(capped)
    html = mail_html(capped)
    assert f"… and {left} more stories on the website.</td>" in html
    assert "/digests/" not in html
