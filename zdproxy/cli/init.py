"""`zdproxy init`: a working config for one app, and a fresh admin token beside it.

Blue is the app as it runs; green is where the next release goes (by default the
app's port + 1), both checked alike; deploys use the built-in plans.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zdproxy.cli.common import Exit
from zdproxy.config.loader import ConfigError, settings_from_mapping
from zdproxy.config.plans import BUILTIN_PLANS, DEFAULT_PLAN
from zdproxy.config.units import Address

DEFAULT_OUTPUT = "zdproxy.toml"
DEFAULT_LISTEN = "127.0.0.1:8080"
TOKEN_FILE = "admin.token"  # beside the config
TOKEN_BYTES = 32

DESCRIPTION = """Write a working config for one app: blue is the app (--app), green the
address its next release will run on (--candidate, default the app's port + 1), both
pools health-checked alike (an HTTP GET of --health, else a TCP connect). A fresh
admin token goes into admin.token beside the config, mode 0600. Deploys use the
built-in plans (`zdproxy deploy green`). Nothing is overwritten without --force.

example:
  zdproxy init --app 127.0.0.1:9001 --health /readyz --output /etc/zdproxy/zdproxy.toml
  zdproxy check -c /etc/zdproxy/zdproxy.toml

exit codes: 0 written, 2 bad arguments or a file that exists (without --force)"""


def add_init_command(commands: Any) -> None:
    """Register `init` on the top-level subparsers."""
    init = commands.add_parser(
        "init",
        help="write a working config for one app (blue), its next release on green",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("--app", required=True, metavar="HOST:PORT", help="the app: blue's upstream")
    init.add_argument(
        "--candidate",
        metavar="HOST:PORT",
        help="green's upstream, where the next release runs (default: the app's host, its "
        "port + 1)",
    )
    init.add_argument(
        "--health",
        metavar="PATH",
        help='the readiness path both pools are checked on, e.g. "/readyz" (default: a TCP '
        "connect check)",
    )
    init.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where clients connect (default {DEFAULT_LISTEN})",
    )
    init.add_argument(
        "--output",
        "-o",
        default=DEFAULT_OUTPUT,
        metavar="FILE",
        help=f"the config file to write (default ./{DEFAULT_OUTPUT}); the token goes beside it",
    )
    init.add_argument(
        "--force", action="store_true", help="overwrite the config and the token file"
    )


@dataclass(frozen=True)
class AppLayout:
    listen: Address
    app: Address
    candidate: Address
    health: str  # "" for a TCP connect check


def run_init(args: argparse.Namespace) -> int:
    try:
        layout = _layout(args)
    except ValueError as exc:
        print(f"zdproxy init: {exc}", file=sys.stderr)
        return Exit.USAGE
    config = Path(args.output).absolute()
    token_path = config.parent / TOKEN_FILE
    if not args.force and (existing := [p for p in (config, token_path) if p.exists()]):
        print(
            f"zdproxy init: {', '.join(map(str, existing))} exists: --force overwrites it",
            file=sys.stderr,
        )
        return Exit.USAGE
    token = secrets.token_urlsafe(TOKEN_BYTES)
    text = config_text(layout, token_path)
    try:  # the file as `zdproxy check` reads it, the token given inline: nothing written yet
        data = tomllib.loads(text)
        settings_from_mapping(
            {**data, "admin": {**data["admin"], "token": token, "token_file": ""}}
        )
    except ConfigError as exc:
        print(f"zdproxy init: {exc}", file=sys.stderr)
        return Exit.USAGE
    try:
        config.parent.mkdir(parents=True, exist_ok=True)
        _write_private(token_path, token + "\n")
        config.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"zdproxy init: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return Exit.USAGE
    check = f"GET {layout.health}" if layout.health else "TCP connect"
    print(f"wrote {config}: blue {layout.app}, green {layout.candidate}, both checked by {check}")
    print(f"wrote {token_path}: the admin token (mode 0600)")
    print(f"next: zdproxy check -c {config} && zdproxy run -c {config}")
    return Exit.OK


def _layout(args: argparse.Namespace) -> AppLayout:
    app = Address.parse(args.app)
    if args.candidate is not None:
        candidate = Address.parse(args.candidate)
    elif app.path is not None or app.port >= 65535:
        raise ValueError(f"--app {app}: give --candidate, green's address (no port + 1 here)")
    else:
        candidate = Address.parse(f"{args.app.rpartition(':')[0]}:{app.port + 1}")
    if str(candidate) == str(app):
        raise ValueError(f"--candidate {candidate} is the app itself: green needs its own address")
    health = args.health or ""
    if health and not health.startswith("/"):
        raise ValueError(f"--health {health!r}: a path starts with /, e.g. /readyz")
    return AppLayout(Address.parse(args.listen), app, candidate, health)


def _write_private(path: Path, text: str) -> None:
    """Write `text` readable by its owner only, even over an existing, wider file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        os.fchmod(fd, 0o600)
        file.write(text)


def config_text(layout: AppLayout, token_path: Path) -> str:
    plans = "".join(f"#   {name:<11} {plan.describe()}\n" for name, plan in BUILTIN_PLANS.items())
    return f"""\
# zdproxy for one app, written by `zdproxy init`. Every option, with its default and
# its effect: config/zdproxy.toml in the release. Check an edit: zdproxy check -c FILE.

[proxy]
# Where clients connect (under systemd, the address of zdproxy.socket instead).
listen = "{layout.listen}"

# Blue runs the app today; green is where the next release goes. To deploy: start it
# there, then `zdproxy deploy green --wait` (and the next one to blue, and so on).
[pools.blue]
upstreams = ["{layout.app}"]
{_health("blue", layout.health)}
[pools.green]
upstreams = ["{layout.candidate}"]
{_health("green", layout.health)}
[admin]
listen = "127.0.0.1:9901"
# Every admin call needs this bearer token; the CLI reads it from here too (or from
# ZDPROXY_ADMIN__TOKEN). The file is mode 0600: under systemd, let the zdproxy group
# read it (chgrp zdproxy FILE; chmod 0640 FILE).
token_file = {_toml(str(token_path))}

# [state] dir: the journal and the event log; default $STATE_DIRECTORY (systemd), else
# /var/lib/zdproxy, which zdproxy run outside systemd must be able to write.

[rollout]
# The plan `zdproxy deploy` uses without --plan. Built in (a [plans.NAME] of the same
# name replaces one; see docs/rollouts.md):
{plans}default_plan = "{DEFAULT_PLAN}"
"""


def _health(color: str, path: str) -> str:
    """Both pools get the same check: a readiness path, or the TCP connect default."""
    if not path:
        return (
            f'# [pools.{color}.health] path = "/readyz" would check readiness; without a '
            "path the check\n# is a TCP connect, which proves the app listens, not that it "
            "is ready.\n"
        )
    return f"\n[pools.{color}.health]\npath = {_toml(path)}\n"


def _toml(text: str) -> str:
    """A TOML basic string: JSON's spelling of a string is one."""
    return json.dumps(text)
