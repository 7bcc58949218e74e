"""Shared fixtures: real servers on 127.0.0.1, real databases, a config in a temp folder.

Nothing of clusterfeed's own boundaries is mocked: feeds come from a real HTTP server,
mail goes to a real SMTP server (aiosmtpd), state lives in a real SQLite file, and in
a real PostgreSQL database when CLUSTERFEED_TEST_DATABASE_URL names one.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import Envelope, Session
from hypothesis import settings

# No test may depend on the machine's speed: hypothesis's default deadline (200 ms per
# example) failed a property test whenever the CI machine was busy. Speed goals live in
# bench/, so the whole suite runs without deadlines. HYPOTHESIS_PROFILE picks another
# registered profile for a local run.
settings.register_profile("clusterfeed", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "clusterfeed"))

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_FEEDS = REPO / "config" / "example-feeds"
TEMPLATES = REPO / "templates"
DATA = Path(__file__).resolve().parent / "data"
# Real third-party clients (feed validator, SpamAssassin, ...) that this machine's kind
# provides beside the project; tests that use them skip where it is absent.
REALCLIENTS = REPO.parent / "shared" / "realclients"


# -- time -------------------------------------------------------------------------------

TEST_NOW = datetime(2026, 11, 26, 7, 0, tzinfo=UTC)


@dataclass
class Clock:
    """A clock the test moves by hand; the service never reads the real time."""

    now: datetime = TEST_NOW

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta | None = None, minutes: int = 30) -> None:
        self.now += delta if delta is not None else timedelta(minutes=minutes)


@pytest.fixture
def clock() -> Clock:
    return Clock()


# -- HTTP ---------------------------------------------------------------------------


@dataclass
class Route:
    body: bytes
    content_type: str = "application/xml"
    status: int = 200
    etag: bool = True
    last_modified: bool = True
    gzip: bool = False
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class SeenRequest:
    path: str
    headers: dict[str, str]


class FeedServer:
    """A real HTTP server whose routes a test can change while it runs.

    ``host`` is any loopback address (127.0.0.2 and up work on Linux without set-up).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[SeenRequest] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                with server._lock:
                    server.requests.append(
                        SeenRequest(self.path, {k.lower(): v for k, v in self.headers.items()})
                    )
                    route = server.routes.get(self.path)
                if route is None:
                    self._send(404, b"not found", "text/plain", {})
                    return
                if route.delay:
                    time.sleep(route.delay)
                headers = dict(route.headers)
                tag = '"' + hashlib.sha256(route.body).hexdigest()[:20] + '"'
                if route.etag:
                    headers["ETag"] = tag
                if route.last_modified:
                    headers["Last-Modified"] = formatdate(1_790_000_000, usegmt=True)
                if route.status == 200 and route.etag and self.headers.get("If-None-Match") == tag:
                    self._send(304, b"", None, headers)
                    return
                body = route.body
                if route.gzip and "gzip" in self.headers.get("Accept-Encoding", ""):
                    body = gzip.compress(body)
                    headers["Content-Encoding"] = "gzip"
                self._send(route.status, body, route.content_type, headers)

            def _send(
                self, status: int, body: bytes, ctype: str | None, headers: dict[str, str]
            ) -> None:
                self.send_response(status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body:
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        self.wfile.write(body)

        self.host = host
        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def serve_file(self, path: str, file: Path, **kwargs: Any) -> str:
        self.routes[path] = Route(file.read_bytes(), **kwargs)
        return self.url(path)

    def requests_for(self, path: str) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def feed_server() -> Iterator[FeedServer]:
    server = FeedServer()
    try:
        yield server
    finally:
        server.close()


# -- SMTP ---------------------------------------------------------------------------


class RecordingHandler:
    """An aiosmtpd handler that keeps every accepted message.

    ``rcpt_replies`` / ``data_replies`` are queues of SMTP replies to give instead of
    accepting, so a test can make the server answer 4xx or 5xx.
    """

    def __init__(self) -> None:
        self.messages: list[Envelope] = []
        self.rcpt_replies: list[str] = []
        self.data_replies: list[str] = []
        self.connections = 0

    async def handle_RCPT(
        self,
        server: SMTPProtocol,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        if self.rcpt_replies:
            return self.rcpt_replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        if self.data_replies:
            return self.data_replies.pop(0)
        self.messages.append(envelope)
        return "250 Message accepted for delivery"


@dataclass
class SmtpServer:
    host: str
    port: int
    handler: RecordingHandler


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    handler = RecordingHandler()
    # aiosmtpd's Controller checks that it started by connecting to the port it was
    # given, so port=0 ("any free port") fails with "connection refused": ask the
    # system for a free port first.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield SmtpServer("127.0.0.1", port, handler)
    finally:
        controller.stop()


# -- databases ------------------------------------------------------------------------


def _postgres_url() -> str | None:
    return os.environ.get("CLUSTERFEED_TEST_DATABASE_URL") or None


DATABASES = ["sqlite", *(["postgresql"] if _postgres_url() else [])]


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new schema in the test PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite3'}"
        return
    base = _postgres_url()
    assert base is not None
    with postgres_schema(base, "t") as url:
        yield url


@contextlib.contextmanager
def postgres_schema(base: str, prefix: str) -> Iterator[str]:
    """A new schema in the PostgreSQL at ``base``, as a database URL whose connections
    work in it; dropped afterwards with everything in it."""
    import sqlalchemy

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# -- configs --------------------------------------------------------------------------


def write_config(
    folder: Path,
    feeds: list[dict[str, Any]],
    *,
    database_url: str | None = None,
    mail: dict[str, Any] | None = None,
    subscribers: list[dict[str, Any]] | None = None,
    extra: str = "",
) -> Path:
    """Write a complete config into ``folder`` and return its path."""
    import json

    def toml_value(v: Any) -> str:
        return json.dumps(v, ensure_ascii=False)

    lines = [
        "[cluster]",
        'name = "NordBio Cluster"',
        'url = "https://www.nordbio.example"',
        'imprint = ["NordBio Cluster Management GmbH", "Hafenstraße 12, 20457 Hamburg"]',
        'contact = "presse@nordbio.example"',
        "",
        "[publish]",
        'output_dir = "public"',
        'feed_url = "https://news.nordbio.example/feed.atom"',
        "max_entries = 100",
        "",
        "[digest]",
        f"templates_dir = {toml_value(str(TEMPLATES))}",
        'from = "NordBio News <news@nordbio.example>"',
        'reply_to = "presse@nordbio.example"',
        "max_stories = 100",
        "",
        "[web]",
        'base_url = "https://news.nordbio.example"',
        "",
        "[mail]",
    ]
    for k, v in (mail or {"transport": "maildir", "maildir": "mail"}).items():
        lines.append(f"{k} = {toml_value(v)}")
    lines += ["", "[store]", f"url = {toml_value(database_url or 'sqlite:///state.sqlite3')}", ""]
    for feed in feeds:
        lines.append("[[feeds]]")
        for k, v in feed.items():
            lines.append(f"{k} = {toml_value(v)}")
        lines.append("")
    for sub in subscribers or [{"email": "reader@example.org", "name": "Rita Reader"}]:
        lines.append("[[subscribers]]")
        for k, v in sub.items():
            lines.append(f"{k} = {toml_value(v)}")
        lines.append("")
    lines.append(extra)
    path = folder / "clusterfeed.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# The bundled example's 47 items form 36 stories by its answer key
# (config/example-feeds/README.md). The matcher makes 36, but not the right ones: it
# joins A, B, D, E and F and keeps newsletter issues apart (clusterfeed.stories.kinds),
# leaves Biotech Campus Lübeck's version of C (the EU approval) on its own, and still
# joins the Summit programme with KristallWerk's "meet us at the Summit". Known and
# open (issue 15): this constant says what the pipeline stores today, not what is right.
EXAMPLE_STORIES = 36

EXAMPLE_FEED_META = [
    ("NordBio Cluster", "nordbio-en.atom", "en", ["cluster"]),
    ("NordBio Cluster (Deutsch)", "nordbio-de.rss", "de", ["cluster"]),
    ("Helix Vektor", "helix-vektor.rss", "en", ["gene-therapy"]),
    ("Hanse Innovationsfonds", "hanse-innovationsfonds.rss", "de", ["financing"]),
    ("KristallWerk Discovery", "kristallwerk.atom", "en", ["drug-discovery"]),
    ("Elbmed Pharma", "elbmed-pharma.atom", "de", ["drug-discovery"]),
    ("Universitätsklinikum Förde", "uk-foerde.rdf", "de", ["research"]),
    ("Kansai Bio Frontier", "kansai-bio.rss", "ja", ["international"]),
    ("Biotech Campus Lübeck", "biotech-luebeck.rss", "en", ["research", "medtech"]),
]


def served_example_feeds(server: FeedServer) -> list[dict[str, Any]]:
    """The bundled example feeds, each served over HTTP by ``server``."""
    feeds = []
    for name, file, language, topics in EXAMPLE_FEED_META:
        ctype = "application/atom+xml" if file.endswith(".atom") else "application/rss+xml"
        if file.endswith(".rdf"):
            ctype = "application/rdf+xml"
        url = server.serve_file(f"/feeds/{file}", EXAMPLE_FEEDS / file, content_type=ctype)
        feeds.append({"name": name, "url": url, "language": language, "topics": topics})
    return feeds


@pytest.fixture
def example_config(tmp_path: Path, feed_server: FeedServer, database_url: str) -> Path:
    """The example partner feeds served over real HTTP, mail into a Maildir, a fresh store."""
    return write_config(tmp_path, served_example_feeds(feed_server), database_url=database_url)


@pytest.fixture
def example_copy(tmp_path: Path) -> Path:
    """A copy of the bundled config folder and templates, as an operator would make it."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    shutil.copytree(REPO / "templates", tmp_path / "templates")
    return tmp_path / "config" / "example.toml"


# -- running the command line; building small feeds --------------------------------------


@pytest.fixture
def run_cli() -> Iterator[Any]:
    """``run_cli("digest", "--config", path)`` runs the real ``clusterfeed`` command in-process.

    click's CliRunner captures stdout and stderr apart (``result.stdout``,
    ``result.stderr``). The command points the root logger at the runner's stream; the
    logging set-up is put back afterwards so later tests do not log into a closed stream.
    """
    import logging

    from click.testing import CliRunner, Result

    from clusterfeed.cli import main

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level

    def invoke(*args: str | Path, env: dict[str, str] | None = None) -> Result:
        try:
            return CliRunner().invoke(main, [str(a) for a in args], env=env)
        finally:
            root.handlers[:] = saved_handlers
            root.setLevel(saved_level)

    yield invoke
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


@pytest.fixture
def rss_feed() -> Any:
    """``rss_feed(title, items)`` returns the bytes of an RSS 2.0 feed.

    Each item is a dict with ``title`` and ``link`` and optionally ``guid``,
    ``description`` (HTML, escaped here), ``date`` (RFC 822), ``image`` (an image
    enclosure URL) and ``raw_title`` (put into the XML as it is, for entities such as
    ``&#13;&#10;``).
    """
    from xml.sax.saxutils import escape

    def build(
        title: str, items: list[dict[str, str]], link: str = "https://partner.example/"
    ) -> bytes:
        parts = [
            '<?xml version="1.0" encoding="utf-8"?>',
            '<rss version="2.0"><channel>',
            f"<title>{escape(title)}</title><link>{escape(link)}</link>",
            "<description>Partner news</description>",
        ]
        for item in items:
            parts.append("<item>")
            parts.append(f"<title>{item.get('raw_title') or escape(item['title'])}</title>")
            parts.append(f"<link>{escape(item['link'])}</link>")
            parts.append(f"<guid>{escape(item.get('guid', item['link']))}</guid>")
            date = item.get("date", "Fri, 20 Nov 2026 09:30:00 +0000")
            parts.append(f"<pubDate>{date}</pubDate>")
            if item.get("description"):
                parts.append(f"<description>{escape(item['description'])}</description>")
            if item.get("image"):
                url = escape(item["image"], {'"': "&quot;"})
                parts.append(f'<enclosure url="{url}" type="image/jpeg" length="0"/>')
            parts.append("</item>")
        parts.append("</channel></rss>")
        return "\n".join(parts).encode("utf-8")

    return build


# -- reading a received digest ------------------------------------------------------------


def mail_text(msg: EmailMessage) -> str:
    """A mail's plain-text part; stored as on the wire (CRLF), shown as plain lines."""
    part = msg.get_body(("plain",))
    assert part is not None
    return part.get_content().replace("\r\n", "\n")


def mail_html(msg: EmailMessage) -> str:
    part = msg.get_body(("html",))
    assert part is not None
    return part.get_content()


def digest_titles(msg: EmailMessage) -> set[str]:
    """The story titles of a digest, read from its plain-text part ("* Title" lines)."""
    return set(re.findall(r"^\* (.+)$", mail_text(msg), flags=re.M))


@pytest.fixture
def open_service(clock: Clock) -> Iterator[Any]:
    """``open_service(config_path)``: a prepared Service on that config, with the test's
    clock; every store it opened is closed after the test."""
    from clusterfeed.app.service import Service
    from clusterfeed.config import load_config
    from clusterfeed.store import Store

    stores: list[Store] = []

    def open_(config_path: Path) -> Service:
        config = load_config(config_path)
        store = Store(config.database_url)
        stores.append(store)
        service = Service(config, store, clock=clock)
        service.prepare()
        return service

    yield open_
    for store in stores:
        store.close()


# -- a database that refuses writes ----------------------------------------------------


def refuse_inserts(store: Any, table: str, message: str) -> None:
    """A real database error on every insert into ``table`` (a full disk, say)."""
    with store.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(
                f"CREATE TRIGGER refuse BEFORE INSERT ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger AS "
                f"$$ BEGIN RAISE EXCEPTION '{message}'; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                f"CREATE TRIGGER refuse BEFORE INSERT ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION refuse()"
            )


def allow_inserts(store: Any, table: str) -> None:
    with store.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER refuse")
        else:
            conn.exec_driver_sql(f"DROP TRIGGER refuse ON {table}")
            conn.exec_driver_sql("DROP FUNCTION refuse()")


# -- the web app over real HTTP --------------------------------------------------------


class RunningServer:
    """The web app (``web.make_server``) in a thread, on a free port of 127.0.0.1."""

    def __init__(self, service: Any) -> None:
        from clusterfeed.web.server import make_server

        self.server = make_server(service, "127.0.0.1", 0)
        self.server.config.install_signal_handlers = False
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the web server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.base + path, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def web(service: Any) -> Iterator[RunningServer]:
    """``clusterfeed serve``'s server on 127.0.0.1 for the test module's ``service``."""
    running = RunningServer(service)
    yield running
    running.stop()
