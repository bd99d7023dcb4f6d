"""Who the client is: its address as every rule that looks at it sees it.

One function parses a peer address for all of them (trusted proxies, pin networks,
the preview's allowed networks), so they can never disagree about a client: a
dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d, and each of them sees
the IPv4 address.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=4096)
def client_address(peer_ip: bytes) -> IPAddress | None:
    """The client's address; cached because every request of a connection asks again."""
    try:
        address = ipaddress.ip_address(peer_ip.decode())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def networks(texts: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


def in_networks(peer_ip: bytes, within: tuple[IPNetwork, ...]) -> bool:
    """Whether the client at `peer_ip` is in one of the networks (never, unparseable)."""
    address = client_address(peer_ip)
    return address is not None and any(address in network for network in within)
