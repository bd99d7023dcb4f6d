"""Graceful drain, the control plane's operation behind POST /v1/drain (whose contract
tests/test_admin_api.py covers), in process: Daemon on the test's loop, real sockets,
so the tests can look at the drain result and the data plane directly.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Upstream, in_process_settings, pools, wait_until
from zdproxy.control.drain import DrainResult
from zdproxy.ops.daemon import Daemon

StartUpstream = Callable[..., Awaitable[Upstream]]
StartDaemon = Callable[[dict[str, Any]], Awaitable[Daemon]]


@pytest.fixture
async def daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[StartDaemon]:
    for name in list(os.environ):
        if name.startswith("ZDPROXY_"):
            monkeypatch.delenv(name)
    started: list[Daemon] = []

    async def factory(config: dict[str, Any]) -> Daemon:
        instance = Daemon(in_process_settings(tmp_path, config))
        await instance.start()
        started.append(instance)
        return instance

    yield factory
    for instance in started:
        await instance.stop()


async def drained(
    zd: Daemon,
    *,
    color: str | None = None,
    upstream: str | None = None,
    cut_after: float = 30.0,
    tunnel_grace: float = 5.0,
) -> DrainResult:
    """What POST /v1/drain with wait does: mark, then wait until nothing is in flight."""
    ids = zd.control.start_drain(color=color, upstream=upstream, force=True)  # only blue serves
    return await zd.control.wait_drained(ids, cut_after=cut_after, tunnel_grace=tunnel_grace)


def url(instance: Daemon, path: str = "/") -> str:
    return f"http://{instance.addresses[0]}{path}"


async def test_drain_lets_requests_in_flight_finish_and_sends_new_ones_elsewhere(
    daemon: StartDaemon, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    zd = await daemon({"pools": pools([blue.address], [green.address])})
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:

        async def get(path: str) -> tuple[int, str]:
            async with session.get(url(zd, path)) as response:
                return response.status, await response.text()

        slow = [asyncio.ensure_future(get(f"/slow/2000?{i}")) for i in range(5)]
        await wait_until(lambda: len(blue.seen) == 5)  # all five reached blue
        drain = asyncio.ensure_future(drained(zd, color="blue", cut_after=10))
        await asyncio.sleep(0)  # the drain has swapped the snapshot
        during = [await get(f"/during/{i}") for i in range(10)]
        result = await drain
        finished = await asyncio.gather(*slow)
    assert finished == [(200, "slow blue\n")] * 5  # every request in flight completed
    assert all(status == 200 and '"name": "green"' in body for status, body in during)
    assert [e["path"] for e in blue.seen if e["path"].startswith("/during")] == []
    assert result.drained and result.cut == 0
    assert result.upstreams == (f"blue/{blue.address}",)
    assert 1.5 <= result.seconds < 6.0
    # Undrain: blue is live again.
    zd.control.undrain(color="blue")
    async with aiohttp.ClientSession() as session, session.get(url(zd)) as response:
        assert '"name": "blue"' in await response.text()


async def test_drain_gives_tunnels_a_grace_period_then_closes_them(
    daemon: StartDaemon, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    zd = await daemon({"pools": pools([blue.address])})
    async with aiohttp.ClientSession() as session, session.ws_connect(url(zd, "/ws")) as ws:
        await ws.send_str("before")
        assert await ws.receive_str(timeout=5) == "blue:before"
        loop = asyncio.get_running_loop()
        started = loop.time()
        drain = asyncio.ensure_future(drained(zd, color="blue", cut_after=5, tunnel_grace=0.4))
        await asyncio.sleep(0.1)
        await ws.send_str("during grace")  # the tunnel still works inside the grace period
        assert await ws.receive_str(timeout=5) == "blue:during grace"
        message = await ws.receive(timeout=5)  # then zdproxy closes it
        closed_after = loop.time() - started
        result = await drain
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert closed_after >= 0.4
    assert result.drained and result.tunnels_closed == 1 and result.cut == 0


async def test_drain_that_times_out_cuts_and_says_how_many(
    daemon: StartDaemon, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    zd = await daemon({"pools": pools([blue.address])})
    async with aiohttp.ClientSession() as session:
        # A POST: aiohttp would silently retry a GET whose connection was cut.
        stuck = asyncio.ensure_future(session.post(url(zd, "/slow/5000"), data=b"x"))
        await wait_until(lambda: bool(blue.seen))
        result = await drained(zd, upstream=f"blue/{blue.address}", cut_after=0.3)
        with pytest.raises(aiohttp.ClientError):
            await stuck
    assert not result.drained and result.cut == 1
    assert 0.3 <= result.seconds < 2.0


async def test_drain_of_an_unknown_upstream_is_refused(
    daemon: StartDaemon, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    zd = await daemon({"pools": pools([blue.address])})
    with pytest.raises(ValueError, match="unknown upstream"):
        await drained(zd, upstream="blue/127.0.0.1:1")
    with pytest.raises(ValueError, match="unknown color"):
        await drained(zd, color="red")
    assert zd.control.drained == set()
