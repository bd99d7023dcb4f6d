"""Strict request heads: the request line's single spaces, the Host value, and
Proxy-Authorization kept from the app unless configured (RFC 9112 3, 3.2; RFC 9110
11.7.4). End to end through a zdproxy process, then the client connection alone, fed
every split of a request into reads."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    RawHandler,
    RawUpstream,
    Upstream,
    ZdProxy,
    pools,
    raw_exchange,
    unchecked,
    wait_until,
)
from tests.test_http_basic import header, read_response
from tests.test_http_errors import recording_upstream
from zdproxy.config.loader import settings_from_mapping
from zdproxy.dataplane.balancer import RoutingTable
from zdproxy.dataplane.client import ClientConnection
from zdproxy.dataplane.exchange import Exchange, UpstreamSide
from zdproxy.dataplane.server import ProxyServer
from zdproxy.dataplane.validate import valid_host
from zdproxy.ops.limits import dataplane_limits
from zdproxy.routing.address import Address
from zdproxy.routing.records import UpstreamStats
from zdproxy.routing.snapshot import RoutingSnapshot, UpstreamTarget

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]
StartRaw = Callable[[RawHandler], Awaitable[RawUpstream]]

LINE = b"malformed request line"
HOST = b"invalid Host"

# Each: the request, and what zdproxy's 400 says.
REFUSED = {
    "two spaces before the target": (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", LINE),
    "two spaces before the version": (b"GET /  HTTP/1.1\r\nHost: x\r\n\r\n", LINE),
    "a space in Host": (b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n", HOST),
    "an empty Host": (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", HOST),
    "a port but no host": (b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n", HOST),
    "a port that is not digits": (b"GET / HTTP/1.1\r\nHost: x:8o\r\n\r\n", HOST),
    "userinfo in Host": (b"GET / HTTP/1.1\r\nHost: user@x\r\n\r\n", HOST),
    "a path in Host": (b"GET / HTTP/1.1\r\nHost: x/y\r\n\r\n", HOST),
    "a bad %-escape": (b"GET / HTTP/1.1\r\nHost: %zz\r\n\r\n", HOST),
    "an unclosed IP literal": (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", HOST),
    "an IP literal that is no IPv6 address": (b"GET / HTTP/1.1\r\nHost: [1::2::3]\r\n\r\n", HOST),
    "userinfo in an absolute-form target": (
        b"GET http://user@x/ HTTP/1.1\r\nHost: x\r\n\r\n",
        HOST,
    ),
    "HTTP/1.1 without Host": (b"GET / HTTP/1.1\r\n\r\n", b"Host header is required"),
    "HTTP/1.1 absolute form without Host": (
        b"GET http://x/ HTTP/1.1\r\n\r\n",
        b"Host header is required",
    ),
    "two Hosts": (b"GET / HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n", b"Host header is required"),
}


@pytest.mark.parametrize(("request_bytes", "detail"), REFUSED.values(), ids=REFUSED.keys())
async def test_bad_request_lines_and_hosts_get_400_close_and_reach_no_upstream(
    zdproxy: StartProxy, raw_upstream: StartRaw, request_bytes: bytes, detail: bytes
) -> None:
    up = await recording_upstream(raw_upstream)
    proxy = zdproxy({"pools": unchecked(pools([up.address]))})  # no probe connects either
    raw = await raw_exchange(proxy, request_bytes)  # returns once the proxy closed
    assert raw.startswith(b"HTTP/1.1 400"), raw
    assert b"Connection: close" in raw
    assert detail in raw
    assert up.received == b""
    assert up.connections == 0


async def test_hosts_with_ports_and_ip_literals_pass_unchanged(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    hosts = [
        "example.com:8080",
        "[::1]:8080",
        "[2001:db8::ffff:192.0.2.1]",
        "192.0.2.1",
        "xn--bcher-kva.example",
        "under_score.local:",  # an empty port is still a port (RFC 3986 3.2.3)
        "%65xample.com",
    ]
    for host in hosts:
        raw = await raw_exchange(
            proxy, b"GET /h HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode()
        )
        assert raw.startswith(b"HTTP/1.1 200"), (host, raw)
        assert header(blue.seen[-1]["headers"], "Host") == [host]
    # An absolute-form target's authority ends at the query of an empty path, too.
    raw = await raw_exchange(
        proxy, b"GET http://example.test?x=1 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 200"), raw
    assert blue.seen[-1]["path"] == "/?x=1"
    assert header(blue.seen[-1]["headers"], "Host") == ["example.test"]


async def test_each_request_on_a_keep_alive_connection_gets_its_line_checked(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _ = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"GET  /second HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        raw = await reader.read()  # until zdproxy closes the connection
    writer.close()
    assert raw.startswith(b"HTTP/1.1 400") and LINE in raw, raw
    assert [seen["path"] for seen in blue.seen] == ["/first"]


async def test_proxy_authorization_reaches_the_app_only_if_configured(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    credentials = {"Proxy-Authorization": "Basic cHJveHk6c2VjcmV0", "Authorization": "Bearer app"}
    seen: dict[bool, dict[str, Any]] = {}
    for forward in (False, True):
        proxy = zdproxy(
            {"pools": pools([blue.address]), "proxy": {"forward_proxy_authorization": forward}}
        )
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{proxy.url}/auth", headers=credentials) as response,
        ):
            assert response.status == 200
            seen[forward] = await response.json()
    assert "Proxy-Authorization" not in seen[False]["headers"]
    assert seen[False]["headers"]["Authorization"] == "Bearer app"  # the app's own: kept
    assert seen[True]["headers"]["Proxy-Authorization"] == "Basic cHJveHk6c2VjcmV0"


# -- the client connection alone: every split of a request into reads ------------------


class Wire(asyncio.Transport):
    """The client's side of a connection: records what zdproxy writes to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Recorder:
    """One app server, as the client connection sees it (its pool and its one connection
    in one): it keeps the target of each request dispatched to it, in order, and answers
    each at once, so that what is owed next follows. A fake the connection is given,
    rather than a subclass of it: the compiled build's classes take none."""

    def __init__(self) -> None:
        self.target = UpstreamTarget("blue/127.0.0.1:9", "blue", Address.parse("127.0.0.1:9"))
        self.stats = UpstreamStats(self.target.id)
        self.outstanding = 0
        self.transport: asyncio.Transport = Wire()
        self.exchange: Exchange | None = None
        self.passed: list[bytes] = []

    def take_idle(self) -> UpstreamSide:
        return self

    def connect(self, exchange: Exchange) -> None:
        raise AssertionError("take_idle always has a connection")

    def attach(self, exchange: Exchange) -> None:
        self.passed.append(exchange.head.split(b" ", 2)[1])
        self.outstanding -= 1
        exchange.client.exchange_done(exchange, 0.0)


async def answers(reads: list[bytes]) -> list[bytes]:
    """The targets of the requests in these reads that pass, then the status refusing
    the first that does not, if one does not."""
    limits = dataplane_limits(settings_from_mapping({"pools": pools(["127.0.0.1:9"])}))
    ctx = ProxyServer(limits).ctx
    app = Recorder()
    snapshot = RoutingSnapshot(1, "blue", 0, pools={"blue": (app.target,)})
    ctx.route_by(RoutingTable(snapshot, {app.target.id: app}))
    conn = ClientConnection(ctx, b"http")
    wire = Wire()
    conn.connection_made(wire)
    for data in reads:
        conn.data_received(data)
    return app.passed + re.findall(rb"HTTP/1.1 (\d{3})", wire.written)


def splits(request: bytes) -> list[list[bytes]]:
    """The request whole, in two reads at every point, and one byte per read."""
    two = [[request[:i], request[i:]] for i in range(1, len(request))]
    return [[request], *two, [request[i : i + 1] for i in range(len(request))]]


@pytest.mark.parametrize(
    ("request_bytes", "answer"),
    [
        (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", b"/a"),
        (b"\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n", b"/a"),  # empty lines first
        (b"GET  /a HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET /a  HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET /a\r\nHost: x\r\n\r\n", b"505"),  # HTTP/0.9, however it is read
    ],
    ids=["good", "empty lines first", "two spaces before the target", "two before the version",
         "no version"],
)  # fmt: skip
async def test_a_request_line_gets_the_same_answer_however_it_is_read(
    request_bytes: bytes, answer: bytes
) -> None:
    for reads in splits(request_bytes):
        assert await answers(reads) == [answer], reads


async def test_every_request_that_starts_a_read_is_checked_and_bodies_never_are() -> None:
    get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    post = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n"
    bad = b"GET  /b HTTP/1.1\r\nHost: x\r\n\r\n"
    assert await answers([get, get, bad]) == [b"/a", b"/a", b"400"]
    # A body that starts a read is no request line, even if it looks like a bad one.
    assert await answers([post, b"GET  /x\r\n\r\n", get]) == [b"/p", b"/a"]
    assert await answers([post + b"GET  /x\r\n\r\n" + get]) == [b"/p", b"/a"]


async def test_every_host_of_a_keep_alive_connection_is_checked() -> None:
    def get(host: bytes) -> bytes:
        return b"GET /%s HTTP/1.1\r\nHost: %s\r\n\r\n" % (host[:1], host)

    assert await answers([get(b"a"), get(b"a"), get(b"b:80")]) == [b"/a", b"/a", b"/b"]
    assert await answers([get(b"a"), get(b"a b")]) == [b"/a", b"400"]
    assert await answers([get(b"a"), b"GET / HTTP/1.1\r\nHost:\r\n\r\n"]) == [b"/a", b"400"]


def test_host_syntax() -> None:
    good = [b"a", b"A-b.c_d~e", b"192.0.2.1:80", b"x:", b"[::1]", b"[::ffff:192.0.2.1]:8080"]
    good += [b"%41b", b"!$&'()*+,;="]
    bad = [b"", b":80", b"a b", b"a:b", b"a:80:80", b"a@b", b"a/b", b"%4", b"%zz", b"[::1"]
    bad += [b"[::1]x", b"[1::2::3]", b"[v1.x]", b"[fe80::1%25eth0]", b"\xc3\xa9.example"]
    assert [host for host in good if not valid_host(host)] == []
    assert [host for host in bad if valid_host(host)] == []


# -- request ids ------------------------------------------------------------------------


async def test_request_ids_are_kept_or_made_forwarded_logged_and_in_our_errors(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    config = {"pools": pools([blue.address]), "proxy": {"request_id": True}}
    proxy = zdproxy({**config, "log": {"level": "info", "access": True}})
    sent = {
        "kept": "abc-123_x.y",
        "too long": "a" * 129,
        "a space": "two words",
        "a list": "one, two",
    }
    seen: dict[str, list[str]] = {}
    async with aiohttp.ClientSession() as session:
        for name, value in sent.items():
            headers = {"X-Request-Id": value}
            async with session.get(f"{proxy.url}/{name}", headers=headers) as response:
                assert response.status == 200
            seen[name] = header(blue.seen[-1]["headers"], "X-Request-Id")
        async with session.get(f"{proxy.url}/none") as response:
            assert response.status == 200
        seen["none"] = header(blue.seen[-1]["headers"], "X-Request-Id")
    assert seen["kept"] == ["abc-123_x.y"]
    made = [ids[0] for name, ids in seen.items() if name != "kept"]
    assert all(len(ids) == 1 for ids in seen.values()), seen  # exactly one, always
    assert len(set(made)) == len(made) and all(
        re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", i) for i in made
    )
    # The access log names each request's id.
    await wait_until(lambda: sum("logger=zdproxy.access" in line for line in proxy.log_lines) == 5)
    logged = [line for line in proxy.log_lines if "logger=zdproxy.access" in line]
    assert "request_id=abc-123_x.y" in logged[0]
    assert all(f"request_id={i}" in "".join(logged) for i in made)
    # zdproxy's own error reply carries it too, so that a client can report it.
    down = zdproxy({"pools": unchecked(pools(["127.0.0.1:9"])), "proxy": {"request_id": True}})
    raw = await raw_exchange(
        down, b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-Id: r-1\r\n\r\n", until_close=False
    )
    assert raw.startswith(b"HTTP/1.1 502") and b"\r\nX-Request-Id: r-1\r\n" in raw, raw
    # Off (the default), the client's id passes untouched and none is made.
    plain = zdproxy({"pools": pools([blue.address])})
    async with (
        aiohttp.ClientSession() as session,
        session.get(plain.url, headers={"X-Request-Id": "a b"}) as response,
    ):
        assert response.status == 200
    assert header(blue.seen[-1]["headers"], "X-Request-Id") == ["a b"]
