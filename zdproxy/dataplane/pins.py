"""Pin rules and the preview override of one snapshot, compiled for the hot path.

The client connection asks `Overrides.decide` once per request head, and only when
the snapshot has pins or an enabled preview; otherwise the table holds None and
requests pay nothing. The answer ("blue", "green", "live", "candidate" or None) is
resolved to pools by RoutingTable.pick when the request starts, so a pipelined
request follows the snapshot it is dispatched under.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from functools import lru_cache

from zdproxy.dataplane.http import H_DROP, H_PIN, H_PREVIEW, H_STICKY
from zdproxy.routing.preview import verify_token
from zdproxy.routing.records import OverrideCounters
from zdproxy.routing.snapshot import PinRule, RoutingSnapshot

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_COLORS = {b"blue": "blue", b"green": "green"}
_NO_COOKIES: dict[bytes, bytes] = {}


@lru_cache(maxsize=4096)
def client_address(peer_ip: bytes) -> IPAddress | None:
    """The client's address; cached because every request of a connection asks again."""
    try:
        address = ipaddress.ip_address(peer_ip.decode())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
    return address


def in_networks(address: IPAddress | None, networks: tuple[IPNetwork, ...]) -> bool:
    return address is not None and any(address in network for network in networks)


def normalise_host(host: bytes) -> bytes:
    """Lowercase, without the port ("[::1]:8080" -> "[::1]")."""
    host = host.strip().lower()
    if host.startswith(b"["):
        return host[: host.find(b"]") + 1]
    return host.partition(b":")[0]


def parse_cookies(header: bytes) -> dict[bytes, bytes]:
    """Cookie name -> value; the first of a repeated name wins, as in steering.cookie_value."""
    cookies: dict[bytes, bytes] = {}
    for part in header.split(b";"):
        name, sep, value = part.strip().partition(b"=")
        if sep:
            cookies.setdefault(name, value.strip().strip(b'"'))
    return cookies


class Request:
    """The facts of one request head that pin conditions look at."""

    __slots__ = ("cookies", "headers", "host", "path", "peer_ip")

    def __init__(
        self,
        host: bytes,
        path: bytes,
        cookies: dict[bytes, bytes],
        headers: dict[int, bytes],
        peer_ip: bytes,
    ) -> None:
        self.host = host
        self.path = path
        self.cookies = cookies
        self.headers = headers
        self.peer_ip = peer_ip


Condition = Callable[[Request], bool]


def _header(code: int, values: frozenset[bytes]) -> Condition:
    return lambda request: request.headers.get(code) in values


def _cookie(name: bytes, values: frozenset[bytes]) -> Condition:
    return lambda request: request.cookies.get(name) in values


def _host(hosts: frozenset[bytes]) -> Condition:
    return lambda request: request.host in hosts


def _path(prefixes: tuple[bytes, ...]) -> Condition:
    return lambda request: request.path.startswith(prefixes)


def _network(networks: tuple[IPNetwork, ...]) -> Condition:
    # ipaddress containment costs microseconds; a client sends many requests from one
    # address, so remember the answer per address (bounded).
    answers: dict[bytes, bool] = {}

    def match(request: Request) -> bool:
        answer = answers.get(request.peer_ip)
        if answer is None:
            if len(answers) >= 4096:
                answers.clear()
            answer = in_networks(client_address(request.peer_ip), networks)
            answers[request.peer_ip] = answer
        return answer

    return match


def _networks(texts: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


class Overrides:
    """The preview policy and pin rules of one snapshot.

    `headers` maps the request header names they read to the kinds ClientConnection
    captures (it is merged into server.request_headers), so no header is looked at
    twice. A disabled preview header is still dropped: it is a control header.
    """

    __slots__ = (
        "_allow",
        "_counters",
        "_needs_address",
        "_needs_cookies",
        "_needs_host",
        "_preview",
        "_preview_cookie",
        "_reads_sticky",
        "_rules",
        "_secret",
        "active",
        "headers",
    )

    def __init__(
        self, snapshot: RoutingSnapshot, counters: OverrideCounters, sticky_header: bytes | None
    ) -> None:
        self._counters = counters
        self.headers: dict[bytes, int] = {}
        preview = snapshot.preview
        self._preview = preview.enabled
        self._secret = preview.secret
        self._allow = _networks(preview.allow_networks)
        self._preview_cookie = preview.cookie.encode() if self._preview else b""
        if preview.header:
            self.headers[preview.header.lower().encode()] = H_PREVIEW if self._preview else H_DROP
        self._reads_sticky = False
        self._needs_host = self._needs_address = False
        self._needs_cookies = bool(self._preview_cookie)
        self._rules = tuple(self._compile(pin, sticky_header) for pin in snapshot.pins)
        self.active = self._preview or bool(self._rules)

    def _compile(
        self, pin: PinRule, sticky_header: bytes | None
    ) -> tuple[str, str, tuple[Condition, ...]]:
        conditions: list[Condition] = []
        values = frozenset(v.encode() for v in pin.values)
        if pin.header:
            name = pin.header.lower().encode()
            if name == sticky_header:  # steering captures it already, as H_STICKY
                code = H_STICKY
                self._reads_sticky = True
            else:
                code = self.headers.setdefault(name, H_PIN + len(self.headers))
            conditions.append(_header(code, values))
        if pin.cookie:
            conditions.append(_cookie(pin.cookie.encode(), values))
            self._needs_cookies = True
        if pin.hosts:
            conditions.append(_host(frozenset(normalise_host(h.encode()) for h in pin.hosts)))
            self._needs_host = True
        if pin.path_prefixes:
            conditions.append(_path(tuple(p.encode() for p in pin.path_prefixes)))
        if pin.networks:
            conditions.append(_network(_networks(pin.networks)))
            self._needs_address = True
        return pin.name, pin.to, tuple(conditions)

    def decide(
        self,
        host: bytes | None,
        url: bytes,
        cookie_header: bytes | None,
        captured: dict[int, bytes] | None,
        sticky: bytes | None,
        peer_ip: bytes,
    ) -> str | None:
        """The color a request head is sent to regardless of its bucket, or None."""
        cookies = _NO_COOKIES
        if self._needs_cookies and cookie_header is not None:
            cookies = parse_cookies(cookie_header)
        headers = captured or {}
        if self._preview:
            color = self._preview_color(headers, cookies, peer_ip)
            if color is not None:
                return color
        if not self._rules:
            return None
        if self._reads_sticky and sticky is not None:
            headers = {**headers, H_STICKY: sticky}
        request = Request(
            normalise_host(host) if self._needs_host and host is not None else b"",
            url,
            cookies,
            headers,
            peer_ip,
        )
        for name, to, conditions in self._rules:
            for condition in conditions:
                if not condition(request):
                    break
            else:
                pins = self._counters.pins
                pins[name] = pins.get(name, 0) + 1
                return to
        return None

    def _preview_color(
        self, headers: dict[int, bytes], cookies: dict[bytes, bytes], peer_ip: bytes
    ) -> str | None:
        """The header's color, else the cookie's; None (and counted) unless it is honoured."""
        value = headers.get(H_PREVIEW)
        if value is None:
            value = cookies.get(self._preview_cookie) if self._preview_cookie else None
            if value is None:
                return None
        counters = self._counters
        value = value.strip()
        if b"." in value:  # a signed token: its signature decides, wherever it comes from
            color, reason = verify_token(self._secret, value, time.time())
            if color is None:
                counters.preview_ignored[reason] += 1
                return None
            counters.preview_honoured["signature"] += 1
            return _COLORS[color]
        name = _COLORS.get(value.lower())
        if name is None:
            counters.preview_ignored["malformed"] += 1
            return None
        if not in_networks(client_address(peer_ip), self._allow):
            counters.preview_ignored["disallowed"] += 1
            return None
        counters.preview_honoured["network"] += 1
        return name
