"""The seam between the planes: everything the control plane may ask of the data plane.

Snapshots go down (`apply`), records come up (`collect`, `failure_streaks`), drains
are watched and finished (`in_flight`, `close_tunnels`, `cut`), and a rolled-back
color's requests in flight are moved to the live pool (`evacuate`). Every call
takes and returns plain values, so the same contract can be met by the in-process
data plane, by worker processes behind a pipe, or by the in-memory fake the tests
use (tests/fakes.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Generator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from zdproxy.routing.local import LocalErrorKind, LocalErrorSite
from zdproxy.routing.records import IntervalRecord, OverrideCounters
from zdproxy.routing.snapshot import RoutingSnapshot

T = TypeVar("T")


class Done(Generic[T]):
    """An answer known at once, as an awaitable: what a data plane in this process
    gives for its commands (the work is done by the time the call returns)."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, T]:
        return self.value
        yield  # a generator that never suspends: awaiting it returns the value at once


@dataclass(frozen=True)
class WorkerState:
    """One data-plane worker process (`proxy.workers` above 1), as the main process
    knows it from the worker's last report."""

    index: int  # from 1; a replacement keeps the index of the process it replaced
    pid: int | None  # None while it is being replaced
    version: int  # the routing snapshot in force in it (-1 before its first report)
    connections: int  # client connections open
    requests: int  # requests in flight
    restarts: int  # processes that ended in this place and were replaced
    lost: int  # requests in flight lost with them
    uptime: float  # seconds since the current process started
    cpu_seconds: float = 0.0  # user + system CPU time of the current process
    rss_bytes: int = 0  # its resident memory


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

    # The commands on requests in flight act from the call on (in one process, they are
    # done when it returns); their awaitables give the counts, once every worker has
    # answered. A worker answers in the order it was sent messages, so an answer also
    # says that the worker has applied every snapshot sent before the command.

    def close_tunnels(self, ids: set[str]) -> Awaitable[int]:
        """Close the Upgrade tunnels to these upstreams; how many."""
        ...

    def cut(self, ids: set[str]) -> Awaitable[int]:
        """Abort the client connections with a request in flight on these upstreams."""
        ...

    def evacuate(self, ids: set[str], grace: float) -> Awaitable[tuple[int, int]]:
        """Requests in flight on these upstreams (a color just rolled back): each
        idempotent, replayable one with no response byte sent yet (and any one still
        connecting, which reached no app) is sent again to the current snapshot's live
        pool at once; every other one gets `grace` seconds more, then its client gets a
        504, or is cut if its response has started. A non-idempotent request that
        reached an app is never sent twice. Its counts: (replayed, left to finish).

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

    def workers(self) -> list[WorkerState]:
        """The worker processes; empty when the data plane runs in this process."""
        ...

    def settled(self) -> Awaitable[None]:
        """Done once every worker routes by the latest snapshot applied (at once when
        the data plane runs in this process)."""
        ...
