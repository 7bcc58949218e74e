"""The digest e-mail as a subscriber receives it, parsed back with Python's email package.

Feeds come from a real HTTP server, the commands run for real, and the messages are
read from the Maildir they were delivered to.
"""

from __future__ import annotations

import email
import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from clusterfeed.config import load_config
from clusterfeed.digest.digest import format_date
from clusterfeed.store import Store
from clusterfeed.subscribers.tokens import UNSUBSCRIBE, InvalidToken, make_token, read_token
from tests.conftest import (
    REALCLIENTS,
    TEMPLATES,
    FeedServer,
    Route,
    digest_titles,
    mail_html,
    mail_text,
    write_config,
)

HELIX = [
    {
        "title": "Helix Vektor opens vector plant in Kiel",
        "link": "https://www.helixvektor.example/news/plant",
        "description": "<p>The new plant doubles the capacity for AAV vectors.</p>",
        "image": "https://www.helixvektor.example/img/plant.jpg",
        "date": "Thu, 20 Nov 2025 09:30:00 +0000",
    },
    {
        "title": "R&D alliance with KristallWerk",
        "link": "https://www.helixvektor.example/news/alliance",
        "description": '<p><img src="https://www.helixvektor.example/img/lab.jpg" '
        'alt="Scientists in the capsid lab"> Joint research on capsids.</p>',
        "date": "Wed, 19 Nov 2025 10:00:00 +0000",
    },
]
HANSE = [
    {
        "title": "Hanse Innovationsfonds investiert 12 Mio. Euro",
        "link": "https://www.hanse-innovationsfonds.example/presse/serie-a",
        "description": "Serie-A-Finanzierung für ein Kieler Start-up.",
        "date": "Tue, 18 Nov 2025 08:00:00 +0000",
    }
]
KANSAI = [
    {
        "title": "関西バイオ、ハンブルクと提携",
        "link": "https://www.kansai-bio.example/news/1",
        "description": "ハンブルクのクラスターと共同研究を開始します。",
        "date": "Mon, 17 Nov 2025 01:00:00 +0000",
    }
]
ALL_TITLES = {i["title"] for i in HELIX + HANSE + KANSAI}

SUBSCRIBERS = [
    {"email": "rita@example.org", "name": "Rita Reader"},
    {"email": "gene@example.org", "topics": ["gene-therapy"]},
    {"email": "deutsch@example.org", "languages": ["de"]},
    {"email": "kansai@example.org", "topics": ["international", "financing"], "languages": ["ja"]},
    {"email": "medtech@example.org", "topics": ["medtech"]},
]


@pytest.fixture
def digest_config(
    tmp_path: Path, feed_server: FeedServer, database_url: str, rss_feed, monkeypatch
) -> Path:
    """Three partners (English, German, Japanese) and five subscribers with preferences."""
    monkeypatch.delenv("CLUSTERFEED_SECRET", raising=False)
    feeds = []
    for name, path, items, topic, language in [
        ("Helix Vektor", "/helix.rss", HELIX, "gene-therapy", "en"),
        ("Hanse Innovationsfonds", "/hanse.rss", HANSE, "financing", "de"),
        ("Kansai Bio Frontier", "/kansai.rss", KANSAI, "international", "ja"),
    ]:
        feed_server.routes[path] = Route(rss_feed(name, items))
        feeds.append(
            {"name": name, "url": feed_server.url(path), "topics": [topic], "language": language}
        )
    return write_config(tmp_path, feeds, database_url=database_url, subscribers=SUBSCRIBERS)


def _mails(config_path: Path) -> list[tuple[bytes, EmailMessage]]:
    folder = config_path.parent / "mail" / "new"
    if not folder.is_dir():
        return []
    result = []
    for file in sorted(folder.iterdir()):
        raw = file.read_bytes()
        result.append((raw, email.message_from_bytes(raw, policy=policy.default)))
    return result  # type: ignore[return-value]


def _by_recipient(config_path: Path) -> dict[str, list[EmailMessage]]:
    found: dict[str, list[EmailMessage]] = {}
    for _raw, msg in _mails(config_path):
        found.setdefault(msg["To"].addresses[0].addr_spec, []).append(msg)
    return found


def _header_block(raw: bytes) -> list[bytes]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return head.split(b"\r\n")


def _raw_header(raw: bytes, name: str) -> str:
    """A header's value exactly as it is on the wire (unfolded)."""
    lines = _header_block(raw)
    for i, line in enumerate(lines):
        if line.lower().startswith(name.lower().encode() + b":"):
            value = line.split(b":", 1)[1]
            for more in lines[i + 1 :]:
                if not more[:1].isspace():
                    break
                value += more
            return value.decode("ascii").strip()
    raise AssertionError(f"no {name} header")


class _Html(HTMLParser):
    """What a mail client shows: elements with their attributes, links and visible text."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.links: list[tuple[str, str]] = []
        self.styles: list[str] = []
        self.text = ""
        self._link: tuple[str, list[str]] | None = None
        self._in_style = False
        self.feed(html)
        self.text = re.sub(r"\s+", " ", self.text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.elements.append((tag, values))
        if tag == "a":
            self._link = (values.get("href", ""), [])
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._link is not None:
            href, text = self._link
            self.links.append((href, re.sub(r"\s+", " ", "".join(text)).strip()))
            self._link = None
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.styles.append(data)
            return
        self.text += data
        if self._link is not None:
            self._link[1].append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [
            a
            for t, a in self.elements
            if t == tag and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())
        ]


def _send_digest(run_cli, config_path: Path) -> Any:
    fetched = run_cli("fetch", "--config", config_path)
    assert fetched.exit_code == 0, fetched.output
    sent = run_cli("digest", "--config", config_path)
    assert sent.exit_code == 0, sent.output
    return sent


# -- the message ------------------------------------------------------------------------


def test_digest_message_has_both_parts_and_every_header(digest_config: Path, run_cli) -> None:
    _send_digest(run_cli, digest_config)
    ((raw, msg),) = [m for m in _mails(digest_config) if "rita@" in m[1]["To"]]

    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in parts)

    assert re.fullmatch(r"<[0-9a-f]{32}\.\d+@nordbio\.example>", msg["Message-ID"])
    sent_at = parsedate_to_datetime(msg["Date"])
    assert sent_at.tzinfo is not None
    assert abs(datetime.now(UTC) - sent_at) < timedelta(hours=1)
    (sender,) = msg["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("NordBio News", "news@nordbio.example")
    (to,) = msg["To"].addresses
    assert (to.display_name, to.addr_spec) == ("Rita Reader", "rita@example.org")
    assert msg["Reply-To"].addresses[0].addr_spec == "presse@nordbio.example"
    # Short, in the digest's language: the count and the date, no partner's headline.
    assert msg["Subject"] == (
        f"NordBio Cluster news: 4 new stories, {format_date(datetime.now(UTC), 'Europe/Berlin')}"
    )
    assert msg["List-Id"] == '"NordBio Cluster digest" <digest.news.nordbio.example>'
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

    # A mail client must find a plain URL in <>, not RFC 2047 encoded words.
    unsubscribe = _raw_header(raw, "List-Unsubscribe")
    assert "=?" not in unsubscribe
    assert re.fullmatch(r"<https://news\.nordbio\.example/unsubscribe/[\w.-]+>", unsubscribe)


def test_spamassassin_finds_nothing_against_the_digests(digest_config: Path, run_cli) -> None:
    """SpamAssassin's local rules (no network tests) on the English, German and Japanese
    digests: not a single rule may add points."""
    script = REALCLIENTS / "spamscore.sh"
    if not script.is_file():
        pytest.skip(f"SpamAssassin check not available here ({script} is absent)")
    _send_digest(run_cli, digest_config)
    files = sorted((digest_config.parent / "mail" / "new").iterdir())
    assert len(files) >= 3  # medtech@ has nothing in these feeds
    for file in files:
        result = subprocess.run(
            ["bash", str(script), str(file), "0.0"], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{file.name}: {result.stdout}{result.stderr}"
        score = re.search(r"score=(-?[\d.]+)", result.stdout)
        assert score is not None and float(score.group(1)) <= 0.0, result.stdout


def test_unsubscribe_link_carries_a_token_for_that_subscriber(digest_config: Path, run_cli) -> None:
    _send_digest(run_cli, digest_config)
    store = Store(load_config(digest_config).database_url)
    emails = {s.id: s.email for s in store.active_subscribers()}
    secret = store.secret()
    store.close()

    for _raw, msg in _mails(digest_config):
        url = msg["List-Unsubscribe"].strip("<>")
        token = url.rsplit("/", 1)[1]
        subscriber_id = read_token(secret, UNSUBSCRIBE, token, emails.get)
        assert emails[subscriber_id] == msg["To"].addresses[0].addr_spec
        # The same link is in the footer of the HTML and of the text part.
        assert ("Unsubscribe", url) in [(t, h) for h, t in _Html(mail_html(msg)).links]
        assert f"Unsubscribe: {url}" in mail_text(msg)


def test_html_part_shows_every_story_with_inlined_css(digest_config: Path, run_cli) -> None:
    _send_digest(run_cli, digest_config)
    msg = _by_recipient(digest_config)["rita@example.org"][0]
    page = _Html(mail_html(msg))

    # CSS inlined by css-inline: the rules became style attributes, only @media stays.
    (headline, *_) = page.find("p", class_="headline")
    assert "font-size: 18px" in headline["style"]
    assert all(a.get("style") for a in page.find("p", class_="summary"))
    assert page.find("table", class_="sheet")[0]["width"] == "600"
    assert not any(".headline" in css for css in page.styles)

    for item, source in [
        (HELIX[0], "Helix Vektor"),
        (HELIX[1], "Helix Vektor"),
        (HANSE[0], "Hanse Innovationsfonds"),
        (KANSAI[0], "Kansai Bio Frontier"),
    ]:
        assert (item["link"], item["title"]) in page.links, item["title"]
        day = datetime.strptime(item["date"][5:16], "%d %b %Y")
        assert f"{source} · {day.day} {day:%b %Y}" in page.text
    assert "The new plant doubles the capacity for AAV vectors." in page.text
    assert "Serie-A-Finanzierung für ein Kieler Start-up." in page.text
    assert "ハンブルクのクラスターと共同研究を開始します。" in page.text

    pictures = {a["src"]: a["alt"] for a in page.find("img", class_="picture")}
    assert pictures == {
        # An enclosure has no alt text of its own: the headline describes the picture.
        "https://www.helixvektor.example/img/plant.jpg": "Helix Vektor opens vector plant in Kiel",
        "https://www.helixvektor.example/img/lab.jpg": "Scientists in the capsid lab",
    }

    assert "Hello Rita Reader," in page.text
    assert "NordBio Cluster Management GmbH" in page.text
    assert "Hafenstraße 12, 20457 Hamburg" in page.text
    assert "presse@nordbio.example" in page.text
    assert "You receive this e-mail because rita@example.org is subscribed" in page.text


def test_text_part_is_readable_plain_text(digest_config: Path, run_cli) -> None:
    _send_digest(run_cli, digest_config)
    text = mail_text(_by_recipient(digest_config)["rita@example.org"][0])

    assert text.startswith("NordBio Cluster – news from our partners\n")
    assert "* R&D alliance with KristallWerk" in text  # not &amp;
    assert "<" not in text.replace("<https", "") and "&amp;" not in text
    for item in HELIX + HANSE + KANSAI:
        assert f"* {item['title']}" in text
        assert f"Read more: {item['link']}" in text
    assert "== Gene therapy ==" in text
    assert "The new plant doubles the capacity for AAV vectors." in text
    assert "NordBio Cluster Management GmbH" in text
    assert max(len(line) for line in text.splitlines()) < 200


def test_grouping_by_source(digest_config: Path, run_cli) -> None:
    digest_config.write_text(
        digest_config.read_text().replace(
            "max_stories = 100", 'max_stories = 100\ngroup_by = "source"'
        )
    )
    _send_digest(run_cli, digest_config)

    text = mail_text(_by_recipient(digest_config)["rita@example.org"][0])

    headings = re.findall(r"^== (.+) ==$", text, flags=re.M)
    assert headings == ["Hanse Innovationsfonds", "Helix Vektor", "Kansai Bio Frontier"]


# -- header safety ------------------------------------------------------------------------


def test_a_title_with_line_breaks_never_creates_a_header(
    digest_config: Path, feed_server: FeedServer, run_cli, rss_feed
) -> None:
    hostile = {
        "title": "",
        "raw_title": "Quarterly results&#13;&#10;Bcc: victim@example.com&#13;&#10;"
        "X-Injected: yes&#10;&#10;body\u2028Cc: other@example.com",
        "link": "https://www.helixvektor.example/news/q3",
        "date": "Fri, 21 Nov 2025 09:00:00 +0000",
    }
    feed_server.routes["/helix.rss"] = Route(rss_feed("Helix Vektor", [hostile, *HELIX]))
    # The default subject names no headline; an operator's template that does must not
    # let one add a header either.
    own = digest_config.parent / "own-templates"
    shutil.copytree(TEMPLATES, own)
    (own / "digest_subject.txt").write_text("{{ stories[0].title }}", encoding="utf-8")
    text = digest_config.read_text(encoding="utf-8")
    digest_config.write_text(
        text.replace(
            f"templates_dir = {json.dumps(str(TEMPLATES))}",
            f"templates_dir = {json.dumps(str(own))}",
        ),
        encoding="utf-8",
    )

    _send_digest(run_cli, digest_config)

    mails = _mails(digest_config)
    assert len(mails) == 4
    allowed = {
        "from", "to", "reply-to", "subject", "date", "message-id", "list-id",
        "list-unsubscribe", "list-unsubscribe-post", "precedence", "auto-submitted",
        "mime-version", "content-type",
    }  # fmt: skip
    for raw, msg in mails:
        names = {
            line.split(b":", 1)[0].decode().lower()
            for line in _header_block(raw)
            if line and not line[:1].isspace()
        }
        assert names <= allowed, names
        assert msg["Bcc"] is None and msg["Cc"] is None and msg["X-Injected"] is None
        assert len(msg["To"].addresses) == 1
    rita = _by_recipient(digest_config)["rita@example.org"][0]
    assert "Bcc: victim@example.com" in rita["Subject"]
    assert "\n" not in rita["Subject"] and "\r" not in rita["Subject"]
    assert any(
        t.startswith("Quarterly results Bcc: victim@example.com") for t in digest_titles(rita)
    )


# -- who gets what ------------------------------------------------------------------------


def test_each_subscriber_gets_the_topics_and_languages_they_chose(
    digest_config: Path, run_cli
) -> None:
    result = _send_digest(run_cli, digest_config)

    assert "digest: 4 planned, 4 sent, 0 deferred, 0 failed" in result.stdout
    got = _by_recipient(digest_config)
    assert {k: len(v) for k, v in got.items()} == {
        "rita@example.org": 1,
        "gene@example.org": 1,
        "deutsch@example.org": 1,
        "kansai@example.org": 1,
    }
    assert digest_titles(got["rita@example.org"][0]) == ALL_TITLES
    assert digest_titles(got["gene@example.org"][0]) == {i["title"] for i in HELIX}
    assert digest_titles(got["deutsch@example.org"][0]) == {HANSE[0]["title"]}
    assert digest_titles(got["kansai@example.org"][0]) == {KANSAI[0]["title"]}
    # Nothing matches medtech@, who therefore gets no mail at all.


def test_only_new_stories_and_nothing_when_nothing_is_new(
    digest_config: Path, feed_server: FeedServer, run_cli, rss_feed
) -> None:
    _send_digest(run_cli, digest_config)
    assert len(_mails(digest_config)) == 4

    again = _send_digest(run_cli, digest_config)

    assert "digest: 0 planned, 0 sent" in again.stdout
    assert len(_mails(digest_config)) == 4

    news = {
        "title": "Helix Vektor names new chief scientific officer",
        "link": "https://www.helixvektor.example/news/cso",
        "date": "Fri, 21 Nov 2025 09:00:00 +0000",
    }
    feed_server.routes["/helix.rss"] = Route(rss_feed("Helix Vektor", [news, *HELIX]))

    third = _send_digest(run_cli, digest_config)

    assert "digest: 2 planned, 2 sent" in third.stdout
    got = _by_recipient(digest_config)
    assert {k: len(v) for k, v in got.items()} == {
        "rita@example.org": 2,
        "gene@example.org": 2,
        "deutsch@example.org": 1,
        "kansai@example.org": 1,
    }
    for address in ("rita@example.org", "gene@example.org"):
        newest = [m for m in got[address] if news["title"] in digest_titles(m)]
        assert len(newest) == 1 and digest_titles(newest[0]) == {news["title"]}


def test_send_when_empty_mails_everyone(digest_config: Path, run_cli) -> None:
    digest_config.write_text(
        digest_config.read_text().replace(
            "max_stories = 100", "max_stories = 100\nsend_when_empty = true"
        )
    )

    _send_digest(run_cli, digest_config)

    got = _by_recipient(digest_config)
    assert len(got) == len(SUBSCRIBERS)
    empty = got["medtech@example.org"][0]
    assert digest_titles(empty) == set()
    assert "There is nothing new from our partners" in mail_text(empty)
    assert empty["Subject"].startswith("NordBio Cluster news: nothing new, ")


def test_a_first_digest_has_a_short_subject_and_no_last_digest(
    example_config: Path, run_cli
) -> None:
    # The bundled example: 36 stories in English, German and Japanese.
    assert run_cli("fetch", "--config", example_config).exit_code == 0
    assert run_cli("digest", "--config", example_config).exit_code == 0

    mails = _mails(example_config)
    assert mails
    for _raw, msg in mails:
        subject = msg["Subject"]
        assert len(subject) <= 78, subject
        assert not digest_titles(msg) & {t for t in digest_titles(msg) if t in subject}
        assert re.fullmatch(r"NordBio Cluster news: (\d+ new stories|1 new story), .+", subject)
        for body in (mail_text(msg), mail_html(msg)):
            assert "since your last" not in body  # nobody had a digest before


# -- preview and dry run --------------------------------------------------------------------


def test_preview_writes_html_and_sends_nothing(digest_config: Path, run_cli) -> None:
    assert run_cli("fetch", "--config", digest_config).exit_code == 0
    out = digest_config.parent / "out.html"

    result = run_cli("digest", "--config", digest_config, "--preview", out)

    assert result.exit_code == 0, result.output
    assert f"preview of the digest for rita@example.org: {out}" in result.stdout
    page = _Html(out.read_text(encoding="utf-8"))
    assert {t for _h, t in page.links} >= ALL_TITLES
    assert "font-size: 18px" in page.find("p", class_="headline")[0]["style"]
    assert _mails(digest_config) == []
    store = Store(load_config(digest_config).database_url)
    assert store.delivery_counts() == {}
    store.close()

    # The preview took nothing away: the real digest still has every story.
    run_cli("digest", "--config", digest_config)
    assert digest_titles(_by_recipient(digest_config)["rita@example.org"][0]) == ALL_TITLES


def test_preview_of_a_chosen_subscriber_says_whose_it_is(digest_config: Path, run_cli) -> None:
    assert run_cli("fetch", "--config", digest_config).exit_code == 0
    out = digest_config.parent / "gene.html"

    result = run_cli(
        "digest", "--config", digest_config, "--preview", out, "--subscriber", "gene@example.org"
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"preview of the digest for gene@example.org: {out}"
    titles = {t for _h, t in _Html(out.read_text(encoding="utf-8")).links}
    assert titles & ALL_TITLES == {i["title"] for i in HELIX}
    assert _mails(digest_config) == []


def test_a_preview_without_a_file_name_says_what_is_missing(digest_config: Path, run_cli) -> None:
    forgot = run_cli("digest", "--preview", "--config", digest_config)

    assert forgot.exit_code == 2
    assert "unexpected extra argument" not in forgot.output
    assert "--preview" in forgot.stderr and "needs the name of a file" in forgot.stderr
    assert not Path("--config").exists()

    stranger = run_cli(
        "digest", "--config", digest_config, "--preview", digest_config.parent / "x.html",
        "--subscriber", "nobody@example.org",
    )  # fmt: skip
    assert stranger.exit_code == 2
    assert "nobody@example.org is not a subscriber" in stranger.stderr

    alone = run_cli("digest", "--config", digest_config, "--subscriber", "gene@example.org")
    assert alone.exit_code == 2 and "add --preview FILE" in alone.stderr
    assert _mails(digest_config) == []


def test_dry_run_lists_who_would_get_what_and_sends_nothing(digest_config: Path, run_cli) -> None:
    assert run_cli("fetch", "--config", digest_config).exit_code == 0

    result = run_cli("digest", "--config", digest_config, "--dry-run")

    assert result.exit_code == 0, result.output
    lines = set(result.stdout.splitlines())
    assert {
        "rita@example.org: 4 stories",
        "gene@example.org: 2 stories",
        "deutsch@example.org: 1 story",
        "kansai@example.org: 1 story",
        "4 subscribers would get a digest (dry run, nothing sent)",
    } <= lines
    assert _mails(digest_config) == []


# -- tokens ------------------------------------------------------------------------------

SECRET = "installation-secret-0123456789"
EMAILS = {7: "rita@example.org", 8: "gene@example.org"}


def test_token_round_trip() -> None:
    token = make_token(SECRET, UNSUBSCRIBE, 7, "rita@example.org")

    assert read_token(SECRET, UNSUBSCRIBE, token, EMAILS.get) == 7
    assert "rita" not in token  # the address does not show up in web-server logs
    # Case and spaces of the stored address do not matter.
    assert read_token(SECRET, UNSUBSCRIBE, token, lambda i: " Rita@Example.org ") == 7


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), id="signature-changed"),
        pytest.param(lambda t: "8" + t[1:], id="id-changed-to-another-subscriber"),
        pytest.param(lambda t: t.split(".")[0], id="signature-removed"),
        pytest.param(lambda t: "x" + t, id="not-a-number"),
        pytest.param(lambda t: "", id="empty"),
        pytest.param(lambda t: "9" + t[1:], id="unknown-id"),
    ],
)
def test_an_altered_token_is_refused(tamper) -> None:
    token = make_token(SECRET, UNSUBSCRIBE, 7, "rita@example.org")

    with pytest.raises(InvalidToken):
        read_token(SECRET, UNSUBSCRIBE, tamper(token), EMAILS.get)


def test_a_token_only_works_for_its_address_secret_and_purpose() -> None:
    token = make_token(SECRET, UNSUBSCRIBE, 7, "rita@example.org")

    with pytest.raises(InvalidToken):  # the address behind id 7 changed
        read_token(SECRET, UNSUBSCRIBE, token, lambda i: "someone.else@example.org")
    with pytest.raises(InvalidToken):
        read_token("another-installation", UNSUBSCRIBE, token, EMAILS.get)
    with pytest.raises(InvalidToken):
        read_token(SECRET, "clusterfeed.preferences.v1", token, EMAILS.get)
