"""Rollback reaction time and user-visible errors during a bad canary.

For each mode (retry on the live pool for 500s, or not) and each worker count
(`--workers`, zdproxy's proxy.workers), one zdproxy process with its own blue and green
apps runs `trials` rollouts of a green pool at 10% (a first canary step; the default
retry budget, 20% of recent requests, covers its failures); after a second of healthy
traffic green starts answering 500, and the time from that switch to the rollback (the
`rollout_rolled_back` event, emitted once every worker routes by the weight 0) is
measured. GET load runs during each trial; every 5xx or error a client sees is counted.
The worker counts of a mode are set up side by side and take their trials in turn
(1, 2, 2, 1, 1, 2, ...), so that a change of the machine's load weighs on both alike;
only the zdproxy whose trial runs has traffic.

Goals: median reaction at most 500 ms (the rollout issue); zero errors with retry; with
2 workers, a reaction within 50 ms of one process's (issue 16), judged on the mean: the
judge acts on a 100 ms tick, so the reactions fall in two groups about 100 ms apart
(the failures were judged at the first tick after the switch, or at the second), and
a median lands in one group or the other on a trial or two, where the mean moves by
the share of each group and by the shift within them.

    .venv/bin/python benchmarks/rollback.py [--trials 20] [--clients 8] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, DummyCookieJar, web
from harness import die_with_parent, free_port

TOKEN = "benchmark-admin-token-0123456789"
CONFIG = """
[proxy]
listen = "127.0.0.1:{port}"
workers = {workers}
[admin]
listen = "127.0.0.1:{admin}"
[state]
dir = "{state}"
[log]
level = "warning"
[pools.blue]
upstreams = ["127.0.0.1:{blue}"]
[pools.green]
upstreams = ["127.0.0.1:{green}"]
[retry]
statuses = {statuses}
[plans.bad]
steps = [{{ weight = 10, hold = "1h" }}]
[plans.bad.judge]
window = "3s"
min_requests = 10
"""


def app(name: str, failing: dict[str, bool]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        if failing.get("on"):
            return web.Response(status=500, text=f"{name} failing\n")
        return web.Response(text=f"{name}\n")

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", handle)
    return application


async def serve(application: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


class Zdproxy:
    def __init__(self, tmp: Path, blue: int, green: int, retry: bool, workers: int) -> None:
        self.port, self.admin = free_port(), free_port()
        statuses = [500, 502, 503, 504] if retry else [502, 503, 504]
        config = tmp / f"zdproxy-{retry}-w{workers}.toml"
        state = tmp / f"state-{retry}-w{workers}"
        config.write_text(
            CONFIG.format(
                port=self.port, admin=self.admin, state=state, blue=blue, green=green,
                statuses=json.dumps(statuses), workers=workers,
            )
        )  # fmt: skip
        zdproxy = str(Path(sys.executable).with_name("zdproxy"))
        self.process = subprocess.Popen(
            [zdproxy, "run", "--config", str(config)],
            env={**os.environ, "ZDPROXY_ADMIN__TOKEN": TOKEN},
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # stopped even if this script is killed
        )
        self.url = f"http://127.0.0.1:{self.port}/"

    async def api(self, session: ClientSession, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        url = f"http://127.0.0.1:{self.admin}{path}"
        async with session.request(method, url, json=body, headers=headers) as response:
            return await response.json()

    async def ready(self, session: ClientSession) -> None:
        async with asyncio.timeout(20):
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{self.admin}/readyz") as r:
                        if r.status == 200:
                            return
                except ClientError:
                    pass
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(15)


async def until(check: Any, within: float = 30) -> Any:
    async with asyncio.timeout(within):
        while not (result := await check()):  # noqa: ASYNC110 - polls the admin API
            await asyncio.sleep(0.02)
    return result


class Setup:
    """One zdproxy (one worker count, one mode) with its apps, its load and its trials."""

    def __init__(self, retry: bool, workers: int, clients: int) -> None:
        self.retry, self.workers, self.clients = retry, workers, clients
        self.failing: dict[str, bool] = {}
        self.loaded = asyncio.Event()  # the load runs while set
        self.done = False
        self.outcomes = {"requests": 0, "errors": 0}
        self.reactions: list[float] = []
        self.runners: list[web.AppRunner] = []
        self.zd: Zdproxy | None = None
        self.load: list[asyncio.Future[None]] = []

    async def start(self, tmp: Path, admin: ClientSession) -> None:
        blue_runner, blue = await serve(app("blue", {}))
        green_runner, green = await serve(app("green", self.failing))
        self.runners = [blue_runner, green_runner]
        self.zd = Zdproxy(tmp, blue, green, self.retry, self.workers)
        await self.zd.ready(admin)
        self.load = [asyncio.ensure_future(self._client()) for _ in range(self.clients)]

    async def _client(self) -> None:
        assert self.zd is not None
        async with ClientSession(cookie_jar=DummyCookieJar()) as session:
            while True:
                await self.loaded.wait()
                if self.done:
                    return
                try:
                    async with session.get(self.zd.url) as response:
                        await response.read()
                        bad = response.status >= 500
                except ClientError:
                    bad = True
                self.outcomes["requests"] += 1
                self.outcomes["errors"] += bad

    async def trial(self, admin: ClientSession) -> float:
        """One bad canary, rolled back: the seconds from green failing to the rollback."""
        zd = self.zd
        assert zd is not None
        self.failing["on"] = False
        self.loaded.set()
        try:
            if not self.reactions:
                await zd.api(admin, "POST", "/v1/rollouts", {"color": "green", "plan": "bad"})
            else:
                await zd.api(admin, "POST", "/v1/rollout/retry")

            async def stepping() -> bool:
                return bool((await zd.api(admin, "GET", "/v1/rollout"))["state"] == "step")

            await until(stepping)
            await asyncio.sleep(1.0)  # healthy traffic on green first
            switched = time.time()
            self.failing["on"] = True

            async def rolled_back() -> Any:
                events = await zd.api(admin, "GET", "/v1/events?kind=rollout_rolled_back")
                fresh = [e for e in events["events"] if e["time"] > switched]
                return fresh[-1] if fresh else None

            try:
                event = await until(rolled_back, within=10)
            except TimeoutError:
                rollout = await zd.api(admin, "GET", "/v1/rollout")
                raise SystemExit(f"no rollback within 10 s: {rollout}") from None
        finally:
            self.loaded.clear()
        self.reactions.append(event["time"] - switched)
        return self.reactions[-1]

    async def stop(self) -> None:
        self.done = True
        self.loaded.set()
        await asyncio.gather(*self.load)
        if self.zd is not None:
            self.zd.stop()
        for runner in self.runners:
            await runner.cleanup()

    def row(self) -> dict[str, Any]:
        ms = sorted(r * 1000 for r in self.reactions)
        return {
            "mode": "retry 500 on live" if self.retry else "no retry of 500",
            "workers": self.workers,
            "trials": len(ms),
            "median_ms": statistics.median(ms),
            "mean_ms": statistics.mean(ms),
            "p90_ms": statistics.quantiles(ms, n=10, method="inclusive")[-1]
            if len(ms) > 1
            else ms[0],
            "max_ms": ms[-1],
            **self.outcomes,
        }


async def measure(retry: bool, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    setups = [Setup(retry, w, args.clients) for w in args.workers]
    async with ClientSession() as admin:
        try:
            for setup in setups:
                await setup.start(tmp, admin)
            for trial in range(args.trials):
                turn = setups if trial % 2 == 0 else setups[::-1]  # 1, 2, 2, 1, ...
                for setup in turn:
                    reaction = await setup.trial(admin)
                    print(
                        f"  {'retry' if retry else 'no retry'}, {setup.workers} worker(s), "
                        f"trial {trial + 1}: {reaction * 1000:.0f} ms",
                        file=sys.stderr,
                    )
        finally:
            for setup in setups:
                await setup.stop()
    return [setup.row() for setup in setups]


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="zdrollback-") as tmp:
        rows = [r for retry in (True, False) for r in await measure(retry, args, Path(tmp))]
    print("| mode | workers | trials | median reaction ms | mean | p90 | max | requests | errors |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['workers']} | {r['trials']} | {r['median_ms']:.0f} | "
            f"{r['mean_ms']:.0f} | {r['p90_ms']:.0f} | {r['max_ms']:.0f} | {r['requests']} | "
            f"{r['errors']} |"
        )
    median_ok = all(r["median_ms"] <= 500 for r in rows)
    retry_ok = all(r["errors"] == 0 for r in rows if r["mode"].startswith("retry"))
    print(f"\ngoal: median reaction <= 500 ms: {'PASS' if median_ok else 'MISS'}")
    print(f"goal: zero errors with retry: {'PASS' if retry_ok else 'MISS'}")
    one = {r["mode"]: r for r in rows if r["workers"] == 1}
    for r in rows:
        if r["workers"] > 1 and r["mode"] in one:
            mean = r["mean_ms"] - one[r["mode"]]["mean_ms"]
            median = r["median_ms"] - one[r["mode"]]["median_ms"]
            print(
                f"goal: {r['workers']} workers within 50 ms of 1 ({r['mode']}): mean "
                f"{mean:+.0f} ms (median {median:+.0f} ms): {'PASS' if mean <= 50 else 'MISS'}"
            )


def worker_counts(text: str) -> list[int]:
    counts = [int(n) for n in text.split(",")]
    if not counts or any(n < 1 for n in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"distinct worker counts from 1, not {text!r}")
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument(
        "--trials", type=int, default=20, help="rollbacks per mode and worker count (20)"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent GET clients (8)")
    parser.add_argument(
        "--workers", type=worker_counts, default=[1, 2], help="comma list of proxy.workers (1,2)"
    )
    asyncio.run(main(parser.parse_args()))
