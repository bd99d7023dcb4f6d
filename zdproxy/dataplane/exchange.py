"""One request/response exchange: the state both protocols share while a request is
served, and the Protocols through which the two sides talk.

The client side (client.py, serving.py) and the upstream side (upstream.py) never
import each other: each sees the other only as described here, so either can be
replaced, or driven by a fake in a test.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from zdproxy.dataplane.body import last_chunk
from zdproxy.dataplane.flow import ReadGate
from zdproxy.dataplane.http import CRLF, IDEMPOTENT_METHODS, LAST_CHUNK
from zdproxy.dataplane.route import SPLIT, Route
from zdproxy.routing.records import FailureKind, UpstreamStats
from zdproxy.routing.snapshot import UpstreamTarget


class UpstreamSide(Protocol):
    """One connection to an app server, as the client side sees it."""

    transport: asyncio.Transport
    exchange: Exchange | None

    def attach(self, exchange: Exchange) -> None:
        """Send the exchange's request on this connection and start answering it."""
        ...


class PoolSide(Protocol):
    """One app server's pool of connections, as the client side and the balancer see it."""

    outstanding: int  # requests in flight

    @property
    def target(self) -> UpstreamTarget: ...

    @property
    def stats(self) -> UpstreamStats: ...

    def take_idle(self) -> UpstreamSide | None: ...

    def connect(self, exchange: Exchange) -> None:
        """Open a connection; the outcome comes back as ClientSide.upstream_connected."""
        ...


class ClientSide(Protocol):
    """A client connection, as the upstream side sees it: where the response goes and
    whom to call back. The upstream side reads it only while it serves an exchange."""

    transport: asyncio.Transport
    gate: ReadGate
    deadline: float
    writing_paused: bool
    peer_ip: bytes

    def upstream_connected(self, exchange: Exchange, future: asyncio.Future[object]) -> None: ...

    def exchange_done(self, exchange: Exchange, now: float) -> None: ...

    def upstream_lost(self, exchange: Exchange, detail: str) -> None: ...

    def upstream_failed(self, exchange: Exchange, kind: FailureKind, detail: str) -> None: ...

    def retry_status(self, exchange: Exchange, pool: PoolSide, status: int) -> bool: ...

    def retry_on_live(self, exchange: Exchange, failed: PoolSide) -> None: ...

    def start_tunnel(self, upstream: UpstreamSide, initial: bytes) -> None: ...

    def tunnel_closed(self) -> None: ...


class Exchange:
    """A parsed request on its way to an upstream, and the facts needed to answer it.

    The client connection creates it when a request head is complete; an upstream
    connection attaches to it, writes the head and the body, and answers the client.
    Body bytes that arrive before an upstream is attached wait in `pending`.
    """

    __slots__ = (
        "attempts",
        "body_expected",
        "chunked",
        "client",
        "client_keep_alive",
        "connecting",
        "declined",
        "expect_continue",
        "head",
        "http10",
        "idempotency_key",
        "is_head",
        "kept_body",
        "method",
        "pending",
        "pending_bytes",
        "pool",
        "request_complete",
        "response_started",
        "reused",
        "route",
        "started",
        "trailers",
        "upgrade",
        "upstream",
    )

    def __init__(
        self,
        client: ClientSide,
        head: bytes,
        *,
        is_head: bool,
        method: bytes,
        chunked: bool,
        body_expected: bool,
        keep_alive: bool,
        http10: bool,
        upgrade: bool,
    ) -> None:
        self.client = client
        self.head = head
        self.is_head = is_head
        self.method = method
        self.idempotency_key = False  # the client sent one: any method may be sent again
        self.chunked = chunked
        self.body_expected = body_expected
        self.client_keep_alive = keep_alive
        self.http10 = http10
        self.upgrade = upgrade
        self.expect_continue = False
        self.route: Route = SPLIT  # decided with the head, unless the split is all one way
        self.started = 0.0  # set when it is dispatched to an upstream
        self.request_complete = False
        self.response_started = False
        self.reused = False
        self.attempts = 0
        self.pool: PoolSide | None = None
        self.upstream: UpstreamSide | None = None
        self.connecting: asyncio.Future[object] | None = None
        self.pending: list[bytes] | None = None
        # A copy of a small body of an idempotent request, so that it can be sent again.
        self.kept_body: list[bytes] | None = None
        self.pending_bytes = 0
        self.trailers: list[bytes] | None = None  # a chunked body's trailer fields, flat
        # The upstream refused the request before its body was whole: the rest of the
        # body is not forwarded (RFC 9110 15.5, RFC 9112 9.6).
        self.declined = False

    def send_body(self, data: bytes) -> None:
        """Forward request body bytes (already de-chunked by the parser) to the upstream."""
        if self.declined:
            return
        framed = [b"%x\r\n" % len(data), data, CRLF] if self.chunked else [data]
        if self.kept_body is not None:
            self.kept_body.extend(framed)
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.writelines(framed)
            return
        if self.pending is None:
            self.pending = []
        self.pending.extend(framed)
        self.pending_bytes += len(data)

    def finish_body(self) -> None:
        """The client's request message is complete."""
        self.request_complete = True
        if self.chunked and not self.declined:
            last = last_chunk(self.trailers) if self.trailers else LAST_CHUNK
            if self.upstream is not None:
                self.upstream.transport.write(last)
            else:
                if self.pending is None:
                    self.pending = []
                self.pending.append(last)

    def decline(self) -> None:
        """The upstream's final answer came before the whole request body and refuses
        the request: what is left of the body stays here, and the request cannot be
        sent again."""
        self.declined = True
        self.kept_body = None
        self.pending = None
        self.pending_bytes = 0

    @property
    def idempotent(self) -> bool:
        """May be sent again after a failure (asked only on failure paths)."""
        return self.idempotency_key or self.method in IDEMPOTENT_METHODS

    @property
    def replayable(self) -> bool:
        """The whole request is known and can be sent again."""
        return self.request_complete and (not self.body_expected or self.kept_body is not None)

    def rewind(self) -> None:
        """Prepare to send the request again: the head, then the kept body."""
        self.pending = list(self.kept_body) if self.kept_body else None
        self.pending_bytes = 0
        self.reused = False
        self.attempts += 1
