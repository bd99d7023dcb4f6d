"""Bodies stream both ways, Content-Length and chunked, with bounded proxy memory."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from tests.apps import BLOCK, pattern_sha256
from tests.conftest import Upstream, ZdProxy, pools

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]

MiB = 1024 * 1024


async def blocks(size: int) -> AsyncIterator[bytes]:
    full, rest = divmod(size, len(BLOCK))
    for _ in range(full):
        yield BLOCK
    if rest:
        yield BLOCK[:rest]


async def download(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    """(size, sha256, transfer-encoding) of a streamed download."""
    digest = hashlib.sha256()
    size = 0
    async with session.get(url) as response:
        assert response.status == 200
        async for chunk in response.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest(), response.headers.get("Transfer-Encoding", "")


async def upload(
    session: aiohttp.ClientSession, url: str, size: int, *, chunked: bool
) -> dict[str, object]:
    headers = {} if chunked else {"Content-Length": str(size)}
    async with session.post(url, data=blocks(size), headers=headers) as response:
        assert response.status == 200
        result: dict[str, object] = await response.json()
        return result


@pytest.mark.parametrize("size", [0, 1, 70_000, MiB])
async def test_bodies_both_ways(zdproxy: StartProxy, upstream: StartUpstream, size: int) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    async with aiohttp.ClientSession() as session:
        for chunked in (False, True):
            result = await upload(session, f"{proxy.url}/up", size, chunked=chunked)
            assert result["body_size"] == size
            assert result["body_sha256"] == pattern_sha256(size)
            # The upstream saw the framing the client chose.
            assert blue.seen[-1]["chunked"] is (chunked and True)
        by_length = await download(session, f"{proxy.url}/bytes/{size}")
        assert by_length == (size, pattern_sha256(size), "")
        by_chunks = await download(session, f"{proxy.url}/chunked/{size}")
        assert by_chunks == (size, pattern_sha256(size), "chunked")


async def test_100_mib_streams_both_ways_with_bounded_memory(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    size = 100 * MiB
    async with aiohttp.ClientSession(read_bufsize=2**18) as session:
        await download(session, f"{proxy.url}/bytes/1000")  # warm up the code paths
        baseline = proxy.rss_kib("VmRSS")
        assert (await download(session, f"{proxy.url}/bytes/{size}"))[:2] == (
            size,
            pattern_sha256(size),
        )
        assert (await download(session, f"{proxy.url}/chunked/{size}"))[:2] == (
            size,
            pattern_sha256(size),
        )
        for chunked in (False, True):
            result = await upload(session, f"{proxy.url}/up", size, chunked=chunked)
            assert result["body_size"] == size
            assert result["body_sha256"] == pattern_sha256(size)
    growth_mib = (proxy.rss_kib("VmHWM") - baseline) / 1024
    assert growth_mib < 32, f"proxy RSS grew by {growth_mib:.1f} MiB while 400 MiB passed"
