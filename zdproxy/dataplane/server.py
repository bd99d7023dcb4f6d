"""The data plane's owner: listeners, live connections, upstream pools and the timeout sweep."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from math import inf

from zdproxy.config.settings import Settings
from zdproxy.dataplane.access import AccessLog
from zdproxy.dataplane.balancer import RoutingTable
from zdproxy.dataplane.client import ClientConnection
from zdproxy.dataplane.http import H_STICKY, REQUEST_HEADERS
from zdproxy.dataplane.upstream import UpstreamPool
from zdproxy.routing.records import IntervalRecord, OverrideCounters
from zdproxy.routing.snapshot import RoutingSnapshot

log = logging.getLogger("zdproxy.dataplane")

_EMPTY = RoutingSnapshot(version=0, live="blue", candidate_weight=0)
RETRY_WINDOW = 10.0  # seconds of requests the retry budget looks at
STOP_IDLE_GRACE = 0.5  # seconds an idle keep-alive connection may still send a request at stop


class ProxyServer:
    """Accepts clients and forwards their requests as the current routing snapshot says.

    Timeouts cost the hot path one float store: each connection keeps a `deadline`,
    and a periodic sweep (a plain loop callback, no task per request) acts on the
    ones that have passed.
    """

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.connections: set[ClientConnection] = set()
        self.pools: dict[str, UpstreamPool] = {}
        self._retired: set[UpstreamPool] = set()
        # Pin matches and preview outcomes, across snapshots (exported as metrics).
        self.override_counts = OverrideCounters()
        self.table = RoutingTable(_EMPTY, {}, self.override_counts)
        self.request_headers = REQUEST_HEADERS  # plus what steering, pins and preview read
        self.stopping = False
        self.scheme = b"http"  # X-Forwarded-Proto: set by listen() from the listener
        self.retries = {"connect": 0, "reset": 0, "status": 0, "over_budget": 0}
        # The retry budget's window: requests and retries since the last sweep reset.
        self.window_requests = 0
        self.window_retries = 0
        self._window_start = 0.0
        self._servers: list[asyncio.base_events.Server] = []
        self._timer: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """Take limits and timeouts from the settings (listeners are not touched)."""
        proxy, upstream = settings.proxy, settings.upstream
        self.header_timeout = proxy.header_timeout
        self.idle_timeout = proxy.idle_timeout
        self.max_header_bytes = proxy.max_header_bytes
        self.max_body_bytes = proxy.max_body_bytes
        self.connect_timeout = upstream.connect_timeout
        self.upstream_timeout = upstream.timeout
        self.upstream_idle_timeout = upstream.idle_timeout
        self.max_idle_per_upstream = upstream.max_idle_per_upstream
        self.tunnel_idle_timeout = upstream.tunnel_idle_timeout
        self.via_line = b"Via: 1.1 %s\r\n" % proxy.via.encode() if proxy.via else b""
        self.head_end = self.via_line + b"\r\n"  # the last bytes of every upstream request head
        log = settings.log
        self.access_log = AccessLog(log.access_sample) if log.access else None
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in proxy.trusted_proxies]
        shortest = min(
            self.header_timeout,
            self.idle_timeout,
            self.connect_timeout,
            self.upstream_timeout,
            self.upstream_idle_timeout,
        )
        # Timeouts fire within a quarter of the shortest one; never spin faster than 5 ms.
        self.tick = min(max(shortest / 4, 0.005), 0.5)
        retry = settings.retry
        self.retry_on_live = retry.on_live_pool
        self.retry_statuses = frozenset(retry.statuses)
        self.retry_max_body = retry.max_body
        self.retry_share = retry.budget_percent / 100

    def is_trusted(self, ip: str) -> bool:
        if not self._trusted:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    # -- routing snapshots (from the control plane) ------------------------------------

    def apply(self, snapshot: RoutingSnapshot) -> None:
        """Swap in a new snapshot. Requests in flight finish where they are."""
        pools: dict[str, UpstreamPool] = {}
        for targets in snapshot.pools.values():
            for target in targets:
                pool = self.pools.get(target.id)
                if pool is None:
                    pool = UpstreamPool(target, self)
                else:
                    pool.target = target  # the weight may have changed
                pools[target.id] = pool
        for upstream_id, pool in self.pools.items():
            if upstream_id not in pools:
                pool.retired = True
                pool.close_idle()
                self._retired.add(pool)
        self.pools = pools
        self.table = table = RoutingTable(snapshot, pools, self.override_counts)
        self.request_headers = dict(REQUEST_HEADERS)
        if table.steering.header is not None:
            self.request_headers[table.steering.header] = H_STICKY
        for name, kind in table.override_headers.items():
            self.request_headers.setdefault(name, kind)  # never shadow a header we interpret

    @property
    def snapshot(self) -> RoutingSnapshot:
        return self.table.snapshot

    def collect(self) -> list[IntervalRecord]:
        """Response records since the last call, one per upstream that had traffic."""
        records = [pool.stats.take() for pool in (*self.pools.values(), *self._retired)]
        self._retired = {pool for pool in self._retired if pool.outstanding or pool.tunnels}
        return [record for record in records if record.responses or record.failures]

    def counters(self) -> tuple[dict[str, int], OverrideCounters]:
        return self.retries, self.override_counts

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

    def close_tunnels(self, ids: set[str]) -> int:
        """Close the Upgrade tunnels to these upstreams; returns how many."""
        closed = 0
        for pool in self._known(ids):
            for conn in list(pool.tunnels):
                conn.transport.close()
                closed += 1
        return closed

    def cut(self, ids: set[str]) -> int:
        """Abort the client connections whose request is in flight on these upstreams."""
        victims = [
            conn
            for conn in self.connections
            if conn.active is not None
            and conn.active.pool is not None
            and conn.active.pool.target.id in ids
        ]
        for conn in victims:
            conn.transport.abort()
        return len(victims)

    # -- listeners ---------------------------------------------------------------------

    async def listen(
        self, sock: socket.socket, backlog: int = 1024, tls: ssl.SSLContext | None = None
    ) -> None:
        """Start accepting on a listening socket (bound by the daemon, or inherited)."""
        self.scheme = b"https" if tls is not None else b"http"  # what the listener speaks
        server: asyncio.base_events.Server
        if sock.family == socket.AF_UNIX:
            server = await self.loop.create_unix_server(
                lambda: ClientConnection(self), sock=sock, backlog=backlog, ssl=tls
            )
        else:
            server = await self.loop.create_server(
                lambda: ClientConnection(self), sock=sock, backlog=backlog, ssl=tls
            )
        self._servers.append(server)
        if self._timer is None:
            self._timer = self.loop.call_later(self.tick, self._sweep)

    def retry_allowed(self) -> bool:
        """Within the budget: retries stay below a share of recent requests (3 always)."""
        if self.window_retries < max(3.0, self.window_requests * self.retry_share):
            return True
        self.retries["over_budget"] += 1
        return False

    def _sweep(self) -> None:
        now = self.loop.time()
        if now - self._window_start >= RETRY_WINDOW:
            self._window_start = now
            self.window_requests = self.window_retries = 0
        expired = [conn for conn in self.connections if conn.deadline <= now]
        for conn in expired:
            conn.on_timeout()
        for pool in self.pools.values():
            if pool.idle:
                pool.sweep(now)
        self._timer = self.loop.call_later(self.tick, self._sweep)

    # -- shutdown ----------------------------------------------------------------------

    async def stop(self, grace: float) -> int:
        """Stop accepting, finish what is in flight within `grace`, then cut the rest.

        Returns how many connections had to be cut.
        """
        self.stopping = True
        for server in self._servers:
            server.close()
        # An idle keep-alive connection is closed only if it stays idle a moment: one that
        # a client is about to reuse carries that request, answered with Connection: close,
        # instead of racing our FIN with its request.
        idle_until = self.loop.time() + STOP_IDLE_GRACE
        for conn in self.connections:
            idle = conn.active is None and not conn.queue and not conn.in_head
            if idle and conn.tunnel_peer is None:
                conn.deadline = min(conn.deadline, idle_until)
        cut = 0
        if self.connections:
            self._all_closed = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_closed.wait(), grace)
            except TimeoutError:
                cut = len(self.connections)
                for conn in list(self.connections):
                    conn.transport.abort()
        for pool in (*self.pools.values(), *self._retired):
            pool.close_idle()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for server in self._servers:
            await server.wait_closed()
        return cut

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        conn.deadline = inf
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()
