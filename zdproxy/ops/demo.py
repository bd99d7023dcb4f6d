"""`zdproxy demo`: blue and green sample apps on loopback with zdproxy in front.

The apps are aiohttp servers in this process; zdproxy runs exactly as `zdproxy run`
would run it, from a config file the demo writes under `.demo/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from pathlib import Path

import uvloop
from aiohttp import ClientError, ClientSession, DummyCookieJar, web

from zdproxy.config.loader import load_settings
from zdproxy.ops.daemon import Daemon

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

# `zdproxy deploy green --config .demo/zdproxy.toml`: seconds per step, so a whole
# rollout takes about half a minute. The demo sends its own traffic (a few users per
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
"""

TRAFFIC_PER_SECOND = 20  # the demo's own users, so that rollouts are judged


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


async def _traffic(url: str) -> None:
    """A few users per second through zdproxy, each new (no cookie), until cancelled."""
    async with ClientSession(cookie_jar=DummyCookieJar()) as session:
        while True:
            with contextlib.suppress(ClientError):
                async with session.get(url) as response:
                    await response.read()
            await asyncio.sleep(1 / TRAFFIC_PER_SECOND)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _start_app(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def _token(directory: Path) -> Path:
    """The demo's admin token, made once and kept (mode 0600) so a CLI session survives
    a restart of the demo."""
    path = directory / "admin.token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
    return path


def _write_config(directory: Path, port: int, admin_port: int, apps: dict[str, int]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "zdproxy.toml"
    text = DEMO_CONFIG.format(
        port=port,
        admin=admin_port,
        token_file=_token(directory).resolve(),
        state=(directory / "state").resolve(),
        **apps,
    )
    config.write_text(text)
    return config


async def _demo(port: int, admin_port: int, directory: Path) -> None:
    blue_port, green_port = _free_port(), _free_port()
    runners = [
        await _start_app(sample_app("blue", "v1"), blue_port),
        await _start_app(sample_app("green", "v2"), green_port),
    ]
    config = _write_config(directory, port, admin_port, {"blue": blue_port, "green": green_port})
    daemon = Daemon(load_settings(config), config)
    daemon.handle_signals()
    await daemon.start()
    traffic = asyncio.ensure_future(_traffic(f"http://127.0.0.1:{port}/"))
    print(
        f"""
zdproxy demo is running.
  blue  (v1, live)      http://127.0.0.1:{blue_port}
  green (v2, candidate) http://127.0.0.1:{green_port}
  zdproxy               http://127.0.0.1:{port}
  admin API             http://127.0.0.1:{admin_port} (token in {directory}/admin.token)
  config                {config}

Try:
  curl -s http://127.0.0.1:{port}/           # answered by blue
  curl -si http://127.0.0.1:{port}/ | grep -i -e via -e set-cookie
  zdproxy status --config {config}
Send half of the users to green, and watch the decisions:
  zdproxy shift 50 --config {config}
  zdproxy events --follow --config {config}
Each user keeps their color (zdproxy's zd_bucket cookie):
  curl -s -c /tmp/zd.jar -b /tmp/zd.jar http://127.0.0.1:{port}/   # repeat: same color
Deploy green with the canary plan (10%, 50%, 100%, judged; the demo sends a few
users per second itself) and wait until blue is drained:
  zdproxy deploy green --config {config}
  zdproxy wait --until done --config {config}
Or make green fail first, and watch zdproxy roll it back within a second:
  curl -X POST http://127.0.0.1:{green_port}/_demo/fail
  zdproxy deploy green --config {config}; zdproxy wait --until done --config {config}
  curl -X POST http://127.0.0.1:{green_port}/_demo/recover; zdproxy rollout retry --config {config}
Edits of {config} apply on kill -HUP {os.getpid()}. Ctrl-C stops everything.
""",
        flush=True,
    )
    await daemon.stop_requested.wait()
    traffic.cancel()
    await daemon.stop()
    for runner in runners:
        await runner.cleanup()


def run_demo(port: int, admin_port: int, directory: str) -> int:
    try:
        uvloop.run(_demo(port, admin_port, Path(directory)))
    except OSError as exc:
        log.error("cannot start the demo: %s", exc)
        return 1
    return 0
