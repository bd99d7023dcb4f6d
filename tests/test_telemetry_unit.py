"""Telemetry in-process: windows over interval records, with the time given explicitly."""

from __future__ import annotations

import math

import pytest

from tests.fakes import FakeClock, FakeDataPlane
from zdproxy.control.telemetry import Latency, Telemetry
from zdproxy.routing.records import LATENCY_BUCKETS, IntervalRecord

BOUNDS = (*LATENCY_BUCKETS, math.inf)  # each histogram bucket by its upper bound
BLUE, GREEN = "blue/127.0.0.1:9001", "green/127.0.0.1:9002"


def record(
    upstream: str = BLUE,
    *,
    ok: int = 0,
    errors: int = 0,
    failures: dict[str, int] | None = None,
    within: float = 0.005,
) -> IntervalRecord:
    """`ok` 2xx and `errors` 5xx answers, all in the bucket whose upper bound is `within`."""
    answered = ok + errors
    buckets = tuple(answered if bound == within else 0 for bound in BOUNDS)
    return IntervalRecord(upstream, (0, 0, ok, 0, 0, errors), failures or {}, buckets, 0.0)


class Fixture:
    """A telemetry fed as the control plane feeds it: a tick collects the fake plane."""

    def __init__(self, window: float = 10.0) -> None:
        self.clock = FakeClock(100.0)
        self.plane = FakeDataPlane()
        self.telemetry = Telemetry(window)

    def tick(self, *records: IntervalRecord, seconds: float = 1.0) -> None:
        self.clock.advance(seconds)
        self.plane.pending.extend(records)
        self.telemetry.add(self.clock(), self.plane.collect())

    def counts(
        self, color: str = "blue", seconds: float | None = None, since: float = 0.0
    ) -> tuple[int, int]:
        view = self.telemetry.view(color, self.clock(), seconds, since)
        return view.requests, view.errors


def test_requests_and_errors_per_color() -> None:
    f = Fixture()
    f.tick(
        record(BLUE, ok=7, errors=2, failures={"connect": 1, "timeout": 1, "client_abort": 4}),
        record("blue/127.0.0.1:9003", ok=1, failures={"reset": 1, "protocol": 1}),
        record(GREEN, ok=3),
    )
    # answers plus upstream failures; a client hanging up is nobody's request
    assert f.counts("blue") == (7 + 2 + 2 + 1 + 2, 2 + 2 + 2)
    assert f.counts("green") == (3, 0)
    assert f.telemetry.totals[BLUE].failures == {"connect": 1, "timeout": 1, "client_abort": 4}
    assert f.telemetry.totals[BLUE].by_class == [0, 0, 7, 0, 0, 2]


@pytest.mark.parametrize(("seconds", "expected"), [(0.5, 1), (1.0, 1), (2.5, 3), (10, 5), (60, 5)])
def test_window_counts_the_ticks_inside_it(seconds: float, expected: int) -> None:
    f = Fixture(window=10.0)
    for _ in range(5):
        f.tick(record(ok=1))
    assert f.counts(seconds=seconds) == (expected, 0)  # 60 s is cut to what is retained


def test_default_window_and_its_length() -> None:
    f = Fixture(window=3.0)
    f.tick(record(ok=1))  # the first add: telemetry starts at 101
    f.tick(record(ok=1))
    young = f.telemetry.view("blue", f.clock())
    assert (young.seconds, young.requests, young.rate) == (1.0, 2, 2.0)  # only 1 s old
    for _ in range(4):
        f.tick(record(ok=1))
    full = f.telemetry.view("blue", f.clock())
    assert (full.seconds, full.requests) == (3.0, 3)


@pytest.mark.parametrize(
    ("since", "expected"),
    [
        (0.0, 4),
        (101.0, 4),  # a slice that begins at `since` counts
        (101.5, 2),  # the slice 101-102 began before: none of it counts
        (102.0, 2),
        (102.5, 1),
        (104.0, 0),
    ],
)
def test_since_drops_slices_that_began_before_it(since: float, expected: int) -> None:
    f = Fixture()
    for _ in range(4):  # slices [101, 101], [101, 102], [102, 103], [103, 104]
        f.tick(record(ok=1))
    assert f.counts(since=since) == (expected, 0)


def test_a_tick_without_traffic_still_moves_the_next_slice_start() -> None:
    f = Fixture()
    f.tick(record(ok=1))  # 101
    f.tick()  # 102: nothing
    f.tick(record(ok=1))  # 103, began at 102
    assert f.counts(since=101.5) == (1, 0)
    assert f.telemetry.view("blue", f.clock(), since=101.5).seconds == 1.5


def test_retention_drops_slices_for_good() -> None:
    f = Fixture(window=5.0)
    for _ in range(3):
        f.tick(record(ok=1, errors=1))
    f.tick(seconds=10)  # all three slices are past retention now
    f.telemetry.retain = f.telemetry.window = 60.0  # a longer window cannot bring them back
    assert f.counts(seconds=60) == (0, 0)
    # ... but the running totals and the cumulative histogram keep everything
    assert f.telemetry.totals[BLUE].by_class[5] == 3
    assert f.telemetry.latency["blue"].count == 6


def test_retention_follows_the_longest_window() -> None:
    f = Fixture(window=2.0)
    f.telemetry.retain = 30.0  # what a judge window of 30 s asks for
    for _ in range(10):
        f.tick(record(ok=1))
    assert f.counts() == (2, 0)  # the status window
    assert f.counts(seconds=30) == (10, 0)  # the judge's


def test_forget_drops_totals_of_removed_upstreams() -> None:
    f = Fixture()
    f.tick(record(BLUE, ok=1), record(GREEN, ok=1))
    f.telemetry.forget({GREEN})
    assert set(f.telemetry.totals) == {GREEN}
    assert f.counts("blue") == (1, 0)  # the color's window is not per upstream


def histogram(counts: dict[float, int]) -> Latency:
    return Latency([counts.get(bound, 0) for bound in BOUNDS])


@pytest.mark.parametrize(
    ("counts", "q", "bucket", "value"),
    [
        ({0.01: 100}, 0.5, (0.005, 0.01), 0.0075),  # interpolated inside the bucket
        ({0.01: 100}, 0.99, (0.005, 0.01), 0.00995),
        ({0.001: 1}, 0.99, (0.0, 0.001), 0.00099),
        ({0.01: 99, 1.0: 1}, 0.99, (0.005, 0.01), 0.01),  # the 99th of 100 is still fast
        ({0.01: 98, 1.0: 2}, 0.99, (0.5, 1.0), 0.75),
        ({0.01: 50, 0.1: 50}, 0.5, (0.005, 0.01), 0.01),
        ({0.01: 49, 0.1: 51}, 0.5, (0.05, 0.1), 0.05 + 0.05 * 1 / 51),
        ({math.inf: 3}, 0.99, (10.0, math.inf), 10.0),  # beyond the last bound: the bound
    ],
)
def test_percentiles_from_buckets(
    counts: dict[float, int], q: float, bucket: tuple[float, float], value: float
) -> None:
    latency = histogram(counts)
    assert latency.bucket_of(q) == bucket
    assert latency.quantile(q) == pytest.approx(value)


def test_no_percentile_without_data() -> None:
    empty = Latency()
    assert (empty.count, empty.bucket_of(0.99), empty.quantile(0.99)) == (0, None, None)
    view = Telemetry(10.0).view("green", 100.0)
    assert view.to_dict() == {
        "seconds": 0.0,
        "requests": 0,
        "errors": 0,
        "requests_per_second": 0.0,
        "error_rate": 0.0,
        "p50_ms": None,
        "p99_ms": None,
    }


def test_view_reports_rates_and_percentiles() -> None:
    f = Fixture(window=4.0)
    for _ in range(4):
        f.tick(record(ok=24, errors=1, within=0.01))
    assert f.telemetry.view("blue", f.clock()).to_dict() == {
        "seconds": 3.0,  # telemetry started on the first tick
        "requests": 100,
        "errors": 4,
        "requests_per_second": 33.333,
        "error_rate": 0.04,
        "p50_ms": 7.5,
        "p99_ms": 9.95,
    }
