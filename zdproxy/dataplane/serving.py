"""Serving exchanges: the half of ClientConnection that happens after a request head.

ClientConnection (client.py) parses; this mixin dispatches each request to an
upstream, answers failures with zdproxy's own replies, retries where that is
safe, enforces deadlines, closes connections without losing owed replies, holds
the upstream while the client reads slowly, and turns an upgraded connection into
a tunnel. It reaches the upstream side only through exchange.py's Protocols.
"""

from __future__ import annotations

import asyncio
from collections import deque
from math import inf

from zdproxy.dataplane.balancer import ColorPool
from zdproxy.dataplane.context import Context, RetryKind
from zdproxy.dataplane.exchange import Exchange, PoolSide, UpstreamSide
from zdproxy.dataplane.flow import BODY_WAITING, PIPELINE_FULL, ReadGate
from zdproxy.dataplane.http import CONTINUE_100, error_response
from zdproxy.dataplane.request_id import request_id_in
from zdproxy.routing.local import LocalErrorSite, describe
from zdproxy.routing.records import FailureKind

MAX_PIPELINE = 16  # queued requests behind the active one before we stop reading
MAX_RETRIES = 2  # other upstreams tried after a failure that is safe to retry
LINGER_SECONDS = 2.0  # how long a refused client may go on sending before we close
LINGERING = b""  # owed_reply once the connection only waits for the client to stop


class ExchangeDriver:
    """Mixin of ClientConnection: these slots are shared state, set in its __init__."""

    __slots__ = (
        "active",
        "closing",
        "ctx",
        "deadline",
        "gate",
        "in_head",
        "owed_reply",
        "queue",
        "receiving",
        "transport",
        "tunnel_peer",
        "upgrade_buffer",
        "writing_paused",
    )

    ctx: Context
    transport: asyncio.Transport
    gate: ReadGate
    deadline: float
    active: Exchange | None
    receiving: Exchange | None
    queue: deque[Exchange]
    owed_reply: bytes | None
    closing: bool
    in_head: bool
    tunnel_peer: UpstreamSide | None
    upgrade_buffer: list[bytes] | None
    writing_paused: bool

    # -- as the owner sees it (context.Connection) -------------------------------------

    @property
    def idle(self) -> bool:
        return (
            self.active is None and not self.queue and not self.in_head and self.tunnel_peer is None
        )

    def serves(self, ids: set[str]) -> bool:
        active = self.active
        return active is not None and active.pool is not None and active.pool.target.id in ids

    def abort(self) -> None:
        self.transport.abort()

    # -- dispatching -------------------------------------------------------------------

    def _start(self, exchange: Exchange) -> None:
        self.active = exchange
        ctx = self.ctx
        exchange.started = now = ctx.loop.time()
        ctx.budget.requests += 1
        pool = ctx.table.pick(exchange.route)
        if pool is None:
            self._respond_locally(exchange, 503, "no healthy upstream in the blue or green pool")
            return
        if exchange.expect_continue and not exchange.request_complete:
            self.transport.write(CONTINUE_100)
        self._dispatch(exchange, pool, now)

    def _dispatch(self, exchange: Exchange, pool: PoolSide, now: float) -> None:
        """Send the exchange to this upstream: on an idle connection, else a new one."""
        exchange.pool = pool
        pool.outstanding += 1
        conn = pool.take_idle()
        if conn is not None:
            exchange.reused = True
            self.deadline = now + self.ctx.limits.upstream_timeout
            conn.attach(exchange)
            if self.gate.reasons:
                self.gate.resume(BODY_WAITING)
        else:
            self.deadline = now + self.ctx.limits.connect_timeout
            pool.connect(exchange)

    def upstream_connected(self, exchange: Exchange, future: asyncio.Future[object]) -> None:
        """Done-callback of PoolSide.connect."""
        if future.cancelled():
            return
        error = future.exception()
        if exchange.connecting is not future or self.active is not exchange:
            # Abandoned meanwhile (the client left, a timeout, an evacuation): a cancel
            # comes too late for a connect that had already completed.
            if error is None:
                future.result()[0].close()  # type: ignore[index]
            return
        exchange.connecting = None
        pool = exchange.pool
        assert pool is not None
        if error is not None:
            pool.outstanding -= 1
            if (local := self.ctx.local_errors.note(error, LocalErrorSite.CONNECT)) is not None:
                # zdproxy itself is out of descriptors, memory or local ports: no failure
                # of the upstream's (never ejected for it), and a connect to another one
                # needs the same resource, so no retry either: 503 at once.
                detail = f"zdproxy cannot open a connection to upstream {pool.target.id}"
                self._respond_locally(exchange, 503, f"{detail}: {describe(local)}")
                return
            pool.stats.fail(FailureKind.CONNECT)
            if self._retry_elsewhere(exchange, pool, RetryKind.CONNECT):  # nothing was sent
                return
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            self._respond_locally(
                exchange, 502, f"cannot connect to upstream {pool.target.id}: {reason}"
            )
            return
        conn: UpstreamSide = future.result()[1]  # type: ignore[index]
        ctx = self.ctx
        self.deadline = ctx.loop.time() + ctx.limits.upstream_timeout
        conn.attach(exchange)
        self.gate.resume(BODY_WAITING)

    def exchange_done(self, exchange: Exchange, now: float) -> None:
        """The response is complete on the wire (or queued in the transport)."""
        self.active = None
        if not exchange.client_keep_alive or self.transport.is_closing():
            self._close(linger=self.receiving is not None or bool(self.queue) or self.in_head)
            return
        if self.queue:
            nxt = self.queue.popleft()
            if len(self.queue) < MAX_PIPELINE:
                self.gate.resume(PIPELINE_FULL)
            self._start(nxt)
            return
        if self.owed_reply is not None:
            self.transport.write(self.owed_reply)
            self._close(linger=True)
            return
        ctx = self.ctx
        if self.closing or ctx.stopping:
            self.transport.close()
            return
        limits = ctx.limits
        self.deadline = now + (limits.header_timeout if self.in_head else limits.idle_timeout)

    def _respond_locally(self, exchange: Exchange, status: int, detail: str) -> None:
        """Answer the active exchange with zdproxy's own error reply."""
        if exchange.response_started:
            self.transport.abort()  # too late for a clean error: cut it visibly
            return
        exchange.response_started = True
        # Unread body bytes would be parsed as the next request: close instead.
        exchange.client_keep_alive = exchange.client_keep_alive and exchange.request_complete
        ctx = self.ctx
        request_id = request_id_in(exchange.head) if ctx.limits.request_ids else b""
        reply = error_response(
            status, detail, close=not exchange.client_keep_alive, request_id=request_id
        )
        if not self.transport.is_closing():
            self.transport.write(reply)
        now = ctx.loop.time()
        if (access := ctx.limits.access) is not None:
            upstream = exchange.pool.target.id if exchange.pool is not None else "-"
            elapsed = now - (exchange.started or now)
            body = len(reply) - reply.index(b"\r\n\r\n") - 4
            access.response(exchange, status, upstream, elapsed, body)
        self.exchange_done(exchange, now)

    def _reject(self, status: int, detail: str) -> None:
        """A request we refuse to forward: reply after the responses already owed, then close."""
        reply = error_response(status, detail, close=True)
        self.in_head = False
        receiving, self.receiving = self.receiving, None
        if receiving is not None and self.queue and self.queue[-1] is receiving:
            self.queue.pop()  # its body broke: the requests queued before it are owed
        active = self.active
        if active is None:
            self.transport.write(reply)
            self._close(linger=True)
        elif receiving is active:
            # Its body broke a limit while streaming: the upstream must not see the rest.
            self._abandon(active, None)
            self.active = None
            if active.response_started:
                self.transport.abort()
            else:
                self.transport.write(reply)
                self._close(linger=True)
        else:
            self.owed_reply = reply
            self.gate.pause(PIPELINE_FULL)

    def _close(self, *, linger: bool) -> None:
        """Close after the replies already written.

        With `linger`, the client may still be sending (an unread body, pipelined
        requests, a broken head). Closing a socket with unread input sends a reset,
        which can destroy our reply before the client reads it; so half-close, discard
        what arrives for a moment, and close on the client's EOF or the deadline.
        """
        transport = self.transport
        if not linger or transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        self.owed_reply = LINGERING
        self.queue.clear()
        self.receiving = None
        self.in_head = False
        transport.write_eof()
        self.gate.clear()
        self.deadline = self.ctx.loop.time() + LINGER_SECONDS

    def _abandon(self, exchange: Exchange, kind: FailureKind | None) -> None:
        """Drop an exchange's upstream side mid-flight (its connection cannot be reused)."""
        pool, exchange.pool = exchange.pool, None
        in_flight = False
        if exchange.connecting is not None:
            exchange.connecting.cancel()
            exchange.connecting = None
            in_flight = True
        upstream = exchange.upstream
        if upstream is not None:
            exchange.upstream = None
            upstream.exchange = None
            upstream.transport.abort()
            in_flight = True
        if pool is not None and in_flight:
            pool.outstanding -= 1
            if kind is not None:
                pool.stats.fail(kind)

    def upstream_lost(self, exchange: Exchange, detail: str) -> None:
        """The upstream closed or reset the connection before the response was complete."""
        pool = exchange.pool
        assert pool is not None
        exchange.upstream = None
        if not exchange.response_started and exchange.replayable:
            if exchange.reused and exchange.attempts == 0:
                # The app closed an idle keep-alive connection just as we reused it:
                # the same request goes out once more, on a fresh connection.
                exchange.rewind()
                ctx = self.ctx
                self.deadline = ctx.loop.time() + ctx.limits.connect_timeout
                pool.connect(exchange)
                return
            if exchange.idempotent:
                pool.outstanding -= 1
                pool.stats.fail(FailureKind.RESET)
                if self._retry_elsewhere(exchange, pool, RetryKind.RESET):
                    return
                self._respond_locally(exchange, 502, f"upstream {pool.target.id}: {detail}")
                return
        pool.outstanding -= 1
        pool.stats.fail(FailureKind.RESET)
        self._respond_locally(exchange, 502, f"upstream {pool.target.id}: {detail}")

    def _retry_elsewhere(self, exchange: Exchange, failed: PoolSide, kind: RetryKind) -> bool:
        """Send a request that got no response byte to the client again. Only for
        failures that leave it safe: nothing was sent (connect), or an idempotent
        request whose whole body is known (reset, status).

        A split-routed request the candidate failed goes to the live pool: the failure
        speaks against the candidate's build, not just one of its instances. Any other
        goes to another upstream of the same color (never after a status: a pinned or
        preview request keeps its color's answer)."""
        ctx = self.ctx
        if exchange.attempts >= MAX_RETRIES:
            return False
        table = ctx.table
        other = table.fallback_pick() if self._may_go_live(exchange, failed) else None
        if other is None and kind is not RetryKind.STATUS:
            other = table.alternative(failed)
        if other is None:
            return False
        # A failed connect reached no app: sent elsewhere, the request still loads one
        # app once, so the budget never refuses it (a crashed candidate costs users
        # nothing). Retries after a reset or a status load a second app: budgeted.
        if kind is not RetryKind.CONNECT and not ctx.budget.allowed():
            return False
        self._resend(exchange, other, kind, sent=kind is not RetryKind.CONNECT)
        return True

    def _resend(self, exchange: Exchange, pool: PoolSide, kind: RetryKind, *, sent: bool) -> None:
        """Dispatch the exchange again, to `pool`. `sent`: an upstream got its head, so
        it starts over from the head and the kept body; else what waits in `pending`
        goes as it is."""
        if sent:
            exchange.rewind()
        else:
            exchange.attempts += 1
            exchange.reused = False
        ctx = self.ctx
        ctx.budget.spend(kind)
        self._dispatch(exchange, pool, ctx.loop.time())

    def _may_go_live(self, exchange: Exchange, failed: PoolSide) -> bool:
        ctx = self.ctx
        return (
            ctx.limits.retry_on_live
            and exchange.route.to is None  # a pinned or preview request stays where it was sent
            and failed.target.color == ctx.table.suspect
        )

    def retry_status(self, exchange: Exchange, pool: PoolSide, status: int) -> bool:
        """Whether the candidate's `status` answer may be replaced by the live pool's."""
        return (
            exchange.idempotent
            and exchange.replayable
            and exchange.attempts < MAX_RETRIES
            and self._may_go_live(exchange, pool)
            and self.ctx.table.fallback is not None
            and self.ctx.budget.allowed()  # else the user gets the candidate's own answer
        )

    def retry_on_live(self, exchange: Exchange, failed: PoolSide) -> None:
        """The candidate answered a retryable status, which the client never saw."""
        if not self._retry_elsewhere(exchange, failed, RetryKind.STATUS):
            # The live pool went away meanwhile: nothing to answer with but our own.
            self._respond_locally(exchange, 502, f"upstream {failed.target.id} failed")

    def upstream_failed(self, exchange: Exchange, kind: FailureKind, detail: str) -> None:
        pool = exchange.pool
        assert pool is not None
        exchange.upstream = None
        pool.outstanding -= 1
        pool.stats.fail(kind)
        self._respond_locally(exchange, 502, f"upstream {pool.target.id}: {detail}")

    def evacuate(self, live: ColorPool | None, until: float) -> bool:
        """The active exchange's upstream belongs to a color just rolled back. Safe to
        send again (it reached no app yet, or it is idempotent, its whole body is known
        and no response byte went out), it goes to `live` at once; any other must finish
        by `until` (loop time), or the client gets a 504 (a cut, if the response has
        started). Replays spend the budget's window but are never refused by it: they
        are bounded by what was in flight, and a refusal would leave a user waiting."""
        exchange = self.active
        pool = exchange.pool if exchange is not None else None
        assert exchange is not None and pool is not None
        sent = exchange.connecting is None  # an upstream connection got its head
        safe = not sent or (
            exchange.idempotent and exchange.replayable and not exchange.response_started
        )
        if live is None or not safe:
            self.ctx.loop.call_at(until, self._evacuation_over, exchange, pool)
            return False
        self._abandon(exchange, None)  # moved by the control plane: no failure of the app's
        self._resend(exchange, live.pick(), RetryKind.EVACUATE, sent=sent)
        return True

    def _evacuation_over(self, exchange: Exchange, pool: PoolSide) -> None:
        if self.active is not exchange or exchange.pool is not pool:
            return  # it finished, the client left, or it was retried elsewhere
        self._abandon(exchange, FailureKind.TIMEOUT)
        self._respond_locally(exchange, 504, f"upstream {pool.target.id} was rolled back")

    def on_timeout(self) -> None:
        """Called by the server's sweeper once `deadline` has passed."""
        self.deadline = inf
        if self.tunnel_peer is not None:
            self.transport.close()
            return
        exchange = self.active
        if exchange is None:
            if self.in_head:
                self.transport.write(error_response(408, "request header timeout", close=True))
                self._close(linger=True)
            else:
                self.transport.close()  # idle keep-alive, or the end of lingering
            return
        pool = exchange.pool
        assert pool is not None
        upstream_id = pool.target.id
        if exchange.connecting is not None:
            self._abandon(exchange, FailureKind.CONNECT)
            detail = f"connecting to upstream {upstream_id} timed out"
            self._respond_locally(exchange, 504, detail)
            return
        self._abandon(exchange, FailureKind.TIMEOUT)
        if exchange.request_complete:
            seconds = self.ctx.limits.upstream_timeout
            self._respond_locally(exchange, 504, f"upstream {upstream_id} silent for {seconds:g}s")
        else:
            exchange.client_keep_alive = False
            self._respond_locally(exchange, 408, "request body timed out")

    # -- the client's write buffer: hold the upstream while it is full ------------------

    def pause_writing(self) -> None:
        self.writing_paused = True
        upstream = self.tunnel_peer or (self.active.upstream if self.active else None)
        if upstream is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        upstream = self.tunnel_peer or (self.active.upstream if self.active else None)
        if upstream is not None and not upstream.transport.is_closing():
            upstream.transport.resume_reading()

    # -- Upgrade: a byte tunnel after 101 ----------------------------------------------

    def start_tunnel(self, upstream: UpstreamSide, initial: bytes) -> None:
        exchange = self.active
        assert exchange is not None and exchange.pool is not None
        pool = exchange.pool
        pool.outstanding -= 1
        ctx = self.ctx
        pool.stats.observe(101, ctx.loop.time() - exchange.started, exchange.route.via)
        exchange.upstream = None
        self.active = None
        self.tunnel_peer = upstream
        if initial:
            self.transport.write(initial)
        buffered, self.upgrade_buffer = self.upgrade_buffer, None
        if buffered:
            upstream.transport.writelines(buffered)
        self.gate.resume(BODY_WAITING)
        self.deadline = ctx.loop.time() + ctx.limits.tunnel_idle_timeout

    def tunnel_closed(self) -> None:
        self.tunnel_peer = None
        self.transport.close()
