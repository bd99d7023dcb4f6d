"""Passive outlier ejection: failures in a row take an upstream out, for a growing time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import Upstream, ZdProxy, pools, wait_until

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]


async def answers(url: str, count: int) -> Counter[str]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        result: Counter[str] = Counter()
        for i in range(count):
            async with session.get(f"{url}/o/{i}") as response:
                result[f"{response.status} {(await response.text()).split()[0]}"] += 1
        return result


def lines(proxy: ZdProxy, text: str) -> list[str]:
    return [line for line in proxy.log_lines if text in line]


async def test_failing_upstream_is_ejected_and_returns_for_longer_each_time(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    failing: dict[str, int] = {"status": 503}
    bad = await upstream("bad", failing=failing)
    good = await upstream("good")
    config: dict[str, Any] = {"pools": pools([bad.address, good.address])}
    outlier = {"consecutive_failures": 3, "base_ejection": "400ms", "max_ejected_percent": 50}
    config["pools"]["blue"]["outlier"] = outlier
    proxy = zdproxy(config)
    ejected = f"upstream_ejected: blue/{bad.address} ejected for 0.4s after"
    seen = await answers(proxy.url, 40)
    await wait_until(lambda: bool(lines(proxy, ejected)))
    assert seen["503 bad"] >= 3  # it took failures in a row to eject it
    # Out of rotation now: every request goes to the good one.
    assert await answers(proxy.url, 20) == Counter({'200 {"name":': 20})
    await wait_until(lambda: bool(lines(proxy, f"blue/{bad.address} returns")), within=5)
    await answers(proxy.url, 40)  # still failing: ejected again, for twice as long
    await wait_until(lambda: bool(lines(proxy, "ejected for 0.8s after")))
    failing["status"] = 0
    await wait_until(lambda: len(lines(proxy, f"blue/{bad.address} returns")) == 2, within=5)
    served = await answers(proxy.url, 40)
    assert served == Counter({'200 {"name":': 40})
    assert any(entry["path"].startswith("/o/") for entry in bad.seen)  # back in rotation


async def test_never_more_than_the_allowed_share_is_ejected(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    failing: dict[str, int] = {"status": 500}
    one = await upstream("one", failing=failing)
    two = await upstream("two", failing=failing)
    config: dict[str, Any] = {"pools": pools([one.address, two.address])}
    config["pools"]["blue"]["outlier"] = {"consecutive_failures": 2, "max_ejected_percent": 50}
    proxy = zdproxy(config)
    await answers(proxy.url, 30)
    await wait_until(lambda: bool(lines(proxy, "are ejected already")))
    assert len(lines(proxy, "ejected for")) == 1  # one of two: 50%
    # The other still serves (failing, but never both out).
    assert sum((await answers(proxy.url, 10)).values()) == 10
