"""The CLI commands that drive a running zdproxy through its admin API: their
registration, the runner that turns each outcome into an exit code (common.Exit), and
the commands that move traffic or change the pools (shift, pool, drain, undrain,
rules, reload). The reading ones are in observe.py, the rollouts in rollout.py, the
fleet's in fleet.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from zdproxy.cli.client import AdminClient, ApiRefused, Endpoint, Unreachable, UsageError
from zdproxy.cli.common import (
    ENVIRONMENT,
    EXIT_CODES,
    Command,
    Exit,
    duration,
    options_parent,
    print_json,
)
from zdproxy.cli.fleet import add_fleet_commands
from zdproxy.cli.observe import add_observe_commands
from zdproxy.cli.rollout import add_rollout_commands
from zdproxy.cli.wait import Conditions, RolloutFailed, wait_for
from zdproxy.config.units import format_duration

WAIT_INTERVAL = 0.5  # seconds between two polls of --wait-healthy
DEFAULT_HEALTHY_TIMEOUT = 300.0  # --wait-healthy without --timeout


def add_commands(commands: Any) -> None:
    """Register the admin API commands on the top-level subparsers."""
    parent = options_parent(admin=True)

    def command(name: str, func: Command, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
        epilog = kwargs.pop("epilog", EXIT_CODES)
        parser: argparse.ArgumentParser = commands.add_parser(
            name,
            parents=[parent],
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=epilog + "\n\n" + ENVIRONMENT,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kwargs,
        )
        parser.set_defaults(admin_command=func)
        return parser

    add_observe_commands(command)

    shift = command("shift", _shift, "set the candidate's share of the traffic")
    shift.add_argument("percent", help='the candidate\'s share: "25", "25%%", "0.5"')
    shift.add_argument("--live", choices=["blue", "green"], help="also make this color live")
    shift.add_argument(
        "--force", action="store_true", help="even if a color that gets traffic is unhealthy"
    )

    pool = command("pool", _pool_show, "show or set a pool's upstreams")
    pool_commands = pool.add_subparsers(dest="pool_command", metavar="show|set", required=True)
    show = pool_commands.add_parser("show", help="show a pool", parents=[parent])
    show.add_argument("color", choices=["blue", "green"])
    pool_set = pool_commands.add_parser(
        "set",
        help="replace a pool's upstreams (new ones serve after passing health checks)",
        parents=[parent],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pool_set.add_argument("color", choices=["blue", "green"])
    pool_set.add_argument("addresses", nargs="+", help='"127.0.0.1:9001", "unix:/run/app.sock"')
    pool_set.add_argument("--version", default="", help="label of the build they run")
    pool_set.add_argument(
        "--force", action="store_true", help="even if no healthy upstream of a live color remains"
    )
    pool_set.add_argument(
        "--wait-healthy",
        action="store_true",
        help="then wait until every upstream of the color is healthy (as `wait --until "
        "healthy:COLOR`); exit 4 past --timeout",
    )
    pool_set.add_argument(
        "--timeout",
        type=duration,
        metavar="DURATION",
        help=f"with --wait-healthy: give up after this "
        f"(default {format_duration(DEFAULT_HEALTHY_TIMEOUT)})",
    )
    pool_set.set_defaults(admin_command=_pool_set)

    drain = command("drain", _drain, "take a color or one upstream out of rotation")
    drain.add_argument("target", help='a color, or one upstream: "blue/127.0.0.1:9001"')
    drain.add_argument("--wait", action="store_true", help="return when nothing is in flight")
    drain.add_argument(
        "--cut-after", type=duration, default="30s", help="with --wait: cut what still runs after"
    )
    drain.add_argument(
        "--tunnel-grace", type=duration, default="5s", help="WebSocket tunnels get this long"
    )
    drain.add_argument(
        "--force",
        action="store_true",
        help="drain even when no routable upstream of either color would remain (every "
        "request then gets 503)",
    )

    undrain = command("undrain", _undrain, "put a drained color or upstream back")
    undrain.add_argument("target", help='a color, or one upstream: "blue/127.0.0.1:9001"')

    rules = command("rules", _rules, "show the pin rules, or replace them from a file")
    rules.add_argument(
        "--set",
        metavar="FILE",
        help="replace the rules with the [[pins]] of a TOML file (or a JSON list)",
    )
    rules.add_argument("--json", action="store_true", help="print the raw JSON")

    add_rollout_commands(command, parent)
    add_fleet_commands(command, parent)

    reload = command(
        "reload",
        _reload,
        "make zdproxy read its config file again and apply it, all or nothing (as SIGHUP)",
        epilog='Prints what changed (or "unchanged"). A refused reload changes nothing and\n'
        "prints each field at fault (exit 1).\n\n" + EXIT_CODES,
    )
    reload.add_argument("--json", action="store_true", help="print the raw JSON answer")


def run_admin_command(args: argparse.Namespace) -> int:
    try:
        endpoint = Endpoint.find(args.config, args.admin)
        return asyncio.run(_run(args.admin_command, endpoint, args))
    except UsageError as exc:
        return _fail(args, str(exc), Exit.USAGE)
    except Unreachable as exc:
        return _fail(args, str(exc), Exit.UNREACHABLE)
    except ApiRefused as exc:
        return _fail(args, f"refused: {exc}", Exit.REFUSED)
    except RolloutFailed as exc:  # wait --until done, deploy --wait, rollout show --watch
        return _fail(args, str(exc), Exit.ROLLOUT_FAILED)


async def _run(command: Command, endpoint: Endpoint, args: argparse.Namespace) -> int:
    async with AdminClient(endpoint, timeout=_call_timeout(args)) as client:
        return await command(client, args)


def _call_timeout(args: argparse.Namespace) -> float:
    if getattr(args, "wait", False) and args.admin_command is _drain:
        return float(args.cut_after) + 30.0
    return 30.0


def _fail(args: argparse.Namespace, message: str, code: Exit) -> int:
    print(f"zdproxy {args.command}: {message}", file=sys.stderr)
    return code


def _target(text: str) -> dict[str, str]:
    if text in ("blue", "green"):
        return {"color": text}
    if text.startswith(("blue/", "green/")):
        return {"upstream": text}
    raise UsageError(f"{text!r} is neither a color nor an upstream like blue/127.0.0.1:9001")


# -- commands ------------------------------------------------------------------------------


async def _shift(client: AdminClient, args: argparse.Namespace) -> int:
    text = args.percent.strip().removesuffix("%")
    try:
        percent = float(text)
    except ValueError:
        raise UsageError(f"{args.percent!r} is not a percentage") from None
    if not 0 <= percent <= 100:
        raise UsageError(f"{args.percent!r}: the share must be within 0-100%")
    body: dict[str, Any] = {"candidate_weight": round(percent * 100), "force": args.force}
    if args.live:
        body["live"] = args.live
    split = await client.call("PUT", "/v1/split", body)
    print(f"live {split['live']}, {split['candidate']} at {split['shares'][split['candidate']]:g}%")
    return Exit.OK


async def _pool_show(client: AdminClient, args: argparse.Namespace) -> int:
    print_json(await client.call("GET", f"/v1/pools/{args.color}"))
    return Exit.OK


async def _pool_set(client: AdminClient, args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.wait_healthy:
        raise UsageError("--timeout applies only with --wait-healthy")
    body = {"upstreams": args.addresses, "version": args.version, "force": args.force}
    pool = await client.call("PUT", f"/v1/pools/{args.color}", body)
    addresses = " ".join(u["address"] for u in pool["upstreams"])
    print(f"{args.color}: {addresses} (version {pool['version'] or '-'})", flush=True)
    if not args.wait_healthy:
        return Exit.OK
    timeout = DEFAULT_HEALTHY_TIMEOUT if args.timeout is None else args.timeout
    healthy = Conditions.parse([f"healthy:{args.color}"])
    if (why := await wait_for(client, healthy, timeout, WAIT_INTERVAL)) is not None:
        print(f"zdproxy pool: timed out after {format_duration(timeout)}: {why}", file=sys.stderr)
        return Exit.TIMEOUT
    print(f"{args.color}: healthy")
    return Exit.OK


async def _drain(client: AdminClient, args: argparse.Namespace) -> int:
    body = {
        **_target(args.target),
        "wait": args.wait,
        "cut_after": args.cut_after,
        "tunnel_grace": args.tunnel_grace,
        "force": args.force,
    }
    result = await client.call("POST", "/v1/drain", body)
    names = ", ".join(result["upstreams"]) or "(no upstreams)"
    if not result["finished"]:
        print(f"draining {names}")
    elif result["drained"]:
        print(f"drained {names} in {result['seconds']:.2f}s")
    else:
        cut_after = format_duration(args.cut_after)
        print(f"{names}: {result['cut']} requests cut after {cut_after}", file=sys.stderr)
        return Exit.REFUSED
    return Exit.OK


async def _reload(client: AdminClient, args: argparse.Namespace) -> int:
    # A refusal (400/409) raises ApiRefused: exit 1 with the fields named.
    result = await client.call("POST", "/v1/reload")
    if args.json:
        print_json(result)
    elif result["result"] == "unchanged":
        print(f"{result['source']}: unchanged")
    else:
        print(f"{result['source']}: applied: {', '.join(result['changed'])}")
        if result["needs_restart"]:
            print(f"after a restart only: {', '.join(result['needs_restart'])}")
    return Exit.OK


async def _undrain(client: AdminClient, args: argparse.Namespace) -> int:
    result = await client.call("POST", "/v1/undrain", _target(args.target))
    print("back in rotation: " + (", ".join(result["upstreams"]) or "(none was drained)"))
    return Exit.OK


async def _rules(client: AdminClient, args: argparse.Namespace) -> int:
    if args.set is None:
        rules = await client.call("GET", "/v1/rules")
    else:
        rules = await client.call("PUT", "/v1/rules", {"rules": _read_rules(Path(args.set))})
    if args.json:
        print_json(rules)
    else:
        for i, rule in enumerate(rules["rules"]):
            conditions = {k: v for k, v in rule.items() if v and k not in ("name", "to")}
            print(f"{rule.get('name') or f'pins[{i}]'} -> {rule['to']}: {json.dumps(conditions)}")
        if not rules["rules"]:
            print("no pin rules")
    return Exit.OK


def _read_rules(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the file: {exc.strerror}") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return tomllib.loads(text).get("pins", [])
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from None
