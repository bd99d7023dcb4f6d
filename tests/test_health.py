"""Active health checks: rise before routable, fall out of rotation, readiness bodies."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import Upstream, ZdProxy, pools, wait_until
from zdproxy.control.health import json_mismatch

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]

FAST = {"path": "/readyz", "interval": "50ms", "jitter": "10ms", "timeout": "500ms"}


def checked(blue: list[str], health: dict[str, Any]) -> dict[str, Any]:
    config = pools(blue)
    config["blue"]["health"] = {**FAST, **health}
    return {"pools": config}


async def names(url: str, count: int) -> Counter[str]:
    jar = aiohttp.DummyCookieJar()
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        result: Counter[str] = Counter()
        for _ in range(count):
            async with session.get(f"{url}/x") as response:
                if response.status == 200:
                    result[(await response.json())["name"]] += 1
                else:
                    result[f"status {response.status}"] += 1
        return result


async def started(zdproxy: StartProxy, config: dict[str, Any]) -> ZdProxy:
    """Start zdproxy off the event loop: it probes the in-process upstreams before it
    listens, so the loop must keep serving them meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(None, zdproxy, config)


def health_lines(proxy: ZdProxy, text: str) -> list[str]:
    events = ("health:", "upstream_up:", "upstream_down:")
    return [line for line in proxy.log_lines if text in line and any(e in line for e in events)]


async def test_readiness_body_keeps_a_failing_dependency_out_of_rotation(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    healthy = await upstream("one", readiness={"status": 200, "db": "ok", "queue": "ok"})
    db_down = await upstream("two", readiness={"status": 200, "db": "down", "queue": "ok"})
    expect = {"expect_json": {"db": "ok", "queue": "ok"}}
    proxy = await started(zdproxy, checked([healthy.address, db_down.address], expect))
    # zdproxy listens only after the first verdicts: no warm-up 503s.
    assert await names(proxy.url, 40) == Counter({"one": 40})
    assert health_lines(proxy, "body db='down' (expected 'ok')")


async def test_fall_removes_and_rise_restores(zdproxy: StartProxy, upstream: StartUpstream) -> None:
    readiness: dict[str, Any] = {"status": 200}
    one = await upstream("one", readiness=readiness)
    two = await upstream("two")
    proxy = await started(zdproxy, checked([one.address, two.address], {"rise": 2, "fall": 2}))
    assert set(await names(proxy.url, 40)) == {"one", "two"}
    readiness["status"] = 503
    went_down = f"blue/{one.address} down after 2 failed checks: status 503 (expected [200])"
    await wait_until(lambda: bool(health_lines(proxy, went_down)))
    assert await names(proxy.url, 30) == Counter({"two": 30})
    readiness["status"] = 200
    await wait_until(lambda: len(health_lines(proxy, f"blue/{one.address} up after")) == 2)
    assert set(await names(proxy.url, 40)) == {"one", "two"}


async def test_nothing_healthy_is_503_never_an_unhealthy_upstream(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    sick = await upstream("sick", readiness={"status": 500})
    proxy = await started(zdproxy, checked([sick.address], {}))
    assert await names(proxy.url, 5) == Counter({"status 503": 5})
    assert sick.seen == []


async def test_new_upstream_is_routable_only_after_rise(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    one = await upstream("one")
    late: dict[str, Any] = {"status": 503}
    two = await upstream("two", readiness=late)
    proxy = await started(zdproxy, checked([one.address], {"rise": 3}))
    assert await proxy.reload(checked([one.address, two.address], {"rise": 3}))
    assert await names(proxy.url, 20) == Counter({"one": 20})  # two is not ready yet
    late["status"] = 200
    await wait_until(lambda: bool(health_lines(proxy, f"blue/{two.address} up after 3")))
    assert set(await names(proxy.url, 40)) == {"one", "two"}


@pytest.mark.parametrize(
    ("body", "expected", "why"),
    [
        ({"db": "ok"}, {"db": "ok"}, None),
        ({"checks": {"db": "ok"}}, {"checks.db": "ok"}, None),
        ({"db": "down"}, {"db": "ok"}, "body db='down' (expected 'ok')"),
        ({}, {"db": "ok"}, "body has no 'db'"),
        ([1, 2], {"db": "ok"}, "body has no 'db'"),
    ],
)
def test_json_expectations(body: Any, expected: dict[str, Any], why: str | None) -> None:
    assert json_mismatch(body, expected) == why
