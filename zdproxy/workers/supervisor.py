"""The main process's side of the workers: starts them, keeps them, and speaks for
them as one data plane.

`WorkerSet` meets the DataPlane Protocol (routing/plane.py): `apply` sends the
snapshot to every worker (each applies it in the order sent, and reports at once);
`collect`, `failure_streaks`, `in_flight` and the counters read the workers'
reports, summed (tally.py); the commands on requests in flight go to every worker
and their awaitables give the summed answers. A worker that exits, or sends nothing
for UNRESPONSIVE_SECONDS (it is then killed), is replaced at once; the requests it
had in flight are lost and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from zdproxy.dataplane.limits import Limits
from zdproxy.routing.local import LocalErrorKind, LocalErrorSite
from zdproxy.routing.plane import Done, WorkerState
from zdproxy.routing.records import IntervalRecord, OverrideCounters
from zdproxy.routing.snapshot import RoutingSnapshot
from zdproxy.workers.channel import ChannelClosed
from zdproxy.workers.messages import Action, Apply, Configure, LoadTls, Report, Start, Stop
from zdproxy.workers.place import Launch, Place, WorkerExit
from zdproxy.workers.tally import Totals, merge

log = logging.getLogger("zdproxy.workers")

START_SECONDS = 30.0  # a worker that has not reported by then makes the start fail
UNRESPONSIVE_SECONDS = 0.75  # silence (about 3 missed heartbeats) that gets a worker killed
QUICK_DEATH_SECONDS = 1.0  # a worker that dies this young is replaced after as long
ASK_SECONDS = 5.0  # a worker that has not answered a command by then counts as 0
STOP_MARGIN = 5.0  # beyond the grace, before a worker that has not exited is killed
_WATCH_SECONDS = 0.1


class WorkerSet:
    def __init__(
        self,
        count: int,
        limits: Limits,
        on_exit: Callable[[WorkerExit], None],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._places = [Place(i) for i in range(1, count + 1)]
        self._limits = limits
        self._on_exit = on_exit
        self._snapshot = RoutingSnapshot(version=0, live="blue", candidate_weight=0)
        self._launch: Launch | None = None
        self._listener: socket.socket | None = None
        self._gone = Totals()  # the running totals of worker processes that ended
        self._orphans: list[IntervalRecord] = []  # their counts not yet collected
        self._serial = 0
        self._stopping = False
        self._watcher: asyncio.Task[None] | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # settled(), by version

    # -- serving (asked by the daemon) --------------------------------------------------

    async def listen(self, sock: socket.socket, launch: Launch) -> None:
        """Start every worker on the listening socket; returns once all serve it."""
        self._listener, self._launch = sock, launch
        for place in self._places:
            await self._start(place)
        try:
            async with asyncio.timeout(START_SECONDS):
                await asyncio.gather(*(s.ready for s in self._places if s.ready is not None))
        except TimeoutError:
            late = [str(s.index) for s in self._places if s.ready is None or not s.ready.done()]
            raise OSError(
                f"workers {', '.join(late)} did not start in {START_SECONDS:g}s"
            ) from None
        self._watcher = asyncio.ensure_future(self._watch())

    def configure(self, limits: Limits, launch: Launch) -> None:
        """New limits, grace and log settings for every worker (the listener stays)."""
        self._limits = limits
        self._launch = launch
        message = Configure(_fields(limits), launch.grace, launch.log_level, launch.log_format)
        self._broadcast(message)

    def load_tls(self, cert_file: str, key_file: str) -> None:
        self._broadcast(LoadTls(cert_file, key_file))

    async def stop(self, grace: float) -> int:
        """Every worker stops accepting, finishes within `grace` and exits; returns how
        many connections they cut."""
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
        self._broadcast(Stop(grace))
        followers = [s.follower for s in self._places if s.follower is not None]
        if followers:
            _, late = await asyncio.wait(followers, timeout=grace + STOP_MARGIN)
            for place in self._places:
                if place.follower in late and place.process is not None:
                    log.error("worker %d did not stop in time: killed", place.index)
                    with contextlib.suppress(ProcessLookupError):
                        place.process.kill()
            if late:
                await asyncio.wait(late)
        return sum(place.cut for place in self._places)

    # -- the DataPlane Protocol ---------------------------------------------------------

    @property
    def _starting(self) -> bool:
        return self._watcher is None and not self._stopping

    @property
    def snapshot(self) -> RoutingSnapshot:
        return self._snapshot

    def apply(self, snapshot: RoutingSnapshot) -> None:
        self._snapshot = snapshot
        self._broadcast(Apply(snapshot))

    def collect(self) -> list[IntervalRecord]:
        records, self._orphans = self._orphans, []
        for place in self._places:
            records += place.seen.take()
        return merge(records)

    def failure_streaks(self, at_least: int) -> dict[str, int]:
        # A streak spans workers: each one's trailing failures, summed. It can only
        # overcount (a success in one worker does not reset another's), which makes
        # ejection a little quicker, never slower, than in one process.
        summed: dict[str, int] = {}
        for place in self._places:
            if place.seen.last is not None:
                for uid, n in place.seen.last.streaks.items():
                    summed[uid] = summed.get(uid, 0) + n
        return {uid: n for uid, n in summed.items() if n >= at_least}

    def forget_streak(self, upstream_id: str) -> None:
        for place in self._places:
            last = place.seen.last
            if last is not None and upstream_id in last.streaks:
                streaks = {k: v for k, v in last.streaks.items() if k != upstream_id}
                place.seen.last = dataclasses.replace(last, streaks=streaks)
        self._ask(Action.FORGET_STREAK, {upstream_id})

    def in_flight(self, ids: set[str]) -> tuple[int, int]:
        requests = tunnels = 0
        for place in self._places:
            n, t = place.seen.in_flight(ids)
            requests += n
            tunnels += t
            if place.channel is not None and place.seen.version < self._snapshot.version:
                # Its report predates the snapshot in force: what it started since is
                # unknown, so a drain waits for its next report (a few ms: a worker
                # reports as soon as it applies a snapshot).
                requests += 1
        return requests, tunnels

    def close_tunnels(self, ids: set[str]) -> Awaitable[int]:
        return self._first_of(self._ask(Action.CLOSE_TUNNELS, ids))

    def cut(self, ids: set[str]) -> Awaitable[int]:
        return self._first_of(self._ask(Action.CUT, ids))

    def evacuate(self, ids: set[str], grace: float) -> Awaitable[tuple[int, int]]:
        return self._ask(Action.EVACUATE, ids, grace)

    def counters(self) -> tuple[dict[str, int], OverrideCounters]:
        totals = self._totals()
        return dict(totals.retries), totals.overrides()

    def local_errors(self) -> dict[tuple[LocalErrorSite, LocalErrorKind], int]:
        return dict(self._totals().local_errors)

    def settled(self) -> Awaitable[None]:
        version = self._snapshot.version
        if self._all_at(version):
            return Done(None)
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._waiters.append((version, waiter))
        return waiter

    def _all_at(self, version: int) -> bool:
        return all(s.seen.version >= version for s in self._places if s.channel is not None)

    def _wake(self) -> None:
        """Resolve the settled() waiters whose snapshot every worker has now."""
        waiting = []
        for version, waiter in self._waiters:
            if waiter.done():
                continue
            if self._all_at(version):
                waiter.set_result(None)
            else:
                waiting.append((version, waiter))
        self._waiters = waiting

    def workers(self) -> list[WorkerState]:
        now = time.monotonic()
        return [place.state(now) for place in self._places]

    # -- inside -------------------------------------------------------------------------

    def _totals(self) -> Totals:
        totals = Totals()
        totals.add(self._gone)
        for place in self._places:
            if place.seen.last is not None:
                totals.add(place.seen.last)
        return totals

    def _broadcast(self, message: object) -> None:
        for place in self._places:
            if place.channel is not None:
                place.channel.send(message)

    def _ask(
        self, action: Action, ids: set[str], grace: float = 0.0
    ) -> asyncio.Future[tuple[int, int]]:
        """Send the command to every worker; the future sums their answers."""
        answers = []
        for place in self._places:
            if place.channel is not None:
                self._serial += 1
                answers.append(place.ask(self._serial, action, frozenset(ids), grace))
        return asyncio.ensure_future(_summed(answers))

    @staticmethod
    def _first_of(pair: Awaitable[tuple[int, int]]) -> Awaitable[int]:
        async def first() -> int:
            return (await pair)[0]

        return asyncio.ensure_future(first())

    async def _start(self, place: Place) -> None:
        """Start a process in `place`, and follow it."""
        assert self._listener is not None and self._launch is not None
        launch = self._launch
        start = Start(
            index=place.index,
            limits=_fields(self._limits),
            snapshot=self._snapshot,
            tls=launch.tls,
            backlog=launch.backlog,
            grace=launch.grace,
            log_level=launch.log_level,
            log_format=launch.log_format,
        )
        await place.start(self._listener, start)
        place.follower = asyncio.ensure_future(self._follow(place))

    async def _follow(self, place: Place) -> None:
        """Read one worker process's messages until it goes away, then replace it
        (unless zdproxy is stopping)."""
        channel, process = place.channel, place.process
        assert channel is not None and process is not None
        with contextlib.suppress(ChannelClosed):
            while True:
                message = await channel.receive()
                place.take(message)
                if self._waiters and isinstance(message, Report):
                    self._wake()
        channel.close()
        self._retire(place, await process.wait())
        if self._stopping or self._starting:
            return  # a worker that cannot start at all fails zdproxy's start
        if time.monotonic() - place.started < QUICK_DEATH_SECONDS:
            await asyncio.sleep(QUICK_DEATH_SECONDS)  # no tight loop of failing starts
        place.restarts += 1
        while not self._stopping:
            try:
                await self._start(place)
                return
            except OSError as exc:  # out of processes or descriptors: try again
                log.error("cannot start worker %d: %s; trying again in 1s", place.index, exc)
                await asyncio.sleep(QUICK_DEATH_SECONDS)

    def _retire(self, place: Place, returncode: int) -> None:
        """Keep what an ended process counted; say what was lost if it was not asked to."""
        if place.seen.last is not None:
            self._gone.add(place.seen.last)
        self._orphans += [r for r in place.seen.take() if r.responses or r.failures]
        exit_ = place.ended(returncode)
        self._wake()  # the waiters no longer wait for this one
        if place.starting:
            assert place.ready is not None
            # At zdproxy's start, listen() waits for it and fails; later, no one does.
            failed = OSError(f"worker {place.index} exited at start ({exit_.how})")
            place.ready.set_exception(failed) if self._starting else place.ready.cancel()
        if not self._stopping:
            place.lost += exit_.lost
            self._on_exit(exit_)

    async def _watch(self) -> None:
        """Kill a worker that has sent nothing for UNRESPONSIVE_SECONDS."""
        while True:
            await asyncio.sleep(_WATCH_SECONDS)
            now = time.monotonic()
            for place in self._places:
                process = place.process
                allowed = START_SECONDS if place.starting else UNRESPONSIVE_SECONDS
                if process is None or place.unresponsive or now - place.heard < allowed:
                    continue
                log.error(
                    "worker %d (pid %d) sent nothing for %.1fs: killing it",
                    place.index,
                    process.pid,
                    now - place.heard,
                )
                place.unresponsive = True
                with contextlib.suppress(ProcessLookupError):
                    process.kill()


async def _summed(answers: list[asyncio.Future[tuple[int, int]]]) -> tuple[int, int]:
    if not answers:
        return 0, 0
    done, late = await asyncio.wait(answers, timeout=ASK_SECONDS)
    for answer in late:
        answer.cancel()
    results = [answer.result() for answer in done if not answer.cancelled()]
    return sum(a for a, _ in results), sum(b for _, b in results)


def _fields(limits: Limits) -> dict[str, object]:
    """The Limits' own fields: the derived ones are made again in each worker."""
    return {f.name: getattr(limits, f.name) for f in dataclasses.fields(limits) if f.init}
