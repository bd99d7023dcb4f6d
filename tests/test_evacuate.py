"""What the judge sees of requests in flight, and what happens to them at a rollback:
pending ages in collect() and DataPlane.evacuate, on a ProxyServer in-process with
real loopback sockets (so a test can call collect() and evacuate() at the moment it
chooses), and the same contract met by FakeDataPlane."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import wait_until
from tests.fakes import FakeDataPlane
from zdproxy.config.loader import settings_from_mapping
from zdproxy.dataplane.context import RetryKind
from zdproxy.dataplane.server import ProxyServer
from zdproxy.ops.limits import dataplane_limits
from zdproxy.routing.address import Address
from zdproxy.routing.records import IntervalRecord, UpstreamStats
from zdproxy.routing.snapshot import RoutingSnapshot, UpstreamTarget, upstream_id


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            return int(value)
    return 0


UNBOUND = Address("127.0.0.1", 0)


@dataclass
class App:
    """An app server on loopback that records every request it got (head and body).

    A live one answers 200 with its name, a request to /wait only once `release` is
    set; a hanging one reads requests and never answers."""

    name: str
    hangs: bool
    address: Address = UNBOUND  # until its server listens
    requests: list[bytes] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        return upstream_id(self.name, self.address)

    def got(self, method: bytes) -> int:
        return sum(request.startswith(method + b" ") for request in self.requests)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head + await reader.readexactly(content_length(head)))
            if self.hangs:
                await reader.read()  # until zdproxy gives up on it
                return
            if head.startswith(b"GET /wait "):
                await self.release.wait()
            body = self.name.encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def apps() -> AsyncIterator[tuple[App, App]]:
    """Blue, live and answering; green, the candidate, hanging on every request."""
    blue, green = App("blue", hangs=False), App("green", hangs=True)
    servers = []
    for app in (blue, green):
        server = await asyncio.start_server(app.serve, "127.0.0.1", 0)
        app.address = Address("127.0.0.1", server.sockets[0].getsockname()[1])
        servers.append(server)
    yield blue, green
    for server in servers:
        server.close()


def snapshot(version: int, weight: int, blue: App, green: App) -> RoutingSnapshot:
    """Blue live, green the candidate at `weight` basis points."""
    return RoutingSnapshot(
        version,
        "blue",
        weight,
        pools={
            "blue": (UpstreamTarget(blue.id, "blue", blue.address),),
            "green": (UpstreamTarget(green.id, "green", green.address),),
        },
    )


@dataclass
class Proxy:
    server: ProxyServer
    port: int


@pytest.fixture
async def proxy(apps: tuple[App, App]) -> AsyncIterator[Proxy]:
    """A ProxyServer with the candidate at 100% and a retry budget of 0% (3 per window)."""
    blue, green = apps
    settings = settings_from_mapping(
        {"pools": {"blue": {"upstreams": [str(blue.address)]}}, "retry": {"budget_percent": 0}}
    )
    server = ProxyServer(dataplane_limits(settings))
    server.apply(snapshot(1, 10000, blue, green))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    await server.listen(listener)
    yield Proxy(server, listener.getsockname()[1])
    await server.stop(1)


class Client:
    """One client connection that sends one request; `leave()` gives up on it."""

    def __init__(self, proxy: Proxy, method: str, path: str, body: bytes = b"") -> None:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        self._writer: asyncio.StreamWriter | None = None
        self._answer = asyncio.ensure_future(self._exchange(proxy.port, head.encode() + body))

    async def _exchange(self, port: int, request: bytes) -> tuple[int, bytes]:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        self._writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        return int(head.split()[1]), await reader.readexactly(content_length(head))

    @property
    def answered(self) -> bool:
        return self._answer.done()

    async def answer(self) -> tuple[int, bytes]:
        try:
            return await asyncio.wait_for(self._answer, 5)
        finally:
            if self._writer is not None:
                self._writer.close()

    def leave(self) -> None:
        """Reset the connection (a close would be a half-close, still owed an answer)."""
        assert self._writer is not None
        sock = self._writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()
        self._answer.cancel()


def by_upstream(records: list[IntervalRecord]) -> dict[str, IntervalRecord]:
    return {record.upstream_id: record for record in records}


def oldest_pending(server: ProxyServer, uid: str) -> float:
    """The oldest pending age of one upstream at a collect (0 if it has none)."""
    record = by_upstream(server.collect()).get(uid)
    return record.pending[0] if record is not None and record.pending else 0.0


# -- pending ages ------------------------------------------------------------------


async def test_a_hung_upstream_shows_in_collect_by_the_ages_of_its_pending_requests(
    apps: tuple[App, App], proxy: Proxy
) -> None:
    blue, green = apps
    server = proxy.server
    first = Client(proxy, "GET", "/a")
    await wait_until(lambda: len(green.requests) == 1)
    second = Client(proxy, "POST", "/b", b"body")
    await wait_until(lambda: len(green.requests) == 2)

    # It answered nothing, yet it has a record: its pending requests, the oldest first.
    records = by_upstream(server.collect())
    assert set(records) == {green.id}  # blue had no traffic and has nothing in flight
    hung = records[green.id]
    assert (hung.responses, hung.failures) == (0, {})
    assert len(hung.pending) == 2 and hung.pending[0] >= hung.pending[1] >= 0

    # A snapshot, not a count: the same requests again, older, on every collect.
    await wait_until(lambda: oldest_pending(server, green.id) > hung.pending[0])

    first.leave()  # the clients give up: their requests are no longer pending
    second.leave()
    await wait_until(lambda: server.in_flight({green.id}) == (0, 0))
    after = by_upstream(server.collect())[green.id]
    assert (after.pending, after.failures) == ((), {"client_abort": 2})
    assert server.collect() == []  # nothing in flight, no traffic: no record at all
    assert blue.requests == []


# -- evacuate ------------------------------------------------------------------------


async def test_evacuate_replays_a_get_on_live_and_cuts_a_post_after_the_grace(
    apps: tuple[App, App], proxy: Proxy
) -> None:
    blue, green = apps
    server = proxy.server
    server.apply(snapshot(2, 0, blue, green))
    # A request on the live pool, in flight through the whole evacuation.
    on_live = Client(proxy, "GET", "/wait")
    await wait_until(lambda: len(blue.requests) == 1)
    server.apply(snapshot(3, 10000, blue, green))  # the candidate gets everything
    get = Client(proxy, "GET", "/page")
    post = Client(proxy, "POST", "/order", b"1 item")
    await wait_until(lambda: len(green.requests) == 2)

    for _ in range(3):  # the window's retries are spent: a budget of 0% allows 3
        server.ctx.budget.spend(RetryKind.RESET)
    server.apply(snapshot(4, 0, blue, green))  # the rollback, then the evacuation
    assert await server.evacuate({green.id}, grace=0.2) == (1, 1)
    assert server.in_flight({green.id}) == (1, 0)  # the POST may still finish

    # The GET is answered by live at once; the POST waits out its grace, then gets a
    # 504. Green got each request once; blue never saw the POST.
    assert await get.answer() == (200, b"blue")
    assert (await post.answer())[0] == 504
    assert (green.got(b"GET"), green.got(b"POST")) == (1, 1)
    assert (blue.got(b"GET"), blue.got(b"POST")) == (2, 0)
    assert server.in_flight({green.id}) == (0, 0)
    retries, _ = server.counters()
    assert retries["evacuate"] == 1 and retries["over_budget"] == 0  # never refused

    # The live request was not disturbed, and is answered when its app answers.
    assert not on_live.answered
    blue.release.set()
    assert await on_live.answer() == (200, b"blue")


async def test_evacuate_with_no_live_pool_left_replays_nothing(
    apps: tuple[App, App], proxy: Proxy
) -> None:
    blue, green = apps
    server = proxy.server
    get = Client(proxy, "GET", "/page")
    await wait_until(lambda: len(green.requests) == 1)
    # Green is the only color left: the GET has nowhere to go and gets the grace.
    server.apply(RoutingSnapshot(2, "green", 0, pools=snapshot(2, 0, blue, green).pools))
    assert await server.evacuate({green.id}, grace=0.05) == (0, 1)
    assert (await get.answer())[0] == 504
    assert len(green.requests) == 1 and blue.requests == []


# -- the fake meets the same contract ---------------------------------------------


def test_the_fake_reports_pending_ages_in_every_collect_until_the_test_changes_them() -> None:
    plane = FakeDataPlane()
    plane.pending.append(UpstreamStats("green/a").take())
    plane.pending_ages = {"green/a": (0.5, 2.0), "green/b": (9.0,)}
    first = by_upstream(plane.collect())
    assert first["green/a"].pending == (2.0, 0.5)  # into the queued record, oldest first
    assert first["green/b"].pending == (9.0,) and first["green/b"].responses == 0
    assert by_upstream(plane.collect())["green/b"].pending == (9.0,)  # still pending
    plane.pending_ages = {}
    assert plane.collect() == []


async def test_the_fake_evacuates_the_replayable_requests_and_leaves_the_rest() -> None:
    plane = FakeDataPlane()
    plane.requests = {"green/a": 3, "green/b": 1, "blue/c": 4}
    plane.replayable = {"green/a": 2}
    assert await plane.evacuate({"green/a", "green/b"}, 5.0) == (2, 2)
    assert plane.in_flight({"green/a", "green/b"}) == (2, 0)
    assert plane.requests["blue/c"] == 4
    assert plane.evacuations == [({"green/a", "green/b"}, 5.0)]
    assert plane.counters()[0]["evacuate"] == 2
