"""Routing: the split between live and candidate, balancing within a pool, fail safe,
unix sockets, and the two interfaces between the planes (snapshots down, records up)."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.apps import upstream_app
from tests.conftest import (
    RawUpstream,
    Upstream,
    ZdProxy,
    in_process_settings,
    pools,
    unchecked,
    wait_until,
)
from zdproxy.config.units import Address
from zdproxy.ops.daemon import Daemon
from zdproxy.routing.histogram import BOUNDS
from zdproxy.routing.records import IntervalRecord
from zdproxy.routing.snapshot import RoutingSnapshot, UpstreamTarget

StartUpstream = Callable[..., Any]
StartProxy = Callable[..., ZdProxy]


# -- helpers ---------------------------------------------------------------------------


async def names(
    url: str,
    count: int,
    *,
    concurrency: int = 16,
    connector: aiohttp.BaseConnector | None = None,
) -> Counter[str]:
    """Send `count` GETs (at most `concurrency` at once); count the answering apps' names.

    No cookie is kept, so every request is a new user with a bucket of its own.
    """
    limit = asyncio.Semaphore(concurrency)
    jar = aiohttp.DummyCookieJar()
    async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as session:

        async def one(i: int) -> str:
            async with limit, session.get(f"{url}/n/{i}") as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
                assert body["path"] == f"/n/{i}"
                return str(body["name"])

        return Counter(await asyncio.gather(*(one(i) for i in range(count))))


def split(live: str, candidate_weight: int) -> dict[str, Any]:
    return {"live": live, "candidate_weight": candidate_weight}


@pytest.fixture
async def blue_green(upstream: StartUpstream) -> tuple[Upstream, Upstream]:
    return await upstream("blue"), await upstream("green")


@pytest.fixture
def no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process Settings read ZDPROXY_ variables too; keep the runner's out."""
    for name in list(os.environ):
        if name.startswith("ZDPROXY_"):
            monkeypatch.delenv(name)


# -- the split -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("live", "weight", "expected"),
    [
        ("blue", 0, "blue"),
        ("blue", 10000, "green"),
        ("green", 0, "green"),
        ("green", 10000, "blue"),
    ],
)
async def test_split_extremes_send_everything_to_one_color(
    zdproxy: StartProxy,
    blue_green: tuple[Upstream, Upstream],
    live: str,
    weight: int,
    expected: str,
) -> None:
    blue, green = blue_green
    proxy = zdproxy({"pools": pools([blue.address], [green.address]), "split": split(live, weight)})
    assert await names(proxy.url, 200) == Counter({expected: 200})
    idle = green if expected == "blue" else blue
    assert idle.seen == []  # not one request, not even a probe


@pytest.mark.parametrize("live", ["blue", "green"])
async def test_half_split_shares_traffic(
    zdproxy: StartProxy, blue_green: tuple[Upstream, Upstream], live: str
) -> None:
    blue, green = blue_green
    proxy = zdproxy({"pools": pools([blue.address], [green.address]), "split": split(live, 5000)})
    counts = await names(proxy.url, 1000, concurrency=32)
    assert counts.total() == 1000
    # Binomial(1000, 0.5): sigma ~ 16 requests, so 400..600 is more than 6 sigma wide.
    assert 400 <= counts["green"] <= 600, counts
    assert len(blue.seen) == counts["blue"]
    assert len(green.seen) == counts["green"]


async def test_small_candidate_weight_is_a_small_share(
    zdproxy: StartProxy, blue_green: tuple[Upstream, Upstream]
) -> None:
    blue, green = blue_green
    proxy = zdproxy({"pools": pools([blue.address], [green.address]), "split": split("blue", 1000)})
    counts = await names(proxy.url, 1000, concurrency=32)
    # Binomial(1000, 0.1): mean 100, sigma ~ 9.5.
    assert 40 <= counts["green"] <= 170, counts
    assert counts["blue"] == 1000 - counts["green"]


# -- balancing within a pool -------------------------------------------------------------


async def test_two_upstreams_in_a_pool_both_get_traffic(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    first, second = await upstream("blue-1"), await upstream("blue-2")
    proxy = zdproxy({"pools": pools([first.address, second.address])})
    counts = await names(proxy.url, 200)
    assert counts.total() == 200
    # Equal weights: each gets about half; 50 is over 7 sigma below the mean.
    assert counts["blue-1"] >= 50, counts
    assert counts["blue-2"] >= 50, counts


async def test_least_outstanding_steers_away_from_a_stuck_upstream(
    zdproxy: StartProxy, upstream: StartUpstream, raw_upstream: Callable[..., Any]
) -> None:
    """One upstream holds every request it gets; the other answers at once. P2C on
    outstanding requests sends a new request to the stuck one only when both random
    choices are the stuck one (1 in 4); a balancer blind to outstanding requests would
    send it half of them."""
    release, arrived = asyncio.Event(), asyncio.Event()
    held = 0

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal held
        while True:
            await reader.readuntil(b"\r\n\r\n")
            held += 1
            arrived.set()
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstuck")
            await writer.drain()

    stuck: RawUpstream = await raw_upstream(hold)
    fast: Upstream = await upstream("fast")
    proxy = zdproxy({"pools": pools([stuck.address, fast.address])})

    requests = 160
    pending: list[asyncio.Task[tuple[int, bytes]]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def get(i: int) -> tuple[int, bytes]:
            async with session.get(f"{proxy.url}/n/{i}") as resp:
                return resp.status, await resp.read()

        try:
            for i in range(requests):
                # One at a time: answered by `fast`, or arrived (and held) at `stuck`.
                before = held
                arrived.clear()
                task = asyncio.create_task(get(i))
                arrival = asyncio.create_task(arrived.wait())
                async with asyncio.timeout(5):
                    await asyncio.wait({task, arrival}, return_when=asyncio.FIRST_COMPLETED)
                arrival.cancel()
                if held > before:
                    pending.append(task)
                else:
                    status, _ = task.result()
                    assert status == 200
            assert held + len(fast.seen) == requests
            # Expected 40 (sigma ~5.5) with P2C; 80 (sigma ~6.3) if outstanding were ignored.
            assert held <= 60, (held, len(fast.seen))
            assert held >= 10  # the stuck one still gets its both-choices share
        finally:
            release.set()
            results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(r == (200, b"stuck") for r in results), results


async def test_upstream_weights_bias_the_share(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    light, heavy = await upstream("light"), await upstream("heavy")
    config = {
        "pools": {
            "blue": {
                "upstreams": [
                    {"address": light.address, "weight": 1},
                    {"address": heavy.address, "weight": 3},
                ]
            },
            "green": {"upstreams": []},
        }
    }
    proxy = zdproxy(config)
    limit = asyncio.Semaphore(24)

    async with aiohttp.ClientSession() as session:

        async def slow() -> None:
            async with limit, session.get(f"{proxy.url}/slow/20") as resp:
                assert resp.status == 200
                assert (await resp.text()).startswith("slow ")

        await asyncio.gather(*(slow() for _ in range(240)))

    assert len(light.seen) + len(heavy.seen) == 240
    # Weight 1 of 4: about a quarter (measured ~23%). Ignoring weights would give ~50%;
    # ignoring outstanding requests (P2C on weights alone) would give ~1/16.
    light_share = len(light.seen) / 240
    assert 0.10 <= light_share <= 0.35, (len(light.seen), len(heavy.seen))


# -- fail safe ---------------------------------------------------------------------------


async def test_empty_live_pool_hands_traffic_to_candidate(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    green = await upstream("green")
    proxy = zdproxy({"pools": pools([], [green.address]), "split": split("blue", 0)})
    assert await names(proxy.url, 50) == Counter({"green": 50})


async def test_empty_candidate_pool_gives_its_share_to_live(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address], []), "split": split("blue", 10000)})
    assert await names(proxy.url, 50) == Counter({"blue": 50})


async def test_no_routable_upstream_at_all_is_503(
    zdproxy: StartProxy, refused_address: Callable[[], str]
) -> None:
    dead = refused_address()  # its TCP check never passes
    proxy = zdproxy({"pools": pools([dead], []), "split": split("blue", 5000)})
    async with aiohttp.ClientSession() as session:
        for path in ("/", "/some/page?q=1"):
            async with session.get(proxy.url + path) as resp:
                assert resp.status == 503
                assert "no healthy upstream" in await resp.text()


# -- unix sockets ----------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose paths fit in sun_path (108 bytes) whatever the test is called."""
    with tempfile.TemporaryDirectory(prefix="zd-") as name:
        yield Path(name)


@pytest.fixture
async def unix_upstream(short_dir: Path) -> AsyncIterator[Callable[[str], Any]]:
    runners: list[web.AppRunner] = []

    async def factory(name: str) -> tuple[str, list[dict[str, Any]]]:
        seen: list[dict[str, Any]] = []
        runner = web.AppRunner(upstream_app(name, seen), access_log=None)
        await runner.setup()
        path = short_dir / f"{name}.sock"
        await web.UnixSite(runner, str(path)).start()
        runners.append(runner)
        return f"unix:{path}", seen

    yield factory
    for runner in runners:
        await runner.cleanup()


async def test_unix_socket_upstream(
    zdproxy: StartProxy, unix_upstream: Callable[[str], Any]
) -> None:
    address, seen = await unix_upstream("blue-unix")
    proxy = zdproxy({"pools": pools([address])})
    assert await names(proxy.url, 20) == Counter({"blue-unix": 20})
    assert len(seen) == 20


async def test_unix_socket_listener(
    zdproxy: StartProxy, unix_upstream: Callable[[str], Any], short_dir: Path
) -> None:
    address, seen = await unix_upstream("green-unix")
    listen = short_dir / "zdproxy.sock"
    proxy = zdproxy(
        {"proxy": {"listen": f"unix:{listen}"}, "pools": pools([], [address])},
    )
    assert proxy.address == f"unix:{listen}"
    counts = await names("http://zdproxy", 20, connector=aiohttp.UnixConnector(path=str(listen)))
    assert counts == Counter({"green-unix": 20})
    assert len(seen) == 20


# -- records and snapshots (in process) --------------------------------------------------


async def test_records_reach_the_control_plane_per_upstream_and_class(
    upstream: StartUpstream,
    no_env_overrides: None,
    tmp_path: Path,
    refused_address: Callable[[], str],
) -> None:
    app = await upstream("blue")
    dead = refused_address()
    config: dict[str, Any] = {
        # Green unchecked: a checked one would never be routable, nothing listens there.
        "pools": unchecked(pools([app.address], [dead])),
        "split": split("blue", 0),
        # The failed connect must reach the client, not be retried on the live pool.
        "retry": {"on_live_pool": False},
    }
    daemon = Daemon(in_process_settings(tmp_path, config))
    await daemon.start()
    telemetry = daemon.control.telemetry
    try:
        assert len(daemon.addresses) == 1
        url = f"http://{daemon.addresses[0]}"
        blue_id, green_id = f"blue/{app.address}", f"green/{dead}"
        assert telemetry.totals == {}  # nothing happened yet

        expected = {"/": 200, "/a": 200, "/b": 200, "/status/404": 404, "/status/500": 500}
        async with aiohttp.ClientSession() as session:
            for path in [*expected, "/status/404"]:
                async with session.get(url + path) as resp:
                    await resp.read()
                    assert resp.status == expected[path]

            # Send everything to green, whose only upstream refuses connections.
            daemon.control.set_split(10000, force=True)
            assert daemon.control.routing.candidate_weight == 10000
            async with session.get(url + "/") as resp:
                assert resp.status == 502
                assert f"cannot connect to upstream {green_id}" in await resp.text()

        # The control plane's tick folds the data plane's interval records into totals.
        await wait_until(lambda: green_id in telemetry.totals)
        blue = telemetry.totals[blue_id]
        assert blue.by_class == [0, 0, 3, 0, 2, 1]
        assert blue.failures == {}
        assert telemetry.latency["blue"].count == 6
        assert 0 < telemetry.latency["blue"].total < 6 * 5.0
        assert telemetry.totals[green_id].failures == {"connect": 1}
        assert telemetry.latency["green"].count == 0

        # Totals only grow: a record is counted once, however often the tick runs.
        async with aiohttp.ClientSession() as session, session.get(url + "/") as resp:
            assert resp.status == 502
        await wait_until(lambda: telemetry.totals[green_id].failures == {"connect": 2})
        assert telemetry.totals[blue_id].by_class == [0, 0, 3, 0, 2, 1]
    finally:
        await daemon.stop()


def test_interval_record_to_dict_round_trip() -> None:
    record = IntervalRecord(
        upstream_id="blue/127.0.0.1:9001",
        by_class=(0, 0, 7, 1, 2, 3),
        failures={"connect": 2, "timeout": 1},
        latency={0: 1, 300: 11, len(BOUNDS): 1},
        latency_sum=1.25,
        routes=(9, 2, 1, 1),
        pending=(0.5, 12.25),
    )
    data = record.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    assert IntervalRecord.from_dict(json.loads(json.dumps(data))) == record
    assert record.responses == 13


def test_routing_snapshot_round_trip() -> None:
    targets = {
        "blue": (
            UpstreamTarget("blue/127.0.0.1:9001", "blue", Address.parse("127.0.0.1:9001")),
            UpstreamTarget("blue/[::1]:9002", "blue", Address.parse("[::1]:9002"), weight=300),
        ),
        "green": (
            UpstreamTarget("green/unix:/run/g.sock", "green", Address.parse("unix:/run/g.sock")),
        ),
    }
    snapshot = RoutingSnapshot(version=7, live="green", candidate_weight=2500, pools=targets)  # type: ignore[arg-type]
    assert snapshot.candidate == "blue"
    data = snapshot.to_dict()
    wire = json.loads(json.dumps(data))  # what a pipe to a worker would carry
    assert wire == data
    assert RoutingSnapshot.from_dict(wire) == snapshot
    assert wire["pools"]["blue"][1] == {
        "id": "blue/[::1]:9002",
        "color": "blue",
        "address": "[::1]:9002",
        "weight": 300,
    }


def test_routing_snapshot_refuses_weight_out_of_range() -> None:
    with pytest.raises(ValueError, match="candidate_weight"):
        RoutingSnapshot(version=1, live="blue", candidate_weight=10001)
    with pytest.raises(ValueError, match="candidate_weight"):
        RoutingSnapshot(version=1, live="blue", candidate_weight=-1)


async def test_snapshot_from_settings_round_trips(no_env_overrides: None, tmp_path: Path) -> None:
    settings = in_process_settings(
        tmp_path,
        {
            "pools": unchecked(  # no checks: the snapshot lists the upstreams at once
                {
                    "blue": {"upstreams": [{"address": "127.0.0.1:9001", "weight": 3}]},
                    "green": {"upstreams": ["unix:/run/green.sock"]},
                }
            ),
            "split": split("blue", 500),
        },
    )
    daemon = Daemon(settings)
    first = daemon.control.restore()  # as at start: health checks synced, then published
    second = daemon.control.publish()
    assert second.version > first.version  # every publish is a new snapshot
    assert RoutingSnapshot.from_dict(json.loads(json.dumps(first.to_dict()))) == first
    assert [t.to_dict() for t in first.pools["blue"]] == [
        {"id": "blue/127.0.0.1:9001", "color": "blue", "address": "127.0.0.1:9001", "weight": 3}
    ]
    assert first.pools["green"][0].id == "green/unix:/run/green.sock"
    assert (first.live, first.candidate, first.candidate_weight) == ("blue", "green", 500)
    await daemon.stop()
