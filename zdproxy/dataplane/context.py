"""What the connections of one data plane share, grouped by lifetime.

A connection gets its Context when it is created and never reaches for the server
that owns it (as in uvicorn's protocols, which take a config and a server state):

- the process: the event loop, the live client connections, the stopping flag, the
  local resource errors (routing/local.py);
- a config generation: `limits`, a frozen value swapped whole on reload;
- a routing snapshot: `table` and the request header kinds it reads, swapped on apply;
- a retry window: the retry budget, restarted by the timeout sweep.
"""

from __future__ import annotations

import asyncio
from enum import StrEnum
from math import inf
from typing import Protocol

from zdproxy.dataplane.balancer import ColorPool, RoutingTable
from zdproxy.dataplane.exchange import Exchange
from zdproxy.dataplane.limits import Limits
from zdproxy.routing.local import LocalErrors

RETRY_WINDOW = 10.0  # seconds of requests the retry budget looks at


class Connection(Protocol):
    """A client connection, as its owner sees it: timed out, drained, cut."""

    deadline: float  # the loop time its current timeout fires at
    active: Exchange | None  # the request being answered

    def on_timeout(self) -> None: ...

    @property
    def idle(self) -> bool:
        """No request is being received, answered or waiting, and no tunnel is open."""
        ...

    def serves(self, ids: set[str]) -> bool:
        """Whether its request in flight is on one of these upstreams."""
        ...

    def abort(self) -> None: ...

    def evacuate(self, live: ColorPool | None, until: float) -> bool:
        """Its request in flight is on a color that was rolled back: send it to `live`
        now if that is safe (True), else let it finish until `until` (loop time)."""
        ...


class RetryKind(StrEnum):
    """Why a request was sent again: the `kind` of zdproxy_retries_total."""

    CONNECT = "connect"  # no connection to the upstream: nothing reached an app
    RESET = "reset"  # the upstream closed the connection before any response byte
    STATUS = "status"  # the candidate answered one of `retry.statuses`
    EVACUATE = "evacuate"  # its color was rolled back while it was in flight


class RetryBudget:
    """Retries stay below a share of the recent requests (3 always), and are counted."""

    __slots__ = ("counts", "requests", "retries", "share", "started")

    def __init__(self, share: float) -> None:
        self.share = share
        self.requests = 0  # in the current window
        self.retries = 0  # in the current window
        self.started = 0.0
        # Since start, by kind, and the retries the budget refused.
        self.counts = {**{kind.value: 0 for kind in RetryKind}, "over_budget": 0}

    def allowed(self) -> bool:
        if self.retries < max(3.0, self.requests * self.share):
            return True
        self.counts["over_budget"] += 1
        return False

    def spend(self, kind: RetryKind) -> None:
        self.retries += 1
        self.counts[kind] += 1

    def roll(self, now: float) -> None:
        """Start a new window once the current one is RETRY_WINDOW old."""
        if now - self.started >= RETRY_WINDOW:
            self.started = now
            self.requests = self.retries = 0


class Context:
    __slots__ = (
        "all_closed",
        "budget",
        "connections",
        "limits",
        "local_errors",
        "loop",
        "request_headers",
        "stopping",
        "table",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, limits: Limits, table: RoutingTable
    ) -> None:
        self.loop = loop
        self.limits = limits
        self.table = table
        self.request_headers = table.router.request_headers  # read per header: kept at hand
        self.connections: set[Connection] = set()
        self.stopping = False
        self.local_errors = LocalErrors()
        self.all_closed: asyncio.Event | None = None  # set when the last connection closes
        self.budget = RetryBudget(limits.retry_share)

    def configure(self, limits: Limits) -> None:
        self.limits = limits
        self.budget.share = limits.retry_share

    def route_by(self, table: RoutingTable) -> None:
        self.table = table
        self.request_headers = table.router.request_headers

    def opened(self, conn: Connection) -> None:
        self.connections.add(conn)

    def closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        conn.deadline = inf
        if self.all_closed is not None and not self.connections:
            self.all_closed.set()
