"""In-memory stand-ins for the parts the brain talks to: a data plane, health and a clock.

`FakeDataPlane` meets the `DataPlane` Protocol (zdproxy/routing/plane.py) with no
sockets: a test queues the records it wants the control plane to collect, sets
what is in flight (and how old it is), and reads back every snapshot it was given
and every evacuation it was asked for.
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from pathlib import Path

from zdproxy.control.health import UpstreamHealth
from zdproxy.control.journal import RESERVE_BYTES, Journal
from zdproxy.routing.local import LocalErrorKind, LocalErrorSite
from zdproxy.routing.plane import Done, WorkerState
from zdproxy.routing.records import IntervalRecord, OverrideCounters, UpstreamStats
from zdproxy.routing.snapshot import RoutingSnapshot


class FakeDataPlane:
    def __init__(self) -> None:
        self.snapshots: list[RoutingSnapshot] = [
            RoutingSnapshot(version=0, live="blue", candidate_weight=0)
        ]
        self.pending: list[IntervalRecord] = []
        self.streaks: dict[str, int] = {}
        self.requests: dict[str, int] = {}  # in flight per upstream id
        # Ages of requests in flight per upstream id: every collect() reports them (in a
        # record of their own if none is queued) until the test changes them.
        self.pending_ages: dict[str, tuple[float, ...]] = {}
        # Of `requests`, how many evacuate() may send to live (idempotent, replayable).
        self.replayable: dict[str, int] = {}
        self.evacuations: list[tuple[set[str], float]] = []  # (ids, grace) of each call
        self.tunnels: dict[str, int] = {}
        self.cuts = 0
        self.retries = {"connect": 0, "reset": 0, "status": 0, "evacuate": 0, "over_budget": 0}
        self.override_counts = OverrideCounters()

    @property
    def snapshot(self) -> RoutingSnapshot:
        return self.snapshots[-1]

    def apply(self, snapshot: RoutingSnapshot) -> None:
        self.snapshots.append(snapshot)

    def collect(self) -> list[IntervalRecord]:
        queued, self.pending = self.pending, []
        ages = {uid: tuple(sorted(a, reverse=True)) for uid, a in self.pending_ages.items() if a}
        records = [replace(r, pending=ages.pop(r.upstream_id, r.pending)) for r in queued]
        return records + [replace(UpstreamStats(uid).take(), pending=a) for uid, a in ages.items()]

    def failure_streaks(self, at_least: int) -> dict[str, int]:
        return {uid: n for uid, n in self.streaks.items() if n >= at_least}

    def forget_streak(self, upstream_id: str) -> None:
        self.streaks.pop(upstream_id, None)

    def in_flight(self, ids: set[str]) -> tuple[int, int]:
        return (
            sum(self.requests.get(uid, 0) for uid in ids),
            sum(self.tunnels.get(uid, 0) for uid in ids),
        )

    def close_tunnels(self, ids: set[str]) -> Done[int]:
        return Done(sum(self.tunnels.pop(uid, 0) for uid in ids))

    def cut(self, ids: set[str]) -> Done[int]:
        cut = sum(self.requests.pop(uid, 0) for uid in ids)
        self.cuts += cut
        return Done(cut)

    def evacuate(self, ids: set[str], grace: float) -> Done[tuple[int, int]]:
        """The replayable requests leave `requests`; the rest stay in flight until the
        test says they finished or the control plane cuts them. `pending_ages` is the
        test's to change (the fake cannot know which ages were replayed)."""
        self.evacuations.append((set(ids), grace))
        replayed = left = 0
        for uid in ids:
            in_flight = self.requests.pop(uid, 0)
            moved = min(self.replayable.pop(uid, 0), in_flight)
            if in_flight > moved:
                self.requests[uid] = in_flight - moved
            replayed += moved
            left += in_flight - moved
        self.retries["evacuate"] += replayed
        return Done((replayed, left))

    def counters(self) -> tuple[dict[str, int], OverrideCounters]:
        return self.retries, self.override_counts

    def local_errors(self) -> dict[tuple[LocalErrorSite, LocalErrorKind], int]:
        return {}

    def workers(self) -> list[WorkerState]:
        return []

    def settled(self) -> Done[None]:
        return Done(None)


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


class FullDisk(Journal):
    """A journal on a disk with `free` bytes left (the reserve file's are real bytes)."""

    def __init__(self, path: Path, free: int = 0) -> None:
        super().__init__(path)
        self.free = free
        self.refused = 0  # writes that hit ENOSPC

    def _write(self, data: bytes) -> None:
        if len(data) > self.free:  # the new document is whole before the old one goes
            self.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        before = self.path.stat().st_size if self.path.exists() else 0
        super()._write(data)
        self.free -= len(data) - before

    def _spend_reserve(self) -> bool:
        held = self.reserve.stat().st_size if self.reserve.exists() else 0
        spent = super()._spend_reserve()
        self.free += held
        return spent

    def make_reserve(self) -> bool:
        held = self.reserve.stat().st_size if self.reserve.exists() else 0
        if RESERVE_BYTES - held > self.free:
            return False
        made = super().make_reserve()
        self.free -= self.reserve.stat().st_size - held
        return made
