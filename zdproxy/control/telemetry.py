"""What the control plane makes of the data plane's records: running totals per
upstream (for /metrics) and a sliding window per color (for status, and the judge).

Fed on the control plane's tick from `collect()`; nothing here runs per request.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass, field
from operator import add, attrgetter, sub
from typing import Any

from zdproxy.config.settings import COLORS
from zdproxy.routing.histogram import BOUNDS, Histogram
from zdproxy.routing.records import ROUTE_KINDS, FailureKind, IntervalRecord

# Failures that count as the upstream's errors (a client hanging up is not).
UPSTREAM_FAILURES = frozenset(k.value for k in FailureKind if k is not FailureKind.CLIENT_ABORT)


def color_of(upstream_id: str) -> str:
    return upstream_id.partition("/")[0]


@dataclass
class Totals:
    """Everything one upstream has answered since zdproxy started."""

    by_class: list[int] = field(default_factory=lambda: [0] * 6)
    failures: dict[str, int] = field(default_factory=dict)

    def add(self, record: IntervalRecord) -> None:
        self.by_class = list(map(add, self.by_class, record.by_class))
        for kind, n in record.failures.items():
            self.failures[kind] = self.failures.get(kind, 0) + n


@dataclass
class Slice:
    """One color's responses in one tick: those recorded between `start` and `at`."""

    at: float
    start: float
    requests: int = 0
    errors: int = 0  # 5xx answers plus upstream failures
    latency: Histogram = field(default_factory=Histogram)
    routes: list[int] = field(default_factory=lambda: [0] * len(ROUTE_KINDS))


@dataclass(frozen=True)
class WindowView:
    """A color's traffic over the sliding window, and what it has in flight now."""

    seconds: float
    requests: int
    errors: int
    latency: Histogram
    routes: tuple[int, ...] = (0,) * len(ROUTE_KINDS)  # responses by ROUTE_KINDS index
    # Ages (seconds, ascending) of the color's requests in flight at the last tick: a
    # snapshot, whatever the window.
    pending: tuple[float, ...] = ()

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        p50, p99 = self.latency.quantile(0.5), self.latency.quantile(0.99)
        return {
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "errors": self.errors,
            "requests_per_second": round(self.rate, 3),
            "error_rate": round(self.error_rate, 6),
            "p50_ms": _ms(p50),
            "p99_ms": _ms(p99),
            "routes": dict(zip(ROUTE_KINDS, self.routes, strict=True)),
            "pending": len(self.pending),
            "oldest_pending_ms": _ms(self.pending[-1] if self.pending else None),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


@dataclass
class _Sums:
    """What a run of slices adds up to, the latency dense (a count per fine bucket):
    subtracting two of these is a few C-level list operations."""

    requests: int = 0
    errors: int = 0
    total: float = 0.0  # latency seconds
    routes: list[int] = field(default_factory=lambda: [0] * len(ROUTE_KINDS))
    latency: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))

    def add(self, piece: Slice, sign: int = 1) -> None:
        """Adds the slice (sign 1) or takes it out (sign -1)."""
        self.requests += sign * piece.requests
        self.errors += sign * piece.errors
        self.total += sign * piece.latency.total
        self.routes = list(map(add if sign > 0 else sub, self.routes, piece.routes))
        latency = self.latency
        for i, n in piece.latency.counts.items():
            latency[i] += sign * n

    def minus(self, earlier: _Sums) -> _Sums:
        return _Sums(
            self.requests - earlier.requests,
            self.errors - earlier.errors,
            self.total - earlier.total,
            list(map(sub, self.routes, earlier.routes)),
            list(map(sub, self.latency, earlier.latency)),
        )

    def copy(self) -> _Sums:
        return _Sums(self.requests, self.errors, self.total, self.routes[:], self.latency[:])


def _histogram(sums: _Sums) -> Histogram:
    counts = {i: n for i, n in enumerate(sums.latency) if n}
    # A difference of float sums may keep a rounding residue where nothing is left.
    return Histogram(counts, sums.total if counts else 0.0)


_AT, _START = attrgetter("at"), attrgetter("start")
# Slices between checkpoints: a view sums at most half as many slices one by one.
CHECKPOINT_EVERY = 20


class _Series:
    """One color's slices, oldest first, numbered from `head` on, with prefix sums.

    A view is always a suffix of the slices (both `at` and `start` only grow), and a
    window of 600 s holds 6000 slices: summing them one by one would cost tens of
    milliseconds. So the series keeps the running sums of every slice so far, and a
    copy of them every CHECKPOINT_EVERY slices; the sums from slice `first` on are
    the running sums minus the checkpoint nearest to `first`, give or take the few
    slices in between. Counts are integers: the differences are exact.
    """

    def __init__(self) -> None:
        self.slices: deque[Slice] = deque()
        self.head = 0  # the number of slices[0]
        self.running = _Sums()  # of every slice ever appended
        # checkpoints[j]: the sums of the slices numbered below (base + j) * CHECKPOINT_EVERY
        self.checkpoints: deque[_Sums] = deque()
        self.base = 0

    def append(self, piece: Slice) -> None:
        if (self.head + len(self.slices)) % CHECKPOINT_EVERY == 0:
            self.checkpoints.append(self.running.copy())
        self.running.add(piece)
        self.slices.append(piece)

    def drop_through(self, cutoff: float) -> None:
        """Forgets the slices that ended at or before `cutoff`, and the checkpoints
        that only they were between."""
        slices = self.slices
        while slices and slices[0].at <= cutoff:
            slices.popleft()
            self.head += 1
        while self.checkpoints and self.base * CHECKPOINT_EVERY < self.head:
            self.checkpoints.popleft()
            self.base += 1

    def first(self, cutoff: float, since: float) -> int:
        """The number of the first slice that ended after `cutoff` and began at or
        after `since`: every later one did too."""
        slices = self.slices
        return self.head + max(
            bisect_right(slices, cutoff, key=_AT), bisect_left(slices, since, key=_START)
        )

    def since(self, first: int) -> _Sums:
        """The sums of the slices numbered `first` on."""
        end = self.head + len(self.slices)
        j = min(max(round(first / CHECKPOINT_EVERY) - self.base, 0), len(self.checkpoints) - 1)
        mark = (self.base + j) * CHECKPOINT_EVERY
        if j < 0 or end - first <= abs(mark - first):  # nearest the end: sum them all
            sums, mark = _Sums(), end
        else:
            sums = self.running.minus(self.checkpoints[j])  # the slices from `mark` on
        for number in range(min(first, mark), max(first, mark)):
            sums.add(self.slices[number - self.head], 1 if number >= first else -1)
        return sums


class Telemetry:
    def __init__(self, window: float) -> None:
        self.window = window  # of `status`
        self.retain = window  # how long slices are kept: the longest window anyone asks for
        self.totals: dict[str, Totals] = {}
        self._series: dict[str, _Series] = {color: _Series() for color in COLORS}
        self._pending: dict[str, tuple[float, ...]] = dict.fromkeys(COLORS, ())
        self._started: float | None = None
        self._last: float | None = None  # the previous add: where the next slice starts

    @property
    def latency(self) -> dict[str, Histogram]:
        """Each color's latency histogram since zdproxy started (for /metrics)."""
        return {color: _histogram(series.running) for color, series in self._series.items()}

    @property
    def latest(self) -> float | None:
        """When the most recent records were added; None before the first."""
        return self._last

    def forget(self, configured: set[str]) -> None:
        """Drop the totals of upstreams no longer configured (their metric series go)."""
        for upstream in set(self.totals) - configured:
            del self.totals[upstream]

    def add(self, now: float, records: list[IntervalRecord]) -> None:
        if self._started is None:
            self._started = now
        start, self._last = (self._last if self._last is not None else now), now
        slices: dict[str, Slice] = {}  # made for the colors that have records only
        pending: dict[str, tuple[float, ...]] = dict.fromkeys(COLORS, ())
        for record in records:
            upstream = record.upstream_id
            if (totals := self.totals.get(upstream)) is None:
                totals = self.totals[upstream] = Totals()
            totals.add(record)
            color = color_of(upstream)
            if (piece := slices.get(color)) is None:
                piece = slices[color] = Slice(now, start)
            failed = sum(n for kind, n in record.failures.items() if kind in UPSTREAM_FAILURES)
            piece.requests += record.responses + failed
            piece.errors += record.by_class[5] + failed
            piece.latency.add_counts(record.latency, record.latency_sum)
            piece.routes = list(map(add, piece.routes, record.routes))
            if record.pending:
                pending[color] += record.pending
        for color, series in self._series.items():
            piece = slices.get(color)
            if piece is not None and piece.requests:
                series.append(piece)
            series.drop_through(now - self.retain)
            if pending[color]:
                pending[color] = tuple(sorted(pending[color]))
        self._pending = pending

    def view(
        self, color: str, now: float, seconds: float | None = None, since: float = 0.0
    ) -> WindowView:
        """A color's traffic over the last `seconds` (default: the status window), not
        counting any slice that began before `since` (a rollout step's start: what the
        previous step, or a rollout rolled back a moment ago, did is not judged).
        It costs about the same for any window (see _Series): ~0.1 ms."""
        seconds = self.window if seconds is None else min(seconds, self.retain)
        start = max(now - seconds, since)
        series = self._series[color]
        sums = series.since(series.first(now - seconds, since))
        began = max(self._started if self._started is not None else now, start)
        return WindowView(
            min(seconds, now - began),
            sums.requests,
            sums.errors,
            _histogram(sums),
            tuple(sums.routes),
            self._pending[color],
        )
