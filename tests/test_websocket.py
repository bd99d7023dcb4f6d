"""Upgrade: after a 101 the proxy is a byte tunnel both ways."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp

from tests.conftest import Upstream, ZdProxy, pools

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]


async def test_websocket_echo_through_the_tunnel(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{proxy.url}/ws") as ws:
        for i in range(20):
            await ws.send_str(f"m{i}")
            assert await ws.receive_str(timeout=5) == f"blue:m{i}"
        big = bytes(range(256)) * 4096  # 1 MiB frame, through back-pressure
        await ws.send_bytes(big)
        assert await ws.receive_bytes(timeout=10) == big
    upgrade = blue.seen[-1]["headers"]
    names = {k.decode().lower(): v.decode().lower() for k, v in upgrade}
    assert names["upgrade"] == "websocket"
    assert names["connection"] == "upgrade"


async def test_refused_upgrade_is_a_normal_response(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    headers = {"Connection": "Upgrade", "Upgrade": "websocket"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.url}/not-ws", headers=headers) as response,
    ):
        # The echo route ignores the upgrade and answers 200: forwarded as is, then closed.
        assert response.status == 200
        assert (await response.json())["path"] == "/not-ws"
        assert response.headers["Connection"] == "close"
