"""systemd's protocols, spoken directly: sd_notify (READY, RELOADING, STOPPING, WATCHDOG,
STATUS) and socket activation (LISTEN_FDS / LISTEN_PID / LISTEN_FDNAMES).

Both are a few lines of socket code; a library would add a dependency for no gain.
Without systemd (no NOTIFY_SOCKET, no LISTEN_FDS) every call here is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger("zdproxy.systemd")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first passed descriptor


class Notifier:
    """Sends sd_notify datagrams to $NOTIFY_SOCKET; silent when it is not set."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.pop("NOTIFY_SOCKET", "")
        self._given = address
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self._address = address
        self._socket: socket.socket | None = None
        if address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    def environment(self) -> dict[str, str]:
        """What a re-exec of this process needs to keep notifying."""
        return {"NOTIFY_SOCKET": self._given} if self._given else {}

    def send(self, *fields: str) -> None:
        """One datagram of KEY=VALUE lines; a failure is logged, never raised."""
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self._address, exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        # Type=notify-reload (systemd 253) wants MONOTONIC_USEC with RELOADING=1.
        self.send(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: finishing requests in flight")

    def watchdog_interval(self) -> float | None:
        """Half of WatchdogSec= (systemd's advice), or None when the watchdog is off."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6

    async def watchdog(self, interval: float) -> None:
        """Ping from the event loop itself: a loop that is stuck stops pinging, and systemd
        restarts the service."""
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def listen_fds() -> dict[str, socket.socket]:
    """The listening sockets passed by systemd (or systemd-socket-activate), by name.

    Names come from LISTEN_FDNAMES (FileDescriptorName= in the .socket unit: "proxy",
    "admin"). A single socket is "proxy" whatever its name (systemd names it after its
    unit by default). The variables are removed so that hooks do not inherit them.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if not count.isdigit() or pid != str(os.getpid()):
        return {}
    n = int(count)
    labels = names.split(":") if names else []
    if n == 1:
        labels = ["proxy"]
    elif len(labels) != n:
        labels = [f"fd{i}" for i in range(n)]
    sockets = {}
    for i, label in enumerate(labels):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        sockets[label] = socket.socket(fileno=fd)
    return sockets
