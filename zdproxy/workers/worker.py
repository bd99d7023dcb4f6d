"""A data-plane worker: `python -m zdproxy.workers.worker LISTEN_FD CHANNEL_FD`.

Started by the main process (supervisor.py), never by hand. It serves the inherited
proxy listener with the same ProxyServer a single process runs, takes its snapshots,
limits and commands from the channel, and reports what it saw every REPORT_SECONDS.
It imports the data plane and the routing vocabulary only: no settings machinery,
no control plane, no admin API.

Signals: SIGTERM stops it gracefully (systemd signals every process of the unit);
SIGINT, SIGHUP and SIGUSR2 are the main process's to act on (a Ctrl-C in a terminal
reaches the whole process group: the main then stops the workers in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, cast

import setproctitle
import uvloop

from zdproxy.dataplane.limits import Limits
from zdproxy.dataplane.server import ProxyServer
from zdproxy.logs import LogFormat, reconfigure_logging, setup_logging
from zdproxy.tls import load_chain, server_context
from zdproxy.workers.channel import Channel, ChannelClosed
from zdproxy.workers.messages import (
    HEARTBEAT_SECONDS,
    REPORT_SECONDS,
    Action,
    Answer,
    Apply,
    Ask,
    Configure,
    LoadTls,
    Report,
    Start,
    Stop,
    Stopped,
)

log = logging.getLogger("zdproxy.worker")


class _WorkerField(logging.Filter):
    """Every log line of a worker says which worker wrote it."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {**getattr(record, "fields", {}), "worker": self.index}
        return True


class Worker:
    def __init__(self, listener: socket.socket, channel: Channel) -> None:
        self.listener = listener
        self.channel = channel
        self.server: ProxyServer | None = None
        self.stopping = asyncio.Event()
        self.grace = 0.0  # proxy.shutdown_timeout, from Start and Configure
        self._last_report = 0.0

    async def serve(self) -> None:
        start = await self.channel.receive()
        if not isinstance(start, Start):
            raise RuntimeError(f"expected Start, got {type(start).__name__}")
        setup_logging(start.log_level, cast(LogFormat, start.log_format))
        for handler in logging.getLogger().handlers:
            handler.addFilter(_WorkerField(start.index))
        # ps shows which worker; the thread name keeps `pidof zdproxy` on the main process.
        setproctitle.setproctitle(f"zdproxy: worker {start.index}")
        setproctitle.setthreadtitle("zdproxy-worker")
        self.grace = start.grace
        server = self.server = ProxyServer(_limits(start.limits))
        server.apply(start.snapshot)
        tls = server_context(*start.tls) if start.tls is not None else None
        await server.listen(self.listener, start.backlog, tls)
        self.report()  # the first report says: listening
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        reporter = asyncio.ensure_future(self._report_forever())
        commands = asyncio.ensure_future(self._obey(tls))
        stopped = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait((commands, stopped), return_when=asyncio.FIRST_COMPLETED)
        reporter.cancel()
        commands.cancel()
        stopped.cancel()
        cut = await server.stop(self.grace)
        self.report()  # what finished during the stop
        self.channel.send(Stopped(cut))
        with contextlib.suppress(ConnectionError):
            await self.channel.drain()

    async def _obey(self, tls: Any) -> None:
        """Act on the main process's messages until Stop, or until it goes away."""
        server = self.server
        assert server is not None
        try:
            while True:
                message = await self.channel.receive()
                if isinstance(message, Apply):
                    server.apply(message.snapshot)
                    self.report()  # the main learns at once that it is in force
                elif isinstance(message, Ask):
                    self.channel.send(Answer(message.serial, self._act(message)))
                elif isinstance(message, Configure):
                    server.configure(_limits(message.limits))
                    self.grace = message.grace
                    reconfigure_logging(message.log_level, cast(LogFormat, message.log_format))
                elif isinstance(message, LoadTls) and tls is not None:
                    load_chain(tls, message.cert_file, message.key_file)
                elif isinstance(message, Stop):
                    self.grace = message.grace
                    return
        except ChannelClosed:
            log.warning("the main process went away: finishing requests in flight, then exiting")

    def _act(self, ask: Ask) -> tuple[int, int]:
        server = self.server
        assert server is not None
        ids = set(ask.ids)
        if ask.action is Action.EVACUATE:
            return server.evacuate_now(ids, ask.grace)
        if ask.action is Action.CUT:
            return server.cut_now(ids), 0
        if ask.action is Action.CLOSE_TUNNELS:
            return server.close_tunnels_now(ids), 0
        for upstream_id in ids:
            server.forget_streak(upstream_id)
        return 0, 0

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_SECONDS)
            server = self.server
            assert server is not None
            if server.ctx.connections or time.monotonic() - self._last_report >= HEARTBEAT_SECONDS:
                self.report()

    def report(self) -> None:
        server = self.server
        assert server is not None
        retries, overrides = server.counters()
        self.channel.send(
            Report(
                version=server.snapshot.version,
                records=server.collect(),
                streaks=server.failure_streaks(1),
                in_flight=server.load(),
                connections=len(server.ctx.connections),
                retries=dict(retries),
                pins=dict(overrides.pins),
                preview_honoured=dict(overrides.preview_honoured),
                preview_ignored=dict(overrides.preview_ignored),
                local_errors=server.local_errors(),
            )
        )
        self._last_report = time.monotonic()


def _limits(fields: dict[str, Any]) -> Limits:
    return Limits(**fields)


def main(argv: list[str]) -> int:
    listen_fd, channel_fd = (int(arg) for arg in argv)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    listener = socket.socket(fileno=listen_fd)
    channel_sock = socket.socket(fileno=channel_fd)

    async def run() -> None:
        await Worker(listener, await Channel.open(channel_sock)).serve()

    try:
        uvloop.run(run())
    except ChannelClosed:
        return 1  # the main process went away before Start: nothing was served
    return 0


if __name__ == "__main__":
    os.environ.pop("LISTEN_FDS", None)  # systemd's, meant for the main process
    sys.exit(main(sys.argv[1:]))
