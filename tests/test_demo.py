"""`zdproxy demo`: sample blue and green apps behind zdproxy, started and stopped as users do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_port, run_cli

READY_LINE = "zdproxy demo is running."


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


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, Path]]:
    port = free_port()
    directory = tmp_path / "demo"
    with (tmp_path / "demo.stderr").open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "zdproxy",
            "demo",
            "--port",
            str(port),
            "--admin-port",
            str(free_port()),
            "--dir",
            str(directory),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=clean_env(),
        )
        try:
            yield process, port, directory
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_demo_serves_blue_and_stops_cleanly(
    demo: tuple[asyncio.subprocess.Process, int, Path], tmp_path: Path
) -> None:
    process, port, directory = demo
    assert process.stdout is not None
    try:
        banner = await read_until(process.stdout, "Ctrl-C stops everything", within=15)
    except AssertionError:
        raise AssertionError((tmp_path / "demo.stderr").read_text()) from None
    text = "".join(banner)
    assert READY_LINE in text
    assert f"http://127.0.0.1:{port}" in text

    async with aiohttp.ClientSession() as session:
        for path in ("/", "/pricing"):
            async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                assert resp.status == 200
                assert resp.headers["Via"] == "1.1 zdproxy"  # answered through the proxy
                body = await resp.json()
            assert body == {"color": "blue", "version": "v1", "path": path}

    config = directory / "zdproxy.toml"
    assert str(config) in text
    check = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "zdproxy", "check", "--config", str(config)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    async with asyncio.timeout(15):
        out, err = await check.communicate()
    assert check.returncode == 0, err.decode()
    assert out.decode().strip() == f"{config}: ok"
    assert f'listen = "127.0.0.1:{port}"' in config.read_text()

    # Every CLI command needs nothing but the demo's config: admin address and token.
    cli = ("--config", str(config))
    status = await run_cli("status", *cli)
    assert status.code == 0, status.err
    assert "live blue, candidate green at 0%" in status.out

    # The README's rollback walk-through: green fails on purpose (its own switch), a
    # deploy of it is judged on the demo's own traffic and rolled back.
    green = re.search(r"green \(v2, candidate\) (http://\S+)", text)
    assert green, text
    async with aiohttp.ClientSession() as session:
        async with session.post(green.group(1) + "/_demo/fail") as resp:
            assert (await resp.json())["failing"] is True
        assert (await run_cli("deploy", "green", *cli)).code == 0
        waited = await run_cli("wait", "--until", "done", "--timeout", "30s", *cli)
        assert waited.code == 5, waited
        assert "rolled_back: judge failed green: error rate" in waited.err
        async with session.post(green.group(1) + "/_demo/recover") as resp:
            assert (await resp.json())["failing"] is False
    assert (await run_cli("shift", "100", *cli)).code == 0
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as r:
        assert (await r.json())["color"] == "green"
    drain = await run_cli("drain", "blue", "--wait", *cli)
    assert drain.code == 0 and drain.out.startswith("drained blue/"), drain
    wait = await run_cli("wait", "--until", "drained:blue", "--until", "live:green", *cli)
    assert wait.code == 0, wait.err
    events = await run_cli("events", *cli)
    assert "split_changed [cli] live blue, candidate green at 100%" in events.out

    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(5):
        assert await process.wait() == 0
    with socket.socket() as sock, contextlib.suppress(ConnectionRefusedError):
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))
        raise AssertionError(f"port {port} still accepts connections after the demo exited")
