"""The CLI's rollout commands: `deploy`, `rollout show|pause|resume|promote|abort|retry`,
and `rolling` (a rolling update inside one pool)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from zdproxy.cli.client import AdminClient, Unreachable
from zdproxy.cli.views import describe, rollout_view
from zdproxy.cli.wait import why_not_done
from zdproxy.config.units import parse_duration

Register = Callable[..., argparse.ArgumentParser]

MIN_INTERVAL = 0.1  # seconds between two polls of `rollout show --watch`
REDRAW = "\x1b[H\x1b[J"  # cursor home, then erase below: a terminal redraws in place

ACTIONS = {
    "pause": "hold the current step (the judge keeps running)",
    "resume": "continue a paused step (its hold starts again)",
    "promote": "skip the remaining steps: the candidate goes live now",
    "abort": "roll back: the old live color takes all traffic again",
    "retry": "start a failed or aborted rollout again from its first step",
}


def add_rollout_commands(command: Register, common: argparse.ArgumentParser) -> None:
    deploy = command(
        "deploy",
        _deploy,
        "take COLOR live with a plan of the config file, judged step by step",
    )
    deploy.add_argument("color", choices=["blue", "green"], help="the color to deploy")
    deploy.add_argument("--plan", help="a [plans.NAME] (default: rollout.default_plan)")
    rollout = command("rollout", _show, "show or steer the rollout")
    rollout.set_defaults(json=False, watch=False)  # a bare `rollout` shows it
    actions = rollout.add_subparsers(dest="rollout_action", metavar="ACTION")
    show = actions.add_parser(
        "show",
        help="the rollout, the judge's verdict and numbers, and the history",
        description="The rollout, the judge's verdict and the numbers behind it, and the "
        "history. --watch redraws it every --interval until the rollout ends: exit 0 when "
        "it is done, 5 when it rolled back, was aborted, froze or failed (as `wait --until "
        "done`), 130 on Ctrl-C. Into a pipe, --watch prints the block again only when the "
        "state, the step or the verdict changes.",
        parents=[common],
    )
    form = show.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the raw JSON")
    form.add_argument("-w", "--watch", action="store_true", help="follow the rollout until it ends")
    show.add_argument(
        "--interval",
        type=_interval,
        default="1s",
        help=f"with --watch: redraw this often (default 1s, at least {MIN_INTERVAL * 1000:g}ms)",
    )
    show.set_defaults(admin_command=_show)
    for action, text in ACTIONS.items():
        parser = actions.add_parser(action, help=text, parents=[common])
        parser.set_defaults(admin_command=_action)
    rolling = command(
        "rolling",
        _rolling,
        "update COLOR's upstreams one at a time: drain, run the hook, wait healthy, return",
    )
    rolling.add_argument("color", choices=["blue", "green"])
    rolling.add_argument("--hook", required=True, help="a [hooks.NAME] of the config file")
    rolling.add_argument("--max-unavailable", type=int, default=1, help="out at once (default 1)")
    rolling.add_argument("--wait", action="store_true", help="return when it is done or failed")


async def _deploy(client: AdminClient, args: argparse.Namespace) -> int:
    body = {"color": args.color, **({"plan": args.plan} if args.plan else {})}
    rollout = await client.call("POST", "/v1/rollouts", body)
    print(describe(rollout))
    print(f"follow it: zdproxy events -f; wait for it: zdproxy wait --until done:{rollout['id']}")
    return 0


def _interval(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds < MIN_INTERVAL:
        raise argparse.ArgumentTypeError(f"{text!r}: at least {MIN_INTERVAL * 1000:g}ms")
    return seconds


async def _show(client: AdminClient, args: argparse.Namespace) -> int:
    if args.watch:
        return await _watch(client, args.interval)
    rollout = await client.call("GET", "/v1/rollout")
    print(json.dumps(rollout, indent=2) if args.json else rollout_view(rollout))
    return 0


async def _watch(client: AdminClient, interval: float) -> int:
    """Show the rollout every `interval` until it ends: 0 when it is done, RolloutFailed
    (exit 5) when it ended otherwise. Idle, it waits for a rollout to start; once it has
    one, it follows that one by its id, even if another starts after it."""
    terminal = sys.stdout.isatty()
    rollout = await client.call("GET", "/v1/rollout")  # no answer at all: exit 3
    trouble = ""  # why the last poll got no answer
    shown: tuple[Any, ...] | None = None
    while True:
        view = rollout_view(rollout) + (f"\n{trouble}" if trouble else "")
        if terminal:
            sys.stdout.write(REDRAW + view + "\n")
            sys.stdout.flush()
        elif (change := _change(rollout, trouble)) != shown:
            print(view + "\n", flush=True)  # a blank line between blocks
            shown = change
        if why_not_done(rollout) is None:  # raises RolloutFailed on any other end
            return 0
        await asyncio.sleep(interval)
        path = "/v1/rollout" if rollout["id"] is None else f"/v1/rollouts/{rollout['id']}"
        try:
            rollout, trouble = await client.call("GET", path), ""
        except Unreachable as exc:  # zdproxy may be restarting: the rollout resumes after
            trouble = f"{exc}; retrying"


def _change(rollout: dict[str, Any], trouble: str) -> tuple[Any, ...]:
    """What makes --watch print again into a pipe: not every new count, only a move."""
    judge = rollout["judge"]
    verdict = None if judge is None else judge["verdict"]
    return (rollout["id"], rollout["state"], rollout["step"], verdict, trouble)


async def _action(client: AdminClient, args: argparse.Namespace) -> int:
    print(describe(await client.call("POST", f"/v1/rollout/{args.rollout_action}")))
    return 0


async def _rolling(client: AdminClient, args: argparse.Namespace) -> int:
    body = {"color": args.color, "hook": args.hook, "max_unavailable": args.max_unavailable}
    rolling = await client.call("POST", "/v1/rolling", body)
    print(f"rolling update {rolling['id']} of {args.color}: {len(rolling['pending'])} upstreams")
    while args.wait and rolling["state"] == "running":
        await asyncio.sleep(0.5)
        rolling = await client.call("GET", "/v1/rolling")
    if rolling["state"] == "failed":
        print(f"zdproxy rolling: failed: {rolling['reason']}", file=sys.stderr)
        return 1
    if rolling["state"] == "done":
        print(f"done: {', '.join(rolling['updated'])}")
    return 0
