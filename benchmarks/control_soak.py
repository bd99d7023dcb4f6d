"""Soak: mixed control actions under keep-alive load; no request may fail because of one.

Starts app servers (separate processes on ephemeral loopback ports), zdproxy as users
start it (`zdproxy run --config FILE`, with a token file and a temp state dir), and
`--clients` keep-alive users (one aiohttp session and cookie jar each, so they stay
sticky; 70% GET, 30% POST). Meanwhile it draws `--actions` control actions at random
(seeded) and runs them one after the other, as an operator would, through the admin
API or the `zdproxy` CLI: shift, drain and undrain (a color or one upstream), pool set,
pin rules, SIGHUP, config file edits (valid and invalid), deploy then abort, deploys
whose candidate is down or whose hook fails, deploys that complete, long rollouts with
pause/resume/promote/abort/retry, and restart in place (SIGUSR2).

Every request is counted; a failure (a 5xx, a connection error, a timeout, a wrong
body) is recorded with the control action in progress and the last one done. A refused
action (4xx, 409, 503) is counted as refused, not as a failure. At the end it checks,
from the event log: at most one active rollout, no ended rollout acting again, rollout
ids never reused. Exit 1 if any request failed or an invariant broke.

    .venv/bin/python benchmarks/control_soak.py                  # 1000 actions, 24 clients
    .venv/bin/python benchmarks/control_soak.py --actions 50 --seed 3
    .venv/bin/python benchmarks/control_soak.py --src /tmp/zd-head  # another source tree
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import (
    ClientConnectorError,
    ClientError,
    ClientSession,
    ClientTimeout,
    CookieJar,
    ServerDisconnectedError,
    web,
)
from harness import decoded, die_with_parent, free_port, render

COLORS = ("blue", "green")
ACTIVE = ("preflight", "step", "paused", "baking", "finishing")
ENDED_KINDS = {f"rollout_{s}" for s in ("done", "rolled_back", "aborted", "frozen", "failed")}
APPS = 6  # running app instances
DEAD = 2  # addresses with nothing listening: a candidate whose app servers are stopped
REQUEST_TIMEOUT = 15.0
MAX_REQUESTS_PER_CLIENT = 2_000_000

# kind: weight. Each action is one operator step (a deploy waits for its outcome).
ACTIONS = {
    "shift": 14,
    "drain": 8,
    "undrain": 8,
    "pool_set": 8,
    "rules": 4,
    "reload": 5,
    "edit": 8,
    "edit_invalid": 2,
    "deploy_abort": 6,
    "deploy_dead": 4,
    "deploy_hookfail": 4,
    "deploy_full": 5,
    "deploy_long": 4,
    "pause": 3,
    "resume": 3,
    "promote": 3,
    "abort": 3,
    "retry": 2,
    "restart": 3,
}
CLI_KINDS = {"shift", "drain", "undrain", "pool_set", "pause", "resume", "promote", "abort"}


# -- the app servers ---------------------------------------------------------------------


def serve_app(name: str) -> None:
    """`control_soak.py --serve-app NAME`: one app server, printing "PORT n" once it listens."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"app": name, "method": request.method, "size": len(body)})

    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"db": "ok"})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/readyz", readyz)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(f"PORT {port}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


def start_app(name: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve-app", name],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=die_with_parent,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("PORT "):
        process.kill()
        raise SystemExit(f"app {name} did not start: {line!r}")
    return process, f"127.0.0.1:{int(line.split()[1])}"


# -- the config file ---------------------------------------------------------------------


def config_model(tmp: Path, port: int, admin: int, apps: list[str]) -> dict[str, Any]:
    health: dict[str, Any] = {"path": "/readyz", "interval": "300ms", "jitter": "50ms"}
    health |= {"timeout": "1s", "rise": 1, "fall": 2}
    quick = [{"weight": 10, "hold": "400ms"}, {"weight": 50, "hold": "400ms"}]
    quick.append({"weight": 100, "hold": "400ms"})
    judge = {"window": "3s", "min_requests": 10}
    fast = {"steps": quick, "bake": "800ms", "min_healthy": 1, "preflight_timeout": "2s"}
    fast["judge"] = judge
    true, false = shutil.which("true") or "/bin/true", shutil.which("sh") or "/bin/sh"
    return {
        "proxy": {"listen": f"127.0.0.1:{port}", "shutdown_timeout": "5s"},
        "upstream": {"timeout": "10s"},
        "admin": {"listen": f"127.0.0.1:{admin}", "token_file": str(tmp / "admin.token")},
        "state": {"dir": str(tmp / "state"), "events_in_memory": 10000},
        "log": {"level": "info"},
        "reload": {"watch": True, "debounce": "200ms"},
        "pools": {
            "blue": {"upstreams": apps[0:2], "version": "v1", "health": dict(health)},
            "green": {"upstreams": apps[2:4], "version": "v2", "health": dict(health)},
        },
        "split": {"live": "blue", "candidate_weight": 0},
        "rollout": {"default_plan": "quick"},
        "plans": {
            "quick": {**fast, "post_promote": ["ok"], "on_rollback": ["ok"]},
            "verified": {**fast, "pre_rollout": ["ok"], "verify": ["ok"]},
            "hookfail": {**fast, "pre_rollout": ["ok", "fail"]},
            "long": {
                "steps": [{"weight": 5, "hold": "1h"}, {"weight": 25, "hold": "1h"}],
                "bake": "1s",
                "min_healthy": 1,
                "preflight_timeout": "2s",
                "judge": judge,
            },
        },
        "hooks": {
            "ok": {"command": [true], "timeout": "10s"},
            "fail": {"command": [false, "-c", "echo failing on purpose; exit 3"]},
        },
    }


# -- bookkeeping -------------------------------------------------------------------------


@dataclass
class Failure:
    time: float  # wall clock, to line up with events
    client: int
    method: str
    what: str  # the category: "503 no routable upstream", "ServerDisconnectedError", ...
    detail: str
    during: str  # the action in progress ("#12 drain"), or "-"
    after: str  # the last action done


@dataclass
class Record:
    kind: str
    via: str
    outcome: str  # applied, refused, unreachable, error
    detail: str
    started: float
    seconds: float
    end: str = ""  # deploys: how the rollout they started ended


@dataclass
class Soak:
    args: argparse.Namespace
    tmp: Path
    rng: random.Random
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    apps: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    config: Path = Path()
    zdproxy: subprocess.Popen[bytes] | None = None
    port: int = 0
    admin_port: int = 0
    session: ClientSession | None = None
    # traffic
    requests: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    # actions
    current: str = "-"
    last: str = "-"
    records: list[Record] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    end: str = ""  # set by a deploy action
    # events collected from the API while the soak runs
    events: dict[int, dict[str, Any]] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    # -- plumbing ----------------------------------------------------------------------

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.args.src:
            env["PYTHONPATH"] = str(Path(self.args.src).resolve())
        return env

    def zdproxy_bin(self) -> str:
        return str(Path(sys.executable).with_name("zdproxy"))

    def write_config(self, text: str | None = None, atomic: bool = False) -> None:
        text = render(self.model) if text is None else text
        if atomic:
            tmp = self.config.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(self.config)
        else:
            self.config.write_text(text)

    async def api(
        self, method: str, path: str, body: Any = None, unreachable_for: float = 15.0
    ) -> tuple[int | None, Any]:
        """(status, decoded body); status None when the API cannot be reached. Retries only
        a connection that was never made (a restart in place), so nothing runs twice."""
        assert self.session is not None
        deadline = time.monotonic() + unreachable_for
        headers = {"Authorization": f"Bearer {self.token}"}
        while True:
            try:
                async with self.session.request(
                    method, self.admin_url + path, json=body, headers=headers
                ) as response:
                    return await decoded(response)
            except ClientConnectorError as exc:
                if time.monotonic() > deadline:
                    return None, repr(exc)
                await asyncio.sleep(0.1)
            except (ClientError, TimeoutError) as exc:
                return None, repr(exc)

    async def cli(self, *argv: str) -> tuple[int | None, str]:
        """`zdproxy ARGV --config FILE`: (exit code, output); None on a timeout."""
        process = await asyncio.create_subprocess_exec(
            self.zdproxy_bin(),
            *argv,
            "--config",
            str(self.config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env(),
            cwd=self.tmp,
            preexec_fn=die_with_parent,
        )
        try:
            async with asyncio.timeout(60):
                out, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            return None, "timed out"
        return process.returncode, out.decode(errors="replace").strip()

    async def last_event_id(self) -> int:
        status, body = await self.api("GET", "/v1/events?limit=1")
        if status == 200 and body["events"]:
            return int(body["events"][-1]["id"])
        return max(self.events, default=0)

    async def wait_event(self, since: int, kinds: set[str], within: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            status, body = await self.api("GET", f"/v1/events?since={since}&limit=10000")
            if status == 200:
                for event in body["events"]:
                    if event["kind"] in kinds:
                        return dict(event)
            await asyncio.sleep(0.05)
        return None

    async def rollout(self) -> dict[str, Any]:
        status, body = await self.api("GET", "/v1/rollout")
        return body if status == 200 and isinstance(body, dict) else {}

    async def wait_rollout_end(self, number: int | None, within: float) -> str:
        """The state rollout `number` ended in, or "still STATE" after `within` seconds."""
        deadline = time.monotonic() + within
        state = "?"
        while time.monotonic() < deadline:
            body = await self.rollout()
            state = str(body.get("state", "?"))
            if number is not None and body.get("id") not in (None, number):
                return f"superseded by {body.get('id')}"
            if state not in ACTIVE:
                return state
            await asyncio.sleep(0.1)
        return f"still {state}"

    # -- start and stop ----------------------------------------------------------------

    def source(self) -> str:
        """Where the zdproxy that runs is imported from."""
        probe = "import zdproxy; print(zdproxy.__file__)"
        found = subprocess.run(
            [sys.executable, "-c", probe], env=self.env(), cwd=self.tmp, capture_output=True
        )
        return found.stdout.decode().strip().removesuffix("/__init__.py")

    async def start(self) -> None:
        print(f"zdproxy from {self.source()}", file=sys.stderr, flush=True)
        self.processes: list[subprocess.Popen[Any]] = []
        for i in range(APPS):
            process, address = start_app(f"app{i}")
            self.processes.append(process)
            self.apps.append(address)
        self.dead = [f"127.0.0.1:{free_port()}" for _ in range(DEAD)]
        (self.tmp / "admin.token").write_text(self.token + "\n")
        self.port, self.admin_port = free_port(), free_port()
        self.model = config_model(self.tmp, self.port, self.admin_port, self.apps)
        self.config = self.tmp / "zdproxy.toml"
        self.write_config()
        self.spawn_zdproxy()
        self.session = ClientSession(timeout=ClientTimeout(total=60))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.zdproxy is None or self.zdproxy.poll() is not None:
                break
            with contextlib.suppress(ClientError):
                async with self.session.get(self.admin_url + "/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
        tail = (self.tmp / "zdproxy.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"zdproxy did not become ready:\n{tail}")

    def spawn_zdproxy(self) -> None:
        """`zdproxy run --config FILE`, as users start it; its log goes to a file."""
        self.log = (self.tmp / "zdproxy.log").open("wb")
        self.zdproxy = subprocess.Popen(
            [self.zdproxy_bin(), "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            cwd=self.tmp,
            preexec_fn=die_with_parent,
        )

    async def close(self) -> None:
        if self.zdproxy is not None and self.zdproxy.poll() is None:
            self.zdproxy.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.zdproxy.wait, 20)
            except subprocess.TimeoutExpired:
                self.zdproxy.kill()
                self.zdproxy.wait()
        for process in getattr(self, "processes", []):
            if process.poll() is None:
                process.terminate()
        for process in getattr(self, "processes", []):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.session is not None and not self.session.closed:
            await self.session.close()
        if hasattr(self, "log"):
            self.log.close()

    # -- load --------------------------------------------------------------------------

    async def client(self, n: int, deadline: float) -> None:
        rng = random.Random(self.args.seed * 1000 + n)
        url = f"http://127.0.0.1:{self.port}"
        headers = {"X-Tenant": "acme"} if n % 4 == 0 else {}  # for the pin rules
        jar = CookieJar(unsafe=True)  # unsafe: keep cookies of an IP-address host
        timeout = ClientTimeout(total=REQUEST_TIMEOUT)
        async with ClientSession(cookie_jar=jar, timeout=timeout, headers=headers) as session:
            for i in range(MAX_REQUESTS_PER_CLIENT):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                if rng.random() < 1 / 300:  # this user leaves, a new one comes (new bucket)
                    jar.clear()
                post = rng.random() < 0.3
                method = "POST" if post else "GET"
                payload = b"x" * rng.randrange(1, 2048) if post else None
                during, after = self.current, self.last
                what = detail = ""
                try:
                    async with session.request(method, f"{url}/c{n}/{i}", data=payload) as resp:
                        text = await resp.text()
                        if resp.status >= 500:
                            why = text.strip().partition(": ")[2] or text.strip()
                            what, detail = f"{resp.status} {why[:60]}", text.strip()[:200]
                        elif resp.status != 200:
                            what, detail = f"unexpected {resp.status}", text[:200]
                        else:
                            body = json.loads(text)
                            size = len(payload) if payload else 0
                            if body.get("method") != method or body.get("size") != size:
                                what, detail = "wrong body", text[:200]
                except ServerDisconnectedError as exc:
                    what, detail = "ServerDisconnectedError", repr(exc)
                except (ClientError, TimeoutError, ValueError) as exc:
                    what, detail = type(exc).__name__, repr(exc)[:200]
                self.requests[f"{method} {'failed' if what else 'ok'}"] += 1
                if what:
                    # The action that was in progress when the request started, else the
                    # one in progress now (a failure is seen when the request ends).
                    during = during if during != "-" else self.current
                    self.failures.append(
                        Failure(time.time(), n, method, what, detail, during, after)
                    )
                await asyncio.sleep(rng.uniform(0, 2 * self.args.think))

    async def collect_events(self) -> None:
        """Every event, polled by id through the API (its ring outlives a restart)."""
        while not self.stop.is_set():
            since = max(self.events, default=0)
            status, body = await self.api(
                "GET", f"/v1/events?since={since}&limit=10000", unreachable_for=1
            )
            if status == 200:
                for event in body["events"]:
                    self.events[int(event["id"])] = event
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.3)

    # -- actions -----------------------------------------------------------------------

    async def split(self) -> dict[str, Any]:
        status, body = await self.api("GET", "/v1/split")
        return body if status == 200 else {"live": "blue", "candidate": "green"}

    @staticmethod
    def outcome(status: int | None) -> str:
        if status is None:
            return "unreachable"
        if 200 <= status < 300:
            return "applied"
        if 400 <= status < 500 or status == 503:
            return "refused"
        return "error"

    async def call(
        self, via: str, method: str, path: str, body: Any, argv: list[str], what: str = ""
    ) -> tuple[str, str]:
        """One change through the API or the CLI: (outcome, detail)."""
        outcome, detail = await self._call(via, method, path, body, argv)
        return outcome, f"{what}: {detail}" if what and detail else what or detail

    async def _call(
        self, via: str, method: str, path: str, body: Any, argv: list[str]
    ) -> tuple[str, str]:
        if via == "cli":
            code, out = await self.cli(*argv)
            if code == 0:
                return "applied", ""
            if code == 1:
                error = "500" in out or "Internal" in out or "Traceback" in out
                return ("error" if error else "refused"), out.splitlines()[-1][:120] if out else ""
            if code == 3:
                return "unreachable", out[-120:]
            return "error", f"exit {code}: {out[-200:]}"
        status, answer = await self.api(method, path, body)
        detail = ""
        if status is None or status >= 300:
            detail = (
                f"{status}: "
                + (answer.get("detail", "") if isinstance(answer, dict) else str(answer))[:120]
            )
        return self.outcome(status), detail

    async def target(self) -> tuple[dict[str, str], str]:
        """A color, or one upstream of a pool as zdproxy has it now."""
        color = self.rng.choice(COLORS)
        if self.rng.random() < 0.5:
            return {"color": color}, color
        status, pool = await self.api("GET", f"/v1/pools/{color}")
        members = pool.get("upstreams") if status == 200 and isinstance(pool, dict) else None
        addresses = [m if isinstance(m, str) else m.get("address") for m in members or []]
        up = f"{color}/{self.rng.choice(addresses or self.apps)}"
        return {"upstream": up}, up

    async def act(self, kind: str, via: str) -> tuple[str, str]:
        rng = self.rng
        if kind == "shift":
            weight = rng.choice([0, 0, 500, 1000, 2500, 5000, 7500, 10000])
            body: dict[str, Any] = {"candidate_weight": weight}
            argv = ["shift", f"{weight / 100:g}%"]
            if rng.random() < 0.2:
                live = rng.choice(COLORS)
                body["live"] = live
                argv += ["--live", live]
            return await self.call(via, "PUT", "/v1/split", body, argv, " ".join(argv))
        if kind in ("drain", "undrain"):
            body, name = await self.target()
            return await self.call(via, "POST", f"/v1/{kind}", body, [kind, name], name)
        if kind == "pool_set":
            split = await self.split()
            # Mostly the idle color, as in a deploy script; sometimes the one taking traffic.
            color = split["candidate"] if rng.random() < 0.8 else split["live"]
            ups = rng.sample(self.apps, rng.choice([1, 2, 2, 3]))
            version = f"v{rng.randrange(100)}"
            body = {"upstreams": ups, "version": version}
            argv = ["pool", "set", color, *ups, "--version", version]
            return await self.call(via, "PUT", f"/v1/pools/{color}", body, argv, " ".join(argv))
        if kind == "rules":
            rules = []
            if rng.random() < 0.7:
                to = rng.choice(["blue", "green", "candidate", "live"])
                rules = [{"name": "acme", "header": "X-Tenant", "values": ["acme"], "to": to}]
            what = f"acme to {rules[0]['to']}" if rules else "no rules"
            return await self.call(via, "PUT", "/v1/rules", {"rules": rules}, [], what)
        if kind == "reload":
            return await self.reload(edit=None)
        if kind == "edit":
            return await self.reload(edit=rng.choice(EDITS))
        if kind == "edit_invalid":
            return await self.edit_invalid()
        if kind in ("pause", "resume", "promote", "abort", "retry"):
            return await self.call(via, "POST", f"/v1/rollout/{kind}", None, ["rollout", kind])
        if kind == "restart":
            return await self.restart()
        return await self.deploy(kind, via)

    async def deploy(self, kind: str, via: str) -> tuple[str, str]:
        rng = self.rng
        split = await self.split()
        color = split["candidate"] if rng.random() < 0.95 else split["live"]
        plan = {
            "deploy_abort": "long",
            "deploy_long": "long",
            "deploy_hookfail": "hookfail",
            "deploy_dead": "quick",
            "deploy_full": rng.choice(["quick", "verified"]),
        }[kind]
        if kind == "deploy_dead":  # its app servers are stopped: nothing listens there
            body = {"upstreams": self.dead, "version": "dead"}
            outcome, detail = await self.call("api", "PUT", f"/v1/pools/{color}", body, [])
            if outcome != "applied":
                return outcome, f"pool set to stopped apps: {detail}"
        try:
            outcome, detail = await self.call(
                via,
                "POST",
                "/v1/rollouts",
                {"color": color, "plan": plan},
                ["deploy", color, "--plan", plan],
            )
            if outcome != "applied":
                return outcome, detail
            number = (await self.rollout()).get("id")
            if kind == "deploy_long":
                self.end = "left running"
                return outcome, f"{plan} rollout {number} left running"
            if kind == "deploy_abort":
                await asyncio.sleep(rng.uniform(0, 2.5))
                how = rng.choice(["api", "cli"])
                abort, why = await self.call(
                    how, "POST", "/v1/rollout/abort", None, ["rollout", "abort"]
                )
                end = self.end = await self.wait_rollout_end(number, 10)
                if abort == "applied" and end != "aborted":
                    self.anomalies.append(f"rollout {number}: abort applied, then {end}")
                return outcome, f"abort {abort} {why}; rollout {number} {end}"
            end = self.end = await self.wait_rollout_end(number, 30)
            expected = {"deploy_dead": "aborted", "deploy_hookfail": "aborted"}.get(kind, "done")
            if end != expected and not end.startswith("superseded"):
                self.anomalies.append(f"{kind} rollout {number} ({plan}): {end}, not {expected}")
                if end.startswith("still"):
                    await self.call("api", "POST", "/v1/rollout/abort", None, [])
            return outcome, f"rollout {number} {end}"
        finally:
            if kind == "deploy_dead":  # start its app servers again (the running ones)
                ups = rng.sample(self.apps, 2)
                body = {"upstreams": ups, "version": "v-back"}
                for _ in range(50):
                    back, why = await self.call("api", "PUT", f"/v1/pools/{color}", body, [])
                    if back == "applied":
                        break
                    await asyncio.sleep(0.2)  # e.g. refused while its rollout still ends
                else:
                    self.anomalies.append(f"deploy_dead: {color} not set back: {why}")

    async def reload(self, edit: str | None) -> tuple[str, str]:
        """SIGHUP, or a file edit (picked up by the watcher, or followed by a SIGHUP)."""
        since = await self.last_event_id()
        detail = "SIGHUP"
        signal_it = True
        if edit is not None:
            detail = self.apply_edit(edit)
            signal_it = self.rng.random() < 0.4
            self.write_config(atomic=self.rng.random() < 0.5)
        if signal_it:
            assert self.zdproxy is not None
            self.zdproxy.send_signal(signal.SIGHUP)
        event = await self.wait_event(since, {"reload_applied", "reload_refused"}, 10)
        if event is None:
            return "error", f"{detail}: no reload event within 10 s"
        outcome = "applied" if event["kind"] == "reload_applied" else "refused"
        return outcome, f"{detail}: {event['reason'][:100]}"

    def apply_edit(self, edit: str) -> str:
        rng, model = self.rng, self.model
        if edit == "timeout":
            model["upstream"]["timeout"] = rng.choice(["10s", "20s", "30s"])
            return f"upstream.timeout = {model['upstream']['timeout']}"
        if edit == "pins":
            if model.get("pins") or rng.random() < 0.3:
                model["pins"] = []
                return "pins removed"
            to = rng.choice(["blue", "green", "candidate", "live"])
            model["pins"] = [{"name": "acme-file", "header": "X-Tenant", "values": ["acme"]}]
            model["pins"][0]["to"] = to
            return f"pins: acme to {to}"
        if edit == "health":
            interval = rng.choice(["250ms", "300ms", "400ms"])
            for color in COLORS:
                model["pools"][color]["health"]["interval"] = interval
            return f"health interval {interval}"
        if edit == "split":
            live = rng.choice(COLORS)
            weight = rng.choice([0, 0, 1000, 5000, 10000])
            model["split"] = {"live": live, "candidate_weight": weight}
            return f"split: live {live}, candidate {weight / 100:g}%"
        if edit == "pool":
            color = rng.choice(COLORS)
            model["pools"][color]["upstreams"] = rng.sample(self.apps, 2)
            model["pools"][color]["version"] = f"f{rng.randrange(100)}"
            return f"pools.{color} upstreams"
        raise AssertionError(edit)

    async def edit_invalid(self) -> tuple[str, str]:
        since = await self.last_event_id()
        self.write_config(render(self.model) + "\n[retry]\nbudget_percent = 1000\n")
        event = await self.wait_event(since, {"reload_applied", "reload_refused"}, 10)
        outcome = "refused" if event and event["kind"] == "reload_refused" else "error"
        detail = event["reason"][:100] if event else "no reload event within 10 s"
        since = await self.last_event_id()
        self.write_config()  # fixed again
        if await self.wait_event(since, {"reload_applied", "reload_refused"}, 10) is None:
            self.anomalies.append("the fixed file after an invalid one was not reloaded")
        return outcome, detail

    async def restart(self) -> tuple[str, str]:
        """SIGUSR2: restart in place, until a new `started` event is in."""
        since = await self.last_event_id()
        assert self.zdproxy is not None
        self.zdproxy.send_signal(signal.SIGUSR2)
        event = await self.wait_event(since, {"started", "restart_refused"}, 40)
        if self.zdproxy.poll() is not None:
            raise SystemExit(f"zdproxy exited ({self.zdproxy.returncode}) on a restart in place")
        if event is None:
            return "error", "no started event within 40 s"
        if event["kind"] == "restart_refused":
            return "refused", event["reason"][:100]
        # A started process answers; wait until it is ready before the next action.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status, _ = await self.api("GET", "/readyz", unreachable_for=1)
            if status == 200:
                break
            await asyncio.sleep(0.05)
        return "applied", f"pid {event['data'].get('pid')}"

    async def actions(self, deadline: float) -> None:
        kinds, weights = list(ACTIONS), list(ACTIONS.values())
        for index in range(1, self.args.actions + 1):
            if time.monotonic() > deadline:
                self.anomalies.append(f"time limit: stopped after {index - 1} actions")
                return
            kind = self.rng.choices(kinds, weights)[0]
            cli = kind in CLI_KINDS or kind.startswith("deploy")
            via = "cli" if cli and self.rng.random() < self.args.cli_share else "api"
            label = f"#{index} {kind}"
            self.current = label
            began = time.monotonic()
            started = time.time()
            self.end = ""
            try:
                outcome, detail = await self.act(kind, via)
            finally:
                self.current, self.last = "-", label
            seconds = time.monotonic() - began
            self.records.append(Record(kind, via, outcome, detail, started, seconds, self.end))
            if self.args.verbose:
                print(f"{label} via {via}: {outcome} {detail}", file=sys.stderr, flush=True)
            elif index % 50 == 0:
                failed = len(self.failures)
                total = sum(self.requests.values())
                print(
                    f"  {index} actions, {total} requests, {failed} failed",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(self.rng.uniform(0, self.args.pause))

    # -- the run -----------------------------------------------------------------------

    async def run(self) -> int:
        began = time.monotonic()
        deadline = began + self.args.time_limit
        await self.start()
        collector = asyncio.ensure_future(self.collect_events())
        clients = [
            asyncio.ensure_future(self.client(n, deadline + 60)) for n in range(self.args.clients)
        ]
        try:
            await asyncio.sleep(1)  # traffic first
            await self.actions(deadline)
            await asyncio.sleep(1)  # traffic after the last action
        finally:
            self.stop.set()
            await asyncio.gather(*clients, collector, return_exceptions=True)
        elapsed = time.monotonic() - began
        final = await self.final_state()
        await self.close()
        return self.report(elapsed, final)

    async def final_state(self) -> dict[str, Any]:
        since = max(self.events, default=0)
        status, body = await self.api("GET", f"/v1/events?since={since}&limit=10000")
        if status == 200:
            for event in body["events"]:
                self.events[int(event["id"])] = event
        status, body = await self.api("GET", "/v1/status")
        return body if status == 200 else {"error": f"{status}: {body}"}

    # -- the report --------------------------------------------------------------------

    def report(self, elapsed: float, final: dict[str, Any]) -> int:
        args = self.args
        out = print
        out(f"\n## control soak: seed {args.seed}, {len(self.records)} actions, "
            f"{args.clients} clients, {elapsed:.0f} s")  # fmt: skip
        out("\n| action | via api | via cli | applied | refused | unreachable | error |")
        out("|---|--:|--:|--:|--:|--:|--:|")
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        for r in self.records:
            by_kind[r.kind][r.outcome] += 1
            by_kind[r.kind][f"via {r.via}"] += 1
        total: Counter[str] = Counter()
        for kind in ACTIONS:
            c = by_kind.get(kind, Counter())
            total.update(c)
            out(
                f"| {kind} | {c['via api']} | {c['via cli']} | {c['applied']} | {c['refused']} | "
                f"{c['unreachable']} | {c['error']} |"
            )
        out(
            f"| **all** | {total['via api']} | {total['via cli']} | {total['applied']} | "
            f"{total['refused']} | {total['unreachable']} | {total['error']} |"
        )
        ends: Counter[str] = Counter()
        for r in self.records:
            if r.end:
                ends[f"{r.kind}: {r.end}"] += 1
        if ends:
            out("\nrollouts started by a deploy, by how they ended:")
            for key, n in sorted(ends.items()):
                out(f"  {key}: {n}")
        odd = [r for r in self.records if r.outcome in ("error", "unreachable")]
        for r in odd[:20]:
            out(f"  {r.outcome}: {r.kind} via {r.via}: {r.detail}")

        requests = sum(self.requests.values())
        failed = len(self.failures)
        out("\n| requests | GET ok | GET failed | POST ok | POST failed | req/s |")
        out("|--:|--:|--:|--:|--:|--:|")
        rq = self.requests
        out(
            f"| {requests} | {rq['GET ok']} | {rq['GET failed']} | {rq['POST ok']} | "
            f"{rq['POST failed']} | {requests / max(elapsed, 1):.0f} |"
        )
        if self.failures:
            self.report_failures(out)
        violations = self.invariants(final)
        out("\nfinal state:")
        split = final.get("split", {})
        rollout = final.get("rollout", {})
        out(f"  split: live {split.get('live')}, candidate {split.get('candidate')} at "
            f"{(split.get('candidate_weight') or 0) / 100:g}%")  # fmt: skip
        for color, pool in final.get("pools", {}).items():
            ups = ", ".join(
                f"{u['address']} {u['health']}{' drained' if u['drained'] else ''}"
                f"{'' if u['routable'] else ' not-routable'}"
                for u in pool["upstreams"]
            )
            out(f"  {color} ({pool.get('version')}): {ups}")
        out(f"  rollout: {rollout.get('id')} {rollout.get('state')} ({rollout.get('reason')})")
        if "error" in final:
            out(f"  status: {final['error']}")
        out(f"  events seen: {len(self.events)}")
        out("\ninvariants:")
        for name, problems in violations.items():
            out(f"  {'PASS' if not problems else f'FAIL ({len(problems)})'} {name}")
            for problem in problems[:10]:
                out(f"      {problem}")
        for anomaly in self.anomalies[:30]:
            out(f"  note: {anomaly}")
        broken = any(violations.values())
        out(f"\n{requests} requests, {failed} failed by a control action; "
            f"invariants {'broken' if broken else 'hold'}")  # fmt: skip
        if args.dump:
            with open(args.dump, "w") as dump:
                for event in sorted(self.events.values(), key=lambda e: e["id"]):
                    dump.write(json.dumps(event) + "\n")
                for fail in self.failures:
                    dump.write(json.dumps({"failure": fail.__dict__}) + "\n")
                for r in self.records:
                    dump.write(json.dumps({"action": r.__dict__}) + "\n")
        return 1 if failed or broken else 0

    def report_failures(self, out: Any) -> None:
        events = sorted(self.events.values(), key=lambda e: e["id"])
        times = [e["time"] for e in events]
        out("\nfailed requests by what failed and the action in progress (else: the last done):")
        groups: Counter[tuple[str, str, str]] = Counter()
        culprits: Counter[str] = Counter()
        for f in self.failures:
            action = f"during {f.during}" if f.during != "-" else f"after {f.after}"
            groups[(f.what, f.method, action.split(" ")[0] + " " + action.split(" ")[-1])] += 1
            culprit = self.last_routing_event(events, times, f.time)
            culprits[culprit] += 1
        out("| failure | method | action | requests |")
        out("|---|---|---|--:|")
        for (what, method, action), n in groups.most_common(40):
            out(f"| {what} | {method} | {action} | {n} |")
        out("\nfailed requests by the last routing change before them (the likely cause):")
        out("| last routing event [actor] | requests |")
        out("|---|--:|")
        for culprit, n in culprits.most_common(20):
            out(f"| {culprit} | {n} |")
        out("\nfirst failure of each kind, with the events around it:")
        seen: set[tuple[str, str]] = set()
        for f in self.failures:
            first = (f.what, (f.during if f.during != "-" else f.after).split(" ")[-1])
            if first in seen or len(seen) >= 12:
                continue
            seen.add(first)
            out(f"- {f.what} ({f.method}, client {f.client}) during {f.during}, "
                f"after {f.after}: {f.detail[:160]}")  # fmt: skip
            for e in events:
                if f.time - 2 <= e["time"] <= f.time + 0.2:
                    offset = e["time"] - f.time
                    out(f"    {offset:+.2f}s {e['kind']} [{e['actor']}] {e['reason'][:110]}")

    @staticmethod
    def last_routing_event(events: list[dict[str, Any]], times: list[float], when: float) -> str:
        """The kind of the newest event before `when` that changes where requests go."""
        for e in reversed(events[: bisect.bisect_right(times, when)]):
            if e["kind"] in ROUTING_KINDS or e["kind"].startswith("rollout_"):
                return f"{e['kind']} [{e['actor']}]"
        return "none"

    def invariants(self, final: dict[str, Any]) -> dict[str, list[str]]:
        """From the events: at most one active rollout; an ended rollout never acts again
        (no step, promote, drain or split write after its end); ids never reused."""
        one: list[str] = []
        ended_acts: list[str] = []
        reused: list[str] = []
        active: set[int] = set()
        ended: dict[int, str] = {}
        started: list[int] = []
        events = sorted(self.events.values(), key=lambda e: e["id"])
        for i, e in enumerate(events):
            kind, data = e["kind"], e.get("data") or {}
            number = data.get("rollout")
            number = number.get("id") if isinstance(number, dict) else number
            if kind == "rollout_preflight" and number is not None:
                if number in ended or number in started:
                    reused.append(f"event {e['id']}: rollout {number} started again")
                if started and number < max(started):
                    reused.append(f"event {e['id']}: rollout {number} after {max(started)}")
                if active - {number}:
                    one.append(f"event {e['id']}: rollout {number} starts while {active} active")
                started.append(number)
                active.add(number)
            elif kind.startswith("rollout_") and number is not None:
                if number in ended:  # rollout_resumed too: a restart resumed it
                    ended_acts.append(
                        f"event {e['id']}: {kind} of rollout {number} after it was "
                        f"{ended[number]}: {e['reason'][:80]}"
                    )
                if kind == "rollout_resumed" and active - {number}:
                    one.append(f"event {e['id']}: rollout {number} resumed while {active} active")
                if kind in ENDED_KINDS:
                    ended.setdefault(number, kind.removeprefix("rollout_"))
                    active.discard(number)
            elif kind in ("split_changed", "drain_started") and e["actor"] == "auto":
                # A rollout's own writes come right before its transition's event.
                nxt = events[i + 1] if i + 1 < len(events) else None
                owner = (nxt or {}).get("data", {}).get("rollout") if nxt else None
                if number is not None and number in ended:
                    ended_acts.append(f"event {e['id']}: {kind} by ended rollout {number}")
                elif not active and not (nxt and nxt["kind"].startswith("rollout_") and owner):
                    ended_acts.append(
                        f"event {e['id']}: {kind} by auto with no rollout active: "
                        f"{e['reason'][:80]}"
                    )
        rollout = final.get("rollout") or {}
        if rollout.get("state") in ACTIVE and started and rollout.get("id") != max(started):
            one.append(f"GET /v1/rollout: {rollout.get('id')} active, newest is {max(started)}")
        return {
            "at most one active rollout": one,
            "an ended rollout never steps, promotes, drains or shifts": ended_acts,
            "rollout ids never reused": reused,
        }


EDITS = ["timeout", "pins", "health", "split", "pool"]
ROUTING_KINDS = {
    "split_changed",
    "pool_changed",
    "drain_started",
    "undrained",
    "upstream_down",
    "upstream_ejected",
    "rules_changed",
    "reload_applied",
    "config_takes_over",
    "started",
    "stopped",
}


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="zdsoak-") as tmp:
        soak = Soak(args, Path(tmp), random.Random(args.seed))
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await soak.run()
        finally:
            await soak.close()
            if args.keep_log:
                shutil.copy(Path(tmp) / "zdproxy.log", args.keep_log)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-app":
        serve_app(sys.argv[2])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--actions", type=int, default=1000, help="control actions (1000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the action draw (1)")
    parser.add_argument("--clients", type=int, default=24, help="keep-alive users (24)")
    parser.add_argument("--time-limit", type=float, default=2400, help="seconds in all (2400)")
    parser.add_argument("--think", type=float, default=0.01, help="mean pause of a user (0.01)")
    parser.add_argument("--pause", type=float, default=0.2, help="max pause between actions")
    parser.add_argument("--cli-share", type=float, default=0.25, help="actions via the CLI")
    parser.add_argument("--src", help="run zdproxy from this source tree (PYTHONPATH)")
    parser.add_argument("--dump", help="write events, failures and actions here (JSON lines)")
    parser.add_argument("--keep-log", help="copy zdproxy's log here at the end")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every action")
    sys.exit(asyncio.run(main(parser.parse_args())))
