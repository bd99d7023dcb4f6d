"""GET /v1/status?follow=1, the dashboard's stream: the ring of per-second samples, then
each second a sample and the status, from one producer for every follower."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import ADMIN_AUTH, Upstream, ZdProxy, admin_api, pools, wait_healthy
from zdproxy.admin.feed import FOLLOWER_BACKLOG, SERIES, Follower

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]
WITHIN = 10.0  # seconds for a frame the feed sends every second


async def frames(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """(event, data) of each server-sent event."""
    event = ""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: ") :])


async def next_frame(stream: AsyncIterator[tuple[str, Any]], kind: str) -> Any:
    async with asyncio.timeout(WITHIN):
        async for event, data in stream:
            if event == kind:
                return data
    raise AssertionError(f"the stream ended before a {kind} event")


def check_columns(samples: dict[str, Any]) -> int:
    """Every series of both colors has one value per time; returns how many."""
    count = len(samples["time"])
    assert samples["interval"] == 1.0
    assert set(samples["colors"]) == {"blue", "green"}
    for series in samples["colors"].values():
        assert set(series) == set(SERIES)
        assert all(len(values) == count for values in series.values())
    return count


async def test_the_feed_sends_the_history_then_a_sample_and_the_status_each_second(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy({"pools": pools([blue.address], [green.address])})
    await wait_healthy(proxy, "green")
    url = f"{proxy.admin_url}/v1/status?follow=1"
    async with (
        aiohttp.ClientSession(headers=ADMIN_AUTH) as session,
        session.get(url) as response,
    ):
        assert response.headers["Content-Type"] == "text/event-stream"
        stream = frames(response)
        history = await next_frame(stream, "samples")
        check_columns(history)
        status = await next_frame(stream, "status")
        assert status["split"]["candidate_weight"] == 0

        async with aiohttp.ClientSession() as users:  # blue takes it all at 0%
            for _ in range(20):
                async with users.get(proxy.url + "/") as answer:
                    assert answer.status == 200
        await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 2500})
        # Within a few seconds: a sample with blue's requests, a status with the shift.
        seen_blue = False
        async with asyncio.timeout(WITHIN):
            while not seen_blue or status["split"]["candidate_weight"] != 2500:
                sample = await next_frame(stream, "samples")
                assert check_columns(sample) == 1
                colors = sample["colors"]
                seen_blue |= colors["blue"]["requests_per_second"][0] > 0
                assert colors["green"]["requests_per_second"] == [0.0]
                status = await next_frame(stream, "status")
        assert sample["colors"]["green"]["effective_share"] == [25.0]

    # A dashboard opened now gets the seconds that went by as its history.
    async with (
        aiohttp.ClientSession(headers=ADMIN_AUTH) as session,
        session.get(url) as response,
    ):
        later = await next_frame(frames(response), "samples")
        assert check_columns(later) > check_columns(history)
        assert later["time"] == sorted(later["time"])
        assert any(rate > 0 for rate in later["colors"]["blue"]["requests_per_second"])


async def test_the_feed_needs_the_token(zdproxy: StartProxy) -> None:
    proxy = zdproxy({"pools": pools(["127.0.0.1:9"])})
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.admin_url}/v1/status?follow=1") as response,
    ):
        assert response.status == 401


async def test_a_follower_too_far_behind_is_cut_and_gets_nothing_more() -> None:
    follower = Follower()
    for n in range(FOLLOWER_BACKLOG):
        follower.push(b"frame %d" % n)
    assert await follower.next() == b"frame 0"
    follower.push(b"one more")  # room for it: one was taken
    follower.push(b"past the backlog")
    assert follower.ended
    assert await follower.next() is None  # it reconnects and gets the ring again
