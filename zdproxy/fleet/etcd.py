"""The Store on a real etcd cluster (>= 3.4), through its v3 JSON gateway (gateway.py).

    store = EtcdStore(["http://10.0.0.1:2379", "http://10.0.0.2:2379"], timeout=2.0)
    read = await store.get("/zdproxy/prod/split")
    ...
    await store.close()

`timeout` bounds every call, all endpoints included: past it the call fails with
StoreUnavailable. Watches and lease keepalives run on their own (see store.py for what
each promises); `close()` ends them. `ssl` (https endpoints) and `username` and
`password` (etcd auth) are gateway.py's; `EtcdStore.from_settings` makes a store from
the `[fleet]` config section.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncGenerator, Sequence
from ssl import SSLContext
from typing import TYPE_CHECKING, Any

from zdproxy.fleet.gateway import GRPC_NOT_FOUND, Gateway, Message, RequestFailed
from zdproxy.fleet.store import (
    ABSENT,
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
    prefix_end,
)
from zdproxy.tls import client_context

if TYPE_CHECKING:
    from zdproxy.config.fleet import FleetSettings

DEFAULT_TIMEOUT = 2.0  # seconds: a few etcd election timeouts (1 s by default)
# A keepalive that failed is tried again after this long, until the lease's TTL has
# passed since the last one answered (then it counts as lost).
KEEPALIVE_RETRY = 0.2
# Pauses between a watch's reconnections while no member takes it: the first at once
# (its member went away: another one usually answers), then doubling up to the cap.
WATCH_PAUSE_FIRST = 0.05
WATCH_PAUSE_CAP = 2.0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes(field: Any) -> bytes:
    return base64.b64decode(field) if field else b""


def _revision(message: Message) -> int:
    return int(message["header"]["revision"])


def _entry(kv: Message) -> Entry:
    return Entry(
        key=_bytes(kv["key"]).decode(),
        value=_bytes(kv.get("value")),
        mod_revision=int(kv["mod_revision"]),
        lease=int(kv.get("lease", 0)),
    )


def _span(prefix: str) -> Message:
    """The key range of `prefix`, as a range or watch request names it (etcd spells
    "every key" as key "\\0" to range_end "\\0": it takes no empty key)."""
    raw = prefix.encode()
    return {"key": _b64(raw or b"\0"), "range_end": _b64(prefix_end(raw))}


def _compare(fence: Fence) -> Message:
    key = _b64(fence.key.encode())
    if isinstance(fence, HeldBy):
        return {"key": key, "target": "LEASE", "result": "EQUAL", "lease": str(fence.lease)}
    return {"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": str(fence.mod_revision)}


class EtcdStore:
    """The Store Protocol (zdproxy/fleet/store.py) on the etcd cluster at `endpoints`
    (client URLs of some or all of its members)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        ssl: SSLContext | None = None,
        username: str = "",
        password: str = "",
    ) -> None:
        self._gateway = Gateway(endpoints, timeout, ssl=ssl, username=username, password=password)
        self._keepalives: dict[Lease, asyncio.Task[None]] = {}

    @classmethod
    def from_settings(cls, fleet: FleetSettings) -> EtcdStore:
        """The store of a `[fleet]` section: its endpoints, timeout and user; TLS for
        its https endpoints. ValueError when a TLS file cannot be used."""
        tls = any(url.startswith("https:") for url in fleet.endpoints)
        return cls(
            fleet.endpoints,
            timeout=fleet.timeout,
            ssl=client_context(fleet.ca_file, fleet.cert_file, fleet.key_file) if tls else None,
            username=fleet.username,
            password=fleet.password,
        )

    async def get(self, key: str) -> Read:
        answer = await self._gateway.call(
            "/v3/kv/range", {"key": _b64(key.encode())}, idempotent=True
        )
        kvs = answer.get("kvs")
        if not kvs:
            return Read(None, ABSENT)
        entry = _entry(kvs[0])
        return Read(entry.value, entry.mod_revision)

    async def range(self, prefix: str) -> Listing:
        answer = await self._gateway.call("/v3/kv/range", _span(prefix), idempotent=True)
        entries = tuple(_entry(kv) for kv in answer.get("kvs", ()))
        return Listing(entries, _revision(answer))

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
        put: Message = {"key": _b64(key.encode()), "value": _b64(value)}
        if lease is not None:
            put["lease"] = str(lease.id)
        guarded = (Unchanged(key, expected_mod_revision), *fences)
        try:
            return await self._txn(guarded, {"request_put": put})
        except RequestFailed as failed:
            if lease is not None and failed.code == GRPC_NOT_FOUND:
                lease.lost.set()
                raise LeaseLost(failed.message) from failed
            raise

    async def delete_if(
        self, key: str, expected_mod_revision: int, *, fences: Sequence[Fence] = ()
    ) -> int | None:
        guarded = (Unchanged(key, expected_mod_revision), *fences)
        return await self._txn(guarded, {"request_delete_range": {"key": _b64(key.encode())}})

    async def _txn(self, fences: Sequence[Fence], operation: Message) -> int | None:
        body = {"compare": [_compare(fence) for fence in fences], "success": [operation]}
        answer = await self._gateway.call("/v3/kv/txn", body, idempotent=False)
        return _revision(answer) if answer.get("succeeded") else None

    async def watch(self, prefix: str, from_revision: int) -> AsyncGenerator[Change, None]:
        if from_revision < 1:
            raise ValueError("a watch starts at revision 1 or later")
        span = _span(prefix)
        following = from_revision  # the revision the next (re)connection starts at
        pause = 0.0
        while True:
            create = {**span, "start_revision": str(following)}
            try:
                async with self._gateway.stream("/v3/watch", {"create_request": create}) as stream:
                    async for message in stream:
                        result = message.get("result")
                        if result is None:  # an error: e.g. the member lost its leader
                            break
                        if compacted := int(result.get("compact_revision", 0)):
                            raise Compacted(compacted)
                        if result.get("canceled"):  # refused: the token, or the user's roles
                            reason = str(result.get("cancel_reason", ""))
                            await self._gateway.refused(stream, reason)  # renews, or raises
                            break
                        for event in result.get("events", ()):
                            entry = _entry(event["kv"])  # a DELETE's: the key, its revision
                            value = None if event.get("type") == "DELETE" else entry.value
                            following, pause = entry.mod_revision + 1, 0.0
                            yield Change(entry.key, value, entry.mod_revision)
                    self._gateway.demote(stream.endpoint)
            except StoreUnavailable:
                pass  # no member took it within the timeout: keep trying (see store.py)
            await asyncio.sleep(pause)
            pause = min(WATCH_PAUSE_CAP, max(WATCH_PAUSE_FIRST, pause * 2))

    async def lease(self, ttl: int) -> Lease:
        # Sent again after a lost answer: a lease granted twice costs nothing, the one
        # nobody keeps alive expires with no keys.
        answer = await self._gateway.call("/v3/lease/grant", {"TTL": str(ttl)}, idempotent=True)
        lease = Lease(id=int(answer["ID"]), ttl=int(answer["TTL"]))
        task = asyncio.create_task(self._keep_alive(lease), name=f"etcd lease {lease.id:x}")
        self._keepalives[lease] = task
        task.add_done_callback(lambda _: self._keepalives.pop(lease, None))
        return lease

    async def _keep_alive(self, lease: Lease) -> None:
        """Renew every third of the TTL; set `lost` when the lease has expired, or when
        no renewal was answered for a whole TTL (it may have expired in etcd)."""
        renewed = time.monotonic()
        pause = lease.ttl / 3
        try:
            while True:
                await asyncio.sleep(pause)
                sent = time.monotonic()
                try:
                    answer = await self._gateway.call(
                        "/v3/lease/keepalive",
                        {"ID": str(lease.id)},
                        idempotent=True,
                        within=max(KEEPALIVE_RETRY, renewed + lease.ttl - sent),
                    )
                except StoreUnavailable:
                    if time.monotonic() - renewed >= lease.ttl:
                        return
                    pause = KEEPALIVE_RETRY
                    continue
                except RequestFailed:
                    return  # etcd refused it: the lease is not found, or not renewable
                if int(answer.get("result", {}).get("TTL", 0)) <= 0:
                    return  # etcd no longer has it
                renewed, pause = sent, lease.ttl / 3
        finally:
            lease.lost.set()

    async def revoke(self, lease: Lease) -> None:
        keepalive = self._keepalives.pop(lease, None)
        if keepalive is not None:
            keepalive.cancel()
        lease.lost.set()
        try:
            await self._gateway.call("/v3/lease/revoke", {"ID": str(lease.id)}, idempotent=True)
        except RequestFailed as failed:
            if failed.code != GRPC_NOT_FOUND:  # already expired: revoked all the same
                raise

    async def close(self) -> None:
        keepalives, self._keepalives = list(self._keepalives.values()), {}
        for task in keepalives:
            task.cancel()
        await asyncio.gather(*keepalives, return_exceptions=True)
        await self._gateway.close()
