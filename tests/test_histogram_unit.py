"""The fine latency histogram: its bounds, exact merges, and what it can say about values."""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from dataclasses import replace
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zdproxy.dataplane.route import Via
from zdproxy.routing.histogram import BOUNDS, COARSE, Histogram, index
from zdproxy.routing.records import ROUTE_KINDS, IntervalRecord, UpstreamStats

# Latencies as upstreams produce them, from a cached answer to a long download.
seconds = st.floats(min_value=1e-4, max_value=600.0)
# Anything a clock difference can give, edges included: 0, the bounds, beyond them.
any_seconds = st.one_of(
    st.floats(min_value=0.0, max_value=5000.0),
    st.sampled_from([0.0, *BOUNDS, *COARSE, 1e9]),
)
samples = st.lists(any_seconds, max_size=200)
quantiles = st.floats(min_value=0.0, max_value=1.0)


def of(values: list[float]) -> Histogram:
    """The histogram of `values`, observed one by one as the data plane does."""
    counts: dict[int, int] = {}
    for value in values:
        counts[index(value)] = counts.get(index(value), 0) + 1
    return Histogram(counts, math.fsum(values))


def merged(parts: list[list[float]]) -> Histogram:
    total = Histogram()
    for part in parts:
        total.add(of(part))
    return total


def test_bounds_grow_by_at_most_two_percent_from_50us_to_past_600s() -> None:
    assert all(upper / lower <= 1.02 for lower, upper in pairwise(BOUNDS))
    assert BOUNDS[0] == pytest.approx(50e-6) and BOUNDS[-1] >= 600.0


def test_every_coarse_bound_is_a_fine_bound() -> None:
    assert set(COARSE) <= set(BOUNDS)
    assert COARSE == (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@given(any_seconds)
def test_a_bucket_holds_its_upper_bound_not_its_lower(value: float) -> None:
    i = index(value)
    if i < len(BOUNDS):
        assert value <= BOUNDS[i]
    if i > 0:
        assert value > BOUNDS[i - 1]


@given(st.lists(samples, max_size=6))
def test_merging_intervals_equals_observing_everything_at_once(parts: list[list[float]]) -> None:
    everything = of([value for part in parts for value in part])
    together = merged(parts)
    assert together.counts == everything.counts  # exact: integers
    assert together.total == pytest.approx(everything.total)
    assert together.count == sum(len(part) for part in parts)


@given(samples, samples, samples)
def test_merge_is_associative_and_commutative(
    a: list[float], b: list[float], c: list[float]
) -> None:
    def plus(x: Histogram, y: Histogram) -> Histogram:
        out = x.copy()
        out.add(y)
        return out

    ha, hb, hc = of(a), of(b), of(c)
    left, right = plus(plus(ha, hb), hc), plus(ha, plus(hb, hc))
    assert left.counts == right.counts == plus(plus(hc, hb), ha).counts
    assert left.total == pytest.approx(right.total)


def test_copy_is_independent() -> None:
    original = of([0.01, 0.02])
    twin = original.copy()
    twin.add(of([0.03]))
    assert (original.count, twin.count) == (2, 3)


@given(st.lists(seconds, min_size=1, max_size=300), quantiles)
def test_quantile_within_two_percent_of_the_sample_quantile(values: list[float], q: float) -> None:
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(values)))  # the nearest-rank definition
    exact = ordered[rank - 1]
    estimate = of(values).quantile(q)
    assert estimate is not None
    assert abs(estimate - exact) <= 0.02 * exact


def test_quantile_without_data_and_at_the_edges() -> None:
    assert Histogram().quantile(0.5) is None
    assert of([1e-6, 2e-6]).quantile(0.5) == BOUNDS[0]  # below the first bound: the bound
    assert of([5000.0]).quantile(0.99) == BOUNDS[-1]  # beyond the last bound: the bound


@given(samples)
def test_coarse_counts_equal_counting_against_coarse_bounds(values: list[float]) -> None:
    direct = [0] * (len(COARSE) + 1)
    for value in values:
        direct[bisect_left(COARSE, value)] += 1  # a coarse bucket holds (lower, upper] too
    assert of(values).coarse() == direct


@given(samples, any_seconds)
def test_at_most_and_above_never_count_a_value_on_the_wrong_side(
    values: list[float], limit: float
) -> None:
    histogram = of(values)
    at_most, above = histogram.at_most(limit), histogram.above(limit)
    assert at_most <= sum(1 for value in values if value <= limit)
    assert above <= sum(1 for value in values if value > limit)


@given(samples, st.sampled_from(BOUNDS))
def test_at_most_and_above_are_exact_at_a_bound(values: list[float], limit: float) -> None:
    histogram = of(values)
    assert histogram.at_most(limit) == sum(1 for value in values if value <= limit)
    assert histogram.above(limit) == sum(1 for value in values if value > limit)


@given(samples)
def test_dict_round_trip_through_json(values: list[float]) -> None:
    histogram = of(values)
    data = json.loads(json.dumps(histogram.to_dict()))
    assert Histogram.from_dict(data) == histogram


def test_zero_counts_are_not_stored() -> None:
    assert Histogram({3: 0, 5: 2}).counts == {5: 2}
    assert Histogram().to_dict() == {"counts": {}, "total": 0.0}


# -- the data plane's records -----------------------------------------------------------

responses = st.lists(
    st.tuples(st.sampled_from([101, 200, 302, 404, 500, 503]), any_seconds, st.sampled_from(Via)),
    max_size=100,
)


@given(st.lists(responses, min_size=1, max_size=4), st.lists(any_seconds, max_size=5))
def test_records_count_what_was_observed_and_round_trip_through_json(
    intervals: list[list[tuple[int, float, Via]]], pending: list[float]
) -> None:
    stats = UpstreamStats("green/127.0.0.1:9002")
    for interval in intervals:
        for status, took, via in interval:
            stats.observe(status, took, via)
        record = replace(stats.take(), pending=tuple(pending))
        assert record.latency == of([took for _, took, _ in interval]).counts  # sparse
        assert record.latency_sum == pytest.approx(math.fsum(t for _, t, _ in interval))
        assert record.routes == tuple(
            sum(1 for *_, via in interval if via == kind) for kind in range(len(ROUTE_KINDS))
        )
        assert record.responses == len(interval)
        assert IntervalRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
