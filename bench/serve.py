"""Load on the served feed: ``clusterfeed serve`` beside a minimal static file server.

Issue 5 (point 6) asks that feed readers polling ``/feed.atom`` from many connections
at once, half of them with the ETag they got last time, are answered at no less than
half the rate a minimal static file server manages on the same bytes, and that a 304
costs no reading or building of the feed.

What runs (see bench/README.md, "Serving benchmark"):

- a published folder made by the real pipeline (``clusterfeed fetch`` and ``publish``
  as subprocesses): by default from generated partner feeds with 100 stories, like a
  cluster's real feed with ``publish.max_entries = 100``; ``--feed example`` uses the
  bundled example (36 stories);
- ``clusterfeed serve`` on that folder, as a subprocess, exactly as an operator runs it;
- the peer: a minimal static file server in this file (``--static-peer``), run as a
  subprocess of its own: asyncio streams on the same event loop uvicorn uses (uvloop
  when installed), HTTP/1.1 keep-alive, one ``stat`` per request, the body read once
  per version of the file, an nginx-style ETag (mtime and size) and 304 on
  If-None-Match, gzip when asked (compressed once per version, like nginx's
  gzip_static). One process and one thread, like ``clusterfeed serve``;
- the load: ``wrk`` (C, epoll; Debian's package), two instances at once with half the
  connections each, one without validators, one sending the server's current ETag in
  If-None-Match. wrk needs a small fraction of a core for this load, so it is not what
  limits the figures (its CPU is reported).

Run from the repository root: ``.venv/bin/python bench/serve.py [--write]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PURE = "clusterfeed (h11, asyncio)"

# -- the peer: a minimal static file server ------------------------------------------


class _StaticFile:
    """One file as the peer serves it: bytes and validators, re-read when it changes."""

    def __init__(self) -> None:
        self.signature: tuple[int, int] | None = None
        self.body = b""
        self.gzipped = b""
        self.etag = ""
        self.last_modified = ""


async def _static_peer(root: Path, port: int) -> None:
    files: dict[str, _StaticFile] = {}

    def lookup(target: str) -> tuple[Path, os.stat_result] | None:
        relative = target.split("?", 1)[0].lstrip("/") or "index.html"
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            return None
        try:
            return path, path.stat()
        except OSError:
            return None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                found = lookup(target)
                if found is None or method not in ("GET", "HEAD"):
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    continue
                path, stat = found
                entry = files.setdefault(str(path), _StaticFile())
                signature = (stat.st_mtime_ns, stat.st_size)
                if entry.signature != signature:
                    entry.body = path.read_bytes()
                    entry.gzipped = gzip.compress(entry.body, compresslevel=6, mtime=0)
                    entry.etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
                    entry.last_modified = format_datetime(
                        datetime.fromtimestamp(stat.st_mtime, UTC), usegmt=True
                    )
                    entry.signature = signature
                common = (
                    f"ETag: {entry.etag}\r\nLast-Modified: {entry.last_modified}\r\n"
                    "Cache-Control: public, max-age=300\r\nVary: Accept-Encoding\r\n"
                )
                if headers.get("if-none-match") == entry.etag:
                    writer.write(f"HTTP/1.1 304 Not Modified\r\n{common}\r\n".encode())
                else:
                    body = entry.body
                    extra = ""
                    if "gzip" in headers.get("accept-encoding", ""):
                        body, extra = entry.gzipped, "Content-Encoding: gzip\r\n"
                    writer.write(
                        (
                            "HTTP/1.1 200 OK\r\n"
                            "Content-Type: application/atom+xml; charset=utf-8\r\n"
                            f"{common}{extra}Content-Length: {len(body)}\r\n\r\n"
                        ).encode()
                    )
                    if method == "GET":
                        writer.write(body)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def run_static_peer(root: Path, port: int) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_static_peer(root.resolve(), port))


# -- the published folder ------------------------------------------------------------------

WORDS = tuple(
    [
        "cluster",
        "partners",
        "gene",
        "therapy",
        "vector",
        "capsid",
        "trial",
        "patients",
        "financing",
        "round",
        "seed",
        "series",
        "laboratory",
        "research",
        "university",
        "hospital",
        "medtech",
        "sensor",
        "approval",
        "agency",
        "production",
        "site",
        "Hamburg",
        "Kiel",
        "Lübeck",
        "Kobe",
        "cooperation",
        "agreement",
        "platform",
        "screening",
        "antibody",
        "diagnostics",
        "start-up",
        "investors",
        "million",
        "euro",
        "results",
        "congress",
        "data",
        "study",
        "cohort",
        "biobank",
        "imaging",
    ]
)


def _text(seed: int, words: int) -> str:
    digest = hashlib.sha256(str(seed).encode()).digest()
    out = []
    for i in range(words):
        out.append(WORDS[(digest[i % 32] + i * 7) % len(WORDS)])
    return " ".join(out).capitalize() + "."


def generated_feeds(folder: Path, stories: int, partners: int = 10) -> list[dict[str, str]]:
    """``stories`` distinct items spread over ``partners`` RSS files (about 1 kB each)."""
    folder.mkdir(parents=True, exist_ok=True)
    start = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    feeds = []
    for p in range(partners):
        items = []
        for n in range(p, stories, partners):
            when = format_datetime(start - timedelta(hours=5 * n))
            body = " ".join(_text(n * 10 + k, 22) for k in range(5))
            items.append(
                f"<item><title>Partner {p} news {n}: {_text(n, 8)}</title>"
                f"<link>https://partner{p}.example/news/{n}.html</link>"
                f'<guid isPermaLink="false">partner{p}-{n}</guid>'
                f"<pubDate>{when}</pubDate>"
                f"<description>&lt;p&gt;{body}&lt;/p&gt;</description>"
                f'<enclosure url="https://partner{p}.example/img/{n}.jpg" type="image/jpeg" '
                'length="0"/></item>'
            )
        xml = (
            '<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel>'
            f"<title>Partner {p}</title><link>https://partner{p}.example/</link>"
            "<description>News</description>" + "".join(items) + "</channel></rss>"
        )
        path = folder / f"partner{p}.rss"
        path.write_text(xml, encoding="utf-8")
        feeds.append(
            {"name": f"Partner {p}", "url": str(path), "site": f"https://partner{p}.example/"}
        )
    return feeds


def make_config(work: Path, feed: str, stories: int, port: int) -> Path:
    """A config whose published folder the real pipeline fills; returns its path."""
    if feed == "example":
        shutil.copytree(REPO / "config", work / "config")
        shutil.copytree(REPO / "templates", work / "templates")
        path = work / "config" / "example.toml"
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"(?m)^port = \d+", f"port = {port}", text)
        path.write_text(text, encoding="utf-8")
        return path
    feeds = generated_feeds(work / "feeds", stories)
    lines = [
        "[cluster]",
        'name = "NordBio Cluster"',
        'url = "https://www.nordbio.example"',
        "[publish]",
        'output_dir = "public"',
        'feed_url = "https://news.nordbio.example/feed.atom"',
        f"max_entries = {max(stories, 1)}",
        "[web]",
        'base_url = "https://news.nordbio.example"',
        f"port = {port}",
        "[store]",
        'url = "sqlite:///store.sqlite3"',
        "[mail]",
        'transport = "maildir"',
        'maildir = "mail"',
        "[digest]",
        'from = "NordBio News <news@nordbio.example>"',
        "[stories]",
        "match = false",
    ]
    for f in feeds:
        lines += ["[[feeds]]", *(f"{k} = {json.dumps(v)}" for k, v in f.items())]
    lines += ["[[subscribers]]", 'email = "reader@example.org"']
    path = work / "clusterfeed.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def clusterfeed_command() -> str:
    return str(Path(sys.executable).with_name("clusterfeed"))


# ``clusterfeed serve`` with uvicorn's pure-Python parts (h11, asyncio's own loop), to
# show what httptools and uvloop bring: the same make_server, two settings changed.
PURE_PYTHON_SERVE = """
import sys
from clusterfeed.cli import _service
from clusterfeed.web.server import make_server
from pathlib import Path
with _service(Path(sys.argv[1])) as service:
    server = make_server(service, "127.0.0.1", int(sys.argv[2]))
    server.config.http = "h11"
    server.config.loop = "asyncio"
    server.run()
"""


def publish(config: Path) -> Path:
    for command in ("fetch", "publish"):
        done = subprocess.run(
            [clusterfeed_command(), command, "--config", str(config)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"clusterfeed {command} failed:\n{done.stdout}{done.stderr}")
    text = config.read_text(encoding="utf-8")
    match = re.search(r'(?m)^output_dir = "([^"]+)"', text)
    assert match is not None
    return (config.parent / match.group(1)).resolve()


# -- processes and measurements ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, b""


def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if get(url)[0] == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def process_cpu(pid: int) -> float:
    """User plus system CPU seconds of a running process (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_read_bytes(pid: int) -> int:
    """Bytes the process got from read-type system calls (files and sockets alike)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


WRK_SCRIPT = r"""
-- One wrk instance: counts statuses; with an ETag argument, sends it in If-None-Match.
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  counts = {}
  if args[1] ~= nil and args[1] ~= "" then wrk.headers["If-None-Match"] = args[1] end
  if args[2] ~= nil and args[2] ~= "" then wrk.headers["Accept-Encoding"] = args[2] end
  -- wrk.init, which called this, formats the request with these headers afterwards.
end
function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end
function done(summary, latency, requests)
  local statuses = {}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("counts")) do
      statuses[status] = (statuses[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(statuses) do table.insert(parts, '"' .. status .. '":' .. n) end
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"errors":%d,' ..
    '"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, table.concat(parts, ",")))
end
"""


@dataclass
class Run:
    server: str
    connections: int
    seconds: float
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    latency_200: dict[str, float] = field(default_factory=dict)
    latency_304: dict[str, float] = field(default_factory=dict)
    server_cpu: float = 0.0
    wrk_cpu: float = 0.0
    other_cpu: float = 0.0  # CPU seconds used by everything else on the machine
    read_bytes: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def other_share(self) -> float:
        return self.other_cpu / (self.seconds * (os.cpu_count() or 1))


def load(
    name: str,
    url: str,
    pid: int,
    script: Path,
    connections: int,
    seconds: int,
    coding: str,
    with_etag: int,
) -> Run:
    """``with_etag`` connections send the current ETag, the others no validator; at once."""
    status, headers, _ = get(url, {"Accept-Encoding": coding} if coding else None)
    assert status == 200, f"{name}: {url} answered {status}"
    etag = headers["etag"]
    groups = [
        (group, n, tag)
        for group, n, tag in (("200", connections - with_etag, ""), ("304", with_etag, etag))
        if n > 0
    ]
    commands = [
        ["wrk", "-t1", f"-c{n}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
         url, "--", tag, coding]
        for _group, n, tag in groups
    ]  # fmt: skip
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before, read_before = process_cpu(pid), process_read_bytes(pid)
    busy_before, _ = machine_busy()
    started = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in commands]
    outputs = [p.communicate()[0] for p in procs]
    elapsed = time.monotonic() - started
    busy_after, _ = machine_busy()
    cpu_after, read_after = process_cpu(pid), process_read_bytes(pid)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = Run(name, connections, seconds)
    for (group, _n, _tag), output in zip(groups, outputs, strict=True):
        line = next((x for x in output.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result for {name}:\n{output}")
        result = json.loads(line[len("RESULT ") :])
        run.requests += result["requests"]
        run.errors += result["errors"]
        for status, n in result["statuses"].items():
            key = f"{status} ({'no validator' if group == '200' else 'If-None-Match'})"
            run.statuses[key] = run.statuses.get(key, 0) + n
        target = run.latency_200 if group == "200" else run.latency_304
        target.update({k: result[k] / 1000 for k in ("p50", "p90", "p99", "p999", "max")})
    run.seconds = float(seconds)
    run.server_cpu = cpu_after - cpu_before
    run.wrk_cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    run.other_cpu = max(0.0, (busy_after - busy_before) - run.server_cpu - run.wrk_cpu)
    run.read_bytes = read_after - read_before
    del elapsed
    return run


# -- the report -------------------------------------------------------------------------------


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    cores = os.cpu_count()
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) // 1024
    os_name = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r'PRETTY_NAME="([^"]+)"', Path("/etc/os-release").read_text())
        os_name = match.group(1) if match else os_name
    return (
        f"{model.group(1).strip() if model else platform.processor()}, {cores} cores, "
        f"{mem / 1024:.1f} GiB RAM; {os_name}, kernel {platform.release()}; "
        f"Python {platform.python_version()}"
    )


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("clusterfeed", "uvicorn", "starlette", "httptools", "uvloop"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    found.append((wrk.stdout or wrk.stderr).split("\n", 1)[0].split(" [")[0])
    return ", ".join(found)


def git_version() -> str:
    out = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=REPO
    )
    return out.stdout.strip() or "unknown"


def median_run(runs: list[Run]) -> Run:
    ordered = sorted(runs, key=lambda r: r.rps)
    return ordered[len(ordered) // 2]


def _fmt_latency(lat: dict[str, float]) -> str:
    if not lat:
        return "–"
    return " / ".join(f"{lat[k]:.1f}" for k in ("p50", "p90", "p99"))


def report(
    args: argparse.Namespace,
    feed_bytes: int,
    stories: int,
    results: dict[str, list[Run]],
    checks: list[str],
) -> str:
    cf, peer = median_run(results["clusterfeed"]), median_run(results["static"])
    ratio = cf.rps / peer.rps if peer.rps else 0.0
    cores = os.cpu_count() or 1
    lines = [
        f"## Serving: {datetime.now(UTC):%a %b %d %H:%M:%S UTC %Y}",
        "",
        f"- Machine: {machine()}",
        f"- Software: {versions()}; clusterfeed git `{git_version()}`",
        f"- Command: `.venv/bin/python bench/serve.py {' '.join(sys.argv[1:])}`",
        f"- Feed: `/feed.atom` with {stories} stories, {feed_bytes / 1024:.0f} kB "
        f"({'the bundled example' if args.feed == 'example' else 'generated partner feeds'}, "
        "published by `clusterfeed fetch` and `publish`)"
        + (
            f"; clients send `Accept-Encoding: {args.encoding}`"
            if args.encoding
            else "; clients send no Accept-Encoding (identity bodies)"
        ),
        f"- Load: wrk, {args.connections} keep-alive connections on 127.0.0.1 "
        f"({args.connections - args.with_etag} without validators, {args.with_etag} with "
        f"the current ETag in If-None-Match), {args.seconds} s per run, "
        f"{args.rounds} run(s) per server alternating; the table shows the run with the "
        "median requests per second.",
        "",
        "| server | req/s | of which 200 / 304 | 200 latency ms p50 / p90 / p99 "
        "| 304 latency ms p50 / p90 / p99 | statuses | errors | server CPU "
        "| CPU µs per request | bytes read per request | wrk CPU | other processes |",
        "| --- | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [(cf, "clusterfeed serve"), (peer, "minimal static server")]
    if PURE in results:
        rows.append((median_run(results[PURE]), "clusterfeed serve, h11 and asyncio loop"))
    for run, label in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(run.statuses.items()))
        full = sum(n for k, n in run.statuses.items() if k.startswith("200"))
        cheap = sum(n for k, n in run.statuses.items() if k.startswith("304"))
        lines.append(
            f"| {label} | {run.rps:,.0f} | {full / run.seconds:,.0f} / "
            f"{cheap / run.seconds:,.0f} | {_fmt_latency(run.latency_200)} | "
            f"{_fmt_latency(run.latency_304)} | {statuses} | {run.errors} | "
            f"{100 * run.server_cpu / run.seconds:.0f}% of a core | "
            f"{1e6 * run.server_cpu / max(run.requests, 1):.0f} | "
            f"{run.read_bytes / max(run.requests, 1):.0f} | "
            f"{100 * run.wrk_cpu / run.seconds:.0f}% of a core | "
            f"{100 * run.other_share:.0f}% of {cores} cores |"
        )
    verdict = "met" if ratio >= 0.5 else "**not met**"
    lines += [
        "",
        f"clusterfeed at least 0.5x the static server's requests per second: {verdict} "
        f"({cf.rps:,.0f} against {peer.rps:,.0f} req/s, {ratio:.2f}x).",
        "",
        "Every run (req/s; other processes' share of the machine):",
        "",
    ]
    for name, runs in results.items():
        lines.append(
            f"- {name}: " + ", ".join(f"{r.rps:,.0f} ({100 * r.other_share:.0f}%)" for r in runs)
        )
    lines += ["", "Checks:", "", *[f"- {c}" for c in checks], ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--feed", choices=("generated", "example"), default="generated")
    parser.add_argument("--stories", type=int, default=100, help="stories in a generated feed")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument(
        "--with-etag",
        type=int,
        default=None,
        help="connections that send If-None-Match (default: half)",
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--encoding", default="", help='e.g. "gzip": sent by every client')
    parser.add_argument(
        "--pure-python",
        action="store_true",
        help="also measure clusterfeed serve with uvicorn's h11 parser and asyncio loop",
    )
    parser.add_argument("--write", action="store_true", help="append the report to RESULTS.md")
    parser.add_argument(
        "--static-peer", nargs=2, metavar=("FOLDER", "PORT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.with_etag is None:
        args.with_etag = args.connections // 2
    args.with_etag = min(max(args.with_etag, 0), args.connections)
    if args.static_peer:
        run_static_peer(Path(args.static_peer[0]), int(args.static_peer[1]))
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="clusterfeed-bench-serve-") as tmp:
        work = Path(tmp)
        cf_port, peer_port = free_port(), free_port()
        config = make_config(work, args.feed, args.stories, cf_port)
        folder = publish(config)
        feed = folder / "feed.atom"
        stories = feed.read_text(encoding="utf-8").count("<entry")
        script = work / "count.lua"
        script.write_text(textwrap.dedent(WRK_SCRIPT), encoding="utf-8")

        servers = {
            "clusterfeed": subprocess.Popen(
                [clusterfeed_command(), "serve", "--config", str(config),
                 "--host", "127.0.0.1", "--port", str(cf_port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            ),
            "static": subprocess.Popen(
                [sys.executable, __file__, "--static-peer", str(folder), str(peer_port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            ),
        }  # fmt: skip
        urls = {
            "clusterfeed": f"http://127.0.0.1:{cf_port}/feed.atom",
            "static": f"http://127.0.0.1:{peer_port}/feed.atom",
        }
        if args.pure_python:
            pure_port = free_port()
            servers[PURE] = subprocess.Popen(
                [sys.executable, "-c", PURE_PYTHON_SERVE, str(config), str(pure_port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            urls[PURE] = f"http://127.0.0.1:{pure_port}/feed.atom"
        checks = []
        try:
            for name, url in urls.items():
                wait_ready(url)
                _status, headers, body = get(url)
                if body != feed.read_bytes():
                    raise RuntimeError(f"{name} does not serve the published bytes")
                again = get(url, {"If-None-Match": headers["etag"]})[0]
                checks.append(
                    f"{name}: serves the {len(body):,} published bytes; "
                    f"its ETag {headers['etag']} gets {again}"
                )
                if again != 304:
                    raise RuntimeError(f"{name} answered {again} to its own ETag")
            results: dict[str, list[Run]] = {name: [] for name in urls}
            # Warm both up (the first request reads the file; uvicorn imports lazily).
            for name, url in urls.items():
                load(
                    name, url, servers[name].pid, script, args.connections, 2, args.encoding,
                    args.with_etag,
                )  # fmt: skip
            for _round in range(args.rounds):
                for name, url in urls.items():
                    run = load(
                        name, url, servers[name].pid, script, args.connections, args.seconds,
                        args.encoding, args.with_etag,
                    )  # fmt: skip
                    results[name].append(run)
                    print(
                        f"{name}: {run.rps:,.0f} req/s, server CPU "
                        f"{100 * run.server_cpu / run.seconds:.0f}%, others "
                        f"{100 * run.other_share:.0f}%",
                        file=sys.stderr,
                    )
            for name, runs in results.items():
                bad = [
                    k for r in runs for k in r.statuses
                    if not (k.startswith("200 (no") or k.startswith("304 (If"))
                ]  # fmt: skip
                checks.append(
                    f"{name}: every answer without validators was 200 and every answer "
                    "with the ETag 304"
                    if not bad
                    else f"{name}: unexpected answers {bad}"
                )
                per_request = max(r.read_bytes / max(r.requests, 1) for r in runs)
                total = sum(r.read_bytes for r in runs)
                requests = sum(r.requests for r in runs)
                checks.append(
                    f"{name}: {total:,} bytes read with read() calls (/proc/PID/io rchar) "
                    f"over {requests:,} requests ({per_request:.1f} per request at most; "
                    f"the feed is {feed.stat().st_size:,} bytes): the file is not read "
                    "per request"
                )
        finally:
            for proc in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc in servers.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        text = report(args, feed.stat().st_size, stories, results, checks)
    print(text)
    if args.write:
        with RESULTS.open("a", encoding="utf-8") as out:
            out.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
