"""The sections of a received digest are named after the subscriber's own topics.

The bundled example's feeds are served over real HTTP, ``clusterfeed fetch`` and
``digest`` run for real, and the mails are read back from the Maildir. Before, each
story went under its first topic, so a subscriber of research, medtech and cluster
read sections "Gene therapy, Financing, Drug discovery, Digital health, Events" and
none called Medtech, and a subscriber of ``international`` had no International one.
"""

from __future__ import annotations

import email
import re
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from clusterfeed.config import load_config
from clusterfeed.digest.sections import topic_label
from clusterfeed.store import Store
from tests.conftest import FeedServer, mail_html, mail_text, served_example_feeds, write_config

PRESS = "press-office@example.com"
KENJI = "kenji.tanaka@example.net"
LENA = "lena.vogt@example.org"
SUBSCRIBERS = [
    {"email": PRESS, "name": "Press Office Kiel", "topics": ["research", "medtech", "cluster"]},
    {"email": KENJI, "name": "Kenji Tanaka", "topics": ["international", "drug-discovery"]},
    {"email": LENA, "name": "Lena Vogt"},  # all news
]


def _received(config: Path) -> dict[str, EmailMessage]:
    found = {}
    for file in sorted((config.parent / "mail" / "new").iterdir()):
        msg = email.message_from_bytes(file.read_bytes(), policy=policy.default)
        found[msg["To"].addresses[0].addr_spec] = msg
    return found  # type: ignore[return-value]


def _sections(msg: EmailMessage) -> list[tuple[str, list[str]]]:
    """(section title, story titles) as the plain-text part shows them."""
    sections: list[tuple[str, list[str]]] = []
    for line in mail_text(msg).splitlines():
        if m := re.fullmatch(r"== (.+) ==", line):
            sections.append((m[1], []))
        elif (m := re.fullmatch(r"\* (.+)", line)) and sections:
            sections[-1][1].append(m[1])
    return sections


def test_each_story_is_in_the_section_of_the_subscribers_topic_that_matched(
    tmp_path: Path, feed_server: FeedServer, database_url: str, run_cli: Any
) -> None:
    config = write_config(
        tmp_path,
        served_example_feeds(feed_server),
        database_url=database_url,
        subscribers=SUBSCRIBERS,
    )
    assert run_cli("fetch", "--config", config).exit_code == 0
    result = run_cli("digest", "--config", config)
    assert result.exit_code == 0, result.output
    mails = _received(config)
    loaded = load_config(config)
    order = list(dict.fromkeys(t for f in loaded.feeds for t in f.topics))
    store = Store(loaded.database_url)
    try:
        # By every title a story is known by (the mail shows one of its versions).
        topics_of = {
            title: set(s.topics)
            for s in store.recent_stories()
            for title in (s.entry.title, *(source.entry_title for source in s.sources))
        }
    finally:
        store.close()

    for address, chosen in [(PRESS, ["cluster", "research", "medtech"]),
                            (KENJI, ["drug-discovery", "international"])]:  # fmt: skip
        sections = _sections(mails[address])
        titles = [t for t, _stories in sections]
        # Their own topics, in the config's order, and nothing else.
        assert titles == [topic_label(t) for t in chosen], titles
        for title, stories in sections:
            (topic,) = [t for t in chosen if topic_label(t) == title]
            for story in stories:
                mine = [t for t in order if t in chosen and t in topics_of[story]]
                assert mine[0] == topic, (story, topics_of[story])
        # The HTML part shows the same sections.
        html_titles = re.findall(
            r'<td class="group"[^>]*>\s*([^<]+?)\s*</td>', mail_html(mails[address])
        )
        assert html_titles == titles

    # All news: under each story's own first topic, in the config's order.
    lena = _sections(mails[LENA])
    for title, stories in lena:
        for story in stories:
            own = sorted(topics_of[story], key=lambda t: (order.index(t) if t in order else 99, t))
            assert topic_label(own[0]) == title
