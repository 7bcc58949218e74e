"""Get each partner feed's bytes, politely and within limits.

Only this module talks to partners' servers. It sends the validators the store
remembers (ETag, Last-Modified) so an unchanged feed costs the partner a 304 and us no
parsing; it caps concurrency, time and size so one slow or huge feed cannot stall or
exhaust the service; and it turns every failure into a ``FetchResult`` with a one-line
reason instead of an exception, so one broken feed never stops the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from clusterfeed.model import FetchResult

MAX_REDIRECTS = 5


@dataclass(frozen=True)
class FetchRequest:
    """One feed to fetch, with the validators from its last successful fetch."""

    feed_name: str
    url: str
    etag: str | None = None
    last_modified: str | None = None


@dataclass(frozen=True)
class FetchLimits:
    concurrency: int = 8
    timeout_seconds: float = 30.0
    connect_timeout_seconds: float = 10.0
    max_bytes: int = 10_000_000
    user_agent: str = "clusterfeed"


class _TooLarge(Exception):
    pass


def _is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


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
        body = path.read_bytes()
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
    if isinstance(exc, _TooLarge):
        return str(exc)
    if isinstance(exc, httpx.ConnectTimeout):
        return "timed out connecting to the server"
    if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout | httpx.PoolTimeout):
        return "the server stopped answering (read timeout)"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "the whole request took longer than fetch.timeout_seconds"
    if isinstance(exc, httpx.TooManyRedirects):
        return f"more than {MAX_REDIRECTS} redirects"
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


async def fetch_http(
    client: httpx.AsyncClient, request: FetchRequest, limits: FetchLimits
) -> FetchResult:
    """One conditional GET with a streaming size cap (applied after decompression)."""
    headers = {}
    if request.etag:
        headers["If-None-Match"] = request.etag
    if request.last_modified:
        headers["If-Modified-Since"] = request.last_modified
    try:
        async with asyncio.timeout(limits.timeout_seconds):
            async with client.stream("GET", request.url, headers=headers) as response:
                final_url = str(response.url)
                if response.status_code == 304:
                    return FetchResult(
                        request.feed_name,
                        request.url,
                        status=304,
                        not_modified=True,
                        etag=response.headers.get("etag", request.etag),
                        last_modified=response.headers.get("last-modified", request.last_modified),
                        final_url=final_url,
                    )
                if response.status_code >= 400:
                    reason = response.reason_phrase or "error"
                    return FetchResult(
                        request.feed_name,
                        request.url,
                        status=response.status_code,
                        error=f"HTTP {response.status_code} {reason}",
                        final_url=final_url,
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes * 20:
                    raise _TooLarge(
                        f"response announces {declared} bytes, far above the limit of "
                        f"{limits.max_bytes} (fetch.max_bytes)"
                    )
                chunks: list[bytes] = []
                total = 0
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    if total > limits.max_bytes:
                        raise _TooLarge(
                            f"response is larger than the limit of {limits.max_bytes} bytes "
                            "(fetch.max_bytes)"
                        )
                    chunks.append(chunk)
                return FetchResult(
                    request.feed_name,
                    request.url,
                    status=response.status_code,
                    body=b"".join(chunks),
                    headers={k.lower(): v for k, v in response.headers.items()},
                    etag=response.headers.get("etag"),
                    last_modified=response.headers.get("last-modified"),
                    final_url=final_url,
                )
    except (httpx.HTTPError, _TooLarge, TimeoutError, OSError, ssl.SSLError) as exc:
        return FetchResult(request.feed_name, request.url, error=describe_error(exc))


def make_client(limits: FetchLimits) -> httpx.AsyncClient:
    """An HTTP client shared by one fetch cycle, so connections to a host are reused."""
    return httpx.AsyncClient(
        headers={
            "User-Agent": limits.user_agent,
            "Accept": "application/atom+xml, application/rss+xml, application/rdf+xml, "
            "application/feed+json, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5",
        },
        timeout=httpx.Timeout(limits.timeout_seconds, connect=limits.connect_timeout_seconds),
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        limits=httpx.Limits(
            max_connections=limits.concurrency, max_keepalive_connections=limits.concurrency
        ),
    )


async def fetch_all(
    requests: Iterable[FetchRequest],
    limits: FetchLimits,
    on_result: Callable[[FetchResult], Awaitable[None] | None] | None = None,
) -> list[FetchResult]:
    """Fetch every feed with at most ``limits.concurrency`` in flight.

    ``on_result`` sees each result as soon as it arrives (for progress and for storing
    early), so a slow feed does not hold back the others' processing.
    """
    semaphore = asyncio.Semaphore(limits.concurrency)
    results: list[FetchResult] = []

    async with make_client(limits) as client:

        async def one(request: FetchRequest) -> None:
            async with semaphore:
                if _is_remote(request.url):
                    result = await fetch_http(client, request, limits)
                else:
                    result = await asyncio.to_thread(fetch_local, request, limits)
            results.append(result)
            if on_result is not None:
                outcome = on_result(result)
                if outcome is not None:
                    await outcome

        await asyncio.gather(*(one(r) for r in requests))
    return results


def response_headers_for_parser(result: FetchResult) -> Mapping[str, str]:
    """The headers feedparser uses to pick an encoding and a base for relative links."""
    headers = dict(result.headers)
    headers.setdefault("content-location", result.final_url or result.url)
    return headers
