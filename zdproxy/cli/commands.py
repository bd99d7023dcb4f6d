"""The CLI commands that drive a running zdproxy through its admin API.

Exit codes (stable; deploy scripts rely on them):
  0  done; for `wait`, every condition holds
  1  zdproxy refused the change or answered an error (the reason is printed)
  2  bad arguments or an unreadable config
  3  zdproxy's admin API cannot be reached
  4  `wait` timed out before the conditions held
  5  `wait --until done`, `rollout show --watch`: the rollout was rolled back, aborted,
     frozen or failed
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from zdproxy.cli.client import AdminClient, ApiRefused, Endpoint, Unreachable, UsageError
from zdproxy.cli.rollout import add_rollout_commands
from zdproxy.cli.views import event_line, status_table
from zdproxy.cli.wait import CONDITIONS, RolloutFailed, conditions, unmet_conditions
from zdproxy.config.units import parse_duration

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4
EXIT_ROLLOUT_FAILED = 5
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
RECONNECT_SECONDS = 1.0  # `events -f` after its stream ended

EXIT_CODES = """exit codes:
  0  done (wait: every condition holds)
  1  zdproxy refused the change or answered an error
  2  bad arguments or an unreadable config
  3  zdproxy's admin API cannot be reached
  4  wait: timed out
  5  wait --until done, rollout show --watch: the rollout was rolled back, aborted,
     frozen or failed
  130  interrupted (Ctrl-C)"""

Command = Callable[[AdminClient, argparse.Namespace], Awaitable[int]]


def add_commands(commands: Any) -> None:
    """Register the admin API commands on the top-level subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        help="zdproxy's config file, for the admin address and token (default: "
        "ZDPROXY_ADMIN and ZDPROXY_TOKEN, else /etc/zdproxy/zdproxy.toml)",
    )

    def command(name: str, func: Command, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=kwargs.pop("epilog", EXIT_CODES),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kwargs,
        )
        parser.set_defaults(admin_command=func)
        return parser

    status = command("status", _status, "show pools, health, split, rules and traffic")
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    shift = command("shift", _shift, "set the candidate's share of the traffic")
    shift.add_argument("percent", help='the candidate\'s share: "25", "25%%", "0.5"')
    shift.add_argument("--live", choices=["blue", "green"], help="also make this color live")
    shift.add_argument(
        "--force", action="store_true", help="even if a color that gets traffic is unhealthy"
    )

    pool = command("pool", _pool_show, "show or set a pool's upstreams")
    pool_commands = pool.add_subparsers(dest="pool_command", metavar="show|set")
    show = pool_commands.add_parser("show", help="show a pool", parents=[common])
    show.add_argument("color", choices=["blue", "green"])
    show.set_defaults(admin_command=_pool_show)
    pool_set = pool_commands.add_parser(
        "set",
        help="replace a pool's upstreams (new ones serve after passing health checks)",
        parents=[common],
    )
    pool_set.add_argument("color", choices=["blue", "green"])
    pool_set.add_argument("addresses", nargs="+", help='"127.0.0.1:9001", "unix:/run/app.sock"')
    pool_set.add_argument("--version", default="", help="label of the build they run")
    pool_set.add_argument(
        "--force", action="store_true", help="even if no healthy upstream of a live color remains"
    )
    pool_set.set_defaults(admin_command=_pool_set)

    drain = command("drain", _drain, "take a color or one upstream out of rotation")
    drain.add_argument("target", help='a color, or one upstream: "blue/127.0.0.1:9001"')
    drain.add_argument("--wait", action="store_true", help="return when nothing is in flight")
    drain.add_argument(
        "--cut-after", default="30s", help="with --wait: cut what still runs after this"
    )
    drain.add_argument("--tunnel-grace", default="5s", help="WebSocket tunnels get this long")
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

    events = command("events", _events, "show the event log")
    events.add_argument("-f", "--follow", action="store_true", help="then stream new events")
    events.add_argument("--since", type=int, default=0, help="only events after this id")
    events.add_argument("--kind", help="only events of this kind")
    events.add_argument("-n", "--limit", type=int, default=100, help="at most this many")
    events.add_argument("--json", action="store_true", help="one JSON object per line")

    wait = command(
        "wait",
        _wait,
        "wait until conditions hold, for deploy scripts",
        epilog=CONDITIONS + "\n\n" + EXIT_CODES,
    )
    wait.add_argument(
        "--until", action="append", required=True, metavar="CONDITION", help="see below"
    )
    wait.add_argument("--timeout", default="5m", help="give up after this (default 5m)")
    wait.add_argument("--interval", default="500ms", help="poll this often (default 500ms)")
    add_rollout_commands(command, common)

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
        endpoint = Endpoint.find(args.config)
        return asyncio.run(_run(args.admin_command, endpoint, args))
    except UsageError as exc:
        return _fail(args, str(exc), EXIT_USAGE)
    except Unreachable as exc:
        return _fail(args, str(exc), EXIT_UNREACHABLE)
    except ApiRefused as exc:
        return _fail(args, f"refused: {exc}", EXIT_REFUSED)
    except RolloutFailed as exc:  # `wait --until done`, `rollout show --watch`
        return _fail(args, str(exc), EXIT_ROLLOUT_FAILED)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _run(command: Command, endpoint: Endpoint, args: argparse.Namespace) -> int:
    async with AdminClient(endpoint, timeout=_call_timeout(args)) as client:
        return await command(client, args)


def _call_timeout(args: argparse.Namespace) -> float:
    if getattr(args, "wait", False) and args.admin_command is _drain:
        return _duration(args.cut_after, "--cut-after") + 30.0
    return 30.0


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"zdproxy {args.command}: {message}", file=sys.stderr)
    return code


def _duration(text: str, option: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _target(text: str) -> dict[str, str]:
    if text in ("blue", "green"):
        return {"color": text}
    if text.startswith(("blue/", "green/")):
        return {"upstream": text}
    raise UsageError(f"{text!r} is neither a color nor an upstream like blue/127.0.0.1:9001")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


# -- commands ------------------------------------------------------------------------------


async def _status(client: AdminClient, args: argparse.Namespace) -> int:
    status = await client.call("GET", "/v1/status")
    if args.json:
        _print_json(status)
    else:
        print(status_table(status))
    return EXIT_OK


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
    return EXIT_OK


async def _pool_show(client: AdminClient, args: argparse.Namespace) -> int:
    if getattr(args, "color", None) is None:
        raise UsageError("usage: zdproxy pool show COLOR | zdproxy pool set COLOR ADDRESS...")
    _print_json(await client.call("GET", f"/v1/pools/{args.color}"))
    return EXIT_OK


async def _pool_set(client: AdminClient, args: argparse.Namespace) -> int:
    body = {"upstreams": args.addresses, "version": args.version, "force": args.force}
    pool = await client.call("PUT", f"/v1/pools/{args.color}", body)
    addresses = " ".join(u["address"] for u in pool["upstreams"])
    print(f"{args.color}: {addresses} (version {pool['version'] or '-'})")
    return EXIT_OK


async def _drain(client: AdminClient, args: argparse.Namespace) -> int:
    body = {
        **_target(args.target),
        "wait": args.wait,
        "cut_after": _duration(args.cut_after, "--cut-after"),
        "tunnel_grace": _duration(args.tunnel_grace, "--tunnel-grace"),
        "force": args.force,
    }
    result = await client.call("POST", "/v1/drain", body)
    names = ", ".join(result["upstreams"]) or "(no upstreams)"
    if not result["finished"]:
        print(f"draining {names}")
    elif result["drained"]:
        print(f"drained {names} in {result['seconds']:.2f}s")
    else:
        print(f"{names}: {result['cut']} requests cut after {args.cut_after}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


async def _reload(client: AdminClient, args: argparse.Namespace) -> int:
    # A refusal (400/409) raises ApiRefused: exit 1 with the fields named.
    result = await client.call("POST", "/v1/reload")
    if args.json:
        _print_json(result)
    elif result["result"] == "unchanged":
        print(f"{result['source']}: unchanged")
    else:
        print(f"{result['source']}: applied: {', '.join(result['changed'])}")
        if result["needs_restart"]:
            print(f"after a restart only: {', '.join(result['needs_restart'])}")
    return EXIT_OK


async def _undrain(client: AdminClient, args: argparse.Namespace) -> int:
    result = await client.call("POST", "/v1/undrain", _target(args.target))
    print("back in rotation: " + (", ".join(result["upstreams"]) or "(none was drained)"))
    return EXIT_OK


async def _rules(client: AdminClient, args: argparse.Namespace) -> int:
    if args.set is None:
        rules = await client.call("GET", "/v1/rules")
    else:
        rules = await client.call("PUT", "/v1/rules", {"rules": _read_rules(Path(args.set))})
    if args.json:
        _print_json(rules)
    else:
        for i, rule in enumerate(rules["rules"]):
            conditions = {k: v for k, v in rule.items() if v and k not in ("name", "to")}
            print(f"{rule.get('name') or f'pins[{i}]'} -> {rule['to']}: {json.dumps(conditions)}")
        if not rules["rules"]:
            print("no pin rules")
    return EXIT_OK


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


async def _events(client: AdminClient, args: argparse.Namespace) -> int:
    query = f"?since={args.since}&limit={args.limit}" + (f"&kind={args.kind}" if args.kind else "")

    def show(event: dict[str, Any]) -> None:
        print(json.dumps(event) if args.json else event_line(event), flush=True)

    if not args.follow:
        for event in (await client.call("GET", "/v1/events" + query))["events"]:
            show(event)
        return EXIT_OK
    # Like tail -F: through a restart of zdproxy the stream resumes where it stopped.
    last_id = 0
    while True:
        try:
            async for event in client.stream("/v1/events" + query + "&follow=1", last_id):
                show(event)
                last_id = event["id"]
        except Unreachable as exc:
            print(f"zdproxy events: {exc}; retrying", file=sys.stderr)
        await asyncio.sleep(RECONNECT_SECONDS)


async def _wait(client: AdminClient, args: argparse.Namespace) -> int:
    checks, ids = conditions(args.until)
    timeout = _duration(args.timeout, "--timeout")
    interval = max(0.05, _duration(args.interval, "--interval"))
    deadline = time.monotonic() + timeout
    while True:
        try:
            unmet = await unmet_conditions(client, checks, ids)  # RolloutFailed: exit 5
        except Unreachable as exc:  # zdproxy may be restarting: keep trying until the deadline
            unmet = [str(exc)]
        else:
            if not unmet:
                print("; ".join(args.until) + ": ok")
                return EXIT_OK
        why = "; ".join(unmet)
        if time.monotonic() + interval > deadline:
            print(f"zdproxy wait: timed out after {args.timeout}: {why}", file=sys.stderr)
            return EXIT_TIMEOUT
        await asyncio.sleep(interval)
