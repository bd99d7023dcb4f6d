"""Who may hold a connection to the admin listener: the open connections by phase, and
which one makes room for a new one. Pure bookkeeping, without sockets or clock; the
listener (admin/listener.py) times the phases and closes what this module picks.

Each connection is in one `Phase`:

- HEAD: sending a request head (timed by admin.header_timeout). At most
  `max_pending_heads` connections are in this phase: a new one past the cap displaces
  the oldest.
- BUSY: a request is being answered (an event stream, a drain with wait). Never
  displaced.
- DISCARDING: answered, while the client still sends a body the answer did not need.
- IDLE: between requests (timed by admin.idle_timeout).

At most `max_connections` are open: a new connection past it displaces the oldest
discarding one, else the oldest idle one, else the oldest in HEAD; when every one is
busy, the new one is refused. Since `max_pending_heads` is below `max_connections`,
connections that sent their request are never crowded out by slow ones, and a new
connection (the operator's `zdproxy status`) always gets in unless every slot is busy.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class Phase(Enum):
    HEAD = "head"
    BUSY = "busy"
    DISCARDING = "discarding"
    IDLE = "idle"


class Limit(Enum):
    """Why the listener closed a connection or refused one: the setting that did it."""

    HEADER_TIMEOUT = "header_timeout"
    MAX_PENDING_HEADS = "max_pending_heads"
    MAX_CONNECTIONS = "max_connections"


@dataclass(frozen=True)
class Eviction(Generic[C]):
    """An open connection to close so that a newer one gets its slot."""

    conn: C
    phase: Phase
    limit: Limit


@dataclass(frozen=True)
class Verdict(Generic[C]):
    admitted: bool
    evict: Eviction[C] | None = None


class Admission(Generic[C]):
    """The open connections by phase, each phase oldest first (by when it was entered),
    and who makes room for whom. Pure bookkeeping: no sockets, no clock."""

    def __init__(self, max_connections: int, max_pending_heads: int) -> None:
        self.max_connections = max_connections
        self.max_pending_heads = max_pending_heads
        self._phases: dict[Phase, dict[C, None]] = {phase: {} for phase in Phase}
        self._phase_of: dict[C, Phase] = {}

    def __len__(self) -> int:
        return len(self._phase_of)

    def count(self, phase: Phase) -> int:
        return len(self._phases[phase])

    def phase(self, conn: C) -> Phase | None:
        """The connection's phase; None once it is closed (or was never admitted)."""
        return self._phase_of.get(conn)

    def admit(self, conn: C) -> Verdict[C]:
        """A new connection, in HEAD; the connection it displaces, if any."""
        if self.count(Phase.HEAD) >= self.max_pending_heads:
            evict = self._evict((Phase.HEAD,), Limit.MAX_PENDING_HEADS)
        elif len(self) >= self.max_connections:
            order = (Phase.DISCARDING, Phase.IDLE, Phase.HEAD)
            evict = self._evict(order, Limit.MAX_CONNECTIONS)
            if evict is None:
                return Verdict(admitted=False)
        else:
            evict = None
        self._enter(conn, Phase.HEAD)
        return Verdict(admitted=True, evict=evict)

    def move(self, conn: C, phase: Phase) -> Eviction[C] | None:
        """Into `phase` (a closed connection stays closed); a connection that starts a
        new head may displace the oldest pending one."""
        if conn not in self._phase_of:
            return None
        self.remove(conn)
        evict = None
        if phase is Phase.HEAD and self.count(Phase.HEAD) >= self.max_pending_heads:
            evict = self._evict((Phase.HEAD,), Limit.MAX_PENDING_HEADS)
        self._enter(conn, phase)
        return evict

    def remove(self, conn: C) -> None:
        phase = self._phase_of.pop(conn, None)
        if phase is not None:
            del self._phases[phase][conn]

    def _enter(self, conn: C, phase: Phase) -> None:
        self._phase_of[conn] = phase
        self._phases[phase][conn] = None

    def _evict(self, order: tuple[Phase, ...], limit: Limit) -> Eviction[C] | None:
        for phase in order:
            if (oldest := next(iter(self._phases[phase]), None)) is not None:
                self.remove(oldest)
                return Eviction(oldest, phase, limit)
        return None
