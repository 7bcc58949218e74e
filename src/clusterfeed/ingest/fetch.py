"""Get each partner feed's bytes, politely and within limits.

Only this module talks to partners' servers. It sends the validators the store
remembers (ETag, Last-Modified) so an unchanged feed costs the partner a 304 and us no
parsing; it caps concurrency, time and size so one slow or huge feed cannot stall or
exhaust the service; and it turns every failure into a ``FetchResult`` with a one-line
reason instead of an exception, so one broken feed never stops the others.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ssl
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from clusterfeed.ingest.netguard import (
    AddressCheck,
    AddressRefused,
    AddressRule,
    address_problem,
    guarded_transport,
)
from clusterfeed.model import FetchResult

MAX_REDIRECTS = 5


@dataclass(frozen=True)
class FetchRequest:
    """One feed to fetch, with the validators from its last successful fetch."""

    feed_name: str
    url: str
    etag: str | None = None
    last_modified: str | None = None
    # The url the operator wrote in the config, when ``url`` is a move or a discovered
    # feed: the address rule follows from it, and only it may be a local file.
    configured_url: str | None = None

    @property
    def origin(self) -> str:
        return self.configured_url or self.url


@dataclass(frozen=True)
class FetchLimits:
    concurrency: int = 8
    timeout_seconds: float = 30.0
    connect_timeout_seconds: float = 10.0
    max_bytes: int = 10_000_000
    user_agent: str = "clusterfeed"
    per_host: int = 2
    allow_private_addresses: bool = False


class _TooLarge(Exception):
    pass


def _is_remote(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


def _split(url: str, part: str) -> str:
    """A part of a url (``hostname``, ``netloc``), lower case; empty for a broken url,
    which ``fetch_http`` then refuses with a reason instead of a traceback."""
    try:
        return (getattr(urlsplit(url), part) or "").lower()
    except ValueError:
        return ""


def fetch_local(request: FetchRequest, limits: FetchLimits) -> FetchResult:
    """Read a feed from a file, treating a content hash as its ETag.

    The bundled example and operators' hand-made feeds are files; giving them the same
    not-modified behaviour as HTTP keeps the rest of the pipeline identical.
    """
    path = Path(request.url.removeprefix("file://"))
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            return FetchResult(
                request.feed_name,
                request.url,
                error=f"file is {size} bytes, larger than the limit of {limits.max_bytes} "
                "(fetch.max_bytes)",
            )
        # The size a file claims may be wrong (a device, a file in /proc, a file still
        # growing): read one byte past the limit at most, whatever stat said.
        with path.open("rb") as handle:
            body = handle.read(limits.max_bytes + 1)
        if len(body) > limits.max_bytes:
            return FetchResult(
                request.feed_name,
                request.url,
                error=f"file is larger than the limit of {limits.max_bytes} bytes "
                "(fetch.max_bytes)",
            )
    except OSError as exc:
        return FetchResult(
            request.feed_name, request.url, error=f"cannot read file: {exc.strerror}"
        )
    etag = f'"sha256-{hashlib.sha256(body).hexdigest()[:40]}"'
    if request.etag == etag:
        return FetchResult(request.feed_name, request.url, not_modified=True, etag=etag)
    kind = "application/feed+json" if path.suffix == ".json" else "application/xml"
    return FetchResult(
        request.feed_name,
        request.url,
        body=body,
        etag=etag,
        final_url=request.url,
        headers={"content-type": kind},
    )


def describe_error(exc: BaseException) -> str:
    """A one-line reason an operator can act on, for any failure of one request."""
    if isinstance(exc, _TooLarge | AddressRefused):
        return str(exc)
    if isinstance(exc, httpx.ConnectTimeout):
        return "timed out connecting to the server"
    if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout | httpx.PoolTimeout):
        return "the server stopped answering (read timeout)"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "the whole request took longer than fetch.timeout_seconds"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS error: {cause.reason or cause}"
        text = str(cause)
        if (
            "Name or service not known" in text
            or "nodename nor servname" in text
            or ("getaddrinfo" in text)
        ):
            return "the host name does not resolve (DNS); check the URL"
        # By type as well as by text: anyio wraps the refusal as "All connection attempts
        # failed" over a ConnectionRefusedError whose text is "Connect call failed (...)".
        if isinstance(cause, ConnectionRefusedError) or "Connection refused" in text:
            return "connection refused by the server"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {exc}"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


PERMANENT_REDIRECTS = frozenset({301, 308})
TEMPORARY_REDIRECTS = frozenset({302, 303, 307})


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def parse_max_age(cache_control: str | None) -> int | None:
    """``max-age`` from a Cache-Control header, or None."""
    if not cache_control:
        return None
    for part in cache_control.split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "max-age" and value.strip().strip('"').isdigit():
            return int(value.strip().strip('"'))
    return None


async def fetch_http(
    client: httpx.AsyncClient,
    request: FetchRequest,
    limits: FetchLimits,
    rule: AddressRule | None = None,
) -> FetchResult:
    """One conditional GET with redirects handled by hand and a streaming size cap.

    Redirects are followed here rather than by httpx so the operator can be told
    when a feed moved for good: the target of an unbroken chain of 301/308 answers is
    reported as ``moved_to`` (a 302/307 in the chain ends it: that move is temporary),
    once that target has answered. Every hop's address is checked against ``rule``
    before it is asked (the client's connections are checked again when they are made,
    see ``netguard``); a refused hop ends the fetch, and nothing is learnt from it.
    """
    if rule is None:
        rule = AddressRule.for_feed(request.origin, allow_private=limits.allow_private_addresses)
    headers = {}
    if request.etag:
        headers["If-None-Match"] = request.etag
    if request.last_modified:
        headers["If-Modified-Since"] = request.last_modified
    url = request.url
    moved_to: str | None = None  # a permanent new address that answered
    pending: str | None = None  # one not asked yet
    permanent_so_far = True
    try:
        async with asyncio.timeout(limits.timeout_seconds):
            for _hop in range(MAX_REDIRECTS + 1):
                problem = rule.url_problem(url)
                if problem is not None:
                    raise AddressRefused(problem)
                async with client.stream("GET", url, headers=headers) as response:
                    moved_to, pending = pending or moved_to, None
                    status = response.status_code
                    location = response.headers.get("location")
                    if status in PERMANENT_REDIRECTS | TEMPORARY_REDIRECTS and location:
                        url = urljoin(str(response.url), location)
                        if status in PERMANENT_REDIRECTS and permanent_so_far:
                            pending = url
                        else:
                            permanent_so_far = False
                        continue
                    return await _read_response(response, request, limits, moved_to)
            return FetchResult(
                request.feed_name,
                request.url,
                error=f"more than {MAX_REDIRECTS} redirects (last to {url})",
                moved_to=moved_to,
            )
    except AddressRefused as exc:
        return FetchResult(request.feed_name, request.url, error=str(exc), refused=True)
    except httpx.InvalidURL as exc:
        # httpx reads a redirect's Location before handing the answer over, and raises
        # this (not an HTTPError) for one it cannot parse, e.g. "data:,x".
        return FetchResult(
            request.feed_name,
            request.url,
            error=f"not fetched: the server redirected to an invalid address ({exc})",
            refused=True,
        )
    except (httpx.HTTPError, _TooLarge, TimeoutError, OSError, ssl.SSLError) as exc:
        return FetchResult(
            request.feed_name, request.url, error=describe_error(exc), moved_to=moved_to
        )


async def _read_response(
    response: httpx.Response, request: FetchRequest, limits: FetchLimits, moved_to: str | None
) -> FetchResult:
    final_url = str(response.url)
    status = response.status_code
    now = datetime.now(UTC)
    max_age = parse_max_age(response.headers.get("cache-control"))
    if status == 304:
        # A 304 has no body, but the connection goes back to the pool only once its
        # end was read; unread, httpcore closes it and the next request connects anew.
        async for _ in response.aiter_raw():
            pass
        return FetchResult(
            request.feed_name,
            request.url,
            status=304,
            not_modified=True,
            etag=response.headers.get("etag", request.etag),
            last_modified=response.headers.get("last-modified", request.last_modified),
            final_url=final_url,
            moved_to=moved_to,
            max_age=max_age,
        )
    if status >= 400 or status < 200:
        reason = response.reason_phrase or "error"
        return FetchResult(
            request.feed_name,
            request.url,
            status=status,
            error=f"HTTP {status} {reason}",
            final_url=final_url,
            moved_to=moved_to,
            retry_after=parse_retry_after(response.headers.get("retry-after"), now)
            if status in (429, 503)
            else None,
        )
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_bytes * 20:
        raise _TooLarge(
            f"response announces {declared} bytes, far above the limit of "
            f"{limits.max_bytes} (fetch.max_bytes)"
        )
    chunks: list[bytes] = []
    total = 0
    # The cap applies after decompression, and to each step of it. httpx's aiter_bytes
    # inflates a whole network chunk at once: one 48 kB chunk of a gzip bomb became
    # 50 MB (peak 134 MB) before the cap could look at it. So the raw bytes are
    # inflated here, never more than the remaining budget (+1 to notice the excess).
    decoder = _Decoder(response.headers.get("content-encoding"), limits.max_bytes)
    async for raw in response.aiter_raw():
        for chunk in decoder.decode(raw):
            total += len(chunk)
            if total > limits.max_bytes:
                raise _TooLarge(
                    f"response is larger than the limit of {limits.max_bytes} bytes "
                    "(fetch.max_bytes)"
                )
            chunks.append(chunk)
    tail = decoder.flush()
    total += len(tail)
    if total > limits.max_bytes:
        raise _TooLarge(
            f"response is larger than the limit of {limits.max_bytes} bytes (fetch.max_bytes)"
        )
    chunks.append(tail)
    return FetchResult(
        request.feed_name,
        request.url,
        status=status,
        body=b"".join(chunks),
        headers={k.lower(): v for k, v in response.headers.items()},
        etag=response.headers.get("etag"),
        last_modified=response.headers.get("last-modified"),
        final_url=final_url,
        moved_to=moved_to,
        max_age=max_age,
    )


class _Decoder:
    """Content-Encoding (gzip, deflate or none) undone in steps of bounded size.

    No step yields more than one byte beyond ``limit`` in total, so the caller's cap
    sees the excess before it is in memory.
    """

    def __init__(self, content_encoding: str | None, limit: int) -> None:
        encoding = (content_encoding or "").strip().lower()
        self.encoding = encoding
        self.limit = limit
        self.produced = 0
        self._raw_deflate_tried = False
        if encoding in ("", "identity"):
            self._inflater = None
        elif encoding in ("gzip", "x-gzip"):
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif encoding == "deflate":
            self._inflater = zlib.decompressobj()
        else:
            # make_client asks for gzip and deflate only (Accept-Encoding).
            raise httpx.DecodingError(f"unsupported Content-Encoding {encoding!r}")

    def decode(self, data: bytes) -> Iterator[bytes]:
        """Yield the decoded bytes of ``data`` in pieces within the limit (+1)."""
        if self._inflater is None:
            yield data
            return
        while data:
            try:
                out = self._inflater.decompress(data, max(self.limit - self.produced + 1, 1))
            except zlib.error as exc:
                # Some servers send raw deflate (no zlib header) as "deflate"; httpx
                # accepts both, so do the same.
                if self.encoding == "deflate" and not self._raw_deflate_tried:
                    self._raw_deflate_tried = True
                    self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise httpx.DecodingError(
                    f"the {self.encoding}-compressed response is corrupt ({exc})"
                ) from None
            self._raw_deflate_tried = True
            data = self._inflater.unconsumed_tail
            self.produced += len(out)
            if out:
                yield out

    def flush(self) -> bytes:
        if self._inflater is None:
            return b""
        try:
            return self._inflater.flush(max(self.limit - self.produced + 1, 1))
        except zlib.error as exc:
            raise httpx.DecodingError(
                f"the {self.encoding}-compressed response is corrupt ({exc})"
            ) from None


def make_client(
    limits: FetchLimits,
    *,
    connections: int | None = None,
    verify: ssl.SSLContext | bool = True,
    rule: AddressRule | None = None,
) -> httpx.AsyncClient:
    """An HTTP client whose connections are reused within one fetch cycle.

    ``fetch_all`` gives each host a client of its own, with as many connections as the
    host may have requests in flight (``connections``), and one TLS context (``verify``)
    shared by all, since loading the trusted certificates takes tens of milliseconds.
    Every connection the client makes obeys ``rule`` (by default: public addresses
    only, unless ``limits.allow_private_addresses``). The client goes to partners
    directly, never through a proxy named in the environment, since a proxy would
    hide the addresses the rule must see.
    """
    size = connections or limits.concurrency
    if rule is None:
        rule = AddressRule(allow_private=limits.allow_private_addresses)
    return httpx.AsyncClient(
        headers={
            "User-Agent": limits.user_agent,
            "Accept": "application/atom+xml, application/rss+xml, application/rdf+xml, "
            "application/feed+json, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5",
            # Only what _Decoder can undo with a bounded output (not br or zstd, which
            # httpx would otherwise offer when their packages happen to be installed).
            "Accept-Encoding": "gzip, deflate",
        },
        timeout=httpx.Timeout(limits.timeout_seconds, connect=limits.connect_timeout_seconds),
        follow_redirects=False,
        transport=guarded_transport(rule, verify=verify, connections=size),
    )


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The trusted certificates (httpx's defaults), loaded once per process: 40 ms each time."""
    return httpx.create_ssl_context()


async def fetch_all(
    requests: Iterable[FetchRequest],
    limits: FetchLimits,
    on_result: Callable[[FetchResult], Awaitable[None] | None] | None = None,
    *,
    address_check: AddressCheck = address_problem,
) -> list[FetchResult]:
    """Fetch every feed with at most ``limits.concurrency`` in flight.

    At most ``limits.per_host`` requests go to one host at a time, whatever the global
    concurrency: many partners share one hosting provider, which must not see a burst.
    ``on_result`` sees each result as soon as it arrives (for progress and for storing
    early), so a slow feed does not hold back the others' processing.

    Each configured host (and port) gets its own client, so its connections are kept for
    its next feeds, and all of them were made under that host's ``AddressRule`` (a feed moved
    elsewhere keeps its configured host's client: a connection made for one rule is
    never lent to a request under another). A local file is read only when it is the
    path the operator configured, never a move or an announced address. One
    client for all hosts either closed a connection to open the next (when more hosts
    than its pool took turns: every request a new connection) or, with a pool as large
    as all hosts, searched every idle connection on every request (a system call
    each: 2 ms of CPU per request at 50 hosts, more than the request itself).
    """
    semaphore = asyncio.Semaphore(limits.concurrency)
    per_host: dict[str, asyncio.Semaphore] = {}
    clients: dict[str, tuple[httpx.AsyncClient, AddressRule]] = {}
    results: list[FetchResult] = []

    def client_for(request: FetchRequest) -> tuple[httpx.AsyncClient, AddressRule]:
        key = _split(request.origin, "netloc")  # host and port: the rule's key
        found = clients.get(key)
        if found is None:
            rule = AddressRule.for_feed(
                request.origin,
                allow_private=limits.allow_private_addresses,
                check=address_check,
            )
            client = make_client(
                limits, connections=limits.per_host, verify=tls_context(), rule=rule
            )
            found = clients[key] = (client, rule)
        return found

    async def one(request: FetchRequest) -> None:
        if _is_remote(request.url):
            host = _split(request.url, "hostname")
            host_limit = per_host.setdefault(host, asyncio.Semaphore(limits.per_host))
            client, rule = client_for(request)
            async with host_limit, semaphore:
                result = await fetch_http(client, request, limits, rule)
        elif request.origin != request.url:
            result = FetchResult(
                request.feed_name,
                request.url,
                error=f"not read: {request.url} is not a web address, and a local file is "
                "read only when the config names it",
                refused=True,
            )
        else:
            async with semaphore:
                result = await asyncio.to_thread(fetch_local, request, limits)
        results.append(result)
        if on_result is not None:
            outcome = on_result(result)
            if outcome is not None:
                await outcome

    try:
        await asyncio.gather(*(one(r) for r in requests))
    finally:
        for client, _rule in clients.values():
            await client.aclose()
    return results
