"""Memory of zdproxy's processes with proxy.workers = 2: at idle, and while 100 MiB pass.

    .venv/bin/python benchmarks/workers_memory.py [--size-mib 100] [--slow-mib-s 25]

zdproxy starts as users start it (`zdproxy run --config FILE`, 2 workers), in front of
an app server of this script (its own process: `--serve-app PORT`) that streams a
download of any size and consumes an upload, optionally at a fixed rate. For each
process (the main one and each worker) it prints:

- at idle, 3 s after zdproxy is ready: RSS (VmRSS) and USS, the memory only this
  process holds (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup: what its
  exit would give back), and the native modules it has mapped (a worker should have
  no pydantic);
- for each transfer, one after the other, the peak growth of RSS and of USS over the
  idle figure, sampled every 50 ms: a fast upload and download, an upload to an app
  that reads at `--slow-mib-s`, and a download by a client that reads at that rate.
  Bodies stream: with backpressure, the growth stays the same for any body size.

Goals (issue 16): a worker's USS at idle at most 30 MiB; during each transfer, no
process grows by more than GROWTH_BOUND_MIB. Exits 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, web
from harness import Zdproxy, die_with_parent, free_port

MiB = 1 << 20
CHUNK = 64 * 1024
SAMPLE_SECONDS = 0.05
IDLE_USS_GOAL_MIB = 30.0
GROWTH_BOUND_MIB = 8.0  # what "bounded" means here: a fraction of the body, for any size
NATIVE = re.compile(r"-packages/([\w-]+)[^ ]*\.so$")  # its package: the first path part


# -- the app server (its own process) ------------------------------------------------


def serve_app(port: int) -> None:
    """GET /download/N: N bytes, streamed. POST /upload: reads the body, answers its
    size. `?rate=B` paces either at B bytes/s."""

    async def paced(rate: float, started: float, done: int) -> None:
        if rate > 0:
            await asyncio.sleep(max(started + done / rate - time.monotonic(), 0))

    async def download(request: web.Request) -> web.StreamResponse:
        size, rate = int(request.match_info["size"]), float(request.query.get("rate", 0))
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        block, sent, started = b"z" * CHUNK, 0, time.monotonic()
        while sent < size:
            await response.write(block[: size - sent])
            sent += min(CHUNK, size - sent)
            await paced(rate, started, sent)
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        rate, got, started = float(request.query.get("rate", 0)), 0, time.monotonic()
        async for chunk in request.content.iter_chunked(CHUNK):
            got += len(chunk)
            await paced(rate, started, got)
        return web.Response(text=str(got))

    application = web.Application(client_max_size=1 << 40)
    application.router.add_get("/download/{size}", download)
    application.router.add_post("/upload", upload)
    web.run_app(application, host="127.0.0.1", port=port, print=None, access_log=None)


# -- measuring ------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    rss: int  # bytes
    uss: int


def memory(pid: int) -> Memory:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return Memory(fields["Rss"], fields["Private_Clean"] + fields["Private_Dirty"])


def native_modules(pid: int) -> list[str]:
    """The packages whose compiled modules it has mapped (uvloop, httptools, ...)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    names = {
        m[1] for line in maps.splitlines() if "-packages/" in line and (m := NATIVE.search(line))
    }
    return sorted(names)


class Sampler:
    """Every SAMPLE_SECONDS, each process's memory; keeps the peaks."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = {name: Memory(0, 0) for name in pids}
        self.samples = 0

    async def run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                now, top = memory(pid), self.peak[name]
                self.peak[name] = Memory(max(now.rss, top.rss), max(now.uss, top.uss))
            self.samples += 1
            await asyncio.sleep(SAMPLE_SECONDS)


async def body(size: int) -> AsyncIterator[bytes]:
    block, sent = b"u" * CHUNK, 0
    while sent < size:
        yield block[: size - sent]
        sent += CHUNK


async def transfer(
    session: ClientSession, url: str, kind: str, size: int, rate: float
) -> tuple[int, float]:
    """One transfer through zdproxy: (bytes that arrived at the other end, seconds)."""
    started = time.monotonic()
    pace = f"?rate={rate}" if kind == "upload, slow app" else ""
    if kind.startswith("upload"):
        async with session.post(f"{url}/upload{pace}", data=body(size)) as response:
            got = int(await response.text())
    else:
        got = 0
        async with session.get(f"{url}/download/{size}") as response:
            async for chunk in response.content.iter_chunked(CHUNK):
                got += len(chunk)
                if kind == "download, slow client":  # reads at `rate`: the proxy must wait
                    await asyncio.sleep(max(started + got / rate - time.monotonic(), 0))
    return got, time.monotonic() - started


def wait_port(port: int, process: subprocess.Popen[bytes], within: float = 20) -> None:
    deadline = time.monotonic() + within
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the app server did not listen on port {port}")


def mib(n: float) -> str:
    return f"{n / MiB:.1f}"


async def measure(args: argparse.Namespace, tmp: Path, app_port: int) -> bool:
    port = free_port()
    model = {
        "proxy": {"listen": f"127.0.0.1:{port}", "workers": 2},
        "admin": {"listen": f"127.0.0.1:{free_port()}", "token_file": str(tmp / "etc" / "token")},
        "state": {"dir": str(tmp / "state")},
        "log": {"level": "warning"},
        "pools": {color: {"upstreams": [f"127.0.0.1:{app_port}"]} for color in ("blue", "green")},
        "split": {"live": "blue", "candidate_weight": 0},
    }
    zd = Zdproxy(tmp, model, secrets.token_hex(16))
    ok = True
    try:
        zd.start()
        timeout = ClientTimeout(total=600)
        async with ClientSession(timeout=timeout) as session:
            await zd.ready(session)
            _, status = await zd.api(session, "GET", "/v1/status")
            assert zd.process is not None
            pids = {"main": zd.process.pid}
            pids |= {f"worker {w['index']}": w["pid"] for w in status["workers"]}
            await asyncio.sleep(3.0)  # idle: started, first health verdicts in
            idle = {name: memory(pid) for name, pid in pids.items()}
            print("| process | RSS MiB | USS MiB | native modules mapped |\n|---|--:|--:|---|")
            for name, pid in pids.items():
                mods = ", ".join(native_modules(pid))
                print(f"| {name} | {mib(idle[name].rss)} | {mib(idle[name].uss)} | {mods} |")
            worker_uss = max(m.uss for name, m in idle.items() if name.startswith("worker"))
            ok = worker_uss <= IDLE_USS_GOAL_MIB * MiB
            print(f"\ngoal: a worker's USS at idle <= {IDLE_USS_GOAL_MIB:g} MiB "
                  f"(largest {mib(worker_uss)}): {'PASS' if ok else 'MISS'}\n")  # fmt: skip
            size, rate = args.size_mib * MiB, args.slow_mib_s * MiB
            head = " | ".join(f"{name} RSS / USS growth" for name in pids)
            print(f"| transfer of {args.size_mib} MiB | seconds | {head} |")
            print("|---|--:|" + "--:|" * len(pids))
            worst = 0
            kinds = ("upload", "download", "upload, slow app", "download, slow client")
            for kind in kinds:
                sampler = Sampler(pids)
                sampling = asyncio.ensure_future(sampler.run())
                try:
                    got, seconds = await transfer(session, zd.url, kind, size, rate)
                finally:
                    sampling.cancel()
                if got != size:
                    raise RuntimeError(f"{kind}: {got} bytes of {size} arrived")
                growth = {
                    name: Memory(top.rss - idle[name].rss, top.uss - idle[name].uss)
                    for name, top in sampler.peak.items()
                }
                worst = max(worst, *(g.rss for g in growth.values()))
                cells = " | ".join(f"{mib(g.rss)} / {mib(g.uss)}" for g in growth.values())
                print(f"| {kind} | {seconds:.1f} | {cells} |")
            bounded = worst <= GROWTH_BOUND_MIB * MiB
            print(f"\ngoal: every process grows by <= {GROWTH_BOUND_MIB:g} MiB of RSS while "
                  f"{args.size_mib} MiB pass (largest {mib(worst)}): "
                  f"{'PASS' if bounded else 'MISS'}")  # fmt: skip
            ok = ok and bounded
    finally:
        await zd.stop()
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    p.add_argument("--size-mib", type=int, default=100, help="body size of each transfer (100)")
    p.add_argument("--slow-mib-s", type=float, default=25.0, help="rate of the slow ends (25)")
    p.add_argument("--serve-app", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_app:
        serve_app(args.serve_app)
        return 0
    app_port = free_port()
    app = subprocess.Popen(
        [sys.executable, __file__, "--serve-app", str(app_port)], preexec_fn=die_with_parent
    )
    with tempfile.TemporaryDirectory(prefix="zdmemory-") as tmp:
        try:
            wait_port(app_port, app)
            return 0 if asyncio.run(measure(args, Path(tmp), app_port)) else 1
        except KeyboardInterrupt:
            print("interrupted: stopped every process this run started", file=sys.stderr)
            return 130
        finally:
            app.terminate()
            app.wait(10)


if __name__ == "__main__":
    sys.exit(main())
