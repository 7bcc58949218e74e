"""Hostile XML is harmless: no external entity is ever read, entity bombs end early.

Both run through the whole pipeline (real HTTP, store, publish, digest) next to a good
feed, and the time and memory seen are recorded in the test report (``-rP`` shows them).
"""

from __future__ import annotations

import asyncio
import resource
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest

from clusterfeed.app.sequences import cycle
from clusterfeed.app.service import Service
from clusterfeed.config import load_config
from clusterfeed.store import Store
from tests.conftest import DATA, EXAMPLE_FEEDS, FeedServer, Route, write_config

HOSTILE = DATA / "hostile"


def _all_output(folder: Path) -> str:
    """Everything clusterfeed wrote that a reader or subscriber could see."""
    parts = [(folder / "public" / "feed.atom").read_text(encoding="utf-8")]
    parts += [
        p.read_text(encoding="utf-8", errors="replace") for p in (folder / "mail" / "new").iterdir()
    ]
    return "\n".join(parts)


def test_external_entities_are_never_read(
    tmp_path: Path, feed_server: FeedServer, record_property: pytest.RecordProperty
) -> None:
    marker = f"TOP-SECRET-{uuid.uuid4().hex}"
    secret = tmp_path / "secret.txt"
    secret.write_text(marker, encoding="utf-8")
    body = (
        (HOSTILE / "xxe-local-file.rss").read_bytes().replace(b"SECRET_PATH", str(secret).encode())
    )
    feed_server.routes["/xxe.rss"] = Route(body, content_type="application/rss+xml")
    good = feed_server.serve_file(
        "/good.atom", EXAMPLE_FEEDS / "kristallwerk.atom", content_type="application/atom+xml"
    )
    config = load_config(
        write_config(
            tmp_path,
            [
                {"name": "Nordlicht Labor", "url": feed_server.url("/xxe.rss"), "language": "de"},
                {"name": "KristallWerk Discovery", "url": good, "language": "en"},
            ],
        )
    )
    service = Service(config, Store(config.database_url))
    service.prepare()

    report = asyncio.run(cycle(service, with_digest=True))

    output = _all_output(tmp_path)
    assert marker not in output
    stored = service.store.recent_stories()
    assert all(marker not in s.entry.title + s.entry.summary_text for s in stored)
    # The DTD's remote part (port 9 on 127.0.0.1) was never fetched either: nothing listens
    # there, and a fetch attempt would have made the parse fail rather than recover.
    assert {o.name: o.state for o in report.feeds}["KristallWerk Discovery"] == "new"
    assert {o.name: o.new_entries for o in report.feeds}["KristallWerk Discovery"] == 5
    assert "Sequenzierzentrum" in output  # the hostile feed's honest content survives
    record_property("xxe_leaked", marker in output)
    service.store.close()


def test_entity_expansion_ends_fast_with_bounded_memory(
    tmp_path: Path, feed_server: FeedServer, record_property: pytest.RecordProperty
) -> None:
    bomb = feed_server.serve_file(
        "/lol.rss", HOSTILE / "billion-laughs.rss", content_type="application/rss+xml"
    )
    good = feed_server.serve_file(
        "/good.atom", EXAMPLE_FEEDS / "elbmed-pharma.atom", content_type="application/atom+xml"
    )
    config = load_config(
        write_config(
            tmp_path,
            [
                {"name": "Lachende Milliarden", "url": bomb, "language": "de"},
                {"name": "Elbmed Pharma", "url": good, "language": "de"},
            ],
        )
    )
    service = Service(config, Store(config.database_url))
    service.prepare()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    started = time.perf_counter()
    report = asyncio.run(cycle(service, with_digest=True))
    seconds = time.perf_counter() - started
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    record_property("billion_laughs_rss_growth_mib", round(rss_growth_mib, 1))
    record_property("billion_laughs_seconds", round(seconds, 3))
    record_property("billion_laughs_peak_mib", round(peak / 2**20, 1))
    print(
        f"billion laughs: cycle took {seconds:.2f} s, Python heap peak {peak / 2**20:.1f} MiB, "
        f"process peak memory grew by {rss_growth_mib:.1f} MiB"
    )

    # Fully expanded, one title would be 3 GB; expat's amplification limit stops it at
    # the start. tracemalloc sees Python's heap, the resident-set peak sees expat's too.
    assert peak < 64 * 2**20
    assert rss_growth_mib < 256
    outcomes = {o.name: o for o in report.feeds}
    assert outcomes["Elbmed Pharma"].new_entries == 5
    statuses = {s.name: s for s in service.store.feed_statuses()}
    bomb_status = statuses["Lachende Milliarden"]
    # Either recorded as failed with a reason, or read with a recorded warning; never silent.
    assert (bomb_status.last_error or bomb_status.last_warning or "").strip()
    longest = max(
        (len(s.entry.title) + len(s.entry.summary_text) for s in service.store.recent_stories()),
        default=0,
    )
    assert longest < 10_000
    service.store.close()
