"""In-memory stand-ins for the parts the brain talks to: a data plane, health and a clock.

`FakeDataPlane` meets the `DataPlane` Protocol (zdproxy/routing/plane.py) with no
sockets: a test queues the records it wants the control plane to collect, sets
what is in flight, and reads back every snapshot it was given.
"""

from __future__ import annotations

from zdproxy.control.health import UpstreamHealth
from zdproxy.routing.records import IntervalRecord, OverrideCounters
from zdproxy.routing.snapshot import RoutingSnapshot


class FakeDataPlane:
    def __init__(self) -> None:
        self.snapshots: list[RoutingSnapshot] = [
            RoutingSnapshot(version=0, live="blue", candidate_weight=0)
        ]
        self.pending: list[IntervalRecord] = []
        self.streaks: dict[str, int] = {}
        self.requests: dict[str, int] = {}  # in flight per upstream id
        self.tunnels: dict[str, int] = {}
        self.cuts = 0
        self.retries = {"connect": 0, "reset": 0, "status": 0, "over_budget": 0}
        self.override_counts = OverrideCounters()

    @property
    def snapshot(self) -> RoutingSnapshot:
        return self.snapshots[-1]

    def apply(self, snapshot: RoutingSnapshot) -> None:
        self.snapshots.append(snapshot)

    def collect(self) -> list[IntervalRecord]:
        records, self.pending = self.pending, []
        return records

    def failure_streaks(self, at_least: int) -> dict[str, int]:
        return {uid: n for uid, n in self.streaks.items() if n >= at_least}

    def forget_streak(self, upstream_id: str) -> None:
        self.streaks.pop(upstream_id, None)

    def in_flight(self, ids: set[str]) -> tuple[int, int]:
        return (
            sum(self.requests.get(uid, 0) for uid in ids),
            sum(self.tunnels.get(uid, 0) for uid in ids),
        )

    def close_tunnels(self, ids: set[str]) -> int:
        return sum(self.tunnels.pop(uid, 0) for uid in ids)

    def cut(self, ids: set[str]) -> int:
        cut = sum(self.requests.pop(uid, 0) for uid in ids)
        self.cuts += cut
        return cut

    def counters(self) -> tuple[dict[str, int], OverrideCounters]:
        return self.retries, self.override_counts


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeHealth:
    """Health verdicts set by the test: the part of HealthChecker the outlier detector
    reads (`state`), with no probes and no sockets. An upstream it was not told about
    has no state, as one of a pool without checks."""

    def __init__(self) -> None:
        self.states: dict[str, UpstreamHealth] = {}

    def state(self, upstream_id: str) -> UpstreamHealth | None:
        return self.states.get(upstream_id)

    def check(self, upstream_id: str, at: float, *, up: bool) -> None:
        """A check at `at` that leaves the upstream up (a pass) or down (a failure)."""
        state = self.states.setdefault(upstream_id, UpstreamHealth())
        state.up = up
        state.checks += 1
        if up:
            state.last_pass = at
