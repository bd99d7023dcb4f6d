"""Telemetry in-process: windows over interval records, with the time given explicitly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import FakeClock, FakeDataPlane
from zdproxy.control.telemetry import Telemetry, color_of
from zdproxy.dataplane.route import Via
from zdproxy.routing.histogram import Histogram, index
from zdproxy.routing.records import ROUTE_KINDS, IntervalRecord

BLUE, GREEN = "blue/127.0.0.1:9001", "green/127.0.0.1:9002"


def record(
    upstream: str = BLUE,
    *,
    ok: int = 0,
    errors: int = 0,
    failures: dict[str, int] | None = None,
    took: float = 0.005,
    routes: tuple[int, ...] | None = None,
    pending: tuple[float, ...] = (),
) -> IntervalRecord:
    """`ok` 2xx and `errors` 5xx answers that each took `took` seconds, routed by the
    split unless `routes` says otherwise."""
    answered = ok + errors
    return IntervalRecord(
        upstream,
        (0, 0, ok, 0, 0, errors),
        failures or {},
        {index(took): answered} if answered else {},
        took * answered,
        routes or (answered, 0, 0, 0),
        pending,
    )


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


def test_no_percentile_without_data() -> None:
    view = Telemetry(10.0).view("green", 100.0)
    assert view.to_dict() == {
        "seconds": 0.0,
        "requests": 0,
        "errors": 0,
        "requests_per_second": 0.0,
        "error_rate": 0.0,
        "p50_ms": None,
        "p99_ms": None,
        "routes": {"split": 0, "bucket": 0, "preview": 0, "pin": 0},
        "pending": 0,
        "oldest_pending_ms": None,
    }


def test_view_reports_rates_and_percentiles() -> None:
    f = Fixture(window=4.0)
    for _ in range(3):
        f.tick(record(ok=24, errors=1, took=0.007))
    f.tick(record(ok=24, errors=1, took=0.1, routes=(0, 20, 1, 4), pending=(0.25, 0.5)))
    view = f.telemetry.view("blue", f.clock())
    assert view.to_dict() == {
        "seconds": 3.0,  # telemetry started on the first tick
        "requests": 100,
        "errors": 4,
        "requests_per_second": 33.333,
        "error_rate": 0.04,
        "p50_ms": pytest.approx(7.0, rel=0.01),  # within 1% of what was observed
        "p99_ms": pytest.approx(100.0, rel=0.01),
        "routes": {"split": 75, "bucket": 20, "preview": 1, "pin": 4},
        "pending": 2,
        "oldest_pending_ms": 500.0,
    }
    assert view.latency.total == pytest.approx(75 * 0.007 + 25 * 0.1)


def test_route_kinds_are_indexed_by_via() -> None:
    assert [(via.value, via.name.lower()) for via in Via] == list(enumerate(ROUTE_KINDS))


def test_pending_is_the_last_ticks_snapshot_per_color() -> None:
    f = Fixture()
    f.tick(record(BLUE, ok=1, pending=(3.0, 1.0)), record(GREEN, pending=(0.5,)))
    f.tick(record("blue/127.0.0.1:9003", pending=(2.0,)), record(BLUE, pending=(0.1,)))
    blue = f.telemetry.view("blue", f.clock(), seconds=60)
    assert blue.pending == (0.1, 2.0)  # not summed over the window; oldest last
    assert (blue.to_dict()["pending"], blue.to_dict()["oldest_pending_ms"]) == (2, 2000.0)
    assert f.telemetry.view("green", f.clock()).pending == ()  # nothing in flight now
    assert blue.requests == 1  # records with only pending requests answer nothing


def test_the_cumulative_histogram_keeps_fine_counts() -> None:
    f = Fixture()
    f.tick(record(ok=3, took=0.0031), record(GREEN, ok=1, took=2.0))
    f.tick(record(ok=1, took=0.2))
    assert f.telemetry.latency["blue"].counts == {index(0.0031): 3, index(0.2): 1}
    assert f.telemetry.latency["green"].coarse()[10] == 1  # the (1, 2.5] s bucket


def test_a_view_is_a_copy() -> None:
    f = Fixture()
    f.tick(record(ok=40))
    view = f.telemetry.view("blue", f.clock())
    view.latency.add(Histogram({1: 5}))
    assert f.telemetry.view("blue", f.clock()).latency.count == 40


# Ticks of traffic: each some answers (upstream, ok, errors, latency, route kind), a
# length, and views asked after it (color, seconds, since: the time of tick n).
Answer = tuple[str, int, int, float, int]
Ask = tuple[str, float | None, int]
ticks = st.lists(
    st.tuples(
        st.lists(
            st.tuples(
                st.sampled_from([BLUE, GREEN]),
                st.integers(0, 5),
                st.integers(0, 2),
                st.floats(1e-4, 20.0),
                st.integers(0, len(ROUTE_KINDS) - 1),
            ),
            min_size=1,
            max_size=3,
        ),
        st.sampled_from([*[0.1] * 18, 0.5, 2.0]),  # mostly ticks, some stalls
        # the same few views again and again, as status and the judge ask them
        st.lists(
            st.tuples(
                st.sampled_from(["blue", "green"]),
                st.sampled_from([None, 1.0, 3.0, 30.0]),
                st.sampled_from([0, 10, 30]),
            ),
            max_size=4,
        ),
    ),
    min_size=40,
    max_size=120,
)


@settings(max_examples=40, deadline=None)
@given(ticks, st.sampled_from([2.0, 5.0, 20.0]))
def test_views_equal_the_slices_summed_afresh(
    plan: list[tuple[list[Answer], float, list[Ask]]], retain: float
) -> None:
    """Views are running sums kept between ticks (slices added as they come, taken out
    as they leave a window or retention); they equal summing the window afresh."""
    f = Fixture(window=2.0)
    f.telemetry.retain = retain
    # What every tick brought, per color: (start, at, requests, errors, latency, routes)
    sent: list[tuple[float, float, str, int, int, dict[int, int], list[int]]] = []
    times = [f.clock()]
    for answers, seconds, asks in plan:
        now = times[-1] + seconds
        start = times[-1] if len(times) > 1 else now  # the first slice starts telemetry
        records = []
        for upstream, ok, errors, took, via in answers:
            routes = [0] * len(ROUTE_KINDS)
            routes[via] = ok + errors
            records.append(record(upstream, ok=ok, errors=errors, took=took, routes=tuple(routes)))
            latency = {index(took): ok + errors} if ok + errors else {}
            sent.append((start, now, color_of(upstream), ok + errors, errors, latency, routes))
        f.tick(*records, seconds=seconds)
        times.append(now)
        for color, window, n in asks:
            since = times[min(n, len(times) - 1)]
            length = min(2.0 if window is None else window, retain)
            inside = [
                piece
                for piece in sent
                if piece[2] == color
                and piece[1] > now - length
                and piece[1] > now - retain
                and piece[0] >= since
            ]
            view = f.telemetry.view(color, now, window, since)
            assert (view.requests, view.errors) == (
                sum(p[3] for p in inside),
                sum(p[4] for p in inside),
            )
            assert list(view.routes) == [sum(p[6][k] for p in inside) for k in range(4)]
            expected = Histogram()
            for piece in inside:
                expected.add_counts(piece[5], 0.0)
            assert view.latency.counts == expected.counts
