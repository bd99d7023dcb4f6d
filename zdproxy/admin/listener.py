"""The admin listener: aiohttp's HTTP server behind connection limits, so that slow or
flooding clients cannot lock the operator out. Which connection may stay is decided in
admin/admission.py; here each one's phase is followed and timed:

- a request head must be complete within `header_timeout`, counted from the accept
  for a connection's first request and from the first byte for a later one; past it,
  or when a newer connection displaces it, the client gets 408 and the connection
  closes;
- an idle connection closes after `idle_timeout`, or at once when displaced;
- a body the answer did not need (a refused call) is read and dropped for up to
  DISCARD_SECONDS, so that the client reads the answer instead of a reset;
- a connection refused because every slot is busy gets 503.

aiohttp bounds the head's size (a request line or header field over MAX_LINE bytes:
431; more than MAX_HEADERS fields: 400) and answers malformed requests; both answers
are problem+json here too (`AdminConnection.handle_error`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from zdproxy.admin.admission import Admission, Eviction, Limit, Phase
from zdproxy.admin.app import PROBLEM_JSON, problem
from zdproxy.admin.inputs import printable
from zdproxy.admin.models import Problem
from zdproxy.config.units import Address

log = logging.getLogger("zdproxy.admin")

BACKLOG = 128  # as aiohttp's sites: a socket passed by systemd gets it too
SHUTDOWN_SECONDS = 2.0  # calls still running at stop (a drain with wait): a short grace
DISCARD_SECONDS = 5.0  # reading a body nobody needs, at most
MAX_LINE = 8190  # bytes of the request line, and of each header field (name and value)
MAX_HEADERS = 128
REPORT_SECONDS = 60.0  # closes forced by the limits are logged at most this often


@dataclass(frozen=True)
class ListenerLimits:
    """The admin.* settings of the same names (config/service.py), read at start."""

    header_timeout: float
    idle_timeout: float
    max_connections: int
    max_pending_heads: int


def _answer(status: int, detail: str) -> bytes:
    """A whole problem+json response that closes the connection, for the clients the
    listener turns away itself (aiohttp has no request to answer then)."""
    phrase = HTTPStatus(status).phrase
    body = Problem(title=phrase, status=status, detail=detail).model_dump_json().encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {PROBLEM_JSON}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Context:
    """What the connections of one listener share."""

    def __init__(self, limits: ListenerLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.loop = loop
        self.admission: Admission[AdminConnection] = Admission(
            limits.max_connections, limits.max_pending_heads
        )
        self.answers = {
            Limit.HEADER_TIMEOUT: _answer(
                408,
                f"no complete request head within admin.header_timeout "
                f"({limits.header_timeout:g}s)",
            ),
            Limit.MAX_PENDING_HEADS: _answer(
                408,
                f"more than admin.max_pending_heads ({limits.max_pending_heads}) "
                "connections without a complete request head: the oldest is closed",
            ),
            Limit.MAX_CONNECTIONS: _answer(
                408,
                f"admin.max_connections ({limits.max_connections}) reached: the oldest "
                "connection without a complete request head is closed",
            ),
        }
        self.refusal = _answer(
            503,
            f"admin.max_connections ({limits.max_connections}) reached, every one "
            "answering a request: try again later",
        )
        self._forced: Counter[Limit] = Counter()
        self._report_at = 0.0

    def forced(self, limit: Limit) -> None:
        """Count a close the limits forced; say so in the log now and then: a client
        that is slow or floods the listener is worth knowing about."""
        self._forced[limit] += 1
        now = self.loop.time()
        if now >= self._report_at:
            counts = ", ".join(f"{n} by admin.{why.value}" for why, n in self._forced.items())
            log.warning("admin: closed connections: %s (slow or flooding clients?)", counts)
            self._forced.clear()
            self._report_at = now + REPORT_SECONDS


class AdminConnection(web.RequestHandler):
    """aiohttp's protocol for one connection, with its phase kept in the listener's
    Admission and one timer: the header timeout in HEAD, the idle timeout in IDLE."""

    def __init__(self, manager: web.Server, context: _Context, **options: Any) -> None:
        super().__init__(manager, loop=context.loop, **options)
        self._context = context
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        context = self._context
        verdict = context.admission.admit(self)
        if not verdict.admitted:
            context.forced(Limit.MAX_CONNECTIONS)
            self._shut(context.refusal)
            return
        if verdict.evict is not None:
            verdict.evict.conn.evicted(verdict.evict)
        self._arm(context.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if data and self._context.admission.phase(self) is Phase.IDLE:
            self._enter(Phase.HEAD)  # the first byte of the next request
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._context.admission.remove(self)
        self._disarm()
        super().connection_lost(exc)

    # -- aiohttp's hooks -----------------------------------------------------------------

    def head_received(self) -> None:
        """The app began to answer a request (its head is complete)."""
        self._enter(Phase.BUSY)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            # Raised before the app's middlewares ran (an unknown Expect: 417).
            resp = problem(resp.status, resp.text or resp.reason)
        sent = await super().finish_response(request, resp, start_time)
        if not request.content.is_eof():
            self._enter(Phase.DISCARDING)
        # Idle once the body is in too: until then, what arrives is that body, not a head.
        request.content.on_eof(self._answered)
        return sent

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request aiohttp could not parse (or, never expected here, to
        an error that escaped the app's middlewares): problem+json, then close."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun: no error response can follow")
        if isinstance(exc, HttpProcessingError):
            status, detail = _malformed(exc)
            log.debug("admin: %s from %s: %s", status, request.remote, printable(detail))
        elif status >= 500 and exc is not None:
            log.error("admin: unexpected error", exc_info=exc)
            detail = "internal error; see zdproxy's log"
        else:
            detail = HTTPStatus(status).description
        response = problem(status, detail)
        response.force_close()
        return response

    # -- phases ------------------------------------------------------------------------

    def evicted(self, eviction: Eviction[AdminConnection]) -> None:
        """Closed to make room for a newer connection."""
        self._context.forced(eviction.limit)
        self._shut(self._context.answers[eviction.limit] if eviction.phase is Phase.HEAD else b"")

    def _enter(self, phase: Phase) -> None:
        context = self._context
        if context.admission.phase(self) is None:
            return  # closed: nothing to time any more
        if (evict := context.admission.move(self, phase)) is not None:
            evict.conn.evicted(evict)
        if phase is Phase.HEAD:
            self._arm(context.limits.header_timeout)
        elif phase is Phase.IDLE:
            self._arm(context.limits.idle_timeout)
        else:
            self._disarm()

    def _answered(self) -> None:
        self._enter(Phase.IDLE)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self._context.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        context = self._context
        phase = context.admission.phase(self)
        if phase is Phase.HEAD:
            context.forced(Limit.HEADER_TIMEOUT)
            self._shut(context.answers[Limit.HEADER_TIMEOUT])
        elif phase is Phase.IDLE:
            self._shut(b"")

    def _shut(self, answer: bytes) -> None:
        """Close with `answer` (or none); a client that does not read is cut at once, so
        that its unread bytes do not keep the socket open."""
        self._context.admission.remove(self)
        self._disarm()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if answer:
                transport.write(answer)
            if transport.get_write_buffer_size():
                transport.abort()
        self.force_close()


def _malformed(exc: HttpProcessingError) -> tuple[int, str]:
    """The status and detail for a request aiohttp could not parse. Its message quotes the
    bytes at fault, which may be a secret (a header's value): only the reason is kept."""
    if isinstance(exc, LineTooLong):
        return 431, (
            f"request head too large: the request line and each header field are limited "
            f"to {MAX_LINE} bytes"
        )
    reason = exc.message.split("\n", 1)[0].partition(":")[0].strip().rstrip(".")
    return 400, f"malformed request: {reason or 'not HTTP/1.1'}"


@web.middleware
async def _head_received(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if isinstance(request.protocol, AdminConnection):
        request.protocol.head_received()
    return await handler(request)


def reachable_from_other_hosts(sock: socket.socket) -> str | None:
    """The address of a listening socket that other hosts can connect to, or None for a
    loopback address or a unix socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    host, port = sock.getsockname()[:2]
    address = Address(host=host, port=port)
    return None if address.is_loopback else str(address)


class AdminListener:
    """Serves the app on the admin listener's socket, within `limits`."""

    def __init__(self, app: web.Application, limits: ListenerLimits) -> None:
        # Outermost, so that it sees every request the app answers: the end of its head.
        app.middlewares.insert(0, _head_received)
        self._limits = limits
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_SECONDS
        )
        self._server: asyncio.AbstractServer | None = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on a listening socket (bound by the daemon, or inherited)."""
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        context = _Context(self._limits, loop)
        limits = self._limits
        options: dict[str, Any] = {
            "access_log": None,
            # A backstop only: the listener's own timers close idle and slow connections
            # first (aiohttp's would also cut a head begun late in an idle period).
            "keepalive_timeout": limits.idle_timeout + limits.header_timeout,
            "lingering_time": DISCARD_SECONDS,
            "max_line_size": MAX_LINE,
            "max_field_size": MAX_LINE,
            "max_headers": MAX_HEADERS,
        }
        self._server = await loop.create_server(
            lambda: AdminConnection(server, context, **options), sock=sock, backlog=BACKLOG
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._runner.cleanup()
