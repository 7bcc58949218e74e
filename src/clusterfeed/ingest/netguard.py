"""Where a fetch may go: the guard against a partner steering clusterfeed inward.

A partner's server answers with redirects, and its pages announce feeds: addresses
chosen by someone else, which clusterfeed then asks for and may publish. Left alone,
``301 Location: file:///etc/passwd`` became a feed's new home, and a redirect to
``http://127.0.0.1:...`` or ``http://169.254.169.254/`` reached this machine or its
cloud's metadata service. So:

- a followed address (redirect, stored move, announced feed) must be http or https,
  with a host and without a user name or password;
- the address a connection goes to is checked when it is made, after the host name
  was resolved, and the connection goes to exactly the address checked: a host name
  whose DNS answer changes between two look-ups (DNS rebinding) gains nothing;
- addresses that are not on the public internet (loopback, private, link-local,
  multicast, unspecified, reserved; IPv4 inside IPv6 is judged as IPv4) are reached
  only for a feed whose configured url names such an address itself (the operator's
  choice: a feed on 127.0.0.1, a partner on 10.1.2.3), and then only on that host and
  port, or everywhere when the operator sets ``fetch.allow_private_addresses``.

The decisions (``address_problem``, ``AddressRule``) are plain functions over plain
data; ``GuardedBackend`` is the only part that touches the network.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress = IPv4Address | IPv6Address
AddressCheck = Callable[[IPAddress], "str | None"]

# IANA's special-purpose registries, as the kind of place each range leads to. Anything
# listed here is not the public internet.
_V4_RANGES: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), kind)
    for net, kind in (
        ("0.0.0.0/8", "unspecified"),  # "this network": 0.0.0.0 reaches this machine
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "private"),  # shared address space behind carrier NAT
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),  # cloud metadata services live here
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "reserved"),
        ("192.88.99.0/24", "reserved"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),
        ("198.51.100.0/24", "reserved"),
        ("203.0.113.0/24", "reserved"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # and 255.255.255.255, the broadcast address
    )
)
_V6_RANGES: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), kind)
    for net, kind in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "private"),  # NAT64 for local use
        ("100::/64", "reserved"),
        ("2001::/23", "reserved"),
        ("2001:db8::/32", "reserved"),
        ("3fff::/20", "reserved"),
        ("fc00::/7", "private"),  # unique local, e.g. fd00:ec2::254 (a metadata service)
        ("fe80::/10", "link-local"),
        ("fec0::/10", "private"),  # the old site-local range
        ("ff00::/8", "multicast"),
    )
)
_V6_GLOBAL_UNICAST = IPv6Network("2000::/3")
_NAT64 = IPv6Network("64:ff9b::/96")

KIND_TEXT = {
    "loopback": "a loopback address (this machine)",
    "unspecified": "an unspecified address (this machine)",
    "private": "a private address (an internal network)",
    "link-local": "a link-local address (where cloud metadata services answer)",
    "multicast": "a multicast address",
    "reserved": "a reserved address, not on the public internet",
}

ALLOW_KEY = "fetch.allow_private_addresses"
NEXT_ADDRESS_DELAY = 0.25  # seconds before trying a host's next address as well


def address_problem(address: IPAddress) -> str | None:
    """None for an address on the public internet, else the kind of place it leads to.

    The kind is one of ``KIND_TEXT``'s keys. An IPv6 address that carries an IPv4
    address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``)
    is judged by that IPv4 address; other IPv6 outside global unicast is reserved.
    """
    if isinstance(address, IPv6Address):
        for network, kind in _V6_RANGES[:2]:
            if address in network:
                return kind
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address in _NAT64:
            inner = IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            return address_problem(inner)
        for network, kind in _V6_RANGES[2:]:
            if address in network:
                return kind
        return None if address in _V6_GLOBAL_UNICAST else "reserved"
    for network4, kind in _V4_RANGES:
        if address in network4:
            return kind
    return None


_NUMERIC_V4 = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$", re.IGNORECASE)


def host_address(host: str) -> IPAddress | None:
    """The address a host *names* (no DNS), or None for a host name.

    Besides the usual forms this reads every spelling the C library's resolver turns
    into an IPv4 address without asking DNS: ``2130706433``, ``0x7f.1``, ``0177.0.0.1``,
    ``127.1``. IPv6 may come in brackets and with a zone (``fe80::1%eth0``).
    """
    text = host.strip().removeprefix("[").removesuffix("]").replace("%25", "%")
    if ":" in text:
        try:
            return IPv6Address(text)
        except ValueError:
            return None
    if not _NUMERIC_V4.match(text):
        return None  # a name (the common case, decided without an exception)
    try:
        return IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def is_local_name(host: str) -> bool:
    """``localhost`` and its subdomains, which always mean this machine (RFC 6761)."""
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _same_service(port: int, trusted: int | None) -> bool:
    """The same port, or http's and https's own (a move from http to https)."""
    return port == trusted or {port, trusted} <= {80, 443}


def _same_host(a: str, b: str) -> bool:
    first, second = host_address(a), host_address(b)
    if first is not None or second is not None:
        return first is not None and first == second
    return a.lower().rstrip(".") == b.lower().rstrip(".")


class AddressRefused(Exception):
    """A connection or a followed address that the address rule does not allow."""


@dataclass(frozen=True)
class AddressRule:
    """Which addresses the requests for one configured feed url may reach.

    ``trusted_host`` is the configured url's host when the operator wrote a non-public
    address there (or ``localhost``): that host, on ``trusted_port`` (or from http to
    https), is reached whatever it resolves to, and so is every public address. Another
    port of the same machine is another service, which the operator did not name.
    ``check`` says what is public; tests that have no internet name a loopback address
    public through it.
    """

    trusted_host: str | None = None
    allow_private: bool = False
    check: AddressCheck = field(default=address_problem, compare=False)
    trusted_port: int | None = None

    @classmethod
    def for_feed(
        cls, configured_url: str, *, allow_private: bool, check: AddressCheck = address_problem
    ) -> AddressRule:
        """The rule for requests that start at a feed url the operator configured."""
        try:
            parts = urlsplit(configured_url)
            host, port = parts.hostname or "", parts.port
        except ValueError:
            return cls(None, allow_private, check)
        address = host_address(host) if host else None
        if (address is not None and check(address) is not None) or (host and is_local_name(host)):
            port = port or _DEFAULT_PORTS.get(parts.scheme)
            return cls(host, allow_private, check, port)
        return cls(None, allow_private, check)

    def address_refusal(self, host: str, port: int, address: IPAddress) -> str | None:
        """None if a connection for ``host`` and ``port`` may go to ``address``, else why not."""
        if self.allow_private:
            return None
        kind = self.check(address)
        if kind is None or (
            self.trusted_host is not None
            and _same_host(host, self.trusted_host)
            and _same_service(port, self.trusted_port)
        ):
            return None
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if host_address(host) != address:
            shown += f" ({address})"
        return (
            f"not fetched: {shown} is {KIND_TEXT.get(kind, kind)}; clusterfeed "
            "goes there only for a feed whose url names that address and port itself, never "
            f"because a partner's server or page points there (set {ALLOW_KEY} = true if "
            "your partners really are on an internal network)"
        )

    def url_problem(self, url: str) -> str | None:
        """None if ``url`` may be followed, else why not (no DNS: see ``GuardedBackend``).

        Only http and https, with a host and without a user name or password; a host
        that is an address itself is judged here already, so the message names it.
        """
        try:
            parsed = urlsplit(url)
            host, port = parsed.hostname, parsed.port
        except ValueError:
            return f"not fetched: {url!r} is not a valid web address"
        if parsed.scheme not in ("http", "https"):  # (urlsplit lower-cases the scheme)
            return (
                f"not fetched: {url} is not a web address; clusterfeed follows only http:// "
                "and https:// (a local file is read only when the config names it)"
            )
        if not host:
            return f"not fetched: {url} has no host name"
        if "@" in parsed.netloc:
            return f"not fetched: {url} carries a user name or password"
        address = host_address(host)
        if address is not None:
            return self.address_refusal(host, port or _DEFAULT_PORTS[parsed.scheme], address)
        return None


def fetch_warnings(feeds: Iterable[tuple[str, str]]) -> list[str]:
    """``check``'s warnings about configured feed urls (name, url) on metadata ranges.

    A configured address is the operator's choice and is fetched; but an address in
    169.254.0.0/16 or fd00:ec2::254 is where cloud providers serve a machine's secrets,
    and is almost certainly a mistake or a planted config. No DNS is asked.
    """
    metadata_names = ("metadata.google.internal", "instance-data.ec2.internal")
    found = []
    for name, url in feeds:
        if not url.lower().startswith(("http://", "https://")):
            continue
        try:
            host = urlsplit(url).hostname or ""
        except ValueError:
            continue  # not an address at all: nothing to warn about here
        address = host_address(host)
        if isinstance(address, IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        metadata = host.lower().rstrip(".") in metadata_names or address in (
            IPv6Address("fd00:ec2::254"),
        )
        if metadata or (address is not None and address.is_link_local):
            found.append(
                f"feed {name!r}: url {url} is a link-local or cloud metadata address, where "
                "cloud providers hand out this machine's credentials; clusterfeed fetches it "
                "because the config names it, and may publish what it finds: remove the "
                "feed unless you are sure"
            )
    return found


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the address rule applied to every connection.

    The host is resolved here (the event loop's getaddrinfo), every address is checked
    and only an allowed one is connected to, by its number: the check and the
    connection see the same address. An address already written as a number is not
    resolved at all. Connections in the pool were all made under the same rule (one
    client per configured host and port), so reusing them needs no new check.
    """

    def __init__(self, rule: AddressRule, inner: httpcore.AsyncNetworkBackend | None = None):
        self.rule = rule
        self.inner = inner or httpcore.AnyIOBackend()

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        literal = host_address(host)
        if literal is not None:
            return [literal]
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found: list[IPAddress] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            address = ip_address(str(sockaddr[0]))
            if address not in found:
                found.append(address)
        return found

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self.resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} took too long") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"getaddrinfo failed for {host}: {exc}") from exc
        allowed = [a for a in addresses if self.rule.address_refusal(host, port, a) is None]
        if not allowed:
            reason = self.rule.address_refusal(host, port, addresses[0]) if addresses else None
            raise AddressRefused(reason or f"not fetched: {host} has no address")
        return await self.connect_first(allowed, port, timeout, local_address, socket_options)

    async def connect_first(
        self,
        addresses: list[IPAddress],
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """A connection to the first of ``addresses`` that accepts one.

        The next address is tried every quarter second while the earlier attempts go
        on (as anyio did when it resolved names itself): an address whose route drops
        packets, IPv6 on some networks, must not cost the whole connect timeout.
        """
        if len(addresses) == 1:
            return await self.inner.connect_tcp(
                str(addresses[0]), port, timeout, local_address, socket_options
            )
        waiting = list(addresses)
        running: set[asyncio.Task[httpcore.AsyncNetworkStream]] = set()
        error: BaseException | None = None
        try:
            while waiting or running:
                if waiting:
                    address = str(waiting.pop(0))
                    running.add(
                        asyncio.ensure_future(
                            self.inner.connect_tcp(
                                address, port, timeout, local_address, socket_options
                            )
                        )
                    )
                done, running = await asyncio.wait(
                    running,
                    timeout=NEXT_ADDRESS_DELAY if waiting else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    if task.exception() is None:
                        winner = task.result()
                        for other in done - {task}:
                            if other.exception() is None:
                                await other.result().aclose()
                        return winner
                    error = task.exception()
        finally:
            for task in running:
                task.cancel()
            for outcome in await asyncio.gather(*running, return_exceptions=True):
                if isinstance(outcome, httpcore.AsyncNetworkStream):
                    await outcome.aclose()
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused("not fetched: clusterfeed does not connect to local sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def guarded_transport(
    rule: AddressRule, *, verify: ssl.SSLContext | bool, connections: int
) -> httpx.AsyncHTTPTransport:
    """httpx's own transport, with its connection pool on a ``GuardedBackend``.

    httpx has no public switch for the network backend, so the pool it made is
    replaced by the same pool on the guarded backend (``test_ssrf`` proves the guard is
    in the path: a refused connection there fails if this stops working).
    """
    transport = httpx.AsyncHTTPTransport(verify=verify)
    context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=context,
        max_connections=connections,
        max_keepalive_connections=connections,
        keepalive_expiry=5.0,
        network_backend=GuardedBackend(rule),
    )
    return transport


@dataclass(frozen=True)
class StoredChoice:
    """Where to ask for a feed, once its remembered addresses were checked again."""

    url: str
    forget_moved: bool = False
    forget_discovered: bool = False
    warning: str | None = None


def check_stored(
    configured: str, moved_to: str | None, discovered_url: str | None, rule: AddressRule | None
) -> StoredChoice:
    """Check a feed's remembered move and discovered feed again before using them.

    They were learnt from a partner's answers, possibly by an older clusterfeed that
    checked less (a stored ``file:///etc/passwd``): each is judged by today's rule
    (``None`` for a feed configured as a local file, which never moves), and one that
    fails is to be forgotten, with a warning that says so. The first one left, else the
    configured url, is where to ask.
    """
    forget = {"moved": False, "discovered": False}
    warnings = []
    use = None
    for kind, url, source in (
        ("discovered", discovered_url, "announced by the feed's page"),
        ("moved", moved_to, "from a permanent redirect"),
    ):
        if not url:
            continue
        problem = (
            rule.url_problem(url)
            if rule is not None
            else "the feed is a local file named in the config, which does not move"
        )
        if problem is None:
            use = use or url
            continue
        forget[kind] = True
        warnings.append(
            f"the remembered address {url} ({source}) was dropped and the configured url "
            f"is used again: {problem.removeprefix('not fetched: ')}"
        )
    return StoredChoice(
        use or configured,
        forget_moved=forget["moved"],
        forget_discovered=forget["discovered"],
        warning="; ".join(warnings) or None,
    )
