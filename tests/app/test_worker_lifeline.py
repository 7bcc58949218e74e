"""kill -9 of `clusterfeed fetch` leaves no process behind.

A real `clusterfeed fetch` with 45 feeds (so parsing runs in worker processes, started
through a forkserver, beside a resource tracker) fetches from a real HTTP server on
127.0.0.1 that answers most feeds slowly, so the workers are up while it waits. The
command is started in a session of its own; after SIGKILL of the command alone, every
other process of that session must be gone within a bounded wait.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import FeedServer, Route, write_config
from tests.helpers import session_members

CLUSTERFEED = str(Path(sys.executable).with_name("clusterfeed"))


def _wait_for(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


def test_kill_9_of_fetch_leaves_no_worker_behind(
    tmp_path: Path, feed_server: FeedServer, rss_feed: Any
) -> None:
    feeds = []
    for i in range(45):
        body = rss_feed(f"Partner {i}", [{"title": f"News {i}", "link": f"https://p{i}.example/"}])
        # The first few answer at once and are parsed in the workers; the rest keep the
        # command waiting on the network.
        feed_server.routes[f"/f{i}.rss"] = Route(
            body, content_type="application/rss+xml", delay=0 if i < 6 else 30
        )
        feeds.append({"name": f"Partner {i}", "url": feed_server.url(f"/f{i}.rss")})
    path = write_config(
        tmp_path,
        feeds,
        extra="[fetch]\nconcurrency = 45\nper_host = 20\nparse_processes = 2\n",
    )

    log = tmp_path / "fetch.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [CLUSTERFEED, "fetch", "--config", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # its session id is its pid: every descendant carries it
        )
    sid = proc.pid
    try:
        # The fast feeds are parsed (in the workers), the slow ones keep it waiting:
        # the command, the forkserver, the resource tracker and the workers are up.
        assert _wait_for(lambda: all(f"Partner {i}: new" in log.read_text() for i in range(6)),
                         60), log.read_text()  # fmt: skip
        assert _wait_for(lambda: len(session_members(sid)) >= 4, 60), session_members(sid)
        before = session_members(sid)
        # (the workers are forks of the forkserver and carry its command line)
        assert sum("forkserver" in c for c in before.values()) >= 2, before
        assert sum("resource_tracker" in c for c in before.values()) == 1, before
        assert "parsing process failed" not in log.read_text()

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

        left = _wait_for(lambda: not session_members(sid), 10)
        assert left, f"left behind: {session_members(sid)} (were: {before})"
    finally:
        for pid in session_members(sid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
