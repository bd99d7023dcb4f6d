"""Local resource errors (routing/local.py): zdproxy out of file descriptors, memory or
local ports never blames, ejects or marks down a healthy upstream.

Unit tests drive the classification and the rate-limited log with a fake clock, and
the data plane and the health checker in-process with a loop whose connects to the
app fail with EMFILE. The end-to-end test runs `zdproxy run` under a low
RLIMIT_NOFILE, exhausts it with idle client connections, and releases them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    Upstream,
    ZdProxy,
    admin_api,
    pools,
    wait_healthy,
    wait_until,
)
from tests.fakes import FakeClock
from tests.test_metrics import metrics_when, scrape
from zdproxy.config.loader import settings_from_mapping
from zdproxy.config.settings import HealthSettings
from zdproxy.control.health import HealthChecker, UpstreamHealth
from zdproxy.dataplane.server import ProxyServer
from zdproxy.ops.limits import dataplane_limits
from zdproxy.routing.address import Address
from zdproxy.routing.local import (
    REPORT_EVERY,
    LocalErrorKind,
    LocalErrors,
    LocalErrorSite,
    local_error_kind,
)
from zdproxy.routing.snapshot import RoutingSnapshot, UpstreamTarget, upstream_id

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]

CONNECT, HEALTH_CHECK = LocalErrorSite.CONNECT, LocalErrorSite.HEALTH_CHECK
EMFILE = LocalErrorKind.EMFILE
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# -- classification and the rate-limited log ---------------------------------------------


def test_only_shortages_of_zdproxys_own_resources_are_local() -> None:
    for code, kind in (
        (errno.EMFILE, LocalErrorKind.EMFILE),
        (errno.ENFILE, LocalErrorKind.ENFILE),
        (errno.ENOBUFS, LocalErrorKind.ENOBUFS),
        (errno.ENOMEM, LocalErrorKind.ENOMEM),
        (errno.EADDRNOTAVAIL, LocalErrorKind.EADDRNOTAVAIL),
    ):
        assert local_error_kind(os_error(code)) is kind
    # The peer's failures, and anything that is no OSError at all, are not local.
    for error in (
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        os_error(errno.EHOSTUNREACH),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError(),
        OSError("no errno"),
        ValueError("EMFILE"),
    ):
        assert local_error_kind(error) is None


def test_every_error_is_counted_and_logged_once_per_kind_and_site_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    errors = LocalErrors(clock)
    caplog.set_level(logging.WARNING, logger="zdproxy.resources")
    for _ in range(50):  # 0.5s of errors
        assert errors.note(os_error(errno.EMFILE), CONNECT) is EMFILE
        clock.advance(0.01)
    assert errors.note(os_error(errno.ENOMEM), CONNECT) is LocalErrorKind.ENOMEM
    assert errors.note(os_error(errno.EMFILE), HEALTH_CHECK) is EMFILE
    assert errors.note(os_error(errno.ECONNREFUSED), CONNECT) is None  # not counted
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3  # one per kind and site, not one per error
    assert lines[0].startswith("EMFILE (Too many open files) at connect: 1 time since start")
    assert "LimitNOFILE" in lines[0] and "ulimit -n" in lines[0]
    assert lines[1].startswith("ENOMEM (Cannot allocate memory) at connect")
    assert "at health_check" in lines[2]
    clock.advance(REPORT_EVERY)
    errors.note(os_error(errno.EMFILE), CONNECT)
    assert len(caplog.records) == 4
    last = caplog.records[-1]
    assert last.getMessage().startswith(
        "EMFILE (Too many open files) at connect: 50 times in the last 5.5s"
    )
    assert last.fields == {"errno": "EMFILE", "where": "connect", "count": 50}  # type: ignore[attr-defined]
    assert errors.counts == {
        (CONNECT, EMFILE): 51,
        (CONNECT, LocalErrorKind.ENOMEM): 1,
        (HEALTH_CHECK, EMFILE): 1,
    }


# -- in-process: a loop whose connects to the app fail with EMFILE ------------------------


@contextlib.contextmanager
def out_of_descriptors(monkeypatch: pytest.MonkeyPatch, ports: set[int]) -> Iterator[None]:
    """Connects from this loop to `ports` fail as in a process without a free fd; any
    other (the test's own clients) goes through. Both ways a connect takes: the
    loop's create_connection (the data plane, the TCP checks) and sock_connect on a
    socket of the caller's (aiohttp, the HTTP checks)."""
    loop = asyncio.get_running_loop()
    create_connection, sock_connect = loop.create_connection, loop.sock_connect

    async def failing_create(factory: Any, host: Any = None, port: Any = None, **kw: Any) -> Any:
        if port in ports:
            raise os_error(errno.EMFILE)
        return await create_connection(factory, host, port, **kw)

    async def failing_sock_connect(sock: socket.socket, address: Any) -> None:
        if address[1] in ports:
            raise os_error(errno.EMFILE)
        await sock_connect(sock, address)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "create_connection", failing_create)
        patch.setattr(loop, "sock_connect", failing_sock_connect)
        yield


@pytest.fixture
async def apps() -> AsyncIterator[tuple[list[Address], list[bytes]]]:
    """Two app servers answering 200 to every request (kept alive); every request head
    they got."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(OK_RESPONSE)
        writer.close()

    servers = [await asyncio.start_server(handle, "127.0.0.1", 0) for _ in range(2)]
    yield [Address("127.0.0.1", s.sockets[0].getsockname()[1]) for s in servers], heads
    for server in servers:
        server.close()


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/"
) -> tuple[int, bytes, bytes]:
    """One GET on a kept-alive connection: (status, head, body)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await reader.readexactly(length)
    return int(head.split()[1]), head, body


async def test_a_local_connect_error_is_a_503_never_the_upstreams_failure_nor_retried(
    apps: tuple[list[Address], list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    addresses, heads = apps
    settings = settings_from_mapping({"pools": pools([str(a) for a in addresses])})
    proxy = ProxyServer(dataplane_limits(settings))
    targets = tuple(UpstreamTarget(upstream_id("blue", a), "blue", a) for a in addresses)
    proxy.apply(RoutingSnapshot(1, "blue", 0, pools={"blue": targets}))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    await proxy.listen(listener)
    reader, writer = await asyncio.open_connection(*listener.getsockname()[:2])
    try:
        with out_of_descriptors(monkeypatch, {a.port for a in addresses}):
            for _ in range(6):  # more than the default 5 failures in a row that eject
                status, head, body = await roundtrip(reader, writer)
                assert status == 503, body
                assert b"EMFILE (Too many open files)" in body
                assert b"Connection: close" not in head  # the client keeps its connection
        assert proxy.failure_streaks(1) == {}  # nothing for outlier ejection
        assert all(not r.failures and not r.responses for r in proxy.collect())  # nor the judge
        retries, _ = proxy.counters()
        assert retries["connect"] == 0  # not sent to the other upstream either
        assert heads == []
        assert proxy.local_errors() == {(CONNECT, EMFILE): 6}
        # Descriptors free again: the same connection is served, nothing to undo.
        assert (await roundtrip(reader, writer))[0] == 200
    finally:
        writer.close()
        await proxy.stop(5)


@pytest.mark.parametrize("path", ["", "/ready"], ids=["tcp", "http"])
async def test_a_check_zdproxy_cannot_open_gives_no_verdict(
    path: str, apps: tuple[list[Address], list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    address = apps[0][0]
    target = UpstreamTarget(upstream_id("blue", address), "blue", address)
    changes: list[bool] = []

    def changed(_: UpstreamTarget, state: UpstreamHealth) -> None:
        changes.append(state.up)

    checker = HealthChecker(changed)
    settings = HealthSettings(path=path, interval=0.01, jitter=0, rise=1, fall=1)
    checker.sync({target.id: (target, settings)})
    try:
        await wait_until(lambda: checker.verdict(target.id) == "up")
        counts = checker.local_errors.counts
        with out_of_descriptors(monkeypatch, {address.port}):
            await wait_until(lambda: counts.get((HEALTH_CHECK, EMFILE), 0) >= 3)
            state = checker.state(target.id)
            assert state is not None and state.failures == 0
            assert checker.verdict(target.id) == "up" and changes == [True]
        checks = state.checks
        await wait_until(lambda: state.checks > checks)  # checked again once it can
        assert changes == [True]
    finally:
        await checker.close()


# -- end to end: zdproxy run under a low RLIMIT_NOFILE ----------------------------------

NOFILE = 128  # the proxy's descriptor limit: what it needs at start, and ~100 to spare
# Runs the rest of the command line with RLIMIT_NOFILE lowered (the soft limit only).
LOW_NOFILE = (
    sys.executable,
    "-c",
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, "
    "(int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
    "os.execv(sys.argv[2], sys.argv[2:])",
    str(NOFILE),
)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def exhaust(proxy: ZdProxy) -> list[asyncio.StreamWriter]:
    """Idle client connections until the proxy holds NOFILE descriptors; bounded."""
    held: list[asyncio.StreamWriter] = []
    for _ in range(5):
        missing = NOFILE - open_fds(proxy.pid)
        if missing <= 0:
            return held
        held += [(await asyncio.open_connection(proxy.host, proxy.port))[1] for _ in range(missing)]
        with contextlib.suppress(TimeoutError):  # accepted, one loop turn after the connect
            await wait_until(lambda: open_fds(proxy.pid) >= NOFILE, within=2)
    raise AssertionError(f"the proxy holds {open_fds(proxy.pid)} of {NOFILE} descriptors")


async def test_out_of_descriptors_no_upstream_is_blamed_and_zdproxy_recovers(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    app, marker = await upstream("blue"), await upstream("green")
    config: dict[str, Any] = {
        "pools": pools([app.address], [marker.address]),
        # Green serves only /tick, pinned: its first response in the metrics proves a
        # control tick (outlier ejection's) ran after blue's errors, with no blue
        # response since to reset its streak.
        "pins": [{"name": "tick", "path_prefix": ["/tick"], "to": "green"}],
        # A fresh connect for every request, so each one needs a descriptor.
        "upstream": {"max_idle_per_upstream": 0},
        "proxy": {"header_timeout": "60s"},  # the idle clients stay as long as the test
    }
    blue = config["pools"]["blue"]
    blue["health"] = {"interval": "50ms", "jitter": "0s", "fall": 1}  # one failure: down
    # Three failures in a row would eject it, even as the only upstream of its pool.
    blue["outlier"] = {"consecutive_failures": 3, "max_ejected_percent": 100}
    proxy = zdproxy(config, wrap=LOW_NOFILE)
    await wait_healthy(proxy, "blue")
    await wait_healthy(proxy, "green")
    assert open_fds(proxy.pid) < NOFILE - 50, "zdproxy needs more descriptors at start"
    # Kept-alive clients from before the shortage: the requests to answer during it.
    clients = [await asyncio.open_connection(proxy.host, proxy.port) for _ in range(2)]
    idle = await exhaust(proxy)
    try:
        for _ in range(3):
            for reader, writer in clients:
                status, _, body = await roundtrip(reader, writer)
                assert status == 503 and b"EMFILE (Too many open files)" in body
        # A new client meets a full process at accept: the event loop (libuv) closes
        # its connection at once rather than leave it waiting.
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(5):
                assert await reader.read() == b""
        writer.close()
        await wait_until(lambda: bool(lines(proxy, "EMFILE", "at health_check")))
    finally:
        for writer in idle:
            writer.close()
    # Descriptors free again: new clients are accepted and served at once.
    async with aiohttp.ClientSession() as session:

        async def tick_served() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{proxy.url}/tick") as response:
                    return response.status == 200
            return False

        async with asyncio.timeout(10):
            while not await tick_served():  # noqa: ASYNC110 - each try is a request
                await asyncio.sleep(0.05)
    green = {"color": "green", "upstream": f"green/{marker.address}", "class": "2xx"}
    await metrics_when(proxy, lambda m: bool(m.get("zdproxy_requests_total", **green)))

    status = await admin_api(proxy, "GET", "/v1/status")
    (view,) = status["pools"]["blue"]["upstreams"]
    assert (view["health"], view["routable"], view["ejected_for"]) == ("up", True, None)
    for event in ("upstream_down", "upstream_ejected", "ejection_skipped"):
        assert not lines(proxy, event), event
    metrics = await scrape(proxy)
    labels = {"color": "blue", "upstream": f"blue/{app.address}"}
    assert metrics.get("zdproxy_upstream_ejections_total", **labels) == 0
    assert metrics.get("zdproxy_upstream_failures_total", **labels, kind="connect") is None
    local = metrics.by("zdproxy_local_errors_total", "where", kind="emfile")
    assert local["connect"] == 6 and local["health_check"] >= 1
    # Rate-limited: one line per kind and site every few seconds, never one per error.
    logged = lines(proxy, "EMFILE (Too many open files) at connect")
    assert 1 <= len(logged) < 6
    assert "LimitNOFILE" in logged[0]
    # Blue serves again, on the kept connections too.
    for reader, writer in clients:
        assert (await roundtrip(reader, writer, "/after"))[0] == 200
        writer.close()


def lines(proxy: ZdProxy, *texts: str) -> list[str]:
    return [line for line in proxy.log_lines if all(text in line for text in texts)]
