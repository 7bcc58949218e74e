"""Serving the published files over real HTTP: validators, 304, compression, health, metrics."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
from collections.abc import Iterator
from pathlib import Path

import brotli
import httpx
import pytest

from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.store import Store
from tests.conftest import (
    EXAMPLE_STORIES,
    REALCLIENTS,
    FeedServer,
    RunningServer,
    served_example_feeds,
    write_config,
)


@pytest.fixture
def service(tmp_path: Path, feed_server: FeedServer) -> Iterator[Service]:
    config = load_config(write_config(tmp_path, served_example_feeds(feed_server)))
    service = Service(config, Store(config.database_url))
    service.prepare()
    yield service
    service.close()
    service.store.close()


def _publish(service: Service) -> None:
    asyncio.run(service.fetch())
    service.publish()


def test_the_feed_is_served_with_validators_and_answers_304(
    service: Service, web: RunningServer
) -> None:
    _publish(service)
    first = web.get("/feed.atom", headers={"Accept-Encoding": "identity"})
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/atom+xml; charset=utf-8"
    assert first.content == service.feed_path().read_bytes()
    etag = first.headers["etag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    assert first.headers["last-modified"].endswith("GMT")
    assert "max-age=" in first.headers["cache-control"]
    assert first.headers["vary"] == "Accept-Encoding"

    again = web.get("/feed.atom", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    since = web.get("/feed.atom", headers={"If-Modified-Since": first.headers["last-modified"]})
    assert since.status_code == 304
    stale = web.get("/feed.atom", headers={"If-None-Match": '"something-else"'})
    assert stale.status_code == 200 and stale.content == first.content


@pytest.mark.parametrize("name", ["feed.atom", "feed.rss"])
def test_a_real_feed_reader_polls_the_served_feed_and_sees_every_story(
    service: Service, web: RunningServer, name: str
) -> None:
    """newsboat (a terminal feed reader) fetches the feed over HTTP and keeps one
    article per story, titles in German, English and Japanese intact."""
    script = REALCLIENTS / "newsboat_count.sh"
    if not script.is_file():
        pytest.skip(f"newsboat check not available here ({script} is absent)")
    _publish(service)
    result = subprocess.run(
        ["bash", str(script), f"{web.base}/{name}", str(EXAMPLE_STORIES)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"newsboat: articles={EXAMPLE_STORIES}" in result.stdout
    assert "国際シンポジウム「再生医療の社会実装」を12月に神戸で開催" in result.stdout
    assert "Forschungspreis für Kieler Herzchirurgie" in result.stdout


def test_a_304_costs_no_read_of_the_file(service: Service, web: RunningServer) -> None:
    _publish(service)
    etag = web.get("/feed.atom").headers["etag"]
    app_cache_reads = _reads(service)
    for _ in range(20):
        assert web.get("/feed.atom", headers={"If-None-Match": etag}).status_code == 304
    assert _reads(service) == app_cache_reads


def _reads(service: Service) -> int:
    """How often the server read a published file from disk."""
    from clusterfeed.web import server as web_module

    return web_module.READS.value


def test_compression_when_asked_gzip_and_brotli(service: Service, web: RunningServer) -> None:
    _publish(service)
    raw = service.feed_path().read_bytes()
    gz = web.get("/feed.atom", headers={"Accept-Encoding": "gzip"})
    assert gz.headers["content-encoding"] == "gzip"
    assert gz.content == raw  # httpx decodes gzip transparently
    br = httpx.get(web.base + "/feed.atom", headers={"Accept-Encoding": "br"}, timeout=10)
    assert br.headers["content-encoding"] == "br"
    # httpx may or may not decode br, depending on installed extras: check both ways.
    assert br.content == raw or brotli.decompress(br.content) == raw
    plain = web.get("/feed.atom", headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in plain.headers
    assert len(gzip.compress(raw)) < len(raw)


def test_head_gives_the_headers_without_a_body(service: Service, web: RunningServer) -> None:
    _publish(service)
    head = httpx.head(web.base + "/feed.atom", headers={"Accept-Encoding": "identity"})
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) == len(service.feed_path().read_bytes())
    assert head.headers["etag"]


def test_a_republished_feed_gets_a_new_etag(
    service: Service, web: RunningServer, tmp_path: Path
) -> None:
    _publish(service)
    old = web.get("/feed.atom").headers["etag"]
    feed = service.feed_path()
    feed.write_bytes(feed.read_bytes().replace(b"</feed>", b"<!-- changed --></feed>"))
    changed = web.get("/feed.atom", headers={"If-None-Match": old})
    assert changed.status_code == 200
    assert changed.headers["etag"] != old


def test_nothing_outside_the_published_folder_is_served(
    service: Service, web: RunningServer
) -> None:
    _publish(service)
    for path in ("/../clusterfeed.toml", "/%2e%2e/clusterfeed.toml", "/nope.atom"):
        response = web.get(path)
        assert response.status_code == 404, path
        assert b"NordBio" not in response.content


def test_health_and_metrics(service: Service, web: RunningServer) -> None:
    before = web.get("/healthz")
    assert before.status_code == 503
    assert before.json()["status"] == "failing"
    _publish(service)
    after = web.get("/healthz")
    assert after.status_code == 200
    body = after.json()
    assert body["status"] == "ok" and body["feeds_ok"] == 9 and body["feed_published"]
    metrics = web.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert 'clusterfeed_feeds{state="ok"} 9.0' in text
    assert "clusterfeed_items 47.0" in text
    assert "clusterfeed_last_publish_timestamp_seconds" in text


def test_only_complete_archive_pages_are_cached_long(
    tmp_path: Path, feed_server: FeedServer
) -> None:
    path = write_config(tmp_path, served_example_feeds(feed_server))
    path.write_text(
        path.read_text().replace("max_entries = 100", "max_entries = 5\narchive_size = 5")
    )
    config = load_config(path)
    service = Service(config, Store(config.database_url))
    service.prepare()
    running = RunningServer(service)
    try:
        _publish(service)
        pages = sorted(
            (config.publish.output_dir / "archive").glob("*.atom"), key=lambda p: int(p.stem)
        )
        assert len(pages) >= 3

        ages = {
            page.stem: running.get(f"/archive/{page.name}").headers["cache-control"]
            for page in pages
        }
        feed = running.get("/feed.atom").headers["cache-control"]
    finally:
        running.stop()
        service.close()
        service.store.close()

    newest = pages[-1].stem
    # The newest page still takes the stories that leave the feed: cached like the feed.
    assert ages.pop(newest) == feed == "public, max-age=300"
    assert set(ages.values()) == {"public, max-age=86400"}  # complete: they never change
