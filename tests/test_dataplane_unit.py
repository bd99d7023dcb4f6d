"""The data plane in-process, without the daemon or the settings: its limits, the
routing decision, the one client-address function, and a ProxyServer on real
loopback sockets built from nothing but a Limits value and a snapshot."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.test_pins import FAR, SECRET, sign
from zdproxy.config.loader import settings_from_mapping
from zdproxy.dataplane.context import RETRY_WINDOW, RetryBudget, RetryKind
from zdproxy.dataplane.http import H_PREVIEW, parse_cookies
from zdproxy.dataplane.limits import Limits
from zdproxy.dataplane.peers import client_address
from zdproxy.dataplane.route import SPLIT, Route, Router, Via
from zdproxy.dataplane.server import ProxyServer
from zdproxy.ops.limits import dataplane_limits
from zdproxy.routing.address import Address
from zdproxy.routing.records import OverrideCounters
from zdproxy.routing.snapshot import (
    PinRule,
    PreviewPolicy,
    RoutingSnapshot,
    StickyPolicy,
    UpstreamTarget,
    upstream_id,
)

POOLS = {"pools": {"blue": {"upstreams": ["127.0.0.1:9001"]}}}


def limits(**sections: Any) -> Limits:
    return dataplane_limits(settings_from_mapping({**POOLS, **sections}))


# -- limits: built outside the data plane, frozen ---------------------------------------


def test_limits_carry_the_settings_and_derive_the_hot_path_values() -> None:
    built = limits(
        proxy={"via": "edge", "header_timeout": "2s", "trusted_proxies": ["10.0.0.0/8"]},
        upstream={"connect_timeout": "40ms"},
        retry={"budget_percent": 20},
        log={"access": True, "access_sample": 0.5},
    )
    assert built.header_timeout == 2.0 and built.connect_timeout == 0.04
    assert built.via_line == b"Via: 1.1 edge\r\n"
    assert built.head_end == b"Via: 1.1 edge\r\n\r\n"
    assert built.retry_share == 0.2
    assert built.tick == 0.01  # a quarter of the shortest timeout
    assert built.access is not None and built.access.sample == 0.5
    with pytest.raises(AttributeError):
        built.header_timeout = 5.0  # type: ignore[misc]
    assert limits(proxy={"via": ""}).head_end == b"\r\n"
    assert limits().access is None


# -- one client-address function for trusted proxies and pins --------------------------


def test_a_trusted_proxy_given_as_ipv4_is_trusted_at_its_ipv4_mapped_address() -> None:
    trusting = limits(proxy={"trusted_proxies": ["127.0.0.1"]})
    assert trusting.trusts(b"127.0.0.1")
    assert trusting.trusts(b"::ffff:127.0.0.1")  # a dual-stack listener's view of it
    assert not trusting.trusts(b"::ffff:127.0.0.2")
    assert not trusting.trusts(b"not an address")
    assert not limits().trusts(b"127.0.0.1")  # nobody is trusted by default


def test_client_address_unwraps_ipv4_mapped_peers_only() -> None:
    assert str(client_address(b"::ffff:192.0.2.7")) == "192.0.2.7"
    assert str(client_address(b"2001:db8::1")) == "2001:db8::1"
    assert client_address(b"garbage") is None


def test_a_network_pin_sees_the_same_client_as_the_trusted_proxies() -> None:
    snapshot = RoutingSnapshot(
        1, "blue", 0, pins=(PinRule("lo", "green", networks=("127.0.0.1",)),)
    )
    router = Router(snapshot, OverrideCounters())
    for peer in (b"127.0.0.1", b"::ffff:127.0.0.1"):
        assert router.decide(None, b"/", None, None, None, peer) == Route(Via.PIN, "green")


# -- the routing decision: preview, then pins, then the bucket -------------------------


def test_the_decision_order_is_preview_then_pins_then_bucket() -> None:
    snapshot = RoutingSnapshot(
        1,
        "blue",
        5000,
        pins=(PinRule("beta", "candidate", path_prefixes=("/beta",)),),
        preview=PreviewPolicy(secret=SECRET),
    )
    router = Router(snapshot, OverrideCounters())
    token = {H_PREVIEW: sign(SECRET, "blue", FAR).encode()}

    def decide(url: bytes, captured: dict[int, bytes] | None, cookies: bytes | None) -> Route:
        return router.decide(b"h", url, cookies, captured, None, b"192.0.2.1")

    assert decide(b"/beta/x", token, None) == Route(Via.PREVIEW, "blue")  # beats the pin
    assert decide(b"/beta/x", None, b"zd_bucket=u1") == Route(Via.PIN, "candidate")
    by_bucket = decide(b"/x", None, b"zd_bucket=u1")
    assert by_bucket.via is Via.BUCKET and by_bucket.to is None
    assert 0 <= by_bucket.bucket < 10000 and by_bucket.set_cookie == b""
    assert decide(b"/y", None, b"zd_bucket=u1").bucket == by_bucket.bucket  # sticky


def test_a_new_visitor_gets_a_bucket_cookie_and_keeps_its_bucket_with_it() -> None:
    snapshot = RoutingSnapshot(1, "blue", 1000, sticky=StickyPolicy(salt="s"))
    router = Router(snapshot, OverrideCounters())
    first = router.decide(b"h", b"/", b"zd_bucket=", None, None, b"192.0.2.1")  # empty: none
    assert first.via is Via.BUCKET and first.set_cookie.startswith(b"Set-Cookie: zd_bucket=")
    token = first.set_cookie.split(b"=", 1)[1].split(b";", 1)[0]
    again = router.decide(b"h", b"/", b"a=1; zd_bucket=" + token, None, None, b"192.0.2.9")
    assert again == Route(Via.BUCKET, None, first.bucket, b"")


def test_an_all_or_nothing_split_without_rules_decides_nothing() -> None:
    for weight in (0, 10000):
        router = Router(RoutingSnapshot(1, "blue", weight), OverrideCounters())
        assert not router.active  # the client does not even call decide
        assert router.decide(b"h", b"/", b"zd_bucket=u", None, None, b"192.0.2.1") is SPLIT


def test_one_cookie_parser_first_value_wins_quotes_stripped() -> None:
    parsed = parse_cookies(b'a=1; b="two" ;a=3; flag; c=')
    assert parsed == {b"a": b"1", b"b": b"two", b"c": b""}


# -- a ProxyServer from a Limits value, on real loopback sockets -----------------------


@pytest.fixture
async def echo_upstream() -> AsyncIterator[tuple[Address, list[bytes]]]:
    """An app server that answers 200 and keeps every request head it got."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield Address("127.0.0.1", port), heads
    server.close()
    await server.wait_closed()


async def test_a_trusted_ipv4_proxy_on_a_dual_stack_listener_keeps_its_forwarded_for(
    echo_upstream: tuple[Address, list[bytes]],
) -> None:
    address, heads = echo_upstream
    proxy = ProxyServer(limits(proxy={"trusted_proxies": ["127.0.0.1"]}))
    proxy.apply(
        RoutingSnapshot(
            1,
            "blue",
            0,
            pools={"blue": (UpstreamTarget(upstream_id("blue", address), "blue", address),)},
        )
    )
    # What systemd's default (BindIPv6Only=both) hands over: IPv4 peers arrive as
    # ::ffff:a.b.c.d. Bound to the mapped loopback address, so nothing leaves the host.
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::ffff:127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    await proxy.listen(listener)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.readuntil(b"ok"), 10)
        writer.close()
    finally:
        assert await proxy.stop(5) == 0
    assert response.startswith(b"HTTP/1.1 200 ")
    # Kept and appended to, as from any trusted proxy; an untrusted peer's is replaced.
    assert b"X-Forwarded-For: 203.0.113.7, ::ffff:127.0.0.1\r\n" in heads[-1]


def test_the_retry_budget_allows_three_then_a_share_of_the_window() -> None:
    budget = RetryBudget(share=0.1)
    for _ in range(3):  # a quiet proxy may still retry a few
        assert budget.allowed()
        budget.spend(RetryKind.RESET)
    assert not budget.allowed()
    assert budget.counts == {"connect": 0, "reset": 3, "status": 0, "evacuate": 0, "over_budget": 1}
    budget.requests = 100  # 10% of 100 requests: ten retries in this window
    assert budget.allowed()
    budget.roll(RETRY_WINDOW - 0.1)  # the window is not over yet
    assert budget.retries == 3
    budget.roll(RETRY_WINDOW)
    assert (budget.requests, budget.retries) == (0, 0)
    assert budget.counts["reset"] == 3  # the running counts are kept across windows
