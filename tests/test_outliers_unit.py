"""Outlier ejection in-process: failure streaks from the fake data plane, a fake clock,
health verdicts set by hand, events in memory."""

from __future__ import annotations

from typing import Any, cast

import pytest

from tests.fakes import FakeClock, FakeDataPlane, FakeHealth
from zdproxy.config.settings import OutlierSettings
from zdproxy.config.units import Address
from zdproxy.control.events import EventLog
from zdproxy.control.health import HealthChecker
from zdproxy.control.outliers import OutlierDetector
from zdproxy.routing.snapshot import UpstreamTarget

OFF = OutlierSettings(consecutive_failures=0)


def target(color: str, port: int) -> UpstreamTarget:
    address = Address.parse(f"127.0.0.1:{port}")
    return UpstreamTarget(f"{color}/{address}", color, address)


class Pools:
    """A blue pool of `size` upstreams under outlier ejection, and the detector's world."""

    def __init__(self, size: int = 4, green: OutlierSettings = OFF, **blue: Any) -> None:
        self.clock = FakeClock()
        self.plane = FakeDataPlane()
        self.health = FakeHealth()
        self.events = EventLog(None)  # memory only
        self.detector = OutlierDetector(self.plane, cast(HealthChecker, self.health), self.events)
        defaults = {"consecutive_failures": 5, "base_ejection": 30.0, "max_ejected_percent": 50}
        self.settings = {"blue": OutlierSettings(**{**defaults, **blue}), "green": green}
        self.targets = [target("blue", 9001 + i) for i in range(size)]
        self.targets += [target("green", 9101 + i) for i in range(size)]
        self.ids = [t.id for t in self.targets]

    def tick(self, after: float = 0.0) -> bool:
        self.clock.advance(after)
        return self.detector.tick(self.clock(), self.settings, self.targets_of)

    def targets_of(self, color: str) -> list[UpstreamTarget]:
        return [t for t in self.targets if t.color == color]

    def fail(self, upstream: str, times: int) -> None:
        self.plane.streaks[upstream] = self.plane.streaks.get(upstream, 0) + times

    def ejected(self) -> set[str]:
        return set(self.detector.ejected)

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e.data for e in self.events.history(kind=kind)]


def test_ejection_after_the_threshold() -> None:
    pools = Pools(consecutive_failures=5)
    blue = pools.ids[0]
    pools.fail(blue, 4)
    assert (pools.tick(), pools.ejected()) == (False, set())
    pools.fail(blue, 1)
    assert (pools.tick(), pools.ejected()) == (True, {blue})
    assert blue not in pools.plane.streaks  # the streak that ejected it is spent
    assert pools.events_of("upstream_ejected") == [
        {"upstream": blue, "failures": 5, "seconds": 30.0, "ejections": 1}
    ]
    assert pools.tick(1.0) is False  # nothing new: routing stays


def test_each_pool_has_its_own_threshold() -> None:
    pools = Pools(consecutive_failures=5, green=OutlierSettings(consecutive_failures=2))
    blue, green = pools.ids[0], pools.ids[4]
    pools.fail(blue, 3)
    pools.fail(green, 3)
    pools.tick()
    assert pools.ejected() == {green}


def test_a_pool_without_ejection_keeps_failing_upstreams() -> None:
    pools = Pools(consecutive_failures=0)
    pools.fail(pools.ids[0], 1000)
    assert (pools.tick(), pools.ejected()) == (False, set())


def test_ejection_time_grows_with_each_ejection() -> None:
    pools = Pools(base_ejection=30.0)
    blue = pools.ids[0]
    for times in (1, 2, 3):
        pools.fail(blue, 5)
        assert pools.tick()
        assert pools.detector.ejections(blue) == times
        assert pools.tick(30.0 * times - 0.5) is False  # still out a moment before
        assert pools.ejected() == {blue}
        assert pools.tick(0.5) is True  # unchecked pool: back when its time is up
        assert pools.ejected() == set()
    assert [e["seconds"] for e in pools.events_of("upstream_ejected")] == [30.0, 60.0, 90.0]
    assert len(pools.events_of("upstream_returned")) == 3


def test_failures_while_ejected_do_not_eject_it_again_on_return() -> None:
    """Requests in flight when it was ejected fail afterwards; that is the same fault."""
    pools = Pools()
    blue = pools.ids[0]
    pools.fail(blue, 5)
    pools.tick()
    pools.fail(blue, 20)  # in flight at the ejection, timing out now
    pools.tick(30.0)
    assert pools.ejected() == set()
    pools.fail(blue, 4)  # a new streak must reach the threshold on its own
    pools.tick()
    assert pools.ejected() == set()


@pytest.mark.parametrize(
    ("checks", "back"),
    [
        ([], False),  # no check since: a checked pool waits for one
        ([(-1.0, True)], False),  # passed during the ejection: older than its end
        ([(0.0, True)], False),  # at the very end: not newer
        ([(0.5, True)], True),
        ([(0.5, False)], False),  # a failing check
        ([(0.5, True), (0.6, False)], False),  # passed, then went down: last pass, but not up
    ],
)
def test_a_checked_pool_returns_only_after_a_newer_passing_check(
    checks: list[tuple[float, bool]], back: bool
) -> None:
    pools = Pools(base_ejection=30.0)
    blue = pools.ids[0]
    pools.health.check(blue, pools.clock(), up=True)  # it was up before it failed
    pools.fail(blue, 5)
    pools.tick()
    end = pools.clock() + 30.0
    for offset, up in checks:
        pools.health.check(blue, end + offset, up=up)
    assert pools.tick(31.0) is back
    assert pools.ejected() == (set() if back else {blue})


def test_a_checked_pool_returns_on_the_first_tick_after_the_check() -> None:
    pools = Pools(base_ejection=30.0)
    blue = pools.ids[0]
    pools.health.check(blue, pools.clock(), up=True)
    pools.fail(blue, 5)
    pools.tick()
    assert pools.tick(100.0) is False  # time served, no check yet
    pools.health.check(blue, pools.clock() + 0.5, up=True)
    assert pools.tick(1.0) is True


@pytest.mark.parametrize(
    ("size", "percent", "allowed"),
    [(4, 50, 2), (4, 100, 4), (4, 0, 0), (1, 50, 0), (3, 50, 1), (10, 25, 2), (10, 20, 2)],
)
def test_never_more_than_max_ejected_percent(size: int, percent: int, allowed: int) -> None:
    pools = Pools(size=size, max_ejected_percent=percent)
    blue = pools.ids[:size]
    for upstream in blue:
        pools.fail(upstream, 5)
    pools.tick()
    assert pools.ejected() == set(blue[:allowed])
    skipped = [e["upstream"] for e in pools.events_of("ejection_skipped")]
    assert skipped == blue[allowed:]
    assert not set(skipped) & set(pools.plane.streaks)  # they start counting again


def test_a_return_makes_room_for_the_next_ejection() -> None:
    pools = Pools(size=2, max_ejected_percent=50)
    first, second = pools.ids[:2]
    pools.fail(first, 5)
    pools.tick()
    pools.fail(second, 5)
    pools.tick(1.0)
    assert pools.ejected() == {first}  # the cap: one of two
    pools.fail(second, 5)
    pools.tick(29.0)  # the first returns on this tick, so the second may go
    assert pools.ejected() == {second}


def test_forget_drops_removed_upstreams() -> None:
    pools = Pools()
    kept, removed = pools.ids[:2]
    for upstream in (kept, removed):
        pools.fail(upstream, 5)
    pools.tick()
    pools.detector.forget({kept})
    assert pools.ejected() == {kept}
    assert (pools.detector.ejections(kept), pools.detector.ejections(removed)) == (1, 0)
    pools.fail(removed, 5)  # configured again later: a first ejection, base time
    pools.tick()
    assert pools.events_of("upstream_ejected")[-1]["seconds"] == 30.0
