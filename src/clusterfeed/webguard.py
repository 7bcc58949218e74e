"""What the web server accepts from a browser's address bar and forms, as plain decisions.

Two rules, each closing a class of tricks rather than one example:

- A request path is served only in its normal form: no empty segment (``//``), no ``.``
  or ``..``, no backslash, no control character, no segment longer than a file name can
  be, nothing longer than ``MAX_PATH`` bytes. Anything else is not a published file (404,
  or 414 when too long), never an error of the server.
- Every ``Location`` the server sends is a path on this site: one ``/`` at the start,
  built from a normal path and percent-encoded (``local_location``). ``//evil.example/``
  is a link to another site in a browser's eyes, and so is ``/\\evil.example``.
  ``LocalRedirectsOnly`` checks every answer of the app once more.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

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
