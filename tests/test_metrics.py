"""Prometheus metrics at /metrics, and the event log file in the state dir."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    ADMIN_AUTH,
    RawHandler,
    RawUpstream,
    Upstream,
    ZdProxy,
    admin_api,
    pools,
    unchecked,
)

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]
StartRaw = Callable[[RawHandler], Awaitable[RawUpstream]]

EVENT_KEYS = {"id", "time", "timestamp", "kind", "reason", "actor", "by", "data"}


class Metrics:
    """One scrape: every sample by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """{value of `label`: sample} for the samples of `name` that have `labels`."""
        wanted = set(labels.items())
        return {
            dict(key)[label]: value
            for (sample, key), value in self.samples.items()
            if sample == name and wanted <= key
        }


def classes(metrics: Metrics, upstream: str) -> dict[str, float]:
    """zdproxy_requests_total of one upstream, by status class."""
    return metrics.by("zdproxy_requests_total", "class", upstream=upstream)


async def scrape(proxy: ZdProxy) -> Metrics:
    async with (
        aiohttp.ClientSession() as session,  # no token: /metrics is open
        session.get(f"{proxy.admin_url}/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Metrics(await response.text())


async def metrics_when(
    proxy: ZdProxy, condition: Callable[[Metrics], bool], within: float = 5.0
) -> Metrics:
    """Scrape every 20 ms until `condition` holds (counters move on the 100 ms control
    tick); fail with the last scrape after `within` seconds."""
    metrics = await scrape(proxy)
    try:
        async with asyncio.timeout(within):
            while not condition(metrics):
                await asyncio.sleep(0.02)
                metrics = await scrape(proxy)
    except TimeoutError:
        raise AssertionError(f"metrics never matched:\n{metrics.text}") from None
    return metrics


async def get_all(url: str, paths: list[str]) -> list[tuple[int, str]]:
    """GET each path in turn: (status, body)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        results = []
        for path in paths:
            async with session.get(f"{url}{path}") as response:
                results.append((response.status, await response.text()))
        return results


# -- /metrics ---------------------------------------------------------------------------


async def test_request_counts_durations_and_in_flight(
    zdproxy: StartProxy, upstream: StartUpstream, raw_upstream: StartRaw
) -> None:
    release = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Keeps each request in flight until the test releases it."""
        await reader.readuntil(b"\r\n\r\n")
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nheld\n")
        await writer.drain()

    blue = await upstream("blue")
    green = await raw_upstream(held)
    blue_id, green_id = f"blue/{blue.address}", f"green/{green.address}"
    config: dict[str, Any] = {
        "pools": pools([blue.address], [green.address]),
        "pins": [{"name": "hold", "path_prefix": ["/hold"], "to": "green"}],
    }
    config["pools"]["blue"]["outlier"] = {"consecutive_failures": 0}  # the 500s stay in
    proxy = zdproxy(config)

    results = await get_all(proxy.url, [f"/ok/{i}" for i in range(25)] + ["/status/500"] * 6)
    assert [status for status, _ in results] == [200] * 25 + [500] * 6
    metrics = await metrics_when(
        proxy, lambda m: m.get("zdproxy_request_duration_seconds_count", color="blue") == 31
    )
    assert metrics.types["zdproxy_requests"] == "counter"
    assert metrics.by("zdproxy_requests_total", "class", color="blue", upstream=blue_id) == {
        "1xx": 0,
        "2xx": 25,
        "3xx": 0,
        "4xx": 0,
        "5xx": 6,
    }
    assert classes(metrics, green_id) == {}  # no answer from green yet
    assert metrics.get("zdproxy_request_duration_seconds_count", color="green") == 0
    assert metrics.get("zdproxy_request_duration_seconds_bucket", color="blue", le="+Inf") == 31
    assert (metrics.get("zdproxy_request_duration_seconds_sum", color="blue") or 0) > 0
    assert metrics.by("zdproxy_upstream_in_flight", "upstream") == {blue_id: 0, green_id: 0}
    assert metrics.by("zdproxy_upstream_up", "upstream") == {blue_id: 1, green_id: 1}

    # Three requests held by green: in flight now, counted once answered.
    holding = [asyncio.ensure_future(get_all(proxy.url, [f"/hold/{i}"])) for i in range(3)]
    metrics = await metrics_when(
        proxy, lambda m: m.get("zdproxy_upstream_in_flight", color="green", upstream=green_id) == 3
    )
    assert metrics.get("zdproxy_upstream_in_flight", color="blue", upstream=blue_id) == 0
    assert metrics.get("zdproxy_request_duration_seconds_count", color="green") == 0
    release.set()
    assert [await task for task in holding] == [[(200, "held\n")]] * 3
    metrics = await metrics_when(
        proxy, lambda m: m.get("zdproxy_request_duration_seconds_count", color="green") == 3
    )
    assert metrics.get("zdproxy_upstream_in_flight", color="green", upstream=green_id) == 0
    assert classes(metrics, green_id) == {"1xx": 0, "2xx": 3, "3xx": 0, "4xx": 0, "5xx": 0}
    assert classes(metrics, blue_id)["2xx"] == 25
    assert metrics.get("zdproxy_request_duration_seconds_count", color="blue") == 31
    assert metrics.get("zdproxy_pin_matches_total", rule="hold") == 3


async def test_split_drain_and_reload_gauges(zdproxy: StartProxy, upstream: StartUpstream) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    blue_id, green_id = f"blue/{blue.address}", f"green/{green.address}"
    config: dict[str, Any] = {"pools": pools([blue.address], [green.address])}
    proxy = zdproxy(config)
    metrics = await scrape(proxy)
    assert metrics.by("zdproxy_split_weight", "color") == {"blue": 1.0, "green": 0.0}
    assert metrics.by("zdproxy_config_reloads_total", "result") == {"applied": 0, "refused": 0}
    assert metrics.by("zdproxy_upstream_drained", "upstream") == {blue_id: 0, green_id: 0}

    await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 2500})
    metrics = await scrape(proxy)
    assert metrics.by("zdproxy_split_weight", "color") == {"blue": 0.75, "green": 0.25}

    await admin_api(proxy, "POST", "/v1/drain", {"color": "green"})
    metrics = await scrape(proxy)
    assert metrics.by("zdproxy_upstream_drained", "upstream") == {blue_id: 0, green_id: 1}
    assert metrics.by("zdproxy_upstream_up", "upstream") == {blue_id: 1, green_id: 0}
    await admin_api(proxy, "POST", "/v1/undrain", {"color": "green"})
    metrics = await scrape(proxy)
    assert metrics.by("zdproxy_upstream_drained", "upstream") == {blue_id: 0, green_id: 0}
    assert metrics.by("zdproxy_upstream_up", "upstream") == {blue_id: 1, green_id: 1}

    config["split"] = {"candidate_weight": 5000}  # the file's split: it takes over
    assert await proxy.reload(config)
    config["split"] = {"candidate_weight": 20000}
    assert not await proxy.reload(config)
    metrics = await scrape(proxy)
    assert metrics.by("zdproxy_config_reloads_total", "result") == {"applied": 1, "refused": 1}
    assert metrics.by("zdproxy_split_weight", "color") == {"blue": 0.5, "green": 0.5}


async def test_retries_and_ejections(zdproxy: StartProxy, upstream: StartUpstream) -> None:
    blue = await upstream("blue")
    green_a = await upstream("green-a", failing={"status": 503})
    green_b = await upstream("green-b", failing={"status": 503})
    green_ids = {f"green/{green_a.address}", f"green/{green_b.address}"}
    config: dict[str, Any] = {
        "pools": pools([blue.address], [green_a.address, green_b.address]),
        "split": {"live": "blue", "candidate_weight": 10000},
        "retry": {"budget_percent": 100},
    }
    # Both green upstreams fail; the detector may eject one (50% of two), never both.
    config["pools"]["green"]["outlier"] = {"consecutive_failures": 3, "max_ejected_percent": 50}
    proxy = zdproxy(config)
    metrics = await scrape(proxy)
    assert metrics.by("zdproxy_retries_total", "kind") == {
        "connect": 0,
        "reset": 0,
        "status": 0,
        "evacuate": 0,
        "over_budget": 0,
    }

    # Every request goes to green first, gets 503, and is answered by blue instead.
    results = await get_all(proxy.url, [f"/r/{i}" for i in range(20)])
    assert [(status, json.loads(body)["name"]) for status, body in results] == [(200, "blue")] * 20
    assert len(green_a.seen) + len(green_b.seen) == 20
    blue_id = f"blue/{blue.address}"

    def settled(m: Metrics) -> bool:
        """Every answer counted (on the tick), and the ejection made."""
        green_5xx = sum(classes(m, upstream).get("5xx", 0) for upstream in green_ids)
        ejections = m.by("zdproxy_upstream_ejections_total", "upstream").values()
        return green_5xx == 20 and classes(m, blue_id).get("2xx") == 20 and sum(ejections) == 1

    metrics = await metrics_when(proxy, settled)
    assert metrics.get("zdproxy_retries_total", kind="status") == 20
    assert metrics.get("zdproxy_retries_total", kind="over_budget") == 0
    ejections = metrics.by("zdproxy_upstream_ejections_total", "upstream", color="green")
    [ejected] = [upstream for upstream, n in ejections.items() if n == 1]
    assert set(ejections) == green_ids
    assert metrics.get("zdproxy_upstream_up", color="green", upstream=ejected) == 0
    [other] = green_ids - {ejected}
    assert metrics.get("zdproxy_upstream_up", color="green", upstream=other) == 1
    events = (await admin_api(proxy, "GET", "/v1/events?kind=upstream_ejected"))["events"]
    assert [e["data"]["upstream"] for e in events] == [ejected]
    for app in (green_a, green_b):  # each green upstream: its own count
        assert classes(metrics, f"green/{app.address}").get("5xx", 0) == len(app.seen)
    assert metrics.get("zdproxy_request_duration_seconds_count", color="green") == 20
    assert metrics.get("zdproxy_request_duration_seconds_count", color="blue") == 20


# -- the event log file -----------------------------------------------------------------


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def proxy_with_state(
    zdproxy: StartProxy, upstream: StartUpstream, state: Path, **options: Any
) -> tuple[ZdProxy, dict[str, Any], Upstream, Upstream]:
    """zdproxy over a blue and a green app, its state (and event log) in `state`; no
    health checks, so that the only events are the test's changes."""
    blue, green = await upstream("blue"), await upstream("green")
    config = {
        "pools": unchecked(pools([blue.address], [green.address])),
        "state": {"dir": str(state), **options},
    }
    return zdproxy(config), config, blue, green


async def test_events_file_holds_every_change(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    proxy, config, _, green = await proxy_with_state(zdproxy, upstream, state)
    began = time.time()
    pool = {"upstreams": [{"address": green.address, "weight": 100}], "version": "g2"}
    await admin_api(proxy, "PUT", "/v1/pools/green", pool)
    await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 1234})
    rules = [{"header": "X-Team", "values": ["qa"], "to": "green"}]
    await admin_api(proxy, "PUT", "/v1/rules", {"rules": rules})
    await admin_api(proxy, "POST", "/v1/drain", {"color": "green", "wait": True})
    await admin_api(proxy, "POST", "/v1/undrain", {"color": "green"})

    written = read_events(state / "events.jsonl")
    assert all(set(event) == EVENT_KEYS for event in written)
    assert [e["id"] for e in written] == list(range(1, len(written) + 1))
    assert [e["kind"] for e in written] == [
        "started",
        "pool_changed",
        "split_changed",
        "rules_changed",
        "drain_started",
        "drained",
        "undrained",
    ]
    # The file says what the API says.
    assert written == (await admin_api(proxy, "GET", "/v1/events"))["events"]
    times = [e["time"] for e in written]
    assert times == sorted(times) and began - 5 < times[0] and times[-1] <= time.time()
    assert [e["actor"] for e in written] == ["auto", "api", "api", "api", "api", "api", "api"]
    assert written[1]["data"]["after"] == pool and written[1]["data"]["color"] == "green"
    split = written[2]
    assert "12.34%" in split["reason"]
    assert split["data"]["before"] == {"blue": 10000, "green": 0}
    assert split["data"]["after"] == {"blue": 10000 - 1234, "green": 1234}
    assert written[3]["data"]["rules"] == rules
    assert written[4]["data"]["upstreams"] == [f"green/{green.address}"]
    assert written[5]["data"]["drained"] is True and written[5]["data"]["cut"] == 0

    # Ids continue across a crash and a restart.
    proxy.process.send_signal(signal.SIGKILL)
    proxy.process.wait(5)
    proxy = zdproxy(config)
    history = (await admin_api(proxy, "GET", "/v1/events"))["events"]
    assert history[: len(written)] == written  # read back from the file at start
    started = history[-1]
    assert started["kind"] == "started" and started["id"] == written[-1]["id"] + 1
    assert read_events(state / "events.jsonl")[-1] == started


async def test_events_file_rotates_by_size_and_keeps_two(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    state = tmp_path / "state"
    config = {
        "pools": unchecked(pools([blue.address], [green.address])),  # no upstream_up events
        "state": {"dir": str(state), "events_file_max": 4096, "events_files_kept": 2},
    }
    proxy = zdproxy(config)
    async with aiohttp.ClientSession(proxy.admin_url, headers=ADMIN_AUTH) as session:
        for weight in range(1, 121):
            async with session.put("/v1/split", json={"candidate_weight": weight}) as response:
                assert response.status == 200
    history = (await admin_api(proxy, "GET", "/v1/events?limit=1000"))["events"]
    assert len(history) == 121  # started, then 120 changes

    names = sorted(path.name for path in state.iterdir() if path.name.startswith("events"))
    assert names == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    files = [state / name for name in reversed(names)]  # oldest first
    assert all(path.stat().st_size <= 4096 for path in files)
    kept = [event for path in files for event in read_events(path)]
    # The newest events, in order, without a gap, ending with the last change.
    assert kept == history[-len(kept) :]
    assert kept[0]["id"] > 1  # the oldest went with the rotations
    assert kept[-1]["data"]["after"]["green"] == 120
    # Each rotated file was full: the next event would not have fitted.
    for path, following in itertools.pairwise(files):
        next_line = json.dumps(read_events(following)[0], separators=(",", ":")) + "\n"
        assert path.stat().st_size + len(next_line) > 4096


async def test_event_after_a_torn_last_line_is_a_line_of_its_own(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    proxy, config, _, _ = await proxy_with_state(zdproxy, upstream, state)
    await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 100})
    proxy.process.send_signal(signal.SIGKILL)
    proxy.process.wait(5)
    path = state / "events.jsonl"
    whole = path.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    path.write_bytes(whole[: len(whole) - len(last) // 2])  # half the last line made it

    proxy = zdproxy(config)
    started = (await admin_api(proxy, "GET", "/v1/events?kind=started"))["events"][-1]
    assert started["id"] == 2  # after the last whole event: the torn one is skipped
    assert json.loads(path.read_text().splitlines()[-1]) == started
