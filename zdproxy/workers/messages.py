"""What goes between the main process and a worker: plain frozen values, pickled.

Down (main → worker): Start once, then Apply, Configure, LoadTls, Ask and Stop.
Up (worker → main): Report every REPORT_SECONDS (and at once after an Apply, so the
main learns quickly that a snapshot is in force), Answer to each Ask, Stopped last.
Both ends are zdproxy of the same version started by the same main process, so
pickle is safe here: nothing else can write to the socket pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from zdproxy.routing.local import LocalErrorKind, LocalErrorSite
from zdproxy.routing.records import IntervalRecord
from zdproxy.routing.snapshot import RoutingSnapshot

REPORT_SECONDS = 0.025  # a worker's report period while it has traffic
HEARTBEAT_SECONDS = 0.25  # and while it has none: a report is also its heartbeat


# -- down ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """The first message: everything a worker needs before it accepts."""

    index: int  # which worker this is, from 1: its process title and log lines say so
    limits: dict[str, Any]  # the Limits' init fields (derived ones are made per worker)
    snapshot: RoutingSnapshot
    tls: tuple[str, str] | None  # (cert_file, key_file) of the proxy listener
    backlog: int
    grace: float  # proxy.shutdown_timeout: for a SIGTERM, or when the main process is gone
    log_level: str
    log_format: str


@dataclass(frozen=True)
class Apply:
    snapshot: RoutingSnapshot


@dataclass(frozen=True)
class Configure:
    limits: dict[str, Any]
    grace: float
    log_level: str
    log_format: str


@dataclass(frozen=True)
class LoadTls:
    """The certificate files changed (and were checked by the main process)."""

    cert_file: str
    key_file: str


class Action(StrEnum):
    """What an Ask asks of a worker, on a set of upstreams: the DataPlane Protocol's
    commands that act on requests in flight."""

    CLOSE_TUNNELS = "close_tunnels"
    CUT = "cut"
    EVACUATE = "evacuate"
    FORGET_STREAK = "forget_streak"


@dataclass(frozen=True)
class Ask:
    serial: int  # the Answer carries it back
    action: Action
    ids: frozenset[str]
    grace: float = 0.0  # EVACUATE only


@dataclass(frozen=True)
class Stop:
    """Stop accepting, finish what is in flight within `grace`, cut the rest, exit."""

    grace: float


# -- up --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What a worker saw since its last report, and its state now."""

    version: int  # of the snapshot in force in the worker
    records: list[IntervalRecord]  # counts since the last report; `pending` is as of now
    streaks: dict[str, int]  # failures in a row, by upstream id (only those above 0)
    in_flight: dict[str, tuple[int, int]]  # (requests, tunnels) by upstream id, now
    connections: int  # client connections open now
    # Running totals since the worker started (the main adds those of workers gone).
    retries: dict[str, int]
    pins: dict[str, int]
    preview_honoured: dict[str, int]
    preview_ignored: dict[str, int]
    local_errors: dict[tuple[LocalErrorSite, LocalErrorKind], int] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    serial: int
    result: tuple[int, int]  # (count, second count): EVACUATE's (replayed, left), else (n, 0)


@dataclass(frozen=True)
class Stopped:
    cut: int  # connections cut after the grace period
