"""The judge in-process: verdicts from constructed window views, no traffic, no clock."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zdproxy.config.plans import JudgeSettings
from zdproxy.control.judge import Judge, wilson
from zdproxy.control.telemetry import Latency, WindowView
from zdproxy.routing.records import LATENCY_BUCKETS

BOUNDS = (*LATENCY_BUCKETS, math.inf)  # each histogram bucket by its upper bound


def view(requests: int, errors: int = 0, within: float = 0.005) -> WindowView:
    """`requests` over 10 s, each answered in the histogram bucket whose upper bound is
    `within` (so that bucket holds the p99)."""
    buckets = [requests if bound == within else 0 for bound in BOUNDS]
    assert sum(buckets) == requests, f"{within} is not a bucket bound"
    return WindowView(10.0, requests, errors, Latency(buckets))


def judge(**settings: Any) -> Judge:
    """A judge that fails on the first breach unless told otherwise."""
    return Judge(JudgeSettings(**{"min_requests": 20, "consecutive_breaches": 1, **settings}))


def z_of(confidence: float) -> float:
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


QUIET = view(0)  # a live color without traffic: only the absolute limits apply
ERRORS_ONLY = {"max_error_rate_over_live": 1.0, "max_p99_ratio": 0.0}
RELATIVE_ONLY = {"max_error_rate": 1.0, "max_error_rate_over_live": 0.01, "max_p99_ratio": 0.0}


@pytest.mark.parametrize(
    ("candidate", "live", "settings", "outcome", "reason"),
    [
        pytest.param(view(19, 19), QUIET, {}, "inconclusive", "19 of 20", id="few-all-errors"),
        pytest.param(
            view(19, 0, math.inf),
            view(1000),
            {"max_p99": 0.1},
            "inconclusive",
            "19 of 20",
            id="few-all-slow",
        ),
        pytest.param(view(20), view(1000), {}, "pass", "within limits", id="clean"),
        pytest.param(view(100, 20), QUIET, ERRORS_ONLY, "fail", "above 5.0%", id="error-rate"),
        # 6% observed, but the lower bound (2.8%) is under 5%: not proven bad.
        pytest.param(view(100, 6), QUIET, ERRORS_ONLY, "pass", "within", id="error-rate-unproven"),
        # Live 1% (upper bound 1.8%), candidate 6% of 200 (lower bound 3.5%) > 1.8% + 1%.
        pytest.param(view(200, 12), view(1000, 10), RELATIVE_ONLY, "fail", "worse", id="vs-live"),
        pytest.param(view(200, 6), view(1000, 10), RELATIVE_ONLY, "pass", "within", id="near-live"),
        # Live below min_requests has no upper bound worth comparing with.
        pytest.param(view(200, 12), view(19), RELATIVE_ONLY, "pass", "within", id="live-too-few"),
        # Every request in (0.5 s, 1 s]: certainly above a 0.5 s limit.
        pytest.param(view(100, 0, 1.0), QUIET, {"max_p99": 0.5}, "fail", "above 500 ms", id="p99"),
        # (0.25 s, 0.5 s] may be under 0.3 s: bucket rounding never fails a candidate.
        pytest.param(view(100, 0, 0.5), QUIET, {"max_p99": 0.3}, "pass", "within", id="p99-maybe"),
        pytest.param(view(100, 0, math.inf), QUIET, {"max_p99": 0}, "pass", "within", id="no-p99"),
        # Candidate in (100, 250] ms, live in (25, 50] ms: certainly more than 2x.
        pytest.param(
            view(100, 0, 0.25),
            view(100, 0, 0.05),
            {"max_p99_ratio": 2.0},
            "fail",
            "2x slower",
            id="p99-ratio",
        ),
        pytest.param(
            view(100, 0, 0.1),
            view(100, 0, 0.05),
            {"max_p99_ratio": 2.0},
            "pass",
            "within",
            id="p99-ratio-maybe",
        ),
        pytest.param(
            view(100, 0, 0.25),
            view(19, 0, 0.05),
            {"max_p99_ratio": 2.0},
            "pass",
            "within",
            id="p99-ratio-live-too-few",
        ),
        pytest.param(
            view(100, 0, math.inf),
            view(100),
            {"max_p99_ratio": 0},
            "pass",
            "within",
            id="no-p99-ratio",
        ),
    ],
)
def test_verdict(
    candidate: WindowView, live: WindowView, settings: dict[str, Any], outcome: str, reason: str
) -> None:
    verdict = judge(**settings).assess(candidate, live)
    assert verdict.outcome == outcome, verdict.reason
    assert reason in verdict.reason


@pytest.mark.parametrize("needed", [1, 2, 5])
def test_fail_needs_consecutive_breaches(needed: int) -> None:
    j = judge(consecutive_breaches=needed, **ERRORS_ONLY)
    bad, good = view(100, 50), view(100)
    # needed - 1 breaching ticks are only breaches, and a good tick starts the count again
    for tick in range(1, needed):
        assert j.assess(bad, QUIET).reason.startswith(f"breach {tick}:")
    assert j.assess(good, QUIET).outcome == "pass"
    assert [j.assess(bad, QUIET).outcome for _ in range(needed)] == ["breach"] * (needed - 1) + [
        "fail"
    ]
    assert j.assess(bad, QUIET).outcome == "fail"  # and it stays failed while it breaches


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("n", [1, 3, 5, 13, 20, 1000])
def test_wilson_edges_are_exact(n: int, confidence: float) -> None:
    z = z_of(confidence)
    none_low, none_high = wilson(0, n, z)
    all_low, all_high = wilson(n, n, z)
    assert none_low == 0.0 and all_high == 1.0  # exactly: not 1e-17 off
    assert 0 < none_high < 1 and 0 < all_low < 1
    assert math.isclose(none_high, 1 - all_low)  # the interval is symmetric


def test_wilson_of_one_request() -> None:
    z = z_of(0.95)
    assert wilson(1, 1, z) == pytest.approx((1 / (1 + z * z), 1.0))
    assert wilson(0, 1, z) == pytest.approx((0.0, z * z / (1 + z * z)))
    assert wilson(0, 0, z) == (0.0, 1.0)  # no data: anything is possible


@given(n=st.integers(1, 10**6), data=st.data(), confidence=st.floats(0.5, 0.999))
def test_wilson_interval_holds_the_observed_rate(
    n: int, data: st.DataObject, confidence: float
) -> None:
    errors = data.draw(st.integers(0, n))
    low, high = wilson(errors, n, z_of(confidence))
    assert 0.0 <= low <= errors / n <= high <= 1.0


@given(n=st.integers(20, 5000), confidence=st.floats(0.5, 0.999), breaches=st.integers(1, 5))
def test_no_errors_never_fail_a_zero_error_limit(n: int, confidence: float, breaches: int) -> None:
    """max_error_rate = 0 means "no errors allowed": a clean candidate must pass it."""
    j = judge(max_error_rate=0.0, confidence=confidence, consecutive_breaches=breaches)
    assert {j.assess(view(n), view(n)).outcome for _ in range(breaches)} == {"pass"}


@st.composite
def views(draw: st.DrawFn, max_requests: int = 5000) -> WindowView:
    requests = draw(st.integers(0, max_requests))
    errors = draw(st.integers(0, requests))
    # a few filled buckets, as real traffic has: cheaper to draw than all of them
    filled = draw(st.dictionaries(st.integers(0, len(BOUNDS) - 1), st.integers(1, 500), max_size=3))
    buckets = [filled.get(i, 0) for i in range(len(BOUNDS))]
    return WindowView(10.0, requests, errors, Latency(buckets))


def settings() -> st.SearchStrategy[JudgeSettings]:
    return st.builds(
        JudgeSettings,
        min_requests=st.integers(1, 100),
        confidence=st.floats(0.5, 0.999),
        max_error_rate=st.floats(0.0, 1.0),
        max_error_rate_over_live=st.floats(0.0, 1.0),
        max_p99=st.sampled_from([0.0, 0.003, *LATENCY_BUCKETS]),
        max_p99_ratio=st.sampled_from([0.0, 1.0, 1.5, 2.0, 10.0]),
        consecutive_breaches=st.just(1),
    )


@given(settings=settings(), candidate=views(), live=views())
def test_too_few_requests_are_never_a_verdict(
    settings: JudgeSettings, candidate: WindowView, live: WindowView
) -> None:
    requests = candidate.requests % settings.min_requests  # below min_requests, however bad
    few = WindowView(10.0, requests, min(candidate.errors, requests), candidate.latency)
    assert Judge(settings).assess(few, live).outcome == "inconclusive"


@given(settings=settings(), live=views())
def test_a_candidate_like_live_never_fails_a_relative_limit(
    settings: JudgeSettings, live: WindowView
) -> None:
    """With the absolute limits off, only "worse than live" can fail, and a candidate that
    does exactly what live does is not worse (a ratio under 1 would ask it to be faster)."""
    relative = settings.model_copy(
        update={"max_error_rate": 1.0, "max_p99": 0.0, "max_p99_ratio": settings.max_p99_ratio or 1}
    )
    assert Judge(relative).assess(live, live).outcome in ("pass", "inconclusive")


@given(settings=settings(), candidate=views(), live=views(), data=st.data())
def test_more_errors_never_turn_a_fail_into_a_pass(
    settings: JudgeSettings, candidate: WindowView, live: WindowView, data: st.DataObject
) -> None:
    worse = WindowView(
        candidate.seconds,
        candidate.requests,
        data.draw(st.integers(candidate.errors, candidate.requests)),
        candidate.latency,
    )
    if Judge(settings).assess(candidate, live).outcome == "fail":
        assert Judge(settings).assess(worse, live).outcome == "fail"
