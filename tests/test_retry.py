"""Retries where they are safe, before any response byte: a request the split sent to the
candidate goes to the live pool, any other to another upstream of its color."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    RawHandler,
    RawUpstream,
    Upstream,
    ZdProxy,
    pools,
    unchecked,
    wait_until,
)
from tests.test_metrics import Metrics, classes, metrics_when

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]
StartRaw = Callable[[RawHandler], Awaitable[RawUpstream]]


async def statuses(url: str, method: str, count: int) -> Counter[int]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        result: Counter[int] = Counter()
        for i in range(count):
            data = b"payload" if method == "POST" else None
            async with session.request(method, f"{url}/r/{i}", data=data) as response:
                await response.read()
                result[response.status] += 1
        return result


def candidate_config(
    blue: Upstream, green: Upstream, weight: int, retry: dict[str, Any]
) -> dict[str, Any]:
    """Blue live, green the candidate at `weight`, green never ejected (so that every
    request the split sends it is a retry case)."""
    config: dict[str, Any] = {
        "pools": pools([blue.address], [green.address]),
        "split": {"live": "blue", "candidate_weight": weight},
        "retry": retry,
    }
    config["pools"]["green"]["outlier"] = {"consecutive_failures": 0}
    return config


async def test_connect_failure_is_retried_on_another_upstream(
    zdproxy: StartProxy, upstream: StartUpstream, refused_address: Callable[[], str]
) -> None:
    alive = await upstream("alive")
    # Unchecked: a health check would keep the dead upstream out and nothing would retry.
    dead = refused_address()
    proxy = zdproxy({"pools": unchecked(pools([dead, alive.address]))})
    # Nothing reached the dead upstream, so even a POST may go elsewhere.
    assert await statuses(proxy.url, "GET", 30) == Counter({200: 30})
    assert await statuses(proxy.url, "POST", 30) == Counter({200: 30})
    assert len(alive.seen) == 60


async def test_reset_is_retried_for_idempotent_requests_only(
    zdproxy: StartProxy, upstream: StartUpstream, raw_upstream: StartRaw
) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # read each request head, then die without a response byte
            await reader.readuntil(b"\r\n\r\n")
            writer.transport.abort()
            return

    broken = await raw_upstream(reset)
    alive = await upstream("alive")
    # The whole budget, and no ejection (a tick during the GETs would eject the broken
    # upstream before any POST reached it): this test is about which requests are
    # retried, not how many.
    config: dict[str, Any] = {
        "pools": pools([broken.address, alive.address]),
        "retry": {"budget_percent": 100},
    }
    config["pools"]["blue"]["outlier"] = {"consecutive_failures": 0}
    proxy = zdproxy(config)
    assert await statuses(proxy.url, "GET", 30) == Counter({200: 30})
    posts = await statuses(proxy.url, "POST", 30)
    reached_broken = broken.received.count(b"POST ")
    # A POST the broken upstream received may have had effects: it is not sent again.
    assert reached_broken > 0
    assert posts == Counter({200: 30 - reached_broken, 502: reached_broken})


@pytest.fixture
def app_process() -> Iterator[Callable[[str], tuple[subprocess.Popen[str], str]]]:
    """Upstream apps in processes of their own, so a test can SIGKILL one."""
    started: list[subprocess.Popen[str]] = []

    def start(name: str) -> tuple[subprocess.Popen[str], str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.apps", name], stdout=subprocess.PIPE, text=True
        )
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("PORT "), line
        return process, f"127.0.0.1:{line.split()[1]}"

    yield start
    for process in started:
        process.kill()
        process.wait()


async def test_sigkill_of_an_upstream_under_load_fails_no_idempotent_request(
    zdproxy: StartProxy, app_process: Callable[[str], tuple[subprocess.Popen[str], str]]
) -> None:
    victim, victim_address = app_process("victim")
    _, survivor_address = app_process("survivor")
    health = {"path": "/readyz", "interval": "100ms", "jitter": "0ms", "timeout": "300ms"}
    config: dict[str, Any] = {"pools": pools([victim_address, survivor_address])}
    config["pools"]["blue"]["health"] = {**health, "fall": 2, "rise": 2}
    proxy = zdproxy(config)
    await wait_until(lambda: sum("up after" in line for line in proxy.log_lines) == 2)

    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def worker(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with session.get(f"{proxy.url}/slow/20") as response:
                    await response.read()
                    outcomes[str(response.status)] += 1
            except aiohttp.ClientError as exc:
                outcomes[type(exc).__name__] += 1

    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        workers = [asyncio.ensure_future(worker(session)) for _ in range(16)]
        try:
            await asyncio.sleep(0.5)  # load is flowing to both upstreams
            victim.send_signal(signal.SIGKILL)
            killed_at = loop.time()
            went_down = f"blue/{victim_address} down after 2 failed checks"
            await wait_until(lambda: any(went_down in line for line in proxy.log_lines))
            ejected_after = loop.time() - killed_at
            await asyncio.sleep(0.3)  # and load goes on with the survivor alone
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 10)
    assert set(outcomes) == {"200"}, outcomes
    assert outcomes["200"] > 100
    # Out of rotation within about `fall` intervals (plus one probe timeout).
    assert ejected_after < 2 * 0.1 + 0.3 + 0.5


async def test_retry_budget_stops_a_retry_storm(
    zdproxy: StartProxy, upstream: StartUpstream, raw_upstream: StartRaw
) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    broken = await raw_upstream(reset)
    alive = await upstream("alive")
    # A budget of 0%: only the 3 retries every window allows get through.
    config = {"pools": pools([broken.address, alive.address]), "retry": {"budget_percent": 0}}
    proxy = zdproxy(config)
    result = await statuses(proxy.url, "GET", 40)
    reached_broken = broken.received.count(b"GET ")
    assert reached_broken > 3
    assert result == Counter({200: 40 - reached_broken + 3, 502: reached_broken - 3})


async def test_a_crashed_candidate_costs_no_request_of_any_method(
    zdproxy: StartProxy, upstream: StartUpstream, refused_address: Callable[[], str]
) -> None:
    blue = await upstream("blue")
    # Both candidate instances are gone: a connect failure must go to live, not to the
    # other dead instance. Unchecked and never ejected, so the split keeps sending there.
    green = [refused_address(), refused_address()]
    config: dict[str, Any] = {
        "pools": unchecked(pools([blue.address], green)),
        "split": {"live": "blue", "candidate_weight": 5000},
    }
    config["pools"]["green"]["outlier"] = {"consecutive_failures": 0}
    proxy = zdproxy(config)  # the default budget: a connect failure's retry never spends it
    # Nothing reached an app, so even a POST is sent again; blue answers everything.
    assert await statuses(proxy.url, "GET", 30) == Counter({200: 30})
    assert await statuses(proxy.url, "POST", 30) == Counter({200: 30})
    assert len(blue.seen) == 60

    green_ids = [f"green/{address}" for address in green]

    def connect_failures(metrics: Metrics) -> float:
        failures = metrics.by("zdproxy_upstream_failures_total", "upstream", kind="connect")
        return sum(failures.get(uid, 0) for uid in green_ids)

    # The candidate's records show every connect failure (each one retried once, on blue).
    metrics = await metrics_when(
        proxy,
        lambda m: (
            connect_failures(m) > 0
            and connect_failures(m) == m.get("zdproxy_retries_total", kind="connect")
        ),
    )
    answered = classes(metrics, f"blue/{blue.address}")
    assert answered["2xx"] == 60 and answered["5xx"] == 0
    assert metrics.get("zdproxy_retries_total", kind="over_budget") == 0


async def test_a_candidate_5xx_is_answered_by_live_for_idempotent_requests_only(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    green = await upstream("green", failing={"status": 500})
    # The default `statuses` ("5xx") covers the 500 this test once had to list.
    proxy = zdproxy(candidate_config(blue, green, 5000, {"budget_percent": 100}))
    assert await statuses(proxy.url, "GET", 40) == Counter({200: 40})
    gets_on_green = sum(entry["method"] == "GET" for entry in green.seen)
    assert gets_on_green > 0  # they did reach the candidate, and were answered by blue
    posts = await statuses(proxy.url, "POST", 40)
    posts_on_green = sum(entry["method"] == "POST" for entry in green.seen)
    assert posts_on_green > 0
    assert posts == Counter({200: 40 - posts_on_green, 500: posts_on_green})
    # Every 500 still counts against the candidate, the ones its user never saw too.
    green_id = f"green/{green.address}"
    await metrics_when(proxy, lambda m: classes(m, green_id).get("5xx") == len(green.seen))


async def test_a_post_the_candidate_left_hanging_gets_a_504_and_is_sent_once(
    zdproxy: StartProxy, upstream: StartUpstream, raw_upstream: StartRaw
) -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):  # the request, then nothing until zdproxy gives up
            pass

    hung = await raw_upstream(hang)
    blue = await upstream("blue")
    config: dict[str, Any] = {
        # Unchecked: a health check's connections would count as the app's.
        "pools": unchecked(pools([blue.address], [hung.address])),
        "split": {"live": "blue", "candidate_weight": 10000},
        "upstream": {"timeout": "300ms"},
        "retry": {"budget_percent": 100},
    }
    proxy = zdproxy(config)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}/order", data=b"1 item") as response,
    ):
        assert response.status == 504
    # It may have had effects: never sent again, to blue or to green.
    assert hung.received.count(b"POST /order ") == 1
    assert hung.connections == 1
    assert blue.seen == []


async def test_without_live_pool_retry_the_candidate_answer_passes(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    green = await upstream("green", failing={"status": 503})
    proxy = zdproxy(candidate_config(blue, green, 10000, {"on_live_pool": False}))
    assert await statuses(proxy.url, "GET", 10) == Counter({503: 10})
    assert blue.seen == []


async def test_idempotency_key_makes_a_post_retryable(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    green = await upstream("green", failing={"status": 503})
    proxy = zdproxy(candidate_config(blue, green, 10000, {"budget_percent": 100}))
    async with aiohttp.ClientSession() as session:
        headers = {"Idempotency-Key": "order-42"}
        async with session.post(f"{proxy.url}/pay", data=b"10 EUR", headers=headers) as response:
            assert response.status == 200
            assert (await response.json())["name"] == "blue"
    # Green got it first; blue got the same request, body and key included.
    assert [e["method"] for e in green.seen] == ["POST"]
    assert blue.seen[-1]["body_size"] == len(b"10 EUR")
    assert (b"Idempotency-Key", b"order-42") in blue.seen[-1]["headers"]
