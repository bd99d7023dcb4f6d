"""`zdproxy demo --fleet N`: N zdproxy members sharing their state through one etcd.

One local etcd member (free loopback ports, data under DIR/fleet/etcd) and N `zdproxy
run` processes: member mI listens on 127.0.0.1:PORT+I-1 with its admin API on
ADMIN_PORT+I-1, from DIR/fleet-mI.toml, in front of its own blue and green sample apps
(served by this process, as the single demo's are). The members are real processes, so
that one can be stopped and the fleet watched going on without it; each logs to
DIR/fleet/mI.log. Every start is a fresh one (etcd's data and the members' journals
removed) unless `--keep-state`.

Ctrl-C (SIGINT) or SIGTERM stops the members, then etcd, then the apps. The children
run in their own sessions, so that a Ctrl-C reaches this process alone and they stop
in that order; the kernel sends them SIGTERM if this process dies without stopping
them (PR_SET_PDEATHSIG), so none is left holding the demo's ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import re
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import ClientError, ClientSession, ClientTimeout, web

from zdproxy.ops.demo import (
    check_free,
    free_port,
    fresh_state,
    sample_app,
    send_traffic,
    start_app,
    write_config,
)
from zdproxy.ops.listen_errors import CannotListen

log = logging.getLogger("zdproxy.demo")

ETCD = "etcd"  # Debian's etcd-server, which `make etcd` installs
FLEET_PREFIX = "/zdproxy/demo"
START_WITHIN = 30.0  # seconds for etcd, then each member, to answer as ready
STOP_WITHIN = 15.0  # seconds a child has to exit on SIGTERM before it gets SIGKILL
POLL_EVERY = 0.1  # seconds between readiness probes
PROBE = ClientTimeout(total=2)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The message of a zdproxy logfmt line (zdproxy/logs.py), to quote a member's last word.
LOGFMT_MSG = re.compile(r'\bmsg=(?:"((?:[^"\\]|\\.)*)"|(\S+))')

FLEET_CONFIG = """
# A member of `zdproxy demo --fleet`: the split, the salt, the pins and the rollout are
# shared with the other members through the demo's etcd (zdproxy's docs/fleet.md).
[fleet]
endpoints = ["{endpoint}"]
prefix = "{prefix}"
name = "{name}"
"""


class CannotStart(Exception):
    """A part of the fleet did not start; the message names it and says why."""


def _die_with_parent() -> None:
    """Run in the child before exec: SIGTERM when the demo's process dies, even killed."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """A process the demo started (etcd or a member), its output in `log`."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    stopping: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def failure(self) -> str:
        """Why it exited: the last line it logged (a member's message alone), its code."""
        lines = self.log.read_text(errors="replace").strip().splitlines()
        last = lines[-1] if lines else "(nothing logged)"
        if found := LOGFMT_MSG.search(last):
            last = re.sub(r'\\(["\\])', r"\1", found.group(1) or found.group(2))
        return f"{self.name}: {last} (exit {self.process.returncode}, log: {self.log})"

    async def watch(self) -> None:
        """Say so when it exits while the demo runs (a member someone stopped)."""
        code = await self.process.wait()
        if not self.stopping:
            log.warning("%s (pid %d) exited with %d; the others go on", self.name, self.pid, code)

    async def stop(self) -> None:
        self.stopping = True
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_WITHIN):
                await self.process.wait()
        except TimeoutError:
            log.warning("%s did not stop within %g s: killed", self.name, STOP_WITHIN)
            self.process.kill()
            await self.process.wait()


async def _spawn(name: str, argv: list[str], log_path: Path) -> Child:
    with log_path.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return Child(name, process, log_path)


async def _until_ready(child: Child, ready: Callable[[], Awaitable[bool]]) -> None:
    """Poll `ready` until it holds; CannotStart if the child exits or time runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_WITHIN
    while not await ready():
        if child.process.returncode is not None:
            raise CannotStart(child.failure())
        if loop.time() > deadline:
            late = f"{child.name} not ready within {START_WITHIN:g} s (log: {child.log})"
            raise CannotStart(late)
        await asyncio.sleep(POLL_EVERY)


async def _get_json(session: ClientSession, url: str, **headers: str) -> Any:
    """The JSON of a 200 answer, or None (no answer yet, or another status)."""
    try:
        async with session.get(url, headers=headers, timeout=PROBE) as response:
            return await response.json(content_type=None) if response.status == 200 else None
    except (ClientError, TimeoutError, ValueError):
        return None


def _etcd_command(root: Path) -> tuple[list[str], str]:
    """A one-member etcd cluster on free loopback ports, and its client URL. A kept data
    dir (--keep-state) starts on new ports too: a lone member has no peer to tell."""
    if shutil.which(ETCD) is None:
        raise CannotStart("no `etcd` on PATH: `make etcd` installs it (Debian's etcd-server)")
    client, peer = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    argv = [
        ETCD,
        "--name=demo",
        f"--data-dir={root / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=demo={peer}",
        "--initial-cluster-state=new",
        "--initial-cluster-token=zdproxy-demo",
        "--logger=zap",
        "--log-level=warn",
    ]
    return argv, client


async def _healthy(session: ClientSession, etcd_url: str) -> bool:
    """etcd answers /health with "true": it has a leader (itself)."""
    answer = await _get_json(session, f"{etcd_url}/health")
    return answer is not None and answer.get("health") == "true"


@dataclass
class Seat:
    """Member `name`'s place in the demo: its ports, its own apps, its config, its process."""

    name: str
    port: int
    admin_port: int
    apps: dict[str, int]
    config: Path
    child: Child

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


async def _seat(
    index: int,
    port: int,
    admin_port: int,
    directory: Path,
    endpoint: str,
    runners: list[web.AppRunner],
) -> Seat:
    """Member m(index+1): its blue and green apps (their runners into `runners`), its
    config, and its `zdproxy run`, started (not yet ready)."""
    name = f"m{index + 1}"
    apps = {"blue": free_port(), "green": free_port()}
    for color, version in (("blue", "v1"), ("green", "v2")):
        runners.append(await start_app(sample_app(color, version), apps[color]))
    at = (port + index, admin_port + index)
    config = directory / f"fleet-{name}.toml"
    fleet = FLEET_CONFIG.format(endpoint=endpoint, prefix=FLEET_PREFIX, name=name)
    write_config(config, *at, apps, directory / "fleet" / name, fleet)
    argv = [sys.executable, "-m", "zdproxy", "run", "--config", str(config)]
    child = await _spawn(name, argv, directory / "fleet" / f"{name}.log")
    return Seat(name, *at, apps, config, child)


async def _leader(session: ClientSession, seats: list[Seat], token: str) -> dict[str, Any]:
    """The first member's status once one of `seats` leads: the split every member runs."""
    seat, names = seats[0], {seat.name for seat in seats}
    status: dict[str, Any] | None = None

    async def led() -> bool:
        nonlocal status
        auth = {"Authorization": f"Bearer {token}"}
        status = await _get_json(session, f"{seat.admin_url}/v1/status", **auth)
        return status is not None and status["fleet"]["leader"] in names

    await _until_ready(seat.child, led)
    assert status is not None
    return status


def _banner(
    seats: list[Seat], etcd: Child, endpoint: str, root: Path, status: dict[str, Any], kept: bool
) -> str:
    """What runs (the split as the members run it, after etcd's state if kept) and what
    to try, with the commands for the fleet."""
    split = status["split"]
    live, candidate = split["live"], split["candidate"]
    share = f"{split['shares'][candidate]:g}%"
    row = "  {:<7} {:<16} {:<16} {:<16} {:<16} {}"
    members = "\n".join(
        row.format(
            seat.name,
            f"127.0.0.1:{seat.port}",
            f"127.0.0.1:{seat.admin_port}",
            f"127.0.0.1:{seat.apps['blue']}",
            f"127.0.0.1:{seat.apps['green']}",
            seat.child.pid,
        )
        for seat in seats
    )
    if kept:
        state = f"kept from the last run (--keep-state): {live} live, {candidate} at {share}"
    else:
        state = "fresh (the last run's etcd data and journals are gone; --keep-state keeps them)"
    first, second, last = seats[0], seats[1], seats[-1]
    leader = next(seat for seat in seats if seat.name == status["fleet"]["leader"])
    fail = f"http://127.0.0.1:{last.apps[candidate]}/_demo"
    config = f"--config {first.config}"
    return f"""
zdproxy demo is running: a fleet of {len(seats)} members sharing their state through etcd.
{row.format("member", "zdproxy", "admin API", "blue (v1)", "green (v2)", "pid")}
{members}
  {"etcd":<7} {endpoint}, pid {etcd.pid} (data in {root / "etcd"})
  {"split":<7} {live} live, {candidate} at {share} on every member; {leader.name} leads
  {"state":<7} {state}
  configs {first.config} ... {last.config}
  {"logs":<7} {first.child.log} ... {last.child.log}, {etcd.log}
  {"token":<7} {first.config.parent / "admin.token"} (every member's admin API and dashboard)

Try (a change through any member is applied by every member):
  curl -s http://127.0.0.1:{second.port}/           # {second.name} answers as {first.name} does
  zdproxy fleet status {config}
  zdproxy shift 25 --config {second.config}
  zdproxy status --config {last.config}   # {candidate} at 25% here too
Deploy {candidate} on every member ({leader.name} drives the steps; the demo sends a few
users per second to each member):
  zdproxy deploy {candidate} --config {second.config}
  zdproxy wait --until done {config}
Or make {candidate} fail on {last.name} only, and watch {last.name}'s judge roll every member back:
  curl -X POST {fail}/fail
  zdproxy deploy {candidate} {config}; zdproxy wait --until done {config}   # exit 5
  zdproxy events --kind rollout_rolled_back --config {second.config}    # [member {last.name}]
  curl -X POST {fail}/recover; zdproxy rollout retry {config}
Stop the leader (kill {leader.child.pid}): another member leads at once, the rest serve on;
`zdproxy run --config {leader.config}` brings it back, with the fleet's state.
Ctrl-C stops everything (members, etcd, apps); the next start is a fresh one again.
"""


async def _serve(size: int, port: int, admin_port: int, directory: Path, keep_state: bool) -> None:
    """Start etcd, the apps and the members, print the banner, then send traffic until
    cancelled; then stop everything started, however far it got."""
    listeners = {}
    for index in range(size):
        listeners[f"proxy.listen of m{index + 1}"] = port + index
        listeners[f"admin.listen of m{index + 1}"] = admin_port + index
    check_free(listeners)
    root = directory / "fleet"
    argv, endpoint = _etcd_command(root)  # first: no etcd, nothing of the last run removed
    kept = keep_state and (root / "etcd").is_dir()
    if not keep_state:
        fresh_state(root)
    root.mkdir(parents=True, exist_ok=True)
    etcd: Child | None = None
    members: list[Child] = []
    runners: list[web.AppRunner] = []
    tasks: list[asyncio.Future[None]] = []
    try:
        async with ClientSession() as session:
            etcd = await _spawn("etcd", argv, root / "etcd.log")
            await _until_ready(etcd, functools.partial(_healthy, session, endpoint))
            seats = []
            for index in range(size):
                seat = await _seat(index, port, admin_port, directory, endpoint, runners)
                seats.append(seat)
                members.append(seat.child)
            for seat in seats:
                ready = functools.partial(_answers, session, f"{seat.admin_url}/readyz")
                await _until_ready(seat.child, ready)
            token = (directory / "admin.token").read_text().strip()
            status = await _leader(session, seats, token)
            tasks = [asyncio.ensure_future(child.watch()) for child in (etcd, *members)]
            for seat in seats:  # the users behind the load balancer
                url = f"http://127.0.0.1:{seat.port}/"
                tasks.append(asyncio.ensure_future(send_traffic(url)))
            print(_banner(seats, etcd, endpoint, root, status, kept), flush=True)
            await asyncio.Future()  # until cancelled: Ctrl-C
    finally:
        for task in tasks:
            task.cancel()
        # The members first, while etcd still answers: each hands its leadership on.
        await asyncio.gather(*(member.stop() for member in members))
        if etcd is not None:
            await etcd.stop()
        for runner in runners:
            await runner.cleanup()


async def _answers(session: ClientSession, url: str) -> bool:
    return await _get_json(session, url) is not None


async def _fleet_demo(
    size: int, port: int, admin_port: int, directory: Path, keep_state: bool
) -> None:
    """Serve until SIGINT or SIGTERM (while starting too), then stop what started."""
    loop = asyncio.get_running_loop()
    serving = asyncio.create_task(_serve(size, port, admin_port, directory, keep_state))

    def stop() -> None:
        if not serving.cancelling():  # a second Ctrl-C must not cut the stop short
            serving.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    with contextlib.suppress(asyncio.CancelledError):
        await serving


def run_fleet_demo(
    size: int, port: int, admin_port: int, directory: str, keep_state: bool = False
) -> int:
    try:
        uvloop.run(_fleet_demo(size, port, admin_port, Path(directory), keep_state))
    except (CannotStart, CannotListen, OSError) as exc:
        log.error("cannot start the demo: %s", exc)
        return 1
    return 0
