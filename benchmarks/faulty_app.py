"""An app server with a fault switch, and the handle the benchmark drives it with.

    faulty_app.py --color green --name green-0 --records FILE [--seed N]

serves every path on one loopback port: after a service time drawn uniformly from
5-20 ms it answers 200 with the header `X-App-Color` and a small JSON body. A second
port, the control port (never behind zdproxy), takes `POST /fault/NAME` to switch the
fault at once. The first line printed is `PORTS <serve> <control>`.

Every request is appended to the records file as one JSON line as soon as its fate is
known (answered, or hung): arrival and departure (Unix time), method, status, the
fault in force at arrival, whether the answer was bad, and whether it carried the
pinned tenant's header. Lines are written unbuffered, so a killed app keeps its
records. A switch is recorded too (`{"switch": NAME, "t": ...}`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from aiohttp import ClientSession, ClientTimeout, web
from aiohttp.web_request import BaseRequest

SERVICE_TIME = (0.005, 0.020)  # seconds, uniform
TENANT_HEADER = "X-Tenant"  # the pinned tenant's requests carry it


class Fault(StrEnum):
    NONE = "none"
    ERRORS30 = "errors30"  # 30% of answers are 500
    ERRORS3 = "errors3"  # 3% of answers are 500
    SLOW2X = "slow2x"  # twice the service time
    SLOW5X = "slow5x"  # five times the service time
    HANG = "hang"  # read the request, never answer
    CRASH = "crash"  # the process exits (the benchmark kills it: SIGKILL)
    REFUSED = "refused"  # stop listening, close every connection; the process stays


ERROR_SHARE = {Fault.ERRORS30: 0.30, Fault.ERRORS3: 0.03}
SLOWDOWN = {Fault.SLOW2X: 2.0, Fault.SLOW5X: 5.0}


# -- the app server (its own process) --------------------------------------------------


class FaultyApp:
    def __init__(self, color: str, name: str, records: IO[str], seed: int) -> None:
        self.color, self.name, self.records = color, name, records
        self.rng = random.Random(seed)
        self.fault = Fault.NONE
        self.never = asyncio.Event()  # what a hung request waits for
        self.server = web.Server(self.handle)
        self.listener: asyncio.Server | None = None

    def record(self, entry: dict[str, Any]) -> None:
        self.records.write(json.dumps(entry, separators=(",", ":")) + "\n")

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        arrival = time.time()
        fault = self.fault
        body = await request.read()
        pinned = TENANT_HEADER in request.headers
        entry: dict[str, Any] = {"t": arrival, "m": request.method, "f": str(fault), "pin": pinned}
        if fault is Fault.HANG:
            self.record({**entry, "d": None, "s": None, "bad": True})
            await self.never.wait()
        service = self.rng.uniform(*SERVICE_TIME) * SLOWDOWN.get(fault, 1.0)
        await asyncio.sleep(service)
        failed = self.rng.random() < ERROR_SHARE.get(fault, 0.0)
        status = 500 if failed else 200
        bad = failed or fault in SLOWDOWN
        self.record({**entry, "d": time.time(), "s": status, "bad": bad})
        answer = {
            "color": self.color,
            "app": self.name,
            "method": request.method,
            "size": len(body),
        }
        headers = {"X-App-Color": self.color, "X-App-Name": self.name}
        return web.json_response(answer, status=status, headers=headers)

    async def control(self, request: BaseRequest) -> web.StreamResponse:
        name = request.path.removeprefix("/fault/")
        try:
            fault = Fault(name)
        except ValueError:
            return web.json_response({"error": f"no fault {name!r}"}, status=404)
        switched = time.time()
        self.fault = fault
        self.record({"switch": str(fault), "t": switched})
        if fault is Fault.REFUSED and self.listener is not None:
            # Connections are refused from now on, and the open ones are closed at once,
            # requests in flight included: nothing of this app answers any more.
            self.listener.close()
            for connection in self.server.connections:
                connection.force_close()
        return web.json_response({"t": switched})

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.listener = await loop.create_server(self.server, "127.0.0.1", 0)
        control = await loop.create_server(web.Server(self.control), "127.0.0.1", 0)
        port = self.listener.sockets[0].getsockname()[1]
        print(f"PORTS {port} {control.sockets[0].getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()  # hung handlers are cancelled when the loop closes


def serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--color", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--records", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    async def main() -> None:  # aiohttp's server is made inside the running loop
        await FaultyApp(args.color, args.name, records, args.seed).run()

    with args.records.open("a", buffering=1) as records:
        asyncio.run(main())


# -- the benchmark's handle on one app ------------------------------------------------


@dataclass(frozen=True)
class AppRecord:
    """One request as an app saw it."""

    app: str
    color: str
    arrival: float
    departure: float | None  # None: it hung
    method: str
    status: int | None
    fault: Fault
    bad: bool
    pinned: bool


@dataclass
class AppHandle:
    color: str
    name: str
    process: subprocess.Popen[str]
    records_path: Path
    port: int = 0
    control_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, color: str, name: str, tmp: Path, seed: int, preexec: Any = None) -> AppHandle:
        """Starts the process; `wait_ports` reads its ports (start many, then wait)."""
        path = tmp / f"{name}.jsonl"
        argv = [sys.executable, __file__, "--color", color, "--name", name]
        argv += ["--records", str(path), "--seed", str(seed)]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, preexec_fn=preexec)
        return cls(color, name, process, path)

    def wait_ports(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("PORTS "):
            self.process.kill()
            raise RuntimeError(f"app {self.name} did not start: {line!r}")
        self.port, self.control_port = (int(p) for p in line.split()[1:3])

    async def switch(self, session: ClientSession, fault: Fault) -> float:
        """Switches the fault (SIGKILL for a crash); the time it took effect."""
        if fault is Fault.CRASH:
            self.process.kill()
            return time.time()
        url = f"http://127.0.0.1:{self.control_port}/fault/{fault}"
        async with session.post(url, timeout=ClientTimeout(total=5)) as response:
            response.raise_for_status()
            return float((await response.json())["t"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def records(self) -> list[AppRecord]:
        found: list[AppRecord] = []
        if not self.records_path.exists():
            return found
        for line in self.records_path.read_text().splitlines():
            try:
                raw = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            if "switch" in raw:
                continue
            found.append(
                AppRecord(
                    self.name, self.color, raw["t"], raw["d"], raw["m"], raw["s"],
                    Fault(raw["f"]), raw["bad"], raw["pin"],
                )
            )  # fmt: skip
        return found


if __name__ == "__main__":
    serve(sys.argv[1:])
