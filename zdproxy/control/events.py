"""The event log: every decision zdproxy takes or is told to take, with its reason.

Each event says who acted twice: `actor`, the kind of actor (an operator through the
API or the CLI, a reload of the config file, or zdproxy on its own: "auto"), and
`by`, which one precisely: for "auto" the part of zdproxy that decided ("judge",
"health", "outliers", "rollout 4", "zdproxy"). Its time is kept as seconds since the
epoch (`time`) and shown in RFC 3339, UTC (`timestamp`).

Events live in a bounded ring (GET /v1/events), are appended to a JSON-lines file
that is rotated by size (events.jsonl, events.jsonl.1, ...), are logged, and are
pushed to followers (server-sent events). Writing the file never fails a caller:
a full disk costs the file copy, not the decision. Reading it back at start trusts
no line: each is validated with the API's event model (`EventRecord`), and one that
does not fit is skipped and counted (one `events_skipped` event says how many).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, computed_field, model_validator

log = logging.getLogger("zdproxy.events")

# Who asked: an operator through the admin API or the CLI, a reload of the config file
# (SIGHUP, a file change), or nobody (zdproxy acted on its own).
Actor = Literal["api", "cli", "auto", "config", "fleet"]
AUTO_BY = "zdproxy"  # `by` of an automatic event whose emitter names no part of zdproxy
FOLLOWER_BACKLOG = 1000
TAIL_BYTES = 1024 * 1024  # how much of the file start-up reads back into the ring


def rfc3339(seconds: float) -> str:
    """Seconds since the epoch as an RFC 3339 UTC timestamp, to the millisecond."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    time: float  # seconds since the epoch
    kind: str
    reason: str
    actor: Actor
    by: str  # see EventRecord.by
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def timestamp(self) -> str:
        return rfc3339(self.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "timestamp": self.timestamp,
            "kind": self.kind,
            "reason": self.reason,
            "actor": self.actor,
            "by": self.by,
            "data": self.data,
        }


class EventRecord(BaseModel):
    """An event as the API serves it and the file keeps it, one per line."""

    id: int
    time: float = Field(description="Seconds since the epoch.")
    kind: str
    reason: str
    actor: Actor = Field(
        description='Who asked: "api" or "cli" (an operator), "config" (a reload of the '
        'config file by SIGHUP or a file change), "auto" (nobody: zdproxy on its own), '
        '"fleet" (another member of the fleet, named by `by`: "member NAME").'
    )
    by: str = Field(
        default="",
        max_length=100,
        description='Who acted, precisely: the actor itself for "api", "cli" and "config"; '
        'for "auto" the part of zdproxy that decided: "judge" (its verdict ended a '
        'rollout), "rollout N" (the plan\'s own moves: steps, timeouts, hooks, the old '
        'color\'s drain), "health" (a health check verdict), "outliers" (outlier '
        'ejection), "zdproxy" (the process itself: start, stop, the journal); an event '
        "written before zdproxy recorded `by` has its actor.",
    )
    data: dict[str, Any]

    @computed_field(description="`time` in RFC 3339, UTC, to the millisecond.")  # type: ignore[prop-decorator]
    @property
    def timestamp(self) -> str:
        return rfc3339(self.time)

    @model_validator(mode="after")
    def _by_the_actor(self) -> EventRecord:
        if not self.by:  # a line written before `by` existed: who is not known better
            self.by = self.actor
        return self


class EventLog:
    """A bounded ring plus a rotated JSON-lines file, with live followers."""

    def __init__(
        self, path: Path | None, *, in_memory: int = 1000, file_max: int = 0, files_kept: int = 3
    ) -> None:
        self.path = path
        self.counts: Counter[str] = Counter()  # events emitted since start, by kind (/metrics)
        self._ring: deque[Event] = deque(maxlen=in_memory)
        self._file_max = file_max
        self._files_kept = files_kept
        self._followers: set[_Follower] = set()
        self._torn = False  # the file ends in a partial line (a crash mid-write)
        self.skipped: list[str] = []  # why each line of the file that did not fit was skipped
        self.member = ""  # in fleet mode, this member's name: every event carries it
        self._next_id = 1 + self._load_tail()
        if self.skipped:
            self.emit(
                "events_skipped",
                f"{len(self.skipped)} lines of {self.path} are not events and were skipped "
                f"(the first: {self.skipped[0]})",
                level=logging.WARNING,
                count=len(self.skipped),
            )

    def emit(
        self,
        kind: str,
        reason: str,
        *,
        actor: Actor = "auto",
        by: str = "",
        level: int = logging.INFO,
        **data: Any,
    ) -> Event:
        """Record one decision. `by`: the part of zdproxy that acted on its own (see
        EventRecord.by); default the actor, or "zdproxy" for "auto"."""
        by = by or (actor if actor != "auto" else AUTO_BY)
        if self.member:
            data = {"member": self.member, **data}
        event = Event(self._next_id, time.time(), kind, reason, actor, by, data)
        self._next_id += 1
        self.counts[kind] += 1
        self._ring.append(event)
        fields: dict[str, Any] = {"event": event.id, "actor": actor}
        if by != actor:
            fields["by"] = by
        log.log(level, "%s: %s", kind, reason, extra={"fields": fields})
        self._append(event)
        for follower in list(self._followers):
            follower.push(event)
        return event

    def history(self, since: int = 0, kind: str | None = None) -> list[Event]:
        """Events in memory with an id above `since`, oldest first, of `kind` if given."""
        return [e for e in self._ring if e.id > since and (kind is None or e.kind == kind)]

    def follow(self) -> _Follower:
        """A subscription that queues every event emitted from now on."""
        return _Follower(self)

    def close(self) -> None:
        """End every follower's stream (zdproxy is stopping)."""
        for follower in list(self._followers):
            follower.end()

    # -- the file ---------------------------------------------------------------------

    def _load_tail(self) -> int:
        """Put the newest events of the file back in the ring (the history outlives a
        restart) and return the last id: ids continue, so a follower's Last-Event-ID
        keeps its meaning."""
        if self.path is None:
            return 0
        try:
            with self.path.open("rb") as file:
                start = max(0, file.seek(0, os.SEEK_END) - TAIL_BYTES)
                file.seek(start)
                data = file.read()
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.error("event log: cannot read %s: %s", self.path, exc.strerror)
            return 0
        self._torn = bool(data) and not data.endswith(b"\n")
        lines = data.splitlines()
        if start and lines:
            del lines[0]  # cut by the seek: not a fault
        last = 0
        for number, line in enumerate(lines, 1):
            try:
                record = EventRecord.model_validate_json(line)
            except ValidationError as exc:
                error = exc.errors(include_url=False)[0]
                if error["type"] == "json_invalid" and "EOF" in error["msg"]:
                    continue  # a line cut short by a crash mid-write: not a fault
                where = ".".join(str(part) for part in error["loc"])
                self.skipped.append(f"line {number} of the tail: {where} {error['msg']}"[:300])
                continue
            self._ring.append(Event(**record.model_dump(exclude={"timestamp"})))
            last = max(last, record.id)  # a line out of order must not make ids repeat
        return last

    def _append(self, event: Event) -> None:
        if self.path is None:
            return
        line = json.dumps(event.to_dict(), separators=(",", ":"), default=str) + "\n"
        if self._torn:  # end the partial line, so that this event is a line of its own
            line = "\n" + line
            self._torn = False
        try:
            if self._file_max and self._size() + len(line) > self._file_max:
                self._rotate()
            with self.path.open("a", encoding="utf-8") as file:
                file.write(line)
        except OSError as exc:
            log.error("event log: cannot write %s: %s", self.path, exc.strerror)

    def _size(self) -> int:
        assert self.path is not None
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def _rotate(self) -> None:
        assert self.path is not None
        for i in range(self._files_kept, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            newer = self.path.with_name(f"{self.path.name}.{i - 1}") if i > 1 else self.path
            if i == self._files_kept:
                older.unlink(missing_ok=True)
            if newer.exists():
                newer.rename(older)
        if self._files_kept == 0:
            self.path.unlink(missing_ok=True)


class _Follower:
    """`with log.follow() as events:` then `await events.next(wait)`.

    A follower that falls FOLLOWER_BACKLOG events behind is ended rather
    than let memory grow; an SSE client reconnects with Last-Event-ID and loses nothing
    that is still in the ring. All followers end when zdproxy stops.
    """

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(FOLLOWER_BACKLOG)
        self.ended = False

    def __enter__(self) -> _Follower:
        self._log._followers.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._log._followers.discard(self)

    def push(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.end()

    def end(self) -> None:
        """No more events: `next` answers None at once from now on."""
        self.ended = True
        self._log._followers.discard(self)
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)  # wakes a waiting `next`

    async def next(self, wait: float) -> Event | None:
        """The next event, or None when none came within `wait` seconds, or at once when
        the stream ended (see `ended`) and nothing is left."""
        if self.ended and self._queue.empty():
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), wait)
        except TimeoutError:
            return None
