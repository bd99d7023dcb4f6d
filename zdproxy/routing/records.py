"""Response records: what the data plane reports about every upstream, aggregated per interval.

The data plane never sends one message per request. Each upstream owns an
UpstreamStats that the hot path bumps in place (a few integer adds); the control
plane calls `take()` on its own schedule and gets an IntervalRecord, a plain
value it can window, judge and export.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from zdproxy.routing.histogram import BOUNDS, Histogram

# How the data plane chose each request's color; a record's `routes` counts responses
# by these, in this order (zdproxy.dataplane.route.Via's values index it).
ROUTE_KINDS = ("split", "bucket", "preview", "pin")


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
        "buckets",
        "by_class",
        "failures",
        "latency",
        "latency_sum",
        "routes",
        "streak",
        "upstream_id",
    )

    def __init__(self, upstream_id: str) -> None:
        self.upstream_id = upstream_id
        # Failures in a row (5xx or no response), for outlier ejection; not per interval.
        self.streak = 0
        # Responses by histogram.BOUNDS index, dense: the hot path only indexes and adds.
        self.latency = [0] * (len(BOUNDS) + 1)
        # The indices whose count is not zero. take() reads and clears only those: a
        # scan of all 900 buckets of every upstream, every tick, would cost more than
        # a tick's requests do.
        self.buckets: list[int] = []
        self._reset()

    def _reset(self) -> None:
        self.by_class = [0] * 6  # index = status // 100; 0 is unused
        self.failures = [0] * len(FailureKind)
        self.latency_sum = 0.0
        self.routes = [0] * len(ROUTE_KINDS)

    def observe(self, status: int, seconds: float, via: int) -> None:
        """One response: its status, its latency, and how its route was chosen (an
        index of ROUTE_KINDS)."""
        self.streak = self.streak + 1 if status >= 500 else 0
        self.by_class[status // 100] += 1
        latency, i = self.latency, bisect_left(BOUNDS, seconds)  # histogram.index, inlined
        if latency[i]:
            latency[i] += 1
        else:
            latency[i] = 1
            self.buckets.append(i)
        self.latency_sum += seconds
        self.routes[via] += 1

    def fail(self, kind: FailureKind) -> None:
        self.failures[_KIND_INDEX[kind]] += 1
        if kind is not FailureKind.CLIENT_ABORT:
            self.streak += 1

    def take(self) -> IntervalRecord:
        """The counts since the last take, and a fresh start."""
        latency, counts = self.latency, {}
        for i in sorted(self.buckets):
            counts[i] = latency[i]
            latency[i] = 0
        self.buckets = []
        record = IntervalRecord(
            upstream_id=self.upstream_id,
            by_class=tuple(self.by_class),
            failures={k.value: n for k, n in zip(FailureKind, self.failures, strict=True) if n},
            latency=counts,
            latency_sum=self.latency_sum,
            routes=tuple(self.routes),
        )
        self._reset()
        return record


@dataclass(frozen=True, slots=True)
class IntervalRecord:
    """One upstream's responses over one collection interval."""

    upstream_id: str
    by_class: tuple[int, ...]  # responses by status // 100
    failures: dict[str, int]  # exchanges without a complete response, by FailureKind value
    latency: dict[int, int]  # responses by histogram.BOUNDS index (sparse: no zeros)
    latency_sum: float  # seconds, over all responses
    routes: tuple[int, ...]  # responses by ROUTE_KINDS index
    # Ages (seconds) of the requests still in flight on the upstream when the record
    # was taken: a snapshot, not a count over the interval.
    pending: tuple[float, ...] = ()

    @property
    def responses(self) -> int:
        return sum(self.by_class)

    def __reduce__(self) -> tuple[type[IntervalRecord], tuple[Any, ...]]:
        # Workers send their records pickled. Compiled (mypyc: zdproxy/compiled.py), a
        # frozen slots dataclass refuses pickle's default rebuild, field by field.
        return IntervalRecord, tuple(getattr(self, f.name) for f in fields(self))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, the latency as Histogram.to_dict() writes it."""
        return {
            "upstream_id": self.upstream_id,
            "by_class": list(self.by_class),
            "failures": dict(self.failures),
            "latency": Histogram(self.latency, self.latency_sum).to_dict(),
            "routes": list(self.routes),
            "pending": list(self.pending),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IntervalRecord:
        latency = Histogram.from_dict(data["latency"])
        return cls(
            upstream_id=data["upstream_id"],
            by_class=tuple(data["by_class"]),
            failures=dict(data["failures"]),
            latency=latency.counts,
            latency_sum=latency.total,
            routes=tuple(data["routes"]),
            pending=tuple(data["pending"]),
        )


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
