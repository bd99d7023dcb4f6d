"""The CLI's rollout commands: `deploy [--wait]`, `rollout show|pause|resume|promote|
abort|retry`, and `rolling` (a rolling update inside one pool)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from zdproxy.cli.client import AdminClient, ApiRefused, Unreachable, UsageError
from zdproxy.cli.common import EXIT_CODES, Exit, Register, duration
from zdproxy.cli.views import describe, rollout_view
from zdproxy.cli.wait import Conditions, wait_for, why_not_done
from zdproxy.config.plans import BUILTIN_PLANS, DEFAULT_PLAN
from zdproxy.config.units import format_duration

MIN_INTERVAL = 0.1  # seconds between two polls of `rollout show --watch`
WAIT_INTERVAL = 0.5  # seconds between two polls of `deploy --wait`
DEFAULT_DEPLOY_TIMEOUT = 3600.0  # `deploy --wait` without --timeout
REDRAW = "\x1b[H\x1b[J"  # cursor home, then erase below: a terminal redraws in place

ACTIONS = {
    "pause": "hold the current step (the judge keeps running)",
    "resume": "continue a paused step (its hold starts again)",
    "promote": "skip the remaining steps: the candidate goes live now",
    "abort": "roll back: the old live color takes all traffic again",
    "retry": "start a failed or aborted rollout again from its first step",
}

DEPLOY_HELP = (
    "Prints the rollout's id and state (rollout ID: ...). Without --wait it returns at\n"
    "once and the rollout goes on in zdproxy.\n\n"
    "built-in plans (a [plans.NAME] of the same name replaces one):\n"
    + "".join(f"  {name:<11} {plan.describe()}\n" for name, plan in BUILTIN_PLANS.items())
)


def add_rollout_commands(command: Register, common: argparse.ArgumentParser) -> None:
    deploy = command(
        "deploy",
        _deploy,
        "take COLOR live with a plan, judged step by step",
        epilog=DEPLOY_HELP + "\n" + EXIT_CODES,
    )
    deploy.add_argument("color", choices=["blue", "green"], help="the color to deploy")
    deploy.add_argument(
        "--plan",
        help="a [plans.NAME] of the config or a built-in plan (default: rollout.default_plan, "
        f"{DEFAULT_PLAN!r} unless the config says otherwise)",
    )
    deploy.add_argument(
        "--wait",
        action="store_true",
        help="return when the rollout ended: exit 0 done, 5 rolled back, aborted, frozen or "
        "failed; 4 past --timeout (the rollout goes on, unless --abort-on-timeout)",
    )
    deploy.add_argument(
        "--timeout",
        type=duration,
        metavar="DURATION",
        help=f"with --wait: give up after this (default {format_duration(DEFAULT_DEPLOY_TIMEOUT)})",
    )
    deploy.add_argument(
        "--abort-on-timeout",
        action="store_true",
        help="with --wait: past --timeout, abort the rollout (the old live color takes all "
        "traffic again), then exit 4",
    )
    rollout = command("rollout", _show, "show or steer the rollout")
    actions = rollout.add_subparsers(dest="rollout_action", metavar="ACTION", required=True)
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
        parser = actions.add_parser(action, help=text, description=text, parents=[common])
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
    if not args.wait and (args.timeout is not None or args.abort_on_timeout):
        raise UsageError("--timeout and --abort-on-timeout apply only with --wait")
    body = {"color": args.color, **({"plan": args.plan} if args.plan else {})}
    rollout = await client.call("POST", "/v1/rollouts", body)
    print(describe(rollout), flush=True)
    if not args.wait:
        print(
            f"follow it: zdproxy events -f; wait for it: zdproxy wait --until done:{rollout['id']}"
        )
        return Exit.OK
    timeout = DEFAULT_DEPLOY_TIMEOUT if args.timeout is None else args.timeout
    done = Conditions.parse([f"done:{rollout['id']}"])
    why = await wait_for(client, done, timeout, WAIT_INTERVAL)  # RolloutFailed: exit 5
    if why is None:
        print(describe(await client.call("GET", f"/v1/rollouts/{rollout['id']}")))
        return Exit.OK
    message = f"timed out after {format_duration(timeout)}: {why}"
    if not args.abort_on_timeout:
        message += "; it goes on (`zdproxy rollout abort` stops it)"
    else:
        try:
            message += f"; aborted it: {describe(await client.call('POST', '/v1/rollout/abort'))}"
        except ApiRefused as exc:
            message += f"; the abort was refused: {exc}"
    print(f"zdproxy deploy: {message}", file=sys.stderr)
    return Exit.TIMEOUT


def _interval(text: str) -> float:
    seconds = duration(text)
    if seconds < MIN_INTERVAL:
        raise argparse.ArgumentTypeError(f"{text!r}: at least {MIN_INTERVAL * 1000:g}ms")
    return seconds


async def _show(client: AdminClient, args: argparse.Namespace) -> int:
    if args.watch:
        return await _watch(client, args.interval)
    rollout = await client.call("GET", "/v1/rollout")
    print(json.dumps(rollout, indent=2) if args.json else rollout_view(rollout))
    return Exit.OK


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
            return Exit.OK
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
    return Exit.OK


async def _rolling(client: AdminClient, args: argparse.Namespace) -> int:
    body = {"color": args.color, "hook": args.hook, "max_unavailable": args.max_unavailable}
    rolling = await client.call("POST", "/v1/rolling", body)
    print(f"rolling update {rolling['id']} of {args.color}: {len(rolling['pending'])} upstreams")
    while args.wait and rolling["state"] == "running":
        await asyncio.sleep(0.5)
        rolling = await client.call("GET", "/v1/rolling")
    if rolling["state"] == "failed":
        print(f"zdproxy rolling: failed: {rolling['reason']}", file=sys.stderr)
        return Exit.REFUSED
    if rolling["state"] == "done":
        print(f"done: {', '.join(rolling['updated'])}")
    return Exit.OK
