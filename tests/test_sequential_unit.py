"""The judge's anytime-valid statistics: bounds that hold at every look, detectors
whose false alarms stay under alpha however long they run, and that catch a change
whenever it begins."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zdproxy.control.sequential import ChangeDetector, bernoulli_bounds, change_prior

TICK = 0.1


def feed(
    detector: ChangeDetector, ticks: list[tuple[int, int]], limit: float, t0: float = 0.0
) -> int | None:
    """Feed (events, trials) per tick; the index of the tick that raised the alarm."""
    t = t0
    for i, (events, trials) in enumerate(ticks):
        detector.update(events, trials, limit, change_prior(t, t + TICK))
        t += TICK
        if detector.alarm:
            return i
    return None


@given(n=st.integers(0, 10**6), data=st.data(), alpha=st.floats(1e-6, 0.5))
def test_bounds_hold_the_observed_rate(n: int, data: st.DataObject, alpha: float) -> None:
    x = data.draw(st.integers(0, n))
    low, high = bernoulli_bounds(x, n, alpha)
    assert 0.0 <= low <= high <= 1.0
    if n:
        assert low <= x / n <= high
        assert (low == 0.0) == (x == 0) and (high == 1.0) == (x == n)


def test_bounds_narrow_with_more_data_and_widen_with_confidence() -> None:
    widths = [bernoulli_bounds(n // 100, n, 0.05) for n in (100, 1000, 10000, 100000)]
    spans = [high - low for low, high in widths]
    assert spans == sorted(spans, reverse=True)
    assert spans[-1] < 0.003
    loose, tight = bernoulli_bounds(10, 1000, 0.2), bernoulli_bounds(10, 1000, 0.001)
    assert tight[0] < loose[0] and loose[1] < tight[1]


@pytest.mark.parametrize("p", [0.01, 0.2, 0.5])
def test_bounds_cover_the_true_rate_at_every_look(p: float) -> None:
    """Looked at after every batch of 10, over 1,000 trials: the true rate falls outside
    in at most alpha of the runs (with room for the simulation's own noise)."""
    rng = random.Random(7)
    alpha, runs, missed = 0.1, 150, 0
    for _ in range(runs):
        x = n = 0
        for _ in range(100):
            x += sum(rng.random() < p for _ in range(10))
            n += 10
            low, high = bernoulli_bounds(x, n, alpha)
            if not low <= p <= high:
                missed += 1
                break
    assert missed <= alpha * runs + 3 * math.sqrt(alpha * runs)


def test_change_prior_sums_to_one_and_favours_early_changes() -> None:
    total = sum(change_prior(i * TICK, (i + 1) * TICK) for i in range(10**5))
    assert 0.999 < total + change_prior(10**5 * TICK, math.inf) <= 1.0 + 1e-9
    assert change_prior(3, 3.1) > change_prior(300, 300.1) > 0


@pytest.mark.parametrize("limit", [0.01, 0.05, 0.5])
def test_a_rate_at_its_limit_rarely_raises_an_alarm(limit: float) -> None:
    """The worst case the guarantee covers: the rate is exactly the limit, looked at on
    every one of 600 ticks. Alarms stay at or under alpha."""
    rng = random.Random(11)
    alpha, runs, alarms = 0.05, 200, 0
    for _ in range(runs):
        ticks = []
        for _ in range(600):
            trials = rng.randint(0, 12)
            ticks.append((sum(rng.random() < limit for _ in range(trials)), trials))
        alarms += feed(ChangeDetector(alpha), ticks, limit) is not None
    assert alarms <= alpha * runs + 3 * math.sqrt(alpha * runs * (1 - alpha))


def test_no_event_never_raises_an_alarm_even_with_no_allowance() -> None:
    detector = ChangeDetector(0.001)
    assert feed(detector, [(0, 50)] * 1000, 0.0) is None
    assert detector.evidence == 0.0
    assert feed(detector, [(1, 1)], 0.0) == 0  # nothing allowed: one event is proof


ALPHA = 0.0025 / 28  # a rollout's rate split over 4 phases and 7 tests and bounds


def test_thirty_percent_errors_are_caught_in_a_few_dozen_requests() -> None:
    ticks = [(1, 3) if i % 10 < 9 else (0, 3) for i in range(100)]  # ~30% of 3 a tick
    caught = feed(ChangeDetector(ALPHA), ticks, 0.02)
    assert caught is not None and (caught + 1) * 3 <= 60


def test_a_change_after_minutes_of_good_traffic_is_caught_about_as_fast() -> None:
    """The good evidence gathered before the change is not held against it."""
    fresh = feed(ChangeDetector(ALPHA), [(1, 3)] * 100, 0.02)
    detector = ChangeDetector(ALPHA)
    assert feed(detector, [(0, 3)] * 3000, 0.02) is None  # five minutes, 9,000 good requests
    late = feed(detector, [(1, 3)] * 100, 0.02, t0=300.0)
    assert fresh is not None and late is not None
    assert late <= fresh + 8  # the later change costs a little more prior, no more


def test_a_moving_limit_is_honoured_tick_by_tick() -> None:
    """Errors at 10% pass a limit of 20% and fail one of 2%, on the same detector."""
    detector = ChangeDetector(ALPHA)
    assert feed(detector, [(1, 10)] * 200, 0.2) is None
    assert feed(detector, [(1, 10)] * 200, 0.02, t0=20.0) is not None


def test_evidence_is_a_share_of_the_threshold() -> None:
    detector = ChangeDetector(0.01)
    assert detector.evidence == 0.0
    feed(detector, [(1, 4)] * 3, 0.02)
    assert 0.0 < detector.evidence < 1.0 and not detector.alarm
    feed(detector, [(4, 4)] * 20, 0.02)
    assert detector.evidence >= 1.0 and detector.alarm
