"""What the control plane makes of the data plane's records: running totals per
upstream (for /metrics) and a sliding window per color (for status, and the judge).

Fed on the control plane's tick from `collect()`; nothing here runs per request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import add

from zdproxy.config.settings import COLORS
from zdproxy.routing.records import LATENCY_BUCKETS, FailureKind, IntervalRecord

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
class Latency:
    """A cumulative latency histogram (counts per LATENCY_BUCKETS bound, then +Inf)."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def add(self, buckets: Iterable[int], total: float) -> None:
        self.buckets = list(map(add, self.buckets, buckets))
        self.total += total

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def bucket_of(self, q: float) -> tuple[float, float] | None:
        """The bounds of the bucket holding the q-quantile (the last is open: inf)."""
        count = self.count
        if not count:
            return None
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if n and seen >= q * count:
                lower = LATENCY_BUCKETS[i - 1] if i else 0.0
                upper = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else float("inf")
                return lower, upper
        return LATENCY_BUCKETS[-1], float("inf")

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds, interpolated inside its bucket; None without data."""
        count = self.count
        if not count:
            return None
        rank = q * count
        seen = 0
        lower = 0.0
        for i, n in enumerate(self.buckets):
            if n and seen + n >= rank:
                if i == len(LATENCY_BUCKETS):
                    return LATENCY_BUCKETS[-1]  # beyond the last bound: say the bound
                upper = LATENCY_BUCKETS[i]
                return lower + (upper - lower) * (rank - seen) / n
            seen += n
            if i < len(LATENCY_BUCKETS):
                lower = LATENCY_BUCKETS[i]
        return LATENCY_BUCKETS[-1]


@dataclass
class Slice:
    """One color's responses in one tick: those recorded between `start` and `at`."""

    at: float
    start: float
    requests: int = 0
    errors: int = 0  # 5xx answers plus upstream failures
    latency: Latency = field(default_factory=Latency)


@dataclass(frozen=True)
class WindowView:
    """A color's traffic over the sliding window."""

    seconds: float
    requests: int
    errors: int
    latency: Latency

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, float | int | None]:
        p50, p99 = self.latency.quantile(0.5), self.latency.quantile(0.99)
        return {
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "errors": self.errors,
            "requests_per_second": round(self.rate, 3),
            "error_rate": round(self.error_rate, 6),
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3),
        }


class Telemetry:
    def __init__(self, window: float) -> None:
        self.window = window  # of `status`
        self.retain = window  # how long slices are kept: the longest window anyone asks for
        self.totals: dict[str, Totals] = {}
        self.latency: dict[str, Latency] = {color: Latency() for color in COLORS}
        self._slices: dict[str, deque[Slice]] = {color: deque() for color in COLORS}
        self._started: float | None = None
        self._last: float | None = None  # the previous add: where the next slice starts

    def forget(self, configured: set[str]) -> None:
        """Drop the totals of upstreams no longer configured (their metric series go)."""
        for upstream in set(self.totals) - configured:
            del self.totals[upstream]

    def add(self, now: float, records: list[IntervalRecord]) -> None:
        if self._started is None:
            self._started = now
        start, self._last = (self._last if self._last is not None else now), now
        slices: dict[str, Slice] = {color: Slice(now, start) for color in COLORS}
        for record in records:
            color = color_of(record.upstream_id)
            self.totals.setdefault(record.upstream_id, Totals()).add(record)
            failed = sum(n for kind, n in record.failures.items() if kind in UPSTREAM_FAILURES)
            piece = slices[color]
            piece.requests += record.responses + failed
            piece.errors += record.by_class[5] + failed
            piece.latency.add(record.latency_buckets, record.latency_sum)
        for color, piece in slices.items():
            queue = self._slices[color]
            if piece.requests:
                queue.append(piece)
                self.latency[color].add(piece.latency.buckets, piece.latency.total)
            while queue and queue[0].at <= now - self.retain:
                queue.popleft()

    def view(
        self, color: str, now: float, seconds: float | None = None, since: float = 0.0
    ) -> WindowView:
        """A color's traffic over the last `seconds` (default: the status window), not
        counting any slice that began before `since` (a rollout step's start: what the
        previous step, or a rollout rolled back a moment ago, did is not judged)."""
        seconds = self.window if seconds is None else min(seconds, self.retain)
        start = max(now - seconds, since)
        latency = Latency()
        requests = errors = 0
        for piece in self._slices[color]:
            if piece.at > now - seconds and piece.start >= since:
                requests += piece.requests
                errors += piece.errors
                latency.add(piece.latency.buckets, piece.latency.total)
        began = max(self._started if self._started is not None else now, start)
        return WindowView(min(seconds, now - began), requests, errors, latency)
