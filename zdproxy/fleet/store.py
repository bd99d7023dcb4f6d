"""The store seam: the few operations fleet mode needs from a coordination store.

Fleet mode keeps the members' shared desired state in etcd; the fleet logic reaches it
only through the `Store` Protocol below, so it runs unchanged against etcd
(`zdproxy.fleet.etcd.EtcdStore`) and against the in-memory fake of the tests
(tests/fakes_store.py). The Protocol is etcd's v3 model, narrowed:

- Every write is a transaction that names the revision it read (`put_if`,
  `delete_if`): a write based on a stale read fails and returns None, never
  overwrites. A key that does not exist has mod_revision `ABSENT` (0), so
  `put_if(key, value, ABSENT)` creates a key only if no one else did.
- `fences` add conditions on other keys to a write: `HeldBy(key, lease)` (the key
  exists under that lease: the leader's writes are fenced by its election key's
  lease, see election.py) and `Unchanged(key, mod_revision)` (another key is as it
  was read, e.g. the rollout a rollback is for).
- A watch streams every change under a prefix from a given revision, in revision
  order, each exactly once, across reconnections; when that revision is no longer
  kept (compacted) it raises `Compacted` and the caller reads afresh.
- A lease is kept alive by the store until it is revoked or the store closes; its
  `lost` event is set when it expired, or when it can no longer be known alive
  (no keepalive answered for a whole TTL). Keys written under a lease vanish with it.

Errors: `StoreUnavailable` when the store cannot be reached or has no quorum, with
the reason. After a write fails with it, the write may or may not have been applied:
read again before deciding anything on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

ABSENT = 0  # the mod_revision of a key that does not exist


class StoreError(Exception):
    """A store call failed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached, or has no quorum (no leader, or no answer in time)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Compacted(StoreError):
    """A watch's start revision is older than the store keeps: `revision` is the oldest
    it still has. Read the state afresh (`range`) and watch from that read's revision."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revisions before {revision} are compacted")
        self.revision = revision


class LeaseLost(StoreError):
    """A write named a lease that has expired or was revoked."""


class Read(NamedTuple):
    """One key as read: its value (None if absent) and the revision that last wrote it
    (`ABSENT` if absent): the `expected_mod_revision` of a write based on this read."""

    value: bytes | None
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: bytes
    mod_revision: int
    lease: int  # the id of the lease the key lives under; 0: none


@dataclass(frozen=True, slots=True)
class Listing:
    """The keys under a prefix, in key order, as of `revision` (the store's revision
    when it was read): a watch from `revision + 1` misses nothing after this read."""

    entries: tuple[Entry, ...]
    revision: int


@dataclass(frozen=True, slots=True)
class Change:
    """One key's change seen by a watch: its new value, or None when it was deleted
    (by a delete, or with its lease), at `revision`."""

    key: str
    value: bytes | None
    revision: int


@dataclass(frozen=True, slots=True)
class HeldBy:
    """Fence: `key` exists and lives under lease `lease`."""

    key: str
    lease: int


@dataclass(frozen=True, slots=True)
class Unchanged:
    """Fence: `key`'s mod_revision is still `mod_revision` (`ABSENT`: it does not exist)."""

    key: str
    mod_revision: int


Fence = HeldBy | Unchanged


@dataclass(eq=False)
class Lease:
    """A lease granted by the store, kept alive by it (every third of `ttl`) until
    revoked or the store closes. `ttl` is what the store granted, in seconds: etcd
    raises a shorter request to its minimum (1.5 election timeouts, rounded up).
    `lost` is set once, never cleared: the lease expired, was revoked, or no keepalive
    was answered for `ttl` seconds (the store may already have expired it)."""

    id: int
    ttl: int
    lost: asyncio.Event = field(default_factory=asyncio.Event)


def prefix_end(prefix: bytes) -> bytes:
    """The end of the key range of `prefix` (exclusive), as etcd spells it: the prefix
    with its last byte below 0xff incremented; b"\\0" (every key) for b"" or all 0xff."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\0"
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class Store(Protocol):
    """The coordination store fleet mode uses; see the module's docstring."""

    async def get(self, key: str) -> Read:
        """The key's value and mod_revision, read linearizably."""
        ...

    async def range(self, prefix: str) -> Listing:
        """Every key under `prefix`, read linearizably, with the revision of the read."""
        ...

    async def put_if(
        self,
        key: str,
        value: bytes,
        expected_mod_revision: int,
        *,
        lease: Lease | None = None,
        fences: Sequence[Fence] = (),
    ) -> int | None:
        """Write `value` if the key's mod_revision is `expected_mod_revision` and every
        fence holds, under `lease` if given (the key then vanishes with it): the new
        revision, or None when a condition failed. LeaseLost if `lease` is gone."""
        ...

    async def delete_if(
        self, key: str, expected_mod_revision: int, *, fences: Sequence[Fence] = ()
    ) -> int | None:
        """Delete the key if its mod_revision is `expected_mod_revision` and every fence
        holds: the store's revision after it, or None when a condition failed."""
        ...

    def watch(self, prefix: str, from_revision: int) -> AsyncGenerator[Change, None]:
        """Every change under `prefix` from `from_revision` (>= 1) on, in revision order,
        for as long as the caller iterates. A lost connection is re-made (to another
        endpoint if need be) and resumed after the last change seen, never repeating or
        skipping one; it never raises StoreUnavailable. Raises Compacted. Close it
        (`contextlib.aclosing`) when done: that ends its connection."""
        ...

    async def lease(self, ttl: int) -> Lease:
        """Grant a lease of `ttl` seconds and keep it alive (see `Lease`)."""
        ...

    async def revoke(self, lease: Lease) -> None:
        """End the lease now: its keys vanish at once, `lost` is set."""
        ...

    async def close(self) -> None:
        """Stop keeping leases alive (they are not revoked: they expire after their TTL,
        as a crashed member's would; their `lost` is set) and close the connections."""
        ...
