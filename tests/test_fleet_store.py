"""The Store contract (zdproxy/fleet/store.py) and the election on it, each test run
twice: against the in-memory fake (tests/fakes_store.py, on a fake clock) and against
real etcd clusters started for the test (tests/etcd_cluster.py: 1 member, or 3 where
members die) through EtcdStore, the client zdproxy ships.

Both run the same test bodies through a `Backend`: the stores to test, the members to
kill and restart, and time, which is the fake clock for the fake (moved in small steps
while a test polls) and the wall clock for etcd. Every wait is a poll with a bound.
"""

from __future__ import annotations

import abc
import asyncio
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager

import pytest

from tests.etcd_cluster import EtcdCluster
from tests.fakes_store import TICK, MemoryCluster
from zdproxy.fleet.election import Leadership, campaign
from zdproxy.fleet.etcd import EtcdStore
from zdproxy.fleet.store import (
    ABSENT,
    Change,
    Compacted,
    HeldBy,
    Lease,
    LeaseLost,
    Store,
    StoreUnavailable,
    Unchanged,
    prefix_end,
)

TIMEOUT = 2.0  # seconds: an EtcdStore call's bound
TTL = 2  # seconds: etcd's shortest lease with its default 1 s election timeout
SLACK = 3.0  # seconds on top of a TTL or a timeout before a wait counts as failed
RECOVERY = 30.0  # seconds for a cluster whose members came back to take writes again


class Backend(abc.ABC):
    """A store's world as a contract test sees it."""

    def __init__(self, members: int) -> None:
        self.members = members
        self.stores: list[Store] = []

    def store(self, first: int = 0) -> Store:
        """A client given every member, `first` the one it talks to first."""
        store = self._make_store(first)
        self.stores.append(store)
        return store

    @abc.abstractmethod
    def _make_store(self, first: int) -> Store: ...

    @abc.abstractmethod
    def followers(self) -> tuple[int, int]:
        """Two members that do not lead now: killing one stalls no write."""

    @abc.abstractmethod
    def kill(self, member: int) -> None: ...

    @abc.abstractmethod
    def restart(self, member: int) -> None: ...

    @abc.abstractmethod
    def compact(self, revision: int) -> None: ...

    @abc.abstractmethod
    def now(self) -> float:
        """Seconds of the store's time."""

    @abc.abstractmethod
    async def step(self) -> None:
        """Let a little of the store's time pass: a poll's pause."""

    async def until(self, condition: Callable[[], Awaitable[bool]], within: float) -> None:
        """Poll `condition` until it holds; fail after `within` seconds of store time."""
        deadline = self.now() + within
        while not await condition():
            assert self.now() < deadline, f"not within {within} s"
            await self.step()

    async def pass_time(self, seconds: float) -> None:
        end = self.now() + seconds
        while self.now() < end:
            await self.step()

    async def close(self) -> None:
        for store in self.stores:
            await store.close()


class MemoryBackend(Backend):
    def __init__(self, members: int) -> None:
        super().__init__(members)
        self.cluster = MemoryCluster()
        self.up = [True] * members

    def _make_store(self, first: int) -> Store:
        return self.cluster.store()

    def followers(self) -> tuple[int, int]:
        return (0, 1)

    def kill(self, member: int) -> None:
        self.up[member] = False
        self.cluster.drop_connections()
        if sum(self.up) <= self.members // 2:
            self.cluster.lose_quorum()

    def restart(self, member: int) -> None:
        self.up[member] = True
        if sum(self.up) > self.members // 2:
            self.cluster.regain_quorum()

    def compact(self, revision: int) -> None:
        self.cluster.compact(revision)

    def now(self) -> float:
        return self.cluster.clock.now

    async def step(self) -> None:
        self.cluster.advance(TICK)
        for _ in range(5):  # let the tasks this step woke run before the next one
            await asyncio.sleep(0)


class EtcdBackend(Backend):
    def __init__(self, cluster: EtcdCluster) -> None:
        super().__init__(cluster.size)
        self.cluster = cluster

    def _make_store(self, first: int) -> Store:
        urls = self.cluster.client_urls
        return EtcdStore(urls[first:] + urls[:first], timeout=TIMEOUT)

    def followers(self) -> tuple[int, int]:
        leader = self.cluster.leader()
        first, second = (index for index in range(self.members) if index != leader)
        return first, second

    def kill(self, member: int) -> None:
        self.cluster.kill(member)

    def restart(self, member: int) -> None:
        self.cluster.start_member(member)

    def compact(self, revision: int) -> None:
        # With etcd's own client: the compaction is the test's, not the client's under test.
        url = next(m.client_url for m in self.cluster.members if m.running)
        command = ["etcdctl", f"--endpoints={url}", "compact", str(revision)]
        subprocess.run(command, check=True, capture_output=True, timeout=10)

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def step(self) -> None:
        await asyncio.sleep(0.02)


async def _backend(request: pytest.FixtureRequest, members: int) -> AsyncIterator[Backend]:
    backend: Backend
    if request.param == "memory":
        backend = MemoryBackend(members)
    else:
        cluster = request.getfixturevalue("etcd_cluster" if members == 3 else "etcd_node")
        backend = EtcdBackend(cluster)
    yield backend
    await backend.close()


@pytest.fixture(params=["memory", "etcd"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """One member: for what needs no failover."""
    async for made in _backend(request, members=1):
        yield made


@pytest.fixture(params=["memory", "etcd"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Three members, which the test may kill and restart."""
    async for made in _backend(request, members=3):
        yield made


async def collect(store: Store, prefix: str, from_revision: int, into: list[Change]) -> None:
    async with aclosing(store.watch(prefix, from_revision)) as changes:
        async for change in changes:
            into.append(change)  # noqa: PERF401 - read by the test while the watch runs


@asynccontextmanager
async def watching(store: Store, prefix: str, from_revision: int) -> AsyncIterator[list[Change]]:
    """The changes a watch sees while the block runs, appended as they come."""
    seen: list[Change] = []
    task = asyncio.create_task(collect(store, prefix, from_revision, seen))
    try:
        yield seen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def holds(count: int, seen: list[Change]) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return len(seen) >= count

    return condition


async def test_writes_take_increasing_revisions_and_reads_return_them(backend: Backend) -> None:
    store = backend.store()
    assert await store.get("/t/a") == (None, ABSENT)
    first = await store.put_if("/t/a", b"1", ABSENT)
    assert first is not None
    assert await store.get("/t/a") == (b"1", first)
    second = await store.put_if("/t/a", b"2", first)
    third = await store.put_if("/t/b", b"", ABSENT)
    assert second is not None and third is not None
    assert first < second < third

    listing = await store.range("/t/")
    assert [(e.key, e.value, e.mod_revision) for e in listing.entries] == [
        ("/t/a", b"2", second),
        ("/t/b", b"", third),
    ]
    assert listing.revision == third
    assert [e.key for e in (await store.range("/t/b")).entries] == ["/t/b"]
    assert [e.key for e in (await store.range("")).entries] == ["/t/a", "/t/b"]


def test_a_prefix_range_ends_where_etcd_ends_it() -> None:
    assert prefix_end(b"/fleet/") == b"/fleet0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"") == prefix_end(b"\xff\xff") == b"\0"  # every key


async def test_a_write_based_on_a_stale_read_fails_and_changes_nothing(backend: Backend) -> None:
    store = backend.store()
    first = await store.put_if("/s/k", b"1", ABSENT)
    assert first is not None
    second = await store.put_if("/s/k", b"2", first)
    assert second is not None

    assert await store.put_if("/s/k", b"stale", first) is None
    assert await store.put_if("/s/k", b"absent?", ABSENT) is None
    assert await store.delete_if("/s/k", first) is None
    assert await store.get("/s/k") == (b"2", second)

    deleted = await store.delete_if("/s/k", second)
    assert deleted == second + 1  # the failed writes took no revision
    assert await store.get("/s/k") == (None, ABSENT)


async def test_fences_make_a_write_depend_on_other_keys(backend: Backend) -> None:
    store = backend.store()
    lease = await store.lease(TTL)
    assert await store.put_if("/f/leader", b"me", ABSENT, lease=lease) is not None
    rollout = await store.put_if("/f/rollout", b"id-1", ABSENT)
    assert rollout is not None

    held = HeldBy("/f/leader", lease.id)
    assert await store.put_if("/f/split", b"1", ABSENT, fences=[held]) is not None
    other = HeldBy("/f/leader", lease.id + 1)
    assert await store.put_if("/f/split", b"2", ABSENT, fences=[other]) is None

    for_rollout = Unchanged("/f/rollout", rollout)
    assert await store.put_if("/f/rollback", b"x", ABSENT, fences=[for_rollout]) is not None
    assert await store.put_if("/f/rollout", b"id-2", rollout) is not None
    assert await store.delete_if("/f/rollback", ABSENT, fences=[for_rollout]) is None
    assert (await store.get("/f/rollback")).value == b"x"
    await store.revoke(lease)
    assert lease.lost.is_set()
    assert (await store.get("/f/leader")).value is None
    with pytest.raises(LeaseLost):  # the store itself refuses it, not only this client
        await store.put_if("/f/late", b"x", ABSENT, lease=Lease(lease.id, lease.ttl))


async def test_a_watch_sees_writes_made_through_another_member_in_order_and_survives_its_member(
    cluster: Backend,
) -> None:
    watched, writing = cluster.followers()
    writer, watcher = cluster.store(first=writing), cluster.store(first=watched)
    start = (await writer.range("/w/")).revision + 1
    expected: list[Change] = []
    async with watching(watcher, "/w/", start) as seen:
        for i in range(5):
            revision = await writer.put_if(f"/w/{i}", b"v%d" % i, ABSENT)
            assert revision is not None
            expected.append(Change(f"/w/{i}", b"v%d" % i, revision))
        await cluster.until(holds(5, seen), within=SLACK)

        cluster.kill(watched)
        for i in range(5, 10):
            revision = await writer.put_if(f"/w/{i}", b"v%d" % i, ABSENT)
            assert revision is not None
            expected.append(Change(f"/w/{i}", b"v%d" % i, revision))
        deleted = await writer.delete_if("/w/0", expected[0].revision)
        assert deleted is not None
        expected.append(Change("/w/0", None, deleted))
        await cluster.until(holds(11, seen), within=TIMEOUT + SLACK)
    assert seen == expected


async def test_a_watch_from_a_compacted_revision_says_so(backend: Backend) -> None:
    store = backend.store()
    revisions = [await store.put_if(f"/c/{i}", b"x", ABSENT) for i in range(3)]
    first, _, last = revisions
    assert first is not None and last is not None
    backend.compact(last)

    async with asyncio.timeout(TIMEOUT + SLACK):
        with pytest.raises(Compacted) as compacted:
            await collect(store, "/c/", first, [])
    assert compacted.value.revision == last

    async with watching(store, "/c/", last) as seen:
        await backend.until(holds(1, seen), within=SLACK)
    assert seen == [Change("/c/2", b"x", last)]


async def test_a_lease_lives_while_kept_alive_and_its_keys_vanish_when_keepalives_stop(
    backend: Backend,
) -> None:
    holder, observer = backend.store(), backend.store()
    lease = await holder.lease(TTL)
    assert lease.ttl >= TTL
    written = await holder.put_if("/l/member-1", b"alive", ABSENT, lease=lease)
    assert written is not None

    await backend.pass_time(2 * lease.ttl)  # kept alive all along
    assert (await observer.get("/l/member-1")).value == b"alive"
    assert not lease.lost.is_set()

    async with watching(observer, "/l/", written + 1) as seen:
        await holder.close()  # as a crash: keepalives stop, the lease is not revoked
        assert lease.lost.is_set()

        async def gone() -> bool:
            return (await observer.get("/l/member-1")).value is None

        await backend.until(gone, within=lease.ttl + SLACK)
        await backend.until(holds(1, seen), within=SLACK)
    assert [(c.key, c.value) for c in seen] == [("/l/member-1", None)]


@pytest.mark.parametrize("leader_ends", ["revoked", "expired"])
async def test_one_of_two_campaigners_leads_and_the_other_takes_over_when_its_lease_ends(
    backend: Backend, leader_ends: str
) -> None:
    stores = {name: backend.store() for name in ("a", "b")}
    leases = {name: await store.lease(TTL) for name, store in stores.items()}
    tasks = {
        name: asyncio.create_task(campaign(store, "/e/leader", name.encode(), leases[name]))
        for name, store in stores.items()
    }
    try:

        async def one_leads() -> bool:
            return any(task.done() for task in tasks.values())

        await backend.until(one_leads, within=SLACK)
        await backend.pass_time(2 * TTL)  # the other one still waits
        (first,) = (name for name, task in tasks.items() if task.done())
        (second,) = set(tasks) - {first}
        leadership: Leadership = tasks[first].result()
        assert not tasks[second].done()
        assert (await stores[second].get("/e/leader")).value == first.encode()
        assert await stores[first].put_if("/e/x", b"1", ABSENT, fences=[leadership.fence])

        if leader_ends == "revoked":
            await stores[first].revoke(leases[first])
        else:
            await stores[first].close()  # its keepalives stop: the lease expires in etcd

        async def taken_over() -> bool:
            return tasks[second].done()

        await backend.until(taken_over, within=TTL + SLACK)
        successor: Leadership = tasks[second].result()
        assert successor.revision > leadership.revision
        assert (await stores[second].get("/e/leader")).value == second.encode()
        read = await stores[second].get("/e/x")
        assert (
            await stores[second].put_if(
                "/e/x", b"old", read.mod_revision, fences=[leadership.fence]
            )
            is None
        )
        assert await stores[second].put_if(
            "/e/x", b"new", read.mod_revision, fences=[successor.fence]
        )
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)


async def test_without_quorum_calls_fail_with_store_unavailable_in_bounded_time_then_work_again(
    cluster: Backend,
) -> None:
    store = cluster.store(first=0)
    lease = await store.lease(TTL)
    written = await store.put_if("/q/k", b"before", ABSENT)
    assert written is not None
    cluster.kill(1)
    cluster.kill(2)

    async with asyncio.timeout(TIMEOUT + SLACK):  # no hang: each call is bounded
        with pytest.raises(StoreUnavailable) as unavailable:
            await store.get("/q/k")
        assert unavailable.value.reason
    async with asyncio.timeout(TIMEOUT + SLACK):
        with pytest.raises(StoreUnavailable):
            await store.put_if("/q/k", b"during", written)

    async def lease_lost() -> bool:  # no keepalive answered for a whole TTL
        return lease.lost.is_set()

    await cluster.until(lease_lost, within=lease.ttl + SLACK)

    cluster.restart(1)
    cluster.restart(2)

    async def writable() -> bool:
        try:
            read = await store.get("/q/k")
            return await store.put_if("/q/k", b"after", read.mod_revision) is not None
        except StoreUnavailable:
            return False

    await cluster.until(writable, within=RECOVERY)
    assert (await store.get("/q/k")).value == b"after"
