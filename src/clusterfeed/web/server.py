"""The web side: published files served fast and cache-friendly, health and metrics.

Feed readers poll the combined feed every few minutes, thousands of them, most with
the ETag they got last time. So the answer to a poll is decided from a small in-memory
cache keyed by the file's modification time and size: a matching If-None-Match gets a
304 after one ``stat`` call, without reading or building anything, and a changed file
is read, hashed and compressed once, then served from memory until it changes again.
The files themselves are written by ``publish`` (atomically), so the same folder also
works behind any static web server.

Starlette is the ASGI toolkit (small, typed, maintained) and uvicorn the server.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any

from lxml import etree  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from clusterfeed.app.service import Service
from clusterfeed.app.workers import TASKS
from clusterfeed.web import signup
from clusterfeed.web.proxies import ForwardedClient, networks
from clusterfeed.web.webguard import LocalRedirectsOnly, PathTooLong, clean_path, local_location

CONTENT_TYPES = {
    ".atom": "application/atom+xml; charset=utf-8",
    ".rss": "application/rss+xml; charset=utf-8",
    ".json": "application/feed+json; charset=utf-8",
    ".opml": "text/x-opml; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".xml": "application/xml; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


class _Counter:
    """How many times a published file was read from disk (for tests and metrics)."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.value += 1


READS = _Counter()

# Feeds change at most once a fetch cycle; a reader polling more often is answered by
# its own cache. Archive pages that are complete never change, nor does a sent
# digest's web version (digests/<date>.html; the list of them, digests/, does).
FEED_MAX_AGE = 300
ARCHIVE_MAX_AGE = 86400


def max_age(path: str, body: bytes = b"") -> int:
    """How long a client may keep a published file without asking again.

    Only a complete archive page is kept long: the newest one still takes the stories
    that drop out of the feed, so it is cached like the feed. A page is complete when
    it links to a next one (RFC 5005 ``next-archive``), which is what ``body`` shows.
    """
    path = path.strip("/")
    if path.startswith("archive/"):
        return ARCHIVE_MAX_AGE if links_next_archive(body) else FEED_MAX_AGE
    if path.startswith("digests/") and path.endswith(".html") and path != "digests/index.html":
        return ARCHIVE_MAX_AGE
    return FEED_MAX_AGE


_ATOM_LINK = "{http://www.w3.org/2005/Atom}link"


def links_next_archive(body: bytes) -> bool:
    """Whether an Atom document links to a later archive page (so is a complete one)."""
    try:
        root = etree.fromstring(body, etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError:
        return False
    return any(link.get("rel") == "next-archive" for link in root.iterchildren(_ATOM_LINK))


@dataclass
class CachedFile:
    """One published file as it is served: bytes, validators and compressed forms."""

    body: bytes
    etag: str
    last_modified: datetime
    signature: tuple[int, int]
    content_type: str
    folder_index: bool = False  # an index.html, served for its folder's URL
    max_age: int = FEED_MAX_AGE  # see max_age(): decided once per version of the file
    _encoded: dict[str, bytes] = field(default_factory=dict)
    _validators: list[tuple[bytes, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The header values every answer repeats, encoded once per version of the file.
        http_date = format_datetime(self.last_modified, usegmt=True)
        self._validators = [
            (b"etag", self.etag.encode("ascii")),
            (b"last-modified", http_date.encode("ascii")),
        ]

    def encoded(self, coding: str) -> bytes:
        """The body compressed with ``coding``, computed once per version of the file."""
        if coding not in self._encoded:
            if coding == "br":
                import brotli

                self._encoded[coding] = brotli.compress(self.body, quality=5)
            else:
                self._encoded[coding] = gzip.compress(self.body, compresslevel=6, mtime=0)
        return self._encoded[coding]


class FileCache:
    """Published files by path, re-read only when their mtime or size changes."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._files: dict[str, CachedFile] = {}
        self._lock = threading.Lock()
        # URL path → file, for paths that led to a published file: resolving a path
        # (symlinks, "..", folders) costs a system call per path component, and a
        # poll should cost one stat. Bounded, so made-up paths cannot grow it.
        self._paths: dict[str, Path] = {}

    def resolve(self, relative: str) -> Path | None:
        """The file for a URL path in normal form (``webguard.clean_path``), never
        outside the published folder; None for any other path."""
        if clean_path(relative) is None:
            return None
        folder = relative.endswith("/")
        relative = relative.strip("/") or "index.html"
        try:
            candidate = (self.root / relative).resolve()
            if not candidate.is_relative_to(self.root):
                return None
            if candidate.is_dir():
                candidate = candidate / "index.html"
            elif folder:  # "feed.atom/" names a folder, and there is none
                return None
        except OSError:  # a name the file system refuses (too long, ...) is not ours
            return None
        return candidate

    def get(self, relative: str) -> CachedFile | None:
        """The published file at a URL path (without its leading ``/``), or None.

        ``PathTooLong`` for a path longer than any published file's.
        """
        path = self._paths.get(relative) or self.resolve(relative)
        if path is None:
            return None
        try:
            stat = os.stat(path)
        except OSError:
            self._paths.pop(relative, None)
            return None
        if relative not in self._paths and len(self._paths) < 10_000:
            self._paths[relative] = path
        signature = (stat.st_mtime_ns, stat.st_size)
        key = str(path)
        cached = self._files.get(key)
        if cached is not None and cached.signature == signature:
            return cached
        body = path.read_bytes()
        READS.add()
        fresh = CachedFile(
            body=body,
            etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"',
            last_modified=datetime.fromtimestamp(stat.st_mtime, UTC).replace(microsecond=0),
            signature=signature,
            content_type=CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
            folder_index=path.name == "index.html",
            max_age=max_age(path.relative_to(self.root).as_posix(), body),
        )
        with self._lock:
            self._files[key] = fresh
        return fresh


def _accepted_codings(header: str) -> dict[str, float]:
    codings: dict[str, float] = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        if name:
            codings[name.strip().lower()] = q
    return codings


def choose_coding(accept_encoding: str) -> str | None:
    """br when the client asks for it, else gzip, else none (q=0 means "not this")."""
    codings = _accepted_codings(accept_encoding)
    for coding in ("br", "gzip"):
        q = codings.get(coding, codings.get("*", 0.0) if coding == "gzip" else 0.0)
        if q > 0:
            return coding
    return None


def _not_modified(headers: Mapping[str, str], file: CachedFile) -> bool:
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
        return "*" in tags or file.etag in tags
    since = headers.get("if-modified-since")
    if since:
        try:
            when = parsedate_to_datetime(since)
        except (TypeError, ValueError, IndexError):
            return False
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return file.last_modified <= when
    return False


_CACHE_CONTROL = {age: f"public, max-age={age}".encode() for age in (FEED_MAX_AGE, ARCHIVE_MAX_AGE)}
_VARY = (b"vary", b"Accept-Encoding")


def file_answer(
    method: str, headers: Mapping[str, str], file: CachedFile, path: str
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body for a published file: 304, or 200 (compressed if asked)."""
    out = [*file._validators, (b"cache-control", _CACHE_CONTROL[file.max_age]), _VARY]
    if _not_modified(headers, file):
        return 304, out, b""
    body = file.body
    coding = choose_coding(headers.get("accept-encoding", ""))
    if coding and len(body) > 512:
        body = file.encoded(coding)
        out.append((b"content-encoding", coding.encode("ascii")))
    out.append((b"content-type", file.content_type.encode("ascii")))
    out.append((b"content-length", str(len(body)).encode("ascii")))
    return 200, out, b"" if method == "HEAD" else body


def file_response(request: Request, file: CachedFile, path: str) -> Response:
    status, headers, body = file_answer(request.method, request.headers, file, path)
    response = Response(body, status_code=status)
    response.raw_headers = headers
    return response


_WANTED = (b"if-none-match", b"if-modified-since", b"accept-encoding")


class PublishedFiles:
    """ASGI: a GET or HEAD for a published file is answered here, all else by ``app``.

    Polls of the feed are nearly all this server does, so they skip the framework's
    routing, request and response objects and are answered from ``FileCache`` with
    prepared header values: about a third of the CPU per poll it took through Starlette
    (bench/serve.py: 30 instead of 98 µs). Only existing files
    are answered here, so the app's own routes (``/healthz``, ``/metrics``, subscriber
    pages) and everything else (404s, the redirect of a folder without its slash) stay
    with it: the published folder holds feeds and pages, never such names.
    """

    def __init__(self, app: Starlette, cache: FileCache) -> None:
        self.app = app
        self.cache = cache

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path = scope["path"][1:]  # one "/": "//feed.atom" is not a normal path
            try:
                file = self.cache.get(path)
            except PathTooLong:
                file = None  # the app answers it
            if file is not None and not (
                file.folder_index and path and not path.endswith(("/", "index.html"))
            ):
                wanted = {
                    name.decode("latin-1"): value.decode("latin-1")
                    for name, value in scope["headers"]
                    if name in _WANTED
                }
                status, headers, body = file_answer(scope["method"], wanted, file, path)
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class StoreCollector(Collector):
    """Prometheus metrics read from the store at scrape time (nothing to keep in sync)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        store = self.service.queries  # read through the service, never the store
        statuses = store.feed_statuses(self.service.clock())
        feeds = GaugeMetricFamily("clusterfeed_feeds", "Feeds by state", labels=["state"])
        for state in ("new", "ok", "failing", "gone"):
            feeds.add_metric([state], sum(1 for s in statuses if s.state == state))
        yield feeds
        yield GaugeMetricFamily(
            "clusterfeed_items", "Partner items stored", value=store.count_entries()
        )
        yield GaugeMetricFamily(
            "clusterfeed_stories", "Stories stored", value=store.count_stories()
        )
        deliveries = GaugeMetricFamily(
            "clusterfeed_deliveries", "Digest deliveries by state", labels=["state"]
        )
        counts = store.delivery_counts()
        for state in ("pending", "sending", "sent", "failed"):
            deliveries.add_metric([state], counts.get(state, 0))
        yield deliveries
        feed_file = self.service.feed_path()
        published = feed_file.stat().st_mtime if feed_file.exists() else 0.0
        yield GaugeMetricFamily(
            "clusterfeed_last_publish_timestamp_seconds",
            "When the combined feed last changed (Unix time)",
            value=published,
        )
        last_fetch = max((s.last_success_at for s in statuses if s.last_success_at), default=None)
        yield GaugeMetricFamily(
            "clusterfeed_last_successful_fetch_timestamp_seconds",
            "When a feed was last fetched successfully (Unix time)",
            value=last_fetch.timestamp() if last_fetch else 0.0,
        )
        yield from self._task_queue()

    def _task_queue(self) -> Iterator[GaugeMetricFamily]:
        """The workers' queue per unit, where there is one (PostgreSQL, and a worker or
        the scheduler has started): absent on SQLite, where `run` does the work in one
        process and there is no queue to measure, rather than a misleading 0."""
        queue = self.service.queries.task_queue()
        if queue is None:
            return
        found = {q.task: q for q in queue}
        names = [*TASKS, *sorted(set(found) - set(TASKS))]
        jobs = GaugeMetricFamily(
            "clusterfeed_tasks", "Worker tasks queued (todo) and running (doing), by unit",
            labels=["task", "state"],
        )  # fmt: skip
        failed = GaugeMetricFamily(
            "clusterfeed_tasks_failed",
            "Worker tasks that ended in an error and are kept in the queue table, by unit",
            labels=["task"],
        )
        waiting = GaugeMetricFamily(
            "clusterfeed_task_oldest_waiting_seconds",
            "How long the oldest queued task of a unit has waited for a worker (0: none waits)",
            labels=["task"],
        )
        for name in names:
            label = name.removeprefix("clusterfeed.")
            q = found.get(name)
            jobs.add_metric([label, "todo"], q.todo if q else 0)
            jobs.add_metric([label, "doing"], q.doing if q else 0)
            failed.add_metric([label], q.failed if q else 0)
            waiting.add_metric([label], q.oldest_waiting_seconds if q else 0.0)
        yield jobs
        yield failed
        yield waiting


def health(service: Service) -> tuple[bool, dict[str, Any]]:
    """Healthy when a fetch succeeded within three fetch intervals and the feed exists."""
    now = service.clock()
    statuses = service.queries.feed_statuses(now)
    last_fetch = max((s.last_success_at for s in statuses if s.last_success_at), default=None)
    limit = timedelta(minutes=3 * service.config.schedule.fetch_interval_minutes)
    fetch_ok = last_fetch is not None and now - last_fetch <= limit
    feed_file = service.feed_path()
    publish_ok = feed_file.exists()
    detail = {
        "status": "ok" if fetch_ok and publish_ok else "failing",
        "last_successful_fetch": last_fetch.isoformat() if last_fetch else None,
        "feeds_ok": sum(1 for s in statuses if s.state == "ok"),
        "feeds_failing": sum(1 for s in statuses if s.state in ("failing", "gone")),
        "feed_published": publish_ok,
        "last_publish": (
            datetime.fromtimestamp(os.path.getmtime(feed_file), UTC).isoformat()
            if publish_ok
            else None
        ),
    }
    return fetch_ok and publish_ok, detail


def create_app(service: Service) -> Starlette:
    """The ASGI app for ``clusterfeed serve`` (and ``run --serve``), without the fast path
    for published files that ``make_server`` puts in front of it (``PublishedFiles``)."""
    cache = FileCache(service.config.publish.output_dir)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StoreCollector(service))

    async def healthz(request: Request) -> Response:
        ok, detail = await run_in_threadpool(health, service)  # reads the store
        return JSONResponse(detail, status_code=200 if ok else 503,
                            headers={"Cache-Control": "no-store"})  # fmt: skip

    async def metrics(request: Request) -> Response:
        return Response(
            await run_in_threadpool(generate_latest, registry),  # reads the store
            media_type="text/plain; version=0.0.4; charset=utf-8",
            headers={"Cache-Control": "no-store"},
        )

    async def published(request: Request) -> Response:
        path = request.path_params.get("path", "")
        try:
            file = cache.get(path)
        except PathTooLong:
            return JSONResponse({"error": "path too long"}, status_code=414)
        if file is None:
            return JSONResponse({"error": "not found", "path": "/" + path}, status_code=404)
        if file.folder_index and path and not path.endswith(("/", "index.html")):
            # /digests → /digests/, so the page's relative links resolve inside it; the
            # path is in normal form (cache.get found it), so the answer stays on this site.
            return RedirectResponse(local_location("/" + path + "/"), status_code=301)
        return file_response(request, file, path)

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics, methods=["GET"]),
            *signup.routes(service),
            Route("/{path:path}", published, methods=["GET", "HEAD"]),
        ],
        middleware=[
            Middleware(LocalRedirectsOnly),
            Middleware(ForwardedClient, trusted=networks(service.config.web.trusted_proxies)),
        ],
    )
    # Starlette would answer a path it has no route for with a redirect to the same
    # path with or without its trailing slash, built from the request's Host header:
    # a way to send a browser to another site. The catch-all route leaves nothing
    # unrouted today; this keeps it so.
    app.router.redirect_slashes = False
    app.state.file_cache = cache
    return app


def make_server(service: Service, host: str | None = None, port: int | None = None) -> Any:
    """A uvicorn server for the app, on the configured (or given) address."""
    import uvicorn

    app = create_app(service)
    config = uvicorn.Config(
        PublishedFiles(app, app.state.file_cache),
        host=host or service.config.web.host,
        port=port if port is not None else service.config.web.port,
        log_level="warning",
        access_log=False,
        # The client's address behind a proxy is decided by ``proxies.ForwardedClient``
        # from web.trusted_proxies alone. uvicorn's own handling would trust 127.0.0.1
        # (or $FORWARDED_ALLOW_IPS) whatever the config says: off, and given the same
        # list in case it is ever turned on.
        proxy_headers=False,
        forwarded_allow_ips=list(service.config.web.trusted_proxies),
        server_header=False,
    )
    return uvicorn.Server(config)
