"""Hooks: commands from the config file ([hooks.NAME]), run with a timeout, their
output kept (the end of it) for the event that reports them. Nothing in the API can
name a command; it can only name a plan, whose hooks the file declares."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from zdproxy.config.plans import HookSettings

OUTPUT_KEPT = 4096  # bytes of a hook's output kept for its event


@dataclass(frozen=True)
class HookResult:
    name: str
    ok: bool
    status: str  # "exit 0", "exit 3", "timed out after 30s", "cannot start: ..."
    output: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "hook": self.name,
            "ok": self.ok,
            "status": self.status,
            "output": self.output,
            "seconds": round(self.seconds, 3),
        }


async def run_hook(name: str, hook: HookSettings, env: dict[str, str]) -> HookResult:
    """Run one hook in its own process group: a timeout or a cancel (abort, stop) kills
    everything it started. The hook is done when its process exits: its output goes to
    a file, not a pipe, so a child it left running in the background (a restarted app
    server) neither holds it up nor is killed."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as output:
        try:
            process = await asyncio.create_subprocess_exec(
                *hook.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **hook.env, **env},
                start_new_session=True,
            )
        except OSError as exc:
            return HookResult(name, False, f"cannot start: {exc.strerror}", "", 0.0)
        try:
            async with asyncio.timeout(hook.timeout):
                code = await process.wait()
            status, ok = f"exit {code}", code == 0
        except TimeoutError:
            _kill(process)
            await process.wait()
            status, ok = f"timed out after {hook.timeout:g}s", False
        except BaseException:
            _kill(process)
            raise
        output.seek(max(0, output.seek(0, os.SEEK_END) - OUTPUT_KEPT))
        text = output.read().decode(errors="replace")
    return HookResult(name, ok, status, text, time.monotonic() - started)


def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
