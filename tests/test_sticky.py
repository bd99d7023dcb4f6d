"""The sticky split: users keep their color while the weight moves, and only move one way."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import Upstream, ZdProxy, pools

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]

USERS = [f"user-{i}" for i in range(4000)]


def config(blue: Upstream, green: Upstream, weight: int, **split: Any) -> dict[str, Any]:
    return {
        "pools": pools([blue.address], [green.address]),
        "split": {"live": "blue", "candidate_weight": weight, **split},
    }


async def colors_of(session: aiohttp.ClientSession, url: str, users: list[str]) -> dict[str, str]:
    """The color that answers each user (by X-User header), 32 requests at a time."""
    limit = asyncio.Semaphore(32)

    async def one(user: str) -> tuple[str, str]:
        async with limit, session.get(f"{url}/who", headers={"X-User": user}) as response:
            assert response.status == 200
            return user, str((await response.json())["name"])

    return dict(await asyncio.gather(*(one(user) for user in users)))


class Load:
    """Background GETs from 8 workers until stopped (or 60 s): counts every outcome."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failed: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _worker(self, session: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                headers = {"X-User": f"load-{n}-{i}"}
                async with session.get(f"{self.url}/load", headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        self.ok += 1
                    else:
                        self.failed.append(f"status {response.status}")
            except aiohttp.ClientError as exc:
                self.failed.append(repr(exc))

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            workers = [self._worker(session, n) for n in range(8)]
            await asyncio.wait_for(asyncio.gather(*workers), 60)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def test_weight_sweep_moves_users_one_way_and_loses_nothing(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    sticky = {"sticky_key": "header:X-User"}
    proxy = zdproxy(config(blue, green, 0, **sticky))
    load = Load(proxy.url)
    load.start()
    previous: tuple[int, set[str]] | None = None
    async with aiohttp.ClientSession() as session:
        for weight in (0, 500, 5000, 10000, 2500, 0):
            assert await proxy.reload(config(blue, green, weight, **sticky))
            colors = await colors_of(session, proxy.url, USERS)
            on_candidate = {user for user, color in colors.items() if color == "green"}
            share = len(on_candidate) / len(USERS)
            # Over 4000 users the share is within 2 points of the weight.
            assert abs(share - weight / 10000) <= 0.02, (weight, share)
            if previous is not None:
                previous_weight, previous_users = previous
                if weight >= previous_weight:  # going up: nobody goes back to live
                    assert previous_users <= on_candidate
                else:  # going down: only candidate users move back
                    assert on_candidate <= previous_users
            previous = (weight, on_candidate)
    await load.stop()
    assert load.failed == []
    assert load.ok > 0


async def test_bucket_cookie_keeps_a_new_user_on_one_color(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(config(blue, green, 5000, bucket_cookie="zdb", bucket_cookie_max_age="1d"))
    seen_colors = set()
    for _ in range(20):
        # A new user; unsafe=True lets the jar keep cookies of an IP-addressed host.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(proxy.url) as first:
                cookie = first.headers["Set-Cookie"]
                color = (await first.json())["name"]
            assert cookie.startswith("zdb=")
            assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Max-Age=86400" in cookie
            for _ in range(10):
                async with session.get(proxy.url) as again:
                    assert (await again.json())["name"] == color
                    assert "Set-Cookie" not in again.headers  # issued once
            seen_colors.add(color)
    assert seen_colors == {"blue", "green"}  # 20 users at 50%: one color only once in 500,000 runs


async def test_named_cookie_is_the_key_and_its_absence_falls_back(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(config(blue, green, 5000, sticky_key="cookie:session"))
    jar = aiohttp.DummyCookieJar()
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        colors = set()
        for user in range(40):
            answers = set()
            for _ in range(3):
                cookies = {"Cookie": f"theme=dark; session=s{user}"}
                async with session.get(proxy.url, headers=cookies) as response:
                    answers.add((await response.json())["name"])
                    assert "Set-Cookie" not in response.headers
            assert len(answers) == 1  # one session, one color
            colors |= answers
        assert colors == {"blue", "green"}
        async with session.get(proxy.url) as response:  # no session cookie: our own
            assert response.headers["Set-Cookie"].startswith("zd_bucket=")


async def test_client_ip_key_and_no_cookie_in_steady_state(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(config(blue, green, 5000, sticky_key="client-ip"))
    jar = aiohttp.DummyCookieJar()
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        answers = set()
        for _ in range(30):
            async with session.get(proxy.url) as response:
                answers.add((await response.json())["name"])
                assert "Set-Cookie" not in response.headers
        assert len(answers) == 1  # one client address, one color
        assert await proxy.reload(config(blue, green, 0))
        async with session.get(proxy.url) as response:
            assert (await response.json())["name"] == "blue"
            assert "Set-Cookie" not in response.headers  # no bucket needed at 0%


async def test_invalid_reload_keeps_the_running_split(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(config(blue, green, 10000))
    bad = config(blue, green, 10000)
    bad["split"]["candidate_weight"] = 20000
    assert not await proxy.reload(bad)
    assert any("split.candidate_weight" in line for line in proxy.log_lines)
    async with aiohttp.ClientSession() as session, session.get(proxy.url) as response:
        assert (await response.json())["name"] == "green"
