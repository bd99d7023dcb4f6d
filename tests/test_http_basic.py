"""HTTP/1.1 forwarding: headers, keep-alive, pipelining, bodiless responses, 100-continue."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import Upstream, ZdProxy, pools, raw_exchange

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]


def header(headers: list[tuple[bytes, bytes]], name: str) -> list[str]:
    return [v.decode() for k, v in headers if k.decode().lower() == name.lower()]


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response with a Content-Length body from a raw connection: (head, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length) if length else b""


async def test_forwards_request_and_adds_forwarding_headers(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{proxy.url}/some/path?q=1",
            headers={"X-Forwarded-For": "6.6.6.6", "X-Custom": "kept"},
        ) as response,
    ):
        assert response.status == 200
        assert response.headers["Via"] == "1.1 zdproxy"
        body = await response.json()
    assert body["path"] == "/some/path?q=1"
    seen = blue.seen[-1]["headers"]
    # From an untrusted client, X-Forwarded-For is replaced, not appended to.
    assert header(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert header(seen, "X-Forwarded-Proto") == ["http"]
    assert header(seen, "X-Forwarded-Host") == [proxy.address]
    assert header(seen, "Host") == [proxy.address]
    assert header(seen, "Via") == ["1.1 zdproxy"]
    assert header(seen, "X-Custom") == ["kept"]


async def test_trusted_proxy_forwarding_headers_are_kept_and_appended(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address]), "proxy": {"trusted_proxies": ["127.0.0.0/8"]}})
    sent = {
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "a.b",
    }
    async with aiohttp.ClientSession() as session, session.get(proxy.url, headers=sent) as response:
        assert response.status == 200
    seen = blue.seen[-1]["headers"]
    assert header(seen, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert header(seen, "X-Forwarded-Proto") == ["https"]
    assert header(seen, "X-Forwarded-Host") == ["a.b"]


async def test_hop_by_hop_headers_are_removed_both_ways(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    request = (
        b"GET /hop-headers HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\n"
        b"Trailer: X-T\r\nX-Other: stays\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(request)
    head, body = await read_response(reader)
    writer.close()
    assert body == b"hop\n"
    lowered = head.lower()
    assert b"x-resp-secret" not in lowered
    assert b"keep-alive:" not in lowered
    assert b"connection: x-resp-secret" not in lowered
    seen = blue.seen[-1]["headers"]
    names = {k.decode().lower() for k, _ in seen}
    assert not names & {"x-secret", "keep-alive", "te", "proxy-connection"}
    assert header(seen, "X-Other") == ["stays"]
    assert header(seen, "Trailer") == ["X-T"]  # end to end: it names forwarded trailers


async def test_keep_alive_reuses_client_and_upstream_connections(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    for i in range(5):
        writer.write(f"GET /k{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200")
        assert json.loads(body)["path"] == f"/k{i}"
    writer.close()
    # Sequential requests on one client connection use one pooled upstream connection.
    assert len({entry["conn"] for entry in blue.seen}) == 1


async def test_pipelined_requests_are_answered_in_order(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    # The first request is slow: a proxy answering out of order would reply to /fast first.
    request = (
        b"GET /slow/200 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /fast HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    raw = await raw_exchange(proxy, request)
    assert raw.count(b"HTTP/1.1 ") == 4
    first, second, third, fourth = (
        raw.index(m) for m in (b"slow blue", b"/fast", b"204", b"/last")
    )
    assert first < second < third < fourth
    assert b'"body_size": 5' in raw


async def test_head_204_304_have_no_body_and_keep_the_connection(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"HEAD /bytes/5000 HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 5000" in head
    for code in (204, 304):
        writer.write(f"GET /status/{code} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {code}".encode())
        assert b"transfer-encoding" not in head.lower()
    # If any of those had carried body bytes, they would be read here instead of this reply.
    writer.write(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["path"] == "/after"
    writer.close()
    # The HEAD went over the same pooled upstream connection as the rest.
    assert len({entry["conn"] for entry in blue.seen}) == 1


async def test_expect_100_continue(zdproxy: StartProxy, upstream: StartUpstream) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello world")
    head, body = await read_response(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["body_size"] == 11
    assert not header(blue.seen[-1]["headers"], "Expect")


async def test_unsupported_expectation_gets_417(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    raw = await raw_exchange(
        proxy, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nExpect: teapot\r\n\r\nx"
    )
    assert raw.startswith(b"HTTP/1.1 417")
    assert not blue.seen


async def test_http10_client_gets_a_chunked_body_raw_and_a_close(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    raw = await raw_exchange(proxy, b"GET /chunked/1000 HTTP/1.0\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert b"Connection: close" in head
    assert len(body) == 1000


async def test_http10_keep_alive_with_content_length(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    for _ in range(2):
        writer.write(b"GET /bytes/10 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head, body = await read_response(reader)
        assert b"Connection: keep-alive" in head
        assert len(body) == 10
    writer.close()


async def test_absolute_form_target_is_rewritten(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    raw = await raw_exchange(
        proxy,
        b"GET http://example.test/abs?x=1 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200")
    assert blue.seen[-1]["path"] == "/abs?x=1"
    assert header(blue.seen[-1]["headers"], "Host") == ["example.test"]


async def test_request_without_host_or_with_bad_version_is_refused(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    no_host = await raw_exchange(proxy, b"GET / HTTP/1.1\r\n\r\n")
    assert no_host.startswith(b"HTTP/1.1 400") and b"Host" in no_host
    two_hosts = await raw_exchange(proxy, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert two_hosts.startswith(b"HTTP/1.1 400")
    http2 = await raw_exchange(proxy, b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
    assert http2.startswith(b"HTTP/1.1 505")
    connect = await raw_exchange(proxy, b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n")
    assert connect.startswith(b"HTTP/1.1 405")
    assert not blue.seen


async def test_upstream_status_and_headers_pass_through(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    async with aiohttp.ClientSession() as session:
        for code in (201, 404, 418, 500, 503):
            async with session.get(f"{proxy.url}/status/{code}") as response:
                assert response.status == code
                assert response.headers["X-Status"] == str(code)
                assert await response.text() == f"status {code} from blue\n"


async def test_many_concurrent_clients(zdproxy: StartProxy, upstream: StartUpstream) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})

    async def client(session: aiohttp.ClientSession, n: int) -> list[Any]:
        results = []
        for i in range(20):
            async with session.post(f"{proxy.url}/c{n}/{i}", data=b"x" * i) as response:
                body = await response.json()
                results.append((response.status, body["path"], body["body_size"]))
        return results

    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(connector=connector) as session:
        all_results = await asyncio.gather(*(client(session, n) for n in range(50)))
    for n, results in enumerate(all_results):
        assert results == [(200, f"/c{n}/{i}", i) for i in range(20)]
