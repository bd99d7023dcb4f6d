"""The client side: one protocol instance per client connection.

It parses requests with httptools, rewrites their heads for the upstream, and
hands each one, as an Exchange, to the serving half (serving.py), once the read
that completed its head is parsed whole (framing.py checks what httptools does
not). Requests are answered strictly in the order they arrived (pipelining); a bad
request is answered with a 4xx after the responses already owed, and the
connection closes because its framing is in doubt.
"""

from __future__ import annotations

import asyncio
from collections import deque
from math import inf

import httptools

from zdproxy.dataplane.body import UpgradeBody
from zdproxy.dataplane.context import Context
from zdproxy.dataplane.exchange import Exchange, UpstreamSide
from zdproxy.dataplane.flow import BODY_WAITING, PIPELINE_FULL, ReadGate
from zdproxy.dataplane.framing import MAX_PENDING_BODY, RequestFraming
from zdproxy.dataplane.http import (
    CONNECTION_OPTIONS,
    CRLF,
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_COOKIE,
    H_EXPECT,
    H_HOST,
    H_IDEMPOTENCY_KEY,
    H_PREVIEW,
    H_PROXY_AUTHORIZATION,
    H_REQUEST_ID,
    H_STICKY,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    H_X_FORWARDED_FOR,
    H_X_FORWARDED_HOST,
    H_X_FORWARDED_PROTO,
    PLAIN_CONNECTION_VALUES,
    SEP,
    Reject,
    connection_tokens,
    origin_form,
    strip_named_headers,
)
from zdproxy.dataplane.serving import MAX_PIPELINE
from zdproxy.dataplane.validate import CR, LINE_DONE, line_spaces, line_start
from zdproxy.routing.records import FailureKind


class ClientConnection(RequestFraming, asyncio.Protocol):
    __slots__ = (
        "_captured",
        "_conn_tokens",
        "_cookie",
        "_expect",
        "_head_bytes",
        "_head_raw",
        "_host",
        "_host_count",
        "_idempotency_key",
        "_lines",
        "_sticky",
        "_upgrade",
        "_url",
        "_xff",
        "_xfh",
        "_xfp",
        "forwarded",
        "parser",
        "peer_ip",
        "scheme",
        "trusted",
    )

    def __init__(self, ctx: Context, scheme: bytes) -> None:
        self.ctx = ctx
        self.scheme = scheme  # what the listener speaks, for X-Forwarded-Proto
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
        self.tunnel_peer: UpstreamSide | None = None
        self.upgrade_buffer: list[bytes] | None = None
        self._head_bytes = 0  # parsed head bytes (request target aside)
        self._head_raw = 0  # raw bytes of reads that fell wholly inside the head
        self._body_bytes = 0
        self._read: bytes | None = None
        self._line_at = 0
        self._line_spaces = LINE_DONE
        self._unsent: Exchange | None = None
        self._chunk_from = -1
        self._upgrade_body: UpgradeBody | None = None
        self._valid_host: bytes | None = None

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gate = ReadGate(self.transport)
        ctx = self.ctx
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip = peer[0].encode()
            self.trusted = ctx.limits.trusts(self.peer_ip)
        else:  # a unix socket: the client is on this host
            self.peer_ip = b"127.0.0.1"
            self.trusted = True
        self.forwarded = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (
            self.peer_ip,
            self.scheme,
        )
        ctx.opened(self)
        self.deadline = ctx.loop.time() + ctx.limits.header_timeout

    def data_received(self, data: bytes) -> None:
        peer = self.tunnel_peer
        if peer is not None:
            peer.transport.write(data)
            ctx = self.ctx
            self.deadline = ctx.loop.time() + ctx.limits.tunnel_idle_timeout
            return
        if self.owed_reply is not None:
            return  # the request stream is broken or answered for good: discarded
        if self.upgrade_buffer is not None:  # after an Upgrade request's head
            if self._upgrade_body is None:  # bytes for the tunnel, before the 101 arrived
                self.upgrade_buffer.append(data)
                self.gate.pause(BODY_WAITING)
            else:
                self._upgrade_body_received(data)
            return
        head_continues = self.in_head
        if head_continues:
            if not self._head_goes_on(data):
                return
        elif self.receiving is None:  # between requests: a request line starts this read
            self._read = data
            self._line_at = 0
        else:  # a body goes on: where it ends in this read is not known here
            self._read = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_requested(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._malformed(exc)
        else:
            if head_continues and self.in_head:
                # Every byte of this read belongs to an unfinished head. httptools holds a
                # header line until its end, so bound that here, not only in on_header.
                self._head_raw += len(data)
                if self._head_raw > self.ctx.limits.max_header_bytes:
                    self._reject(431, "request header fields too large")
            elif self._chunk_from >= 0:
                self._chunk_declared(data)
        unsent = self._unsent
        if unsent is not None:
            self._unsent = None
            if unsent is self.active:  # not refused meanwhile
                self._start(unsent)

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
        self.ctx.closed(self)
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

    # -- httptools callbacks: parsing one request --------------------------------------

    def on_message_begin(self) -> None:
        if self._line_at < 0 and self._read is not None:
            self._next_line()  # pipelined behind a request of this read
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
        self._idempotency_key = False
        self._captured: dict[int, bytes] | None = None  # headers pins and preview read
        if self.trusted:  # only a trusted peer's X-Forwarded-* are ever read
            self._xff: bytes | None = None
            self._xfp: bytes | None = None
            self._xfh: bytes | None = None
        if self.active is None:
            ctx = self.ctx
            self.deadline = ctx.loop.time() + ctx.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.ctx.limits.max_header_bytes:
            raise Reject(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        ctx = self.ctx
        if self._head_bytes > ctx.limits.max_header_bytes:
            raise Reject(431, "request header fields too large")
        if not self.in_head:  # a trailer field of a chunked body
            exchange = self.receiving
            if exchange is not None:
                if exchange.trailers is None:
                    exchange.trailers = []
                exchange.trailers.extend((name, SEP, value, CRLF))
            return
        kind = ctx.request_headers.get(name.lower())
        if kind is None:
            self._lines.extend((name, SEP, value, CRLF))
        elif kind == H_HOST:
            if value != self._valid_host:  # most requests repeat the last one's Host
                self._check_host(value)
            self._host = value
            self._host_count += 1
            self._lines.extend((name, SEP, value, CRLF))
        elif kind == H_CONTENT_LENGTH:
            self._content_length = int(value)  # llhttp has checked it is all digits
            self._lines.extend((name, SEP, value, CRLF))
        elif kind == H_COOKIE:
            self._cookie = value if self._cookie is None else self._cookie + b"; " + value
            self._lines.extend((name, SEP, value, CRLF))
        elif kind == H_IDEMPOTENCY_KEY:
            self._idempotency_key = True
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
        elif kind == H_PROXY_AUTHORIZATION:
            if ctx.limits.forward_proxy_authorization:
                self._lines.extend((name, SEP, value, CRLF))
        elif kind == H_REQUEST_ID:
            if ctx.limits.request_ids is None:
                self._lines.extend((name, SEP, value, CRLF))
            else:
                self._capture(kind, value)  # a repeated one becomes a list: not usable
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
        ctx = self.ctx
        limits = ctx.limits
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise Reject(505, f"HTTP/{version} is not supported")
        http10 = version == "1.0"
        method: bytes = parser.get_method()
        url = self._url
        data = self._read
        at = self._line_at
        if data is not None and at >= 0:  # its line is in this read (which: validate.py)
            # llhttp has checked the parts, but allows more than the one SP between them of
            # `method SP target SP HTTP/x.y CRLF`. A well-formed line has its CR where those
            # lengths put it; a longer one has only SPs or parts there (no CR in a line),
            # and a shorter one, HTTP/0.9's `method SP target`, got its 505 above.
            if data[at + len(method) + len(url) + 10] != CR:
                # Rare: empty lines before it (RFC 9112 2.2 ignores them), or a bad line.
                at = line_start(data, at)
                line_spaces(data, at, 0)  # whole in data: raises or is done
            self._line_at = ~at  # checked; a request pipelined behind it starts after it
        if method == b"CONNECT":
            raise Reject(405, "CONNECT is not supported by a reverse proxy")
        if self._host_count > 1 or (self._host_count == 0 and not http10):
            raise Reject(400, "exactly one Host header is required")  # RFC 9112 3.2
        lines = self._lines
        if url[:1] != b"/":
            url, lines, authority = origin_form(method, url, lines)
            if authority is not None:  # now the only Host header
                self._check_host(authority)
                self._host = authority
        if self._conn_tokens:
            named = {t for t in self._conn_tokens if t not in CONNECTION_OPTIONS}
            if named:
                lines = strip_named_headers(lines, named)
        body_expected = self._chunked or self._content_length > 0
        if limits.max_body_bytes and self._content_length > limits.max_body_bytes:
            raise Reject(413, f"request body larger than {limits.max_body_bytes} bytes")
        expect_continue = False
        if self._expect is not None:
            if self._expect.lower() != b"100-continue":
                raise Reject(417, "only 'Expect: 100-continue' is supported")
            expect_continue = body_expected and not http10
        upgrade = self._upgrade is not None and bool(parser.should_upgrade())

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
        if (ids := limits.request_ids) is not None:
            head += (b"X-Request-Id: ", ids.take(self._captured), CRLF)
        head.append(limits.head_end)

        exchange = Exchange(
            self,
            b"".join(head),
            is_head=method == b"HEAD",
            method=method,
            # An Upgrade request's body goes as the client framed it (see _upgrade_requested).
            chunked=self._chunked and not upgrade,
            body_expected=body_expected,
            # After an Upgrade request the parser is spent: one exchange, then close.
            keep_alive=bool(parser.should_keep_alive()) and not upgrade and not ctx.stopping,
            http10=http10,
            upgrade=upgrade,
        )
        exchange.expect_continue = expect_continue
        if self._idempotency_key:
            exchange.idempotency_key = True
        if (
            body_expected
            and exchange.idempotent
            and not self._chunked
            and not upgrade
            and self._content_length <= limits.retry_max_body
        ):
            exchange.kept_body = []  # small enough to keep for a retry
        router = ctx.table.router
        if router.active:
            # Decided now: the head's facts are gone by the time a pipelined request starts.
            exchange.route = router.decide(
                self._host, url, self._cookie, self._captured, self._sticky, self.peer_ip
            )
        if upgrade and body_expected:
            # httptools ends the message here and calls the rest a tunnel: the body is
            # found in it by an UpgradeBody, and the exchange receives it from there.
            self._upgrade_body = UpgradeBody(
                chunked=self._chunked,
                length=self._content_length,
                limit=limits.max_body_bytes,
            )
        else:
            self.receiving = exchange
        if self.active is None:
            self.active = self._unsent = exchange  # dispatched when the read is parsed
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
        proto = self._xfp or self.scheme
        host = self._xfh or self._host
        lines = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (chain, proto)
        return lines if host is None else lines + b"X-Forwarded-Host: %s\r\n" % host

    def on_body(self, body: bytes) -> None:
        exchange = self.receiving
        assert exchange is not None
        ctx = self.ctx
        limits = ctx.limits
        if limits.max_body_bytes:
            self._body_bytes += len(body)
            if self._body_bytes > limits.max_body_bytes:
                raise Reject(413, f"request body larger than {limits.max_body_bytes} bytes")
        exchange.send_body(body)
        if exchange is self.active:
            self.deadline = ctx.loop.time() + limits.upstream_timeout
        if exchange.pending_bytes > MAX_PENDING_BODY:
            self.gate.pause(BODY_WAITING)

    def on_message_complete(self) -> None:
        exchange = self.receiving
        if exchange is not None:
            self.receiving = None
            exchange.finish_body()
