"""`zdproxy demo`: blue and green sample apps on loopback with zdproxy in front.

The apps are aiohttp servers in this process; zdproxy runs exactly as `zdproxy run`
would run it, from a config file the demo writes under `.demo/`. Each start is a fresh
one (blue live, green at 0%), as the README's walkthrough expects, unless
`--keep-state` keeps the last run's journal and events; the banner shows the split
the daemon actually runs with either way. `--fleet N` runs N members and an etcd
instead (ops/demo_fleet.py), from the same apps and config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
from pathlib import Path

import uvloop
from aiohttp import ClientError, ClientSession, DummyCookieJar, web

from zdproxy.config.loader import load_settings
from zdproxy.config.settings import Settings
from zdproxy.config.units import Address
from zdproxy.ops.daemon import Daemon
from zdproxy.ops.listen_errors import CannotListen, cannot_listen
from zdproxy.ops.sockets import bind

log = logging.getLogger("zdproxy.demo")

DEMO_CONFIG = """\
# Written by `zdproxy demo`; regenerated on every start.
[proxy]
listen = "127.0.0.1:{port}"

[pools.blue]
upstreams = ["127.0.0.1:{blue}"]
version = "v1"

[pools.blue.health]
path = "/healthz"
interval = "1s"
expect_json = {{ status = "ok" }}

[pools.green]
upstreams = ["127.0.0.1:{green}"]
version = "v2"

[pools.green.health]
path = "/healthz"
interval = "1s"
expect_json = {{ status = "ok" }}

[split]
live = "blue"
candidate_weight = 0

[admin]
listen = "127.0.0.1:{admin}"
token_file = "{token_file}"

[state]
dir = "{state}"

# `zdproxy deploy green --config THIS-FILE`: seconds per step, so a whole rollout
# takes about half a minute. The demo sends its own traffic (a few users per
# second) so that the judge has something to judge.
[plans.canary]
steps = [
  {{ weight = 10, hold = "4s" }},
  {{ weight = 50, hold = "4s" }},
  {{ weight = 100, hold = "2s" }},
]
bake = "8s"

[plans.canary.judge]
window = "4s"
min_requests = 10
# The demo's own users send a few dozen requests a second, and a step passes only once
# the candidate's error rate is shown under its limits: the demo asks little (20%, not
# the default 5% and 1% over live, which take hundreds of requests to show) so that a
# rollout takes half a minute. Green failing on purpose answers every request with 500.
max_error_rate = 0.2
max_error_rate_over_live = 1
# Both apps answer in about a millisecond: a latency ratio would judge scheduling
# noise (a busy laptop fails a healthy green), so the demo judges error rates and a
# plain latency limit.
max_latency_ratio = 0
max_p99 = "1s"
"""

TRAFFIC_PER_SECOND = 50  # the demo's own users, so that rollouts are judged


def sample_app(color: str, version: str) -> web.Application:
    """The app a team would deploy: answers its color and version, and a health check.

    POST /_demo/fail makes it answer 500 (its health check stays fine, as a bad
    release's often does); POST /_demo/recover undoes it. That switch is the app's,
    not zdproxy's: it shows the judge catching a failure it was not told about.
    """
    failing = False

    async def index(request: web.Request) -> web.Response:
        if failing:
            return web.json_response({"color": color, "error": "failing on purpose"}, status=500)
        return web.json_response({"color": color, "version": version, "path": request.path})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "color": color})

    async def switch(request: web.Request) -> web.Response:
        nonlocal failing
        failing = request.match_info["how"] == "fail"
        return web.json_response({"color": color, "failing": failing})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/_demo/{how:fail|recover}", switch)
    app.router.add_route("*", "/{tail:.*}", index)
    return app


async def send_traffic(url: str) -> None:
    """A few users per second through zdproxy, each new (no cookie), until cancelled."""
    async with ClientSession(cookie_jar=DummyCookieJar()) as session:
        while True:
            with contextlib.suppress(ClientError):
                async with session.get(url) as response:
                    await response.read()
            await asyncio.sleep(1 / TRAFFIC_PER_SECOND)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_app(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def admin_token(directory: Path) -> Path:
    """The demo's admin token, made once and kept (mode 0600) so a CLI session survives
    a restart of the demo."""
    path = directory / "admin.token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
    return path


def write_config(
    config: Path, port: int, admin_port: int, apps: dict[str, int], state: Path, more: str = ""
) -> Path:
    """The demo's config at `config` (its directory holds the admin token); `more` is
    TOML appended to it (a fleet member's [fleet])."""
    config.parent.mkdir(parents=True, exist_ok=True)
    text = DEMO_CONFIG.format(
        port=port,
        admin=admin_port,
        token_file=admin_token(config.parent).resolve(),
        state=state.resolve(),
        **apps,
    )
    config.write_text(text + more)
    return config


def check_free(listeners: dict[str, int]) -> None:
    """CannotListen unless every port (by the setting that names it, e.g.
    "proxy.listen") can be bound on 127.0.0.1. Checked before the last run's state is
    removed: a second demo on the same ports stops here and leaves the running one's
    journal alone."""
    for setting, port in listeners.items():
        address = Address.parse(f"127.0.0.1:{port}")
        try:
            bind(address, backlog=1).close()
        except OSError as exc:
            raise cannot_listen(setting, address, exc) from None


def fresh_state(state: Path) -> None:
    """Forget the last run: its journal would otherwise win over the config file (a
    finished rollout leaves green live), and its events would fill `zdproxy events`."""
    if state.is_dir():
        shutil.rmtree(state)


def _banner(
    settings: Settings, port: int, apps: dict[str, int], files: dict[str, Path], kept: bool
) -> str:
    """What runs, as the daemon runs it (after its journal, if kept), and what to try."""
    split = settings.split
    live = split.live
    candidate = "green" if live == "blue" else "blue"
    share = f"{split.candidate_weight / 100:g}%"
    roles = {live: "live", candidate: f"candidate at {share}"}
    pools = "\n".join(
        f"  {f'{color} ({settings.pool(color).version}, {roles[color]})':<32}"
        f"http://127.0.0.1:{apps[color]}"
        for color in ("blue", "green")
    )
    if kept:
        state = f"kept from the last run (--keep-state): {live} live, {candidate} at {share}"
    else:
        state = "fresh (the last run's journal and events are gone; --keep-state keeps them)"
    answered = live if split.candidate_weight == 0 else f"{live} or {candidate}, by user"
    config, other = files["config"], apps[candidate]
    return f"""
zdproxy demo is running.
{pools}
  {"zdproxy":<32}http://127.0.0.1:{port}
  {"admin API":<32}http://{settings.admin.listen} (token in {files["token"]})
  {"dashboard":<32}http://{settings.admin.listen}/ui/ (the same token)
  {"config":<32}{config}
  {"state":<32}{state}

Try:
  curl -s http://127.0.0.1:{port}/           # answered by {answered}
  curl -si http://127.0.0.1:{port}/ | grep -i -e via -e set-cookie
  zdproxy status --config {config}
Send half of the users to {candidate}, and watch the decisions:
  zdproxy shift 50 --config {config}
  zdproxy events --follow --config {config}
Each user keeps their color (zdproxy's zd_bucket cookie):
  curl -s -c /tmp/zd.jar -b /tmp/zd.jar http://127.0.0.1:{port}/   # repeat: same color
Deploy {candidate} with the canary plan (10%, 50%, 100%, judged; the demo sends a few
users per second itself) and wait until {live} is drained:
  zdproxy deploy {candidate} --config {config}
  zdproxy wait --until done --config {config}
Or make {candidate} fail first, and watch zdproxy roll it back within a second:
  curl -X POST http://127.0.0.1:{other}/_demo/fail
  zdproxy deploy {candidate} --config {config}; zdproxy wait --until done --config {config}
  curl -X POST http://127.0.0.1:{other}/_demo/recover; zdproxy rollout retry --config {config}
Edits of {config} apply on save (or kill -HUP {os.getpid()}).
Ctrl-C stops everything; the next start is a fresh one again.
"""


async def _demo(port: int, admin_port: int, directory: Path, keep_state: bool) -> None:
    check_free({"proxy.listen": port, "admin.listen": admin_port})
    kept = keep_state and (directory / "state").is_dir()
    if not keep_state:
        fresh_state(directory / "state")
    apps = {"blue": free_port(), "green": free_port()}
    runners = [
        await start_app(sample_app("blue", "v1"), apps["blue"]),
        await start_app(sample_app("green", "v2"), apps["green"]),
    ]
    config = write_config(directory / "zdproxy.toml", port, admin_port, apps, directory / "state")
    daemon = Daemon(load_settings(config), config)
    daemon.handle_signals()
    await daemon.start()
    traffic = asyncio.ensure_future(send_traffic(f"http://127.0.0.1:{port}/"))
    files = {"config": config, "token": directory / "admin.token"}
    print(_banner(daemon.control.settings, port, apps, files, kept), flush=True)
    await daemon.stop_requested.wait()
    traffic.cancel()
    await daemon.stop()
    for runner in runners:
        await runner.cleanup()


def run_demo(port: int, admin_port: int, directory: str, keep_state: bool = False) -> int:
    try:
        uvloop.run(_demo(port, admin_port, Path(directory), keep_state))
    except (CannotListen, OSError) as exc:
        log.error("cannot start the demo: %s", exc)
        return 1
    return 0
