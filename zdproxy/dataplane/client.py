"""The client side: one protocol instance per client connection.

It parses requests with httptools, rewrites their heads for the upstream, and
drives each request through an Exchange. Requests are answered strictly in the
order they arrived (pipelining); a bad request is answered with a 4xx after the
responses already owed, and the connection closes because its framing is in doubt.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from math import inf
from typing import TYPE_CHECKING

import httptools

from zdproxy.dataplane.exchange import Exchange
from zdproxy.dataplane.flow import BODY_WAITING, PIPELINE_FULL, ReadGate
from zdproxy.dataplane.http import (
    CONNECTION_OPTIONS,
    CONTINUE_100,
    CRLF,
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_COOKIE,
    H_EXPECT,
    H_HOST,
    H_PREVIEW,
    H_STICKY,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    H_X_FORWARDED_FOR,
    H_X_FORWARDED_HOST,
    H_X_FORWARDED_PROTO,
    IDEMPOTENT_METHODS,
    PLAIN_CONNECTION_VALUES,
    SEP,
    Reject,
    connection_tokens,
    error_response,
    strip_named_headers,
)
from zdproxy.routing.records import FailureKind

if TYPE_CHECKING:
    from zdproxy.dataplane.server import ProxyServer
    from zdproxy.dataplane.upstream import UpstreamConnection, UpstreamPool

log = logging.getLogger("zdproxy.client")

MAX_PIPELINE = 16  # queued requests behind the active one before we stop reading
MAX_PENDING_BODY = 256 * 1024  # body bytes buffered while no upstream is attached
MAX_RETRIES = 2  # other upstreams tried after a failure that is safe to retry
LINGER_SECONDS = 2.0  # how long a refused client may go on sending before we close
LINGERING = b""  # owed_reply once the connection only waits for the client to stop


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_body_bytes",
        "_captured",
        "_chunked",
        "_conn_tokens",
        "_content_length",
        "_cookie",
        "_expect",
        "_head_bytes",
        "_head_raw",
        "_host",
        "_host_count",
        "_lines",
        "_sticky",
        "_upgrade",
        "_url",
        "_xff",
        "_xfh",
        "_xfp",
        "active",
        "closing",
        "deadline",
        "forwarded",
        "gate",
        "in_head",
        "owed_reply",
        "parser",
        "peer_ip",
        "queue",
        "receiving",
        "server",
        "transport",
        "trusted",
        "tunnel_peer",
        "upgrade_buffer",
        "writing_paused",
    )

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.gate: ReadGate = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.deadline = inf
        self.active: Exchange | None = None  # the exchange being answered
        self.receiving: Exchange | None = None  # the exchange whose body is arriving
        self.queue: deque[Exchange] = deque()  # pipelined exchanges waiting their turn
        # A refusal owed after the responses in the queue; LINGERING once it has been sent.
        self.owed_reply: bytes | None = None
        self.closing = False  # answer what is owed, then close
        self.in_head = False
        self.writing_paused = False
        self.tunnel_peer: UpstreamConnection | None = None
        self.upgrade_buffer: list[bytes] | None = None
        self._head_bytes = 0  # parsed head bytes (request target aside)
        self._head_raw = 0  # raw bytes of reads that fell wholly inside the head
        self._body_bytes = 0

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gate = ReadGate(self.transport)
        server = self.server
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            ip = peer[0]
            self.trusted = server.is_trusted(ip)
        else:  # a unix socket: the client is on this host
            ip = "127.0.0.1"
            self.trusted = True
        self.peer_ip = ip.encode()
        self.forwarded = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (
            self.peer_ip,
            server.scheme,
        )
        server.connections.add(self)
        self.deadline = server.loop.time() + server.header_timeout

    def data_received(self, data: bytes) -> None:
        peer = self.tunnel_peer
        if peer is not None:
            peer.transport.write(data)
            self.deadline = self.server.loop.time() + self.server.tunnel_idle_timeout
            return
        if self.upgrade_buffer is not None:  # bytes for the tunnel, before the 101 arrived
            self.upgrade_buffer.append(data)
            self.gate.pause(BODY_WAITING)
            return
        if self.owed_reply is not None:
            return  # the request stream is broken; what follows is discarded
        head_continues = self.in_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_requested(data[exc.args[0] :])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Reject):
                self._reject(cause.status, cause.detail)
            else:
                log.error("bug while parsing a request", exc_info=cause)
                self._reject(500, "internal proxy error")
        except httptools.HttpParserInvalidMethodError:
            self._reject(400, "invalid request method")
        except httptools.HttpParserInvalidURLError:
            self._reject(400, "invalid request target")
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed request: {exc}")
        else:
            if head_continues and self.in_head:
                # Every byte of this read belongs to an unfinished head. httptools holds a
                # header line until its end, so bound that here, not only in on_header.
                self._head_raw += len(data)
                if self._head_raw > self.server.max_header_bytes:
                    self._reject(431, "request header fields too large")

    def eof_received(self) -> bool:
        peer = self.tunnel_peer
        if peer is not None:
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            return True
        if self.active is None:
            return False
        self.closing = True  # half-close: answer what was asked, then close
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connection_closed(self)
        peer = self.tunnel_peer
        if peer is not None:
            self.tunnel_peer = None
            peer.transport.close()
        exchange = self.active
        if exchange is not None:
            self.active = None
            self._abandon(exchange, FailureKind.CLIENT_ABORT)
        self.queue.clear()
        self.receiving = None

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

    # -- httptools callbacks: parsing one request --------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self._head_bytes = 0
        self._head_raw = 0
        self._body_bytes = 0
        self._url = b""
        self._lines: list[bytes] = []
        self._host: bytes | None = None
        self._host_count = 0
        self._content_length = 0
        self._chunked = False
        self._expect: bytes | None = None
        self._upgrade: bytes | None = None
        self._conn_tokens: list[bytes] | None = None
        self._cookie: bytes | None = None
        self._sticky: bytes | None = None
        self._captured: dict[int, bytes] | None = None  # headers pins and preview read
        if self.trusted:  # only a trusted peer's X-Forwarded-* are ever read
            self._xff: bytes | None = None
            self._xfp: bytes | None = None
            self._xfh: bytes | None = None
        if self.active is None:
            self.deadline = self.server.loop.time() + self.server.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.server.max_header_bytes:
            raise Reject(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a trailer field of a chunked body: not forwarded
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.server.max_header_bytes:
            raise Reject(431, "request header fields too large")
        kind = self.server.request_headers.get(name.lower())
        if kind is None:
            self._lines.extend((name, SEP, value, CRLF))
        elif kind == H_HOST:
            self._host = value
            self._host_count += 1
            self._lines.extend((name, SEP, value, CRLF))
        elif kind == H_CONTENT_LENGTH:
            self._content_length = int(value)  # llhttp has checked it is all digits
            self._lines.extend((name, SEP, value, CRLF))
        elif kind == H_COOKIE:
            self._cookie = value if self._cookie is None else self._cookie + b"; " + value
            self._lines.extend((name, SEP, value, CRLF))
        elif kind == H_STICKY:
            self._sticky = value
            self._lines.extend((name, SEP, value, CRLF))
        elif kind == H_TRANSFER_ENCODING:
            self._chunked = True  # llhttp refuses any request coding that is not chunked
        elif kind == H_CONNECTION:
            if value.lower() in PLAIN_CONNECTION_VALUES:
                return  # llhttp already knows keep-alive, close and upgrade
            if self._conn_tokens is None:
                self._conn_tokens = connection_tokens(value)
            else:
                self._conn_tokens.extend(connection_tokens(value))
        elif kind == H_UPGRADE:
            self._upgrade = value
        elif kind == H_EXPECT:
            self._expect = value
        elif kind >= H_PREVIEW:  # only configured pins and preview register these kinds
            self._capture(kind, value)
            if kind != H_PREVIEW:  # the preview header is ours; the app never sees it
                self._lines.extend((name, SEP, value, CRLF))
        elif self.trusted:  # X-Forwarded-*: kept only from trusted proxies
            if kind == H_X_FORWARDED_FOR:
                self._xff = value if self._xff is None else self._xff + b", " + value
            elif kind == H_X_FORWARDED_PROTO:
                self._xfp = value
            elif kind == H_X_FORWARDED_HOST:
                self._xfh = value

    def on_headers_complete(self) -> None:
        self.in_head = False
        server = self.server
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise Reject(505, f"HTTP/{version} is not supported")
        http10 = version == "1.0"
        method: bytes = parser.get_method()
        if method == b"CONNECT":
            raise Reject(405, "CONNECT is not supported by a reverse proxy")
        url = self._url
        lines = self._lines
        if url[:1] != b"/":
            url, lines = self._origin_form(method, url, lines)
        if self._host_count > 1 or (self._host_count == 0 and not http10):
            raise Reject(400, "exactly one Host header is required")
        if self._conn_tokens:
            named = {t for t in self._conn_tokens if t not in CONNECTION_OPTIONS}
            if named:
                lines = strip_named_headers(lines, named)
        body_expected = self._chunked or self._content_length > 0
        if server.max_body_bytes and self._content_length > server.max_body_bytes:
            raise Reject(413, f"request body larger than {server.max_body_bytes} bytes")
        expect_continue = False
        if self._expect is not None:
            if self._expect.lower() != b"100-continue":
                raise Reject(417, "only 'Expect: 100-continue' is supported")
            expect_continue = body_expected and not http10
        upgrade = self._upgrade is not None and bool(parser.should_upgrade())
        if upgrade and body_expected:
            raise Reject(400, "an Upgrade request must not carry a body")

        head = [method, b" ", url, b" HTTP/1.1\r\n", *lines]
        if self._host is None:
            head.append(b"Host: localhost\r\n")
        if upgrade:
            head.append(b"Upgrade: %s\r\nConnection: upgrade\r\n" % self._upgrade)
        if self._chunked:
            head.append(b"Transfer-Encoding: chunked\r\n")
        if self.trusted and (self._xff or self._xfp or self._xfh):
            head.append(self._forwarded_from_trusted())
        else:
            head.append(self.forwarded)
            if self._host is not None:
                head += (b"X-Forwarded-Host: ", self._host, CRLF)
        head.append(server.head_end)

        exchange = Exchange(
            self,
            b"".join(head),
            is_head=method == b"HEAD",
            idempotent=method in IDEMPOTENT_METHODS,
            chunked=self._chunked,
            body_expected=body_expected,
            # After an Upgrade request the parser is spent: one exchange, then close.
            keep_alive=bool(parser.should_keep_alive()) and not upgrade and not server.stopping,
            http10=http10,
            upgrade=upgrade,
        )
        exchange.expect_continue = expect_continue
        if (
            body_expected
            and exchange.idempotent
            and not self._chunked
            and self._content_length <= server.retry_max_body
        ):
            exchange.kept_body = []  # small enough to keep for a retry
        table = server.table
        overrides = table.overrides
        if overrides is not None:
            # Decided now: the head's facts are gone by the time a pipelined request starts.
            exchange.color = overrides.decide(
                self._host, url, self._cookie, self._captured, self._sticky, self.peer_ip
            )
        steering = table.steering
        if steering.active and exchange.color is None:
            exchange.bucket, exchange.set_cookie = steering.bucket(self, self._cookie, self._sticky)
        self.receiving = exchange
        if self.active is None:
            self._start(exchange)
        else:
            self.queue.append(exchange)
            if len(self.queue) >= MAX_PIPELINE:
                self.gate.pause(PIPELINE_FULL)

    def _capture(self, kind: int, value: bytes) -> None:
        captured = self._captured
        if captured is None:
            self._captured = {kind: value}
        elif kind in captured:  # a repeated field is one comma-separated list (RFC 9110 5.3)
            captured[kind] += b", " + value
        else:
            captured[kind] = value

    def _forwarded_from_trusted(self) -> bytes:
        """X-Forwarded-* from a trusted proxy: append our peer to its chain, keep the rest."""
        chain = self.peer_ip if self._xff is None else self._xff + b", " + self.peer_ip
        proto = self._xfp or self.server.scheme
        host = self._xfh or self._host
        lines = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (chain, proto)
        return lines if host is None else lines + b"X-Forwarded-Host: %s\r\n" % host

    def _origin_form(
        self, method: bytes, url: bytes, lines: list[bytes]
    ) -> tuple[bytes, list[bytes]]:
        """Accept "*" for OPTIONS and absolute-form targets (RFC 9112 3.2); refuse the rest."""
        if url == b"*" and method == b"OPTIONS":
            return url, lines
        scheme, sep, rest = url.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            raise Reject(400, "invalid request target")
        authority, slash, path = rest.partition(b"/")
        if not authority:
            raise Reject(400, "invalid request target")
        # The target's authority replaces any Host header (RFC 9112 3.2.2).
        lines = strip_named_headers(lines, {b"host"})
        lines.extend((b"Host", SEP, authority, CRLF))
        self._host = authority
        self._host_count = 1
        return b"/" + path if slash else b"/", lines

    def on_body(self, body: bytes) -> None:
        exchange = self.receiving
        assert exchange is not None
        server = self.server
        if server.max_body_bytes:
            self._body_bytes += len(body)
            if self._body_bytes > server.max_body_bytes:
                raise Reject(413, f"request body larger than {server.max_body_bytes} bytes")
        exchange.send_body(body)
        if exchange is self.active:
            self.deadline = server.loop.time() + server.upstream_timeout
        if exchange.pending_bytes > MAX_PENDING_BODY:
            self.gate.pause(BODY_WAITING)

    def on_message_complete(self) -> None:
        exchange = self.receiving
        if exchange is not None:
            self.receiving = None
            exchange.finish_body()

    # -- serving an exchange -----------------------------------------------------------

    def _start(self, exchange: Exchange) -> None:
        self.active = exchange
        server = self.server
        exchange.started = now = server.loop.time()
        server.window_requests += 1
        pool = server.table.pick(exchange.bucket, exchange.color)
        if pool is None:
            self._respond_locally(exchange, 503, "no healthy upstream in the blue or green pool")
            return
        if exchange.expect_continue and not exchange.request_complete:
            self.transport.write(CONTINUE_100)
        self._dispatch(exchange, pool, now)

    def _dispatch(self, exchange: Exchange, pool: UpstreamPool, now: float) -> None:
        """Send the exchange to this upstream: on an idle connection, else a new one."""
        server = self.server
        exchange.pool = pool
        pool.outstanding += 1
        conn = pool.take_idle()
        if conn is not None:
            exchange.reused = True
            self.deadline = now + server.upstream_timeout
            conn.attach(exchange)
            if self.gate.reasons:
                self.gate.resume(BODY_WAITING)
        else:
            self.deadline = now + server.connect_timeout
            pool.connect(exchange)

    def upstream_connected(self, exchange: Exchange, future: asyncio.Future[object]) -> None:
        """Done-callback of UpstreamPool.connect."""
        exchange.connecting = None
        if future.cancelled():
            return
        error = future.exception()
        if self.active is not exchange:  # the client left or timed out meanwhile
            if error is None:
                future.result()[0].close()  # type: ignore[index]
            return
        pool = exchange.pool
        assert pool is not None
        if error is not None:
            pool.outstanding -= 1
            pool.stats.fail(FailureKind.CONNECT)
            if self._retry_elsewhere(exchange, pool, "connect"):  # nothing was sent: safe
                return
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            self._respond_locally(
                exchange, 502, f"cannot connect to upstream {pool.target.id}: {reason}"
            )
            return
        conn: UpstreamConnection = future.result()[1]  # type: ignore[index]
        server = self.server
        self.deadline = server.loop.time() + server.upstream_timeout
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
        if self.closing or self.server.stopping:
            self.transport.close()
            return
        server = self.server
        self.deadline = now + (server.header_timeout if self.in_head else server.idle_timeout)

    def _respond_locally(self, exchange: Exchange, status: int, detail: str) -> None:
        """Answer the active exchange with zdproxy's own error reply."""
        if exchange.response_started:
            self.transport.abort()  # too late for a clean error: cut it visibly
            return
        exchange.response_started = True
        # Unread body bytes would be parsed as the next request: close instead.
        exchange.client_keep_alive = exchange.client_keep_alive and exchange.request_complete
        if not self.transport.is_closing():
            self.transport.write(
                error_response(status, detail, close=not exchange.client_keep_alive)
            )
        self.exchange_done(exchange, self.server.loop.time())

    def _reject(self, status: int, detail: str) -> None:
        """A request we refuse to forward: reply after the responses already owed, then close."""
        reply = error_response(status, detail, close=True)
        self.in_head = False
        self.queue.clear()
        receiving, self.receiving = self.receiving, None
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
        self.deadline = self.server.loop.time() + LINGER_SECONDS

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

    def upstream_lost(self, exchange: Exchange, conn: UpstreamConnection, detail: str) -> None:
        """The upstream closed or reset the connection before the response was complete."""
        pool = exchange.pool
        assert pool is not None
        exchange.upstream = None
        if not exchange.response_started and exchange.replayable:
            if exchange.reused and exchange.attempts == 0:
                # The app closed an idle keep-alive connection just as we reused it:
                # the same request goes out once more, on a fresh connection.
                exchange.rewind()
                server = self.server
                self.deadline = server.loop.time() + server.connect_timeout
                pool.connect(exchange)
                return
            if exchange.idempotent:
                pool.outstanding -= 1
                pool.stats.fail(FailureKind.RESET)
                if self._retry_elsewhere(exchange, pool, "reset"):
                    return
                self._respond_locally(exchange, 502, f"upstream {pool.target.id}: {detail}")
                return
        pool.outstanding -= 1
        pool.stats.fail(FailureKind.RESET)
        self._respond_locally(exchange, 502, f"upstream {pool.target.id}: {detail}")

    def _retry_elsewhere(self, exchange: Exchange, failed: UpstreamPool, kind: str) -> bool:
        """Send a request that got no response byte to the client again: to another
        upstream of the same color, else (a split-routed candidate request) to the live
        pool. Only for failures that leave it safe: nothing was sent (connect), or an
        idempotent request whose whole body is known (reset, status)."""
        server = self.server
        if exchange.attempts >= MAX_RETRIES:
            return False
        table = server.table
        other = table.alternative(failed) if kind != "status" else None
        # A refused connection cost the app nothing: only retries that put load on an
        # upstream (after a reset or a status, or on the other pool) spend the budget.
        budgeted = kind != "connect"
        if other is None and self._may_go_live(exchange, failed):
            other = table.live_pick()
            budgeted = True
        if other is None or (budgeted and not server.retry_allowed()):
            return False
        if kind == "connect":  # nothing was sent: what waits in `pending` goes as it is
            exchange.attempts += 1
            exchange.reused = False
        else:
            exchange.rewind()
        server.window_retries += 1
        server.retries[kind] += 1
        self._dispatch(exchange, other, server.loop.time())
        return True

    def _may_go_live(self, exchange: Exchange, failed: UpstreamPool) -> bool:
        server = self.server
        return (
            server.retry_on_live
            and exchange.color is None  # a pinned or preview request stays where it was sent
            and failed.target.color != server.table.snapshot.live
        )

    def retry_status(self, exchange: Exchange, pool: UpstreamPool, status: int) -> bool:
        """Whether the candidate's `status` answer may be replaced by the live pool's."""
        server = self.server
        return (
            exchange.idempotent
            and exchange.replayable
            and exchange.attempts < MAX_RETRIES
            and self._may_go_live(exchange, pool)
            and server.table.live is not None
        )

    def retry_on_live(self, exchange: Exchange, failed: UpstreamPool) -> None:
        """The candidate answered a retryable status, which the client never saw."""
        if not self._retry_elsewhere(exchange, failed, "status"):
            # The live pool went away meanwhile: nothing to answer with but our own.
            self._respond_locally(exchange, 502, f"upstream {failed.target.id} failed")

    def upstream_failed(
        self, exchange: Exchange, conn: UpstreamConnection, kind: FailureKind, detail: str
    ) -> None:
        pool = exchange.pool
        assert pool is not None
        exchange.upstream = None
        pool.outstanding -= 1
        pool.stats.fail(kind)
        self._respond_locally(exchange, 502, f"upstream {pool.target.id}: {detail}")

    def on_timeout(self) -> None:
        """Called by the server's sweeper once `deadline` has passed."""
        self.deadline = inf
        server = self.server
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
            seconds = server.upstream_timeout
            self._respond_locally(exchange, 504, f"upstream {upstream_id} silent for {seconds:g}s")
        else:
            exchange.client_keep_alive = False
            self._respond_locally(exchange, 408, "request body timed out")

    # -- Upgrade: a byte tunnel after 101 ----------------------------------------------

    def _upgrade_requested(self, rest: bytes) -> None:
        self.upgrade_buffer = [rest] if rest else []

    def start_tunnel(self, upstream: UpstreamConnection, initial: bytes) -> None:
        exchange = self.active
        assert exchange is not None and exchange.pool is not None
        pool = exchange.pool
        pool.outstanding -= 1
        server = self.server
        pool.stats.observe(101, server.loop.time() - exchange.started)
        upstream.tunnel = True
        pool.tunnels.add(upstream)
        exchange.upstream = None
        self.active = None
        self.tunnel_peer = upstream
        if initial:
            self.transport.write(initial)
        buffered, self.upgrade_buffer = self.upgrade_buffer, None
        if buffered:
            upstream.transport.writelines(buffered)
        self.gate.resume(BODY_WAITING)
        self.deadline = server.loop.time() + server.tunnel_idle_timeout

    def tunnel_closed(self) -> None:
        self.tunnel_peer = None
        self.transport.close()
