"""Fetch benchmark: clusterfeed against a minimal client and the ``reader`` library.

Issue 8, point 9. One run starts a feed server in its own process and then measures
three clients, one after the other, each in a fresh subprocess (cold imports, empty
database, no connection pool, and its own ``ru_maxrss``):

- ``clusterfeed``: the real cycle, ``asyncio.run(Service.fetch())`` (fetch, parse,
  normalize, store), from a config and SQLite file made in a temp folder;
- ``minimal``: httpx plus ``feedparser.parse`` on the response bytes, nothing stored;
  the yardstick for what fetching and parsing alone cost;
- ``reader``: the ``reader`` library's ``update_feeds(workers=N)``, run from its own
  venv (``bench/.venv-reader``) so it cannot change the project's dependencies.

Each client runs two cycles: the first gets every feed, the second sends the
validators it saw and gets 304 for every feed. The server adds a fixed latency with
``asyncio.sleep``, so the second cycle's floor is feeds / concurrency x latency and
everything above it is the client's own cost.

The server lives in a separate process so that its work never competes with the
measured client for the GIL (it still competes for a core, as a partner's server does
not; on a 2-core machine that is part of the picture). It spreads the feeds over 50
loopback addresses because clusterfeed allows only 2 requests at once per host: on one
address the benchmark would measure that politeness limit, not the client.

Run ``.venv/bin/python bench/fetch.py --help``; ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, formatdate, parsedate_to_datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar
from xml.sax.saxutils import escape, quoteattr

# Only the standard library is imported at module level: this file also runs under
# bench/.venv-reader, which has neither clusterfeed nor httpx.

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
READER_VENV = BENCH / ".venv-reader"
READER_PYTHON = READER_VENV / "bin" / "python"
REQUIREMENTS = BENCH / "requirements.txt"
RESULTS = BENCH / "RESULTS.md"

HOSTS = 50  # 127.0.0.2 ... 127.0.0.51
FIRST_HOST = 2
CONTROL_PREFIX = "/_bench/"
SEED = 8  # issue 8
IDLE_TIMEOUT_S = 30.0
SERVER_LIFETIME_S = 3 * 3600.0  # the server stops by itself even if the parent is lost
CLIENTS = ("minimal", "clusterfeed", "reader")
DISTURBED_SHARE = 0.1  # of all cores, used by other processes during a cycle

T = TypeVar("T")


# -- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The size of one benchmark; the same for the server and for every client."""

    feeds: int = 500
    items: int = 30
    latency_ms: float = 100.0
    concurrency: int = 20
    seed: int = SEED

    @property
    def hosts(self) -> int:
        return min(HOSTS, self.feeds)

    @property
    def floor_s(self) -> float:
        """The least time any client needs for a cycle: the latency, paid in waves."""
        return math.ceil(self.feeds / self.concurrency) * self.latency_ms / 1000.0


def feed_address(index: int, settings: Settings) -> str:
    """The loopback address that serves feed ``index``; neighbours go to different hosts."""
    return f"127.0.0.{FIRST_HOST + index % settings.hosts}"


def feed_path(index: int) -> str:
    return f"/feeds/{index:03d}.rss" if index % 2 == 0 else f"/feeds/{index:03d}.atom"


def feed_urls(settings: Settings, port: int) -> list[str]:
    return [
        f"http://{feed_address(i, settings)}:{port}{feed_path(i)}" for i in range(settings.feeds)
    ]


# -- generated feeds --------------------------------------------------------------------

ORGS = [
    ("Helix Vektor GmbH", "Hamburg"),
    ("KristallWerk Discovery", "Kiel"),
    ("Elbmed Pharma AG", "Hamburg"),
    ("Universitätsklinikum Förde", "Kiel"),
    ("Biotech Campus Lübeck", "Lübeck"),
    ("Hanse Innovationsfonds", "Hamburg"),
    ("Nordlicht Diagnostics", "Rostock"),
    ("Weser Bioprocess GmbH", "Bremen"),
    ("Deichblick MedTech", "Flensburg"),
    ("Alster Genomics", "Hamburg"),
    ("Trave Therapeutics", "Lübeck"),
    ("Schlei Bioanalytik", "Schleswig"),
    ("Greifswalder Plasma Instruments", "Greifswald"),
    ("Ostsee Zellbanken", "Kiel"),
    ("Wattenmeer Algae Labs", "Husum"),
    ("Institut für marine Wirkstoffe", "Büsum"),
]
PEOPLE = [
    "Dr. Hinrike Petersen",
    "Prof. Jannis Carstensen",
    "Dr. Maren Thomsen",
    "Ole Hansen",
    "Dr. Aiko Tanaka",
    "Prof. Friederike Lüders",
    "Dr. Sönke Brodersen",
    "Katharina Wendt",
]
TOPICS = {
    "en": [
        "gene therapy vectors",
        "antibody discovery",
        "digital pathology",
        "marine natural products",
        "point-of-care diagnostics",
        "cell therapy manufacturing",
        "AI-assisted drug design",
        "medical imaging",
    ],
    "de": [
        "Gentherapie-Vektoren",
        "Antikörperforschung",
        "digitale Pathologie",
        "marine Naturstoffe",
        "patientennahe Diagnostik",
        "Zelltherapie-Herstellung",
        "KI-gestütztes Wirkstoffdesign",
        "medizinische Bildgebung",
    ],
}
TITLES = {
    "en": [
        "{org} raises EUR {n} million to advance {topic}",
        "{org} and {org2} sign a letter of intent on {topic}",
        "{org} opens a new laboratory for {topic} in {city}",
        "First patient dosed in {org}'s phase {phase} trial",
        "{person} joins {org} as Chief Scientific Officer",
        "{city} life science day draws {n}0 partners to talk about {topic}",
    ],
    "de": [
        "{org} sammelt {n} Mio. Euro für {topic} ein",
        "{org} und {org2} unterzeichnen Absichtserklärung zu {topic}",
        "{org} eröffnet neues Labor für {topic} in {city}",
        "Erster Patient in Phase-{phase}-Studie von {org} behandelt",
        "{person} wird wissenschaftliche Geschäftsführerin bei {org}",
        "Life-Science-Tag in {city}: {n}0 Partner diskutieren über {topic}",
    ],
}
SENTENCES = {
    "en": [
        "The North German cluster sees the step as a sign that {topic} has become one of the "
        "region's strengths between Hamburg and Schleswig-Holstein.",
        "With the new funds, {org} plans to hire {n} scientists in {city} over the next two "
        "years and to expand its production under GMP conditions.",
        '"After several preliminary discussions we started an intensive exchange with '
        'research institutes in both regions," says {person}.',
        "The cooperation covers technology transfer, joint applications for public funding "
        "and the market launch of innovations for the health industry.",
        "Partners from Kobe, Copenhagen and Boston have already announced visits to {city} "
        "to learn more about {topic}.",
        "{org2} contributes its platform and data; the first results are expected in the "
        "second half of the year.",
        "The candidate {code} showed a {n}% reduction of the biomarker in the preclinical "
        "model, {person} reported at the {event} in {abroad}.",
        "Around {n}0 employees now work at the site, which {org} took over from {org2} in "
        "{month} {year}.",
        "The state of Schleswig-Holstein supports the project with EUR {n}0,000 from its "
        "programme for economic development and technology transfer.",
        "The round was led by {investor}, with existing investors {org2} and a family office "
        "from {abroad} taking part.",
        "{org} will present the data on {month} {n} at the {event}; registration is open on "
        "the cluster's website.",
        "The partners will share an S2 laboratory of {n}0 square metres on the campus in "
        "{city} from {month} on.",
    ],
    "de": [
        "Das norddeutsche Cluster wertet den Schritt als Zeichen dafür, dass {topic} zu den "
        "Stärken der Region zwischen Hamburg und Schleswig-Holstein zählt.",
        "Mit dem frischen Kapital will {org} in den kommenden zwei Jahren {n} "
        "Wissenschaftlerinnen und Wissenschaftler in {city} einstellen.",
        "„Nach mehreren Vorgesprächen haben wir einen intensiven Austausch mit "
        "Forschungseinrichtungen in beiden Regionen begonnen“, sagt {person}.",
        "Die Kooperation umfasst Technologietransfer, gemeinsame Förderanträge und die "
        "Markteinführung von Innovationen für die Gesundheitswirtschaft.",
        "Die Landesregierung fördert das Vorhaben über das Programm für "
        "Wirtschaftsförderung und Technologietransfer mit {n}0.000 Euro.",
        "{org2} bringt seine Plattform und seine Daten ein; erste Ergebnisse werden für "
        "die zweite Jahreshälfte erwartet.",
        "Der Kandidat {code} senkte den Biomarker im präklinischen Modell um {n} Prozent, "
        "berichtete {person} auf der {event} in {abroad}.",
        "Rund {n}0 Beschäftigte arbeiten inzwischen am Standort, den {org} im {month} {year} "
        "von {org2} übernommen hat.",
        "Angeführt wurde die Finanzierungsrunde von {investor}; auch {org2} und ein "
        "Family Office aus {abroad} beteiligten sich.",
        "{org} stellt die Daten am {n}. {month} auf der {event} vor; die Anmeldung ist "
        "über die Website des Clusters möglich.",
        "Ab {month} teilen sich die Partner ein S2-Labor mit {n}0 Quadratmetern auf dem "
        "Campus in {city}.",
        "Das Bundesministerium für Bildung und Forschung fördert das Verbundprojekt über "
        "{n} Monate; Koordinator ist {person}.",
    ],
}
EVENTS = ["BIO-Europe", "Nordic Life Science Days", "Medica", "Biotech Forum Nord", "ESGCT"]
ABROAD = ["Kobe", "Osaka", "Kopenhagen", "Boston", "Göteborg", "Basel", "Danzig"]
INVESTORS = ["Hanse Innovationsfonds", "Förde Ventures", "IB.SH", "Elbe Capital Partners"]
MONTHS = {
    "en": ["January", "March", "May", "June", "September", "October", "November"],
    "de": ["Januar", "März", "Mai", "Juni", "September", "Oktober", "November"],
}
READ_MORE = {"en": "Read the full press release", "de": "Zur vollständigen Pressemitteilung"}
BASE_DATE = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Item:
    title: str
    link: str
    guid: str
    published: datetime
    author: str
    category: str
    summary_html: str
    image: str | None


@dataclass(frozen=True)
class ServedFeed:
    """One feed as the server sends it: the bytes, both encodings, and its validators."""

    body: bytes
    gzipped: bytes
    content_type: str
    etag: str  # without quotes and without W/
    last_modified: datetime

    @property
    def last_modified_header(self) -> str:
        return format_datetime(self.last_modified, usegmt=True)


def _fill(template: str, rng: random.Random, language: str, org: tuple[str, str]) -> str:
    org2 = rng.choice([o for o in ORGS if o != org])
    return template.format(
        org=org[0],
        org2=org2[0],
        city=org[1],
        topic=rng.choice(TOPICS[language]),
        person=rng.choice(PEOPLE),
        n=rng.randint(2, 48),
        phase=rng.choice(["I", "II", "I/II"]),
        code=f"{org[0][:2].upper()}-{rng.randint(100, 9999)}",
        event=rng.choice(EVENTS),
        abroad=rng.choice(ABROAD),
        investor=rng.choice(INVESTORS),
        month=rng.choice(MONTHS[language]),
        year=rng.randint(2019, 2026),
    )


def _summary_html(rng: random.Random, language: str, org: tuple[str, str], link: str) -> str:
    """A teaser of about 600 characters of HTML, shaped like partners' press releases."""
    parts: list[str] = []
    for template in rng.sample(SENTENCES[language], k=len(SENTENCES[language])):
        if sum(map(len, parts)) >= 430:
            break
        sentence = escape(_fill(template, rng, language, org))
        parts.append(f"<p>{sentence.replace(org[0], f'<strong>{org[0]}</strong>', 1)}</p>")
    parts.append(f'<p><a href="{escape(link)}">{READ_MORE[language]}</a></p>')
    return "".join(parts)


def _feed_rng(index: int, settings: Settings) -> random.Random:
    return random.Random(f"{settings.seed}:{index}")


def feed_language(index: int, settings: Settings) -> str:
    """The language of feed ``index``: about half the partners write German, half English."""
    return "de" if _feed_rng(index, settings).random() < 0.5 else "en"


def generate_items(index: int, settings: Settings) -> tuple[str, str, str, list[Item]]:
    """Feed ``index``'s title, site, language and items, the same for the same seed."""
    rng = _feed_rng(index, settings)
    org = ORGS[index % len(ORGS)]
    language = "de" if rng.random() < 0.5 else "en"  # the draw feed_language makes
    site = f"https://partner-{index:03d}.example/"
    label = "Pressemitteilungen" if language == "de" else "News"
    title = f"{org[0]} – {label} (Partner {index:03d})"
    items = []
    when = BASE_DATE - timedelta(hours=rng.randint(0, 72))
    for k in range(settings.items):
        headline = _fill(rng.choice(TITLES[language]), rng, language, org)
        slug = f"{k:02d}-{hashlib.sha1(headline.encode()).hexdigest()[:10]}"
        link = f"{site}news/{slug}"
        items.append(
            Item(
                title=headline,
                link=link,
                guid=f"tag:partner-{index:03d}.example,2026:news-{k}",
                published=when,
                author=rng.choice(PEOPLE),
                category=rng.choice(TOPICS[language]),
                summary_html=_summary_html(rng, language, org, link),
                image=f"{site}media/{slug}.jpg" if k % 3 == 0 else None,
            )
        )
        when -= timedelta(hours=rng.randint(5, 60), minutes=rng.randint(0, 59))
    return title, site, language, items


def render_rss(title: str, site: str, language: str, items: list[Item]) -> bytes:
    out = [
        '<?xml version="1.0" encoding="utf-8"?>',
        '<rss version="2.0" xmlns:dc="http://purl.org/dc/elements/1.1/"><channel>',
        f"<title>{escape(title)}</title><link>{escape(site)}</link>",
        f"<description>{escape(title)}</description><language>{language}</language>",
    ]
    for item in items:
        out += [
            "<item>",
            f"<title>{escape(item.title)}</title>",
            f"<link>{escape(item.link)}</link>",
            f'<guid isPermaLink="false">{escape(item.guid)}</guid>',
            f"<pubDate>{format_datetime(item.published)}</pubDate>",
            f"<dc:creator>{escape(item.author)}</dc:creator>",
            f"<category>{escape(item.category)}</category>",
            f"<description>{escape(item.summary_html)}</description>",
        ]
        if item.image:
            out.append(f'<enclosure url={quoteattr(item.image)} type="image/jpeg" length="0"/>')
        out.append("</item>")
    out.append("</channel></rss>")
    return "\n".join(out).encode("utf-8")


def render_atom(title: str, site: str, language: str, items: list[Item]) -> bytes:
    updated = max(i.published for i in items).isoformat()
    out = [
        '<?xml version="1.0" encoding="utf-8"?>',
        f'<feed xmlns="http://www.w3.org/2005/Atom" xml:lang="{language}">',
        f"<title>{escape(title)}</title><id>{escape(site)}</id><updated>{updated}</updated>",
        f'<link rel="alternate" href={quoteattr(site)}/>',
    ]
    for item in items:
        out += [
            "<entry>",
            f"<title>{escape(item.title)}</title>",
            f'<link rel="alternate" type="text/html" href={quoteattr(item.link)}/>',
            f"<id>{escape(item.guid)}</id>",
            f"<published>{item.published.isoformat()}</published>",
            f"<updated>{item.published.isoformat()}</updated>",
            f"<author><name>{escape(item.author)}</name></author>",
            f"<category term={quoteattr(item.category)}/>",
            f'<summary type="html">{escape(item.summary_html)}</summary>',
        ]
        if item.image:
            out.append(f'<link rel="enclosure" type="image/jpeg" href={quoteattr(item.image)}/>')
        out.append("</entry>")
    out.append("</feed>")
    return "\n".join(out).encode("utf-8")


def generate_feed(index: int, settings: Settings) -> ServedFeed:
    """Feed ``index`` ready to serve: even indexes are RSS 2.0, odd ones Atom 1.0."""
    title, site, language, items = generate_items(index, settings)
    if index % 2 == 0:
        body, ctype = render_rss(title, site, language, items), "application/rss+xml"
    else:
        body, ctype = render_atom(title, site, language, items), "application/atom+xml"
    return ServedFeed(
        body=body,
        # Compressed once here: the server's own CPU should stay small and constant.
        gzipped=gzip.compress(body, compresslevel=6, mtime=0),
        content_type=f"{ctype}; charset=utf-8",
        etag=hashlib.sha256(body).hexdigest()[:24],
        last_modified=max(i.published for i in items),
    )


# -- the feed server --------------------------------------------------------------------


@dataclass
class ServerStats:
    """What the server saw; clients read it before and after each cycle as a check."""

    requests: int = 0
    status: Counter[int] = field(default_factory=Counter)
    gzip: int = 0
    bytes_sent: int = 0
    connections: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    def snapshot(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "requests": self.requests,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "gzip": self.gzip,
            "bytes_sent": self.bytes_sent,
            "connections": self.connections,
            "max_in_flight": self.max_in_flight,
            "cpu_s": usage.ru_utime + usage.ru_stime,
        }


def _accepts_gzip(value: str) -> bool:
    for part in value.lower().split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip() in ("gzip", "x-gzip", "*"):
            q = params.strip().removeprefix("q=")
            return not (params and q.replace(".", "", 1).isdigit() and float(q) == 0)
    return False


def _not_modified(feed: ServedFeed, headers: dict[str, str]) -> bool:
    """RFC 9110 §13.1: If-None-Match (weak comparison) wins over If-Modified-Since."""
    if "if-none-match" in headers:
        tags = [
            t.strip().removeprefix("W/").strip('"') for t in headers["if-none-match"].split(",")
        ]
        return "*" in tags or feed.etag in tags
    if "if-modified-since" in headers:
        try:
            since = parsedate_to_datetime(headers["if-modified-since"])
        except (TypeError, ValueError, IndexError):
            return False
        return since.tzinfo is not None and feed.last_modified <= since
    return False


class FeedServer:
    """An HTTP/1.1 server on asyncio streams: keep-alive, validators, gzip, latency.

    Hand-written rather than a framework so that its cost per request is small and
    known, and so that every request is counted exactly once.
    """

    def __init__(self, feeds: dict[tuple[str, str], ServedFeed], latency_s: float) -> None:
        self.feeds = feeds
        self.latency_s = latency_s
        self.stats = ServerStats()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = writer.get_extra_info("sockname")[0]
        self.stats.connections += 1
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT_S)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, version = [*lines[0].split(" ", 2), "", ""][:3]
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                keep_alive = headers.get("connection", "").lower() != "close" and (
                    version == "HTTP/1.1" or headers.get("connection", "").lower() == "keep-alive"
                )
                if target.startswith(CONTROL_PREFIX):
                    response = self._control(target)
                else:
                    response = await self._serve(method, address, target, headers, keep_alive)
                writer.write(response)
                await writer.drain()
                if not keep_alive:
                    return
        except ConnectionError:
            return
        finally:
            # Not awaiting wait_closed: at shutdown the loop cancels idle keep-alive
            # handlers, and a cancelled wait in a finally block is logged as an error.
            writer.close()

    async def _serve(
        self, method: str, address: str, target: str, headers: dict[str, str], keep_alive: bool
    ) -> bytes:
        stats = self.stats
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            # The partner's server is slow: the latency is waited, not computed, so
            # many requests can wait at once and only the client's limits serialize.
            await asyncio.sleep(self.latency_s)
        finally:
            stats.in_flight -= 1
        feed = self.feeds.get((address, target.split("?")[0]))
        extra = {"Connection": "keep-alive" if keep_alive else "close"}
        if method != "GET":
            return self._response(405, b"", "text/plain", extra | {"Allow": "GET"})
        if feed is None:
            return self._response(404, b"no such feed on this address\n", "text/plain", extra)
        use_gzip = _accepts_gzip(headers.get("accept-encoding", ""))
        validators = {
            # nginx's habit: a gzipped representation gets a weak ETag.
            "ETag": f'W/"{feed.etag}"' if use_gzip else f'"{feed.etag}"',
            "Last-Modified": feed.last_modified_header,
            "Vary": "Accept-Encoding",
        }
        if _not_modified(feed, headers):
            return self._response(304, b"", None, extra | validators)
        body = feed.gzipped if use_gzip else feed.body
        if use_gzip:
            validators["Content-Encoding"] = "gzip"
            stats.gzip += 1
        return self._response(200, body, feed.content_type, extra | validators)

    def _response(
        self, status: int, body: bytes, content_type: str | None, headers: dict[str, str]
    ) -> bytes:
        reason = {200: "OK", 304: "Not Modified", 404: "Not Found", 405: "Method Not Allowed"}
        lines = [
            f"HTTP/1.1 {status} {reason[status]}",
            f"Date: {formatdate(usegmt=True)}",
            "Server: clusterfeed-bench",
        ]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        if status != 304:
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        self.stats.requests += 1
        self.stats.status[status] += 1
        self.stats.bytes_sent += len(data)
        return data

    def _control(self, target: str) -> bytes:
        """``/_bench/stats[?reset_peak=1]``: the counters, without latency or counting."""
        snapshot = self.stats.snapshot()
        if "reset_peak=1" in target:
            self.stats.max_in_flight = self.stats.in_flight
        body = json.dumps(snapshot).encode()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        return head.encode() + body


async def _listen_everywhere(
    server: FeedServer, settings: Settings
) -> tuple[int, list[asyncio.Server]]:
    """One listening socket per loopback address, all on the same port.

    The port is chosen by the system for the first address; if another program holds
    it on a later address, everything is closed and a new port is tried.
    """
    addresses = [f"127.0.0.{FIRST_HOST + i}" for i in range(settings.hosts)]
    for _attempt in range(20):
        first = await asyncio.start_server(server.handle, addresses[0], 0, backlog=512)
        port = first.sockets[0].getsockname()[1]
        servers = [first]
        try:
            for address in addresses[1:]:
                servers.append(
                    await asyncio.start_server(server.handle, address, port, backlog=512)
                )
        except OSError:
            for s in servers:
                s.close()
            continue
        return port, servers
    raise OSError("no port was free on all loopback addresses")


def serve_feeds(conn: Connection, settings: Settings) -> None:
    """The server process: generate the feeds, listen, report the port, serve until told."""

    async def main() -> None:
        feeds = {
            (feed_address(i, settings), feed_path(i)): generate_feed(i, settings)
            for i in range(settings.feeds)
        }
        server = FeedServer(feeds, settings.latency_ms / 1000.0)
        port, servers = await _listen_everywhere(server, settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_message() -> None:
            # "stop", or end of file because the parent is gone: either way, stop.
            with contextlib.suppress(EOFError, OSError):
                conn.recv()
            stop.set()

        loop.add_reader(conn.fileno(), on_message)
        sizes = [len(f.body) for f in feeds.values()]
        gz = [len(f.gzipped) for f in feeds.values()]
        conn.send({"port": port, "body_bytes": statistics.mean(sizes), "gzip_bytes": gz})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SERVER_LIFETIME_S)
        for s in servers:
            s.close()

    asyncio.run(main())


@contextlib.contextmanager
def running_server(settings: Settings) -> Iterator[tuple[int, dict[str, Any]]]:
    """Start the server process, yield (port, facts about the feeds), stop it."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=serve_feeds, args=(child, settings), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(120):
            raise RuntimeError("the feed server did not start within 120 s")
        try:
            facts = parent.recv()
        except EOFError:
            raise RuntimeError("the feed server ended before it listened") from None
        yield facts["port"], facts
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        process.join(10)
        if process.is_alive():
            process.terminate()
            process.join(5)


def server_stats(control_url: str, *, reset_peak: bool = False) -> dict[str, Any]:
    url = control_url + ("?reset_peak=1" if reset_peak else "")
    with urllib.request.urlopen(url, timeout=10) as response:  # loopback only
        data: dict[str, Any] = json.load(response)
        return data


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the server did between two snapshots (the peak is reset, so taken as is)."""
    statuses = {
        k: after["status"].get(k, 0) - before["status"].get(k, 0)
        for k in after["status"]
        if after["status"].get(k, 0) - before["status"].get(k, 0)
    }
    return {
        "requests": after["requests"] - before["requests"],
        "status": statuses,
        "gzip": after["gzip"] - before["gzip"],
        "bytes_sent": after["bytes_sent"] - before["bytes_sent"],
        "connections": after["connections"] - before["connections"],
        "max_in_flight": after["max_in_flight"],
        "cpu_s": round(after["cpu_s"] - before["cpu_s"], 3),
    }


# -- measuring inside a client process --------------------------------------------------


def _descendants_cpu_and_peak() -> tuple[float, float]:
    """CPU seconds and the summed peak RSS (MB) of this process's live descendants.

    RUSAGE_CHILDREN only counts children that have ended and been waited for; a process
    pool that is still alive when a cycle ends would be missed, so live descendants
    are read from /proc (their own time plus that of their reaped children).
    """
    me = os.getpid()
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(entry)] = int(fields[1])
    found = {me}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    found.discard(me)
    ticks = os.sysconf("SC_CLK_TCK")
    cpu, peak = 0.0, 0.0
    for pid in found:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        # utime, stime, cutime, cstime are fields 14-17 of stat (11-14 after the name).
        cpu += sum(int(x) for x in fields[11:15]) / ticks
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak += int(line.split()[1]) / 1024
    return cpu, peak


def cpu_seconds() -> float:
    """User + system CPU of this process and every process it started, ended or not."""
    live, _ = _descendants_cpu_and_peak()
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + live


def peak_mb() -> tuple[float, float]:
    """(this process's peak RSS, the child processes' peak RSS), in MB.

    For the children it is the sum of the live ones' peaks (a pool's workers peak
    together while a cycle parses), or the largest ended one's if none is alive. Pages
    that forked workers share are counted in each, so it is an upper bound.
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    _, live = _descendants_cpu_and_peak()
    return own, live or reaped


@dataclass
class Cycle:
    wall_s: float
    cpu_s: float
    server: dict[str, Any]
    # CPU that neither the client nor the feed server used while the cycle ran: other
    # work on the machine, which competed with the client for the cores.
    others_cpu_s: float = 0.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class ClientRun:
    client: str
    version: str
    cycles: list[Cycle] = field(default_factory=list)
    peak_mb: float = 0.0
    child_peak_mb: float = 0.0
    checks: list[Check] = field(default_factory=list)
    profile: str | None = None


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent on anything but idling since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measure(control_url: str, work: Callable[[], T]) -> tuple[Cycle, T]:
    """Run one cycle, timing wall and CPU; the server's counters bracket it."""
    before = server_stats(control_url, reset_peak=True)
    busy0, cpu0, wall0 = machine_busy_seconds(), cpu_seconds(), time.perf_counter()
    value = work()
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    busy = machine_busy_seconds() - busy0
    after = server_stats(control_url, reset_peak=True)
    server = stats_delta(before, after)
    others = max(0.0, busy - cpu - server["cpu_s"])
    return Cycle(round(wall, 4), round(cpu, 4), server, round(others, 2)), value


def server_checks(run: ClientRun, feeds: int) -> None:
    """Every feed was asked once per cycle: 200 the first time, 304 the second."""
    for number, (cycle, status) in enumerate(zip(run.cycles, ("200", "304"), strict=True), 1):
        seen = cycle.server["status"]
        run.checks.append(
            Check(
                f"cycle {number}: server answered {feeds} x {status}",
                seen == {status: feeds},
                f"server saw {cycle.server['requests']} requests, statuses {seen}",
            )
        )


# -- client 1: clusterfeed --------------------------------------------------------------


def write_clusterfeed_config(
    folder: Path,
    urls: list[str],
    languages: list[str],
    concurrency: int,
    *,
    story_matching: bool = True,
) -> Path:
    """A complete config for the benchmark's feeds, as an operator would write it.

    ``story_matching=False`` writes ``[stories] match = false``, for measuring the fetch
    pipeline without the cross-partner matching that follows it.
    """

    def value(v: object) -> str:
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string

    lines = [
        "[cluster]",
        'name = "NordBio Cluster (benchmark)"',
        'url = "https://www.nordbio.example"',
        "",
        "[digest]",
        'from = "NordBio News <news@nordbio.example>"',
        "",
        "[fetch]",
        f"concurrency = {concurrency}",
        "",
        "[publish]",
        'output_dir = "public"',
        "",
        "[store]",
        f"url = {value('sqlite:///' + str(folder / 'store.sqlite3'))}",
        "",
        "[mail]",
        'transport = "maildir"',
        'maildir = "mail"',
        "",
    ]
    if not story_matching:
        lines += ["[stories]", "match = false", ""]
    for index, (url, language) in enumerate(zip(urls, languages, strict=True)):
        lines += [
            "[[feeds]]",
            f"name = {value(f'Partner {index:03d}')}",
            f"url = {value(url)}",
            f"language = {value(language)}",
            'topics = ["cluster"]',
            "",
        ]
    path = folder / "clusterfeed.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def table_fingerprint(database: Path, *tables: str) -> str:
    """A hash of every row of ``tables``, to show that a cycle changed nothing in them."""
    import sqlite3

    digest = hashlib.sha256()
    with contextlib.closing(sqlite3.connect(database)) as db:
        for table in tables:
            for row in db.execute(f"SELECT * FROM {table} ORDER BY id"):
                digest.update(repr(row).encode())
    return digest.hexdigest()


class ThreadProfiler:
    """cProfile over the main thread and every thread started while it runs, merged.

    cProfile sees only the thread that enabled it, and clusterfeed parses, stores and
    matches stories in ``asyncio.to_thread`` workers; ``threading.setprofile`` starts a
    profiler of their own in each new thread. The timer is each thread's CPU time, so
    waiting for the network, the GIL or a lock does not count. (It costs more than
    cProfile's default clock: a cycle runs about twice as long.) Work done in other
    processes (a process pool) is not seen.
    """

    def __init__(self) -> None:
        import threading

        self._local = threading.local()
        self._lock = threading.Lock()
        self.profiles: list[Any] = []

    def _mine(self) -> Any:
        import cProfile

        profile = getattr(self._local, "profile", None)
        if profile is None:
            profile = self._local.profile = cProfile.Profile(time.thread_time)
            with self._lock:
                self.profiles.append(profile)
        return profile

    def _start_in_thread(self, frame: Any, event: str, arg: Any) -> None:
        """The first profiling event of a new thread: hand the thread to cProfile."""
        sys.setprofile(None)
        self._mine().enable()

    def run(self, function: Callable[[], T]) -> T:
        import threading

        threading.setprofile(self._start_in_thread)
        main = self._mine()
        main.enable()
        try:
            return function()
        finally:
            main.disable()
            threading.setprofile(None)  # type: ignore[arg-type]

    def report(self, top: int) -> str:
        """The top functions by cumulative CPU; call it after the threads have ended."""
        import io
        import pstats

        out = io.StringIO()
        stats = pstats.Stats(self.profiles[0], stream=out)
        for profile in self.profiles[1:]:
            stats.add(profile)
        stats.strip_dirs().sort_stats("cumulative").print_stats(top)
        return out.getvalue()


def run_clusterfeed(manifest: dict[str, Any]) -> ClientRun:
    import logging

    import clusterfeed
    from clusterfeed.app.service import Service
    from clusterfeed.config import load_config
    from clusterfeed.store import Store

    logging.basicConfig(level=logging.WARNING, format="clusterfeed: %(levelname)s %(message)s")
    urls: list[str] = manifest["urls"]
    expected = len(urls) * manifest["items"]
    matching = "" if manifest.get("story_matching", True) else ", story matching off"
    run = ClientRun("clusterfeed", f"clusterfeed {clusterfeed.__version__}{matching}")
    with tempfile.TemporaryDirectory(prefix="clusterfeed-bench-") as tmp:
        folder = Path(tmp)
        config = load_config(
            write_clusterfeed_config(
                folder,
                urls,
                manifest["languages"],
                manifest["concurrency"],
                story_matching=manifest.get("story_matching", True),
            )
        )
        store = Store(config.database_url)
        service = Service(config, store)
        service.prepare()
        reports: list[str] = []

        def cycle() -> list[Any]:
            if not manifest.get("profile"):
                return asyncio.run(service.fetch())
            profiler = ThreadProfiler()
            try:
                return profiler.run(lambda: asyncio.run(service.fetch()))
            finally:
                reports.append(profiler.report(manifest["profile_top"]))

        cycle1, outcomes1 = measure(manifest["control"], cycle)
        stored1 = store.count_entries()
        database = folder / "store.sqlite3"
        before = table_fingerprint(database, "entries", "stories")
        cycle2, outcomes2 = measure(manifest["control"], cycle)
        after = table_fingerprint(database, "entries", "stories")
        stored2 = store.count_entries()
        run.peak_mb, run.child_peak_mb = (round(x, 1) for x in peak_mb())
        if reports:
            run.profile = "\n".join(
                f"--- cycle {n} ---\n{text.strip()}" for n, text in enumerate(reports, 1)
            )
        close = getattr(service, "close", None)  # stops a parsing pool, where there is one
        if close is not None:
            close()
        store.close()
    run.cycles = [cycle1, cycle2]
    new_entries = sum(o.new_entries for o in outcomes1)
    run.checks += [
        Check(
            "cycle 1: every entry stored",
            stored1 == expected and new_entries == expected,
            f"{stored1} entries in the store, {new_entries} reported new, {expected} served",
        ),
        Check(
            "cycle 1: no feed failed",
            not [o for o in outcomes1 if o.state == "failed"],
            f"states {dict(Counter(o.state for o in outcomes1))}",
        ),
        Check(
            "cycle 2: nothing changed",
            before == after
            and stored2 == stored1
            and all(o.state == "unchanged" for o in outcomes2),
            f"{stored2} entries, entries and stories tables "
            f"{'identical' if before == after else 'CHANGED'}, "
            f"states {dict(Counter(o.state for o in outcomes2))}",
        ),
    ]
    return run


# -- client 2: minimal ------------------------------------------------------------------


def run_minimal(manifest: dict[str, Any]) -> ClientRun:
    import feedparser
    import httpx
    from minimal_client import minimal_cycle  # bench/, the script's own folder

    urls: list[str] = manifest["urls"]
    expected = len(urls) * manifest["items"]
    run = ClientRun("minimal", f"httpx {httpx.__version__} + feedparser {feedparser.__version__}")
    validators: dict[str, tuple[str | None, str | None]] = {}
    concurrency = manifest["concurrency"]
    cycle1, (statuses1, entries1, bozo1) = measure(
        manifest["control"], lambda: asyncio.run(minimal_cycle(urls, concurrency, validators))
    )
    cycle2, (statuses2, entries2, _) = measure(
        manifest["control"], lambda: asyncio.run(minimal_cycle(urls, concurrency, validators))
    )
    run.cycles = [cycle1, cycle2]
    run.checks += [
        Check(
            "cycle 1: every entry parsed",
            entries1 == expected and bozo1 == 0 and statuses1 == Counter({200: len(urls)}),
            f"{entries1} entries parsed of {expected} served; {bozo1} feeds not well-formed; "
            f"client saw {dict(statuses1)}",
        ),
        Check(
            "cycle 2: every feed not modified",
            statuses2 == Counter({304: len(urls)}) and entries2 == 0,
            f"client saw {dict(statuses2)}",
        ),
    ]
    return run


# -- client 3: reader -------------------------------------------------------------------


def run_reader(manifest: dict[str, Any]) -> ClientRun:
    import reader as reader_lib
    from reader import make_reader

    urls: list[str] = manifest["urls"]
    expected = len(urls) * manifest["items"]
    run = ClientRun("reader", f"reader {reader_lib.__version__}")
    workers = manifest["concurrency"]
    with tempfile.TemporaryDirectory(prefix="reader-bench-") as tmp:
        library = make_reader(str(Path(tmp) / "reader.sqlite"))
        for url in urls:
            library.add_feed(url)

        def cycle() -> None:
            # scheduled=False: reader >= 3.13 otherwise skips feeds updated within their
            # update interval (an hour), and the second cycle would ask no server at all.
            library.update_feeds(workers=workers, scheduled=False)

        cycle1, _ = measure(manifest["control"], cycle)
        entries1 = library.get_entry_counts().total
        broken1 = library.get_feed_counts(broken=True).total
        cycle2, _ = measure(manifest["control"], cycle)
        entries2 = library.get_entry_counts().total
        broken2 = library.get_feed_counts(broken=True).total
        library.close()
    run.cycles = [cycle1, cycle2]
    run.checks += [
        Check(
            "cycle 1: every entry stored",
            entries1 == expected and broken1 == 0,
            f"{entries1} entries of {expected} served; {broken1} feeds broken",
        ),
        Check(
            "cycle 2: nothing changed",
            entries2 == entries1 and broken2 == 0,
            f"{entries2} entries; {broken2} feeds broken",
        ),
    ]
    return run


CLIENT_FUNCTIONS: dict[str, Callable[[dict[str, Any]], ClientRun]] = {
    "clusterfeed": run_clusterfeed,
    "minimal": run_minimal,
    "reader": run_reader,
}


def client_main(name: str, manifest_path: Path, result_path: Path) -> None:
    """Entry point of a client subprocess: run both cycles, write the figures as JSON."""
    manifest = json.loads(manifest_path.read_text())
    run = CLIENT_FUNCTIONS[name](manifest)
    if not run.peak_mb:  # a client that starts processes reads this before stopping them
        run.peak_mb, run.child_peak_mb = (round(x, 1) for x in peak_mb())
    server_checks(run, len(manifest["urls"]))
    result_path.write_text(json.dumps(asdict(run)))


# -- the orchestrating process ----------------------------------------------------------


def ensure_reader_venv() -> str | None:
    """Create bench/.venv-reader from requirements.txt if needed; None, or why not."""
    if READER_PYTHON.exists():
        probe = subprocess.run(
            [str(READER_PYTHON), "-c", "import reader, sgmllib"], capture_output=True, text=True
        )
        if probe.returncode == 0:
            return None
    print(f"installing reader into {READER_VENV.relative_to(REPO)} …", file=sys.stderr)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(READER_VENV)],
        [str(READER_PYTHON), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"installing reader failed ({' '.join(step[:3])} …): {tail[0]}"
    return None


def wait_for_quiet(limit_s: float, threshold: float = 0.15) -> float:
    """Wait (at most ``limit_s``) until the machine has been nearly idle for 5 s.

    Other work on the machine (a test suite, a build) takes cores from the client and
    inflates every figure; on a shared 2-core machine that is the largest source of
    noise. Returns the busy share of the cores in the last second seen.
    """
    cores = os.cpu_count() or 1
    deadline = time.monotonic() + limit_s
    quiet_for, told, share = 0, False, 0.0
    while True:
        busy0 = machine_busy_seconds()
        time.sleep(1.0)
        share = (machine_busy_seconds() - busy0) / cores
        quiet_for = quiet_for + 1 if share < threshold else 0
        if quiet_for >= 5 or time.monotonic() > deadline:
            return share
        if not told and share >= threshold:
            print(
                f"  the machine is busy ({share:.0%} of {cores} cores); waiting up to "
                f"{limit_s:.0f} s for it to be quiet …",
                file=sys.stderr,
                flush=True,
            )
            told = True


def disturbance(run: ClientRun) -> float:
    """The largest share of the cores that other processes used during one of the cycles."""
    cores = os.cpu_count() or 1
    return max(c.others_cpu_s / (c.wall_s * cores) for c in run.cycles if c.wall_s)


def measure_undisturbed(
    name: str, manifest: dict[str, Any], folder: Path, args: argparse.Namespace
) -> ClientRun:
    """Run one client; run it again (up to ``args.retries`` times) if other work interfered.

    Waiting for a quiet machine before a run is not enough where a test suite pauses
    between tests: the run that started in a pause is measured again. A client that
    crashes raises ClientFailed.
    """
    for attempt in range(args.retries + 1):
        if args.quiet_wait > 0:
            wait_for_quiet(args.quiet_wait)
        run = run_client(name, manifest, folder)
        c1, c2 = run.cycles
        failed = "".join(f"\n  CHECK FAILED: {c.name}: {c.detail}" for c in run.checks if not c.ok)
        print(
            f"  cycle 1 {c1.wall_s:.2f} s wall, {c1.cpu_s:.2f} s CPU; "
            f"cycle 2 {c2.wall_s:.2f} s wall, {c2.cpu_s:.2f} s CPU; peak {run.peak_mb:.0f} MB; "
            f"other processes used {c1.others_cpu_s:.1f} s / {c2.others_cpu_s:.1f} s CPU" + failed,
            file=sys.stderr,
            flush=True,
        )
        share = disturbance(run)
        if share <= DISTURBED_SHARE or attempt == args.retries:
            return run
        print(
            f"  other work took {share:.0%} of the cores during a cycle: measuring again",
            file=sys.stderr,
            flush=True,
        )
    raise AssertionError("unreachable")


class ClientFailed(Exception):
    """A client subprocess crashed or hung; the message has its last line of output."""


def run_client(name: str, manifest: dict[str, Any], folder: Path) -> ClientRun:
    """One client in a fresh subprocess: cold imports, its own memory peak."""
    python = str(READER_PYTHON) if name == "reader" else sys.executable
    manifest_path = folder / "manifest.json"
    manifest_path.write_text(json.dumps(manifest))
    result_path = folder / f"{name}.json"
    result_path.unlink(missing_ok=True)
    command = [python, str(Path(__file__).resolve()), "--client", name]
    command += ["--manifest", str(manifest_path), "--result", str(result_path)]
    timeout = manifest["timeout_s"]
    try:
        done = subprocess.run(
            command, timeout=timeout, cwd=folder, stderr=subprocess.PIPE, text=True
        )
    except subprocess.TimeoutExpired as exc:
        if exc.stderr:
            sys.stderr.write(exc.stderr if isinstance(exc.stderr, str) else exc.stderr.decode())
        raise ClientFailed(
            f"the {name} client did not finish its two cycles within {timeout:.0f} s "
            "(--timeout); it was stopped"
        ) from None
    sys.stderr.write(done.stderr)
    if done.returncode != 0 or not result_path.exists():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ClientFailed(f"the {name} client failed (exit code {done.returncode}): {last}")
    data = json.loads(result_path.read_text())
    return ClientRun(
        client=data["client"],
        version=data["version"],
        cycles=[Cycle(**c) for c in data["cycles"]],
        peak_mb=data["peak_mb"],
        child_peak_mb=data["child_peak_mb"],
        checks=[Check(**c) for c in data["checks"]],
        profile=data["profile"],
    )


@dataclass
class Summary:
    """The median of each figure over the repeats of one client."""

    client: str
    version: str
    runs: list[ClientRun]

    def median(self, figure: Callable[[ClientRun], float]) -> float:
        return statistics.median(figure(r) for r in self.runs)

    @property
    def c1_wall(self) -> float:
        return self.median(lambda r: r.cycles[0].wall_s)

    @property
    def c1_cpu(self) -> float:
        return self.median(lambda r: r.cycles[0].cpu_s)

    @property
    def c2_wall(self) -> float:
        return self.median(lambda r: r.cycles[1].wall_s)

    @property
    def c2_cpu(self) -> float:
        return self.median(lambda r: r.cycles[1].cpu_s)

    @property
    def peak(self) -> float:
        return self.median(lambda r: r.peak_mb)

    @property
    def child_peak(self) -> float:
        return self.median(lambda r: r.child_peak_mb)

    @property
    def failed_checks(self) -> list[tuple[int, Check]]:
        return [(i, c) for i, r in enumerate(self.runs, 1) for c in r.checks if not c.ok]


def results_table(summaries: list[Summary], settings: Settings) -> str:
    minimal = next((s for s in summaries if s.client == "minimal"), None)
    rows = [
        "| client | cycle 1 wall s | cycle 1 CPU s | cycle 2 wall s | CPU per 304 ms "
        "| peak MB | cycle 1 / minimal | cycle 2 / floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        ratio = f"{s.c1_wall / minimal.c1_wall:.2f}x" if minimal else "–"
        peak = f"{s.peak:.0f}"
        if s.child_peak:
            peak += f" + {s.child_peak:.0f} in child processes"
        rows.append(
            f"| {s.client} ({s.version}) | {s.c1_wall:.2f} | {s.c1_cpu:.2f} | {s.c2_wall:.2f} "
            f"| {1000 * s.c2_cpu / settings.feeds:.2f} | {peak} | {ratio} "
            f"| {s.c2_wall / settings.floor_s:.2f}x |"
        )
    return "\n".join(rows)


def runs_table(summaries: list[Summary]) -> str:
    rows = [
        "| client | run | cycle 1 wall s | cycle 1 CPU s | cycle 2 wall s | cycle 2 CPU s "
        "| peak MB | server CPU s (c1/c2) | other processes' CPU s (c1/c2) "
        "| connections (c1/c2) | max in flight (c1/c2) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        for i, r in enumerate(s.runs, 1):
            c1, c2 = r.cycles
            rows.append(
                f"| {s.client} | {i} | {c1.wall_s:.2f} | {c1.cpu_s:.2f} | {c2.wall_s:.2f} "
                f"| {c2.cpu_s:.2f} | {r.peak_mb:.0f} "
                f"| {c1.server['cpu_s']:.2f} / {c2.server['cpu_s']:.2f} "
                f"| {c1.others_cpu_s:.2f} / {c2.others_cpu_s:.2f} "
                f"| {c1.server['connections']} / {c2.server['connections']} "
                f"| {c1.server['max_in_flight']} / {c2.server['max_in_flight']} |"
            )
    return "\n".join(rows)


def goals_paragraph(summaries: list[Summary], settings: Settings) -> str:
    """The issue's goals for clusterfeed, each stated as met or not, with the numbers."""
    by_name = {s.client: s for s in summaries}
    ours, minimal = by_name.get("clusterfeed"), by_name.get("minimal")
    if ours is None:
        return "clusterfeed was not measured in this run, so no goal can be judged."
    verdict = {True: "**met**", False: "**not met**"}
    sentences = []
    if minimal is not None:
        ratio = ours.c1_wall / minimal.c1_wall
        sentences.append(
            f"Cycle 1 at most 1.0x the minimal client: {verdict[ratio <= 1.0]} "
            f"({ours.c1_wall:.2f} s against {minimal.c1_wall:.2f} s, {ratio:.2f}x; "
            f"CPU {ours.c1_cpu:.2f} s against {minimal.c1_cpu:.2f} s)."
        )
    limit = 1.1 * settings.floor_s
    per_304 = 1000 * ours.c2_cpu / settings.feeds
    sentences.append(
        f"All-304 cycle within 1.1x of the {settings.floor_s:.2f} s floor: "
        f"{verdict[ours.c2_wall <= limit]} ({ours.c2_wall:.2f} s, "
        f"{ours.c2_wall / settings.floor_s:.2f}x; the limit is {limit:.2f} s)."
    )
    sentences.append(
        f"Under 2 ms CPU per 304: {verdict[per_304 < 2.0]} ({per_304:.2f} ms, "
        f"{ours.c2_cpu:.2f} s for {settings.feeds} feeds)."
    )
    footprint = ours.peak + ours.child_peak
    worker_note = (
        f" the measuring process {ours.peak:.0f} MB plus {ours.child_peak:.0f} MB, the summed "
        "peaks of its child processes, which counts pages they share more than once;"
        if ours.child_peak
        else ""
    )
    sentences.append(
        f"Peak memory under 300 MB: {verdict[footprint < 300]} ({footprint:.0f} MB;"
        f"{worker_note} minimal client {minimal.peak if minimal else float('nan'):.0f} MB)."
    )
    reader = by_name.get("reader")
    if reader is not None and minimal is not None:
        sentences.append(
            f"For comparison, reader took {reader.c1_wall / minimal.c1_wall:.2f}x the minimal "
            f"client in cycle 1 and {reader.c2_wall:.2f} s for the all-304 cycle."
        )
    return " ".join(sentences)


def checks_text(summaries: list[Summary]) -> str:
    lines = []
    for s in summaries:
        failed = s.failed_checks
        first = s.runs[0]
        c1, c2 = first.cycles
        served = (
            f"server: cycle 1 {c1.server['status']} ({c1.server['gzip']} gzipped), "
            f"cycle 2 {c2.server['status']}"
        )
        if failed:
            bad = "; ".join(f"run {i}: {c.name}: {c.detail}" for i, c in failed)
            lines.append(f"- {s.client}: **FAILED** {bad}")
        else:
            details = "; ".join(c.detail for c in first.checks)
            lines.append(
                f"- {s.client}: all {len(first.checks)} checks passed in every run "
                f"({details}; {served})."
            )
    return "\n".join(lines)


def machine_facts() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line),
        platform.processor() or "unknown",
    )
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    os_name = platform.platform()
    with contextlib.suppress(OSError):
        release = Path("/etc/os-release").read_text()
        pretty = next((ln for ln in release.splitlines() if ln.startswith("PRETTY_NAME=")), "")
        if pretty:
            os_name = f"{pretty.split('=', 1)[1].strip(chr(34))}, kernel {platform.release()}"
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "os": os_name,
        "date": date,
        "git": git or "unknown",
    }


def report_markdown(
    summaries: list[Summary],
    settings: Settings,
    facts: dict[str, str],
    feed_facts: dict[str, Any],
    command: str,
    repeat: int,
    notes: list[str],
    profile: str | None,
    args_retries: int,
) -> str:
    gz = feed_facts["gzip_bytes"]
    parts = [
        f"## {facts['date']}",
        "",
        f"- Machine: {facts['cpu']}, {facts['cores']} cores, {facts['ram']} RAM; "
        f"{facts['os']}; Python {facts['python']}",
        f"- clusterfeed: git `{facts['git']}`",
        f"- Command: `{command}`",
        f"- Size: {settings.feeds} feeds x {settings.items} items (half RSS 2.0, half Atom; "
        f"{feed_facts['body_bytes'] / 1024:.1f} kB each, {statistics.mean(gz) / 1024:.1f} kB "
        f"gzipped), {settings.latency_ms:.0f} ms latency per request, global concurrency "
        f"{settings.concurrency}, {settings.hosts} loopback addresses; the floor of a cycle "
        f"is {settings.feeds} / {settings.concurrency} x {settings.latency_ms / 1000:g} s = "
        f"{settings.floor_s:.2f} s.",
        f"- Figures are the median of {repeat} run(s); each client runs in a fresh process "
        "with an empty database.",
        "",
        results_table(summaries, settings),
        "",
        goals_paragraph(summaries, settings),
        "",
    ]
    notes = list(notes)
    cores = int(facts["cores"]) if facts["cores"].isdigit() else 1
    busy = [
        (s.client, i, c.others_cpu_s / (c.wall_s * cores))
        for s in summaries
        for i, r in enumerate(s.runs, 1)
        for c in r.cycles
        if c.wall_s and c.others_cpu_s / (c.wall_s * cores) > DISTURBED_SHARE
    ]
    if busy:
        worst = max(share for _, _, share in busy)
        notes.append(
            f"other processes used more than {DISTURBED_SHARE:.0%} of the cores during "
            f"{len(busy)} measured cycle(s) (up to {worst:.0%}) even after "
            f"{args_retries} re-run(s); those figures are inflated (see the column in "
            "'Every run')."
        )
    parts += [f"Note: {n}" for n in notes]
    if notes:
        parts.append("")
    parts += ["Checks:", "", checks_text(summaries), ""]
    parts += ["<details><summary>Every run</summary>", "", runs_table(summaries), "", "</details>"]
    if profile:
        parts += [
            "",
            "<details><summary>Profile of clusterfeed's two cycles in an extra, untimed run "
            "(cProfile, per-thread CPU time, the main thread and every thread it started "
            "merged; work in child processes is not seen)</summary>",
            "",
            "```",
            profile.strip(),
            "```",
            "",
            "</details>",
        ]
    return "\n".join(parts) + "\n"


def write_results(section: str) -> None:
    """Append the run to RESULTS.md, newest last, so earlier runs stay comparable."""
    header = (
        "# Fetch benchmark results\n\n"
        "Written by `bench/fetch.py --write` (see `bench/README.md` for what is measured). "
        "Each run is appended; the newest is last.\n\n"
    )
    existing = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else header
    RESULTS.write_text(existing.rstrip("\n") + "\n\n" + section, encoding="utf-8")


def orchestrate(args: argparse.Namespace) -> int:
    settings = Settings(args.feeds, args.items, args.latency_ms, args.concurrency)
    clients = [c for c in args.clients.split(",") if c and (c != "reader" or not args.skip_reader)]
    notes = []
    if "reader" in clients:
        problem = ensure_reader_venv()
        if problem:
            print(f"reader skipped: {problem}", file=sys.stderr)
            notes.append(f"reader was not measured: {problem}")
            clients.remove("reader")
    elif args.skip_reader:
        notes.append("reader was not measured (--skip-reader).")
    runs: dict[str, list[ClientRun]] = {c: [] for c in clients}
    failures: list[str] = []
    profile = None
    whole = ""
    with (
        tempfile.TemporaryDirectory(prefix="fetch-bench-") as tmp,
        running_server(settings) as (port, feed_facts),
    ):
        urls = feed_urls(settings, port)
        manifest = {
            "urls": urls,
            "languages": [feed_language(i, settings) for i in range(settings.feeds)],
            "items": settings.items,
            "concurrency": settings.concurrency,
            "control": f"http://127.0.0.{FIRST_HOST}:{port}{CONTROL_PREFIX}stats",
            "story_matching": not args.no_story_matching,
            "timeout_s": args.timeout,
        }
        failed: set[str] = set()
        for repeat in range(1, args.repeat + 1):
            for name in clients:
                if name in failed:
                    continue  # a client that crashed or hung once is not tried again
                print(f"run {repeat}/{args.repeat}: {name} …", file=sys.stderr, flush=True)
                try:
                    runs[name].append(measure_undisturbed(name, manifest, Path(tmp), args))
                except ClientFailed as exc:
                    # Reported, not fatal: the other clients' figures are still worth having.
                    print(f"  FAILED: {exc}", file=sys.stderr, flush=True)
                    failures.append(f"run {repeat}: {exc}")
                    failed.add(name)
        if args.whole_rounds:
            whole = measure_whole(settings, manifest, Path(tmp), args)
        if args.profile and "clusterfeed" in clients and "clusterfeed" not in failed:
            print("profiling clusterfeed (an extra run, not timed) …", file=sys.stderr)
            try:
                profiled = run_client(
                    "clusterfeed",
                    manifest | {"profile": True, "profile_top": args.profile},
                    Path(tmp),
                )
                profile = profiled.profile
            except ClientFailed as exc:
                print(f"  FAILED: {exc}", file=sys.stderr, flush=True)
                notes.append(f"the profiling run failed: {exc}")
    notes += [f"**a client failed** in {failure}" for failure in failures]
    summaries = [Summary(c, runs[c][0].version, runs[c]) for c in clients if runs[c]]
    command = " ".join([".venv/bin/python", "bench/fetch.py", *sys.argv[1:]])
    section = report_markdown(
        summaries,
        settings,
        machine_facts(),
        feed_facts,
        command,
        args.repeat,
        notes,
        profile,
        args.retries,
    )
    if whole:
        section = section.rstrip("\n") + "\n\n" + whole
    print(section)
    if args.write:
        write_results(section)
        print(f"appended to {RESULTS.relative_to(REPO)}", file=sys.stderr)
    whole_failed = "check failed" in whole
    return 1 if failures or whole_failed or any(s.failed_checks for s in summaries) else 0


def measure_whole(
    settings: Settings, manifest: dict[str, Any], tmp: Path, args: argparse.Namespace
) -> str:
    """Time ``clusterfeed fetch`` as a whole process (see ``whole_command.py``)."""
    from whole_command import load_average, measure_whole_commands, whole_command_markdown

    folder = tmp / "whole-command"
    folder.mkdir(exist_ok=True)
    # The first cycle only fills the store (not timed): without story matching, which at
    # 15,000 new items takes minutes and leaves an unchanged cycle nothing to do.
    priming = write_clusterfeed_config(
        folder, manifest["urls"], manifest["languages"], settings.concurrency, story_matching=False
    ).rename(folder / "priming.toml")
    config = write_clusterfeed_config(
        folder,
        manifest["urls"],
        manifest["languages"],
        settings.concurrency,
        story_matching=not args.no_story_matching,
    )
    print(f"whole commands, {args.whole_rounds} rounds …", file=sys.stderr, flush=True)
    if args.quiet_wait > 0:
        wait_for_quiet(args.quiet_wait)
    before = load_average()
    timed, problems = measure_whole_commands(config, priming, manifest, folder, args.whole_rounds)
    return whole_command_markdown(timed, problems, settings.floor_s, (before, load_average()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure clusterfeed's fetch cycle against a minimal client and reader.",
    )
    parser.add_argument("--feeds", type=int, default=500, help="feeds to serve (500)")
    parser.add_argument("--items", type=int, default=30, help="items per feed (30)")
    parser.add_argument(
        "--latency-ms", type=float, default=100.0, help="latency per request, ms (100)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=20, help="global concurrency of every client (20)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs; figures are medians (3)")
    parser.add_argument("--skip-reader", action="store_true", help="do not measure reader")
    parser.add_argument(
        "--clients",
        default=",".join(CLIENTS),
        help=f"comma-separated clients to measure, in this order ({','.join(CLIENTS)})",
    )
    parser.add_argument(
        "--no-story-matching",
        action="store_true",
        help="run clusterfeed with [stories] match = false: fetch, parse, normalize and "
        "store only, without joining items of different partners into stories",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="S",
        help="stop a client that has not finished its two cycles after S seconds, report "
        "it as failed and do not run it again (900)",
    )
    parser.add_argument("--write", action="store_true", help="append the results to RESULTS.md")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=600.0,
        metavar="S",
        help="before each client, wait up to S seconds for other work on the machine to "
        "stop (600; 0 = do not wait)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        metavar="N",
        help="measure a client again, up to N times, when other processes used more than "
        f"{DISTURBED_SHARE:.0%}% of the cores during its cycles (3)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        nargs="?",
        const=25,
        default=0,
        metavar="N",
        help="also profile clusterfeed's two cycles (an extra run, not counted) and show "
        "the top N functions by cumulative CPU (25)",
    )
    parser.add_argument(
        "--whole-rounds",
        type=int,
        default=5,
        metavar="N",
        help="also time N unchanged cycles of the whole `clusterfeed fetch` command and of "
        "the minimal client as processes, with their start-up (5; 0 = do not)",
    )
    # Internal: how the orchestrator starts a client subprocess.
    parser.add_argument("--client", choices=sorted(CLIENT_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.feeds < 1 or args.items < 1 or args.concurrency < 1 or args.repeat < 1:
        parser.error("--feeds, --items, --concurrency and --repeat must be at least 1")
    unknown = set(args.clients.split(",")) - {*CLIENTS, ""}  # "" measures no client
    if unknown:
        parser.error(f"unknown client(s) {', '.join(sorted(unknown))}; choose from {CLIENTS}")
    return args


def main() -> int:
    args = parse_args()
    if args.client:
        client_main(args.client, args.manifest, args.result)
        return 0
    if args.concurrency > 100:
        print("clusterfeed's fetch.concurrency is at most 100", file=sys.stderr)
        return 2
    if shutil.which("date") is None:
        print("`date` is needed for the report", file=sys.stderr)
        return 2
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
