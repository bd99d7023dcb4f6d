"""`zdproxy run`: start the planes on uvloop, stop gracefully on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import uvloop

from zdproxy import __version__
from zdproxy.config.loader import ConfigError, load_settings
from zdproxy.config.settings import Settings
from zdproxy.control.plane import ControlPlane
from zdproxy.dataplane.server import ProxyServer

log = logging.getLogger("zdproxy")

SHUTDOWN_GRACE = 10.0  # seconds in-flight requests get to finish on SIGTERM


class Daemon:
    """The running process: data plane and control plane wired together."""

    def __init__(self, settings: Settings, config_path: Path | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.stop_requested = asyncio.Event()
        self.dataplane = ProxyServer(settings)
        self.control = ControlPlane(settings, self.dataplane)
        self.addresses: list[str] = []

    async def start(self) -> None:
        self.control.apply_settings(self.settings)
        self.control.start()
        await self.control.first_checks()
        proxy = self.settings.proxy
        self.addresses = await self.dataplane.listen(proxy.listen, proxy.backlog)
        log.info("zdproxy %s listening on %s", __version__, ", ".join(self.addresses))

    def reload(self) -> bool:
        """Re-read the config file and apply it. An invalid file changes nothing.

        Pools, split, limits and timeouts take effect at once, for new requests;
        requests in flight finish where they are. The listener needs a restart.
        """
        if self.config_path is None:
            log.warning("reload: no config file to read")
            return False
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return False
        old = self.settings.proxy
        needs_restart = [
            f"proxy.{name}"
            for name in ("listen", "backlog")
            if getattr(old, name) != getattr(new.proxy, name)
        ]
        if needs_restart:
            log.warning("reload: %s take effect only after a restart", ", ".join(needs_restart))
        self.settings = new
        self.dataplane.configure(new)
        self.control.apply_settings(new)
        log.info("reload: applied %s", self.config_path)
        return True

    async def stop(self) -> None:
        await self.control.close()
        cut = await self.dataplane.stop(SHUTDOWN_GRACE)
        log.info("stopped%s", f" ({cut} connections cut after the grace period)" if cut else "")

    def handle_signals(self) -> None:
        """SIGTERM and SIGINT stop gracefully; SIGHUP reloads the config file."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    async def serve(self) -> None:
        self.handle_signals()
        await self.start()
        await self.stop_requested.wait()
        log.info("stopping: finishing requests in flight")
        await self.stop()


async def _serve(settings: Settings, config_path: Path) -> None:
    await Daemon(settings, config_path).serve()


def run(settings: Settings, config_path: Path) -> int:
    try:
        uvloop.run(_serve(settings, config_path))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
