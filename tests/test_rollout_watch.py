"""The judge's numbers where operators see them, against a real zdproxy under load:
GET /v1/rollout's `judge`, the events (history and stream), /metrics, `zdproxy status`
and `zdproxy rollout show [--watch]` as a user runs them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import pty
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import ADMIN_AUTH, ADMIN_TOKEN, Upstream, ZdProxy, admin_api, pools, run_cli
from tests.test_metrics import Metrics, scrape
from tests.test_rollout import FAST_JUDGE, load, until_rollout

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]

# Errors only: ms-scale latency ratios on a loaded machine are noise (see test_rollout.py),
# and so is a request pending past 500 ms: hangs are not what these tests are about.
JUDGE = {**FAST_JUDGE, "pending_failure_after": "1m"}
JUDGE_METRICS = (
    "zdproxy_judge_verdict",
    "zdproxy_judge_evidence",
    "zdproxy_judge_requests",
    "zdproxy_judge_error_rate",
    "zdproxy_rollout_hold_left_seconds",
)


def one_step(
    blue: Upstream, green: Upstream, tmp_path: Path, judge: dict[str, Any] = JUDGE
) -> dict[str, Any]:
    """A plan of one long step: the test ends it (promote) or the judge does (rollback)."""
    return {
        "pools": pools([blue.address], [green.address]),
        "state": {"dir": str(tmp_path / "state")},
        "plans": {
            "canary": {"steps": [{"weight": 50, "hold": "5m"}], "bake": "200ms", "judge": judge}
        },
    }


def env(proxy: ZdProxy) -> dict[str, str]:
    return {"ZDPROXY_ADMIN_URL": proxy.admin_address, "ZDPROXY_TOKEN": ADMIN_TOKEN}


def clean_env(proxy: ZdProxy) -> dict[str, str]:
    """The test's environment without its ZDPROXY_* variables, plus the admin API's."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("ZDPROXY_")}
    return {**kept, **env(proxy)}


def judge_samples(metrics: Metrics) -> list[str]:
    return [name for name, _ in metrics.samples if name.startswith(JUDGE_METRICS)]


async def judged(proxy: ZdProxy) -> dict[str, Any]:
    """The rollout once the judge has counted candidate requests."""
    return await until_rollout(
        proxy, lambda r: r["judge"] is not None and r["judge"]["numbers"]["candidate"]["requests"]
    )


def refuse(constant: str) -> Any:
    """JSON has no Infinity or NaN (Python's json reads them; a browser's does not)."""
    raise AssertionError(f"{constant} is not JSON")


async def streamed(proxy: ZdProxy, kind: str) -> dict[str, Any]:
    """The first event of `kind` that GET /v1/events?follow=1 sends (its history first)."""
    url = f"{proxy.admin_url}/v1/events?kind={kind}&follow=1"
    async with (
        aiohttp.ClientSession(headers=ADMIN_AUTH) as session,
        session.get(url) as stream,
        asyncio.timeout(5),
    ):
        async for line in stream.content:
            if line.startswith(b"data: "):
                event: dict[str, Any] = json.loads(line[len(b"data: ") :], parse_constant=refuse)
                return event
    raise AssertionError(f"the stream ended without a {kind} event")


def verdict_of(block: str) -> str | None:
    """The verdict a `rollout show` block gives, if any."""
    found = re.search(r"^  (?:last )?verdict: (\w+)", block, re.MULTILINE)
    return found and found.group(1)


class Watch:
    """`zdproxy rollout show --watch` into a pipe, read as it prints."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.out = ""

    async def until(self, text: str, within: float = 15.0) -> None:
        """Read its output until `text` appears in it."""
        assert self.process.stdout is not None
        async with asyncio.timeout(within):
            while text not in self.out:
                line = await self.process.stdout.readline()
                assert line, f"the watch ended before printing {text!r}:\n{self.out}"
                self.out += line.decode()

    async def end(self, within: float = 30.0) -> tuple[int, str]:
        """Its exit code and stderr, once it exits by itself."""
        async with asyncio.timeout(within):
            out, err = await self.process.communicate()
        self.out += out.decode()
        assert self.process.returncode is not None
        return self.process.returncode, err.decode()


@contextlib.asynccontextmanager
async def watching(proxy: ZdProxy) -> AsyncIterator[Watch]:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "zdproxy", "rollout", "show", "--watch", "--interval", "100ms"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(proxy),
    )
    try:
        yield Watch(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_judge_is_in_the_api_the_events_the_metrics_and_the_cli(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(one_step(blue, green, tmp_path))
    assert judge_samples(await scrape(proxy)) == []  # no rollout: no judge gauges
    async with load(proxy.url):
        await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        rollout = await judged(proxy)
        judge = rollout["judge"]
        assert judge["verdict"] in ("hold", "pass"), judge
        numbers = judge["numbers"]
        assert numbers["phase"] == "step 1" and 0 < numbers["hold_left_seconds"] <= 300
        assert numbers["reference"]["requests"] > 0
        assert set(numbers["recent"]) == {"candidate", "live"}
        assert set(numbers["tests"]) == {"errors"}  # FAST_JUDGE compares with live on nothing
        assert 0 <= numbers["evidence"] < 1
        by_id = await admin_api(proxy, "GET", "/v1/rollouts/1")
        assert by_id["judge"]["numbers"]["phase"] == "step 1"

        metrics = await scrape(proxy)
        verdicts = metrics.by("zdproxy_judge_verdict", "verdict")
        assert sorted(verdicts.values()) == [0, 0, 1] and set(verdicts) == {"pass", "hold", "fail"}
        assert metrics.by("zdproxy_judge_requests", "color").keys() == {"candidate", "reference"}
        assert metrics.by("zdproxy_judge_evidence", "test").keys() == {"errors"}
        assert metrics.by("zdproxy_judge_error_rate", "color")["candidate"] == 0
        assert 0 < (metrics.get("zdproxy_rollout_hold_left_seconds") or 0) <= 300

        status = await run_cli("status", env=env(proxy))
        assert status.code == 0, status.err
        [line] = [line for line in status.out.splitlines() if line.startswith("rollout")]
        assert line.startswith("rollout 1: green step 1 of 1; judge: "), status.out
        shown = await run_cli("rollout", "show", env=env(proxy))
        assert shown.code == 0, shown.err
        assert "  verdict: " in shown.out and "  hold left: " in shown.out
        assert "    errors  [" in shown.out
        raw = json.loads((await run_cli("rollout", "show", "--json", env=env(proxy))).out)
        assert raw["judge"]["numbers"]["phase"] == "step 1"

        await admin_api(proxy, "POST", "/v1/rollout/promote")
        done = await until_rollout(proxy, lambda r: r["state"] not in ("step", "baking"))
        await until_rollout(proxy, lambda r: r["state"] == "done")
    assert done["judge"] is not None  # an ended rollout keeps its last verdict

    # Every rollout event carries the numbers: the history and the stream alike.
    [baking] = (await admin_api(proxy, "GET", "/v1/events?kind=rollout_baking"))["events"]
    assert baking["data"]["numbers"]["candidate"]["requests"] > 0
    assert (await streamed(proxy, "rollout_baking"))["data"] == baking["data"]

    assert judge_samples(await scrape(proxy)) == []  # ended: the gauges are gone


async def test_watch_follows_a_rollout_from_idle_to_done_and_exits_0(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(one_step(blue, green, tmp_path))
    async with watching(proxy) as watch, load(proxy.url):
        await watch.until("no rollout yet")  # idle: it waits for one to start
        await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        await judged(proxy)
        await watch.until("  verdict: ")
        await admin_api(proxy, "POST", "/v1/rollout/promote")
        code, err = await watch.end()
    assert (code, err) == (0, ""), watch.out
    blocks = watch.out.strip().split("\n\n")
    assert blocks[0] == "no rollout yet"
    assert blocks[-1].startswith("rollout 1: green with plan canary: done, step 1 of 1")
    assert "  last verdict: " in blocks[-1]
    # Into a pipe a block is printed once per change of state, step or verdict, not on
    # every poll (the counts change on every one).
    moves = [(block.splitlines()[0], verdict_of(block)) for block in blocks]
    assert all(before != after for before, after in itertools.pairwise(moves)), watch.out


async def test_watch_exits_5_when_the_rollout_is_rolled_back(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    failing: dict[str, int] = {}
    blue, green = await upstream("blue"), await upstream("green", failing=failing)
    # No error allowed at all: the first one is proof, an infinite evidence.
    proxy = zdproxy(one_step(blue, green, tmp_path, {**JUDGE, "max_error_rate": 0}))
    async with load(proxy.url):
        await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        await judged(proxy)
        async with watching(proxy) as watch:
            await watch.until("  verdict: ")
            failing["status"] = 500
            code, err = await watch.end()
    assert code == 5, (watch.out, err)
    assert err.startswith("zdproxy rollout: rollout 1 rolled_back: judge failed green: error rate")
    last = watch.out.strip().split("\n\n")[-1]
    assert last.startswith("rollout 1: green with plan canary: rolled_back")
    assert "  last verdict: fail (step 1): error rate" in last
    assert "    errors  [##########] >999%  error rate: " in last
    # Infinite evidence is capped, the same in the API, the event history and the stream.
    rollout = await admin_api(proxy, "GET", "/v1/rollout")
    assert rollout["judge"]["numbers"]["tests"]["errors"]["evidence"] == 1000
    [event] = (await admin_api(proxy, "GET", "/v1/events?kind=rollout_rolled_back"))["events"]
    assert event["data"]["numbers"]["tests"]["errors"]["evidence"] == 1000
    assert (await streamed(proxy, "rollout_rolled_back"))["data"] == event["data"]


async def test_watch_redraws_a_terminal_and_ctrl_c_exits_130_quietly(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    terminal, screen = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "zdproxy", "rollout", "show", "-w", "--interval", "100ms"),
        stdout=screen,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(proxy),
    )
    os.close(screen)
    loop = asyncio.get_running_loop()
    shown = b""
    try:
        async with asyncio.timeout(15):
            while shown.count(b"\x1b[H\x1b[Jno rollout yet") < 2:  # redrawn in place
                shown += await loop.run_in_executor(None, os.read, terminal, 4096)
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            _, err = await process.communicate()
    finally:
        os.close(terminal)
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 130
    assert b"Traceback" not in err, err.decode()
