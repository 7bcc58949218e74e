"""An unchanged cycle as the operator's cron runs it: a whole `clusterfeed fetch` process.

Issue 16, point 15. A cycle where every feed answers 304 has nothing to parse, so it
must start no process: no parsing workers, no forkserver, not even multiprocessing's
resource tracker; nor load the parsers (feedparser, BeautifulSoup). Observed on the
real command, started in a session of its own, by sampling that session's processes
for as long as the command runs (the server holds each answer back, so the command
waits on the network long enough to be seen), and by the interpreter's own list of
the modules it imported (``-X importtime``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import FeedServer, Route, write_config
from tests.helpers import session_members

CLUSTERFEED = str(Path(sys.executable).with_name("clusterfeed"))


def _run_watching(
    config: Path, *python_options: str
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `clusterfeed fetch`; return it and the command lines of every other process
    seen in its session while it ran."""
    proc = subprocess.Popen(
        [sys.executable, *python_options, CLUSTERFEED, "fetch", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # every descendant carries the command's pid as session
    )
    seen: set[str] = set()
    try:
        while proc.poll() is None:
            seen.update(c for pid, c in session_members(proc.pid).items() if pid != proc.pid)
            time.sleep(0.01)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), seen


def test_a_cycle_where_every_feed_answers_304_starts_no_process_and_loads_no_parser(
    tmp_path: Path, feed_server: FeedServer, rss_feed: Any
) -> None:
    feeds = []
    for i in range(4):
        body = rss_feed(f"Partner {i}", [{"title": f"News {i}", "link": f"https://p{i}.example/"}])
        # Held back, so that the command is alive (and watched) for about a second.
        feed_server.routes[f"/f{i}.rss"] = Route(
            body, content_type="application/rss+xml", delay=0.5
        )
        feeds.append({"name": f"Partner {i}", "url": feed_server.url(f"/f{i}.rss")})
    # parse_processes: parsing goes to worker processes however few the feeds.
    config = write_config(tmp_path, feeds, extra="[fetch]\nparse_processes = 2\n")

    first, seen_first = _run_watching(config)
    assert first.returncode == 0, first.stderr
    assert "4 new items, 0 failed" in first.stdout
    # The watching sees processes where there are some: the new feeds were parsed in
    # workers (forks of the forkserver, which carry its command line).
    assert any("forkserver" in c for c in seen_first), seen_first

    feed_server.requests.clear()
    # -X importtime: the interpreter lists every module it imports on stderr.
    second, seen_second = _run_watching(config, "-X", "importtime")
    assert second.returncode == 0, second.stderr
    assert "fetched 4 feeds: 0 new items, 0 failed" in second.stdout
    assert len(feed_server.requests) == 4
    assert all("if-none-match" in r.headers for r in feed_server.requests)
    assert seen_second == set(), f"an all-304 cycle started {seen_second}"
    imported = {line.rsplit("|", 1)[-1].strip() for line in second.stderr.splitlines()}
    assert "clusterfeed.app.service" in imported  # the listing is there
    assert not imported & {"feedparser", "bs4", "clusterfeed.ingest.reading"}, "nothing to parse"
