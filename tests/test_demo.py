"""`zdproxy demo`: sample blue and green apps behind zdproxy, started and stopped as users do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import CliResult, run_cli

READY_LINE = "zdproxy demo is running"
LAST_LINE = "Ctrl-C stops everything"
START_WITHIN = 60.0  # seconds for the banner: a fleet starts etcd and three processes
FLEET = 3  # members of the fleet test; the fixture's ports are the first of that many


def free_block(count: int) -> int:
    """The first of `count` consecutive loopback ports, each free a moment ago, below
    the kernel's ephemeral range: no port the demo's apps and clients get from the
    kernel (bind to 0, connect) can fall among them."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        first = random.randrange(10000, low - count)
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise AssertionError(f"no {count} consecutive free ports below {low}")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ZDPROXY_")}


async def read_until(stream: asyncio.StreamReader, marker: str, within: float) -> list[str]:
    """Lines from `stream` up to and including the one containing `marker`."""
    lines: list[str] = []
    async with asyncio.timeout(within):
        while True:
            raw = await stream.readline()
            if not raw:
                raise AssertionError("demo exited before it was ready:\n" + "".join(lines))
            lines.append(raw.decode())
            if marker in lines[-1]:
                return lines


@dataclass
class Demo:
    """One run of `zdproxy demo`, its banner read."""

    process: asyncio.subprocess.Process
    port: int
    admin_port: int
    directory: Path
    banner: str

    @property
    def config(self) -> Path:
        return self.directory / "zdproxy.toml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def cli(self, *args: str) -> CliResult:
        """The CLI as the banner says to run it: nothing but the demo's config file."""
        return await run_cli(*args, "--config", str(self.config), within=120)

    async def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await self.process.wait() == 0


StartDemo = Callable[..., Awaitable[Demo]]


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[StartDemo]:
    """Factory: await demo(*extra_args) starts `zdproxy demo` (the same ports and
    directory every time, as a user restarting it) and returns once its banner is out.
    Each port is the first of FLEET free ones: `--fleet 3` takes them all."""
    port, admin_port = free_block(FLEET), free_block(FLEET)
    directory = tmp_path / "demo"
    started: list[asyncio.subprocess.Process] = []

    async def start(*extra: str) -> Demo:
        log = tmp_path / f"demo-{len(started)}.stderr"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "zdproxy", "demo", "--port", str(port)),
                *("--admin-port", str(admin_port), "--dir", str(directory), *extra),
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=clean_env(),
            )
        started.append(process)
        assert process.stdout is not None
        try:
            banner = await read_until(process.stdout, LAST_LINE, within=START_WITHIN)
        except AssertionError:
            raise AssertionError(log.read_text()) from None
        return Demo(process, port, admin_port, directory, "".join(banner))

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def served_by(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        color: str = (await response.json())["color"]
        return color


def app_url(banner: str, color: str) -> str:
    """An app's own address, from its banner line: "green (v2, candidate at 0%) URL"."""
    found = re.search(rf"^  {color} \(v\d, [^)]*\)\s+(http://\S+)$", banner, re.MULTILINE)
    assert found, banner
    return found.group(1)


async def test_demo_serves_blue_and_stops_cleanly(demo: StartDemo) -> None:
    run = await demo()
    text = run.banner
    assert READY_LINE in text
    assert run.url in text
    assert "blue (v1, live)" in text and "green (v2, candidate at 0%)" in text

    async with aiohttp.ClientSession() as session:
        for path in ("/", "/pricing"):
            async with session.get(f"{run.url}{path}") as resp:
                assert resp.status == 200
                assert resp.headers["Via"] == "1.1 zdproxy"  # answered through the proxy
                body = await resp.json()
            assert body == {"color": "blue", "version": "v1", "path": path}

    assert str(run.config) in text
    check = await run_cli("check", "--config", str(run.config))
    assert check.code == 0, check.err
    assert check.err == ""  # both pools are checked alike: no warning
    assert check.out.strip() == f"{run.config}: ok"
    assert f'listen = "127.0.0.1:{run.port}"' in run.config.read_text()

    # Every CLI command needs nothing but the demo's config: admin address and token.
    status = await run.cli("status")
    assert status.code == 0, status.err
    assert "live blue, candidate green at 0%" in status.out

    # The README's rollback walk-through: green fails on purpose (its own switch), a
    # deploy of it is judged on the demo's own traffic and rolled back.
    green = app_url(text, "green")
    async with aiohttp.ClientSession() as session:
        async with session.post(green + "/_demo/fail") as resp:
            assert (await resp.json())["failing"] is True
        assert (await run.cli("deploy", "green")).code == 0
        waited = await run.cli("wait", "--until", "done", "--timeout", "30s")
        assert waited.code == 5, waited
        assert "rolled_back: judge failed green: error rate" in waited.err
        async with session.post(green + "/_demo/recover") as resp:
            assert (await resp.json())["failing"] is False
    assert (await run.cli("shift", "100")).code == 0
    assert await served_by(run.url) == "green"
    drain = await run.cli("drain", "blue", "--wait")
    assert drain.code == 0 and drain.out.startswith("drained blue/"), drain
    wait = await run.cli("wait", "--until", "drained:blue", "--until", "live:green")
    assert wait.code == 0, wait.err
    events = await run.cli("events")
    assert "split_changed [cli] live blue, candidate green at 100%" in events.out

    await run.stop()
    with socket.socket() as sock, contextlib.suppress(ConnectionRefusedError):
        sock.settimeout(2)
        sock.connect(("127.0.0.1", run.port))
        raise AssertionError(f"port {run.port} still accepts connections after the demo exited")


async def test_a_restarted_demo_starts_afresh_unless_told_to_keep_its_state(
    demo: StartDemo,
) -> None:
    """Issue 10, why 7: after a finished rollout, a restarted demo kept green live while
    its banner said blue was, and the README's "restart the demo" walkthrough broke.
    This is that walkthrough, step by step."""
    run = await demo()
    assert (await run.cli("deploy", "green")).code == 0
    done = await run.cli("wait", "--until", "done", "--timeout", "90s")
    assert done.code == 0, done
    assert await served_by(run.url) == "green"
    await run.stop()

    # Restarted: blue live with green at 0%, as the banner and the README say.
    run = await demo()
    status = await run.cli("status")
    assert "live blue, candidate green at 0%" in status.out, status.out
    assert await served_by(run.url) == "blue"
    assert "blue (v1, live)" in run.banner and "green (v2, candidate at 0%)" in run.banner
    assert re.search(r"^  state +fresh ", run.banner, re.MULTILINE), run.banner
    assert "rollout" not in (await run.cli("events")).out  # the last run's history is gone

    # The README goes on: break green, deploy, rolled back (exit 5), recover, retry.
    green = app_url(run.banner, "green")  # a new port: the banner of this run says it
    async with aiohttp.ClientSession() as session:
        async with session.post(green + "/_demo/fail") as resp:
            assert (await resp.json())["failing"] is True
        assert (await run.cli("deploy", "green")).code == 0
        waited = await run.cli("wait", "--until", "done", "--timeout", "30s")
        assert waited.code == 5, waited
        show = await run.cli("rollout", "show")
        assert show.code == 0 and "rolled_back" in show.out, show
        async with session.post(green + "/_demo/recover") as resp:
            assert (await resp.json())["failing"] is False
    assert (await run.cli("rollout", "retry")).code == 0
    done = await run.cli("wait", "--until", "done", "--timeout", "90s")
    assert done.code == 0, done
    assert await served_by(run.url) == "green"
    await run.stop()

    # --keep-state: the last run's outcome stays, and the banner says so.
    run = await demo("--keep-state")
    status = await run.cli("status")
    assert "live green, candidate blue at 0%" in status.out, status.out
    assert await served_by(run.url) == "green"
    assert "green (v2, live)" in run.banner and "blue (v1, candidate at 0%)" in run.banner
    assert "kept from the last run (--keep-state): green live, blue at 0%" in run.banner
    await run.stop()


def children_of(pid: int) -> set[int]:
    """The processes `pid` started and has not reaped, by the kernel's own list."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return {int(child) for task in tasks for child in (task / "children").read_text().split()}


async def admin(
    url: str, token: str, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    """One call to a demo member's admin API with the demo's token; the JSON of its 200."""
    auth = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(url, headers=auth) as session,
        session.request(method, path, json=body) as response,
    ):
        answer = await response.json(content_type=None)
        assert response.status == 200, answer
        return answer


def fleet_banner(banner: str) -> tuple[dict[str, tuple[int, int, int]], str, int]:
    """From a fleet's banner: each member's proxy port, admin port and pid by name, and
    etcd's client URL and pid."""
    rows = re.findall(
        r"^  (m\d) +127\.0\.0\.1:(\d+) +127\.0\.0\.1:(\d+) +\S+ +\S+ +(\d+)$", banner, re.M
    )
    etcd = re.search(r"^  etcd +(http://\S+), pid (\d+) ", banner, re.M)
    assert rows and etcd, banner
    members = {name: (int(port), int(admin), int(pid)) for name, port, admin, pid in rows}
    return members, etcd.group(1), int(etcd.group(2))


async def test_a_fleet_of_three_shares_a_change_and_ctrl_c_stops_all_it_started(
    demo: StartDemo,
) -> None:
    """Issue 15: `zdproxy demo --fleet 3`: an etcd and three members on consecutive
    ports; a split change through m2 is applied by m1 and m3; Ctrl-C stops every
    process the demo started, etcd included."""
    run = await demo("--fleet", str(FLEET))
    members, etcd_url, etcd_pid = fleet_banner(run.banner)
    assert members == {
        f"m{i + 1}": (run.port + i, run.admin_port + i, pid)
        for i, (_, _, pid) in enumerate(members.values())
    }
    started = {etcd_pid, *(pid for _, _, pid in members.values())}
    assert children_of(run.process.pid) == started  # nothing the banner does not name

    token = (run.directory / "admin.token").read_text().strip()
    configs = {name: run.directory / f"fleet-{name}.toml" for name in members}
    for name, config in configs.items():
        assert f'name = "{name}"' in config.read_text() and etcd_url in config.read_text()
    admins = {name: f"http://127.0.0.1:{port}" for name, (_, port, _) in members.items()}

    async def statuses(check: Callable[[dict[str, Any]], bool]) -> dict[str, dict[str, Any]]:
        """Every member's status, polled until `check` holds on each."""
        async with asyncio.timeout(30):
            while True:
                found = {n: await admin(a, token, "GET", "/v1/status") for n, a in admins.items()}
                if all(check(status) for status in found.values()):
                    return found
                await asyncio.sleep(0.1)

    up = await statuses(lambda s: s["fleet"]["leader"] in members)
    assert {name: s["fleet"]["member"] for name, s in up.items()} == {n: n for n in members}
    assert len({s["fleet"]["leader"] for s in up.values()}) == 1
    assert all(s["split"]["candidate_weight"] == 0 for s in up.values())

    await admin(admins["m2"], token, "PUT", "/v1/split", {"candidate_weight": 2500})
    await statuses(lambda s: s["split"]["candidate_weight"] == 2500)
    applied = await admin(admins["m1"], token, "GET", "/v1/events?kind=fleet_applied")
    assert any(e["by"] == "member m2" for e in applied["events"]), applied
    status = await run_cli("status", "--config", str(configs["m3"]))  # as the banner says
    assert status.code == 0 and "live blue, candidate green at 25%" in status.out, status

    run.process.send_signal(signal.SIGINT)
    async with asyncio.timeout(60):
        assert await run.process.wait() == 0
    for pid in started:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    ports = [port for port, _, _ in members.values()] + [a for _, a, _ in members.values()]
    for port in [*ports, int(etcd_url.rpartition(":")[2])]:
        with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
            sock.connect(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("extra", "setting"), [((), "proxy.listen"), (("--fleet", "3"), "proxy.listen of m2")]
)
async def test_a_demo_on_a_port_in_use_says_which_and_leaves_the_last_run_alone(
    tmp_path: Path, extra: tuple[str, ...], setting: str
) -> None:
    """A second demo on the ports of a running one: exit 1 with the listener's error
    (no traceback), before it removes anything the running one uses."""
    port, admin_port = free_block(FLEET), free_block(FLEET)
    directory = tmp_path / "demo"
    kept = [directory / "state" / "state.json", directory / "fleet" / "etcd" / "db"]
    for path in kept:
        path.parent.mkdir(parents=True)
        path.write_text("the running demo's")
    held = port + 1 if extra else port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", held))
        sock.listen()
        args = ("--port", str(port), "--admin-port", str(admin_port), "--dir", str(directory))
        result = await run_cli("demo", *args, *extra)
    assert result.code == 1, result
    assert f"cannot start the demo: cannot listen on 127.0.0.1:{held} ({setting})" in result.err
    assert "Traceback" not in result.err
    assert all(path.read_text() == "the running demo's" for path in kept)
