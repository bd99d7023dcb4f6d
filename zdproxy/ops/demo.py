"""`zdproxy demo`: blue and green sample apps on loopback with zdproxy in front.

The apps are aiohttp servers in this process; zdproxy runs exactly as `zdproxy run`
would run it, from a config file the demo writes under `.demo/`.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path

import uvloop
from aiohttp import web

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
"""


def sample_app(color: str, version: str) -> web.Application:
    """The app a team would deploy: answers its color and version, and a health check."""

    async def index(request: web.Request) -> web.Response:
        return web.json_response({"color": color, "version": version, "path": request.path})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "color": color})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", index)
    return app


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
Then make green live, drain blue and wait until it is safe to stop:
  zdproxy shift 100 --config {config}
  zdproxy drain blue --config {config}
  zdproxy wait --until drained:blue --timeout 30s --config {config}
Edits of {config} apply on kill -HUP {os.getpid()}. Ctrl-C stops everything.
""",
        flush=True,
    )
    await daemon.stop_requested.wait()
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
