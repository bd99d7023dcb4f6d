"""Shared fixtures: zdproxy started as users start it, and real upstreams on loopback.

- `zdproxy` starts `python -m zdproxy run --config FILE` as a subprocess with a config
  written from a dict; the proxy binds port 0 and the fixture reads the bound address
  from its log line.
- `upstream` starts an aiohttp app (tests/apps.py) in the test's event loop on an
  ephemeral port; `raw_upstream` starts a scripted asyncio server for misbehaving
  upstreams and records every byte it received.
- `etcd_cluster` and `etcd_node` start a new etcd cluster of 3 members or 1 on free
  loopback ports (tests/etcd_cluster.py), stopped at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.apps import upstream_app
from tests.etcd_cluster import EtcdCluster
from tests.test_rollout_model import RolloutMachine
from zdproxy.config.loader import settings_from_mapping
from zdproxy.config.settings import Settings

READY = re.compile(r"listening on ([^\s\"]+)")  # inside the quoted msg of a logfmt line
ADMIN = re.compile(r"admin API on ([^\s\"]+)")
ADMIN_TOKEN = "test-admin-token-0123456789"  # given to every test proxy (ZDPROXY_ADMIN__TOKEN)
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def toml_value(value: Any) -> str:
    """A TOML value: JSON spelling for scalars, inline tables for dicts (e.g. in lists)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def to_toml(config: dict[str, Any]) -> str:
    """Enough TOML for our configs: nested tables of strings, numbers, bools and lists
    (a dict inside a list becomes an inline table: `{address = "...", weight = 3}`)."""
    lines: list[str] = []

    def table(prefix: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in scalars.items())
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{prefix}.{key}" if prefix else key, value)

    table("", config)
    return "\n".join(lines) + "\n"


@dataclass
class ZdProxy:
    """A running `zdproxy run` process."""

    process: subprocess.Popen[str]
    config_path: Path
    address: str
    log_lines: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    admin_address: str = ""

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_address}"

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self, field_name: str = "VmRSS") -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE)
        assert match, status
        return int(match.group(1))

    async def reload(self, config: dict[str, Any]) -> bool:
        """Rewrite the config file (same listener), send SIGHUP; True if it was applied."""
        self.config = {
            "admin": self.config["admin"],
            "state": self.config["state"],
            **config,
            "proxy": {**config.get("proxy", {}), "listen": self.address},
        }
        self.config.setdefault("log", {"level": "debug"})
        self.config_path.write_text(to_toml(self.config))
        before = len(self.log_lines)
        self.process.send_signal(signal.SIGHUP)

        def outcome() -> list[str]:
            return [line for line in self.log_lines[before:] if "reload_" in line]

        await wait_until(lambda: bool(outcome()))
        return "reload_applied" in outcome()[0]

    def stop(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def start_zdproxy(
    tmp_path: Path,
    config: dict[str, Any],
    env: dict[str, str] | None = None,
    wrap: tuple[str, ...] = (),
    command: tuple[str, ...] = (sys.executable, "-m", "zdproxy"),
) -> ZdProxy:
    """`wrap`: a command that runs zdproxy's command line (e.g. in a mount namespace);
    `command`: the zdproxy to run (an installed one, for the packages' tests)."""
    index = len(list(tmp_path.glob("zdproxy-*.toml")))
    # Merged, not replaced: a test that sets other proxy options (TLS, limits) still
    # gets an ephemeral port, never the default 8080 another test or user may hold.
    config = {**config, "proxy": {"listen": "127.0.0.1:0", **config.get("proxy", {})}}
    config.setdefault("log", {"level": "debug"})
    config.setdefault("admin", {"listen": "127.0.0.1:0"})
    config.setdefault("state", {"dir": str(tmp_path / f"state-{index}")})
    env = {"ZDPROXY_ADMIN__TOKEN": ADMIN_TOKEN, **(env or {})}
    path = tmp_path / f"zdproxy-{index}.toml"
    path.write_text(to_toml(config))
    process = subprocess.Popen(
        [*wrap, *command, "run", "--config", str(path)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stderr is not None
    lines: list[str] = []
    admin = ""
    for line in process.stderr:
        lines.append(line)
        if match := ADMIN.search(line):
            admin = match.group(1)
        elif match := READY.search(line):
            proxy = ZdProxy(process, path, match.group(1), lines, config, admin)
            # Keep draining stderr so the proxy never blocks on a full pipe.
            _drain_in_background(process, lines)
            return proxy
    process.wait()
    raise AssertionError("zdproxy did not start:\n" + "".join(lines))


def _drain_in_background(process: subprocess.Popen[str], lines: list[str]) -> None:
    import threading

    def drain() -> None:
        assert process.stderr is not None
        lines.extend(process.stderr)

    threading.Thread(target=drain, daemon=True).start()


@pytest.fixture
def zdproxy(tmp_path: Path) -> Iterator[Callable[..., ZdProxy]]:
    """Factory: zdproxy(config_dict, env=None) -> a running proxy, stopped at teardown."""
    started: list[ZdProxy] = []

    def factory(
        config: dict[str, Any], env: dict[str, str] | None = None, wrap: tuple[str, ...] = ()
    ) -> ZdProxy:
        proxy = start_zdproxy(tmp_path, config, env, wrap)
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proxy.stop()


@dataclass
class Upstream:
    """An aiohttp app on an ephemeral loopback port; `seen` records each request."""

    address: str
    runner: web.AppRunner
    seen: list[dict[str, Any]]


async def start_upstream(name: str = "blue", **options: Any) -> Upstream:
    seen: list[dict[str, Any]] = []
    app = upstream_app(name, seen, **options)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Upstream(f"127.0.0.1:{port}", runner, seen)


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    """Factory: await upstream(name) -> an aiohttp upstream, cleaned up at teardown."""
    started: list[Upstream] = []

    async def factory(name: str = "blue", **options: Any) -> Upstream:
        up = await start_upstream(name, **options)
        started.append(up)
        return up

    yield factory
    for up in started:
        await up.runner.cleanup()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawUpstream:
    """A scripted TCP server: `received` holds every byte any connection sent it."""

    address: str
    server: asyncio.Server
    received: bytearray
    connections: int = 0


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[RawHandler], Awaitable[RawUpstream]]]:
    servers: list[asyncio.Server] = []

    async def factory(handler: RawHandler) -> RawUpstream:
        received = bytearray()
        raw: RawUpstream

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw.connections += 1
            recording = _RecordingReader(reader, received)
            try:
                await handler(recording, writer)  # type: ignore[arg-type]
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        raw = RawUpstream(f"127.0.0.1:{port}", server, received)
        return raw

    yield factory
    for server in servers:
        server.close()


class _RecordingReader:
    """Wraps a StreamReader so that every byte read is also recorded."""

    def __init__(self, reader: asyncio.StreamReader, sink: bytearray) -> None:
        self._reader = reader
        self._sink = sink

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        data = await self._reader.readuntil(separator)
        self._sink.extend(data)
        return data

    async def readexactly(self, n: int) -> bytes:
        data = await self._reader.readexactly(n)
        self._sink.extend(data)
        return data

    async def read(self, n: int = -1) -> bytes:
        data = await self._reader.read(n)
        self._sink.extend(data)
        return data


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a condition every 10 ms until it holds; fail after `within` seconds."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - the condition is plain state, no event to await
            await asyncio.sleep(0.01)


def free_port() -> int:
    """A loopback port that was free a moment ago (for configs that must name one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def refused_address() -> Iterator[Callable[[], str]]:
    """Loopback addresses where connections are refused for the whole test: each is a
    socket bound but never listening, held open so no other process can take the port
    (a port merely closed a moment ago can be reused by any server in the meantime)."""
    held: list[socket.socket] = []

    def factory() -> str:
        sock = socket.socket()
        held.append(sock)
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"

    yield factory
    for sock in held:
        sock.close()


async def admin_api(
    proxy: ZdProxy, method: str, path: str, body: dict[str, Any] | None = None, status: int = 200
) -> Any:
    """One admin API call with the token; asserts its status and returns the JSON answer."""
    async with (
        aiohttp.ClientSession(proxy.admin_url, headers=ADMIN_AUTH) as session,
        session.request(method, path, json=body) as response,
    ):
        answer = await response.json(content_type=None)
        assert response.status == status, answer
        return answer


async def wait_healthy(proxy: ZdProxy, color: str, within: float = 5.0) -> None:
    """Until every upstream of `color` is up by its health checks: a new upstream is
    "unknown", and gets no traffic, until its first checks pass (a TCP connect by
    default, a few milliseconds for an app that listens)."""
    async with asyncio.timeout(within):
        while True:
            status = await admin_api(proxy, "GET", "/v1/status")
            found = status["pools"][color]["upstreams"]
            if found and all(u["health"] == "up" for u in found):
                return
            await asyncio.sleep(0.02)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


async def run_cli(*args: str, env: dict[str, str] | None = None, within: float = 30) -> CliResult:
    """Run `zdproxy ARGS...` as a user would, without the test's ZDPROXY_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ZDPROXY_")}
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "zdproxy", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**clean, **(env or {})},
    )
    async with asyncio.timeout(within):
        out, err = await process.communicate()
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())


def in_process_settings(tmp_path: Path, config: dict[str, Any]) -> Settings:
    """Settings for a Daemon run on the test's loop: its own admin port and state dir."""
    defaults = {
        "proxy": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0"},
        "state": {"dir": str(tmp_path / "state")},
    }
    return settings_from_mapping({**defaults, **config})


def pools(blue: list[str] | None = None, green: list[str] | None = None) -> dict[str, Any]:
    return {"blue": {"upstreams": blue or []}, "green": {"upstreams": green or []}}


def unchecked(config: dict[str, Any]) -> dict[str, Any]:
    """`pools(...)` with health checks off (`enabled = false`): routable without a check,
    for tests whose traffic must reach an upstream that does not listen, or whose
    upstreams must never be connected to (with checks on, "unknown" is not routable)."""
    for pool in config.values():
        pool["health"] = {"enabled": False}
    return config


async def raw_exchange(
    proxy: ZdProxy, data: bytes, *, within: float = 5.0, until_close: bool = True
) -> bytes:
    """Send raw bytes to the proxy and return everything it answers until it closes."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
                if not until_close:
                    break
    finally:
        writer.close()
    return b"".join(chunks)


@pytest.fixture
def machine() -> Iterator[RolloutMachine]:
    """The control plane and its rollouts over a fake data plane and a fake clock."""
    harness = RolloutMachine()
    yield harness
    harness.teardown()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A new 3-member etcd cluster on free loopback ports (tests/etcd_cluster.py): the
    test may kill and restart members; every member is stopped at teardown."""
    with EtcdCluster(tmp_path, size=3) as cluster:
        yield cluster


@pytest.fixture
def etcd_node(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A new 1-member etcd cluster, for the tests that need no failover (faster)."""
    with EtcdCluster(tmp_path, size=1) as cluster:
        yield cluster
