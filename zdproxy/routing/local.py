"""Local resource errors: zdproxy's own shortage, never an upstream's failure.

A connect that fails because this process is out of file descriptors (EMFILE), the
host is out of file handles (ENFILE), kernel memory or socket buffers (ENOMEM,
ENOBUFS), or local ports (EADDRNOTAVAIL) says nothing about the upstream it was
for: the same connect to a healthy app fails alike. So these errors never count
toward outlier ejection, health verdicts or the judge; the data plane answers 503
and the health checker gives no verdict. Each is counted by kind and site
(`zdproxy_local_errors_total`) and logged at most once per REPORT_EVERY seconds per
kind and site, with the count since the last line and what to raise.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from enum import StrEnum

log = logging.getLogger("zdproxy.resources")

REPORT_EVERY = 5.0  # seconds: at most one log line per kind and site in this time


class LocalErrorKind(StrEnum):
    """Which local resource ran out: each member is named after the errno that says so."""

    EMFILE = "emfile"  # this process's file descriptor limit (RLIMIT_NOFILE)
    ENFILE = "enfile"  # the host's file handle limit (fs.file-max)
    ENOBUFS = "enobufs"  # kernel socket buffer space
    ENOMEM = "enomem"  # kernel memory
    EADDRNOTAVAIL = "eaddrnotavail"  # a free local port to connect from


class LocalErrorSite(StrEnum):
    """Where zdproxy met the error: the `where` of zdproxy_local_errors_total."""

    CONNECT = "connect"  # the data plane opening a connection to an upstream for a request
    HEALTH_CHECK = "health_check"  # the health checker opening a probe's connection


_BY_ERRNO = {getattr(errno, kind.name): kind for kind in LocalErrorKind}

# What the operator raises or checks, by kind: the end of each log line.
_ADVICE = {
    LocalErrorKind.EMFILE: "raise zdproxy's open file limit: LimitNOFILE= in its systemd "
    "unit, or ulimit -n in the shell that starts it",
    LocalErrorKind.ENFILE: "the host is out of file handles: raise fs.file-max (sysctl), "
    "or find the process that holds them",
    LocalErrorKind.ENOBUFS: "the kernel is out of socket buffer space: check free memory "
    "and net.ipv4.tcp_mem",
    LocalErrorKind.ENOMEM: "the kernel is out of memory: check free memory and the unit's "
    "MemoryMax=",
    LocalErrorKind.EADDRNOTAVAIL: "no local port is free to connect from: widen "
    "net.ipv4.ip_local_port_range, or keep more idle upstream connections "
    "(upstream.max_idle_per_upstream)",
}


def local_error_kind(error: BaseException) -> LocalErrorKind | None:
    """The local resource `error` says ran out, or None for any other error (one that
    may well be the peer's: refused, unreachable, reset, a timeout)."""
    if not isinstance(error, OSError) or error.errno is None:
        return None
    return _BY_ERRNO.get(error.errno)


def describe(kind: LocalErrorKind) -> str:
    """The errno's name and text, e.g. "EMFILE (Too many open files)"."""
    return f"{kind.name} ({os.strerror(getattr(errno, kind.name))})"


class LocalErrors:
    """Local resource errors since start, by site and kind, and their rate-limited log.

    Written by one event loop; `counts` is read by the metrics (via DataPlane and
    ControlPlane `local_errors()`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.counts: dict[tuple[LocalErrorSite, LocalErrorKind], int] = {}
        # Per site and kind: when its last line was logged, and its count then.
        self._reported: dict[tuple[LocalErrorSite, LocalErrorKind], tuple[float, int]] = {}

    def note(self, error: BaseException, site: LocalErrorSite) -> LocalErrorKind | None:
        """Count and report `error` if it is a local resource error; its kind, or None
        for any other error (not counted)."""
        kind = local_error_kind(error)
        if kind is None:
            return None
        key = (site, kind)
        count = self.counts[key] = self.counts.get(key, 0) + 1
        now = self._clock()
        last = self._reported.get(key)
        if last is None or now - last[0] >= REPORT_EVERY:
            self._reported[key] = (now, count)
            since = "since start" if last is None else f"in the last {now - last[0]:.1f}s"
            new = count - (last[1] if last is not None else 0)
            log.warning(
                "%s at %s: %d %s %s; zdproxy's own shortage, not counted against the upstream; %s",
                describe(kind),
                site,
                new,
                "time" if new == 1 else "times",
                since,
                _ADVICE[kind],
                extra={"fields": {"errno": kind.name, "where": site.value, "count": new}},
            )
        return kind
