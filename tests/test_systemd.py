"""systemd integration with the real tools: the unit files pass `systemd-analyze verify`,
the notify protocol reaches a real NOTIFY_SOCKET, listeners come from socket activation
(`systemd-socket-activate`), and zdproxy restarts in place under load without a failed
request while the activator's socket stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    ADMIN_AUTH,
    ADMIN_TOKEN,
    Upstream,
    ZdProxy,
    free_port,
    pools,
    to_toml,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
UNITS = ("zdproxy.service", "zdproxy.socket", "zdproxy-admin.socket")
StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is missing: `make test` installs systemd (see the Makefile)"
    return found


def verify_units(tmp_path: Path, units: tuple[str, ...], instance: str = "") -> None:
    """systemd-analyze verify on copies of these units (templates as `instance`), with
    not even a warning. The units name /opt/zdproxy/.venv/bin/zdproxy; verify insists
    that it exists, so the copies name the zdproxy of this checkout instead."""
    zdproxy_bin = str(Path(sys.executable).with_name("zdproxy"))
    for unit in units:
        text = (REPO / "systemd" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/opt/zdproxy/.venv/bin/zdproxy", zdproxy_bin))
    names = [unit.replace("@.", f"@{instance}.") for unit in units]
    result = subprocess.run(
        [tool("systemd-analyze"), "verify", "--man=no", *(f"./{u}" for u in names)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    verify_units(tmp_path, UNITS)
    service = (REPO / "systemd" / "zdproxy.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in service


# -- the notify protocol ------------------------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's: zdproxy sends its notifications here."""
    with tempfile.TemporaryDirectory(prefix="zd-") as short:
        path = str(Path(short) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.setblocking(False)
            yield sock, path


async def next_message(sock: socket.socket, within: float = 10) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(within):
        data = await loop.sock_recv(sock, 4096)
    return dict(line.split("=", 1) for line in data.decode().splitlines())


async def until_message(sock: socket.socket, key: str, within: float = 10) -> dict[str, str]:
    """The next message carrying `key`, skipping watchdog pings and others."""
    async with asyncio.timeout(within):
        while key not in (message := await next_message(sock)):
            pass
    return message


async def test_notify_ready_reloading_stopping_and_watchdog(
    zdproxy: StartProxy,
    upstream: StartUpstream,
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    app = await upstream("blue")
    config = {"pools": pools([app.address])}
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "300000"}  # pings every 150 ms
    proxy = await asyncio.get_running_loop().run_in_executor(None, zdproxy, config, env)

    ready = await until_message(sock, "READY")
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(proxy.pid)
    assert ready["STATUS"] == f"serving {proxy.address}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    pings = 0
    while pings < 3:  # WATCHDOG=1 comes from the event loop, every WATCHDOG_USEC / 2
        pings += "WATCHDOG" in await next_message(sock)
    assert loop.time() - started < 2.0

    assert await proxy.reload(config)
    reloading = await until_message(sock, "RELOADING")
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert (await until_message(sock, "READY"))["READY"] == "1"  # and serving again

    proxy.process.send_signal(signal.SIGTERM)
    stopping = await until_message(sock, "STOPPING")
    assert stopping["STOPPING"] == "1"
    assert await loop.run_in_executor(None, proxy.process.wait, 15) == 0


async def test_no_notify_socket_no_messages(
    zdproxy: StartProxy, upstream: StartUpstream, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, _ = notify_socket
    app = await upstream("blue")
    proxy = await asyncio.get_running_loop().run_in_executor(
        None, zdproxy, {"pools": pools([app.address])}
    )
    assert proxy.stop() == 0
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


# -- socket activation and restart in place -------------------------------------------------


class Activated:
    """`systemd-socket-activate` holding the listeners; zdproxy is exec'd into its pid on
    the first connection and re-execs itself there on SIGUSR2."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, admin_port: int) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.lines: list[str] = []

    async def read_log(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode(errors="replace"))

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        async with (
            aiohttp.ClientSession(self.admin_url, headers=ADMIN_AUTH) as session,
            session.request(method, path, json=body) as response,
        ):
            assert response.status == 200, await response.text()
            return await response.json()


@pytest.fixture
async def activated(
    tmp_path: Path, upstream: StartUpstream
) -> AsyncIterator[Callable[..., Awaitable[Activated]]]:
    started: list[Activated] = []
    tasks: list[asyncio.Task[None]] = []

    async def start(config: dict[str, Any], names: str = "proxy:admin") -> Activated:
        port, admin_port = free_port(), free_port()
        # The file names other ports: the passed sockets must win over it.
        proxy = {"listen": f"127.0.0.1:{free_port()}", "shutdown_timeout": "5s"}
        config = {
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
            "state": {"dir": str(tmp_path / "state")},
            "log": {"level": "info"},
            **config,
            "proxy": {**proxy, **config.get("proxy", {})},  # the test's own options win
        }
        path = tmp_path / "zdproxy.toml"
        path.write_text(to_toml(config))
        argv = [tool("systemd-socket-activate"), "-l", f"127.0.0.1:{port}"]
        argv += ["-l", f"127.0.0.1:{admin_port}", f"--fdname={names}"]
        argv += ["-E", f"ZDPROXY_ADMIN__TOKEN={ADMIN_TOKEN}"]
        argv += ["--", sys.executable, "-m", "zdproxy", "run", "--config", str(path)]
        process = await asyncio.create_subprocess_exec(
            *argv,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
        )
        proc = Activated(process, port, admin_port)
        started.append(proc)
        tasks.append(asyncio.ensure_future(proc.read_log()))
        await wait_until(lambda: proc.count("Listening on") == 2, within=10)
        # The first connection makes the activator exec zdproxy; it waits in the backlog.
        async with aiohttp.ClientSession() as session, session.get(proc.url + "/") as resp:
            assert resp.status == 200
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            proc.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):
                await proc.process.wait()
        if proc.process.returncode is None:
            proc.process.kill()
            await proc.process.wait()
    for task in tasks:
        task.cancel()


async def test_listeners_come_from_socket_activation(
    activated: Callable[..., Awaitable[Activated]], upstream: StartUpstream
) -> None:
    app = await upstream("blue")
    proc = await activated({"pools": pools([app.address])})
    status = await proc.admin("GET", "/v1/status")  # the admin API on the passed socket
    assert status["pools"]["blue"]["upstreams"][0]["id"] == f"blue/{app.address}"
    started = (await proc.admin("GET", "/v1/events?kind=started"))["events"]
    assert started[-1]["data"]["pid"] == proc.process.pid  # exec'd into the activator's pid
    assert proc.count(f"listening on {proc.url.removeprefix('http://')}") == 1


@pytest.mark.parametrize("workers", [1, 2])
async def test_restart_in_place_under_load_fails_no_request(
    activated: Callable[..., Awaitable[Activated]], upstream: StartUpstream, workers: int
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config = {"pools": pools([blue.address], [green.address]), "proxy": {"workers": workers}}
    proc = await activated(config)
    split = await proc.admin("PUT", "/v1/split", {"candidate_weight": 3000})
    restarts = 10
    done = asyncio.Event()
    outcomes: list[str] = []

    async def client(n: int) -> None:
        # Keep-alive connections, as a real client pool; every failure is counted.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            while not done.is_set() and len(outcomes) < 200_000:
                try:
                    async with session.get(f"{proc.url}/?client={n}") as resp:
                        body = await resp.json()
                        outcomes.append(body["name"] if resp.status == 200 else str(resp.status))
                except (aiohttp.ClientError, json.JSONDecodeError) as exc:
                    outcomes.append(f"error: {exc!r}")

    load = [asyncio.ensure_future(client(n)) for n in range(8)]
    try:
        async with asyncio.timeout(90):
            for i in range(1, restarts + 2):
                # Load on the zdproxy now serving, before (and after) each restart.
                target = len(outcomes) + 50
                await wait_until(lambda target=target: len(outcomes) >= target, within=10)
                if i <= restarts:
                    proc.process.send_signal(signal.SIGUSR2)
                    serving = 1 + i
                    await wait_until(
                        lambda serving=serving: proc.count("listening on") == serving, within=20
                    )
    finally:
        done.set()
        await asyncio.gather(*load)

    failures = [o for o in outcomes if o not in ("blue", "green")]
    assert failures == [], f"{len(failures)} of {len(outcomes)} failed: {failures[:5]}"
    assert len(outcomes) >= 50 * (restarts + 1) and {"blue", "green"} <= set(outcomes)
    assert proc.process.returncode is None  # the same pid, re-exec'd ten times
    started = (await proc.admin("GET", "/v1/events?kind=started"))["events"]
    assert [e["data"]["pid"] for e in started] == [proc.process.pid] * (restarts + 1)
    assert (await proc.admin("GET", "/v1/split")) == split  # the journal kept the state


async def test_restart_is_refused_while_the_config_file_is_invalid(
    activated: Callable[..., Awaitable[Activated]], upstream: StartUpstream, tmp_path: Path
) -> None:
    app = await upstream("blue")
    proc = await activated({"pools": pools([app.address])})
    config = tmp_path / "zdproxy.toml"
    config.write_text(config.read_text() + "\n[split]\ncandidate_weight = 20000\n")
    proc.process.send_signal(signal.SIGUSR2)
    await wait_until(lambda: proc.count("restart_refused") == 1)
    assert proc.count("split.candidate_weight") >= 1
    async with aiohttp.ClientSession() as session, session.get(proc.url + "/") as resp:
        assert resp.status == 200  # the running zdproxy carries on
    assert proc.count("listening on") == 1


async def test_restart_in_place_moves_a_listener_the_config_moved(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    app = await upstream("blue")
    old_port, new_port = free_port(), free_port()
    config: dict[str, Any] = {
        "proxy": {"listen": f"127.0.0.1:{old_port}"},
        "pools": pools([app.address]),
        "reload": {"watch": False},
    }
    proxy = zdproxy(config)
    moved = {**proxy.config, "proxy": {"listen": f"127.0.0.1:{new_port}"}}
    proxy.config_path.write_text(to_toml(moved))
    proxy.process.send_signal(signal.SIGUSR2)
    await wait_until(
        lambda: any(f"listening on 127.0.0.1:{new_port}" in x for x in proxy.log_lines), within=20
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{new_port}/") as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(f"http://127.0.0.1:{old_port}/") as resp:
                await resp.read()
