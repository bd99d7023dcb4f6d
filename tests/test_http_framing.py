"""Message framing past the head: errors in the bytes that came with a head reach no
app, chunk sizes beyond the body limit are refused when declared, trailers pass both
ways, an early refusal from the app reaches the client at once, and an Upgrade request
may carry a body (RFC 9110 6.5, 7.8, 15.5; RFC 9112 7.1, 9.6). End to end through a
zdproxy process against scripted upstreams, then the client connection alone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import (
    RawHandler,
    RawUpstream,
    ZdProxy,
    pools,
    raw_exchange,
    unchecked,
    wait_until,
)
from tests.test_http_basic import read_response
from tests.test_http_strict import answers
from zdproxy.config.loader import settings_from_mapping
from zdproxy.dataplane.body import declared_chunk, last_chunk
from zdproxy.dataplane.exchange import Exchange
from zdproxy.dataplane.server import ProxyServer
from zdproxy.dataplane.upstream import UpstreamConnection, UpstreamPool
from zdproxy.ops.limits import dataplane_limits
from zdproxy.routing.address import Address
from zdproxy.routing.snapshot import UpstreamTarget, upstream_id

StartProxy = Callable[..., ZdProxy]
StartRaw = Callable[[RawHandler], Awaitable[RawUpstream]]

CHUNKED_HEAD = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
GOOD = b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# Chunked bodies llhttp refuses, each in the read that holds its head.
BAD_CHUNKS = {
    "a negative size": b"-1\r\nabc\r\n0\r\n\r\n",
    "a 0x prefix": b"0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
    "an empty size": b"\r\nabc\r\n0\r\n\r\n",
    "a space after the size": b"3 \r\nabc\r\n0\r\n\r\n",
    "a tab after the size": b"3\t\r\nabc\r\n0\r\n\r\n",
    "a bare LF after the size": b"3\nabc\r\n0\r\n\r\n",
    "no CRLF after the data": b"3\r\nabcX\r\n0\r\n\r\n",
    "a size that overflows": b"1" + b"0" * 20 + b"\r\nabc",
}


async def keep_alive_upstream(raw_upstream: StartRaw) -> RawUpstream:
    """Answers every request head with 200 on the same connection; reads no body."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(OK)
            await writer.drain()

    return await raw_upstream(handler)


async def warm(proxy: ZdProxy) -> None:
    """One good request, so that the proxy keeps an idle connection to the upstream:
    a request head would go out on it at once, with no connect to wait for."""
    raw = await raw_exchange(proxy, GOOD, until_close=False)
    assert raw.startswith(b"HTTP/1.1 200"), raw


@pytest.mark.parametrize("body", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
async def test_a_framing_error_that_came_with_the_head_gets_400_and_nothing_is_forwarded(
    zdproxy: StartProxy, raw_upstream: StartRaw, body: bytes
) -> None:
    up = await keep_alive_upstream(raw_upstream)
    proxy = zdproxy({"pools": unchecked(pools([up.address]))})
    await warm(proxy)
    before = bytes(up.received)
    raw = await raw_exchange(proxy, CHUNKED_HEAD + body)
    assert raw.startswith(b"HTTP/1.1 400"), raw
    assert b"Connection: close" in raw
    assert up.received == before  # the idle connection got no head either
    assert up.connections == 1


@pytest.mark.parametrize("body", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
async def test_a_framing_error_in_the_first_read_starts_no_request(body: bytes) -> None:
    assert await answers([CHUNKED_HEAD + body]) == [b"400"]
    # A good request before it in the same read is served; the bad one is refused after.
    assert await answers([GOOD + CHUNKED_HEAD + body]) == [b"/warm", b"400"]


async def test_a_chunk_declared_beyond_the_body_limit_gets_413_before_its_data(
    zdproxy: StartProxy, raw_upstream: StartRaw
) -> None:
    up = await keep_alive_upstream(raw_upstream)
    # A long body timeout: a 408 could not come before the bounded wait below ends.
    limits = {"max_body_bytes": "1MiB", "header_timeout": "60s"}
    proxy = zdproxy({"pools": unchecked(pools([up.address])), "proxy": limits})
    await warm(proxy)
    before = bytes(up.received)
    # The size line and a little data; the 16 MiB the line declares never come.
    raw = await raw_exchange(proxy, CHUNKED_HEAD + b"1000000\r\nabc", within=5.0)
    assert raw.startswith(b"HTTP/1.1 413"), raw
    assert up.received == before
    # A size line split over two reads and a chunk after smaller ones count the same.
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(CHUNKED_HEAD + b"400\r\n" + b"a" * 1024 + b"\r\nF")
    await writer.drain()
    writer.write(b"FFFF0\r\nabc")  # 0xFFFFF0 more: beyond the limit
    async with asyncio.timeout(5):
        head, _ = await read_response(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413"), head


async def test_chunks_within_the_limit_pass() -> None:
    body = b"400\r\n" + b"a" * 1024 + b"\r\n0\r\n\r\n"
    assert await answers([CHUNKED_HEAD + body]) == [b"/up"]


def test_the_declared_size_is_read_back_from_the_read() -> None:
    data = b"head\r\n\r\n1f;name=value\r\nabc"
    assert declared_chunk(data, len(data) - 3) == 0x1F
    assert declared_chunk(b"F0\r\n", 4) == 0xF0
    assert declared_chunk(b"X-T: 1\r\n", 8) == 0  # a trailer field: no size
    assert declared_chunk(b"abc", 3) == 0


async def test_trailers_are_forwarded_both_ways(
    zdproxy: StartProxy, raw_upstream: StartRaw
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"0\r\n")
        await reader.readuntil(b"\r\n\r\n")  # the trailer section's end
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Digest\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Digest: sha-256=abc\r\nContent-Type: text/evil\r\n\r\n"
        )
        await writer.drain()

    up = await raw_upstream(handler)
    proxy = zdproxy({"pools": unchecked(pools([up.address]))})
    request = (
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Sum: 42\r\nHost: evil\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request)
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    # The app got the request's trailer, and not the one that would change its routing.
    sent = bytes(up.received)
    assert sent.endswith(b"3\r\nabc\r\n0\r\nX-Sum: 42\r\n\r\n"), sent
    assert b"Trailer: X-Sum\r\n" in sent
    # The client got the app's trailer, and not one that would change the content type.
    assert b"Trailer: X-Digest" in head
    assert body == b"5\r\nhello\r\n0\r\nX-Digest: sha-256=abc\r\n\r\n", body


async def test_an_http10_client_gets_the_body_without_trailers(
    zdproxy: StartProxy, raw_upstream: StartRaw
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Digest: 1\r\n\r\n"
        )
        await writer.drain()

    up = await raw_upstream(handler)
    proxy = zdproxy({"pools": unchecked(pools([up.address]))})
    raw = await raw_exchange(proxy, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200"), raw
    assert raw.endswith(b"\r\n\r\nhello"), raw


def test_the_last_chunk_keeps_only_forwardable_trailers() -> None:
    fields = [b"X-A", b": ", b"1", b"\r\n", b"content-length", b": ", b"3", b"\r\n"]
    assert last_chunk(fields) == b"0\r\nX-A: 1\r\n\r\n"
    assert last_chunk(fields[4:]) == b"0\r\n\r\n"


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "100-continue"])
async def test_an_early_refusal_reaches_the_client_at_once(
    zdproxy: StartProxy, raw_upstream: StartRaw, expect: bool
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head alone decides
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
        await writer.drain()
        await reader.read()  # until the proxy closes this connection

    up = await raw_upstream(handler)
    proxy = zdproxy({"pools": unchecked(pools([up.address]))})
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
    writer.write(head + (b"Expect: 100-continue\r\n" if expect else b"") + b"\r\n")
    if not expect:
        writer.write(b"a" * 1000)  # a little of the body; the rest never comes
    async with asyncio.timeout(5):  # far less than any timeout the proxy has
        if expect:
            interim, _ = await read_response(reader)
            assert interim.startswith(b"HTTP/1.1 100 Continue")
        final, body = await read_response(reader)
        assert final.startswith(b"HTTP/1.1 403") and body == b"no", final
        assert b"Connection: close" in final  # the body's rest is not read as a request
        assert await reader.read() == b""  # and the connection closes
    writer.close()
    # The upstream connection was not kept: the app would wait for the body's rest.
    await raw_exchange(proxy, GOOD.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert up.connections == 2


class Recording:
    """An upstream transport that keeps what is written to it."""

    def __init__(self) -> None:
        self.sent = bytearray()

    def write(self, data: bytes) -> None:
        self.sent += data

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.sent += chunk


class Attached:
    def __init__(self) -> None:
        self.transport = Recording()


@pytest.mark.parametrize("chunked", [False, True])
def test_after_a_refusal_the_rest_of_the_body_stays_here(chunked: bool) -> None:
    exchange = Exchange(
        None,  # type: ignore[arg-type]  # never called back in this test
        b"POST / HTTP/1.1\r\n\r\n",
        is_head=False,
        method=b"POST",
        chunked=chunked,
        body_expected=True,
        keep_alive=True,
        http10=False,
        upgrade=False,
    )
    upstream = Attached()
    exchange.upstream = upstream  # type: ignore[assignment]
    exchange.send_body(b"first")
    exchange.decline()
    exchange.send_body(b"second")
    exchange.finish_body()
    assert bytes(upstream.transport.sent) == (b"5\r\nfirst\r\n" if chunked else b"first")
    assert exchange.request_complete and not exchange.replayable


TUNNEL_OPEN = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (b"Content-Length: 5\r\n", b"hello"),
        (b"Transfer-Encoding: chunked\r\n", b"2\r\nhe\r\n3;x=y\r\nllo\r\n0\r\nX-T: 1\r\n\r\n"),
    ],
    ids=["content-length", "chunked"],
)
async def test_an_upgrade_request_may_carry_a_body(
    zdproxy: StartProxy, raw_upstream: StartRaw, framing: bytes, body: bytes
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if b"chunked" in framing:
            await reader.readuntil(b"\r\n\r\n")  # the last chunk and its trailer
        else:
            await reader.readexactly(5)
        writer.write(TUNNEL_OPEN)
        writer.write(await reader.readexactly(len(b"PING")))  # the new protocol: echo
        await writer.drain()

    up = await raw_upstream(handler)
    proxy = zdproxy({"pools": unchecked(pools([up.address]))})
    head = b"POST /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n" + framing
    # All in one write: the head, the body, and the first bytes of the new protocol.
    raw = await raw_exchange(proxy, head + b"\r\n" + body + b"PING")
    assert raw.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), raw
    assert raw.endswith(b"\r\n\r\nPING"), raw
    sent = bytes(up.received)
    assert sent.endswith(b"\r\n\r\n" + body + b"PING"), sent  # the body once, as sent


async def test_an_upgrade_request_whose_body_breaks_its_framing_gets_400() -> None:
    head = b"POST /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n"
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n"
    assert await answers([chunked + b"zz\r\n"]) == [b"400"]  # nothing was sent


async def test_an_upgrade_body_broken_in_a_later_read_gets_400_and_no_tunnel(
    zdproxy: StartProxy, raw_upstream: StartRaw
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):  # reads whatever comes, never answers
            pass

    up = await raw_upstream(handler)
    proxy = zdproxy({"pools": unchecked(pools([up.address]))})
    head = b"POST /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n"
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
    await wait_until(lambda: up.received.endswith(b"2\r\nab\r\n"))  # head and chunk sent on
    writer.write(b"zz\r\nNEW-PROTOCOL")
    async with asyncio.timeout(5):
        answer = await reader.read()  # until zdproxy closes
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400") and b"Connection: close" in answer, answer
    assert b"zz" not in up.received and b"NEW-PROTOCOL" not in up.received


async def test_a_request_pipelined_in_the_same_read_gets_its_line_checked() -> None:
    get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    post = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    bad = b"GET  /b HTTP/1.1\r\nHost: x\r\n\r\n"
    assert await answers([get + get + bad]) == [b"/a", b"/a", b"400"]
    assert await answers([post + bad]) == [b"/p", b"400"]
    assert await answers([get + b"\r\n" + bad]) == [b"/a", b"400"]  # an empty line first
    assert await answers([post + get + post]) == [b"/p", b"/a", b"/p"]


# -- a pooled connection comes back reading ---------------------------------------------


class Paused(Recording):
    """An upstream transport that also says whether it is reading."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("a reusable connection is kept, not closed")


class SlowReader:
    """A client whose write buffer is full for the whole response (ClientSide)."""

    def __init__(self) -> None:
        self.transport = Recording()
        self.writing_paused = False
        self.deadline = 0.0
        self.peer_ip = b"192.0.2.1"
        self.done: list[Exchange] = []

    def exchange_done(self, exchange: Exchange, now: float) -> None:
        self.done.append(exchange)

    def retry_status(self, *args: object) -> bool:
        return False


async def test_a_connection_paused_for_a_slow_client_is_pooled_reading_again() -> None:
    limits = dataplane_limits(settings_from_mapping({"pools": pools(["127.0.0.1:9"])}))
    ctx = ProxyServer(limits).ctx
    address = Address.parse("127.0.0.1:9")
    pool = UpstreamPool(UpstreamTarget(upstream_id("blue", address), "blue", address), ctx)
    conn = UpstreamConnection(pool)
    transport = Paused()
    conn.connection_made(transport)  # type: ignore[arg-type]
    client = SlowReader()
    exchange = Exchange(
        client,  # type: ignore[arg-type]
        b"GET / HTTP/1.1\r\n\r\n",
        is_head=False,
        method=b"GET",
        chunked=False,
        body_expected=False,
        keep_alive=True,
        http10=False,
        upgrade=False,
    )
    exchange.request_complete = True
    exchange.started = ctx.loop.time()
    pool.outstanding = 1
    conn.attach(exchange)
    # The client's buffer fills as the response is relayed, and holds the upstream: the
    # same read that paused it ends the response.
    client.writing_paused = True
    transport.pause_reading()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert client.done == [exchange]
    assert pool.idle == [conn] and transport.reading
