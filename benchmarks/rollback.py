"""Rollback reaction time and user-visible errors during a bad canary.

For each mode (retry on the live pool for 500s, or not), one zdproxy process runs
`trials` rollouts of a green pool at 10% (a first canary step; the default retry
budget, 20% of recent requests, covers its failures); after a second of healthy
traffic green
starts answering 500, and the time from that switch to the rollback (the
`rollout_rolled_back` event, emitted right after the weight went to 0) is measured.
GET load runs throughout; every 5xx or error a client sees is counted.

Goals (the rollout issue): median reaction at most 500 ms; zero errors with retry.

    .venv/bin/python benchmarks/rollback.py [--trials 20] [--clients 8]
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
from harness import free_port

TOKEN = "benchmark-admin-token-0123456789"
CONFIG = """
[proxy]
listen = "127.0.0.1:{port}"
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
    def __init__(self, tmp: Path, blue: int, green: int, retry: bool) -> None:
        self.port, self.admin = free_port(), free_port()
        statuses = [500, 502, 503, 504] if retry else [502, 503, 504]
        config = tmp / f"zdproxy-{retry}.toml"
        state = tmp / f"state-{retry}"
        config.write_text(
            CONFIG.format(
                port=self.port, admin=self.admin, state=state, blue=blue, green=green,
                statuses=json.dumps(statuses),
            )
        )  # fmt: skip
        zdproxy = str(Path(sys.executable).with_name("zdproxy"))
        self.process = subprocess.Popen(
            [zdproxy, "run", "--config", str(config)],
            env={**os.environ, "ZDPROXY_ADMIN__TOKEN": TOKEN},
            stderr=subprocess.DEVNULL,
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


async def measure(retry: bool, trials: int, clients: int, tmp: Path) -> dict[str, Any]:
    failing: dict[str, bool] = {}
    blue_runner, blue = await serve(app("blue", {}))
    green_runner, green = await serve(app("green", failing))
    zd = Zdproxy(tmp, blue, green, retry)
    outcomes = {"requests": 0, "errors": 0}
    done = asyncio.Event()

    async def client() -> None:
        async with ClientSession(cookie_jar=DummyCookieJar()) as session:
            while not done.is_set():
                try:
                    async with session.get(zd.url) as response:
                        await response.read()
                        bad = response.status >= 500
                except ClientError:
                    bad = True
                outcomes["requests"] += 1
                outcomes["errors"] += bad

    reactions: list[float] = []
    try:
        async with ClientSession() as admin:
            await zd.ready(admin)
            load = [asyncio.ensure_future(client()) for _ in range(clients)]
            for trial in range(trials):
                failing["on"] = False
                if trial == 0:
                    await zd.api(admin, "POST", "/v1/rollouts", {"color": "green", "plan": "bad"})
                else:
                    await zd.api(admin, "POST", "/v1/rollout/retry")

                async def stepping() -> bool:
                    return bool((await zd.api(admin, "GET", "/v1/rollout"))["state"] == "step")

                await until(stepping)
                await asyncio.sleep(1.0)  # healthy traffic on green first
                switched = time.time()
                failing["on"] = True

                async def rolled_back(switched: float = switched) -> Any:
                    events = await zd.api(admin, "GET", "/v1/events?kind=rollout_rolled_back")
                    fresh = [e for e in events["events"] if e["time"] > switched]
                    return fresh[-1] if fresh else None

                try:
                    event = await until(rolled_back, within=10)
                except TimeoutError:
                    rollout = await zd.api(admin, "GET", "/v1/rollout")
                    raise SystemExit(f"trial {trial}: no rollback within 10 s: {rollout}") from None
                reactions.append(event["time"] - switched)
                print(f"  trial {trial + 1}: {reactions[-1] * 1000:.0f} ms", file=sys.stderr)
            done.set()
            await asyncio.gather(*load)
    finally:
        zd.stop()
        await blue_runner.cleanup()
        await green_runner.cleanup()
    return {
        "mode": "retry 500 on live" if retry else "no retry of 500",
        "trials": len(reactions),
        "median_ms": statistics.median(reactions) * 1000,
        "max_ms": max(reactions) * 1000,
        **outcomes,
    }


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="zdrollback-") as tmp:
        rows = [
            await measure(retry, args.trials, args.clients, Path(tmp)) for retry in (True, False)
        ]
    print("| mode | trials | median reaction ms | max ms | requests | user-visible errors |")
    print("|---|--:|--:|--:|--:|--:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['trials']} | {r['median_ms']:.0f} | {r['max_ms']:.0f} | "
            f"{r['requests']} | {r['errors']} |"
        )
    with_retry = rows[0]
    median_ok = all(r["median_ms"] <= 500 for r in rows)
    print(f"\ngoal: median reaction <= 500 ms: {'PASS' if median_ok else 'MISS'}")
    print(f"goal: zero errors with retry: {'PASS' if with_retry['errors'] == 0 else 'MISS'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="rollbacks per mode (default 20)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent GET clients (8)")
    asyncio.run(main(parser.parse_args()))
