"""Flow control in one place: who asked a transport to stop reading, and when it may resume.

A client transport can be paused for several independent reasons at once (the
upstream's write buffer is full, the pipeline queue is long, a body is waiting
for an upstream connection); it resumes only when every reason has cleared.
"""

from __future__ import annotations

import asyncio

# Reasons, as bits.
UPSTREAM_BUSY = 1  # the peer's write buffer is above its high-water mark
PIPELINE_FULL = 2  # too many pipelined requests are queued behind the active one
BODY_WAITING = 4  # request body is buffered while no upstream connection is attached


class ReadGate:
    __slots__ = ("reasons", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons and not self.transport.is_closing():
            self.transport.pause_reading()
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if not self.reasons & reason:
            return
        self.reasons &= ~reason
        if not self.reasons and not self.transport.is_closing():
            self.transport.resume_reading()

    def clear(self) -> None:
        """Read again whatever the reasons were (the connection only drains input now)."""
        if self.reasons:
            self.reasons = 0
            if not self.transport.is_closing():
                self.transport.resume_reading()
