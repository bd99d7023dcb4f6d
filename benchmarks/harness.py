"""Plumbing shared by the benchmarks that run zdproxy as users do.

Free loopback ports, children that die with the benchmark, the config file written as
TOML from nested dicts, and one `zdproxy run --config FILE` process with its admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientResponse, ClientSession, ClientTimeout

ADMIN_TIMEOUT = ClientTimeout(total=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if this script dies (no orphans, even on kill -9)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return json.dumps(value)


def render(model: dict[str, Any]) -> str:
    """Nested dicts as TOML tables; `pins` as an array of tables."""
    lines: list[str] = []

    def table(prefix: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict) and k != "pins"}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {toml(v)}" for k, v in scalars.items())
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{prefix}.{key}" if prefix else key, value)

    table("", model)
    for pin in model.get("pins", []):
        lines.append("[[pins]]")
        lines.extend(f"{k} = {toml(v)}" for k, v in pin.items())
    return "\n".join(lines) + "\n"


def zdproxy_bin() -> str:
    """The `zdproxy` entry point next to the python running the benchmark."""
    return str(Path(sys.executable).with_name("zdproxy"))


async def decoded(response: ClientResponse) -> tuple[int, Any]:
    """(status, the body as JSON, or as text when it is not JSON) of an admin answer."""
    text = await response.text()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


class Zdproxy:
    """One `zdproxy run --config FILE` in `tmp`: its admin API, its metrics, its stop.

    `model` is the config as nested dicts; its admin token is written to a file that the
    config names, as an operator would. The config file sits alone in `tmp/etc` (with the
    token file), so that `reload.watch` sees no other file change; the log goes to
    `tmp/zdproxy.log`.
    """

    def __init__(self, tmp: Path, model: dict[str, Any], token: str) -> None:
        self.tmp, self.model, self.token = tmp, model, token
        self.config = tmp / "etc" / "zdproxy.toml"
        self.process: subprocess.Popen[bytes] | None = None
        self.admin_url = "http://" + str(model["admin"]["listen"])
        self.url = "http://" + str(model["proxy"]["listen"])

    def start(self) -> None:
        self.config.parent.mkdir(exist_ok=True)
        token_file = Path(self.model["admin"]["token_file"])
        token_file.write_text(self.token + "\n")
        self.config.write_text(render(self.model))
        with (self.tmp / "zdproxy.log").open("wb") as log:
            self.process = subprocess.Popen(
                [zdproxy_bin(), "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
                preexec_fn=die_with_parent,
            )

    def log_tail(self, chars: int = 3000) -> str:
        path = self.tmp / "zdproxy.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    async def ready(self, session: ClientSession, within: float = 30) -> None:
        """Until GET /readyz answers 200 (listening, first health verdicts in)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                break
            with contextlib.suppress(ClientError, TimeoutError):
                async with session.get(self.admin_url + "/readyz", timeout=ADMIN_TIMEOUT) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"zdproxy did not become ready:\n{self.log_tail()}")

    async def api(
        self, session: ClientSession, method: str, path: str, body: Any = None
    ) -> tuple[int, Any]:
        """(status, decoded JSON body) of one admin API call."""
        headers = {"Authorization": f"Bearer {self.token}"}
        async with session.request(
            method, self.admin_url + path, json=body, headers=headers, timeout=ADMIN_TIMEOUT
        ) as response:
            return await decoded(response)

    async def metrics(self, session: ClientSession) -> str:
        async with session.get(self.admin_url + "/metrics", timeout=ADMIN_TIMEOUT) as response:
            return await response.text()

    async def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 20)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
