"""Bad input and bad upstreams: the right status, nothing forwarded, no fake-complete response."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.conftest import (
    RawHandler,
    RawUpstream,
    Upstream,
    ZdProxy,
    free_port,
    pools,
    raw_exchange,
    unchecked,
    wait_until,
)

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]
StartRaw = Callable[[RawHandler], Awaitable[RawUpstream]]

FAST_TIMEOUTS = {"header_timeout": "300ms", "idle_timeout": "2s"}

SMUGGLING = {
    "CL and TE together": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    ),
    "two different Content-Lengths": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc"
    ),
    "Content-Length list": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
    "bad chunk size": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
    ),
    "chunk size overflow": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"fffffffffffffffff\r\nabc\r\n0\r\n\r\n"
    ),
    "unknown transfer coding": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
    ),
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n",
    "NUL in a header": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n",
    "bare CR in a header": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\rc\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n",
    "invalid method": b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "invalid target": b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
    "relative target": b"GET a/b HTTP/1.1\r\nHost: x\r\n\r\n",
}


async def recording_upstream(raw_upstream: StartRaw) -> RawUpstream:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    return await raw_upstream(handler)


@pytest.mark.parametrize("vector", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_smuggling_vectors_get_400_and_reach_no_upstream(
    zdproxy: StartProxy, raw_upstream: StartRaw, vector: bytes
) -> None:
    up = await recording_upstream(raw_upstream)
    proxy = zdproxy({"pools": unchecked(pools([up.address]))})  # no probe connects either
    raw = await raw_exchange(proxy, vector)  # returns once the proxy closed the connection
    assert raw.startswith(b"HTTP/1.1 400"), raw
    assert b"Connection: close" in raw
    assert raw.count(b"HTTP/1.1") == 1
    assert up.received == b""
    assert up.connections == 0


async def test_bad_request_after_a_good_one_is_answered_in_order(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    raw = await raw_exchange(
        proxy,
        b"GET /slow/100 HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nX: a\x00\r\n\r\n",
    )
    first, second = raw.index(b"HTTP/1.1 200"), raw.index(b"HTTP/1.1 400")
    assert first < second
    assert [entry["path"] for entry in blue.seen] == ["/slow/100"]


async def test_oversized_headers_get_431(zdproxy: StartProxy, raw_upstream: StartRaw) -> None:
    up = await recording_upstream(raw_upstream)
    proxy = zdproxy({"pools": pools([up.address]), "proxy": {"max_header_bytes": "4KiB"}})
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(60))
    raw = await raw_exchange(proxy, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert raw.startswith(b"HTTP/1.1 431")
    # One endless header line is cut off too, without waiting for its end.
    endless = b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 200_000
    raw = await raw_exchange(proxy, endless)
    assert raw.startswith(b"HTTP/1.1 431")
    assert up.received == b""


async def test_head_near_the_limit_in_small_reads_passes(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address]), "proxy": {"max_header_bytes": "16KiB"}})
    head = b"GET /trickle HTTP/1.1\r\nHost: x\r\n"
    head += b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(120))  # ~13 KiB
    head += b"Connection: close\r\n\r\n"
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    for offset in range(0, len(head), 1000):
        writer.write(head[offset : offset + 1000])
        await writer.drain()
        await asyncio.sleep(0.001)  # separate reads on the proxy's side
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    assert blue.seen[-1]["path"] == "/trickle"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_oversized_body_gets_413(
    zdproxy: StartProxy, upstream: StartUpstream, chunked: bool
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address]), "proxy": {"max_body_bytes": "1KiB"}})
    body = b"x" * 5000
    if chunked:
        request = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        request += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        request = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + body
    raw = await raw_exchange(proxy, request)
    assert raw.startswith(b"HTTP/1.1 413"), raw
    # A body within the limit passes.
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}/up", data=b"y" * 1024) as response,
    ):
        assert response.status == 200
        assert (await response.json())["body_size"] == 1024


async def test_slowloris_is_disconnected_after_the_header_timeout(
    zdproxy: StartProxy, raw_upstream: StartRaw
) -> None:
    up = await recording_upstream(raw_upstream)
    proxy = zdproxy({"pools": pools([up.address]), "proxy": FAST_TIMEOUTS})
    loop = asyncio.get_running_loop()
    started = loop.time()  # the proxy's deadlines count from the connection
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    answer = b""
    async with asyncio.timeout(5):
        # Keep trickling header bytes: the deadline covers the whole head, not each byte.
        while not reader.at_eof():
            try:
                writer.write(b"X-A: b\r\n")
            except ConnectionError:
                break
            try:
                answer += await asyncio.wait_for(reader.read(1024), 0.05)
            except TimeoutError:
                continue
            except ConnectionError:
                break
    elapsed = loop.time() - started
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert 0.3 <= elapsed < 5.0  # the upper bound only catches "never"
    assert up.received == b""


async def test_idle_keep_alive_connection_is_closed(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address]), "proxy": {"idle_timeout": "300ms"}})
    loop = asyncio.get_running_loop()
    started = loop.time()  # the proxy's deadlines count from the connection
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    async with asyncio.timeout(5):
        while await reader.read(65536):
            pass  # the rest of the body, then EOF when the proxy closes the idle connection
    assert 0.3 <= loop.time() - started < 5.0
    writer.close()


async def test_upstream_down_gets_502_saying_why(
    zdproxy: StartProxy, refused_address: Callable[[], str]
) -> None:
    # Unchecked: with checks on, the closed port is never routable (503, not 502).
    proxy = zdproxy({"pools": unchecked(pools([refused_address()]))})
    async with aiohttp.ClientSession() as session, session.get(proxy.url) as response:
        assert response.status == 502
        text = await response.text()
    assert "cannot connect to upstream blue/127.0.0.1:" in text


async def test_no_routable_upstream_at_all_gets_503(zdproxy: StartProxy) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: its TCP check never passes
    proxy = zdproxy({"pools": pools([dead])})
    async with aiohttp.ClientSession() as session, session.get(proxy.url) as response:
        assert response.status == 503
        assert "no healthy upstream" in await response.text()


async def test_slow_upstream_gets_504(zdproxy: StartProxy, upstream: StartUpstream) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address]), "upstream": {"timeout": "300ms"}})
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/slow/3000") as response:
            assert response.status == 504
            assert "silent for 0.3s" in await response.text()
        # The same client connection and the pool keep working afterwards.
        async with session.get(f"{proxy.url}/slow/10") as response:
            assert response.status == 200


async def test_unresponsive_connect_gets_504(zdproxy: StartProxy) -> None:
    # A listening socket whose backlog is full never completes new handshakes.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        port = sock.getsockname()[1]
        fillers = []
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        # Unchecked: its health check would time out too, and keep it out (503).
        upstreams = unchecked(pools([f"127.0.0.1:{port}"]))
        proxy = zdproxy({"pools": upstreams, "upstream": {"connect_timeout": "200ms"}})
        async with aiohttp.ClientSession() as session, session.get(proxy.url) as response:
            assert response.status == 504
            assert "connecting to upstream" in await response.text()
        for filler in fillers:
            filler.close()


async def cut_after(
    raw_upstream: StartRaw, head: bytes, body: bytes, *, reset: bool
) -> RawUpstream:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + body)
        await writer.drain()
        if reset:  # SO_LINGER 0: close with a TCP reset instead of a FIN
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # the app process dies mid-response

    return await raw_upstream(handler)


@pytest.mark.parametrize(
    ("head", "reset"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", False),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"10\r\n0123456789abcdef\r\n2000\r\n",
            False,
        ),
        # A body delimited by the close itself ends like this on a FIN; only a reset is
        # distinguishable, and it must not reach the client as a complete response.
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", True),
    ],
    ids=["content-length", "chunked", "until-close-reset"],
)
async def test_upstream_dying_mid_response_never_looks_complete(
    zdproxy: StartProxy, raw_upstream: StartRaw, head: bytes, reset: bool
) -> None:
    up = await cut_after(raw_upstream, head, b"b" * 5000, reset=reset)
    proxy = zdproxy({"pools": pools([up.address])})
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.get(proxy.url) as response:
                assert response.status == 200
                await response.read()


async def test_body_delimited_by_close_is_forwarded_complete(
    zdproxy: StartProxy, raw_upstream: StartRaw
) -> None:
    up = await cut_after(
        raw_upstream, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"c" * 5000, reset=False
    )
    proxy = zdproxy({"pools": pools([up.address])})
    async with aiohttp.ClientSession() as session, session.get(proxy.url) as response:
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert await response.read() == b"c" * 5000


async def test_upstream_closing_before_responding_gets_502(
    zdproxy: StartProxy, raw_upstream: StartRaw
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    up = await raw_upstream(handler)
    proxy = zdproxy({"pools": pools([up.address])})
    async with aiohttp.ClientSession() as session, session.post(proxy.url, data=b"x") as response:
        assert response.status == 502
        assert "closed the connection" in await response.text()


async def test_invalid_upstream_response_gets_502(
    zdproxy: StartProxy, raw_upstream: StartRaw
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\nok")
        await writer.drain()

    up = await raw_upstream(handler)
    proxy = zdproxy({"pools": pools([up.address])})
    async with aiohttp.ClientSession() as session, session.get(proxy.url) as response:
        assert response.status == 502
        assert "invalid HTTP" in await response.text()


async def test_graceful_stop_finishes_requests_in_flight(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(session.get(f"{proxy.url}/slow/500"))
        await wait_until(lambda: bool(blue.seen))  # the request has reached the upstream
        loop = asyncio.get_running_loop()
        exit_code = await loop.run_in_executor(None, proxy.stop)
        response = await pending
        assert response.status == 200
        assert await response.text() == "slow blue\n"
        assert response.headers["Connection"] == "close"
    assert exit_code == 0
