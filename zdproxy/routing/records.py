"""Response records: what the data plane reports about every upstream, aggregated per interval.

The data plane never sends one message per request. Each upstream owns an
UpstreamStats that the hot path bumps in place (a few integer adds); the control
plane calls `take()` on its own schedule and gets an IntervalRecord, a plain
value it can window, judge and export.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# Upper bounds (seconds) of the latency histogram, shared with the metrics exporter.
LATENCY_BUCKETS: tuple[float, ...] = (
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


class FailureKind(StrEnum):
    """Why an upstream exchange produced no complete response."""

    CONNECT = "connect"  # refused, unreachable or connect timeout
    TIMEOUT = "timeout"  # the upstream went silent past upstream.timeout
    RESET = "reset"  # the upstream closed or reset the connection mid-exchange
    PROTOCOL = "protocol"  # the upstream sent something that is not valid HTTP/1.1
    CLIENT_ABORT = "client_abort"  # the client went away first; not the upstream's fault


_KIND_INDEX = {kind: i for i, kind in enumerate(FailureKind)}


class UpstreamStats:
    """Mutable counters for one upstream, written only by the data plane's event loop."""

    __slots__ = (
        "by_class",
        "failures",
        "latency_buckets",
        "latency_sum",
        "streak",
        "upstream_id",
    )

    def __init__(self, upstream_id: str) -> None:
        self.upstream_id = upstream_id
        self.by_class = [0] * 6  # index = status // 100; 0 is unused
        self.failures = [0] * len(FailureKind)
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        # Failures in a row (5xx or no response), for outlier ejection; not per interval.
        self.streak = 0

    def observe(self, status: int, seconds: float) -> None:
        self.streak = self.streak + 1 if status >= 500 else 0
        self.by_class[status // 100] += 1
        self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def fail(self, kind: FailureKind) -> None:
        self.failures[_KIND_INDEX[kind]] += 1
        if kind is not FailureKind.CLIENT_ABORT:
            self.streak += 1

    def take(self) -> IntervalRecord:
        """The counts since the last take, and a fresh start."""
        record = IntervalRecord(
            upstream_id=self.upstream_id,
            by_class=tuple(self.by_class),
            failures={k.value: n for k, n in zip(FailureKind, self.failures, strict=True) if n},
            latency_buckets=tuple(self.latency_buckets),
            latency_sum=self.latency_sum,
        )
        self.by_class = [0] * 6
        self.failures = [0] * len(FailureKind)
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        return record


@dataclass(frozen=True, slots=True)
class IntervalRecord:
    """One upstream's responses over one collection interval."""

    upstream_id: str
    by_class: tuple[int, ...]
    failures: dict[str, int]
    latency_buckets: tuple[int, ...]
    latency_sum: float

    @property
    def responses(self) -> int:
        return sum(self.by_class)

    def to_dict(self) -> dict[str, Any]:
        return {
            "upstream_id": self.upstream_id,
            "by_class": list(self.by_class),
            "failures": dict(self.failures),
            "latency_buckets": list(self.latency_buckets),
            "latency_sum": self.latency_sum,
        }


# How a preview override was proven, and why one was refused.
HONOURED = ("network", "signature")
IGNORED = ("forged", "expired", "disallowed", "malformed")


class OverrideCounters:
    """Pin and preview outcomes since start, kept by the data plane across snapshots for
    the metrics export."""

    __slots__ = ("pins", "preview_honoured", "preview_ignored")

    def __init__(self) -> None:
        self.preview_honoured = dict.fromkeys(HONOURED, 0)  # by how it was proven
        self.preview_ignored = dict.fromkeys(IGNORED, 0)  # by why it was refused
        self.pins: dict[str, int] = {}  # matches per rule name
