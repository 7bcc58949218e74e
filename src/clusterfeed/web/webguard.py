"""What the web server accepts from a browser's address bar and forms, as plain decisions.

Three rules, each closing a class of tricks rather than one example:

- A request path is served only in its normal form: no empty segment (``//``), no ``.``
  or ``..``, no backslash, no control character, no segment longer than a file name can
  be, nothing longer than ``MAX_PATH`` bytes. Anything else is not a published file (404,
  or 414 when too long), never an error of the server.
- Every ``Location`` the server sends is a path on this site: one ``/`` at the start,
  built from a normal path and percent-encoded (``local_location``). ``//evil.example/``
  is a link to another site in a browser's eyes, and so is ``/\\evil.example``.
  ``LocalRedirectsOnly`` checks every answer of the app once more.
- A form posted to our pages from another site is refused (``foreign_post``): the
  browser says where a form came from in ``Origin`` (or ``Referer``), and we compare it
  with our own origin: ``web.base_url`` when the operator set it, else the ``Host`` the
  request was sent to. Clients that send neither (mail providers' one-click unsubscribe,
  scripts) are let through: the signed token in the URL is their proof.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    from clusterfeed.config import WebConfig

log = logging.getLogger(__name__)

# Published paths are short (feed.atom, archive/2026-11.html, digests/2026-11-26.html).
MAX_PATH = 1024
MAX_SEGMENT = 255  # bytes of one file name on common file systems


class PathTooLong(ValueError):
    """The path is longer than any published file's (answered with 414)."""


def clean_path(path: str) -> str | None:
    """``path`` (without its leading ``/``) when it is in normal form, else None.

    A trailing ``/`` (a folder) is kept. ``PathTooLong`` when over ``MAX_PATH`` bytes.
    """
    if len(path.encode("utf-8", "replace")) > MAX_PATH:
        raise PathTooLong(path[:50])
    if not path:
        return path
    if "\\" in path or any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in path):
        return None
    segments = path.split("/")
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if segment in (".", "..") or (not segment and i != last):
            return None
        if len(segment.encode("utf-8", "replace")) > MAX_SEGMENT:
            return None
    return path


def is_local_location(value: str) -> bool:
    """Whether a ``Location`` value keeps the browser on this site: a path with one ``/``
    at the start, no scheme, no backslash or control character that a browser could
    read as the start of another host's address."""
    return (
        value.startswith("/")
        and not value.startswith(("//", "/\\"))
        and not any(ch == "\\" or ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in value)
    )


def local_location(path: str, query: str = "") -> str:
    """The ``Location`` for a redirect to ``path`` on this site (percent-encoded).

    ``path`` must be a normal path starting with ``/`` (see ``clean_path``); anything
    else is a programming error, raised here rather than sent to a browser.
    """
    if not path.startswith("/") or clean_path(path[1:]) is None:
        raise ValueError(f"not a normal path on this site: {path[:80]!r}")
    location = quote(path, safe="/-._~!$&'()*+,;=:@")
    if query:
        location += "?" + quote(query, safe="=&-._~")
    assert is_local_location(location), location
    return location


class LocalRedirectsOnly:
    """ASGI middleware: an answer whose ``Location`` would leave the site loses it and
    becomes a 404 (and the mistake is logged). The redirects the app makes are built
    with ``local_location`` already; this is the guard for the one that is not."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def checked_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                bad = [
                    value
                    for name, value in headers
                    if name.lower() == b"location"
                    and not is_local_location(value.decode("latin-1"))
                ]
                if bad:
                    log.error("refused to redirect %s to another site: %r", scope["path"], bad)
                    message = dict(
                        message,
                        status=404,
                        headers=[(n, v) for n, v in headers if n.lower() != b"location"],
                    )
            await send(message)

        await self.app(scope, receive, checked_send)


# -- where a posted form came from --------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """A web origin: scheme, host (lower case, IDNA) and port (None: not known)."""

    scheme: str
    host: str
    port: int | None


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _ascii_host(host: str) -> str:
    host = host.lower().rstrip(".")
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def parse_origin(url: str) -> Origin | None:
    """The origin of an absolute http(s) URL (or of an ``Origin`` header), else None."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return Origin(scheme, _ascii_host(parts.hostname), port or _DEFAULT_PORTS[scheme])


def host_origin(host_header: str, scheme: str) -> Origin | None:
    """Our origin from the ``Host`` a request was sent to. Without a port in it (a proxy
    that passes ``$host`` on), the port is not known and not compared."""
    try:
        parts = urlsplit("//" + host_header.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.path:
        return None
    return Origin(scheme, _ascii_host(parts.hostname), port)


def same_origin(ours: Origin, theirs: Origin, *, exact: bool) -> bool:
    """``exact``: ours came from ``web.base_url`` and scheme and port must match too.
    Otherwise ours is only the Host header: the host must match, and the port when the
    Host header named one (behind a proxy the scheme the browser used is not known)."""
    if ours.host != theirs.host:
        return False
    if exact:
        return ours.scheme == theirs.scheme and ours.port == theirs.port
    return ours.port is None or ours.port == theirs.port


def foreign_post(headers: Mapping[str, str], ours: Origin | None, *, exact: bool) -> str | None:
    """Where a POST came from when that is another site (for the log), else None.

    ``Origin`` first. ``Origin: null`` is what browsers send for a form on a page with
    ``Referrer-Policy: no-referrer`` (ours have it) and from sandboxed frames: it names
    no site, so Fetch Metadata decides (``Sec-Fetch-Site: cross-site`` is refused) and
    the request is treated as one without ``Origin``. Then ``Referer``. A request with
    neither is let through: mail providers' one-click unsubscribe (RFC 8058) and many
    scripts send none, and what they may do is decided by the token in the URL.
    """
    fetch_site = headers.get("sec-fetch-site", "").strip().lower()
    origin = headers.get("origin", "").strip()
    if origin and origin.lower() != "null":
        claimed = origin
    elif fetch_site == "cross-site":
        return f"{origin or 'no origin'} (Sec-Fetch-Site: cross-site)"
    else:
        claimed = headers.get("referer", "").strip()
        if not claimed:
            return None
    theirs = parse_origin(claimed)
    if ours is None:
        # No origin of our own to compare with (no base_url and a broken Host header).
        return claimed[:200]
    if theirs is None or not same_origin(ours, theirs, exact=exact):
        return claimed[:200]
    return None


# -- the guard on our forms ---------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


async def is_one_click(request: Request) -> bool:
    """Whether a POST is RFC 8058's one-click unsubscribe from a mail program: the body
    ``List-Unsubscribe=One-Click`` (whatever content type it is labelled with), and not
    a page navigation (a form on another site's page is one)."""
    if request.headers.get("sec-fetch-mode", "").strip().lower() == "navigate":
        return False
    try:
        length = int(request.headers.get("content-length", ""))
    except ValueError:
        return False
    if not 0 < length <= 64:
        return False
    return (await request.body()).strip() == b"List-Unsubscribe=One-Click"


class SameOriginForms:
    """Wraps a page's handler so that its POSTs from another site get ``refusal()``.

    Our origin is ``web.base_url`` when the operator set it, else the Host of each
    request (see ``foreign_post``).
    """

    def __init__(self, web: WebConfig, refusal: Callable[[], Response]) -> None:
        self.exact = "base_url" in web.model_fields_set
        self.configured = parse_origin(web.base_url) if self.exact else None
        self.refusal = refusal

    def ours(self, request: Request) -> Origin | None:
        if self.exact:
            return self.configured
        return host_origin(request.headers.get("host", ""), request.scope.get("scheme", "http"))

    def __call__(self, handler: Handler, *, one_click: bool = False) -> Handler:
        """``one_click``: a POST of RFC 8058's body that is not a page navigation is a mail
        program's unsubscribe button, accepted whatever origin it names (web mail and
        mail-program add-ons post from their own); the token in the URL is the proof."""

        async def guarded(request: Request) -> Response:
            if request.method != "POST":
                return await handler(request)
            foreign = foreign_post(request.headers, self.ours(request), exact=self.exact)
            if foreign is not None and one_click and await is_one_click(request):
                foreign = None
            if foreign is None:
                return await handler(request)
            log.info("refused a form posted to %s from %r", request.url.path, foreign)
            return self.refusal()

        return guarded
