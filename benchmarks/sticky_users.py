"""Sticky users: paced keep-alive clients, each with its own cookie jar, recording every answer.

Each user is one aiohttp session with its own cookie jar, so zdproxy's bucket cookie
keeps it on one color. A user sends 70% GET and 30% POST (a body of 64-512 bytes, no
Idempotency-Key) at `rate / count` requests per second, each gap drawn uniformly from
0.5 to 1.5 times the mean. A user waits for its answer before the next request (as a
browser tab would); one that fell behind sends at once but never catches up in a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass

from aiohttp import ClientError, ClientSession, ClientTimeout, CookieJar

CLIENT_TIMEOUT = 15.0  # seconds; past it the user gives up: an error
POST_SHARE = 0.3


@dataclass(frozen=True)
class Answer:
    """One request as a user saw it."""

    user: int
    sent: float  # Unix time
    done: float
    method: str
    status: int | None  # None: a transport error or the client's timeout
    error: str  # "" for a 2xx; else the status or the exception's name
    color: str | None  # the answering app's color (X-App-Color), if an app answered
    pinned: bool

    @property
    def failed(self) -> bool:
        return bool(self.error)


class Users:
    """`count` users sending `rate` requests per second in all to `url`, until stopped.

    Users `0 .. pinned - 1` send `headers_pinned` with every request (a pinned tenant).
    Every user stops by itself after `max_seconds`, whatever happens.
    """

    def __init__(
        self,
        url: str,
        count: int,
        rate: float,
        seed: int,
        max_seconds: float,
        pinned: int = 0,
        headers_pinned: dict[str, str] | None = None,
    ) -> None:
        self.url, self.count, self.rate, self.seed = url, count, rate, seed
        self.max_seconds = max_seconds
        self.pinned, self.headers_pinned = pinned, headers_pinned or {}
        self.answers: list[Answer] = []
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.started = self.stopped = 0.0

    def start(self) -> None:
        self.started = time.time()
        self.tasks = [asyncio.ensure_future(self._user(n)) for n in range(self.count)]

    async def stop(self) -> None:
        """Stops sending; waits for the answers in flight (at most the client timeout)."""
        self.stopping.set()
        await asyncio.gather(*self.tasks)
        self.stopped = time.time()

    def achieved_rate(self) -> float:
        sent = [a.sent for a in self.answers]
        span = (max(sent) - min(sent)) if len(sent) > 1 else 0.0
        return len(sent) / span if span > 0 else 0.0

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), max(seconds, 0.0))

    async def _user(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        interval = self.count / self.rate
        pinned = n < self.pinned
        headers = self.headers_pinned if pinned else {}
        jar = CookieJar(unsafe=True)  # unsafe: keep the cookies of an IP-address host
        timeout = ClientTimeout(total=CLIENT_TIMEOUT)
        loop = asyncio.get_running_loop()
        end = loop.time() + self.max_seconds
        next_at = loop.time() + rng.uniform(0, interval)
        async with ClientSession(cookie_jar=jar, timeout=timeout, headers=headers) as session:
            for i in range(int(self.max_seconds * self.rate / self.count) + 1):
                await self._pause(next_at - loop.time())
                if self.stopping.is_set() or loop.time() > end:
                    return
                post = rng.random() < POST_SHARE
                body = b"x" * rng.randrange(64, 513) if post else None
                method = "POST" if post else "GET"
                sent = time.time()
                status: int | None = None
                color: str | None = None
                try:
                    async with session.request(method, f"{self.url}/u{n}/{i}", data=body) as r:
                        await r.read()
                        status, color = r.status, r.headers.get("X-App-Color")
                        error = "" if 200 <= r.status < 300 else str(r.status)
                except (ClientError, TimeoutError) as exc:
                    error = type(exc).__name__
                self.answers.append(
                    Answer(n, sent, time.time(), method, status, error, color, pinned)
                )
                next_at = max(next_at + interval * rng.uniform(0.5, 1.5), loop.time())
