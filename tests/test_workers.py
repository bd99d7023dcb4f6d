"""proxy.workers: N data-plane processes behind one main process, end to end.

The main process's view of its workers must be the whole data plane's: records
summed, every snapshot applied by every worker, a worker that dies replaced and its
lost requests counted. (Reloads, TLS, drains and restarts in place with workers are
the same tests as for one process, parametrized: test_operations, test_drain,
test_systemd.)
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ADMIN_TOKEN, Upstream, ZdProxy, admin_api, pools, run_cli, wait_until
from tests.test_metrics import metrics_when
from zdproxy.routing.records import IntervalRecord
from zdproxy.workers.messages import Report
from zdproxy.workers.tally import Seen, merge

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]


def workers_config(blue: Upstream, green: Upstream, **proxy: Any) -> dict[str, Any]:
    return {
        "pools": pools([blue.address], [green.address]),
        "proxy": {"workers": 2, **proxy},
        "log": {"level": "info"},
    }


async def status(proxy: ZdProxy) -> dict[str, Any]:
    answer: dict[str, Any] = await admin_api(proxy, "GET", "/v1/status")
    return answer


async def workers_when(
    proxy: ZdProxy, condition: Callable[[list[dict[str, Any]]], bool], within: float = 5.0
) -> list[dict[str, Any]]:
    """GET /v1/status every 20 ms until its workers meet `condition`; fail after `within`."""
    async with asyncio.timeout(within):
        while not condition(workers := (await status(proxy))["workers"]):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return workers


def running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


async def names(proxy: ZdProxy, count: int, path: str = "/") -> Counter[str]:
    """`count` requests, each on a new connection (so the kernel spreads them)."""

    async def one(i: int) -> str:
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"{proxy.url}{path}?{i}") as response,
        ):
            return str((await response.json())["name"]) if response.ok else str(response.status)

    results: Counter[str] = Counter()
    for start in range(0, count, 10):
        results.update(await asyncio.gather(*(one(i) for i in range(start, start + 10))))
    return results


async def test_workers_serve_the_listener_and_report_as_one_data_plane(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(workers_config(blue, green))
    workers = (await status(proxy))["workers"]
    assert [w["index"] for w in workers] == [1, 2]
    pids = [w["pid"] for w in workers]
    assert len(set(pids)) == 2 and proxy.pid not in pids
    assert [title(pid) for pid in pids] == ["zdproxy: worker 1", "zdproxy: worker 2"]
    assert all(w["current"] and w["restarts"] == 0 for w in workers)

    assert await names(proxy, 100) == Counter({"blue": 100})
    # The records of both workers are summed: every response is counted once.
    metrics = await metrics_when(
        proxy, lambda m: sum(m.by("zdproxy_requests_total", "class", color="blue").values()) >= 100
    )
    assert metrics.by("zdproxy_requests_total", "class", color="blue")["2xx"] == 100
    assert metrics.by("zdproxy_worker_up", "worker") == {"1": 1.0, "2": 1.0}
    assert metrics.by("zdproxy_worker_snapshot_current", "worker") == {"1": 1.0, "2": 1.0}
    env = {"ZDPROXY_ADMIN_URL": proxy.admin_address, "ZDPROXY_TOKEN": ADMIN_TOKEN}
    shown = await run_cli("status", env=env)
    assert shown.code == 0, shown.err
    table = shown.out[shown.out.index("WORKER") :].splitlines()
    assert table[0].split() == [
        "WORKER", "PID", "SNAPSHOT", "CONNECTIONS", "IN", "FLIGHT", "UP", "RESTARTS", "LOST"
    ]  # fmt: skip
    assert [row.split()[:2] for row in table[1:]] == [["1", str(pids[0])], ["2", str(pids[1])]]


async def test_a_shift_reaches_every_worker_before_it_is_answered(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(workers_config(blue, green))
    await admin_api(proxy, "PUT", "/v1/split", {"live": "blue", "candidate_weight": 10000})
    # A snapshot goes down the workers' channels at once; a new connection may reach
    # either worker a moment later and must find it applied.
    assert await names(proxy, 40) == Counter({"green": 40})
    workers = (await status(proxy))["workers"]
    assert all(w["current"] for w in workers), workers


async def test_a_killed_worker_is_replaced_and_its_lost_requests_are_counted(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(workers_config(blue, green))
    outcomes: list[str] = []

    async def slow(session: aiohttp.ClientSession, i: int) -> None:
        try:
            async with session.post(f"{proxy.url}/slow/3000?{i}", data=b"x") as response:
                outcomes.append(str(response.status))
        except aiohttp.ClientError as exc:
            outcomes.append(type(exc).__name__)

    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        requests = [asyncio.ensure_future(slow(session, i)) for i in range(8)]
        await wait_until(lambda: len(blue.seen) == 8)
        before = await workers_when(proxy, lambda ws: sum(w["requests"] for w in ws) == 8)
        victim = max(before, key=lambda w: w["requests"])
        survivor = next(w for w in before if w is not victim)
        os.kill(victim["pid"], signal.SIGKILL)
        await asyncio.gather(*requests)

    # Only the victim's requests failed; the other worker's were answered.
    assert Counter(outcomes) == Counter(
        {"200": survivor["requests"], "ServerDisconnectedError": victim["requests"]}
    ), (outcomes, before)
    events = (await admin_api(proxy, "GET", "/v1/events?kind=worker_exited"))["events"]
    assert [e["data"]["lost"] for e in events] == [victim["requests"]]
    assert events[0]["data"]["exit"] == "killed by SIGKILL"

    def new_pid(workers: list[dict[str, Any]]) -> bool:
        return workers[victim["index"] - 1]["pid"] not in (None, victim["pid"])

    replacement = (await workers_when(proxy, new_pid))[victim["index"] - 1]
    assert replacement["restarts"] == 1 and replacement["lost_requests"] == victim["requests"]
    assert await names(proxy, 30) == Counter({"blue": 30})  # both serve again
    index = str(victim["index"])
    metrics = await metrics_when(
        proxy, lambda m: m.by("zdproxy_worker_restarts_total", "worker").get(index) == 1
    )
    assert metrics.by("zdproxy_worker_lost_requests_total", "worker")[index] == victim["requests"]


async def test_a_silent_worker_is_killed_and_replaced(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(workers_config(blue, green))
    stopped = (await status(proxy))["workers"][0]
    os.kill(stopped["pid"], signal.SIGSTOP)  # alive, but it answers nothing any more

    def exited() -> bool:
        return any('msg="worker_exited:' in line for line in proxy.log_lines)

    await wait_until(exited, within=10)
    [event] = (await admin_api(proxy, "GET", "/v1/events?kind=worker_exited"))["events"]
    assert event["data"]["unresponsive"] is True and event["data"]["worker"] == 1
    assert "stopped answering and was killed" in event["reason"]
    workers = await workers_when(proxy, lambda ws: ws[0]["pid"] not in (None, stopped["pid"]))
    assert workers[0]["restarts"] == 1
    assert await names(proxy, 20) == Counter({"blue": 20})


async def test_stop_waits_for_every_workers_requests(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(workers_config(blue, green))
    pids = [w["pid"] for w in (await status(proxy))["workers"]]
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def slow(i: int) -> int:
            async with session.get(f"{proxy.url}/slow/1000?{i}") as response:
                return response.status

        requests = [asyncio.ensure_future(slow(i)) for i in range(6)]
        await wait_until(lambda: len(blue.seen) == 6)
        proxy.process.send_signal(signal.SIGTERM)
        assert await asyncio.gather(*requests) == [200] * 6
    assert await asyncio.to_thread(proxy.process.wait, 15) == 0
    assert not any(map(running, pids))  # no worker outlives it


async def test_a_worker_alone_goes_when_its_main_process_is_killed(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(workers_config(blue, green))
    pids = [w["pid"] for w in (await status(proxy))["workers"]]
    proxy.process.kill()
    await wait_until(lambda: not any(map(running, pids)), within=15)


# -- the main process's sums, without processes -----------------------------------------


def record(uid: str, ok: int, pending: tuple[float, ...] = ()) -> IntervalRecord:
    return IntervalRecord(
        uid, (0, 0, ok, 0, 0, 0), {}, {10: ok} if ok else {}, ok * 0.01, (ok, 0, 0, 0), pending
    )


def report(
    version: int, *records: IntervalRecord, in_flight: dict[str, tuple[int, int]] | None = None
) -> Report:
    return Report(
        version=version,
        records=list(records),
        streaks={},
        in_flight=in_flight or {},
        connections=0,
        retries={"connect": 1},
        pins={},
        preview_honoured={},
        preview_ignored={},
    )


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["blue/a", "blue/b", "green/c"]),
            st.integers(0, 50),
            # Ages as a worker reports them: the oldest first.
            st.lists(st.floats(0, 100), max_size=3).map(lambda a: tuple(sorted(a, reverse=True))),
        ),
        max_size=12,
    )
)
def test_merge_keeps_every_count_and_every_age(
    parts: list[tuple[str, int, tuple[float, ...]]],
) -> None:
    records = [record(uid, ok, ages) for uid, ok, ages in parts]
    merged = merge(records)
    assert len({r.upstream_id for r in merged}) == len(merged)  # one per upstream
    for uid in {r.upstream_id for r in records}:
        mine = [r for r in records if r.upstream_id == uid]
        [one] = [r for r in merged if r.upstream_id == uid]
        assert one.responses == sum(r.responses for r in mine)
        assert one.routes[0] == sum(r.routes[0] for r in mine)
        assert sum(one.latency.values()) == sum(sum(r.latency.values()) for r in mine)
        assert one.pending == tuple(sorted((a for r in mine for a in r.pending), reverse=True))


def test_merge_sums_counts_and_joins_the_ages_of_requests_in_flight() -> None:
    merged = merge([record("blue/a", 2, (0.5,)), record("blue/a", 3, (2.0,)), record("green/b", 1)])
    by = {r.upstream_id: r for r in merged}
    assert by["blue/a"].responses == 5 and by["blue/a"].latency == {10: 5}
    assert by["blue/a"].pending == (2.0, 0.5)
    assert by["green/b"].responses == 1


def test_a_worker_s_counts_are_taken_once_and_its_ages_until_the_next_report() -> None:
    seen = Seen()
    seen.absorb(report(3, record("blue/a", 2)))
    seen.absorb(report(3, record("blue/a", 1, (1.5,)), in_flight={"blue/a": (1, 0)}))
    first = merge(seen.take())
    assert [(r.responses, r.pending) for r in first] == [(3, (1.5,))]
    again = merge(seen.take())  # no new report: no counts, the same request in flight
    assert [(r.responses, r.pending) for r in again] == [(0, (1.5,))]
    assert seen.in_flight({"blue/a"}) == (1, 0) and seen.requests() == 1 and seen.version == 3
