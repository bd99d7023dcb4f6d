"""`zdproxy demo`: sample blue and green apps behind zdproxy, started and stopped as users do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import CliResult, free_port, run_cli

READY_LINE = "zdproxy demo is running."
LAST_LINE = "Ctrl-C stops everything"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ZDPROXY_")}


async def read_until(stream: asyncio.StreamReader, marker: str, within: float) -> list[str]:
    """Lines from `stream` up to and including the one containing `marker`."""
    lines: list[str] = []
    async with asyncio.timeout(within):
        while True:
            raw = await stream.readline()
            if not raw:
                raise AssertionError("demo exited before it was ready:\n" + "".join(lines))
            lines.append(raw.decode())
            if marker in lines[-1]:
                return lines


@dataclass
class Demo:
    """One run of `zdproxy demo`, its banner read."""

    process: asyncio.subprocess.Process
    port: int
    directory: Path
    banner: str

    @property
    def config(self) -> Path:
        return self.directory / "zdproxy.toml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def cli(self, *args: str) -> CliResult:
        """The CLI as the banner says to run it: nothing but the demo's config file."""
        return await run_cli(*args, "--config", str(self.config), within=120)

    async def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await self.process.wait() == 0


StartDemo = Callable[..., Awaitable[Demo]]


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[StartDemo]:
    """Factory: await demo(*extra_args) starts `zdproxy demo` (the same ports and
    directory every time, as a user restarting it) and returns once its banner is out."""
    port, admin_port = free_port(), free_port()
    directory = tmp_path / "demo"
    started: list[asyncio.subprocess.Process] = []

    async def start(*extra: str) -> Demo:
        log = tmp_path / f"demo-{len(started)}.stderr"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "zdproxy", "demo", "--port", str(port)),
                *("--admin-port", str(admin_port), "--dir", str(directory), *extra),
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=clean_env(),
            )
        started.append(process)
        assert process.stdout is not None
        try:
            banner = await read_until(process.stdout, LAST_LINE, within=20)
        except AssertionError:
            raise AssertionError(log.read_text()) from None
        return Demo(process, port, directory, "".join(banner))

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def served_by(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        color: str = (await response.json())["color"]
        return color


def app_url(banner: str, color: str) -> str:
    """An app's own address, from its banner line: "green (v2, candidate at 0%) URL"."""
    found = re.search(rf"^  {color} \(v\d, [^)]*\)\s+(http://\S+)$", banner, re.MULTILINE)
    assert found, banner
    return found.group(1)


async def test_demo_serves_blue_and_stops_cleanly(demo: StartDemo) -> None:
    run = await demo()
    text = run.banner
    assert READY_LINE in text
    assert run.url in text
    assert "blue (v1, live)" in text and "green (v2, candidate at 0%)" in text

    async with aiohttp.ClientSession() as session:
        for path in ("/", "/pricing"):
            async with session.get(f"{run.url}{path}") as resp:
                assert resp.status == 200
                assert resp.headers["Via"] == "1.1 zdproxy"  # answered through the proxy
                body = await resp.json()
            assert body == {"color": "blue", "version": "v1", "path": path}

    assert str(run.config) in text
    check = await run_cli("check", "--config", str(run.config))
    assert check.code == 0, check.err
    assert check.err == ""  # both pools are checked alike: no warning
    assert check.out.strip() == f"{run.config}: ok"
    assert f'listen = "127.0.0.1:{run.port}"' in run.config.read_text()

    # Every CLI command needs nothing but the demo's config: admin address and token.
    status = await run.cli("status")
    assert status.code == 0, status.err
    assert "live blue, candidate green at 0%" in status.out

    # The README's rollback walk-through: green fails on purpose (its own switch), a
    # deploy of it is judged on the demo's own traffic and rolled back.
    green = app_url(text, "green")
    async with aiohttp.ClientSession() as session:
        async with session.post(green + "/_demo/fail") as resp:
            assert (await resp.json())["failing"] is True
        assert (await run.cli("deploy", "green")).code == 0
        waited = await run.cli("wait", "--until", "done", "--timeout", "30s")
        assert waited.code == 5, waited
        assert "rolled_back: judge failed green: error rate" in waited.err
        async with session.post(green + "/_demo/recover") as resp:
            assert (await resp.json())["failing"] is False
    assert (await run.cli("shift", "100")).code == 0
    assert await served_by(run.url) == "green"
    drain = await run.cli("drain", "blue", "--wait")
    assert drain.code == 0 and drain.out.startswith("drained blue/"), drain
    wait = await run.cli("wait", "--until", "drained:blue", "--until", "live:green")
    assert wait.code == 0, wait.err
    events = await run.cli("events")
    assert "split_changed [cli] live blue, candidate green at 100%" in events.out

    await run.stop()
    with socket.socket() as sock, contextlib.suppress(ConnectionRefusedError):
        sock.settimeout(2)
        sock.connect(("127.0.0.1", run.port))
        raise AssertionError(f"port {run.port} still accepts connections after the demo exited")


async def test_a_restarted_demo_starts_afresh_unless_told_to_keep_its_state(
    demo: StartDemo,
) -> None:
    """Issue 10, why 7: after a finished rollout, a restarted demo kept green live while
    its banner said blue was, and the README's "restart the demo" walkthrough broke.
    This is that walkthrough, step by step."""
    run = await demo()
    assert (await run.cli("deploy", "green")).code == 0
    done = await run.cli("wait", "--until", "done", "--timeout", "90s")
    assert done.code == 0, done
    assert await served_by(run.url) == "green"
    await run.stop()

    # Restarted: blue live with green at 0%, as the banner and the README say.
    run = await demo()
    status = await run.cli("status")
    assert "live blue, candidate green at 0%" in status.out, status.out
    assert await served_by(run.url) == "blue"
    assert "blue (v1, live)" in run.banner and "green (v2, candidate at 0%)" in run.banner
    assert re.search(r"^  state +fresh ", run.banner, re.MULTILINE), run.banner
    assert "rollout" not in (await run.cli("events")).out  # the last run's history is gone

    # The README goes on: break green, deploy, rolled back (exit 5), recover, retry.
    green = app_url(run.banner, "green")  # a new port: the banner of this run says it
    async with aiohttp.ClientSession() as session:
        async with session.post(green + "/_demo/fail") as resp:
            assert (await resp.json())["failing"] is True
        assert (await run.cli("deploy", "green")).code == 0
        waited = await run.cli("wait", "--until", "done", "--timeout", "30s")
        assert waited.code == 5, waited
        show = await run.cli("rollout", "show")
        assert show.code == 0 and "rolled_back" in show.out, show
        async with session.post(green + "/_demo/recover") as resp:
            assert (await resp.json())["failing"] is False
    assert (await run.cli("rollout", "retry")).code == 0
    done = await run.cli("wait", "--until", "done", "--timeout", "90s")
    assert done.code == 0, done
    assert await served_by(run.url) == "green"
    await run.stop()

    # --keep-state: the last run's outcome stays, and the banner says so.
    run = await demo("--keep-state")
    status = await run.cli("status")
    assert "live green, candidate blue at 0%" in status.out, status.out
    assert await served_by(run.url) == "green"
    assert "green (v2, live)" in run.banner and "blue (v1, candidate at 0%)" in run.banner
    assert "kept from the last run (--keep-state): green live, blue at 0%" in run.banner
    await run.stop()
