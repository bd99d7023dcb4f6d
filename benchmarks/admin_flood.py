"""The admin listener under a flood of slow connections (slowloris): does `status` keep
answering, and how many file descriptors does zdproxy hold meanwhile?

One `zdproxy run` (the admin limits as configured, defaults unless given). Then three
phases of `--duration` seconds each:

- `quiet`: no flood, for the baseline;
- `hold`: `--connections` attackers each open one connection, send a partial request
  head and one more header line every `--trickle` seconds, never finishing it; a closed
  connection is not reopened (the measurement of the hardening issue);
- `churn`: the same, but an attacker reopens at once when zdproxy closes it, as a real
  attacker would (at most `--max-opens` connections in all).

All along, an operator calls `GET /v1/status` with the token every `--interval`
seconds, each call on a new connection as `zdproxy status` does, with a 5 s timeout.
Per phase: the status calls' latency (p50, p99, max) and failures, zdproxy's open file
descriptors (/proc/PID/fd: peak and end), and what the attackers saw.

    .venv/bin/python benchmarks/admin_flood.py [--connections 1000] [--duration 15]

Everything listens on 127.0.0.1; every phase is bounded in time, the attackers in count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector
from harness import Zdproxy, free_port

TOKEN = "benchmark-admin-token-0123456789"
PARTIAL_HEAD = b"GET /v1/status HTTP/1.1\r\nHost: admin\r\n"
STATUS_TIMEOUT = 5.0


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    fds: list[int] = field(default_factory=list)
    opens: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # what attackers got back


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def operator(url: str, interval: float, duration: float) -> dict[str, Any]:
    """GET /v1/status every `interval` for `duration`, each call on a fresh connection:
    the latencies of the answered calls, and the failures by kind."""
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    timeout = ClientTimeout(total=STATUS_TIMEOUT)
    deadline = time.monotonic() + duration
    async with ClientSession(connector=TCPConnector(force_close=True)) as session:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                async with session.get(url, headers=headers, timeout=timeout) as response:
                    await response.read()
                    if response.status == 200:
                        latencies.append(time.perf_counter() - started)
                    else:
                        failures[f"status {response.status}"] += 1
            except (ClientError, TimeoutError, OSError) as exc:
                failures[type(exc).__name__] += 1
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - started)))
    return {"latencies": latencies, "failures": failures}


async def operator_process(url: str, interval: float, duration: float) -> dict[str, Any]:
    """The operator in a process of its own, as `zdproxy status` is: in this one, the
    attackers' busy event loop would delay its requests, not zdproxy."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--operator", url, str(interval), str(duration),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(duration + STATUS_TIMEOUT + 30):
        out, _ = await child.communicate()
    result: dict[str, Any] = json.loads(out)
    return result


async def attacker(
    host: str, port: int, phase: Phase, stop: asyncio.Event, trickle: float, reopen: bool,
    max_opens: int,
) -> None:  # fmt: skip
    while not stop.is_set() and phase.opens < max_opens:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            phase.answers[f"connect: {type(exc).__name__}"] += 1
            await asyncio.sleep(0.1)
            continue
        phase.opens += 1
        try:
            writer.write(PARTIAL_HEAD)
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(4096), trickle)
                except TimeoutError:
                    writer.write(b"X-Slow: 1\r\n")
                    continue
                phase.answers[data.split(b"\r\n", 1)[0].decode() if data else "closed"] += 1
                break
        except OSError as exc:
            phase.answers[type(exc).__name__] += 1
        finally:
            writer.close()
        if not reopen:
            return


async def run_phase(
    zd: Zdproxy, name: str, args: argparse.Namespace, attackers: int, reopen: bool
) -> Phase:
    assert zd.process is not None
    phase = Phase(name)
    stop = asyncio.Event()
    host, _, port = zd.admin_url.removeprefix("http://").rpartition(":")
    tasks = [
        asyncio.ensure_future(
            attacker(host, int(port), phase, stop, args.trickle, reopen, args.max_opens)
        )
        for _ in range(attackers)
    ]
    calls = asyncio.ensure_future(
        operator_process(zd.admin_url + "/v1/status", args.interval, args.duration)
    )
    while not calls.done():
        phase.fds.append(open_fds(zd.process.pid))
        await asyncio.sleep(0.1)
    stop.set()
    async with asyncio.timeout(args.trickle + 5):
        await asyncio.gather(*tasks)
    phase.fds.append(open_fds(zd.process.pid))
    result = calls.result()
    phase.latencies, phase.failures = result["latencies"], Counter(result["failures"])
    return phase


def report(phase: Phase) -> str:
    lat = sorted(phase.latencies)
    calls = len(lat) + sum(phase.failures.values())
    if lat:
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        timing = (
            f"p50 {statistics.median(lat) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
            f"max {lat[-1] * 1000:.1f} ms"
        )
    else:
        timing = "no answer"
    failures = ", ".join(f"{n} {why}" for why, n in phase.failures.most_common()) or "none"
    answers = ", ".join(f"{n} {what}" for what, n in phase.answers.most_common(4)) or "-"
    return (
        f"{phase.name:6}  status: {len(lat)}/{calls} answered, {timing}; failures: {failures}\n"
        f"        zdproxy fds: peak {max(phase.fds)}, end {phase.fds[-1]}; "
        f"attacker connections: {phase.opens}, they got: {answers}"
    )


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="zd-flood-") as tmp_name:
        tmp = Path(tmp_name)
        admin = {"listen": f"127.0.0.1:{free_port()}", "token_file": str(tmp / "etc" / "token")}
        admin.update({k: v for k, v in vars(args).items() if k in LIMITS and v is not None})
        model: dict[str, Any] = {
            "proxy": {"listen": f"127.0.0.1:{free_port()}"},
            "admin": admin,
            "state": {"dir": str(tmp / "state")},
            "log": {"level": "warning"},
            "reload": {"watch": False},
            "pools": {"blue": {"upstreams": ["127.0.0.1:9"], "health": {"enabled": False}}},
        }
        zd = Zdproxy(tmp, model, TOKEN)
        zd.start()
        try:
            async with ClientSession() as session:
                await zd.ready(session)
            print(
                f"admin limits: {({k: v for k, v in admin.items() if k in LIMITS}) or 'defaults'}"
            )
            print(
                f"{args.connections} attackers, trickle {args.trickle}s, status every "
                f"{args.interval}s, {args.duration}s per phase"
            )
            for name, attackers, reopen in (
                ("quiet", 0, False),
                ("hold", args.connections, False),
                ("churn", args.connections, True),
            ):
                print(report(await run_phase(zd, name, args, attackers, reopen)), flush=True)
        finally:
            await zd.stop()
            if "admin: closed connections" in (log := zd.log_tail(100_000)):
                print("zdproxy's log:", *[x for x in log.splitlines() if "admin:" in x][:5])
    return 0


LIMITS = ("header_timeout", "idle_timeout", "max_connections", "max_pending_heads")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="attackers (max 5000)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase (max 120)")
    parser.add_argument("--trickle", type=float, default=1.0, help="seconds between header lines")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between status calls")
    parser.add_argument("--max-opens", type=int, default=200_000, help="attacker connections, all")
    for name in LIMITS:
        kind = int if name.startswith("max_") else str  # durations as "10s", "500ms"
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"admin.{name}")
    args = parser.parse_args()
    if not (0 < args.connections <= 5000 and 0 < args.duration <= 120):
        parser.error("--connections must be 1-5000 and --duration at most 120")
    return args


if __name__ == "__main__":
    if sys.argv[1:2] == ["--operator"]:  # the child of operator_process()
        url, interval, duration = sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
        print(json.dumps(asyncio.run(operator(url, interval, duration))))
        sys.exit(0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # room for the attackers' sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.exit(asyncio.run(main(parse_args())))
