"""The judge in-process: verdicts from constructed ticks of traffic, no network, a
tick clock of our own."""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zdproxy.config.plans import JudgeSettings
from zdproxy.control.judge import Judge, Reference, Verdict, quantile_upper
from zdproxy.control.telemetry import WindowView
from zdproxy.routing.histogram import Histogram, index

TICK = 0.1
ALPHA = 0.0025 / 4  # a rollout of three steps and a bake: one phase's share


def traffic(latencies: list[float], errors: int = 0, pending: tuple[float, ...] = ()) -> WindowView:
    """One tick of one color: a request per latency, `errors` of them failed."""
    histogram = Histogram()
    for seconds in latencies:
        histogram.add_counts({index(seconds): 1}, seconds)
    return WindowView(TICK, len(latencies), errors, histogram, pending=pending)


def service(rng: random.Random, n: int, scale: float = 1.0) -> list[float]:
    """n service times of an app answering in 5-20 ms (times `scale`)."""
    return [rng.uniform(0.005, 0.020) * scale for _ in range(n)]


WINDOW_TICKS = 100  # judge.window, 10 s


def window(ticks: tuple[WindowView, ...]) -> WindowView:
    latency = Histogram()
    for view in ticks:
        latency.add(view.latency)
    requests = sum(view.requests for view in ticks)
    errors = sum(view.errors for view in ticks)
    return WindowView(TICK * len(ticks), requests, errors, latency)


class Run:
    """A judge fed tick by tick, as a rollout feeds it."""

    def __init__(self, reference: Reference | None = None, **overrides: Any) -> None:
        self.settings = JudgeSettings(**overrides)
        self.reference = reference or Reference()
        self.judge = Judge(self.settings, ALPHA, self.reference, 0.0)
        self.now = 0.0
        self.ticks: deque[tuple[WindowView, WindowView]] = deque(maxlen=WINDOW_TICKS)

    def tick(self, candidate: WindowView, live: WindowView) -> Verdict:
        """One tick; the recent views are the sliding window's, as telemetry gives."""
        self.now += TICK
        self.ticks.append((candidate, live))
        recent = [window(views) for views in zip(*self.ticks, strict=True)]
        return self.judge.assess(self.now, candidate, live, *recent)

    def until_fail(self, ticks: int, candidate: Any, live: Any) -> int | None:
        """Ticks until the verdict is "fail" (None: it never came)."""
        for i in range(ticks):
            if self.tick(candidate(), live()).outcome == "fail":
                return i + 1
        return None


def test_too_few_requests_hold_with_what_is_needed_and_an_eta() -> None:
    run = Run(min_requests=20)
    rng = random.Random(1)
    verdict = run.tick(traffic(service(rng, 5)), traffic(service(rng, 45)))
    # No error yet, live's bound still wide: the 5% absolute limit is the lowest, and
    # an error rate shown under 5% takes 116 requests.
    assert verdict.outcome == "hold"
    assert verdict.reason == "5 of 116 candidate requests to show its error rate under 5.0%"
    assert verdict.numbers["requests_needed"] == 111
    assert verdict.numbers["eta_seconds"] == pytest.approx(111 / 50, abs=0.1)  # 5 in 0.1 s
    for _ in range(200):
        verdict = run.tick(traffic(service(rng, 5)), traffic(service(rng, 45)))
        if verdict.outcome != "hold":
            break
    assert verdict.outcome == "pass" and verdict.numbers["requests_needed"] == 0
    # Live's thousands of requests without an error bound it near 0: 1% over it is the
    # limit, shown after some 560 requests.
    assert 500 <= run.judge.requests <= 700


def test_a_floor_of_min_requests_with_no_error_limit_to_show() -> None:
    rng = random.Random(1)
    run = Run(min_requests=20, max_error_rate=0.0, max_error_rate_over_live=1.0)
    verdict = run.tick(traffic(service(rng, 5)), traffic(service(rng, 45)))
    assert verdict.outcome == "hold" and verdict.reason == "5 of 20 candidate requests"
    for _ in range(3):
        verdict = run.tick(traffic(service(rng, 5)), traffic(service(rng, 45)))
    assert verdict.outcome == "pass"


def test_an_error_rate_above_its_limit_never_passes_however_long_the_hold() -> None:
    """3% errors against live's 0%: too few to fail fast at 3 requests a tick, never a
    pass; the step holds until the evidence fails it."""
    rng = random.Random(12)
    run = Run()
    outcomes = []
    for _ in range(1000):
        errors = sum(rng.random() < 0.03 for _ in range(3))
        verdict = run.tick(traffic(service(rng, 3), errors=errors), traffic(service(rng, 27)))
        outcomes.append(verdict.outcome)
        if verdict.outcome == "fail":
            break
    assert "pass" not in outcomes


def test_a_share_with_no_active_user_says_so_with_no_eta() -> None:
    rng = random.Random(2)
    verdict = Run().tick(traffic([]), traffic(service(rng, 30)))
    assert verdict.outcome == "hold"
    assert verdict.numbers["no_active_users"] and verdict.numbers["eta_seconds"] is None
    assert "no active user" in verdict.reason


@pytest.mark.parametrize("seed", range(5))
def test_a_candidate_like_live_passes_every_tick(seed: int) -> None:
    """Same app, same latency, same 1% errors: a minute of ticks, no failure."""
    rng = random.Random(seed)
    run = Run()

    def color(n: int) -> WindowView:
        return traffic(service(rng, n), errors=sum(rng.random() < 0.01 for _ in range(n)))

    assert run.until_fail(600, lambda: color(3), lambda: color(27)) is None


@pytest.mark.parametrize(
    ("errors", "most_ticks"),
    [(1.0, 3), (0.3, 20)],
)
def test_errors_fail_within_a_few_dozen_requests(errors: float, most_ticks: int) -> None:
    """At 3 candidate requests a tick: all failing is proof within a handful; 30% needs
    about 17 nats of evidence at ~0.54 a request (a change ten seconds into the phase,
    a rollout's 0.25% split over its phases and tests): some 30-60 requests."""
    rng = random.Random(3)
    run = Run()
    for _ in range(100):  # ten seconds of a good candidate first
        assert run.tick(traffic(service(rng, 3)), traffic(service(rng, 27))).outcome != "fail"

    def bad() -> WindowView:
        return traffic(service(rng, 3), errors=sum(rng.random() < errors for _ in range(3)))

    took = run.until_fail(100, bad, lambda: traffic(service(rng, 27)))
    assert took is not None and took <= most_ticks


def test_the_failure_names_the_rates_and_carries_the_numbers() -> None:
    rng = random.Random(4)
    run = Run()
    for _ in range(20):
        verdict = run.tick(traffic(service(rng, 5), errors=5), traffic(service(rng, 20)))
        if verdict.outcome == "fail":
            break
    assert verdict.outcome == "fail" and "100.0% recently" in verdict.reason
    tests = verdict.numbers["tests"]
    assert tests["errors"]["evidence"] >= 1 or tests["errors_vs_live"]["evidence"] >= 1
    assert verdict.numbers["candidate"]["errors"] == verdict.numbers["candidate"]["requests"]


def test_errors_like_lives_pass_the_relative_test_but_not_the_absolute_one() -> None:
    """Both colors at 10%: not worse than live, but above a 5% max_error_rate."""
    rng = random.Random(5)

    def color(n: int) -> WindowView:
        return traffic(service(rng, n), errors=sum(rng.random() < 0.1 for _ in range(n)))

    relative = Run(max_error_rate=1.0)
    assert relative.until_fail(300, lambda: color(10), lambda: color(40)) is None
    absolute = Run(max_error_rate=0.05)
    assert absolute.until_fail(300, lambda: color(10), lambda: color(40)) is not None


def test_a_candidate_twice_as_slow_never_passes_however_long_the_hold() -> None:
    rng = random.Random(15)
    run = Run()
    outcomes = set()
    for _ in range(600):
        verdict = run.tick(traffic(service(rng, 3, 2.0)), traffic(service(rng, 27)))
        outcomes.add(verdict.outcome)
        if verdict.outcome == "fail":
            break
    assert "pass" not in outcomes


@pytest.mark.parametrize(("scale", "fails"), [(1.0, False), (1.2, False), (2.0, True), (5.0, True)])
def test_latency_is_judged_as_a_distribution(scale: float, fails: bool) -> None:
    rng = random.Random(6)
    run = Run(max_latency_ratio=1.5)
    took = run.until_fail(
        300,
        lambda: traffic(service(rng, 5, scale)),
        lambda: traffic(service(rng, 20)),
    )
    assert (took is not None) is fails


def test_a_slowdown_both_colors_share_is_not_the_candidates() -> None:
    """A busy host: for two seconds every request of both colors takes 4x as long."""
    rng = random.Random(10)
    run = Run()
    for scale in [1.0] * 100 + [4.0] * 20 + [1.0] * 100:
        verdict = run.tick(traffic(service(rng, 3, scale)), traffic(service(rng, 27, scale)))
        assert verdict.outcome != "fail", verdict.reason


def test_five_times_slower_fails_fast() -> None:
    rng = random.Random(7)
    run = Run()
    took = run.until_fail(
        100, lambda: traffic(service(rng, 3, 5.0)), lambda: traffic(service(rng, 27))
    )
    assert took is not None and took * 3 <= 60  # requests, not seconds


def test_max_p99_is_an_absolute_limit() -> None:
    """5-20 ms twice over stays under 50 ms; four times over, a quarter of the requests
    are beyond it."""
    rng = random.Random(8)
    run = Run(max_p99=0.050, max_latency_ratio=0)
    assert run.until_fail(100, lambda: traffic(service(rng, 5, 2)), lambda: traffic([])) is None
    verdict = run.tick(traffic([]), traffic([]))
    for _ in range(100):
        verdict = run.tick(traffic(service(rng, 5, 4)), traffic([]))
        if verdict.outcome == "fail":
            break
    assert verdict.outcome == "fail" and "max_p99 50 ms" in verdict.reason


def test_a_hang_counts_while_it_is_pending_once_per_request() -> None:
    """Requests pending past the hang bound fail the candidate before any timeout; a
    request seen pending on many ticks counts once."""
    rng = random.Random(9)
    run = Run(pending_failure_after=0.5)
    for _ in range(50):
        run.tick(traffic(service(rng, 3)), traffic(service(rng, 27)))
    ages: list[float] = []
    verdict = None
    while len(ages) < 90 and (verdict is None or verdict.outcome != "fail"):
        ages = [age + TICK for age in ages] + [0.0, 0.0, 0.0]  # nothing is answered any more
        verdict = run.tick(traffic([], pending=tuple(sorted(ages))), traffic(service(rng, 27)))
    assert verdict is not None and verdict.outcome == "fail", verdict
    crossed = sum(1 for age in ages if age >= 0.5)
    assert verdict.numbers["candidate"]["pending_failed"] == crossed
    assert len(ages) / 3 * TICK < 1.5  # the bound plus a few ticks of evidence, in fed ticks


def test_the_hang_bound_follows_lives_p99_with_a_floor() -> None:
    reference = Reference()
    run = Run(reference, pending_failure_after=0.5)
    assert run.judge.hang_bound() == 0.5  # no reference yet: the floor
    reference.add(traffic([0.3] * 100))
    assert run.judge.hang_bound() == pytest.approx(1.2, rel=0.02)  # 4x live's p99


def test_a_frozen_reference_ignores_what_the_old_color_does_next() -> None:
    reference = Reference()
    reference.add(traffic([0.01] * 100, errors=0))
    reference.frozen = True
    run = Run(reference)
    run.tick(traffic([0.01] * 5), traffic([0.5] * 50, errors=50))
    assert (reference.requests, reference.errors) == (100, 0)
    assert run.judge.numbers()["reference"]["frozen"] is True


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(0.0001, 100.0), min_size=1, max_size=300),
    q=st.sampled_from([0.5, 0.9, 0.99]),
    alpha=st.sampled_from([0.001, 0.05]),
)
def test_quantile_upper_bounds_are_never_below_the_sample_quantile(
    values: list[float], q: float, alpha: float
) -> None:
    histogram = Histogram()
    for v in values:
        histogram.add_counts({index(v): 1}, v)
    upper = quantile_upper(histogram, q, alpha)
    ordered = sorted(values)
    sample_quantile = ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    assert upper >= sample_quantile * 0.98  # histogram buckets are within 2%


def test_errors_are_compared_by_the_color_they_come_from_while_live_serves() -> None:
    """3% errors at a 10% share against live's 0%: every error is the candidate's, each
    worth ~1.9 nats against a 1/7 share (1.5x its 10% of the requests). Some six
    errors fail it, about 200 requests: the rate itself against live's bound plus 1%
    would need some 1,500."""
    took = []
    for seed in range(10):
        rng = random.Random(seed)
        run = Run()
        for _ in range(100):
            assert run.tick(traffic(service(rng, 3)), traffic(service(rng, 27))).outcome != "fail"

        def bad(rng: random.Random = rng) -> WindowView:
            return traffic(service(rng, 3), errors=sum(rng.random() < 0.03 for _ in range(3)))

        took.append(run.until_fail(400, bad, lambda rng=rng: traffic(service(rng, 27))))
        test = run.judge.numbers()["tests"]["errors_by_color"]
        assert test["of"] == "errors" and test["limit"] == pytest.approx(1 / 7, abs=0.01)
    assert all(t is not None for t in took)
    assert sorted(t for t in took if t is not None)[5] * 3 <= 300


def test_an_outage_both_colors_share_is_not_the_candidates() -> None:
    """A database down for three seconds: 40% errors on both colors. Their errors split
    as their requests do: no failure against live (the absolute limit is off)."""
    rng = random.Random(11)
    run = Run(max_error_rate=1.0)

    def color(n: int, rate: float) -> WindowView:
        return traffic(service(rng, n), errors=sum(rng.random() < rate for _ in range(n)))

    for rate in [0.0] * 50 + [0.4] * 30 + [0.0] * 50:
        verdict = run.tick(color(3, rate), color(27, rate))
        assert verdict.outcome != "fail", verdict.reason
    assert run.judge.numbers()["tests"]["errors_by_color"]["trials"] > 20


def test_a_candidate_shown_worse_but_within_the_margin_is_not_failed() -> None:
    """One error in a thousand against live's none: the evidence that it is worse than
    live piles up, but its excess stays under max_error_rate_over_live (1%) until a
    burst lifts its recent rate above it."""
    rng = random.Random(12)
    run = Run()
    for i in range(1500):
        errors = 1 if i % 100 == 0 else 0
        verdict = run.tick(traffic(service(rng, 10), errors=errors), traffic(service(rng, 20)))
        assert verdict.outcome != "fail", verdict.reason
    assert run.judge.tests["errors_by_color"].detector.alarm and run.judge.excess < 0.01
    for _ in range(20):  # 40 errors in 200 requests
        verdict = run.tick(traffic(service(rng, 10), errors=2), traffic(service(rng, 20)))
        if verdict.outcome == "fail":
            break
    assert verdict.outcome == "fail", verdict.reason
    assert verdict.numbers["tests"]["errors_by_color"]["excess"] > 0.01


def test_at_100_percent_errors_are_compared_with_the_reference() -> None:
    """No live traffic to compare with (a 100% step, the bake): no comparison by color;
    3% against 1.5x the upper bound of live's 0 in 2,500 before (~0.8%), at 250 req/s:
    a few seconds."""
    took = []
    for seed in range(10):
        rng = random.Random(seed)
        reference = Reference()
        reference.add(traffic(service(rng, 2500)))
        reference.frozen = True
        run = Run(reference)
        run.judge = Judge(run.settings, ALPHA, reference, 0.0, shared=False)

        def bad(rng: random.Random = rng) -> WindowView:
            return traffic(service(rng, 25), errors=sum(rng.random() < 0.03 for _ in range(25)))

        took.append(run.until_fail(300, bad, lambda: traffic([])))
        assert "errors_by_color" not in run.judge.tests
    assert all(t is not None and t <= 100 for t in took), took
