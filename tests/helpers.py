"""Helpers that test modules of several folders share; fixtures stay in conftest.py.

A test module never imports another test module: pytest would collect the imported
module's tests a second time under the importer's name if it ever re-exported them,
and a helper hidden in one test file is easy to change for that file alone.
"""

from __future__ import annotations

import asyncio
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from clusterfeed.app.service import FeedOutcome, Service
from clusterfeed.model import Entry, FeedStatus, Source, Story

# Sign-up switched on, with limits small enough for tests to reach.
SIGNUP = """
[signup]
enabled = true
form_version = "2026-11"
confirm_hours = 48
address_limit = 3
client_limit = 8
"""


def fetch(service: Service) -> dict[str, FeedOutcome]:
    """One fetch of every configured feed, its outcomes by feed name."""
    return {o.name: o for o in asyncio.run(service.fetch())}


def status(service: Service, name: str) -> FeedStatus:
    """The stored status of one feed, as ``clusterfeed status`` shows it."""
    return {s.name: s for s in service.store.feed_statuses()}[name]


class Browser:
    """A person with a browser: keeps cookies, reads the form token from the page."""

    def __init__(self, base: str) -> None:
        self.client = httpx.Client(base_url=base, timeout=10)

    def sign_up(self, email: str, **fields: Any) -> httpx.Response:
        page = self.client.get("/subscribe")
        assert page.status_code == 200
        token = re.search(r'name="form_token" value="([^"]+)"', page.text)
        assert token is not None
        data: dict[str, Any] = {"form_token": token.group(1), "email": email, "website": ""}
        data.update(fields)
        return self.client.post("/subscribe", data=data)


# The digest slot of the planning and composing tests; ``story(n)`` is n hours older.
NOW = datetime(2026, 11, 26, 7, 0, tzinfo=UTC)


def story(number: int, topics: tuple[str, ...] = ()) -> Story:
    """Story ``number`` of one partner, published ``number`` hours before ``NOW``."""
    published = NOW - timedelta(hours=number)
    entry = Entry(
        feed_name="Partner", identity=f"item-{number}", guid=None,
        link=f"https://partner.example/{number}", link_key=None, title=f"Story {number}",
        summary_html="", summary_text="", content_html="<p>Text</p>", image_url=None,
        image_alt=None, author=None, topics=topics, language="en", published=published,
        updated=published, content_hash=str(number),
    )  # fmt: skip
    source = Source(
        feed_name="Partner", feed_title="Partner", feed_url="https://partner.example/feed",
        site_url=None, entry_title=entry.title, entry_link=entry.link,
    )  # fmt: skip
    return Story(
        id=number, key=f"s{number}", entry=entry, sources=(source,), topics=topics,
        languages=("en",), first_seen=published, updated=published,
    )  # fmt: skip


def session_members(sid: int) -> dict[int, str]:
    """Live processes of session ``sid``: pid → command line (zombies left out)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found
