"""One member of a fleet: this zdproxy's link to the fleet's shared state in etcd.

Keys under the fleet's prefix P (`[fleet] prefix`):

    P/state           the shared desired state: {"values": {...}, "by": NAME, "at": TIME};
                      its mod_revision is the state's version
    P/leader          the election key: the leader's name, under its lease
    P/members/NAME    each member's own state (pools, health, versions, applied
                      revision), under its lease: it goes lease_ttl after the member dies
    P/telemetry/NAME  while a rollout runs, the member's response records since its
                      last write (every telemetry_interval), under its lease: the
                      leader judges the sum of every member's

How a change travels. The control plane makes every change locally first (validated,
journaled, routed), then calls `changed()`. The sync task compares the shared values
with those of the revision it last applied (`known`): a difference is written to
P/state by a transaction that expects that revision, fenced by the leadership while
this member leads. The watch brings every other member's writes; each is applied
in revision order. When a write finds P/state moved on (another member wrote first),
the host's `rebase` decides: a rollback of the rollout the other write carries wins
and is written on top of it; any other change is dropped, the other member's state
is applied here, and the API caller that made it hears so (`committed`).

While etcd cannot be reached the member serves on with what it applied last (its
journal holds it across restarts), it does not drive rollouts (`leads` is False), and
changes other than a rollout's end are refused by the control plane (`refusal`); a
rollback made meanwhile is written when etcd is back, and wins as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from zdproxy.config.fleet import FleetSettings
from zdproxy.fleet.election import Leadership, campaign
from zdproxy.fleet.store import (
    ABSENT,
    Compacted,
    Lease,
    LeaseLost,
    Store,
    StoreError,
    StoreUnavailable,
)
from zdproxy.routing.records import IntervalRecord

log = logging.getLogger("zdproxy.fleet")

RETRY_SECONDS = 0.5  # between tries while etcd is unavailable
# A watch that has not brought back this member's own write for this many publish
# intervals (at least [fleet] timeout) is taken for hung, and made again.
WATCH_STALL_INTERVALS = 3
FORMAT = 1  # of P/state's value


class SharedState(Protocol):
    """What the member needs of the control plane (control/shared.py meets it)."""

    def shared(self) -> dict[str, Any]:
        """The shared items' values as this member runs them, in their JSON form."""
        ...

    def adopt(self, values: dict[str, Any], origin: str) -> None:
        """Run the fleet's `values`, written by member `origin`. ValueError (naming the
        item) if one does not fit: nothing changes then."""
        ...

    def rebase(self, ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any] | None:
        """Our change lost the race to theirs: the values to write on top of theirs, or
        None when theirs stand and ours is dropped."""
        ...

    def report(self) -> dict[str, Any]:
        """This member's own state, for the fleet's status (JSON)."""
        ...


class Notify(Protocol):
    def __call__(self, kind: str, reason: str, *, level: int = logging.INFO, **data: Any) -> None:
        """Raise an event of this member (control/events.py)."""
        ...


class Written(NamedTuple):
    """P/state as read or watched: its values, the member that wrote them, and its
    mod_revision."""

    values: dict[str, Any]
    by: str
    revision: int


def encode(values: dict[str, Any], by: str) -> bytes:
    body = {"format": FORMAT, "values": values, "by": by, "at": round(time.time(), 3)}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def decode(data: bytes, revision: int) -> Written:
    """P/state's value; ValueError if it is not one."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("values"), dict):
        raise ValueError("not an object with values")
    return Written(body["values"], str(body.get("by", "")), revision)


async def _first(*events: asyncio.Event) -> None:
    """Return when any of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _object(data: bytes) -> dict[str, Any] | None:
    """A member's published state; None if it is not one (a member writes only its own
    key: another's is not this member's to judge)."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Member:
    """This zdproxy in its fleet. `start` joins (reads the fleet's state, or founds it
    with this member's), then tasks keep it in step until `close`."""

    def __init__(
        self,
        store: Store,
        fleet: FleetSettings,
        host: SharedState,
        notify: Notify,
        clock: Callable[[], float] = time.monotonic,
        cache: Path | None = None,
    ) -> None:
        """`cache`: a file that keeps the fleet's state this member last applied (its
        revision and values) across restarts: a change made here that the fleet has
        not seen (a rollback while etcd was away, then a restart) is told from it."""
        self.store = store
        self.cache = cache
        self.fleet = fleet
        self.name = fleet.name
        self.host = host
        self.notify = notify
        self.clock = clock
        self.state_key = fleet.key("state")
        self.leader_key = fleet.key("leader")
        self.members_prefix = fleet.key("members") + "/"
        self.member_key = self.members_prefix + self.name
        self.telemetry_prefix = fleet.key("telemetry") + "/"
        self.telemetry_key = self.telemetry_prefix + self.name
        # What this member runs of the fleet's state: the values of revision `applied`
        # (0: none applied yet, and no cache: `known` is then the journal's).
        self.known: dict[str, Any] = host.shared()
        self.applied = 0
        self._recall()
        self.latest: Written | None = None  # the newest P/state the watch brought
        self.leader = ""  # the leader's name, as last seen
        self.leadership: Leadership | None = None
        # The leadership a change to push was made under: the write is fenced by it, so
        # a move of a leader that lost its lease meanwhile is refused by etcd itself.
        self._fence: Leadership | None = None
        self._deposed = asyncio.Event()  # P/leader no longer names this member
        self.lease: Lease | None = None  # this member's: its key and its leadership live under it
        self.available = False
        self.reason = "not connected yet"
        self._said_unavailable = False
        self.since = clock()  # when `available` last changed
        self.joined = asyncio.Event()
        self.conflicts = 0  # changes of this member dropped for another's
        self.store_errors = 0
        self.writes = 0  # to etcd, since start
        self.reports: dict[str, dict[str, Any]] = {}  # every member's published state, by name
        self.bytes_written = 0
        self._generation = 0  # changes made here so far (see `committed`)
        self._settled = 0  # the last generation written, or dropped
        self._lost = (0, "")  # the last generation dropped, and why
        self._progress = asyncio.Condition()
        self._wake = asyncio.Event()
        self._publish_now = asyncio.Event()
        self._own: dict[str, int] = {}  # this member's keys under its lease: mod_revisions
        self._outbox: list[dict[str, Any]] = []  # records to publish
        self._inbox: list[IntervalRecord] = []  # other members' records, for the judge
        self._watch_from = 0
        self._watcher: asyncio.Task[None] | None = None
        # The first write of this member's own key the watch has not brought back yet
        # (revision, when): a watch whose connection hangs without an error never does.
        self._unechoed: tuple[int, float] | None = None
        self._echoed = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._nudges: set[asyncio.Future[None]] = set()

    # -- what the control plane calls ---------------------------------------------------

    def changed(self) -> None:
        """The desired state changed here: the sync task writes what is shared, if it
        differs from the fleet's."""
        self._generation += 1
        if self._fence is None and self.leads():
            self._fence = self.leadership
        self._wake.set()

    def leads(self) -> bool:
        """This member drives rollouts: it holds the leadership and reaches etcd."""
        held = self.leadership is not None and not self.leadership.lease.lost.is_set()
        return held and self.available

    def refusal(self) -> str | None:
        """Why a change of the shared state is refused now, if it is."""
        if self.available:
            return None
        return (
            f"fleet: etcd is unavailable ({self.reason}): changes of the fleet's state are "
            "refused until it is back; traffic is served by the last state applied, and "
            "rollbacks still happen"
        )

    def committed(self) -> Awaitable[str | None]:
        """Wait until the changes made here so far (up to this call, not to the wait's
        start) are written to etcd, or dropped: why one was dropped (another member's
        change won), else None. Returns at once while etcd is unavailable: the change
        runs here and is written when etcd is back."""
        return self._committed(self._generation)

    async def _committed(self, wanted: int) -> str | None:
        async with self._progress:
            while self._settled < wanted and self.available:
                await self._progress.wait()
        lost, reason = self._lost
        return reason if reason and lost >= wanted else None

    def offer(self, records: list[IntervalRecord]) -> None:
        """This member's records of one tick, to publish for the leader's judge."""
        self._outbox.extend(record.to_dict() for record in records)

    def take_remote(self) -> list[IntervalRecord]:
        """The other members' records that arrived since the last call."""
        inbox, self._inbox = self._inbox, []
        return inbox

    def status(self) -> dict[str, Any]:
        latest = self.latest.revision if self.latest is not None else self.applied
        return {
            "member": self.name,
            "prefix": self.fleet.prefix,
            "leader": self.leader,
            "leading": self.leads(),
            "applied_revision": self.applied,
            "latest_revision": max(latest, self.applied),
            "available": self.available,
            "reason": "" if self.available else self.reason,
            "since_seconds": round(self.clock() - self.since, 3),
            "pending": self.host.shared() != self.known,
            "lease": self.lease is not None and not self.lease.lost.is_set(),
            "conflicts": self.conflicts,
            "store_errors": self.store_errors,
            "writes": self.writes,
            "bytes_written": self.bytes_written,
        }

    async def members(self) -> list[dict[str, Any]]:
        """Every member's published state, read now (StoreUnavailable if etcd cannot
        be read); `reports` has them as the watch brought them."""
        listing = await self.store.range(self.members_prefix)
        found = (_object(entry.value) for entry in listing.entries)
        return [report for report in found if report is not None]

    # -- life cycle ----------------------------------------------------------------------

    async def start(self, within: float) -> None:
        """Join the fleet, waiting at most `within` seconds: a member reads etcd before
        it serves. If etcd does not answer in time it serves the journal's state, and
        joins when etcd is back."""
        self._tasks = [asyncio.ensure_future(self._run())]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self.joined.wait()

    async def close(self) -> None:
        """Leave: the leadership and this member's key go at once (the lease is revoked),
        so another member leads without waiting out the TTL."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.lease is not None and self.available:  # else: it expires by itself
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(self.fleet.timeout):
                    await self.store.revoke(self.lease)
        await self.store.close()

    async def _run(self) -> None:
        while True:
            try:
                await self._join()
                break
            except Exception as exc:  # this task must live: see _trouble
                self._trouble(exc)
                await asyncio.sleep(RETRY_SECONDS)
        others = [self._lead_forever(), self._publish_forever(), self._telemetry_forever()]
        self._tasks += [asyncio.ensure_future(work) for work in others]
        self._watch()
        await self._sync_forever()

    async def _join(self) -> None:
        """Read the fleet's keys; run its state (or found it with ours), then watch."""
        listing = await self.store.range(self.fleet.prefix + "/")
        self._up()
        self._watch_from = listing.revision + 1
        state: Written | None = None
        for entry in listing.entries:
            if entry.key == self.state_key:
                state = self._decoded(entry.value, entry.mod_revision)
            else:
                self._seen(entry.key, entry.value, entry.mod_revision)
        ours = self.host.shared()
        if state is None:  # the first member: the fleet starts from its state
            await self._push(ours, ABSENT)
        elif ours == self.known:  # no change here since the start: the fleet's state
            self._apply(state)
        else:  # a change made here while etcd was away (a rollback): as a lost race
            self._rebase(ours, state)
        self.joined.set()
        self._wake.set()
        self.notify(
            "fleet_joined",
            f"joined fleet {self.fleet.prefix} at revision {self.applied}"
            + (f"; leader {self.leader}" if self.leader else "; no leader yet"),
            revision=self.applied,
            leader=self.leader,
        )

    # -- the shared state ------------------------------------------------------------------

    async def _sync_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._sync()
            except Exception as exc:  # this task must live: see _trouble
                self._trouble(exc)
                await asyncio.sleep(RETRY_SECONDS)
                self._wake.set()

    async def _sync(self) -> None:
        """Write this member's change, or apply the fleet's newer state, until neither
        is left; then every change made so far is settled."""
        while True:
            ours = self.host.shared()
            if ours != self.known:
                await self._push(ours, self.applied)
            elif self.latest is not None and self.latest.revision > self.applied:
                self._apply(self.latest)
            else:
                break
        self._fence = None  # nothing left to push under it
        await self._settle(self._generation)

    async def _push(self, ours: dict[str, Any], expected: int) -> None:
        covered = self._generation
        fence = self._fence
        body = encode(ours, self.name)
        fences = [fence.fence] if fence is not None else []
        revision = await self.store.put_if(self.state_key, body, expected, fences=fences)
        self._up()
        self._count(body)
        if revision is not None:
            self._fence = None
            self._ran(revision, ours)
            await self._settle(covered)
            return
        read = await self.store.get(self.state_key)
        if read.mod_revision == expected and fence is not None:  # the fence failed
            self._fence = None
            if self.leadership is fence:
                self._deposed.set()
        if read.value is None:  # deleted by hand: found it again
            self.applied, self.known = ABSENT, {}
            return
        theirs = self._decoded(read.value, read.mod_revision)
        if theirs is None:  # not a state: ours replaces it
            self.applied, self.known = read.mod_revision, {}
            return
        # What runs here now: the awaits above let this member change more (a rollback).
        current = self.host.shared()
        if theirs.values == current:  # our own write, applied after a lost answer
            self._ran(theirs.revision, current)
            await self._settle(covered)
        elif not self._rebase(current, theirs):
            await self._settle(covered, f"{theirs.by or 'another member'} changed it first")

    def _rebase(self, ours: dict[str, Any], theirs: Written) -> bool:
        """Our change met theirs: True if ours is written on top of it (the next sync
        does), False when it is dropped and theirs runs here."""
        merged = self.host.rebase(ours, theirs.values)
        if merged is None:
            self.conflicts += 1
            self.notify(
                "fleet_conflict",
                f"a change made here lost to revision {theirs.revision} of "
                f"{theirs.by or 'another member'}: the fleet's state runs here",
                level=logging.WARNING,
                revision=theirs.revision,
                winner=theirs.by,
            )
            self._apply(theirs)
            return False
        self._apply(theirs._replace(values=merged))
        self._ran(theirs.revision, theirs.values)  # the merge differs: it is written next
        return True

    def _apply(self, state: Written) -> None:
        known = state.values
        if state.values != self.host.shared():
            try:
                self.host.adopt(state.values, state.by)
            except ValueError as exc:
                # Not written over either: it may be valid for members with a newer config.
                known = self.host.shared()
                self.notify(
                    "fleet_rejected",
                    f"revision {state.revision} of {state.by or 'another member'} is not "
                    f"valid here ({exc}); the running state stays",
                    level=logging.ERROR,
                    revision=state.revision,
                )
        self._ran(state.revision, known)

    def _ran(self, revision: int, values: dict[str, Any]) -> None:
        """This member runs the fleet's `values` of `revision` (or has written them)."""
        self.applied, self.known = revision, values
        self._publish_now.set()
        self._remember()

    def _recall(self) -> None:
        """The fleet's state this member last ran, from the cache (if it is this
        fleet's): what the journal holds beyond it was changed here unseen."""
        if self.cache is None:
            return
        try:
            cached = json.loads(self.cache.read_bytes())
            if cached["prefix"] == self.fleet.prefix and isinstance(cached["values"], dict):
                self.applied, self.known = int(cached["revision"]), cached["values"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("fleet: ignoring the cache %s: %s", self.cache, exc)

    def _remember(self) -> None:
        if self.cache is None:
            return
        body = {"prefix": self.fleet.prefix, "revision": self.applied, "values": self.known}
        temporary = self.cache.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps(body, sort_keys=True))
            os.replace(temporary, self.cache)
        except OSError as exc:  # the journal keeps the state; only a rollback's fate needs it
            log.warning("fleet: cannot write the cache %s: %s", self.cache, exc.strerror)

    def _decoded(self, data: bytes, revision: int) -> Written | None:
        try:
            return decode(data, revision)
        except ValueError as exc:
            self.notify(
                "fleet_rejected",
                f"{self.state_key} at revision {revision} is not a fleet state ({exc}); "
                "the running state stays",
                level=logging.ERROR,
                revision=revision,
            )
            return None

    async def _settle(self, generation: int, lost: str = "") -> None:
        async with self._progress:
            self._settled = max(self._settled, generation)
            if lost:
                self._lost = (generation, lost)
            self._progress.notify_all()

    def _watch(self) -> None:
        """(Re)start the watch, from the revision after the last change it brought."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._tasks.remove(self._watcher)
        self._watcher = asyncio.ensure_future(self._watch_forever())
        self._tasks.append(self._watcher)

    def _check_watch(self, written: int) -> None:
        """This member's own key was written at `written`: a watch that has not brought
        back an earlier write for a few publish intervals hangs, and is made again."""
        if self._unechoed is not None and self._echoed >= self._unechoed[0]:
            self._unechoed = None
        if self._unechoed is None:
            if written > self._echoed:
                self._unechoed = (written, self.clock())
            return
        waited = self.clock() - self._unechoed[1]
        if waited >= max(WATCH_STALL_INTERVALS * self.fleet.publish_interval, self.fleet.timeout):
            self.notify(
                "fleet_watch_restarted",
                f"the watch brought no change for {waited:.1f}s, not even this member's own "
                f"write at revision {self._unechoed[0]}: it is made again, from revision "
                f"{self._watch_from}",
                level=logging.WARNING,
            )
            self._unechoed = None
            self._watch()

    async def _watch_forever(self) -> None:
        """Every change of the fleet's keys, in revision order: P/state's wake the sync,
        P/leader's say who leads. A compacted history is read afresh."""
        while True:
            try:
                async with aclosing(
                    self.store.watch(self.fleet.prefix + "/", self._watch_from)
                ) as changes:
                    async for change in changes:
                        self._watch_from = change.revision + 1
                        self._seen(change.key, change.value, change.revision)
            except Compacted:
                try:
                    await self._reread()
                except Exception as exc:  # this task must live: see _trouble
                    self._trouble(exc)
                    await asyncio.sleep(RETRY_SECONDS)
            except Exception as exc:  # this task must live: see _trouble
                self._trouble(exc)
                await asyncio.sleep(RETRY_SECONDS)

    async def _reread(self) -> None:
        """The keys afresh after a compaction: the members and the leader as they are
        (the changes between were lost); records not again (they were counted)."""
        listing = await self.store.range(self.fleet.prefix + "/")
        self._watch_from = listing.revision + 1
        self.reports.clear()
        self.leader = ""  # unless the listing has the key (a leader's own stays)
        for entry in listing.entries:
            if not entry.key.startswith(self.telemetry_prefix):
                self._seen(entry.key, entry.value, entry.mod_revision)

    def _seen(self, key: str, value: bytes | None, revision: int) -> None:
        if key == self.member_key:
            self._echoed = max(self._echoed, revision)
        elif key == self.state_key and value is not None:
            state = self._decoded(value, revision)
            if state is not None and (self.latest is None or revision > self.latest.revision):
                self.latest = state
                self._wake.set()
        elif key == self.leader_key:
            self.leader = value.decode(errors="replace") if value is not None else ""
            held = self.leadership
            if held is not None and revision > held.revision and self.leader != self.name:
                self._deposed.set()  # deleted (by hand) or taken since: campaign again
        elif key.startswith(self.members_prefix):
            name = key.removeprefix(self.members_prefix)
            report = _object(value) if value is not None else None
            if report is None:
                self.reports.pop(name, None)
            else:
                self.reports[name] = report
        elif key.startswith(self.telemetry_prefix) and key != self.telemetry_key and value:
            try:
                self._inbox += [IntervalRecord.from_dict(r) for r in json.loads(value)["records"]]
            except (ValueError, KeyError, TypeError):
                log.warning("fleet: %s at revision %d is not a batch of records", key, revision)

    # -- leadership and this member's own key ----------------------------------------------

    async def _lead_forever(self) -> None:
        """Hold a lease (this member's key lives under it) and campaign with it, until
        the lease is lost (etcd away for a TTL: a new one then) or the election key no
        longer names this member (campaign again)."""
        while True:
            try:
                lease = self.lease
                if lease is None or lease.lost.is_set():
                    lease = await self.store.lease(self.fleet.lease_ttl)
                    self._up()
                    self._own.clear()  # the keys of a lost lease are gone with it
                    self.lease = lease
                    self._publish_now.set()
                leadership = await campaign(self.store, self.leader_key, self.name.encode(), lease)
                self._deposed.clear()
                self.leadership, self.leader = leadership, self.name
                self.notify("fleet_leader", f"{self.name} leads the fleet", leader=self.name)
                await _first(lease.lost, self._deposed)
            except LeaseLost:
                pass
            except Exception as exc:  # this task must live: see _trouble
                self._trouble(exc)
                await asyncio.sleep(RETRY_SECONDS)
            if self.leadership is not None:
                self.leadership = None
                self.notify(
                    "fleet_leadership_lost",
                    f"{self.name} no longer leads (its lease ended, or the election key was "
                    "taken): it no longer drives the rollout",
                    level=logging.WARNING,
                )

    async def _publish_forever(self) -> None:
        """This member's own state, under its lease: at each applied revision, and every
        publish_interval."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.fleet.publish_interval):
                    await self._publish_now.wait()
            self._publish_now.clear()
            try:
                report = {
                    "name": self.name,
                    "applied_revision": self.applied,
                    "leading": self.leads(),
                    "published": round(time.time(), 3),
                    **self.host.report(),
                }
                if (written := await self._put_own(self.member_key, report)) is not None:
                    self._check_watch(written)
            except Exception as exc:  # this task must live: see _trouble
                self._trouble(exc)

    async def _telemetry_forever(self) -> None:
        """The records offered since the last write, every telemetry_interval (none
        between rollouts: the control plane offers none then). Records that cannot be
        written are dropped: a judge wants them fresh or not at all."""
        while True:
            await asyncio.sleep(self.fleet.telemetry_interval)
            batch, self._outbox = self._outbox, []
            if batch:
                await self._put_own(self.telemetry_key, {"records": batch})

    async def _put_own(self, key: str, body: dict[str, Any]) -> int | None:
        """Write one of this member's own keys under its lease (skipped without one):
        the revision written, or None."""
        lease = self.lease
        if lease is None or lease.lost.is_set():
            return None
        data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        try:
            revision = await self.store.put_if(key, data, self._own.get(key, ABSENT), lease=lease)
            self._count(data)
            if revision is None:  # written before this lease, or by hand: take it over
                self._own[key] = (await self.store.get(key)).mod_revision
                revision = await self.store.put_if(key, data, self._own[key], lease=lease)
            if revision is not None:
                self._own[key] = revision
            self._up()
            return revision
        except LeaseLost:
            pass  # the lead task takes a new lease
        except Exception as exc:  # this task must live: see _trouble
            self._trouble(exc)
        return None

    # -- etcd's reach ----------------------------------------------------------------------

    def _count(self, body: bytes) -> None:
        self.writes += 1
        self.bytes_written += len(body)

    def _up(self) -> None:
        if not self.available:
            self.available, self.reason, self.since = True, "", self.clock()
            if self._said_unavailable:
                self._said_unavailable = False
                self.notify("fleet_store_available", "etcd answers again")
            self._wake.set()

    def _trouble(self, exc: Exception) -> None:
        """A call of one of this member's tasks failed: the task goes on after a pause.
        Whatever etcd answered (unavailable, refused: a full database, a permission)
        counts as etcd unavailable, with its reason; anything else is a bug, logged."""
        if isinstance(exc, StoreUnavailable):
            self._unavailable(exc.reason)
        elif isinstance(exc, StoreError):
            self._unavailable(f"etcd refused a call: {exc}")
        else:
            log.error("fleet: internal error", exc_info=exc)
            self._unavailable(f"internal error: {exc!r}")

    def _unavailable(self, reason: str) -> None:
        self.store_errors += 1
        self.reason = reason
        if self.available:
            self.available, self.since = False, self.clock()
            # A caller waiting for its change to reach etcd hears now that it will not.
            nudge = asyncio.ensure_future(self._settle(self._settled))
            self._nudges.add(nudge)
            nudge.add_done_callback(self._nudges.discard)
        if not self._said_unavailable:
            self._said_unavailable = True
            self.notify(
                "fleet_store_unavailable",
                f"etcd is unavailable ({reason}): serving the last state applied "
                f"(revision {self.applied}); rollouts do not advance",
                level=logging.ERROR,
                revision=self.applied,
            )
