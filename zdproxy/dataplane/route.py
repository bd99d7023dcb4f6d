"""Where a request belongs, decided once per request head: the preview, then the pin
rules, then the sticky bucket. The answer is a Route, a plain value that the balancer
turns into an upstream when the request starts (RoutingTable.pick), so a pipelined
request follows the snapshot it is dispatched under.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from zdproxy.dataplane.http import H_STICKY, NO_COOKIES, REQUEST_HEADERS, parse_cookies
from zdproxy.dataplane.pins import Overrides
from zdproxy.dataplane.steering import Steering
from zdproxy.routing.records import OverrideCounters
from zdproxy.routing.snapshot import BASIS_POINTS, RoutingSnapshot
from zdproxy.routing.vocabulary import COLORS, PIN_TARGETS, PinTarget


class Via(IntEnum):
    """How the route was chosen (as Starlette's Match says how a route matched).

    The values index records.ROUTE_KINDS: UpstreamStats counts responses by them."""

    SPLIT = 0  # the split is 0 or 100%: everything goes one way, no bucket needed
    BUCKET = 1  # the sticky bucket against the candidate's weight
    PREVIEW = 2  # a preview header or cookie, honoured
    PIN = 3  # a pin rule matched


# Frozen with slots: its fields are read on the hot path, and slot reads are the fastest
# attribute reads CPython has (a NamedTuple's fields are descriptors it does not specialise).
@dataclass(frozen=True, slots=True)
class Route:
    via: Via
    to: PinTarget | None = None  # a preview's color or a pin's target; beats the bucket
    bucket: int = -1  # 0-9999 with Via.BUCKET
    set_cookie: bytes = b""  # a new bucket cookie to issue with the response


SPLIT = Route(Via.SPLIT)
# The routes a preview or a pin can give, made once: deciding allocates nothing for them.
_PREVIEW = {color: Route(Via.PREVIEW, color) for color in COLORS}
_PIN = {target: Route(Via.PIN, target) for target in PIN_TARGETS}


class Router:
    """The routing rules of one snapshot, compiled for the hot path.

    `active` is false when every request takes SPLIT (no pins, no enabled preview, a
    split of 0 or 100%): the client then does not call `decide` at all.
    `request_headers` are the header kinds the client connection captures for it.
    """

    __slots__ = ("_cookies", "_overrides", "_steering", "active", "request_headers")

    def __init__(self, snapshot: RoutingSnapshot, counters: OverrideCounters) -> None:
        weight = snapshot.candidate_weight
        steering = Steering(snapshot.sticky, 0 < weight < BASIS_POINTS)
        overrides = Overrides(snapshot, counters, steering.header)
        self._steering = steering
        self._overrides = overrides if overrides.active else None
        self._cookies = (steering.active and steering.reads_cookies) or (
            overrides.active and overrides.reads_cookies
        )
        self.active = steering.active or overrides.active
        headers = dict(REQUEST_HEADERS)
        if steering.header is not None:
            headers[steering.header] = H_STICKY
        for name, kind in overrides.headers.items():
            headers.setdefault(name, kind)  # never shadow a header we interpret
        self.request_headers = headers

    def decide(
        self,
        host: bytes | None,
        url: bytes,
        cookie_header: bytes | None,
        captured: dict[int, bytes] | None,
        sticky: bytes | None,
        peer_ip: bytes,
    ) -> Route:
        """The route of one request head: preview, then pins, then the bucket."""
        cookies = NO_COOKIES
        if self._cookies and cookie_header is not None:
            cookies = parse_cookies(cookie_header)
        overrides = self._overrides
        if overrides is not None:
            headers = captured or {}
            color = overrides.preview(headers, cookies, peer_ip)
            if color is not None:
                return _PREVIEW[color]
            target = overrides.pin(host, url, cookies, headers, sticky, peer_ip)
            if target is not None:
                return _PIN[target]
        steering = self._steering
        if steering.active:
            bucket, set_cookie = steering.bucket(peer_ip, cookies, sticky)
            return Route(Via.BUCKET, None, bucket, set_cookie)
        return SPLIT
