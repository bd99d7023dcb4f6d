"""The live feed behind `GET /v1/status?follow=1` (the dashboard's one stream): one
producer, fanned out to every follower.

Once a second the producer takes one sample of each color's traffic over that second
(requests/s, error rate, p50, p99, effective share) into a ring of the last
HISTORY_SECONDS, whether anyone follows or not, so that a dashboard opened during an
incident shows what led to it. While someone follows, it also builds the status once
and serializes it once; each follower then only gets the same bytes written to its
connection. So N dashboards cost one status a second plus N small writes, instead of
N status requests (benchmarks/dashboard_cost.py measures both).

The stream, as server-sent events:

- `samples` first, with the whole ring, then each second with the new sample. Its
  data is columns, oldest first, as a chart draws them: `{"interval": 1.0, "time":
  [...], "colors": {"blue": {"requests_per_second": [...], "error_rate": [...],
  "p50_ms": [...], "p99_ms": [...], "effective_share": [...]}, "green": {...}}}`;
  `time` is seconds since the epoch (as events' `time`), a latency is null for a
  second without a response;
- `status` each second after its `samples`: the body of `GET /v1/status`.

A follower that cannot keep up (FOLLOWER_BACKLOG frames unsent) is cut: it reconnects
and gets the ring again, so it never draws a gap that was not there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from zdproxy.config.settings import COLORS
from zdproxy.control.availability import effective_shares
from zdproxy.control.plane import ControlPlane

log = logging.getLogger("zdproxy.admin")

INTERVAL = 1.0  # seconds between samples, and between the status frames
HISTORY_SECONDS = 900  # the ring: the charts' last 15 minutes
FOLLOWER_BACKLOG = 30  # frames queued for one follower before it is cut
SERIES = ("requests_per_second", "error_rate", "p50_ms", "p99_ms", "effective_share")
Numbers = tuple[float, float, float | None, float | None, float]  # one color's, as SERIES


@dataclass(frozen=True, slots=True)
class Sample:
    """Each color's traffic over one interval, ending at `time` (epoch seconds)."""

    time: float
    colors: dict[str, Numbers]


def columns(samples: list[Sample] | deque[Sample]) -> dict[str, Any]:
    """The `samples` event's data: the samples as one column per series."""
    return {
        "interval": INTERVAL,
        "time": [s.time for s in samples],
        "colors": {
            color: {name: [s.colors[color][i] for s in samples] for i, name in enumerate(SERIES)}
            for color in COLORS
        },
    }


def sse(kind: str, data: str) -> bytes:
    return f"event: {kind}\ndata: {data}\n\n".encode()


class Follower:
    """One stream's frames not yet written."""

    def __init__(self) -> None:
        self.frames: deque[bytes] = deque()
        self.ended = False
        self._ready = asyncio.Event()

    def push(self, frame: bytes) -> None:
        if len(self.frames) >= FOLLOWER_BACKLOG:
            self.end()  # too far behind: it reconnects and gets the ring again
        else:
            self.frames.append(frame)
            self._ready.set()

    def end(self) -> None:
        self.ended = True
        self._ready.set()

    async def next(self) -> bytes | None:
        """The next frame; None once the stream is to end."""
        while not self.ended:
            if self.frames:
                return self.frames.popleft()
            self._ready.clear()
            await self._ready.wait()
        return None


class LiveFeed:
    def __init__(self, control: ControlPlane, status: Callable[[], BaseModel]) -> None:
        self._control = control
        self._status = status
        self._ring: deque[Sample] = deque(maxlen=round(HISTORY_SECONDS / INTERVAL))
        self._followers: set[Follower] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._produce())

    async def close(self) -> None:
        """Stops sampling and ends every follower's stream."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for follower in self._followers:
            follower.end()

    def _sample(self, now: float, seconds: float) -> Sample:
        control = self._control
        shares = effective_shares(control.routing)
        colors: dict[str, Numbers] = {}
        for color in COLORS:
            numbers = control.telemetry.view(color, now, seconds).to_dict()
            colors[color] = (
                numbers["requests_per_second"],
                numbers["error_rate"],
                numbers["p50_ms"],
                numbers["p99_ms"],
                shares[color] / 100,
            )
        return Sample(round(time.time(), 3), colors)

    async def _produce(self) -> None:
        loop = asyncio.get_running_loop()
        previous = due = loop.time()
        while True:
            due += INTERVAL
            await asyncio.sleep(max(0.0, due - loop.time()))
            now = loop.time()
            if now - due > INTERVAL:  # the loop was blocked: start the rhythm again
                due = now
            try:
                # Each sample covers the time since the last one: the seconds add up.
                sample = self._sample(now, now - previous)
                previous = now
                self._ring.append(sample)
                if self._followers:
                    frame = sse("samples", json.dumps(columns([sample]))) + sse(
                        "status", self._status().model_dump_json()
                    )
                    for follower in self._followers:
                        follower.push(frame)
            except Exception:  # a bug here must not stop the dashboards for good
                log.exception("dashboard feed: the sample or the status failed")

    @contextlib.contextmanager
    def _follow(self) -> Iterator[Follower]:
        follower = Follower()
        self._followers.add(follower)
        try:
            yield follower
        finally:
            self._followers.discard(follower)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/status?follow=1: the ring and the status now, then a frame a second."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        with self._follow() as follower:
            await response.prepare(request)
            try:
                await response.write(
                    sse("samples", json.dumps(columns(self._ring)))
                    + sse("status", self._status().model_dump_json())
                )
                while (frame := await follower.next()) is not None:
                    await response.write(frame)
            except ConnectionResetError:
                pass  # the follower went away: nothing to answer
        return response
