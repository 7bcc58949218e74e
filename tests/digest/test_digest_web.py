"""The web version of every sent digest: written when the digest is sent, linked from
the mail ("View in browser"), served like every published file, never changed after.

The digest goes out for real (the ``clusterfeed`` commands, a real SMTP server), the
page is read from the published folder and over real HTTP from ``clusterfeed serve``'s
app.
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
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx
import pytest

from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.publish.site import digest_pages
from clusterfeed.store import Store
from tests.conftest import (
    FeedServer,
    Route,
    RunningServer,
    SmtpServer,
    digest_titles,
    mail_html,
    mail_text,
    served_example_feeds,
    write_config,
)

SUBSCRIBERS = [
    {"email": "gene.fan@example.org", "name": "Gene Fan", "topics": ["gene-therapy"]},
    {"email": "kansai.only@example.org", "topics": ["international"]},
    {"email": "deutsch.leser@example.org", "name": "Dora Deutsch", "languages": ["de"]},
]
BASE = "https://news.nordbio.example"


class _Page(HTMLParser):
    """Headlines (h3), links, alternates and scripts of a page for people."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.headlines: list[str] = []
        self.links: list[tuple[str, str]] = []
        self.alternates: list[dict[str, str | None]] = []
        self.scripts = 0
        self._in: str | None = None
        self._href = ""
        self._text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "link" and a.get("rel") == "alternate":
            self.alternates.append(a)
        if tag == "script":
            self.scripts += 1
        if tag in ("h3", "a"):
            if tag == "h3":
                self._in = "h3"
                self._text = []
            elif self._in is None:
                self._in = "a"
                self._href = a.get("href") or ""
                self._text = []

    def handle_endtag(self, tag: str) -> None:
        text = re.sub(r"\s+", " ", "".join(self._text)).strip()
        if tag == "h3" and self._in == "h3":
            self.headlines.append(text)
            self._in = None
        elif tag == "a" and self._in == "a":
            self.links.append((self._href, text))
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in:
            self._text.append(data)


def _smtp(server: SmtpServer) -> dict[str, Any]:
    return {"transport": "smtp", "host": server.host, "port": server.port, "security": "none"}


@pytest.fixture
def config_path(
    tmp_path: Path, feed_server: FeedServer, smtp_server: SmtpServer, database_url: str
) -> Path:
    return write_config(
        tmp_path,
        served_example_feeds(feed_server),
        database_url=database_url,
        mail=_smtp(smtp_server),
        subscribers=SUBSCRIBERS,
    )


def _mails(server: SmtpServer) -> dict[str, EmailMessage]:
    found = {}
    for envelope in server.handler.messages:
        msg = email.message_from_bytes(envelope.content, policy=policy.default)
        found[msg["To"].addresses[0].addr_spec] = msg
    return found  # type: ignore[return-value]


def _send(run_cli: Any, config_path: Path) -> None:
    fetched = run_cli("fetch", "--config", config_path)
    assert fetched.exit_code == 0, fetched.output
    sent = run_cli("digest", "--config", config_path)
    assert sent.exit_code == 0, sent.output


def _today() -> str:
    # The commands run on the real clock; the page is named by the digest's local date.
    return datetime.now(UTC).astimezone(ZoneInfo("Europe/Berlin")).date().isoformat()


def test_a_sent_digest_has_a_web_version_with_all_its_stories_and_no_subscriber_data(
    config_path: Path, smtp_server: SmtpServer, run_cli: Any
) -> None:
    _send(run_cli, config_path)
    mails = _mails(smtp_server)
    assert set(mails) == {s["email"] for s in SUBSCRIBERS}

    # Every mail links the same page, in the text and in the HTML part, near the top.
    url = f"{BASE}/digests/{_today()}.html"
    for msg in mails.values():
        text = mail_text(msg)
        assert f"View in browser: {url}" in text.split("\n\n")[0] + "\n" + text[:400]
        html = _page_links(mail_html(msg))
        assert (url, "View in browser") in html
        assert html.index((url, "View in browser")) == 0  # the first link of the mail

    page_file = config_path.parent / "public" / "digests" / f"{_today()}.html"
    html = page_file.read_text(encoding="utf-8")
    page = _Page(html)
    # The general digest: every story any subscriber got, each once.
    everyone = set().union(*(digest_titles(m) for m in mails.values()))
    assert len(everyone) > max(len(digest_titles(m)) for m in mails.values())
    assert sorted(page.headlines) == sorted(everyone)
    # Nothing about any subscriber: no address, name, or link with their token.
    for subscriber in SUBSCRIBERS:
        assert subscriber["email"] not in html
        assert subscriber.get("name", "@@") not in html
    assert "unsubscribe" not in html.lower() and "preferences" not in html.lower()
    for msg in mails.values():
        token = msg["List-Unsubscribe"].strip("<>").rsplit("/", 1)[1]
        assert token not in html
    # Themed and usable like the news page: cluster name, colour, feeds, no script.
    assert "NordBio Cluster" in html and "#0b5d7a" in html
    assert 'name="viewport"' in html
    assert page.scripts == 0
    assert {(a["type"], a["href"]) for a in page.alternates} == {
        ("application/atom+xml", "../feed.atom"),
        ("application/rss+xml", "../feed.rss"),
        ("application/feed+json", "../feed.json"),
    }

    index = _Page((page_file.parent / "index.html").read_text(encoding="utf-8"))
    assert (f"{_today()}.html", _date_title()) in index.links


def _page_links(html: str) -> list[tuple[str, str]]:
    return _Page(html).links


def _date_title() -> str:
    today = datetime.now(UTC).astimezone(ZoneInfo("Europe/Berlin"))
    month = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    return f"{today.day} {month[today.month - 1]} {today.year}"


def test_the_web_version_is_served_with_etag_and_304_at_the_mails_link(
    config_path: Path, smtp_server: SmtpServer, run_cli: Any
) -> None:
    _send(run_cli, config_path)
    msg = next(iter(_mails(smtp_server).values()))
    url = re.search(r"View in browser: (\S+)", mail_text(msg))
    assert url is not None
    path = urlsplit(url.group(1)).path
    assert url.group(1) == BASE + path  # web.base_url, then the published path

    config = load_config(config_path)
    service = Service(config, Store(config.database_url))
    web = RunningServer(service)
    try:
        first = web.get(path, headers={"Accept-Encoding": "identity"})
        assert first.status_code == 200
        assert first.headers["content-type"] == "text/html; charset=utf-8"
        assert first.content == (config.publish.output_dir / path.lstrip("/")).read_bytes()
        assert "max-age=86400" in first.headers["cache-control"]  # it never changes
        etag = first.headers["etag"]
        again = web.get(path, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        gz = web.get(path, headers={"Accept-Encoding": "gzip"})
        assert gz.headers["content-encoding"] == "gzip" and gz.content == first.content

        listing = web.get("/digests/")
        assert listing.status_code == 200
        assert (path.rsplit("/", 1)[1], _date_title()) in _Page(listing.text).links
        assert "max-age=300" in listing.headers["cache-control"]  # it grows
        bare = httpx.get(web.base + "/digests", follow_redirects=False)
        assert bare.status_code == 301 and bare.headers["location"] == "/digests/"
    finally:
        web.stop()
        service.store.close()


def test_a_digest_page_never_changes_and_a_second_digest_that_day_gets_its_own(
    config_path: Path, feed_server: FeedServer, smtp_server: SmtpServer, run_cli: Any
) -> None:
    _send(run_cli, config_path)
    folder = config_path.parent / "public" / "digests"
    first = folder / f"{_today()}.html"
    before = first.read_bytes()

    # Nothing new: nobody gets a mail, so there is no second page.
    sent = run_cli("digest", "--config", config_path)
    assert sent.exit_code == 0, sent.output
    assert {p.name for p in folder.iterdir()} == {"index.html", first.name}

    # The partner corrects a headline that was in the digest and adds a new story.
    path = "/feeds/helix-vektor.rss"
    old = "Dr. Amara Okafor appointed Chief Medical Officer"
    corrected = "Dr. Amara Okafor named Chief Medical Officer and board member"
    new_item = """<item><title>Helix Vektor opens a second plant in Lübeck</title>
      <link>https://www.helixvektor.example/newsroom/2026/second-plant.html</link>
      <guid isPermaLink="false">helixvektor-news-2026-099</guid>
      <pubDate>Thu, 26 Nov 2026 06:00:00 +0000</pubDate></item>"""
    feed = feed_server.routes[path].body.decode("utf-8")
    assert old in before.decode("utf-8")
    feed = feed.replace(old, corrected).replace("<item>", new_item + "<item>", 1)
    feed_server.routes[path] = Route(feed.encode("utf-8"), content_type="application/rss+xml")
    _send(run_cli, config_path)
    second = folder / f"{_today()}-2.html"
    assert _Page(second.read_text(encoding="utf-8")).headlines == [
        "Helix Vektor opens a second plant in Lübeck"
    ]
    published = run_cli("publish", "--config", config_path)
    assert published.exit_code == 0, published.output
    assert corrected in (config_path.parent / "public" / "index.html").read_text("utf-8")
    assert first.read_bytes() == before  # still the headline as it was sent

    index = _Page((folder / "index.html").read_text(encoding="utf-8"))
    hrefs = [href for href, _text in index.links if href.startswith(_today())]
    assert hrefs == [second.name, first.name]  # newest first


def test_publish_out_writes_the_digest_pages_for_a_static_server(
    config_path: Path, smtp_server: SmtpServer, run_cli: Any, tmp_path: Path
) -> None:
    _send(run_cli, config_path)
    target = tmp_path / "static"
    result = run_cli("publish", "--config", config_path, "--out", target)
    assert result.exit_code == 0, result.output
    written = target / "digests" / f"{_today()}.html"
    original = config_path.parent / "public" / "digests" / f"{_today()}.html"
    headlines = _Page(original.read_text("utf-8")).headlines
    assert headlines and _Page(written.read_text("utf-8")).headlines == headlines
    assert (target / "digests" / "index.html").exists()
    assert "digests/index.html" in (target / "index.html").read_text("utf-8")


def test_without_a_configured_base_url_the_mail_has_no_browser_link(
    config_path: Path, smtp_server: SmtpServer, run_cli: Any
) -> None:
    text = config_path.read_text(encoding="utf-8")
    config_path.write_text(text.replace(f'base_url = "{BASE}"\n', ""), encoding="utf-8")
    assert load_config(config_path).web.base_url == "http://127.0.0.1:8080"  # the default
    _send(run_cli, config_path)
    for msg in _mails(smtp_server).values():
        assert "View in browser" not in mail_text(msg)
        assert "View in browser" not in mail_html(msg)
    # The page is still published, for the news page's list of past digests.
    assert (config_path.parent / "public" / "digests" / f"{_today()}.html").exists()


# -- naming (pure) -----------------------------------------------------------------------


def test_pages_are_named_by_local_date_then_numbered_in_the_order_digests_were_made() -> None:
    utc = UTC
    records = [
        (7, datetime(2026, 11, 26, 6, 0, tzinfo=utc)),  # 07:00 in Berlin
        (3, datetime(2026, 11, 25, 23, 30, tzinfo=utc)),  # 00:30 on the 26th in Berlin
        (9, datetime(2026, 11, 25, 6, 0, tzinfo=utc)),  # a missed slot, sent late
        (12, datetime(2026, 11, 26, 16, 0, tzinfo=utc)),
    ]
    pages = {p.digest_id: p for p in digest_pages(records, "Europe/Berlin")}
    assert {i: p.path for i, p in pages.items()} == {
        3: "digests/2026-11-26.html",
        7: "digests/2026-11-26-2.html",
        9: "digests/2026-11-25.html",
        12: "digests/2026-11-26-3.html",
    }
    assert pages[3].title == "26 Nov 2026"
    assert pages[12].title == "26 Nov 2026, 17:00"
    # Adding a later digest never renames the earlier ones.
    more = digest_pages([*records, (13, datetime(2026, 11, 26, 5, 0, tzinfo=utc))], "Europe/Berlin")
    assert {p.digest_id: p.path for p in more if p.digest_id != 13} == {
        i: p.path for i, p in pages.items()
    }
