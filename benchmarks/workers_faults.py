"""A worker killed, restarts in place and reloads, with proxy.workers = 2 under load.

    .venv/bin/python benchmarks/workers_faults.py [--kills 10] [--restarts 5] [--reloads 20]

Everything on 127.0.0.1 with ephemeral ports: four app servers (faulty_app.py, two per
color, 5-20 ms of service time), zdproxy as users start it with `proxy.workers = 2`
and the access log on (each line names the worker that wrote it), and 24 keep-alive
users (keepalive_users.py: a cookie jar each, 70% GET and 30% POST, 400 req/s in all)
from start to end.

Kills: `--kills` times, worker 1 and 2 in turn, once both workers route by the latest
snapshot: the client ports of both workers' connections are read from /proc, the
victim gets SIGKILL, and then
- `GET /v1/status` is polled every 10 ms until the victim's place shows a new pid with
  `current = true` whose process has its title ("listed");
- probes (`Connection: close`, an `X-Request-Id` each) go one after the other on new
  connections until the access log shows one answered by the victim's place: the
  replacement ("answered": when that answer reached the probe). A probe must not fail;
- the `worker_exited` event gives the requests it counted as lost.
Each failed request of the users is put with the kill before it (within 5 s), by its
connection: the victim's and sent before the kill (in flight), the victim's and sent
after the kill (an idle keep-alive connection reused before the client saw its end:
it fails before any byte of an answer), the survivor's (must not happen), or another.

Restarts and reloads: `--restarts` SIGUSR2 (done: the `started` event, /readyz, both
new workers current) and `--reloads` SIGHUP after a changed split (done: the
`reload_applied` event and both workers current), one after the other, 1 s apart.
Every failed request during one (or within 2 s after it) is counted against it.

It prints a table per fault with median and max, the goals (issue 16: zero failures
on the surviving worker, the replacement answers within 1 s, the lost requests
counted; zero failures from restarts and reloads), and exits 1 if one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import ClientError, ClientSession
from fault_outcomes import ACTION_WINDOW, Action, Kill, Run, classify, report
from faulty_app import AppHandle
from harness import Zdproxy, die_with_parent, free_port, render
from keepalive_users import Users, probe

T = TypeVar("T")
HOST = "127.0.0.1"
POLL = 0.01  # seconds between two polls of the admin API or the log
SETTLE = 1.0  # seconds of plain traffic after each fault, before the next
REPLACED_WITHIN = 10.0  # bound for the replacement to be listed and to answer
WEIGHTS = (1000, 0, 2500, 500, 5000)  # the reloads' candidate weights, in turn
PROBE_LINE = re.compile(r"request_id=(probe-\d+-\d+)\b.*\bworker=(\d+)")


async def until(check: Callable[[], Awaitable[T | None]], within: float) -> T | None:
    """`check()` every POLL s until it gives something; None after `within`."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if (found := await check()) is not None:
            return found
        await asyncio.sleep(POLL)
    return None


def client_ports(pids: list[int], listen_port: int) -> list[set[int]]:
    """For each process, the peers' ports of the client connections it holds (/proc).

    Reading /proc/net/tcp takes milliseconds: the caller runs this in a thread, so that
    the users go on sending (a blocked loop would let every request in flight finish)."""
    inodes: list[set[int]] = []
    for pid in pids:
        inodes.append(set())
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if (link := os.readlink(fd)).startswith("socket:["):
                    inodes[-1].add(int(link[8:-1]))
    ports: list[set[int]] = [set() for _ in pids]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rpartition(":")[2], 16)
        if local_port != listen_port or fields[3] == "0A":  # 0A: the listening socket
            continue
        for held, found in zip(inodes, ports, strict=True):
            if int(fields[9]) in held:
                found.add(int(fields[2].rpartition(":")[2], 16))
    return ports


def titled(pid: int, index: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"zdproxy: worker %d" % index)
    except OSError:
        return False


class AccessLog:
    """zdproxy's log file, read as it grows: which worker answered each probe."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.worker_of: dict[str, int] = {}

    def scan(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk.rfind(b"\n") + 1  # a line being written is read next time
        self.offset += complete
        for found in PROBE_LINE.finditer(chunk[:complete].decode(errors="replace")):
            self.worker_of[found[1]] = int(found[2])


class Bench:
    def __init__(self, zd: Zdproxy, session: ClientSession, port: int) -> None:
        self.zd, self.session, self.port = zd, session, port
        self.log = AccessLog(zd.tmp / "zdproxy.log")

    async def workers(self) -> list[dict[str, Any]]:
        status, body = await self.zd.api(self.session, "GET", "/v1/status")
        return list(body["workers"]) if status == 200 else []

    async def settled(self, within: float = REPLACED_WITHIN) -> list[dict[str, Any]] | None:
        """Both workers, running and routing by the latest snapshot."""

        async def check() -> list[dict[str, Any]] | None:
            try:
                ws = await self.workers()
            except (ClientError, TimeoutError):
                return None  # the admin API is down during a restart in place
            return ws if len(ws) == 2 and all(w["pid"] and w["current"] for w in ws) else None

        return await until(check, within)

    async def event_since(self, since: int, kinds: set[str], within: float) -> Any:
        async def check() -> Any:
            try:
                status, body = await self.zd.api(self.session, "GET", f"/v1/events?since={since}")
            except (ClientError, TimeoutError):
                return None
            found = [e for e in body["events"] if e["kind"] in kinds] if status == 200 else []
            return found[0] if found else None

        return await until(check, within)

    async def last_event(self) -> int:
        _, body = await self.zd.api(self.session, "GET", "/v1/events?limit=1")
        return int(body["events"][-1]["id"]) if body["events"] else 0

    async def kill(self, number: int, index: int) -> Kill:
        workers = await self.settled()
        if workers is None:
            raise RuntimeError("the workers did not settle before a kill")
        victim, survivor = workers[index - 1], workers[2 - index]
        since = await self.last_event()
        pids = [victim["pid"], survivor["pid"]]
        theirs, others = await asyncio.to_thread(client_ports, pids, self.port)
        kill = Kill(number, index, victim["pid"], time.time(), theirs, others)
        os.kill(victim["pid"], signal.SIGKILL)

        async def listed() -> float | None:
            ws = await self.workers()
            new = ws[index - 1] if len(ws) == 2 else {}
            pid = new.get("pid")
            if pid in (None, victim["pid"]) or not new.get("current"):
                return None
            # Its title is set once it has its Start message, just before it listens:
            # the status can show a new pid with its predecessor's report for a moment.
            return (time.time() - kill.at) * 1000 if titled(pid, index) else None

        kill.listed_ms, kill.answered_ms = await asyncio.gather(
            until(listed, REPLACED_WITHIN), self.answered_by(index, kill)
        )
        event = await self.event_since(since, {"worker_exited"}, REPLACED_WITHIN)
        kill.lost = event["data"]["lost"] if event is not None else None
        return kill

    async def answered_by(self, index: int, kill: Kill) -> float | None:
        """Probes on new connections until one is answered by worker `index`: the ms from
        the kill to that answer."""
        done: dict[str, float] = {}
        deadline = time.monotonic() + REPLACED_WITHIN
        sent = 0
        while time.monotonic() < deadline:
            rid = f"probe-{kill.number}-{sent}"
            sent += 1
            if await probe(HOST, self.port, f"/probe/{rid}", rid) == 200:
                done[rid] = time.time()
            else:
                kill.probes_failed += 1
            self.log.scan()
            by_it = [done[r] for r in done if self.log.worker_of.get(r) == index]
            if by_it:
                return (min(by_it) - kill.at) * 1000
            await asyncio.sleep(POLL)
        return None

    async def restart(self) -> Action:
        since = await self.last_event()
        started = time.time()
        assert self.zd.process is not None
        self.zd.process.send_signal(signal.SIGUSR2)
        event = await self.event_since(since, {"started", "restart_refused"}, 40)
        outcome = "no started event within 40 s" if event is None else "done"
        if event is not None and event["kind"] == "restart_refused":
            outcome = f"refused: {event['reason']}"
        if outcome == "done" and await self.settled(20) is None:
            outcome = "the new workers did not settle within 20 s"
        return Action("restart", started, time.time(), outcome)

    async def reload(self, weight: int) -> Action:
        since = await self.last_event()
        self.zd.model["split"]["candidate_weight"] = weight
        self.zd.config.write_text(render(self.zd.model))
        started = time.time()
        assert self.zd.process is not None
        self.zd.process.send_signal(signal.SIGHUP)
        event = await self.event_since(since, {"reload_applied", "reload_refused"}, 10)
        outcome = "no reload event within 10 s" if event is None else "done"
        if event is not None and event["kind"] == "reload_refused":
            outcome = f"refused: {event['reason']}"
        if outcome == "done" and await self.settled() is None:
            outcome = "the workers did not settle"
        return Action("reload", started, time.time(), outcome)


async def drive(args: argparse.Namespace, tmp: Path, run: Run) -> None:
    apps = [
        AppHandle.start(color, f"{color}-{i}", tmp, 10 * n + i, die_with_parent)
        for n, color in enumerate(("blue", "green"))
        for i in range(2)
    ]
    zd: Zdproxy | None = None
    users: Users | None = None
    try:
        for app in apps:
            app.wait_ports()
        port = free_port()
        model = {
            "proxy": {"listen": f"{HOST}:{port}", "workers": 2},
            "admin": {"listen": f"{HOST}:{free_port()}", "token_file": str(tmp / "etc" / "token")},
            "state": {"dir": str(tmp / "state")},
            "log": {"level": "info", "access": True},
            "reload": {"watch": False},  # reloads by SIGHUP only, one at a time
            "pools": {
                color: {"upstreams": [a.address for a in apps if a.color == color]}
                for color in ("blue", "green")
            },
            "split": {"live": "blue", "candidate_weight": 0},
        }
        zd = Zdproxy(tmp, model, secrets.token_hex(16))
        zd.start()
        async with ClientSession() as session:
            await zd.ready(session)
            bench = Bench(zd, session, port)
            users = Users(HOST, port, args.users, args.rate, args.seed, args.time_limit)
            users.start()
            deadline = time.monotonic() + args.time_limit - 30
            await asyncio.sleep(SETTLE * 2)
            for number in range(1, args.kills + 1):
                if time.monotonic() > deadline:
                    run.notes.append(f"time limit: {number - 1} kills")
                    break
                run.kills.append(await bench.kill(number, 2 - number % 2))
                print(f"  kill {number}: {run.kills[-1]}", file=sys.stderr)
                await asyncio.sleep(SETTLE)
            for n in range(args.restarts + args.reloads):
                if time.monotonic() > deadline:
                    run.notes.append("time limit: not every restart and reload done")
                    break
                restart = n < args.restarts
                action = await (
                    bench.restart() if restart else bench.reload(WEIGHTS[n % len(WEIGHTS)])
                )
                run.actions.append(action)
                same = sum(x.kind == action.kind for x in run.actions)
                print(f"  {action.kind} {same}: {action.outcome}", file=sys.stderr)
                await asyncio.sleep(SETTLE)
            await asyncio.sleep(ACTION_WINDOW)
    finally:
        if users is not None:
            await users.stop()
            run.answers = users.answers
        if zd is not None:
            await zd.stop()
        for app in apps:
            app.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    p.add_argument("--kills", type=int, default=10, help="kill -9 of a worker (default 10)")
    p.add_argument("--restarts", type=int, default=5, help="restarts in place (default 5)")
    p.add_argument("--reloads", type=int, default=20, help="reloads (default 20)")
    p.add_argument("--users", type=int, default=24, help="keep-alive users (default 24)")
    p.add_argument("--rate", type=float, default=400.0, help="their requests/s in all (400)")
    p.add_argument("--seed", type=int, default=1, help="seed of the users' pacing and methods")
    p.add_argument("--time-limit", type=float, default=600.0, help="overall bound, s (600)")
    p.add_argument("--json", type=Path, help="write every kill, action and failure here")
    args = p.parse_args()
    run = Run()

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):  # unwinds drive's finally: all stopped
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
        with tempfile.TemporaryDirectory(prefix="zdworkers-") as tmp:
            await drive(args, Path(tmp), run)

    try:
        asyncio.run(guarded())
    except asyncio.CancelledError:
        print("interrupted: stopped every process this run started", file=sys.stderr)
        return 130
    classify(run)
    tables, goals = report(run)
    failed = [a for a in run.answers if a.failed]
    print(f"\nusers: {len(run.answers)} requests, {len(failed)} failed\n\n{tables}\n")
    for label, ok in goals:
        print(f"goal: {label}: {'PASS' if ok else 'MISS'}")
    for a in run.unexplained:
        print(f"failed outside any fault: {a}")
    for note in run.notes:
        print(f"note: {note}")
    if args.json:
        dump = {
            k: [asdict(x) for x in getattr(run, k)] for k in ("kills", "actions", "unexplained")
        }
        dump["failures"] = [asdict(a) for a in failed]
        args.json.write_text(json.dumps(dump, indent=1, default=sorted))
    return 0 if all(ok for _, ok in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
