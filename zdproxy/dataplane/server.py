"""The data plane's owner: listeners, live connections, upstream pools and the timeout
sweep. It meets the DataPlane Protocol (routing/plane.py), all the control plane uses."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import replace

from zdproxy.dataplane.balancer import RoutingTable
from zdproxy.dataplane.client import ClientConnection
from zdproxy.dataplane.context import Context
from zdproxy.dataplane.exchange import PoolSide
from zdproxy.dataplane.limits import Limits
from zdproxy.dataplane.upstream import UpstreamPool
from zdproxy.routing.local import LocalErrorKind, LocalErrorSite
from zdproxy.routing.plane import Done, WorkerState
from zdproxy.routing.records import IntervalRecord, OverrideCounters
from zdproxy.routing.snapshot import RoutingSnapshot

log = logging.getLogger("zdproxy.dataplane")

_EMPTY = RoutingSnapshot(version=0, live="blue", candidate_weight=0)
STOP_IDLE_GRACE = 0.5  # seconds an idle keep-alive connection may still send a request at stop


class ProxyServer:
    """Accepts clients and forwards their requests as the current routing snapshot says.

    Its connections share a Context (context.py) and never reach back here. Timeouts
    cost the hot path one float store: each connection keeps a `deadline`, and a
    periodic sweep (a plain loop callback, no task per request) acts on the ones
    that have passed.
    """

    def __init__(self, limits: Limits, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.pools: dict[str, UpstreamPool] = {}
        self._retired: set[UpstreamPool] = set()
        # Pin matches and preview outcomes, across snapshots (exported as metrics).
        self.override_counts = OverrideCounters()
        self.ctx = Context(self.loop, limits, RoutingTable(_EMPTY, {}, self.override_counts))
        self._servers: list[asyncio.base_events.Server] = []
        self._timer: asyncio.TimerHandle | None = None

    def configure(self, limits: Limits) -> None:
        """Swap in new limits and timeouts (listeners are not touched); connections read
        them from the next request on."""
        self.ctx.configure(limits)

    # -- routing snapshots (from the control plane) ------------------------------------

    def apply(self, snapshot: RoutingSnapshot) -> None:
        """Swap in a new snapshot. Requests in flight finish where they are."""
        pools: dict[str, UpstreamPool] = {}
        for targets in snapshot.pools.values():
            for target in targets:
                pool = self.pools.get(target.id)
                if pool is None:
                    pool = UpstreamPool(target, self.ctx)
                else:
                    pool.target = target  # the weight may have changed
                pools[target.id] = pool
        for upstream_id, pool in self.pools.items():
            if upstream_id not in pools:
                pool.retired = True
                pool.close_idle()
                self._retired.add(pool)
        self.pools = pools
        self.ctx.route_by(RoutingTable(snapshot, pools, self.override_counts))

    @property
    def snapshot(self) -> RoutingSnapshot:
        return self.ctx.table.snapshot

    def collect(self) -> list[IntervalRecord]:
        """Response records since the last call, one per upstream that had traffic or
        has requests in flight; `pending` holds their ages, the oldest first (a hung
        upstream answers nothing: its pending requests are all there is to see)."""
        known = (*self.pools.values(), *self._retired)
        ages = self._pending_ages(known)
        records = []
        for pool in known:
            record = pool.stats.take()
            if pending := ages.get(pool):
                record = replace(record, pending=tuple(sorted(pending, reverse=True)))
            if record.responses or record.failures or record.pending:
                records.append(record)
        self._retired = {pool for pool in self._retired if pool.outstanding or pool.tunnels}
        return records

    def _pending_ages(self, pools: tuple[UpstreamPool, ...]) -> dict[PoolSide, list[float]]:
        """Seconds since each request in flight started, by its upstream. Once per
        collect, never per request: one walk of the client connections, skipped when
        nothing is in flight."""
        ages: dict[PoolSide, list[float]] = defaultdict(list)
        if not any(pool.outstanding for pool in pools):
            return ages
        now = self.loop.time()
        for conn in self.ctx.connections:
            exchange = conn.active
            if exchange is not None and exchange.pool is not None:
                ages[exchange.pool].append(now - exchange.started)
        return ages

    def counters(self) -> tuple[dict[str, int], OverrideCounters]:
        return self.ctx.budget.counts, self.override_counts

    def local_errors(self) -> dict[tuple[LocalErrorSite, LocalErrorKind], int]:
        return dict(self.ctx.local_errors.counts)

    def failure_streaks(self, at_least: int) -> dict[str, int]:
        """Upstreams whose last `at_least` or more outcomes were all failures."""
        return {
            pool.target.id: pool.stats.streak
            for pool in self.pools.values()
            if pool.stats.streak >= at_least
        }

    def forget_streak(self, upstream_id: str) -> None:
        pool = self.pools.get(upstream_id)
        if pool is not None:
            pool.stats.streak = 0

    # -- draining (asked by the control plane) ------------------------------------------

    def _known(self, ids: set[str]) -> list[UpstreamPool]:
        pools = (*self.pools.values(), *self._retired)
        return [pool for pool in pools if pool.target.id in ids]

    def in_flight(self, ids: set[str]) -> tuple[int, int]:
        """(requests in flight, open tunnels) on these upstreams."""
        pools = self._known(ids)
        return sum(p.outstanding for p in pools), sum(len(p.tunnels) for p in pools)

    def load(self) -> dict[str, tuple[int, int]]:
        """(requests in flight, open tunnels) by upstream id, for those with any."""
        pools = (*self.pools.values(), *self._retired)
        return {
            p.target.id: (p.outstanding, len(p.tunnels))
            for p in pools
            if p.outstanding or p.tunnels
        }

    def close_tunnels(self, ids: set[str]) -> Awaitable[int]:
        return Done(self.close_tunnels_now(ids))

    def close_tunnels_now(self, ids: set[str]) -> int:
        """Close the Upgrade tunnels to these upstreams; returns how many."""
        closed = 0
        for pool in self._known(ids):
            for conn in list(pool.tunnels):
                conn.transport.close()
                closed += 1
        return closed

    def evacuate(self, ids: set[str], grace: float) -> Awaitable[tuple[int, int]]:
        return Done(self.evacuate_now(ids, grace))

    def evacuate_now(self, ids: set[str], grace: float) -> tuple[int, int]:
        """Requests in flight on these upstreams (a color just rolled back): each one
        that is safe to send again goes to the current snapshot's live pool at once;
        every other one gets `grace` seconds more, then its client gets a 504, or is cut
        if its response has started. Returns (replayed, left to finish). Call it after
        the snapshot that takes the traffic off these upstreams is applied."""
        live = self.ctx.table.live
        if live is not None and any(member.target.id in ids for member in live.members):
            live = None  # never move requests onto an upstream being evacuated
        until = self.loop.time() + grace
        replayed = left = 0
        for conn in [conn for conn in self.ctx.connections if conn.serves(ids)]:
            if conn.evacuate(live, until):
                replayed += 1
            else:
                left += 1
        return replayed, left

    def cut(self, ids: set[str]) -> Awaitable[int]:
        return Done(self.cut_now(ids))

    def cut_now(self, ids: set[str]) -> int:
        """Abort the client connections whose request is in flight on these upstreams."""
        victims = [conn for conn in self.ctx.connections if conn.serves(ids)]
        for conn in victims:
            conn.abort()
        return len(victims)

    def workers(self) -> list[WorkerState]:
        return []  # this is the one process

    def settled(self) -> Awaitable[None]:
        return Done(None)  # apply() swapped the snapshot in already

    # -- listeners ---------------------------------------------------------------------

    async def listen(
        self, sock: socket.socket, backlog: int = 1024, tls: ssl.SSLContext | None = None
    ) -> None:
        """Start accepting on a listening socket (bound by the daemon, or inherited)."""
        ctx = self.ctx
        scheme = b"https" if tls is not None else b"http"  # what the listener speaks
        server: asyncio.base_events.Server
        if sock.family == socket.AF_UNIX:
            server = await self.loop.create_unix_server(
                lambda: ClientConnection(ctx, scheme), sock=sock, backlog=backlog, ssl=tls
            )
        else:
            server = await self.loop.create_server(
                lambda: ClientConnection(ctx, scheme), sock=sock, backlog=backlog, ssl=tls
            )
        self._servers.append(server)
        if self._timer is None:
            self._timer = self.loop.call_later(ctx.limits.tick, self._sweep)

    def _sweep(self) -> None:
        ctx = self.ctx
        now = self.loop.time()
        ctx.budget.roll(now)
        expired = [conn for conn in ctx.connections if conn.deadline <= now]
        for conn in expired:
            conn.on_timeout()
        for pool in self.pools.values():
            if pool.idle:
                pool.sweep(now)
        self._timer = self.loop.call_later(ctx.limits.tick, self._sweep)

    # -- shutdown ----------------------------------------------------------------------

    async def stop(self, grace: float) -> int:
        """Stop accepting, finish what is in flight within `grace`, then cut the rest.

        Returns how many connections had to be cut.
        """
        ctx = self.ctx
        ctx.stopping = True
        for server in self._servers:
            server.close()
        # An idle keep-alive connection is closed only if it stays idle a moment: one that
        # a client is about to reuse carries that request, answered with Connection: close,
        # instead of racing our FIN with its request.
        idle_until = self.loop.time() + STOP_IDLE_GRACE
        for conn in ctx.connections:
            if conn.idle:
                conn.deadline = min(conn.deadline, idle_until)
        cut = 0
        if ctx.connections:
            ctx.all_closed = all_closed = asyncio.Event()
            try:
                await asyncio.wait_for(all_closed.wait(), grace)
            except TimeoutError:
                cut = len(ctx.connections)
                for conn in list(ctx.connections):
                    conn.abort()
        for pool in (*self.pools.values(), *self._retired):
            pool.close_idle()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for server in self._servers:
            await server.wait_closed()
        return cut
