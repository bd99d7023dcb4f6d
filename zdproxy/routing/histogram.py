"""Latency histograms fine enough to compare distributions, and exact to merge.

Buckets are log-linear: between two consecutive "ladder" bounds (1, 2.5, 5 times a
power of ten, from 50 µs to 1000 s) the bounds grow geometrically, by at most 2% per
bucket, so a bucket pins any latency down within 2% (1% from its geometric
midpoint). The ladder includes every COARSE bound, the buckets of the Prometheus
export, so a coarse count is an exact sum of fine counts.

Counts are integers per bucket index, so adding histograms (of ticks, of worker
processes, of fleet members) is exact and the order of additions does not matter.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

# Upper bounds (seconds) of the Prometheus export's buckets, then +Inf.
COARSE: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

GROWTH = 1.02  # the largest ratio of a fine bucket's upper bound to its lower one

# The ladder extends COARSE down to 50 µs and up to 1000 s (over 600 s, the longest
# upstream timeout anyone sets), keeping its 1-2.5-5 rhythm.
_LADDER = (0.00005, 0.0001, 0.00025, 0.0005, *COARSE, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)


def _subdivide(lower: float, upper: float) -> list[float]:
    """Bounds above `lower` up to `upper` (itself, exactly), geometrically spaced."""
    steps = math.ceil(math.log(upper / lower) / math.log(GROWTH))
    ratio = upper / lower
    return [lower * ratio ** (k / steps) for k in range(1, steps)] + [upper]


BOUNDS: tuple[float, ...] = (
    _LADDER[0],
    *(b for lower, upper in pairwise(_LADDER) for b in _subdivide(lower, upper)),
)
OPEN = len(BOUNDS)  # the index of the bucket above the last bound

# The COARSE bucket (index into COARSE, then len(COARSE) for +Inf) of every fine bucket.
_COARSE_OF: tuple[int, ...] = (
    *(bisect_left(COARSE, bound) for bound in BOUNDS),
    len(COARSE),
)


def index(seconds: float) -> int:
    """The fine bucket of a latency: bucket i holds (BOUNDS[i - 1], BOUNDS[i]]."""
    return bisect_left(BOUNDS, seconds)


def _midpoint(i: int) -> float:
    """A value that stands for bucket i: its geometric midpoint; the edge buckets (at
    most 50 µs, over 1000 s) have no finite other end, so their one bound."""
    if i == 0:
        return BOUNDS[0]
    if i == OPEN:
        return BOUNDS[-1]
    return math.sqrt(BOUNDS[i - 1] * BOUNDS[i])


class Histogram:
    """Mergeable, sparse: counts by fine index, plus the sum of observed seconds."""

    __slots__ = ("counts", "total")

    def __init__(self, counts: Mapping[int, int] | None = None, total: float = 0.0) -> None:
        self.counts: dict[int, int] = {i: n for i, n in counts.items() if n} if counts else {}
        self.total = total

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return self.counts == other.counts and self.total == other.total

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, total={self.total!r})"

    def add(self, other: Histogram) -> None:
        """Adds `other`'s observations (exact)."""
        self.add_counts(other.counts, other.total)

    def add_counts(self, counts: Mapping[int, int], total: float) -> None:
        mine = self.counts
        get = mine.get
        for i, n in counts.items():
            mine[i] = get(i, 0) + n
        self.total += total

    def copy(self) -> Histogram:
        twin = Histogram()
        twin.counts = self.counts.copy()
        twin.total = self.total
        return twin

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def quantile(self, q: float) -> float | None:
        """The nearest-rank q-quantile (the ceil(q * count)-th smallest observation), as
        its bucket's geometric midpoint: within 1% of the observation (the edge buckets
        say their bound). None without observations."""
        count = self.count
        if not count:
            return None
        rank = min(max(1, math.ceil(q * count)), count)
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                break
        return _midpoint(i)

    def at_most(self, seconds: float) -> int:
        """Observations certainly <= `seconds`: in buckets whose upper bound is <= it."""
        end = bisect_right(BOUNDS, seconds)
        return sum(n for i, n in self.counts.items() if i < end)

    def above(self, seconds: float) -> int:
        """Observations certainly > `seconds`: in buckets whose lower bound is >= it (a
        bucket excludes its lower bound). The first bucket has no lower bound."""
        start = bisect_left(BOUNDS, seconds) + 1
        return sum(n for i, n in self.counts.items() if i >= start)

    def coarse(self) -> list[int]:
        """Counts per COARSE bucket, then the +Inf bucket (not cumulative)."""
        out = [0] * (len(COARSE) + 1)
        for i, n in self.counts.items():
            out[_COARSE_OF[i]] += n
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: JSON object keys are strings, so indices are too."""
        return {"counts": {str(i): n for i, n in self.counts.items()}, "total": self.total}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        return cls({int(i): int(n) for i, n in data["counts"].items()}, float(data["total"]))
