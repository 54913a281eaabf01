"""Where a webhook may be sent (CONTRACT §7): public addresses, and the networks an operator allows.

A URL naming a host is resolved, and the request goes to an address that was checked, with the
name in ``Host`` (and in TLS SNI): a name that resolves to a public address when checked and to
127.0.0.1 a moment later (DNS rebinding) therefore cannot steer a delivery into the bus's own
network. The check runs at registration, for a clear answer, and again before every attempt,
because DNS and the allow list change.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH = 2048


class RefusedTarget(ValueError):
    """The URL may not receive webhooks; the message says why, for the endpoint's owner."""


@dataclass(frozen=True)
class Target:
    """A checked destination: ``url`` has the address in place of the name."""

    url: httpx.URL
    host: str
    """The ``Host`` header: the name (and port) as registered."""
    sni: str | None
    """For https: the name the server's certificate must hold."""


def networks(cidrs: Iterable[str]) -> list[IPNetwork]:
    """The allowed networks of ``COLLABBUS_WEBHOOK_ALLOW_NETWORKS``."""
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def permitted(address: IPAddress, allow: Sequence[IPNetwork]) -> bool:
    """Public unicast addresses are permitted, and any address inside an allowed network.

    Not ``is_global``: private, loopback, link-local, shared (CGNAT), reserved, unspecified. An
    IPv4 address written as IPv6 (``::ffff:127.0.0.1``) is judged as the IPv4 address it is.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allow):
        return True
    return address.is_global and not address.is_multicast


def parse(url: str) -> httpx.URL:
    """The URL, if it can name a webhook receiver at all (http or https, with a host)."""
    if len(url) > MAX_URL_LENGTH:
        raise RefusedTarget(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise RefusedTarget(f"{url!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise RefusedTarget(f"{url!r} is not an http or https URL with a host")
    if parsed.userinfo:
        # Never sent (deliveries are signed instead), and shown back in every listing.
        raise RefusedTarget("the URL carries a user name or password: deliveries are signed, not sent with credentials")
    return parsed


_LITERAL: dict[tuple[str, tuple[IPNetwork, ...]], Target] = {}
"""Checked URLs that name an address (nothing to resolve: the answer never changes)."""


async def resolve(url: str, allow: Sequence[IPNetwork]) -> Target:
    """Resolve ``url``'s host and pick a permitted address; :class:`RefusedTarget` when it has none."""
    key = (url, tuple(allow))
    if (known := _LITERAL.get(key)) is not None:
        return known
    parsed = parse(url)
    host = parsed.raw_host.decode("ascii")
    literal = True
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(parsed.host)]
    except ValueError:
        literal = False
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise RefusedTarget(f"the host {host!r} does not resolve: {exc}") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found))
    allowed = [address for address in addresses if permitted(address, allow)]
    if not allowed:
        shown = ", ".join(map(str, addresses))
        raise RefusedTarget(
            f"{host!r} resolves to {shown}: private, loopback, link-local and reserved addresses do not "
            "receive the bus's requests (webhooks, the portal connector's) unless COLLABBUS_WEBHOOK_ALLOW_NETWORKS allows them"
        )
    target = Target(
        url=parsed.copy_with(host=str(allowed[0])),
        host=parsed.netloc.decode("ascii"),
        sni=host if parsed.scheme == "https" else None,
    )
    if literal:
        if len(_LITERAL) >= 4096:
            _LITERAL.clear()
        _LITERAL[key] = target
    return target
