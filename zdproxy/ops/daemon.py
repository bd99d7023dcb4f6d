"""`zdproxy run`: start the planes on uvloop, stop gracefully on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop

from zdproxy import __version__
from zdproxy.config.settings import Settings
from zdproxy.control.plane import ControlPlane
from zdproxy.dataplane.server import ProxyServer

log = logging.getLogger("zdproxy")

SHUTDOWN_GRACE = 10.0  # seconds in-flight requests get to finish on SIGTERM


class Daemon:
    """The running process: data plane and control plane wired together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop_requested = asyncio.Event()
        self.dataplane = ProxyServer(settings)
        self.control = ControlPlane(settings, self.dataplane)
        self.addresses: list[str] = []

    async def start(self) -> None:
        self.control.publish()
        proxy = self.settings.proxy
        self.addresses = await self.dataplane.listen(proxy.listen, proxy.backlog)
        log.info("zdproxy %s listening on %s", __version__, ", ".join(self.addresses))

    async def stop(self) -> None:
        cut = await self.dataplane.stop(SHUTDOWN_GRACE)
        log.info("stopped%s", f" ({cut} connections cut after the grace period)" if cut else "")

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        await self.start()
        await self.stop_requested.wait()
        log.info("stopping: finishing requests in flight")
        await self.stop()


async def _serve(settings: Settings) -> None:
    await Daemon(settings).serve()


def run(settings: Settings) -> int:
    try:
        uvloop.run(_serve(settings))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
