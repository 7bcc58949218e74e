"""WebSub: feeds name the hub and themselves, and the hub hears about every change."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import feedparser
import pytest

from clusterfeed.app.sequences import cycle
from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.store import Store
from tests.conftest import EXAMPLE_FEEDS, FeedServer, write_config


class Hub:
    """A real HTTP endpoint on 127.0.0.1 that records WebSub publish pings."""

    def __init__(self) -> None:
        self.pings: list[dict[str, list[str]]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                hub.pings.append(parse_qs(self.rfile.read(length).decode()))
                self.send_response(204)
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hub"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub() -> Iterator[Hub]:
    running = Hub()
    yield running
    running.close()


def test_feeds_carry_hub_and_self_and_the_hub_is_pinged_on_change(
    tmp_path: Path, feed_server: FeedServer, hub: Hub
) -> None:
    url = feed_server.serve_file("/helix.rss", EXAMPLE_FEEDS / "helix-vektor.rss")
    path = write_config(tmp_path, [{"name": "Helix Vektor", "url": url}])
    text = path.read_text(encoding="utf-8").replace(
        "max_entries = 100", f'max_entries = 100\nwebsub_hub = "{hub.url}"'
    )
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    service = Service(config, Store(config.database_url))
    service.prepare()

    report = asyncio.run(cycle(service, with_digest=False))

    public = tmp_path / "public"
    atom = feedparser.parse((public / "feed.atom").read_bytes())
    rels = {link["rel"]: link["href"] for link in atom.feed.links}
    assert rels["hub"] == hub.url
    assert rels["self"] == "https://news.nordbio.example/feed.atom"
    rss = (public / "feed.rss").read_text(encoding="utf-8")
    assert f'href="{hub.url}" rel="hub"' in rss
    assert json.loads((public / "feed.json").read_text(encoding="utf-8"))["hubs"] == [
        {"type": "WebSub", "url": hub.url}
    ]
    assert report.published
    (ping,) = hub.pings
    assert ping["hub.mode"] == ["publish"]
    assert "https://news.nordbio.example/feed.atom" in ping["hub.url"]
    assert "https://news.nordbio.example/feed.json" in ping["hub.url"]
    assert not any("/archive/" in u or u.endswith(".html") for u in ping["hub.url"])

    # Nothing changed: no ping.
    asyncio.run(cycle(service, with_digest=False))
    assert len(hub.pings) == 1
    service.store.close()
