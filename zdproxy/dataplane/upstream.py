"""The upstream side: one pool of keep-alive connections per app server, and the protocol
that parses an app server's responses and streams them to the client."""

from __future__ import annotations

import asyncio
import logging
from functools import partial

import httptools

from zdproxy.dataplane.body import last_chunk
from zdproxy.dataplane.context import Context
from zdproxy.dataplane.exchange import Exchange
from zdproxy.dataplane.flow import UPSTREAM_BUSY
from zdproxy.dataplane.http import (
    CONNECTION_OPTIONS,
    CRLF,
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    LAST_CHUNK,
    PLAIN_CONNECTION_VALUES,
    RESPONSE_HEADERS,
    SEP,
    connection_tokens,
    status_line,
    strip_named_headers,
)
from zdproxy.routing.records import FailureKind, UpstreamStats
from zdproxy.routing.snapshot import UpstreamTarget

log = logging.getLogger("zdproxy.upstream")

_NO_BODY_STATUSES = frozenset({204, 304})


class UpstreamPool:
    """One app server: its idle keep-alive connections (LIFO), load and counters."""

    __slots__ = ("ctx", "idle", "outstanding", "retired", "stats", "target", "tunnels")

    def __init__(self, target: UpstreamTarget, ctx: Context) -> None:
        self.target = target
        self.ctx = ctx
        self.idle: list[UpstreamConnection] = []
        self.outstanding = 0  # requests in flight
        self.tunnels: set[UpstreamConnection] = set()  # open Upgrade tunnels
        self.stats = UpstreamStats(target.id)
        self.retired = False  # no longer in any snapshot: close connections as they free up

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.transport.is_closing():
                return conn
        return None

    def release(self, conn: UpstreamConnection, now: float) -> None:
        if self.retired or len(self.idle) >= self.ctx.limits.max_idle_per_upstream:
            conn.transport.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def connect(self, exchange: Exchange) -> None:
        """Open a new connection for the exchange; its result arrives as a callback."""
        loop = self.ctx.loop
        address = self.target.address
        factory = partial(UpstreamConnection, self)
        if address.path is not None:
            coro = loop.create_unix_connection(factory, address.path)
        else:
            coro = loop.create_connection(factory, address.host or "", address.port)
        future = asyncio.ensure_future(coro)
        exchange.connecting = future  # type: ignore[assignment]
        future.add_done_callback(partial(exchange.client.upstream_connected, exchange))

    def sweep(self, now: float) -> None:
        """Close connections idle longer than the idle timeout (the oldest sit at the bottom)."""
        idle = self.idle
        limit = now - self.ctx.limits.upstream_idle_timeout
        while idle and idle[0].idle_since < limit:
            idle.pop(0).transport.close()

    def close_idle(self) -> None:
        while self.idle:
            self.idle.pop().transport.close()


class UpstreamConnection(asyncio.Protocol):
    """One connection to an app server; serves one exchange at a time, then goes idle."""

    __slots__ = (
        "_chunked",
        "_client_chunked",
        "_complete",
        "_conn_tokens",
        "_discard",
        "_garbage",
        "_info",
        "_keep_alive",
        "_length",
        "_lines",
        "_out",
        "_reason",
        "_sent",
        "_status",
        "_until_close",
        "_upgrade_line",
        "exchange",
        "idle_since",
        "parser",
        "pool",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.idle_since = 0.0
        self.tunnel = False
        self._out: list[bytes] = []
        self._reset_response()

    def _reset_response(self) -> None:
        self._lines: list[bytes] = []
        self._reason = b""
        self._status = 0
        self._conn_tokens: list[bytes] | None = None
        self._length: bytes | None = None  # the Content-Length value
        self._chunked = False
        self._upgrade_line = b""
        self._info = False
        self._complete = False
        self._garbage = False
        self._discard = False  # a candidate's failure the client will not see: retried
        self._keep_alive = False
        self._client_chunked = False
        self._until_close = False
        self._sent = 0  # chunked body bytes relayed, for the access log

    # -- attaching to an exchange ------------------------------------------------------

    def attach(self, exchange: Exchange) -> None:
        """Send the exchange's request on this connection and start answering it."""
        self.exchange = exchange
        exchange.upstream = self
        transport = self.transport
        if exchange.pending:
            transport.writelines([exchange.head, *exchange.pending])
            exchange.pending = None
            exchange.pending_bytes = 0
        else:
            transport.write(exchange.head)
        if exchange.client.writing_paused:
            transport.pause_reading()

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # an idle connection must stay silent
            self.pool.discard(self)
            self.transport.close()
            return
        client = exchange.client
        ctx = self.pool.ctx
        now = ctx.loop.time()
        if self.tunnel:
            client.transport.write(data)
            client.deadline = now + ctx.limits.tunnel_idle_timeout
            return
        client.deadline = now + ctx.limits.upstream_timeout
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._status == 101 and exchange.upgrade:
                self._flush(client.transport)
                self.tunnel = True
                self.pool.tunnels.add(self)
                client.start_tunnel(self, data[exc.args[0] :])
                return
            self._fail(FailureKind.PROTOCOL, "upstream sent an unexpected upgrade")
            return
        except httptools.HttpParserError as exc:
            self._fail(FailureKind.PROTOCOL, f"upstream sent invalid HTTP: {exc}")
            return
        if self._out:
            if self._discard:
                self._out = []
            else:
                self._flush(client.transport)
        if self._complete:
            self._finish(now)

    def _flush(self, transport: asyncio.Transport) -> None:
        transport.writelines(self._out)
        self._out = []

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost does the bookkeeping

    def connection_lost(self, exc: Exception | None) -> None:
        exchange = self.exchange
        if exchange is None:
            self.pool.discard(self)
            return
        client = exchange.client
        if self.tunnel:
            self.pool.tunnels.discard(self)
            client.tunnel_closed()
            return
        if self._until_close and exc is None and exchange.response_started:
            # The response was delimited by the close itself: this is its normal end.
            if self._client_chunked:
                self._out.append(LAST_CHUNK)
            self._flush(client.transport)
            self._keep_alive = False
            self._finish(self.pool.ctx.loop.time())
            return
        self.exchange = None
        client.upstream_lost(exchange, "upstream closed the connection")

    def pause_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.client.gate.pause(UPSTREAM_BUSY)

    def resume_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.client.gate.resume(UPSTREAM_BUSY)

    # -- httptools callbacks -----------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        if self._complete:
            self._garbage = True  # bytes after a complete response: never reuse this connection
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        kind = RESPONSE_HEADERS.get(name.lower())
        if kind is None or kind == H_CONTENT_LENGTH:
            if kind is not None:
                self._length = value
            self._lines.extend((name, SEP, value, CRLF))
        elif kind == H_CONNECTION:
            if value.lower() in PLAIN_CONNECTION_VALUES:
                return  # llhttp already knows keep-alive from close
            tokens = connection_tokens(value)
            if self._conn_tokens is None:
                self._conn_tokens = tokens
            else:
                self._conn_tokens.extend(tokens)
        elif kind == H_UPGRADE:
            self._upgrade_line = b"Upgrade: %s\r\n" % value
        elif kind == H_TRANSFER_ENCODING:
            # llhttp has checked the value; chunked can only be the last coding.
            self._chunked = value.rstrip().lower().endswith(b"chunked")
        # H_DROP: hop-by-hop, never forwarded

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        status = self._status = self.parser.get_status_code()
        lines = self._lines
        if self._conn_tokens:
            named = {t for t in self._conn_tokens if t not in CONNECTION_OPTIONS}
            if named:
                lines = strip_named_headers(lines, named)
        ctx = self.pool.ctx
        if 100 <= status < 200 and status != 101:
            self._info = True
            # 100 answers an Expect that zdproxy already answered itself; HTTP/1.0 knows no 1xx.
            if status != 100 and not exchange.http10:
                self._out.append(b"".join((status_line(status, self._reason), *lines, CRLF)))
            return
        self._keep_alive = self.parser.should_keep_alive()
        limits = ctx.limits
        if status in limits.retry_statuses and exchange.client.retry_status(
            exchange, self.pool, status
        ):
            self._discard = True  # read this answer to its end, then ask the live pool
            if exchange.is_head or status in _NO_BODY_STATUSES:
                self._complete = True
            elif self._length is None and not self._chunked:
                self._until_close = True
            return
        exchange.response_started = True
        if status >= 300 and not exchange.request_complete:
            # An early refusal (RFC 9110 15.5): the rest of the body is not forwarded, and
            # the client, which may wait for its upload to drain, is read (and discarded).
            exchange.decline()
            exchange.client.gate.resume(UPSTREAM_BUSY)
        head = [status_line(status, self._reason), *lines]
        if status == 101:
            head.append(self._upgrade_line)
            head.append(b"Connection: upgrade\r\n")
        if limits.via_line:
            head.append(limits.via_line)
        if set_cookie := exchange.route.set_cookie:
            head.append(set_cookie)
        client_keep_alive = (
            exchange.client_keep_alive and exchange.request_complete and not ctx.stopping
        )
        if exchange.is_head or status in _NO_BODY_STATUSES or status == 101:
            self._complete = status != 101
        elif self._length is None:
            # Chunked, or delimited by the upstream closing: HTTP/1.1 clients get chunks,
            # HTTP/1.0 clients get the raw body and a closed connection at its end.
            self._until_close = not self._chunked
            if exchange.http10:
                client_keep_alive = False
            else:
                self._client_chunked = True
                head.append(b"Transfer-Encoding: chunked\r\n")
        if status != 101:
            exchange.client_keep_alive = client_keep_alive
            if not client_keep_alive:
                head.append(b"Connection: close\r\n")
            elif exchange.http10:
                head.append(b"Connection: keep-alive\r\n")
        head.append(CRLF)
        self._out.append(b"".join(head))
        self._lines.clear()  # from here on, the trailer fields of a chunked body

    def on_body(self, body: bytes) -> None:
        if self._complete:  # a body after a HEAD/204/304 head: ignore it, never reuse
            self._garbage = True
            return
        if self._client_chunked:
            self._sent += len(body)  # else the Content-Length says it, or nothing does
            self._out.extend((b"%x\r\n" % len(body), body, CRLF))
        else:
            self._out.append(body)

    def on_message_complete(self) -> None:
        if self._info:
            self._lines = []
            self._reason = b""
            self._conn_tokens = None
            self._info = False
            return
        if self._complete:
            return
        if self._client_chunked:
            self._out.append(last_chunk(self._lines) if self._lines else LAST_CHUNK)
        self._complete = True

    # -- ending the exchange -----------------------------------------------------------

    def _finish(self, now: float) -> None:
        exchange = self.exchange
        assert exchange is not None
        pool = self.pool
        pool.outstanding -= 1
        client = exchange.client
        pool.stats.observe(self._status, now - exchange.started, exchange.route.via)
        if (access := pool.ctx.limits.access) is not None:
            elapsed, sent = now - exchange.started, self._body_sent(exchange)
            access.response(exchange, self._status, pool.target.id, elapsed, sent)
        reusable = (
            self._keep_alive
            and exchange.request_complete
            and not exchange.declined  # the app waits for body bytes that never come
            and not self._garbage
            and not exchange.is_head
        )
        if exchange.is_head and self._keep_alive and not self._garbage:
            # llhttp would wait for the body a HEAD response announces; start afresh.
            self.parser = httptools.HttpResponseParser(self)
            reusable = exchange.request_complete
        discarded = self._discard
        self.exchange = None
        exchange.upstream = None
        self._reset_response()
        if reusable:
            if client.writing_paused:
                # The client's full buffer paused this connection's reading, and its
                # resume_writing will look only at the exchange it serves then: read again
                # now, or the next request on it would never see its answer.
                self.transport.resume_reading()
            pool.release(self, now)
        else:
            self.transport.close()
        if discarded:
            client.retry_on_live(exchange, pool)
        else:
            client.exchange_done(exchange, now)

    def _body_sent(self, exchange: Exchange) -> int | None:
        """The response body's bytes, for the access log: None for a raw body without a
        length (an HTTP/1.0 client's), whose bytes are not counted."""
        if self._status in _NO_BODY_STATUSES or exchange.is_head:
            return 0
        if self._length is not None:
            return int(self._length)
        return self._sent if self._client_chunked else None

    def _fail(self, kind: FailureKind, detail: str) -> None:
        exchange = self.exchange
        self.exchange = None
        self.transport.abort()
        if exchange is not None:
            exchange.client.upstream_failed(exchange, kind, detail)
