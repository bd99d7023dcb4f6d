"""`zdproxy run`: start the planes on uvloop, stop gracefully on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import uvloop

from zdproxy import __version__
from zdproxy.admin.handlers import ServiceState
from zdproxy.admin.server import AdminServer
from zdproxy.config.loader import ConfigError, load_settings
from zdproxy.config.settings import Settings
from zdproxy.config.units import Address
from zdproxy.control.events import EventLog
from zdproxy.control.journal import Journal
from zdproxy.control.plane import ControlPlane
from zdproxy.dataplane.server import ProxyServer

log = logging.getLogger("zdproxy")

SHUTDOWN_GRACE = 10.0  # seconds in-flight requests get to finish on SIGTERM
# Settings read once at start; a reload that changes them says so.
RESTART_ONLY = (
    ("proxy", "listen"),
    ("proxy", "backlog"),
    ("admin", "listen"),
    ("state", "dir"),
    ("state", "events_in_memory"),
    ("state", "events_file_max"),
    ("state", "events_files_kept"),
)


class Daemon:
    """The running process: data plane and control plane wired together."""

    def __init__(self, settings: Settings, config_path: Path | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.stop_requested = asyncio.Event()
        self.state_dir = Path(settings.state.dir)
        state = settings.state
        self.events = EventLog(
            self.state_dir / "events.jsonl",
            in_memory=state.events_in_memory,
            file_max=state.events_file_max,
            files_kept=state.events_files_kept,
        )
        self.dataplane = ProxyServer(settings)
        journal = Journal(self.state_dir / "state.json")
        self.control = ControlPlane(settings, self.dataplane, self.events, journal)
        self.service = ServiceState()
        self.admin = AdminServer(self.control, self.service, settings.admin.bearer_token)
        self.addresses: list[str] = []
        self.admin_address = ""

    async def start(self) -> None:
        try:
            self.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"state.dir: cannot create {self.state_dir}: {exc.strerror}") from None
        self.control.restore()
        self.control.start()
        self.admin_address = await self.admin.start(self.settings.admin.listen)
        if not self.settings.admin.bearer_token:
            log.warning("admin: no token configured; /v1 answers 401 to every call")
        await self.control.first_checks()
        proxy = self.settings.proxy
        self.addresses = await self.dataplane.listen(proxy.listen, proxy.backlog)
        self.control.listeners = [Address.parse(a) for a in (*self.addresses, self.admin_address)]
        self.service.ready = True
        self.events.emit(
            "started",
            f"zdproxy {__version__} serving {', '.join(self.addresses)}",
            pid=os.getpid(),
            journal=sorted(self.control.desired.items),
        )
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
            self.service.reloads["refused"] += 1
            self.events.emit(
                "reload_refused",
                f"{exc.source}: the running configuration stays: " + "; ".join(exc.errors),
                actor="config",
                level=logging.ERROR,
                errors=exc.errors,
            )
            return False
        needs_restart = [
            f"{section}.{name}"
            for section, name in RESTART_ONLY
            if getattr(getattr(self.settings, section), name)
            != getattr(getattr(new, section), name)
        ]
        self.settings = new
        self.dataplane.configure(new)
        self.control.apply_settings(new)
        self.admin.tokens.token = new.admin.bearer_token
        self.service.reloads["applied"] += 1
        self.events.emit(
            "reload_applied",
            f"applied {self.config_path}"
            + (
                f"; {', '.join(needs_restart)} take effect after a restart" if needs_restart else ""
            ),
            actor="config",
            needs_restart=needs_restart,
        )
        return True

    async def stop(self) -> None:
        self.service.stopping = True
        await self.control.close()
        cut = await self.dataplane.stop(SHUTDOWN_GRACE)
        self.events.emit(
            "stopped", f"{cut} connections cut after the grace period" if cut else "clean", cut=cut
        )
        self.events.close()
        await self.admin.close()

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
