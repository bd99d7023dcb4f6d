"""The CLI's rollout commands: `deploy`, `rollout show|pause|resume|promote|abort|retry`,
and `rolling` (a rolling update inside one pool)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from zdproxy.cli.client import AdminClient

Register = Callable[..., argparse.ArgumentParser]

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
    actions = rollout.add_subparsers(dest="rollout_action", metavar="ACTION")
    show = actions.add_parser("show", help="the rollout and its history", parents=[common])
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


def describe(rollout: dict[str, Any]) -> str:
    if rollout["state"] == "idle":
        return "no rollout yet"
    step = f", step {rollout['step']} of {rollout['steps']}" if rollout["step"] else ""
    share = f", {rollout['share']:g}% of the traffic" if rollout["share"] is not None else ""
    return (
        f"rollout {rollout['id']}: {rollout['candidate']} with plan {rollout['plan']}: "
        f"{rollout['state']}{step}{share}; {rollout['reason']}"
    )


async def _deploy(client: AdminClient, args: argparse.Namespace) -> int:
    body = {"color": args.color, **({"plan": args.plan} if args.plan else {})}
    rollout = await client.call("POST", "/v1/rollouts", body)
    print(describe(rollout))
    print(f"follow it: zdproxy events -f; wait for it: zdproxy wait --until done:{rollout['id']}")
    return 0


async def _show(client: AdminClient, args: argparse.Namespace) -> int:
    rollout = await client.call("GET", "/v1/rollout")
    print(describe(rollout))
    for entry in rollout["history"]:
        print(f"  step {entry['step']} {entry['state']} [{entry['actor']}] {entry['reason']}")
    return 0


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
