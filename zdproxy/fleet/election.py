"""Leader election on the Store: one key, held under the leader's lease.

A campaigner writes the election key if it is absent (`put_if(key, value, ABSENT)`)
under its own lease; the one whose write lands leads, until it resigns or its lease
ends (revoked, expired, or lost by its store). The others watch the key and try again
once it is deleted, which the store does by itself when the leader's lease expires: a
leader that dies is replaced within its lease's TTL.

A leader fences its writes with `leadership.fence` (HeldBy(key, lease)): the write of
a leader whose key is gone fails in the store itself, whatever that leader believes.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass

from zdproxy.fleet.store import ABSENT, Compacted, HeldBy, Lease, LeaseLost, Store


@dataclass(frozen=True, slots=True)
class Leadership:
    """The election `key`, held under `lease` since `revision`."""

    key: str
    lease: Lease
    revision: int

    @property
    def fence(self) -> HeldBy:
        """The condition that this leadership still holds, for the leader's writes."""
        return HeldBy(self.key, self.lease.id)


async def campaign(store: Store, key: str, value: bytes, lease: Lease) -> Leadership:
    """Wait until this campaigner leads: `key` written with `value` under `lease`.
    LeaseLost if the lease is lost first; StoreUnavailable as the store's calls."""
    while not lease.lost.is_set():
        revision = await store.put_if(key, value, ABSENT, lease=lease)
        if revision is not None:
            return Leadership(key, lease, revision)
        held = next((e for e in (await store.range(key)).entries if e.key == key), None)
        if held is not None and held.lease == lease.id:
            # Ours already: an earlier try was applied but its answer was lost.
            return Leadership(key, lease, held.mod_revision)
        if held is not None:
            await _until_deleted(store, key, held.mod_revision, lease)
    raise LeaseLost(f"lease {lease.id:x} was lost while campaigning for {key}")


async def resign(store: Store, leadership: Leadership) -> bool:
    """Give the key up (the lease stays): True if it was still this leadership's."""
    return await store.delete_if(leadership.key, leadership.revision) is not None


async def _until_deleted(store: Store, key: str, revision: int, lease: Lease) -> None:
    """Return once `key` is deleted after `revision` (or is found gone after a
    compaction), or once `lease` is lost."""

    async def deleted() -> None:
        start = revision + 1
        while True:
            try:
                async with aclosing(store.watch(key, start)) as changes:
                    async for change in changes:
                        if change.key == key and change.value is None:
                            return
            except Compacted as compacted:
                # The history from `start` is gone: watch from the oldest kept (a delete
                # in between would have taken the key, which the campaign then finds).
                start = compacted.revision
                if (await store.get(key)).value is None:
                    return

    watching = asyncio.ensure_future(deleted())
    lost = asyncio.ensure_future(lease.lost.wait())
    try:
        done, _ = await asyncio.wait({watching, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        lost.cancel()
        await asyncio.gather(watching, lost, return_exceptions=True)
    if watching in done:
        watching.result()  # the watch's own error, if it had one
