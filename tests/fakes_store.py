"""An in-memory coordination store with etcd's semantics, for the fleet logic's tests.

`MemoryCluster` is the store's state (keys, one revision counter, history, leases) on a
`FakeClock`; `cluster.store()` is a client meeting the Store Protocol
(zdproxy/fleet/store.py), as an `EtcdStore` is one to a real cluster. Like etcd:

- every write that changes something takes the next revision; a failed compare, or
  a delete of nothing, takes none; a key that does not exist has mod_revision 0;
- a lease lives while its client keeps it alive (any open client that granted it, as
  an EtcdStore's keepalive does) and expires `ttl` seconds after the last renewal,
  taking its keys with it in one revision; a lease only expires while there is quorum,
  and regaining quorum renews every lease (etcd's new leader does the same);
- a watch gets the history from its start revision, then every change, and raises
  Compacted for a revision older than the last compaction.

The test moves time (`advance`, which renews and expires leases), compacts, takes
quorum away and gives it back (every call then fails with StoreUnavailable), and
drops the watches' connections (each watch reconnects and resumes where it was).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from tests.fakes import FakeClock
from zdproxy.fleet.store import (
    Change,
    Compacted,
    Entry,
    Fence,
    HeldBy,
    Lease,
    LeaseLost,
    Listing,
    Read,
    StoreUnavailable,
    Unchanged,
)

TICK = 0.05  # seconds of fake time per step of `advance`: renewals and expiries happen here


@dataclass(eq=False)
class _Grant:
    lease: Lease
    owner: MemoryStore | None  # the client keeping it alive; None once it stopped
    deadline: float
    renewed: float  # when the owner's last renewal was answered
    keys: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Subscription:
    prefix: str
    changes: asyncio.Queue[Change | None] = field(default_factory=asyncio.Queue)


class MemoryCluster:
    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.revision = 1  # as a new etcd cluster's
        self.compacted = 0  # revisions before this one are gone
        self.kvs: dict[str, Entry] = {}
        self.history: list[Change] = []
        self.grants: dict[int, _Grant] = {}
        self.quorum = True
        self._subscriptions: set[_Subscription] = set()
        self._next_lease = 0x7E57_0000

    def store(self) -> MemoryStore:
        return MemoryStore(self)

    # What the test controls.

    def advance(self, seconds: float) -> None:
        """Move the clock by `seconds`, in TICK steps: leases renew and expire."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.advance(min(TICK, end - self.clock.now))
            self._tick()

    def compact(self, revision: int) -> None:
        self.compacted = max(self.compacted, revision)
        self.history = [change for change in self.history if change.revision >= revision]

    def lose_quorum(self) -> None:
        self.quorum = False

    def regain_quorum(self) -> None:
        self.quorum = True
        for grant in self.grants.values():
            grant.deadline = self.clock.now + grant.lease.ttl

    def drop_connections(self) -> None:
        """End every watch's stream, as a member going away does."""
        for subscription in self._subscriptions:
            subscription.changes.put_nowait(None)
        self._subscriptions.clear()

    def hang_watches(self) -> None:
        """Stop delivering to every watch, without ending it: a connection that hangs
        silently (a new watch is delivered to again)."""
        self._subscriptions.clear()

    # What the clients call.

    def check_quorum(self) -> None:
        if not self.quorum:
            raise StoreUnavailable("etcd: no leader (fake cluster without quorum)")

    def _tick(self) -> None:
        now = self.clock.now
        for grant in list(self.grants.values()):
            if grant.owner is not None and self.quorum:
                grant.deadline, grant.renewed = now + grant.lease.ttl, now
            elif grant.owner is not None and now - grant.renewed >= grant.lease.ttl:
                grant.lease.lost.set()  # its client heard nothing for a whole TTL: gives up
                grant.owner = None
            if self.quorum and now >= grant.deadline:
                self.revoke(grant.lease.id)

    def grant(self, owner: MemoryStore, ttl: int) -> Lease:
        self.check_quorum()
        self._next_lease += 1
        lease = Lease(id=self._next_lease, ttl=ttl)
        now = self.clock.now
        self.grants[lease.id] = _Grant(lease, owner, now + ttl, now)
        return lease

    def revoke(self, lease_id: int) -> None:
        grant = self.grants.pop(lease_id, None)
        if grant is None:
            return
        grant.lease.lost.set()
        if grant.keys:
            self.revision += 1
            for key in sorted(grant.keys):
                self._delete(key)

    def stop_keepalives(self, owner: MemoryStore) -> None:
        for grant in self.grants.values():
            if grant.owner is owner:
                grant.owner = None
                grant.lease.lost.set()

    def txn(self, fences: Sequence[Fence], key: str, value: bytes | None, lease: int) -> int | None:
        """Set (or delete, value None) `key` if every fence holds: the new revision."""
        self.check_quorum()
        if not all(self._holds(fence) for fence in fences):
            return None
        if lease and lease not in self.grants:  # checked by etcd for the branch it runs
            raise LeaseLost("etcdserver: requested lease not found")
        if value is None and key not in self.kvs:
            return self.revision  # nothing deleted: no new revision
        self.revision += 1
        if value is None:
            self._delete(key)
        else:
            self._put(key, value, lease)
        return self.revision

    def _holds(self, fence: Fence) -> bool:
        entry = self.kvs.get(fence.key)
        if isinstance(fence, HeldBy):
            return (entry.lease if entry else 0) == fence.lease
        return (entry.mod_revision if entry else 0) == fence.mod_revision

    def _put(self, key: str, value: bytes, lease: int) -> None:
        old = self.kvs.get(key)
        if old is not None and old.lease in self.grants:
            self.grants[old.lease].keys.discard(key)
        if lease:
            self.grants[lease].keys.add(key)
        self.kvs[key] = Entry(key, value, self.revision, lease)
        self._publish(Change(key, value, self.revision))

    def _delete(self, key: str) -> None:
        old = self.kvs.pop(key, None)
        if old is not None and old.lease in self.grants:
            self.grants[old.lease].keys.discard(key)
        self._publish(Change(key, None, self.revision))

    def _publish(self, change: Change) -> None:
        self.history.append(change)
        for subscription in self._subscriptions:
            if change.key.startswith(subscription.prefix):
                subscription.changes.put_nowait(change)

    def subscribe(self, prefix: str, from_revision: int) -> _Subscription:
        if from_revision < self.compacted:
            raise Compacted(self.compacted)
        subscription = _Subscription(prefix)
        for change in self.history:
            if change.revision >= from_revision and change.key.startswith(prefix):
                subscription.changes.put_nowait(change)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: _Subscription) -> None:
        self._subscriptions.discard(subscription)


class MemoryStore:
    """One client of a MemoryCluster: the Store Protocol."""

    def __init__(self, cluster: MemoryCluster) -> None:
        self.cluster = cluster

    async def get(self, key: str) -> Read:
        self.cluster.check_quorum()
        entry = self.cluster.kvs.get(key)
        return Read(entry.value, entry.mod_revision) if entry else Read(None, 0)

    async def range(self, prefix: str) -> Listing:
        self.cluster.check_quorum()
        entries = (e for k, e in sorted(self.cluster.kvs.items()) if k.startswith(prefix))
        return Listing(tuple(entries), self.cluster.revision)

    async def put_if(
        self,
        key: str,
        value: bytes,
        expected_mod_revision: int,
        *,
        lease: Lease | None = None,
        fences: Sequence[Fence] = (),
    ) -> int | None:
        if lease is not None and lease.lost.is_set():
            raise LeaseLost(f"lease {lease.id:x} is lost")
        guarded = (Unchanged(key, expected_mod_revision), *fences)
        return self.cluster.txn(guarded, key, value, lease.id if lease else 0)

    async def delete_if(
        self, key: str, expected_mod_revision: int, *, fences: Sequence[Fence] = ()
    ) -> int | None:
        return self.cluster.txn((Unchanged(key, expected_mod_revision), *fences), key, None, 0)

    async def watch(self, prefix: str, from_revision: int) -> AsyncGenerator[Change, None]:
        if from_revision < 1:
            raise ValueError("a watch starts at revision 1 or later")
        following = from_revision
        while True:
            subscription = self.cluster.subscribe(prefix, following)
            try:
                while (change := await subscription.changes.get()) is not None:
                    following = change.revision + 1
                    yield change
            finally:
                self.cluster.unsubscribe(subscription)

    async def lease(self, ttl: int) -> Lease:
        return self.cluster.grant(self, ttl)

    async def revoke(self, lease: Lease) -> None:
        lease.lost.set()  # first, as EtcdStore's: no more keepalives, whatever the answer
        grant = self.cluster.grants.get(lease.id)
        if grant is not None:
            grant.owner = None
        self.cluster.check_quorum()
        self.cluster.revoke(lease.id)

    async def close(self) -> None:
        self.cluster.stop_keepalives(self)
