"""Pin rules and the preview override of one snapshot, compiled for the hot path.

Router.decide (route.py) asks the preview first, then the pins, once per request
head, and only when the snapshot has pins or an enabled preview. The answers are
colors or pin targets (each rule's RoutingSnapshot.destination, taken when the rules
are compiled); the balancer resolves them to pools when the request starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from zdproxy.dataplane.http import H_DROP, H_PIN, H_PREVIEW, H_STICKY
from zdproxy.dataplane.peers import IPNetwork, in_networks, networks
from zdproxy.routing.preview import verify_token
from zdproxy.routing.records import OverrideCounters
from zdproxy.routing.snapshot import PinRule, RoutingSnapshot
from zdproxy.routing.vocabulary import Color, PinTarget

_COLORS: dict[bytes, Color] = {b"blue": "blue", b"green": "green"}


def normalise_host(host: bytes) -> bytes:
    """Lowercase, without the port ("[::1]:8080" -> "[::1]")."""
    host = host.strip().lower()
    if host.startswith(b"["):
        return host[: host.find(b"]") + 1]
    return host.partition(b":")[0]


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


def _network(within: tuple[IPNetwork, ...]) -> Condition:
    # ipaddress containment costs microseconds; a client sends many requests from one
    # address, so remember the answer per address (bounded).
    answers: dict[bytes, bool] = {}

    def match(request: Request) -> bool:
        answer = answers.get(request.peer_ip)
        if answer is None:
            if len(answers) >= 4096:
                answers.clear()
            answer = in_networks(request.peer_ip, within)
            answers[request.peer_ip] = answer
        return answer

    return match


class Overrides:
    """The preview policy and pin rules of one snapshot.

    `headers` maps the request header names they read to the kinds ClientConnection
    captures (Router merges it into its request_headers), so no header is looked at
    twice. A disabled preview header is still dropped: it is a control header.
    """

    __slots__ = (
        "_allow",
        "_counters",
        "_needs_address",
        "_needs_host",
        "_preview",
        "_preview_cookie",
        "_reads_sticky",
        "_rules",
        "_secret",
        "active",
        "headers",
        "reads_cookies",
    )

    def __init__(
        self, snapshot: RoutingSnapshot, counters: OverrideCounters, sticky_header: bytes | None
    ) -> None:
        self._counters = counters
        self.headers: dict[bytes, int] = {}
        preview = snapshot.preview
        self._preview = preview.enabled
        self._secret = preview.secret
        self._allow = networks(preview.allow_networks)
        self._preview_cookie = preview.cookie.encode() if self._preview else b""
        if preview.header:
            self.headers[preview.header.lower().encode()] = H_PREVIEW if self._preview else H_DROP
        self._reads_sticky = False
        self._needs_host = self._needs_address = False
        self.reads_cookies = bool(self._preview_cookie)
        self._rules = tuple(
            self._compile(pin, snapshot.destination(pin), sticky_header) for pin in snapshot.pins
        )
        self.active = self._preview or bool(self._rules)

    def _compile(
        self, pin: PinRule, to: PinTarget, sticky_header: bytes | None
    ) -> tuple[str, PinTarget, tuple[Condition, ...]]:
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
            self.reads_cookies = True
        if pin.hosts:
            conditions.append(_host(frozenset(normalise_host(h.encode()) for h in pin.hosts)))
            self._needs_host = True
        if pin.path_prefixes:
            conditions.append(_path(tuple(p.encode() for p in pin.path_prefixes)))
        if pin.networks:
            conditions.append(_network(networks(pin.networks)))
            self._needs_address = True
        return pin.name, to, tuple(conditions)

    def pin(
        self,
        host: bytes | None,
        url: bytes,
        cookies: dict[bytes, bytes],
        headers: dict[int, bytes],
        sticky: bytes | None,
        peer_ip: bytes,
    ) -> PinTarget | None:
        """The target of the first rule the request head matches (counted), or None."""
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

    def preview(
        self, headers: dict[int, bytes], cookies: dict[bytes, bytes], peer_ip: bytes
    ) -> Color | None:
        """The header's color, else the cookie's; None (and counted) unless it is honoured."""
        if not self._preview:
            return None
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
        if not in_networks(peer_ip, self._allow):
            counters.preview_ignored["disallowed"] += 1
            return None
        counters.preview_honoured["network"] += 1
        return name
