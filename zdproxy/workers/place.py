"""One worker's place in the set: its current process, the channel to it, and what
its reports say. A place outlives its processes: a replacement takes its index."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from zdproxy.routing.plane import WorkerState
from zdproxy.workers.channel import Channel
from zdproxy.workers.messages import Action, Answer, Ask, Report, Start, Stopped
from zdproxy.workers.tally import Seen


@dataclass(frozen=True)
class Launch:
    """How workers start: what Start carries besides the snapshot and limits."""

    backlog: int
    tls: tuple[str, str] | None
    grace: float
    log_level: str
    log_format: str


@dataclass(frozen=True)
class WorkerExit:
    """A worker process that ended while zdproxy was not stopping."""

    index: int
    pid: int
    how: str  # "exit code 1", "killed by SIGKILL"
    unresponsive: bool  # killed by the supervisor for its silence
    lost: int  # requests it had in flight (as of its last report)


class Place:
    def __init__(self, index: int) -> None:
        self.index = index
        self.restarts = 0  # processes that ended here unasked and were replaced
        self.lost = 0  # requests in flight lost with them
        # The current process, from start() until ended():
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.seen = Seen()
        self.started = 0.0  # monotonic
        self.heard = 0.0  # monotonic: its last message
        self.ready: asyncio.Future[None] | None = None  # its first report came
        self.answers: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self.unresponsive = False  # killed for its silence
        self.cut = 0  # connections it cut at a stop
        self.follower: asyncio.Task[None] | None = None  # the supervisor's reader of it

    async def start(self, listener: socket.socket, start: Start) -> None:
        """Start a process here, serving `listener`, and send it `start`."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listen_fd, channel_fd = listener.fileno(), theirs.fileno()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "zdproxy.workers.worker",
                str(listen_fd),
                str(channel_fd),
                pass_fds=(listen_fd, channel_fd),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        # What is known of the process before it is shown: a status read while the
        # channel opens must not pair the new pid with the old process's last report.
        self.seen = Seen()
        self.started = self.heard = time.monotonic()
        self.ready = asyncio.get_running_loop().create_future()
        self.answers = {}
        self.unresponsive = False
        self.cut = 0
        self.process = process
        self.channel = await Channel.open(ours)
        self.channel.send(start)

    def take(self, message: object) -> None:
        """A message from the process."""
        self.heard = time.monotonic()
        if isinstance(message, Report):
            self.seen.absorb(message)
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(None)
        elif isinstance(message, Answer):
            answer = self.answers.pop(message.serial, None)
            if answer is not None and not answer.done():
                answer.set_result(message.result)
        elif isinstance(message, Stopped):
            self.cut = message.cut

    def ask(
        self, serial: int, action: Action, ids: frozenset[str], grace: float
    ) -> asyncio.Future[tuple[int, int]]:
        assert self.channel is not None
        answer: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self.answers[serial] = answer
        self.channel.send(Ask(serial, action, ids, grace))
        return answer

    def ended(self, returncode: int) -> WorkerExit:
        """The process is gone: its unanswered commands count as nothing done."""
        assert self.process is not None
        for answer in self.answers.values():
            if not answer.done():
                answer.set_result((0, 0))
        self.answers.clear()
        ended = WorkerExit(
            self.index, self.process.pid, how(returncode), self.unresponsive, self.seen.requests()
        )
        self.channel = None
        self.process = None
        return ended

    @property
    def starting(self) -> bool:
        return self.ready is not None and not self.ready.done()

    def state(self, now: float) -> WorkerState:
        last = self.seen.last
        pid = self.process.pid if self.process is not None else None
        return WorkerState(
            index=self.index,
            pid=pid,
            version=self.seen.version,
            connections=last.connections if last is not None else 0,
            requests=self.seen.requests(),
            restarts=self.restarts,
            lost=self.lost,
            uptime=round(now - self.started, 3) if pid is not None else 0.0,
            **usage(pid),
        )


_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def usage(pid: int | None) -> dict[str, Any]:
    """A process's CPU time and resident memory, from /proc/PID/stat (a process that
    is gone, or a system without /proc, reads as none)."""
    if pid is None:
        return {}
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # After the command name in parentheses (which may hold spaces): fields 3..
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return {}
    utime, stime, rss = int(fields[11]), int(fields[12]), int(fields[21])
    return {"cpu_seconds": (utime + stime) / _TICKS, "rss_bytes": rss * _PAGE}


def how(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"
