"""Which client a request came from, when a reverse proxy stands in front of the server.

The per-client sign-up limit and the consent log's client hash need the address of the
person's machine. Behind nginx every request comes from the proxy, which writes the
address it saw into ``X-Forwarded-For``; but anyone can send that header, so it is
believed only from the proxies the operator names in ``web.trusted_proxies`` (none by
default). The chain is read from the right: each trusted proxy appended the address it
was talking to, so the right-most address that is not one of them is the client; what
lies further left was written by the client and proves nothing.

uvicorn has the same feature (``proxy_headers``, ``forwarded_allow_ips``) but trusts
127.0.0.1 unless told otherwise, reads an environment variable, and has changed its rules
between releases; so the server turns it off and this one rule, over the one key, decides.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# A longer chain is not a real deployment; reading it would only cost time.
MAX_HOPS = 30


def check_proxy(value: str) -> str:
    """One entry of ``web.trusted_proxies`` in its normal form, or a ValueError that says
    what to write instead (for the config's error message)."""
    text = value.strip()
    try:
        return str(ipaddress.ip_network(text))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            "expected the IP address or network of a proxy, such as 127.0.0.1, "
            "10.0.0.0/8 or 2001:db8::/32 (host names are not accepted)"
        ) from None
    raise ValueError(f"the network has host bits set; did you mean {loose}?")


def networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """The trusted networks from the config's (already checked) entries."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def _address(text: str) -> Address | None:
    """An address as a proxy writes it: bare, ``[v6]:port``, ``v4:port``; else None."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(address: Address, trusted: Sequence[Network]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in trusted)


def is_trusted(peer: str, trusted: Sequence[Network]) -> bool:
    """Whether the connection comes from one of the operator's proxies."""
    address = _address(peer) if trusted else None
    return address is not None and _trusted(address, trusted)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> str | None:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the
    right-most address of the X-Forwarded-For chain that is not a trusted proxy.

    An entry that is not an address ends the walk at the last address that was vouched
    for (a trusted proxy's): the rate limit then counts the proxy, never a made-up name
    that could change with every request.
    """
    if peer is None or not is_trusted(peer, trusted):
        return peer
    hops = [hop for value in forwarded_for for hop in value.split(",")][-MAX_HOPS:]
    client = peer
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            return client
        client = str(address)
        if not _trusted(address, trusted):
            return client
    return client


class ForwardedClient:
    """ASGI middleware: sets the request's client (and scheme, from X-Forwarded-Proto)
    from a trusted proxy's headers, so every part of the app sees the same client."""

    def __init__(self, app: Any, trusted: Sequence[Network]) -> None:
        self.app = app
        self.trusted = tuple(trusted)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope.get("client")
            and is_trusted(scope["client"][0], self.trusted)
        ):
            chain: list[str] = []
            proto: str | None = None
            for name, value in scope["headers"]:
                if name == b"x-forwarded-for":
                    chain.append(value.decode("latin-1"))
                elif name == b"x-forwarded-proto":
                    proto = value.decode("latin-1").strip().lower()
            scope = dict(scope, client=(client_address(scope["client"][0], chain, self.trusted), 0))
            if proto in ("http", "https"):
                scope["scheme"] = proto
        await self.app(scope, receive, send)
