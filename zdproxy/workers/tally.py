"""What the main process knows of its workers, summed into one data plane's view.

A worker's counts (responses, failures, latency) are per report and are summed over
reports and over workers; its state (requests in flight, their ages, failure
streaks) is as of its last report and is summed over workers; its running totals
(retries, pin and preview outcomes, local errors) are summed over workers, with
those of workers gone kept, so every counter the metrics export only ever grows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from zdproxy.routing.local import LocalErrorKind, LocalErrorSite
from zdproxy.routing.records import IntervalRecord, OverrideCounters
from zdproxy.workers.messages import Report


def merge(records: Iterable[IntervalRecord]) -> list[IntervalRecord]:
    """One record per upstream: the counts summed, the ages of requests in flight joined
    (the oldest first)."""
    merged: dict[str, IntervalRecord] = {}
    for record in records:
        seen = merged.get(record.upstream_id)
        if seen is None:
            merged[record.upstream_id] = record
            continue
        latency = Counter(seen.latency)
        latency.update(record.latency)
        failures = Counter(seen.failures)
        failures.update(record.failures)
        merged[record.upstream_id] = replace(
            seen,
            by_class=tuple(a + b for a, b in zip(seen.by_class, record.by_class, strict=True)),
            failures=dict(failures),
            latency=dict(latency),
            latency_sum=seen.latency_sum + record.latency_sum,
            routes=tuple(a + b for a, b in zip(seen.routes, record.routes, strict=True)),
            pending=tuple(sorted(seen.pending + record.pending, reverse=True)),
        )
    return list(merged.values())


@dataclass
class Totals:
    """Running totals since start, summed."""

    retries: Counter[str] = field(default_factory=Counter)
    pins: Counter[str] = field(default_factory=Counter)
    preview_honoured: Counter[str] = field(default_factory=Counter)
    preview_ignored: Counter[str] = field(default_factory=Counter)
    local_errors: Counter[tuple[LocalErrorSite, LocalErrorKind]] = field(default_factory=Counter)

    def add(self, other: Totals | Report) -> None:
        self.retries.update(other.retries)
        self.pins.update(other.pins)
        self.preview_honoured.update(other.preview_honoured)
        self.preview_ignored.update(other.preview_ignored)
        self.local_errors.update(other.local_errors)

    def overrides(self) -> OverrideCounters:
        counters = OverrideCounters()
        counters.pins = dict(self.pins)
        counters.preview_honoured.update(self.preview_honoured)
        counters.preview_ignored.update(self.preview_ignored)
        return counters


class Seen:
    """One worker process as its reports describe it."""

    def __init__(self) -> None:
        self.last: Report | None = None
        self._unread: list[IntervalRecord] = []  # counts not yet collected, ages stripped

    @property
    def version(self) -> int:
        """The snapshot version in force in the worker (-1 before its first report)."""
        return self.last.version if self.last is not None else -1

    def absorb(self, report: Report) -> None:
        self.last = report
        self._unread.extend(replace(r, pending=()) for r in report.records if _counts(r))

    def take(self) -> list[IntervalRecord]:
        """The counts since the last take, and the ages of the requests in flight as of
        the last report (in records of their own, so no count is taken twice)."""
        taken, self._unread = self._unread, []
        if self.last is not None:
            taken += [_ages_only(r) for r in self.last.records if r.pending]
        return taken

    def in_flight(self, ids: set[str]) -> tuple[int, int]:
        load = self.last.in_flight if self.last is not None else {}
        requests = sum(load[uid][0] for uid in ids if uid in load)
        return requests, sum(load[uid][1] for uid in ids if uid in load)

    def requests(self) -> int:
        """Requests in flight on any upstream (what the worker's death would lose)."""
        return sum(n for n, _ in self.last.in_flight.values()) if self.last is not None else 0


def _counts(record: IntervalRecord) -> bool:
    return bool(record.responses or record.failures)


def _ages_only(record: IntervalRecord) -> IntervalRecord:
    return replace(
        record,
        by_class=(0,) * len(record.by_class),
        failures={},
        latency={},
        latency_sum=0.0,
        routes=(0,) * len(record.routes),
    )
