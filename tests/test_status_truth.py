"""The status and the events tell what is, not what was asked: each color's effective
share after the fallback, each upstream's state (drained, ejected, down, unknown, up,
unchecked), who acted on each event, the outlier detector's skipped ejections said
truly and rarely, and timestamps with their zone.

Logic against fakes (tests/fakes.py, the rollout harness of tests/test_rollout_model.py),
then a real zdproxy with real upstreams for what the API and the CLI show."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import pytest

from tests.conftest import (
    ADMIN_TOKEN,
    Upstream,
    ZdProxy,
    admin_api,
    run_cli,
    wait_healthy,
    wait_until,
)
from tests.fakes import FakeClock, FakeDataPlane, FakeHealth
from tests.test_rollout_model import RolloutMachine
from tests.test_rollout_unit import judged_failing, stepping
from zdproxy.config.settings import OutlierSettings
from zdproxy.config.units import Address
from zdproxy.control.availability import UpstreamState, effective_shares, upstream_state
from zdproxy.control.events import EventLog, EventRecord
from zdproxy.control.health import HealthChecker
from zdproxy.control.outliers import SKIP_REPORT_SECONDS, OutlierDetector
from zdproxy.routing.snapshot import RoutingSnapshot, UpstreamTarget

StartProxy = Callable[..., ZdProxy]


def target(color: str, port: int) -> UpstreamTarget:
    address = Address.parse(f"127.0.0.1:{port}")
    return UpstreamTarget(f"{color}/{address}", color, address)


# -- the effective share -------------------------------------------------------------------


def snapshot(weight: int, *serving: str, live: str = "blue") -> RoutingSnapshot:
    pools: dict[Any, tuple[UpstreamTarget, ...]] = {
        color: (target(color, 9001),) if color in serving else () for color in ("blue", "green")
    }
    return RoutingSnapshot(version=1, live=cast(Any, live), candidate_weight=weight, pools=pools)


@pytest.mark.parametrize(
    ("weight", "serving", "shares"),
    [
        (1000, ("blue", "green"), {"blue": 9000, "green": 1000}),
        (1000, ("blue",), {"blue": 10000, "green": 0}),  # the candidate has nothing
        (1000, ("green",), {"blue": 0, "green": 10000}),  # live has nothing: all to green
        (1000, (), {"blue": 0, "green": 0}),  # neither: 503
        (0, ("green",), {"blue": 0, "green": 10000}),  # even a candidate at 0% serves then
    ],
)
def test_the_effective_share_is_what_the_data_plane_routes(
    weight: int, serving: tuple[str, ...], shares: dict[str, int]
) -> None:
    assert effective_shares(snapshot(weight, *serving)) == shares


def test_an_upstream_state_names_the_operator_first_then_the_ejection_then_health() -> None:
    assert upstream_state("up", drained=True, ejected=True) is UpstreamState.DRAINED
    assert upstream_state("down", drained=False, ejected=True) is UpstreamState.EJECTED
    assert upstream_state("unknown", drained=False, ejected=False) is UpstreamState.UNKNOWN
    routable = {state for state in UpstreamState if state.routable}
    assert routable == {UpstreamState.UP, UpstreamState.UNCHECKED}


# -- who acted -----------------------------------------------------------------------------


def by_kind(machine: RolloutMachine) -> list[tuple[str, str, str]]:
    return [(e.kind, e.actor, e.by) for e in machine.events.history()]


def test_a_judge_rollback_is_the_judges_and_its_split_the_rollouts(
    machine: RolloutMachine,
) -> None:
    stepping(machine)
    judged_failing(machine)
    events = by_kind(machine)
    assert ("rollout_preflight", "api", "api") in events  # the operator's deploy
    assert ("rollout_step", "auto", "rollout 1") in events  # the plan moved it on
    assert ("rollout_rolled_back", "auto", "judge") in events
    splits = [e for e in machine.events.history() if e.kind == "split_changed"]
    assert [e.by for e in splits] == ["rollout 1", "rollout 1"]  # to 10%, and back to 0
    assert not any("(forced)" in e.reason for e in machine.events.history())


def test_a_pause_timeout_is_the_rollouts_and_a_forced_shift_the_operators(
    machine: RolloutMachine,
) -> None:
    stepping(machine)
    machine.steer("pause")
    for _ in range(11):  # past the plan's 30 s pause_timeout
        machine.tick(3.0)
    end = machine.events.history(kind="rollout_rolled_back")[-1]
    assert "pause_timeout" in end.reason and (end.actor, end.by) == ("auto", "rollout 1")
    assert machine.events.history(kind="rollout_paused")[-1].by == "cli"
    machine.control.set_split(10000, force=True, actor="cli")
    forced = machine.events.history(kind="split_changed")[-1]
    assert (forced.by, forced.reason.endswith("(forced)")) == ("cli", True)


def test_an_event_read_back_from_an_old_file_keeps_its_actor_as_who() -> None:
    old = '{"id":3,"time":0.25,"kind":"upstream_down","reason":"x","actor":"auto","data":{}}'
    record = EventRecord.model_validate_json(old)
    assert (record.by, record.timestamp) == ("auto", "1970-01-01T00:00:00.250Z")


def test_the_event_file_keeps_who_and_when(tmp_path: Path) -> None:
    events = EventLog(tmp_path / "events.jsonl")
    emitted = events.emit("upstream_up", "blue/127.0.0.1:9001 up", by="health")
    line = json.loads((tmp_path / "events.jsonl").read_text())
    assert (line["actor"], line["by"], line["timestamp"]) == ("auto", "health", emitted.timestamp)
    again = EventLog(tmp_path / "events.jsonl").history()[-1]
    assert again == emitted


# -- ejections the limit keeps out -----------------------------------------------------------


class Detector:
    """Outlier ejection of one pool, its failures and clock set by the test."""

    def __init__(self, size: int, percent: int) -> None:
        self.clock = FakeClock()
        self.plane = FakeDataPlane()
        self.events = EventLog(None)
        health = cast(HealthChecker, FakeHealth())
        self.detector = OutlierDetector(self.plane, health, self.events)
        blue = OutlierSettings(consecutive_failures=5, max_ejected_percent=percent)
        self.settings = {"blue": blue, "green": OutlierSettings(consecutive_failures=0)}
        self.targets = [target("blue", 9001 + i) for i in range(size)]

    def fail(self, upstream: UpstreamTarget, times: int = 5, after: float = 0.0) -> None:
        self.plane.streaks[upstream.id] = self.plane.streaks.get(upstream.id, 0) + times
        self.clock.advance(after)
        self.detector.tick(self.clock(), self.settings, lambda color: self.targets)

    def skipped(self) -> list[Any]:
        return self.events.history(kind="ejection_skipped")


def test_a_pool_the_limit_allows_no_ejection_says_so_not_that_half_is_out() -> None:
    """The bug: a pool of one at 50% may eject nothing (50% of 1, rounded down), and the
    event said "50% of its pool is already out" with nothing out."""
    pool = Detector(size=1, percent=50)
    (only,) = pool.targets
    pool.fail(only)
    (skip,) = pool.skipped()
    assert "already out" not in skip.reason
    assert skip.reason == (
        f"{only.id} failed 5 times in a row but stays in rotation: max_ejected_percent = 50 "
        "allows no ejection in blue's pool of 1 (50% of 1 is less than one upstream)"
    )
    assert (skip.by, skip.data["ejected"], skip.data["unreported"]) == ("outliers", 0, 0)


def test_a_full_pool_says_how_many_are_out() -> None:
    pool = Detector(size=2, percent=50)
    first, second = pool.targets
    pool.fail(first)
    pool.fail(second)
    assert set(pool.detector.ejected) == {first.id}
    (skip,) = pool.skipped()
    assert "1 of blue's 2 upstreams are ejected already, the most max_ejected_percent" in (
        skip.reason
    )


def test_skipped_ejections_are_said_once_per_upstream_per_period_with_a_count() -> None:
    pool = Detector(size=1, percent=50)
    (only,) = pool.targets
    for _ in range(27):  # a steadily failing upstream: a streak every few requests
        pool.fail(only, after=0.3)
    assert len(pool.skipped()) == 1
    assert only.id not in pool.plane.streaks  # each streak starts counting again
    pool.fail(only, after=SKIP_REPORT_SECONDS)
    second = pool.skipped()[1]
    assert second.data["unreported"] == 26
    assert "(26 more streaks kept it in since the last such event)" in second.reason
    pool.fail(only, after=SKIP_REPORT_SECONDS)  # nothing left unsaid since
    assert pool.skipped()[-1].data["unreported"] == 0


def test_the_rate_limit_is_per_upstream() -> None:
    pool = Detector(size=3, percent=0)
    for upstream in pool.targets:
        pool.fail(upstream)
        pool.fail(upstream, after=1.0)
    assert [e.data["upstream"] for e in pool.skipped()] == [t.id for t in pool.targets]


# -- a real zdproxy ----------------------------------------------------------------------------

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def test_status_shows_the_effective_share_and_each_upstreams_state(
    zdproxy: StartProxy, upstream: Callable[..., Any], refused_address: Callable[[], str]
) -> None:
    blue: Upstream = await upstream("blue")
    green: Upstream = await upstream("green")
    closed = refused_address()  # down by its checks
    fast = {"interval": "100ms", "jitter": "0ms", "rise": 1, "fall": 1}
    proxy = zdproxy(
        {
            "pools": {
                "blue": {"upstreams": [blue.address, closed], "health": fast},
                "green": {"upstreams": [green.address], "health": fast},
            },
            "split": {"candidate_weight": 1000},
        }
    )
    await wait_healthy(proxy, "green")

    async def down() -> bool:
        status = await admin_api(proxy, "GET", "/v1/status")
        return any(u["health"] == "down" for u in status["pools"]["blue"]["upstreams"])

    async with asyncio.timeout(5):
        while not await down():  # noqa: ASYNC110 - each try is a request
            await asyncio.sleep(0.02)
    await admin_api(proxy, "POST", "/v1/drain", {"color": "green"})
    status = await admin_api(proxy, "GET", "/v1/status")
    pools = status["pools"]
    # The split still says 90/10; the data plane routes all of it to blue.
    assert (pools["blue"]["share"], pools["blue"]["effective_share"]) == (90.0, 100.0)
    assert (pools["green"]["share"], pools["green"]["effective_share"]) == (10.0, 0.0)
    assert status["split"]["effective_shares"] == {"blue": 100.0, "green": 0.0}
    states = {
        u["address"]: (u["health"], u["state"]) for p in pools.values() for u in p["upstreams"]
    }
    assert states == {
        blue.address: ("up", "up"),
        closed: ("down", "down"),
        green.address: ("up", "drained"),  # healthy, but drained: not "down"
    }

    env = {"ZDPROXY_ADMIN_URL": proxy.admin_url, "ZDPROXY_ADMIN__TOKEN": ADMIN_TOKEN}
    shown = await run_cli("status", env=env)
    assert shown.code == 0, shown.err
    rows = {line.split()[0]: line for line in shown.out.splitlines() if line.strip()}
    assert "100% (split 90%)" in rows["blue"] and "0% (split 10%)" in rows["green"]
    assert rows[f"green/{green.address}"].split()[1:3] == ["up", "drained"]
    assert rows[f"blue/{closed}"].split()[1:3] == ["down", "down"]

    await admin_api(proxy, "POST", "/v1/undrain", {"color": "green"})
    pools = (await admin_api(proxy, "GET", "/v1/status"))["pools"]
    assert (pools["green"]["share"], pools["green"]["effective_share"]) == (10.0, 10.0)


async def test_events_carry_who_acted_and_an_rfc3339_utc_time(
    zdproxy: StartProxy, upstream: Callable[..., Any]
) -> None:
    blue: Upstream = await upstream("blue")
    proxy = zdproxy({"pools": {"blue": {"upstreams": [blue.address]}}})
    await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 0, "salt": "s"})
    events = (await admin_api(proxy, "GET", "/v1/events"))["events"]
    who = {e["kind"]: (e["actor"], e["by"]) for e in events}
    assert who["upstream_up"] == ("auto", "health")
    assert who["started"] == ("auto", "zdproxy")
    assert who["split_changed"] == ("api", "api")
    for event in events:
        assert RFC3339_UTC.match(event["timestamp"]), event
        parsed = datetime.fromisoformat(event["timestamp"])
        assert abs(parsed.timestamp() - event["time"]) < 0.001

    env = {"ZDPROXY_ADMIN_URL": proxy.admin_url, "ZDPROXY_ADMIN__TOKEN": ADMIN_TOKEN}
    shown = await run_cli("events", env=env)
    assert shown.code == 0, shown.err
    first = shown.out.splitlines()[0]
    when = first.split()[0]
    local = datetime.fromisoformat(when)  # the CLI shows local time, with its offset
    assert local.utcoffset() is not None
    assert abs(local.timestamp() - events[0]["time"]) < 1.0
    assert f"#{events[0]['id']} upstream_up [health]" in first
    await wait_until(lambda: any("by=health" in line for line in proxy.log_lines))
