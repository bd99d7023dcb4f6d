"""Why zdproxy cannot listen on an address, in words that say what to do about it.

A listener that cannot be bound is a problem of the config or of the host (a port
held by another process, a privileged port, an address this host does not have),
never a crash: `zdproxy run` says so in one line and exits 2.
"""

from __future__ import annotations

import errno
import os
import socket

from zdproxy.config.units import Address

PRIVILEGED_PORTS = 1024  # ports below need root or CAP_NET_BIND_SERVICE


class CannotListen(Exception):
    """A listener could not be bound; the message names the address and the remedy,
    `errno` is the system's (for systemd's ERRNO=)."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


def cannot_listen(setting: str, address: Address, exc: OSError) -> CannotListen:
    """The error of binding `address` (the value of `setting`, e.g. "proxy.listen")."""
    why = _why(address, exc)
    return CannotListen(f"cannot listen on {address} ({setting}): {why}", exc.errno or 0)


def _why(address: Address, exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {address.host!r}: {exc.strerror} (use an IP address)"
    if address.path is not None:
        return _why_unix(address.path, exc)
    port = address.port
    if exc.errno == errno.EADDRINUSE:
        return f"address already in use (another process holds it: `ss -ltnp 'sport = :{port}'`)"
    if exc.errno == errno.EACCES and 0 < port < PRIVILEGED_PORTS:
        return (
            f"permission denied: port {port} is below {PRIVILEGED_PORTS}, which needs the "
            "CAP_NET_BIND_SERVICE capability (AmbientCapabilities=CAP_NET_BIND_SERVICE in "
            "the systemd unit) or root; or let systemd bind it and pass it (socket "
            "activation: zdproxy.socket)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"address not available: no network interface of this host has {address.host} "
            "(`ip -brief address` lists them)"
        )
    return exc.strerror or str(exc)


def _why_unix(path: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"address already in use (a process answers on it: `ss -lxp src {path}`)"
    directory = os.path.dirname(path) or "/"
    if exc.errno == errno.ENOENT:
        return (
            f"no directory {directory} (create it; under systemd, RuntimeDirectory= in the "
            "unit creates /run/NAME)"
        )
    if exc.errno == errno.EACCES:
        return f"permission denied: zdproxy's user cannot create a socket in {directory}"
    return exc.strerror or str(exc)
