"""zdproxy's listening sockets: bound here, or inherited from systemd, and handed on
across a re-exec, so that the kernel keeps queueing connections while zdproxy
itself is replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat

from zdproxy.config.units import Address
from zdproxy.ops.systemd import LISTEN_FDS_START

HIGH_FD = 100  # dups parked above the range that the exec'd process hands out first


def bind(address: Address, backlog: int, mode: int | None = None) -> socket.socket:
    """A listening socket on `address`; a unix socket replaces a stale one and gets `mode`."""
    if address.path is not None:
        _remove_if_stale(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address.path)
        if mode is not None:
            os.chmod(address.path, mode)
    else:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _remove_if_stale(path: str) -> None:
    """Remove a unix socket left by a dead process; one that answers is in use, and
    binding then fails as for a TCP port in use."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)
            except OSError:
                pass


def describe(sock: socket.socket) -> str:
    """The bound address as the config spells it (port 0 resolved)."""
    name = sock.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def park(sockets: dict[str, socket.socket]) -> dict[str, int]:
    """Duplicates of the listening sockets, kept open while zdproxy stops serving, so
    that clients keep connecting (into the backlog) until the next process accepts."""
    return {
        name: fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
        for name, sock in sockets.items()
    }


def hand_on(parked: dict[str, int], own: set[str]) -> dict[str, str]:
    """Put the parked sockets at fd 3, 4, ... for an exec, as systemd passes them, and
    return the environment that names them (and those zdproxy bound itself)."""
    for i, fd in enumerate(parked.values()):
        os.dup2(fd, LISTEN_FDS_START + i, inheritable=True)
    return {
        "LISTEN_FDS": str(len(parked)),
        "LISTEN_PID": str(os.getpid()),  # an exec keeps the pid
        "LISTEN_FDNAMES": ":".join(parked),
        OWN_SOCKETS: ":".join(sorted(own)),
    }


# The passed sockets zdproxy bound itself, before a restart in place: their addresses
# follow the config. systemd's belong to its socket units and are never moved.
OWN_SOCKETS = "ZDPROXY_OWN_SOCKETS"


def own_sockets() -> set[str]:
    return {name for name in os.environ.pop(OWN_SOCKETS, "").split(":") if name}
