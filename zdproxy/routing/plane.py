"""The seam between the planes: everything the control plane may ask of the data plane.

Snapshots go down (`apply`), records come up (`collect`, `failure_streaks`), drains
are watched and finished (`in_flight`, `close_tunnels`, `cut`), and a rolled-back
color's requests in flight are moved to the live pool (`evacuate`). Every call
takes and returns plain values, so the same contract can be met by the in-process
data plane, by worker processes behind a pipe, or by the in-memory fake the tests
use (tests/fakes.py).
"""

from __future__ import annotations

from typing import Protocol

from zdproxy.routing.local import LocalErrorKind, LocalErrorSite
from zdproxy.routing.records import IntervalRecord, OverrideCounters
from zdproxy.routing.snapshot import RoutingSnapshot


class DataPlane(Protocol):
    @property
    def snapshot(self) -> RoutingSnapshot:
        """The snapshot in force: what requests are routed by right now."""
        ...

    def apply(self, snapshot: RoutingSnapshot) -> None:
        """Swap in a new snapshot; requests in flight finish where they are."""
        ...

    def collect(self) -> list[IntervalRecord]:
        """Response records since the last call, one per upstream that had traffic or
        has requests in flight; a record's `pending` holds the ages in seconds of the
        requests in flight on its upstream, the oldest first."""
        ...

    def failure_streaks(self, at_least: int) -> dict[str, int]:
        """Upstreams whose last `at_least` or more outcomes were all failures."""
        ...

    def forget_streak(self, upstream_id: str) -> None: ...

    def in_flight(self, ids: set[str]) -> tuple[int, int]:
        """(requests in flight, open tunnels) on these upstreams."""
        ...

    def close_tunnels(self, ids: set[str]) -> int:
        """Close the Upgrade tunnels to these upstreams; returns how many."""
        ...

    def cut(self, ids: set[str]) -> int:
        """Abort the client connections with a request in flight on these upstreams."""
        ...

    def evacuate(self, ids: set[str], grace: float) -> tuple[int, int]:
        """Requests in flight on these upstreams (a color just rolled back): each
        idempotent, replayable one with no response byte sent yet (and any one still
        connecting, which reached no app) is sent again to the current snapshot's live
        pool at once; every other one gets `grace` seconds more, then its client gets a
        504, or is cut if its response has started. A non-idempotent request that
        reached an app is never sent twice. Returns (replayed, left to finish).

        Call it only after the snapshot that takes the traffic off these upstreams
        (the candidate at 0%) is applied: the live pool it replays on is that
        snapshot's."""
        ...

    def counters(self) -> tuple[dict[str, int], OverrideCounters]:
        """Running counts since start: retries by kind, pin and preview outcomes."""
        ...

    def local_errors(self) -> dict[tuple[LocalErrorSite, LocalErrorKind], int]:
        """Local resource errors since start (routing/local.py), by site and kind."""
        ...
