"""Story matching scored the way an outsider scores it: feeds over HTTP, the real CLI.

    python bench/stories_http.py [--cycles ordered|random|one] FOLDER [FOLDER ...]

``bench/stories.py`` stores the labelled items directly and matches them through the
store. This one starts further out, where a partner's feed begins: each labelled
partner becomes an RSS 2.0 feed served by a real HTTP server on 127.0.0.1 (GUIDs,
publication dates and links exactly as labelled, so colliding GUIDs and tracking
parameters arrive as a partner's CMS writes them); a throw-away config lists the feeds;
``clusterfeed fetch`` runs as a subprocess (one cycle, or seven: the items split by
publication date, or at random with a fixed seed); ``clusterfeed stories --json`` is
read back and scored pairwise against the labels, with the hard negatives merged. What
it exercises that the store-level bench does not: feed parsing, normalisation (links,
dates, sanitising), GUID handling across feeds, the fetch cycle's own matching step.

The machine's clock is the fetch time. Items dated after it are clamped to it when
stored (a partner's clock is not trusted with the future), exactly as an outside run on
the same day would see them; the report says how many items that touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from clusterfeed.stories.benchmark import Row, load_rows, score  # noqa: E402


def feed_slug(name: str) -> str:
    """A path for a partner's feed: stable, ASCII, unique per display name."""
    return "f-" + hashlib.sha256(name.encode()).hexdigest()[:12] + ".xml"


def rss(feed: str, rows: Sequence[Row]) -> bytes:
    """One partner's feed as its CMS would write it (newest first)."""
    language = rows[0].language if rows else "en"
    parts = [
        '<?xml version="1.0" encoding="utf-8"?>\n<rss version="2.0"><channel>',
        f"<title>{escape(feed)}</title><link>https://{feed_slug(feed)}.example/</link>",
        f"<description>{escape(feed)}</description><language>{language}</language>",
    ]
    for r in sorted(rows, key=lambda r: r.published, reverse=True):
        parts.append("<item>")
        parts.append(f"<title>{escape(r.title)}</title>")
        if r.link:
            parts.append(f"<link>{escape(r.link)}</link>")
        if r.guid:
            parts.append(f'<guid isPermaLink="false">{escape(r.guid)}</guid>')
        parts.append(f"<pubDate>{format_datetime(r.published.astimezone(UTC))}</pubDate>")
        parts.append(f"<description>{escape(r.summary)}</description>")
        parts.append("</item>")
    parts.append("</channel></rss>")
    return "".join(parts).encode("utf-8")


class Feeds:
    """What the server serves now: feed path -> bytes, swapped between cycles."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def show(self, rows: Sequence[Row], names: Sequence[str]) -> None:
        by_feed: dict[str, list[Row]] = {n: [] for n in names}
        for r in rows:
            by_feed[r.feed].append(r)
        with self.lock:
            self.files = {"/" + feed_slug(n): rss(n, by_feed[n]) for n in names}


def serve(feeds: Feeds) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with feeds.lock:
                body = feeds.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/rss+xml; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def write_config(folder: Path, port: int, names: Sequence[str], rows: Sequence[Row]) -> Path:
    language = {r.feed: r.language for r in rows}
    feeds = "".join(
        f"\n[[feeds]]\nname = {json.dumps(n, ensure_ascii=False)}\n"
        f'url = "http://127.0.0.1:{port}/{feed_slug(n)}"\nlanguage = "{language[n]}"\n'
        for n in names
    )
    path = folder / "clusterfeed.toml"
    path.write_text(
        '[cluster]\nname = "Outside check"\nurl = "https://cluster.example"\n'
        '[store]\nurl = "sqlite:///store.sqlite3"\n'
        '[publish]\noutput_dir = "public"\nfeed_url = "https://cluster.example/feed.atom"\n'
        '[digest]\nfrom = "News <news@cluster.example>"\n'
        '[mail]\ntransport = "maildir"\nmaildir = "mail"\n' + feeds,
        encoding="utf-8",
    )
    return path


def cycles(rows: Sequence[Row], how: str, count: int = 7, seed: int = 7) -> list[list[Row]]:
    """What each cycle's feeds show: everything so far (feeds keep their old items)."""
    if how == "one":
        return [list(rows)]
    ordered = sorted(rows, key=lambda r: (r.published, r.id))
    if how == "random":
        ordered = list(rows)
        random.Random(seed).shuffle(ordered)
    size = -(-len(ordered) // count)
    return [ordered[: size * (k + 1)] for k in range(count)]


def clusterfeed(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "clusterfeed", *args, "--config", str(config)],
        capture_output=True, text=True, cwd=config.parent,
    )  # fmt: skip
    if done.returncode not in (0, 1):
        raise SystemExit(f"clusterfeed {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def labels_from(stories_json: str, rows: Sequence[Row]) -> tuple[dict[str, object], int]:
    """Each labelled item's story, found by its feed and title (links are cleaned when
    stored, titles are not); items the CLI never listed count as stories of their own."""
    where: dict[tuple[str, str], object] = {}
    for story in json.loads(stories_json):
        for item in story["items"]:
            where[(item["feed"], item["title"])] = story["id"]
    labels: dict[str, object] = {}
    missing = 0
    for r in rows:
        found = where.get((r.feed, " ".join(r.title.split())))
        if found is None:
            found = where.get((r.feed, r.title))
        if found is None:
            missing += 1
            found = ("missing", r.id)
        labels[r.id] = found
    return labels, missing


def run(folders: Sequence[Path], how: str, *, shift: bool) -> None:
    rows: list[Row] = []
    negatives: list[tuple[str, str, str]] = []
    for folder in folders:
        got, neg = load_rows(folder)
        rows.extend(got)
        negatives.extend(neg)
    names = sorted({r.feed for r in rows})
    now = datetime.now(UTC)
    if shift and rows:
        weeks = max(0, -(-(max(r.published for r in rows) - now).days // 7) + 1)
        rows = [
            dataclasses.replace(r, published=r.published - timedelta(weeks=weeks)) for r in rows
        ]
    future = sum(1 for r in rows if r.published > now)
    feeds = Feeds()
    server = serve(feeds)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = write_config(Path(tmp), server.server_address[1], names, rows)
            for shown in cycles(rows, how):
                feeds.show(shown, names)
                clusterfeed(config, "fetch")
            labels, missing = labels_from(clusterfeed(config, "stories", "--json"), rows)
    finally:
        server.shutdown()
    s = score(labels, rows, negatives)
    print(
        f"{how} ({', '.join(f.name for f in folders)}): {s.items} items, {len(names)} feeds, "
        f"{s.pairs} same-story pairs: precision {s.precision:.3f}, recall {s.recall:.3f}, "
        f"hard negatives merged {s.merged_hard_negatives} of {s.hard_negatives}; "
        f"{missing} items not listed; {future} items dated after the fetch (clamped)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--cycles", choices=["one", "ordered", "random"], default="one")
    parser.add_argument(
        "--as-dated",
        action="store_true",
        help="serve the labelled dates as they are, even when they lie after today",
    )
    args = parser.parse_args()
    run(args.folders, args.cycles, shift=not args.as_dated)


if __name__ == "__main__":
    main()
