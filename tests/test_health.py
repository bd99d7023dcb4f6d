"""Active health checks: rise before routable, fall out of rotation, readiness bodies;
a pool without a [health] section checked by a TCP connect, "unknown" until it passes."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.apps import upstream_app
from tests.conftest import (
    ADMIN_TOKEN,
    RawHandler,
    RawUpstream,
    Upstream,
    ZdProxy,
    admin_api,
    pools,
    run_cli,
    to_toml,
    wait_until,
)
from zdproxy.config.loader import load_settings
from zdproxy.control.health import json_mismatch

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]
StartRaw = Callable[[RawHandler], Awaitable[RawUpstream]]

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


# -- the default check: a pool without a [health] section --------------------------------


async def cli(proxy: ZdProxy, *args: str) -> tuple[int, str]:
    """`zdproxy ARGS` against this proxy, as an operator runs it: (exit code, output)."""
    env = {"ZDPROXY_ADMIN_URL": proxy.admin_address, "ZDPROXY_TOKEN": ADMIN_TOKEN}
    result = await run_cli(*args, env=env)
    return result.code, result.out + result.err


async def upstream_view(proxy: ZdProxy, color: str) -> dict[str, Any]:
    status = await admin_api(proxy, "GET", "/v1/status")
    [view] = status["pools"][color]["upstreams"]
    return dict(view)


def healthy_gauge(metrics: str, upstream_id: str) -> str | None:
    """The value of zdproxy_upstream_healthy for one upstream, or None if absent."""
    for line in metrics.splitlines():
        if line.startswith("zdproxy_upstream_healthy{") and f'upstream="{upstream_id}"' in line:
            return line.rpartition(" ")[2]
    return None


async def test_a_pool_without_health_section_is_tcp_checked_and_never_healthy_unchecked(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    """Issue 10, why 3: green has no [health] section and nothing listens on its port.
    It used to be routable, pass `wait --until healthy:green` and take a shift (users
    got 502); now its default TCP check keeps it out until the app listens."""
    blue = await upstream("blue")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        green_address = f"127.0.0.1:{held.getsockname()[1]}"
        green_id = f"green/{green_address}"
        proxy = await started(zdproxy, {"pools": pools([blue.address], [green_address])})

        code, out = await cli(proxy, "wait", "--until", "healthy:green", "--timeout", "1s")
        assert code == 4, out
        assert f"not healthy: {green_id} (down)" in out
        view = await upstream_view(proxy, "green")
        assert (view["health"], view["routable"]) == ("down", False), view
        assert view["health_check"] == "TCP connect"
        assert view["health_reason"].startswith("cannot connect"), view
        assert (await upstream_view(proxy, "blue"))["health"] == "up"
        async with aiohttp.ClientSession() as session:
            metrics = await (await session.get(f"{proxy.admin_url}/metrics")).text()
        assert healthy_gauge(metrics, green_id) == "0.0"
        assert healthy_gauge(metrics, f"blue/{blue.address}") == "1.0"
        code, out = await cli(proxy, "shift", "50")
        assert code == 1 and "green would get 50% of the traffic" in out, out
        code, out = await cli(proxy, "status")
        assert f"{green_id}  down" in out and "TCP connect: cannot connect" in out, out

        # Forced anyway: green's share falls back to blue, no user sees a 502.
        assert (await cli(proxy, "shift", "50", "--force"))[0] == 0
        assert await names(proxy.url, 20) == Counter({"blue": 20})

        # The app starts listening on that port: up after `rise` checks, then served.
        runner = web.AppRunner(upstream_app("green", []), access_log=None)
        await runner.setup()
        await web.SockSite(runner, held).start()
        try:
            code, out = await cli(proxy, "wait", "--until", "healthy:green", "--timeout", "15s")
            assert code == 0, out
            assert set(await names(proxy.url, 40)) == {"blue", "green"}
        finally:
            await runner.cleanup()


async def test_an_upstream_is_unknown_and_not_routable_until_its_first_check_passes(
    zdproxy: StartProxy, upstream: StartUpstream, raw_upstream: StartRaw
) -> None:
    answer = asyncio.Event()

    async def held_readiness(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # each probe: hold it until the test lets the app answer
            await reader.readuntil(b"\r\n\r\n")
            await answer.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    blue, late = await upstream("blue"), await raw_upstream(held_readiness)
    config = pools([blue.address], [])
    config["green"]["health"] = {"path": "/readyz", "timeout": "30s", "rise": 1}
    proxy = await started(zdproxy, {"pools": config})
    await admin_api(proxy, "PUT", "/v1/pools/green", {"upstreams": [late.address]})
    await wait_until(lambda: late.connections > 0)  # its first probe is waiting

    view = await upstream_view(proxy, "green")
    assert (view["health"], view["routable"]) == ("unknown", False), view
    assert view["health_check"] == "GET /readyz"
    code, out = await cli(proxy, "wait", "--until", "healthy:green", "--timeout", "500ms")
    assert code == 4 and f"green/{late.address} (unknown)" in out, out
    async with aiohttp.ClientSession() as session:
        metrics = await (await session.get(f"{proxy.admin_url}/metrics")).text()
    assert healthy_gauge(metrics, f"green/{late.address}") == "0.0"
    refused = await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 100}, status=409)
    assert "green would get 1% of the traffic" in refused["detail"]

    answer.set()
    code, out = await cli(proxy, "wait", "--until", "healthy:green", "--timeout", "15s")
    assert code == 0, out
    assert (await upstream_view(proxy, "green"))["routable"] is True


async def test_a_starting_proxy_serves_at_once_behind_default_checks(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    """Nothing is routable before its first check passes, so start-up waits for the first
    verdicts of the default checks too: the first requests are answered, never 503."""
    one, two = await upstream("one"), await upstream("two")
    proxy = await started(zdproxy, {"pools": pools([one.address, two.address])})
    assert set(await names(proxy.url, 20)) == {"one", "two"}
    status = await admin_api(proxy, "GET", "/v1/status")
    checks = {(u["health"], u["health_check"]) for u in status["pools"]["blue"]["upstreams"]}
    assert checks == {("up", "TCP connect")}


async def test_checks_off_is_routable_but_never_healthy(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    config = pools([blue.address])
    config["blue"]["health"] = {"enabled": False}
    proxy = zdproxy({"pools": config})
    view = await upstream_view(proxy, "blue")
    assert (view["health"], view["routable"]) == ("unchecked", True), view
    assert await names(proxy.url, 5) == Counter({"blue": 5})
    code, out = await cli(proxy, "wait", "--until", "healthy:blue", "--timeout", "300ms")
    assert code == 4 and "(unchecked)" in out, out
    async with aiohttp.ClientSession() as session:
        metrics = await (await session.get(f"{proxy.admin_url}/metrics")).text()
    assert healthy_gauge(metrics, f"blue/{blue.address}") is None


# -- `zdproxy check`: both pools checked alike ---------------------------------------------


def sample_config() -> Path:
    return Path(__file__).resolve().parent.parent / "config" / "zdproxy.toml"


async def check_config(tmp_path: Path, config: dict[str, Any]) -> tuple[int, str, str]:
    path = tmp_path / "zdproxy.toml"
    path.write_text(to_toml(config))
    result = await run_cli("check", "--config", str(path))
    return result.code, result.out, result.err


async def test_check_warns_when_the_pools_are_checked_differently(tmp_path: Path) -> None:
    config = pools(["127.0.0.1:9001"], ["127.0.0.1:9011"])
    config["blue"]["health"] = {"path": "/healthz"}
    code, out, err = await check_config(tmp_path, {"pools": config})
    assert code == 0 and out.strip().endswith(": ok"), (out, err)
    assert "warning: pools.blue.health (GET /healthz) and pools.green.health (TCP connect)" in err
    assert "path '/healthz' vs ''" in err

    config["green"]["health"] = {"path": "/healthz"}
    code, out, err = await check_config(tmp_path, {"pools": config})
    assert (code, err) == (0, ""), err


async def test_the_sample_config_checks_both_pools_alike() -> None:
    pools_of = load_settings(sample_config()).pools
    assert pools_of.blue.health == pools_of.green.health
    assert pools_of.blue.health.http  # a readiness endpoint, not a bare connect
    result = await run_cli("check", "--config", str(sample_config()))
    assert (result.code, result.err) == (0, ""), result.err
    assert result.out.strip() == f"{sample_config()}: ok"
