"""Hooks run as real processes: exit status, output tail, timeout and cancel kill the
whole process group, and a child left running in the background is neither waited
for nor killed (a hook that restarts an app server this way succeeds)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from zdproxy.config.plans import HookSettings
from zdproxy.control.hooks import OUTPUT_KEPT, run_hook


def alive(pid: int) -> bool:
    """A zombie counts as dead; so does a process reaped between the two looks (reading
    /proc/PID/stat of a process that just went away raises ProcessLookupError)."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    return stat.split(")")[1].split()[0] != "Z"


def hook(script: str, timeout: float = 10.0) -> HookSettings:
    return HookSettings(command=["sh", "-c", script], timeout=timeout)


async def test_exit_status_and_the_tail_of_the_output() -> None:
    result = await run_hook(
        "fails",
        hook(f"head -c {OUTPUT_KEPT * 3} /dev/zero | tr '\\0' x; echo; echo last words; exit 3"),
        {},
    )
    assert (result.ok, result.status) == (False, "exit 3")
    assert result.output.endswith("last words\n") and len(result.output) == OUTPUT_KEPT
    ok = await run_hook(
        "ok", hook('echo "$GREETING $ZDPROXY_UPSTREAM"'), {"ZDPROXY_UPSTREAM": "127.0.0.1:9"}
    )
    assert (ok.ok, ok.output) == (True, " 127.0.0.1:9\n")


async def test_a_timeout_kills_the_group_and_keeps_the_output(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    result = await run_hook(
        "slow", hook(f"echo migrating step 7; sleep 30 & echo $! > {pids}; wait", timeout=0.5), {}
    )
    assert (result.ok, result.status) == (False, "timed out after 0.5s")
    assert result.output == "migrating step 7\n"
    child = int(pids.read_text())
    for _ in range(100):
        if not alive(child):
            break
        await asyncio.sleep(0.01)
    assert not alive(child)


async def test_a_cancel_kills_the_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    task = asyncio.ensure_future(run_hook("long", hook(f"echo $$ > {pids}; sleep 30"), {}))
    for _ in range(500):
        if pids.exists() and pids.read_text().strip():
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    shell = int(pids.read_text())
    for _ in range(100):
        if not alive(shell):
            break
        await asyncio.sleep(0.01)
    assert not alive(shell)


async def test_a_child_left_in_the_background_is_not_waited_for(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    result = await run_hook("restart", hook(f"sleep 30 & echo $! > {pids}; echo restarted"), {})
    assert (result.ok, result.status, result.output) == (True, "exit 0", "restarted\n")
    assert result.seconds < 5  # not the 30 s of the server it left running
    server = int(pids.read_text())
    assert alive(server)  # the "app server" keeps running
    os.kill(server, signal.SIGKILL)
