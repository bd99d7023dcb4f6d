"""`zdproxy run`: start the planes on uvloop; SIGTERM/SIGINT stop gracefully, SIGHUP
reloads the config, SIGUSR2 restarts zdproxy in place (a re-exec that keeps the
listening sockets, so not one connection is refused).

Under systemd it takes its listeners from socket activation and speaks the notify
protocol (READY, RELOADING, STOPPING, WATCHDOG): see ops/systemd.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import uvloop

from zdproxy import __version__
from zdproxy.admin.handlers import ServiceState
from zdproxy.admin.server import AdminServer, Unprotected
from zdproxy.config.changes import FieldProblem, ReloadOutcome, changed_fields, reload_conflicts
from zdproxy.config.fleet import FleetSettings
from zdproxy.config.loader import ConfigError, load_settings
from zdproxy.config.settings import Settings
from zdproxy.config.units import Address
from zdproxy.control.desired import Refused
from zdproxy.control.events import Actor, EventLog
from zdproxy.control.journal import Journal
from zdproxy.control.plane import ControlPlane
from zdproxy.control.shared import SharedView
from zdproxy.dataplane.server import ProxyServer
from zdproxy.fleet.etcd import EtcdStore
from zdproxy.fleet.member import Member
from zdproxy.logs import reconfigure_logging
from zdproxy.ops.limits import dataplane_limits
from zdproxy.ops.listen_errors import CannotListen, cannot_listen
from zdproxy.ops.sockets import bind, describe, hand_on, own_sockets, park
from zdproxy.ops.systemd import Notifier, listen_fds
from zdproxy.ops.watch import start_watch
from zdproxy.routing.plane import DataPlane
from zdproxy.tls import load_chain, server_context
from zdproxy.workers.place import Launch, WorkerExit
from zdproxy.workers.supervisor import WorkerSet

log = logging.getLogger("zdproxy")

ADMIN_BACKLOG = 128
EXIT_CONFIG = 2  # `zdproxy run` cannot start with this config on this host
HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2}
# Settings read once at start; a reload that changes them says so.
RESTART_ONLY = (
    ("proxy", "listen"),
    ("proxy", "workers"),
    ("proxy", "backlog"),
    ("admin", "listen"),
    ("admin", "header_timeout"),
    ("admin", "body_timeout"),
    ("admin", "idle_timeout"),
    ("admin", "max_connections"),
    ("admin", "max_pending_heads"),
    ("state", "dir"),
    ("state", "events_in_memory"),
    ("state", "events_file_max"),
    ("state", "events_files_kept"),
    *(("fleet", name) for name in FleetSettings.model_fields),
)
FLEET_JOIN_GRACE = 1.0  # seconds past fleet.timeout a start waits for etcd's state


class Daemon:
    """The running process: data plane and control plane wired together."""

    def __init__(
        self,
        settings: Settings,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.notifier = notifier if notifier is not None else Notifier("")
        self.stop_requested = asyncio.Event()
        self.restart_requested = False
        self.sockets: dict[str, socket.socket] = {}  # by the names systemd passes: proxy, admin
        # Listeners zdproxy bound itself (now, or before a restart in place): theirs follow
        # the config's addresses; systemd's belong to its socket units.
        self.own: set[str] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        tls = settings.proxy.tls
        self.tls = server_context(tls.cert_file, tls.key_file) if tls.enabled else None
        self.state_dir = Path(settings.state.dir)
        state = settings.state
        self.events = EventLog(
            self.state_dir / "events.jsonl",
            in_memory=state.events_in_memory,
            file_max=state.events_file_max,
            files_kept=state.events_files_kept,
        )
        if settings.fleet.enabled:  # every event of a fleet member says which member
            self.events.member = settings.fleet.name
        # One process serves the listener, or proxy.workers processes do behind this one.
        limits = dataplane_limits(settings)
        count = settings.proxy.worker_count
        self.workers: WorkerSet | None = None
        self.server: ProxyServer | None = None
        dataplane: DataPlane
        if count > 1:
            dataplane = self.workers = WorkerSet(count, limits, self._worker_exited)
        else:
            dataplane = self.server = ProxyServer(limits)
        journal = Journal(self.state_dir / "state.json")
        self.control = ControlPlane(settings, dataplane, self.events, journal)
        self.service = ServiceState(reload=self.reload)
        self.admin = AdminServer(self.control, self.service, settings.admin)
        self.addresses: list[str] = []
        self.admin_address = ""
        self.member: Member | None = None  # fleet mode's link to etcd

    async def start(self, inherited: dict[str, socket.socket] | None = None) -> None:
        """Take the listeners (bound here, or `inherited` from systemd or from the process
        this one replaced: clients then waited in their backlog all along), restore the
        state, serve the admin API, wait for the first health verdicts, then accept."""
        if (interval := self.notifier.watchdog_interval()) is not None:
            # From the first moment: systemd's watchdog runs while zdproxy starts, too.
            self._watchdog = asyncio.ensure_future(self.notifier.watchdog(interval))
        passed: dict[str, socket.socket | None] = dict(inherited or {})
        admin, proxy = self.settings.admin, self.settings.proxy
        for name, address in (("admin", admin.listen), ("proxy", proxy.listen)):
            self._follow_config(passed, name, address)
        # Bound before anything is written: a second zdproxy on the same ports stops
        # here, before it could touch the running one's journal and events.
        if (sock := passed.pop("admin", None)) is None:
            sock = _bind("admin.listen", admin.listen, ADMIN_BACKLOG, mode=0o660)
            self.own.add("admin")
        self.sockets["admin"] = sock
        self.admin.check_reach(sock)  # a passed socket is where systemd put it
        if (sock := passed.pop("proxy", None)) is None:
            sock = _bind("proxy.listen", proxy.listen, proxy.backlog)
            self.own.add("proxy")
        self.sockets["proxy"] = sock
        for name, unused in passed.items():
            if unused is not None:
                log.warning("ignoring the passed socket %r (%s)", name, describe(unused))
                unused.close()
        try:
            self.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            # Served anyway, from the config file: the journal then refuses every change
            # (503) and says why in a journal_unwritable event.
            log.error("state.dir: cannot create %s: %s", self.state_dir, exc.strerror)
        self.control.restore()
        await self._join_fleet()
        self.control.start()
        await self.admin.start(self.sockets["admin"])
        self.admin_address = describe(self.sockets["admin"])
        log.info("admin API on %s (zdproxy %s)", self.admin_address, __version__)
        if not admin.bearer_token:
            log.warning("admin: no token configured; /v1 answers 401 to every call")
        await self.control.first_checks()
        if self.workers is not None:
            await self.workers.listen(self.sockets["proxy"], self._launch())
        else:
            assert self.server is not None
            await self.server.listen(self.sockets["proxy"], proxy.backlog, self.tls)
        self.addresses = [describe(self.sockets["proxy"])]
        self.control.listeners = [Address.parse(a) for a in (*self.addresses, self.admin_address)]
        self.service.ready = True
        self.events.emit(
            "started",
            f"zdproxy {__version__} serving {', '.join(self.addresses)}",
            pid=os.getpid(),
            journal=sorted(self.control.desired.items),
        )
        log.info("zdproxy %s listening on %s", __version__, ", ".join(self.addresses))
        self.notifier.ready(f"serving {', '.join(self.addresses)}")
        self._watch_files()

    async def _join_fleet(self) -> None:
        """Fleet mode: read the fleet's state from etcd before serving (bounded: a member
        that cannot reach etcd serves its journal's state and joins later)."""
        fleet = self.settings.fleet
        if not fleet.enabled:
            return

        def notify(kind: str, reason: str, *, level: int = logging.INFO, **data: Any) -> None:
            self.events.emit(kind, reason, by="fleet", level=level, **data)

        store = EtcdStore.from_settings(fleet)  # its TLS files were checked with the config
        view = SharedView(self.control)
        self.member = Member(store, fleet, view, notify, cache=self.state_dir / "fleet.json")
        self.control.join_fleet(self.member)
        await self.member.start(within=fleet.timeout + FLEET_JOIN_GRACE)

    def _follow_config(
        self, passed: dict[str, socket.socket | None], name: str, address: Address
    ) -> None:
        """After a restart in place, a listener the config moved is bound anew (the old
        one closes: a restart is how listener changes take effect)."""
        sock = passed.get(name)
        if sock is None or name not in self.own or (address.port == 0 and not address.path):
            return
        if not _same_place(describe(sock), address):
            log.warning("%s listener moves from %s to %s", name, describe(sock), address)
            sock.close()
            passed[name] = None

    def _watch_files(self) -> None:
        """Follow the config file (and the TLS files it names) for changes."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.config_path is None or not self.settings.reload.watch:
            return
        tls = self.settings.proxy.tls
        paths = [self.config_path, *((Path(tls.cert_file), Path(tls.key_file)) if self.tls else ())]
        self._watch = start_watch(paths, self.settings.reload.debounce, self._files_changed)

    def _files_changed(self, changed: set[Path]) -> None:
        assert self.config_path is not None
        if {self.config_path.absolute(), self.config_path.resolve()} & changed:
            self.reload()  # reloads the TLS files too
        else:
            self._reload_tls()

    def _reload_tls(self) -> None:
        tls = self.settings.proxy.tls
        if self.tls is None or not tls.enabled:
            return
        try:
            # Tried on a fresh context first: a failed load into the live one would leave
            # it with the new certificate and the old key, and every handshake failing.
            server_context(tls.cert_file, tls.key_file)
            load_chain(self.tls, tls.cert_file, tls.key_file)
            if self.workers is not None:
                self.workers.load_tls(tls.cert_file, tls.key_file)
        except ValueError as exc:
            self.events.emit(
                "tls_reload_refused",
                f"proxy.tls: {exc}; new connections keep the previous certificate",
                actor="config",
                level=logging.ERROR,
            )
            return
        self.events.emit("tls_reloaded", f"certificate {tls.cert_file} loaded", actor="config")

    def reload(self, actor: Actor = "config") -> ReloadOutcome:
        """Re-read the config file and apply it, all or nothing: the one reload behind
        SIGHUP, a change of the file, and POST /v1/reload (`actor` says which).

        Pools, split, limits and timeouts take effect at once, for new requests;
        requests in flight finish where they are. The listener needs a restart. A file
        that is invalid, names no upstream, would drop the admin token, or does not fit
        the journaled runtime changes is refused: nothing changes, an event says why.
        """
        if self.config_path is None:
            problem = FieldProblem("--config", "zdproxy runs without a config file")
            outcome = ReloadOutcome("(none)", applied=False, problems=[problem], status=409)
        else:
            self.notifier.reloading()
            try:
                outcome = self._reload(self.config_path)
            finally:
                self.notifier.ready(f"serving {', '.join(self.addresses)}")
        self.service.reloads["applied" if outcome.applied else "refused"] += 1
        if outcome.applied:
            later = ", ".join(outcome.needs_restart)
            self.events.emit(
                "reload_applied",
                f"applied {outcome.source}: "
                + (f"changed {', '.join(outcome.changed)}" if outcome.changed else "unchanged")
                + (f"; {later} take effect after a restart" if later else ""),
                actor=actor,
                changed=outcome.changed,
                needs_restart=outcome.needs_restart,
            )
        else:
            errors = [str(problem) for problem in outcome.problems]
            self.events.emit(
                "reload_refused",
                f"{outcome.source}: the running configuration stays: " + "; ".join(errors),
                actor=actor,
                level=logging.ERROR,
                errors=errors,
            )
        return outcome

    def _reload(self, config_path: Path) -> ReloadOutcome:
        source = str(config_path)
        try:
            new = load_settings(config_path)
        except ConfigError as exc:
            problems = [FieldProblem.parse(line) for line in exc.errors]
            return ReloadOutcome(source, applied=False, problems=problems, status=400)
        if conflicts := reload_conflicts(self.settings, new):
            return ReloadOutcome(source, applied=False, problems=conflicts, status=409)
        try:
            self.control.apply_settings(new)  # first: it may refuse, and then nothing changed
        except Refused as exc:
            problem = FieldProblem(exc.field, exc.reason)
            status = exc.status if exc.status >= 500 else 409  # a conflict with the journal
            return ReloadOutcome(source, applied=False, problems=[problem], status=status)
        changed = changed_fields(self.settings, new)
        needs_restart = [f"{s}.{n}" for s, n in RESTART_ONLY if f"{s}.{n}" in changed]
        if new.proxy.tls.enabled != self.settings.proxy.tls.enabled:
            needs_restart.append("proxy.tls")  # the listener itself changes
        watched = (self.settings.proxy.tls, self.settings.reload)
        self.settings = new
        if self.workers is not None:
            self.workers.configure(dataplane_limits(new), self._launch())
        else:
            assert self.server is not None
            self.server.configure(dataplane_limits(new))
        self.admin.tokens.token = new.admin.bearer_token
        reconfigure_logging(new.log.level, new.log.format)
        self._reload_tls()
        if (new.proxy.tls, new.reload) != watched:
            self._watch_files()
        return ReloadOutcome(source, applied=True, changed=changed, needs_restart=needs_restart)

    async def stop(self) -> None:
        """Stop accepting, answer what is in flight (with Connection: close) for up to
        proxy.shutdown_timeout, close idle connections, then cut what is left."""
        self.service.stopping = True
        if self.restart_requested:
            self.notifier.reloading()  # the same pid comes back: a reload to systemd
            self.notifier.send("STATUS=restarting in place")
        else:
            self.notifier.stopping()
        # The watchdog keeps pinging through a restart's drain, until the exec.
        for task in (self._watch,) if self.restart_requested else (self._watchdog, self._watch):
            if task is not None:
                task.cancel()
        if self.member is not None:  # first: another member leads at once
            await self.member.close()
        await self.control.close()
        serving = self.workers or self.server
        assert serving is not None
        cut = await serving.stop(self.settings.proxy.shutdown_timeout)
        self.events.emit(
            "stopped",
            f"{cut} connections cut after the grace period" if cut else "clean",
            cut=cut,
            restart=self.restart_requested,
        )
        self.events.close()
        await self.admin.close()

    def _launch(self) -> Launch:
        """How the workers serve, from the running settings."""
        proxy, tls = self.settings.proxy, self.settings.proxy.tls
        return Launch(
            backlog=proxy.backlog,
            tls=(tls.cert_file, tls.key_file) if self.tls is not None else None,
            grace=proxy.shutdown_timeout,
            log_level=self.settings.log.level,
            log_format=self.settings.log.format,
        )

    def _worker_exited(self, exit_: WorkerExit) -> None:
        how = "stopped answering and was killed" if exit_.unresponsive else exit_.how
        self.events.emit(
            "worker_exited",
            f"worker {exit_.index} (pid {exit_.pid}) {how}; {exit_.lost} requests in "
            "flight lost; a new worker takes its place",
            actor="auto",
            level=logging.ERROR,
            worker=exit_.index,
            pid=exit_.pid,
            exit=exit_.how,
            unresponsive=exit_.unresponsive,
            lost=exit_.lost,
        )

    def restart(self) -> None:
        """Stop serving gracefully, then exec zdproxy again (a new binary after an
        upgrade) with the listening sockets kept open: clients wait in the backlog.
        Refused while the config file is invalid: the new process could not start."""
        if self.config_path is not None:
            try:
                load_settings(self.config_path)
            except ConfigError as exc:
                self.events.emit(
                    "restart_refused",
                    f"{exc.origin} is invalid, zdproxy keeps running: " + "; ".join(exc.errors),
                    actor="config",
                    level=logging.ERROR,
                    errors=exc.errors,
                )
                return
        log.info("restart requested: finishing requests in flight, then re-executing")
        self.restart_requested = True
        self.stop_requested.set()

    def handle_signals(self) -> None:
        """SIGTERM and SIGINT stop gracefully; SIGHUP reloads the config file; SIGUSR2
        restarts zdproxy in place."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR2, self.restart)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # blocked over a re-exec

    async def serve(self, inherited: dict[str, socket.socket]) -> dict[str, int] | None:
        """Run until stopped; for a restart, the parked listening sockets to hand on."""
        self.handle_signals()
        await self.start(inherited)
        await self.stop_requested.wait()
        log.info("stopping: finishing requests in flight")
        parked = park(self.sockets) if self.restart_requested else None
        await self.stop()
        return parked


def _bind(setting: str, address: Address, backlog: int, mode: int | None = None) -> socket.socket:
    try:
        return bind(address, backlog, mode)
    except OSError as exc:
        raise cannot_listen(setting, address, exc) from None


def _same_place(bound: str, address: Address) -> bool:
    """Is a socket bound at `bound` where `address` asks? (A host name matches any host.)"""
    if address.path is not None:
        return bound == str(address)
    here = Address.parse(bound)
    if here.port != address.port:
        return False
    try:
        return ipaddress.ip_address(address.host or "") == ipaddress.ip_address(here.host or "")
    except ValueError:
        return True  # a name: resolved by bind(), not worth a move


def run(settings: Settings, config_path: Path) -> int:
    notifier = Notifier()
    inherited = listen_fds()
    own = own_sockets()
    daemon: Daemon | None = None

    async def serve() -> dict[str, int] | None:
        nonlocal daemon
        daemon = Daemon(settings, config_path, notifier)
        daemon.own = own
        return await daemon.serve(inherited)

    try:
        parked = uvloop.run(serve())
    except CannotListen as exc:  # the config's, or the host's: exit 2
        log.error("%s", exc)
        notifier.send(f"STATUS={exc}", f"ERRNO={exc.errno}")
        return EXIT_CONFIG
    except Unprotected as exc:
        log.error("cannot start: %s", exc)
        notifier.send(f"STATUS=cannot start: {exc}", "ERRNO=0")
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot start: %s", exc)
        notifier.send(f"STATUS=cannot start: {exc}", f"ERRNO={exc.errno or 0}")
        return 1
    if parked is None:
        notifier.close()
        return 0
    assert daemon is not None
    env = {**os.environ, **hand_on(parked, daemon.own), **notifier.environment()}
    argv = [sys.executable, *sys.orig_argv[1:]]
    # Held until the new image has its handlers: a signal in between would kill it.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    log.info("re-executing %s", " ".join(argv))
    with contextlib.suppress(Exception):
        logging.shutdown()
    os.execve(sys.executable, argv, env)
