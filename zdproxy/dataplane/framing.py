"""Framing of the request stream beyond what httptools checks: a mixin of the client
connection (client.py), between its parsing and the serving half (serving.py).

- The request line's single SPs (validate.py), for a line that spans reads and for a
  request pipelined behind another in the same read: httptools tells no byte offsets,
  so the read a request line is in and where it starts are tracked here.
- A chunk declared beyond `max_body_bytes` is refused when its size line arrives.
- The body of an Upgrade request, which httptools leaves in the tunnel's bytes.
- The 4xx for a request stream httptools refused.
"""

from __future__ import annotations

import logging

import httptools

from zdproxy.dataplane.body import UpgradeBody, declared_chunk
from zdproxy.dataplane.exchange import Exchange
from zdproxy.dataplane.flow import BODY_WAITING
from zdproxy.dataplane.http import Reject
from zdproxy.dataplane.serving import ExchangeDriver
from zdproxy.dataplane.validate import LINE_DONE, line_spaces, line_start, valid_host

log = logging.getLogger("zdproxy.client")

MAX_PENDING_BODY = 256 * 1024  # body bytes buffered while no upstream is attached


class RequestFraming(ExchangeDriver):
    """Mixin of ClientConnection: these slots are its state, set in its __init__."""

    __slots__ = (
        "_body_bytes",
        "_chunk_from",
        "_chunked",
        "_content_length",
        "_line_at",
        "_line_spaces",
        "_read",
        "_unsent",
        "_upgrade_body",
        "_valid_host",
    )

    _body_bytes: int  # body bytes of the request being received, if max_body_bytes is set
    _chunked: bool  # of the request being parsed
    _content_length: int  # of the request being parsed
    # The request line check: the read the next request line is in, and where in it
    # (~offset once that line is checked); the SPs so far of one that spans reads.
    _read: bytes | None
    _line_at: int
    _line_spaces: int
    # A request whose head this read completed: dispatched once the whole read is
    # parsed, so that a framing error in the bytes after its head reaches no app.
    _unsent: Exchange | None
    # The data of a chunk whose size line this read holds starts after this many body
    # bytes (-1: no such chunk is open); checked against max_body_bytes.
    _chunk_from: int
    _upgrade_body: UpgradeBody | None  # an Upgrade request's body, arriving
    _valid_host: bytes | None  # the last Host found valid on this connection

    def _check_host(self, value: bytes) -> None:
        if not valid_host(value):
            raise Reject(400, "invalid Host: a host name or an IP literal, then an optional :port")
        self._valid_host = value

    def _malformed(self, exc: httptools.HttpParserError) -> None:
        """The parser refused the request stream: the 4xx that says why."""
        if isinstance(exc, httptools.HttpParserCallbackError):
            cause = exc.__context__
            if isinstance(cause, Reject):
                self._reject(cause.status, cause.detail)
            else:
                log.error("bug while parsing a request", exc_info=cause)
                self._reject(500, "internal proxy error")
        elif isinstance(exc, httptools.HttpParserInvalidMethodError):
            self._reject(400, "invalid request method")
        elif isinstance(exc, httptools.HttpParserInvalidURLError):
            self._reject(400, "invalid request target")
        else:
            self._reject(400, f"malformed request: {exc}")

    def _chunk_declared(self, data: bytes) -> None:
        """A chunk's size line arrived in this read and its data goes on past it: refuse
        at once a size beyond max_body_bytes, rather than wait for the data."""
        seen = self._body_bytes - self._chunk_from  # its data in this read
        self._chunk_from = -1
        size = declared_chunk(data, len(data) - seen)
        limit = self.ctx.limits.max_body_bytes
        if self._body_bytes - seen + size > limit:
            self._reject(413, f"request body larger than {limit} bytes")

    def _head_goes_on(self, data: bytes) -> bool:
        """This read goes on with a head begun in an earlier one (rare: most heads fit in
        one read). Check its request line as far as the reads hold it, as the check in
        on_headers_complete needs it whole in one read. False once it is refused."""
        try:
            before, self._read = self._read, None
            if before is not None:  # the line began in the read before this one
                at = self._line_at
                self._line_spaces = line_spaces(before, line_start(before, at), 0)
            if self._line_spaces != LINE_DONE:
                self._line_spaces = line_spaces(data, 0, self._line_spaces)
        except Reject as exc:
            self._reject(exc.status, exc.detail)
            return False
        return True

    def _next_line(self) -> None:
        """Where this read's next request line starts: after the head of the request
        checked before it (a head holds no empty line) and its Content-Length body.
        Behind a chunked body it is not known: that request goes unchecked (rare)."""
        data = self._read
        assert data is not None
        if self._chunked:
            self._read = None
            return
        self._line_at = data.find(b"\r\n\r\n", ~self._line_at) + 4 + self._content_length

    def on_chunk_header(self) -> None:
        if self.ctx.limits.max_body_bytes:
            self._chunk_from = self._body_bytes

    def on_chunk_complete(self) -> None:
        self._chunk_from = -1

    # -- an Upgrade request's body -----------------------------------------------------

    def _upgrade_requested(self, rest: bytes) -> None:
        self.upgrade_buffer = []
        if self._upgrade_body is not None:
            # The parser stopped at this request: it is the newest exchange.
            self.receiving = self.queue[-1] if self.queue else self.active
            self._upgrade_body_received(rest)
        elif rest:
            self.upgrade_buffer.append(rest)

    def _upgrade_body_received(self, data: bytes) -> None:
        """Bytes after an Upgrade request's head while its body goes on: the body is
        forwarded as sent, what follows it waits for the tunnel."""
        reader = self._upgrade_body
        exchange = self.receiving
        assert reader is not None and exchange is not None
        try:
            end = reader.split(data)
        except httptools.HttpParserError as exc:
            # What follows is discarded, as after any refusal: no body, no tunnel.
            self._upgrade_body = self.upgrade_buffer = None
            self._malformed(exc)
            return
        if end:
            exchange.send_body(data[:end] if end < len(data) else data)
            if exchange is self.active:
                ctx = self.ctx
                self.deadline = ctx.loop.time() + ctx.limits.upstream_timeout
            if exchange.pending_bytes > MAX_PENDING_BODY:
                self.gate.pause(BODY_WAITING)
        if reader.done:
            self._upgrade_body = None
            self.receiving = None
            exchange.finish_body()
            if end < len(data):
                assert self.upgrade_buffer is not None
                self.upgrade_buffer.append(data[end:])
                self.gate.pause(BODY_WAITING)
