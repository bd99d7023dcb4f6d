"""Keep-alive users that know their connections: sticky_users.py's traffic on a raw client.

The users behave as sticky_users.py's do (a cookie jar each, so zdproxy's bucket cookie
keeps each on one color; 70% GET and 30% POST with a 64-512 byte body; paced at
`rate / count` requests per second each; a user waits for its answer before the next
request), but speak HTTP/1.1 over asyncio streams themselves, so that every exchange
names the TCP connection it went over (the client's local port, which the proxy sees
as the peer's port) and says whether any byte of the answer had arrived when it
failed: what a worker's kill does to a client depends on both, and aiohttp hides them.

Like a browser or aiohttp, a user does not send on a connection whose end it has
already seen (the peer's FIN arrived while idle): it opens a new one. A failed exchange
closes its connection; the next request opens another. Nothing is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass

CLIENT_TIMEOUT = 15.0  # seconds; past it the user gives up: an error
POST_SHARE = 0.3
TRANSPORT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


@dataclass(frozen=True)
class Exchange:
    """One request as a user saw it."""

    user: int
    port: int  # local port of the connection; 0 if it never connected
    reused: bool  # sent on a connection that had carried answers before
    sent: float  # Unix time
    done: float
    method: str
    status: int | None  # None: a transport error or the client's timeout
    error: str  # "" for a 2xx; else the status or the exception's name
    first_byte: bool  # some of the answer had arrived (always True with a status)

    @property
    def failed(self) -> bool:
        return bool(self.error)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.port = int(writer.get_extra_info("sockname")[1])

    @property
    def ended(self) -> bool:
        """The peer closed it (seen while idle), or we did."""
        return self.reader.at_eof() or self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class _Reply:
    """What came back: the status, the framing, the cookies; `first_byte` as it reads."""

    def __init__(self) -> None:
        self.first_byte = False
        self.status: int | None = None
        self.close = False
        self.cookies: dict[str, str] = {}

    async def read(self, reader: asyncio.StreamReader) -> None:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.IncompleteReadError as exc:
            self.first_byte = bool(exc.partial)
            raise
        self.first_byte = True
        self.status = int(line.split(b" ", 2)[1])
        length, chunked = 0, False
        while (header := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = header.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = value.lower().endswith("chunked")
            elif name == "connection":
                self.close = value.lower() == "close"
            elif name == "set-cookie":
                key, _, rest = value.partition("=")
                self.cookies[key.strip()] = rest.split(";", 1)[0]
        if not chunked:
            await reader.readexactly(length)
            return
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass


def request(
    method: str, target: str, host: str, cookies: dict[str, str], body: bytes = b""
) -> bytes:
    head = [f"{method} {target} HTTP/1.1", f"Host: {host}", "User-Agent: zdproxy-bench-user"]
    if cookies:
        head.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in cookies.items()))
    if method == "POST":
        head += [f"Content-Length: {len(body)}", "Content-Type: application/octet-stream"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class Users:
    """`count` users sending `rate` requests per second in all to host:port, until
    stopped, or after `max_seconds` whatever happens."""

    def __init__(
        self, host: str, port: int, count: int, rate: float, seed: int, max_seconds: float
    ) -> None:
        self.host, self.port, self.count, self.rate, self.seed = host, port, count, rate, seed
        self.max_seconds = max_seconds
        self.answers: list[Exchange] = []
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._user(n)) for n in range(self.count)]

    async def stop(self) -> None:
        """Stops sending; waits for the answers in flight (at most the client timeout)."""
        self.stopping.set()
        await asyncio.gather(*self.tasks)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), max(seconds, 0.0))

    async def _user(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        interval = self.count / self.rate
        loop = asyncio.get_running_loop()
        end = loop.time() + self.max_seconds
        next_at = loop.time() + rng.uniform(0, interval)
        cookies: dict[str, str] = {}
        conn: _Connection | None = None
        host = f"{self.host}:{self.port}"
        try:
            for i in range(int(self.max_seconds * self.rate / self.count) + 1):
                await self._pause(next_at - loop.time())
                if self.stopping.is_set() or loop.time() > end:
                    return
                post = rng.random() < POST_SHARE
                method = "POST" if post else "GET"
                body = b"x" * rng.randrange(64, 513) if post else b""
                if conn is not None and conn.ended:
                    conn.close()
                    conn = None
                sent, reused, port = time.time(), conn is not None, conn.port if conn else 0
                reply = _Reply()
                error = ""
                try:
                    async with asyncio.timeout(CLIENT_TIMEOUT):
                        if conn is None:
                            conn = _Connection(*await asyncio.open_connection(self.host, self.port))
                            port = conn.port
                        conn.writer.write(request(method, f"/u{n}/{i}", host, cookies, body))
                        await reply.read(conn.reader)
                except (TimeoutError, *TRANSPORT_ERRORS) as exc:
                    error = type(exc).__name__
                if reply.status is not None and not error:
                    cookies |= reply.cookies
                    error = "" if 200 <= reply.status < 300 else str(reply.status)
                status = reply.status if not error or error.isdigit() else None
                self.answers.append(
                    Exchange(
                        n, port, reused, sent, time.time(), method, status, error, reply.first_byte
                    )
                )
                if conn is not None and ((error and not error.isdigit()) or reply.close):
                    conn.close()  # a failed connection is not used again
                    conn = None
                next_at = max(next_at + interval * rng.uniform(0.5, 1.5), loop.time())
        finally:
            if conn is not None:
                conn.close()


async def probe(host: str, port: int, target: str, request_id: str) -> int | None:
    """One GET on a new connection (`Connection: close`); its status, or None if it failed."""
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                head = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                head += f"X-Request-Id: {request_id}\r\nConnection: close\r\n\r\n"
                writer.write(head.encode())
                reply = _Reply()
                await reply.read(reader)
                return reply.status
            finally:
                writer.close()
    except (TimeoutError, *TRANSPORT_ERRORS):
        return None
